//! A placement as a dry run (`POST /v1/placements`): the host a VM would go to now and
//! why, decided exactly as a creation decides it ([`Manager::place`]), without making
//! anything or counting anything.

use hangar_api::{PlacementBody, PlacementView};
use hangar_core::ServiceRequest;

use crate::manager::Manager;
use crate::requests::create::plan_for;
use crate::requests::{MakeVm, RequestError};
use crate::scheduler::PlacementError;

/// Why a dry-run placement has no answer.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    /// The body is malformed: no service and no size, a zero size, settings without a
    /// service.
    #[error("{0}")]
    Invalid(String),
    /// The service is unknown, never viable in that environment, or lacks a setting.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// No host can take the VM now, or the hosts' use could not be read.
    #[error(transparent)]
    Placement(#[from] PlacementError),
}

/// The id the plan of a dry run carries (no VM of that id is ever made).
const PREVIEW_ID: &str = "vm-placement-preview";

impl Manager {
    /// Where a VM of `body`'s service or size would be placed now, and why: the same
    /// decision, over the same live facts, as a creation makes ([`Manager::place`]), with
    /// the priority of a request's VM (or of a pool fill with `pool`). Nothing is made,
    /// reserved or recorded; two previews in a row give the same answer while nothing
    /// changes.
    pub async fn preview_placement(
        &self,
        body: &PlacementBody,
    ) -> Result<PlacementView, PreviewError> {
        if body.service.is_none() && !body.env.is_empty() {
            return Err(PreviewError::Invalid(
                "env settings need a service; give `service`".into(),
            ));
        }
        // Checked as a request's are (a bare size stands in a placeholder service name,
        // which only the catalog lookup below would judge).
        let request = ServiceRequest {
            service: Some(body.service.clone().unwrap_or_default()),
            env: body.env.clone(),
            isolate: body.isolate.clone(),
            on: body.on.clone(),
            ..ServiceRequest::default()
        };
        request
            .validate()
            .map_err(|err| PreviewError::Invalid(err.to_string()))?;
        let service = match &body.service {
            Some(_) => Some(self.viable_service(&request)?),
            None => None,
        };
        let size =
            |given: Option<u32>, of_service: Option<u32>, what: &str| match given.or(of_service) {
                Some(0) => Err(PreviewError::Invalid(format!("{what} must be at least 1"))),
                Some(n) => Ok(n),
                None => Err(PreviewError::Invalid(format!(
                    "give a service, or vcpus and memory_mib ({what} is missing)"
                ))),
            };
        let vcpus = size(body.vcpus, service.as_ref().map(|s| s.vcpus), "vcpus")?;
        let memory_mib = size(
            body.memory_mib,
            service.as_ref().map(|s| s.memory_mib),
            "memory_mib",
        )?;
        // The plan a creation would make (`create::plan_for`), for a VM never made.
        let make = MakeVm {
            service,
            vcpus,
            memory_mib,
            mode: hangar_core::Mode::Dedicated,
            env: body.env.clone(),
            pool: body.pool.then(|| PREVIEW_ID.to_owned()),
            ready: None,
            template: false,
            isolation: body.isolate.clone(),
            on: body.on.clone(),
            owner: crate::requests::LOCAL_OWNER.into(),
            quota: crate::quotas::Reservation::none(),
            egress: hangar_core::EgressPolicy::default(),
        };
        let plan = plan_for(&make, PREVIEW_ID);
        let constraints = make.constraints();
        let (host, why) = self.choose_host(&plan, &constraints).await?;
        Ok(PlacementView {
            host: host.name().to_owned(),
            why,
            vcpus,
            memory_mib,
        })
    }
}
