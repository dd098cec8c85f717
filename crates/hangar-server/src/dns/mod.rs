//! A small authoritative DNS server for the server's `--dns-domain` (issue 18; seed 002
//! claim 1: the name in a ready notification resolves), started by `hangar server
//! --dns-listen ADDR` on UDP and TCP (`hickory-server`).
//!
//! Questions are answered from a [`Zone`] built from the store's VMs and stacks
//! ([`Zone::from_vms`]), built again when it is older than [`ZONE_MAX_AGE`], one build at a
//! time whatever the number of questions (a flood of questions costs the store at most one
//! read of its VMs and stacks per [`ZONE_MISS_AGE`]). A name the zone lacks is looked up
//! again in a zone built afresh once the zone is older than [`ZONE_MISS_AGE`], so a name
//! resolves as soon as its VM is granted; a deleted VM's name goes within
//! [`ZONE_MAX_AGE`]:
//!
//! - `A`/`AAAA` of `<vm>.<domain>`, `<service>.<domain>` (a shared service) and
//!   `<member>.<stack>.<domain>` (a stack member with a public port): the addresses of the
//!   stable endpoints;
//! - `SRV` of `_<port>._tcp.<name>`: the port's number, target `<name>`;
//! - NXDOMAIN (with the zone's SOA) for other names under the domain, REFUSED outside it;
//!   answers are authoritative, with a TTL of [`TTL`] seconds (VMs come and go).

pub mod zone;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

pub use zone::{Entry, Lookup, Zone};

use crate::manager::Manager;

/// Seconds resolvers may keep an answer.
pub const TTL: u32 = 5;

/// How long a built zone answers questions.
pub const ZONE_MAX_AGE: Duration = Duration::from_millis(500);

/// How old a zone may be and still answer that a name does not exist (or has no record of
/// the type asked) without being built again.
pub const ZONE_MISS_AGE: Duration = Duration::from_millis(50);

/// Why the DNS server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot listen for DNS on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("DNS domain {0:?} is not a valid domain name")]
    Domain(String),
}

/// Answers for `domain` on `addr` (UDP and TCP) until the returned task is aborted.
/// Returns the address it listens on (the port chosen when `addr`'s is 0) with the task.
pub async fn serve(
    addr: SocketAddr,
    domain: &str,
    manager: Arc<Manager>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), DnsError> {
    let apex = Name::from_ascii(format!("{}.", domain.trim_end_matches('.')))
        .map_err(|_| DnsError::Domain(domain.to_owned()))?;
    let listen = |source| DnsError::Listen { addr, source };
    let udp = tokio::net::UdpSocket::bind(addr).await.map_err(listen)?;
    let bound = udp.local_addr().map_err(listen)?;
    // The same port on TCP (answers too large for UDP are retried there).
    let tcp = tokio::net::TcpListener::bind(bound).await.map_err(listen)?;
    let mut server = hickory_server::Server::new(Handler {
        domain: domain.to_owned(),
        apex,
        manager,
        cache: tokio::sync::Mutex::new(None),
    });
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 64);
    let task = tokio::spawn(async move {
        if let Err(err) = server.block_until_done().await {
            tracing::warn!(error = %err, "the DNS server stopped");
        }
    });
    tracing::info!(%bound, %domain, "answering DNS for the domain");
    Ok((bound, task))
}

struct Handler {
    domain: String,
    /// `domain.`, absolute.
    apex: Name,
    manager: Arc<Manager>,
    /// The zone last built and when. Held while a zone is built, so concurrent questions
    /// wait for that one build.
    cache: tokio::sync::Mutex<Option<(Instant, Arc<Zone>)>>,
}

/// What to send back for one question.
struct Answer {
    code: ResponseCode,
    authoritative: bool,
    answers: Vec<Record>,
    /// The zone's SOA, for negative answers.
    soa: Vec<Record>,
    additionals: Vec<Record>,
}

impl Handler {
    /// The zone last built when it is at most `max_age` old, else one built now.
    async fn zone(&self, max_age: Duration) -> Arc<Zone> {
        let mut cache = self.cache.lock().await;
        if let Some((built, zone)) = cache.as_ref()
            && built.elapsed() <= max_age
        {
            return zone.clone();
        }
        let zone = Arc::new(self.build_zone().await);
        *cache = Some((Instant::now(), zone.clone()));
        zone
    }

    /// The zone now: built from the store's VMs and stacks (an empty zone when the VMs
    /// cannot be read, no stack names when the stacks cannot, logged: those names are then
    /// NXDOMAIN for [`TTL`] seconds at most).
    async fn build_zone(&self) -> Zone {
        let store = self.manager.store();
        let vms = match store.vms(false).await {
            Ok(vms) => vms,
            Err(err) => {
                tracing::warn!(error = %err, "DNS: cannot read the VMs");
                return Zone::new(&self.domain);
            }
        };
        let mut zone = Zone::from_vms(&self.domain, &vms);
        match store.stacks().await {
            Ok(stacks) => zone.add_stacks(&stacks, &vms),
            Err(err) => tracing::warn!(error = %err, "DNS: cannot read the stacks"),
        }
        zone
    }

    fn soa(&self) -> Record {
        let name = |label: &str| {
            Name::from_ascii(label)
                .and_then(|label| label.append_domain(&self.apex))
                .unwrap_or_else(|_| self.apex.clone())
        };
        Record::from_rdata(
            self.apex.clone(),
            TTL,
            RData::SOA(SOA::new(
                name("ns"),
                name("hostmaster"),
                1,
                60,
                60,
                3600,
                TTL,
            )),
        )
    }

    /// The answer to `qname`/`qtype` from `zone`.
    fn answer(&self, zone: &Zone, qname: &Name, qtype: RecordType) -> Answer {
        let mut answer = Answer {
            code: ResponseCode::NoError,
            authoritative: true,
            answers: Vec::new(),
            soa: Vec::new(),
            additionals: Vec::new(),
        };
        let addresses = |name: &Name, entry: &Entry, want: RecordType| -> Vec<Record> {
            entry
                .addresses()
                .into_iter()
                .filter_map(|ip| match ip {
                    IpAddr::V4(v4) if matches!(want, RecordType::A | RecordType::ANY) => {
                        Some(RData::A(A(v4)))
                    }
                    IpAddr::V6(v6) if matches!(want, RecordType::AAAA | RecordType::ANY) => {
                        Some(RData::AAAA(AAAA(v6)))
                    }
                    _ => None,
                })
                .map(|rdata| Record::from_rdata(name.clone(), TTL, rdata))
                .collect()
        };
        match zone.lookup(&qname.to_ascii()) {
            Lookup::Outside => {
                answer.code = ResponseCode::Refused;
                answer.authoritative = false;
            }
            Lookup::NoSuchName => answer.code = ResponseCode::NXDomain,
            Lookup::Apex if qtype == RecordType::SOA => answer.answers.push(self.soa()),
            Lookup::Apex => {}
            Lookup::Name(entry) => answer.answers = addresses(qname, entry, qtype),
            Lookup::Port { name, port } => {
                if matches!(qtype, RecordType::SRV | RecordType::ANY) {
                    let target = Name::from_ascii(name)
                        .and_then(|name| name.append_domain(&self.apex))
                        .unwrap_or_else(|_| self.apex.clone());
                    answer.answers.push(Record::from_rdata(
                        qname.clone(),
                        TTL,
                        RData::SRV(SRV::new(0, 0, port.port(), target.clone())),
                    ));
                    if let Lookup::Name(entry) = zone.lookup(&target.to_ascii()) {
                        answer.additionals = addresses(&target, entry, RecordType::ANY);
                    }
                }
            }
        }
        if answer.authoritative && answer.answers.is_empty() {
            answer.soa.push(self.soa());
        }
        answer
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let failed = |metadata: &Metadata| {
            let mut metadata = Metadata::response_from_request(metadata);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        };
        let info = match request.request_info() {
            Ok(info) if request.metadata.op_code == OpCode::Query => info,
            Ok(_) => {
                let response = builder.error_msg(&request.metadata, ResponseCode::NotImp);
                return response_handle
                    .send_response(response)
                    .await
                    .unwrap_or_else(|_| failed(&request.metadata));
            }
            Err(_) => {
                let response = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                return response_handle
                    .send_response(response)
                    .await
                    .unwrap_or_else(|_| failed(&request.metadata));
            }
        };
        let qname: Name = info.query.original().name().clone();
        let qtype = info.query.query_type();
        let mut answer = self.answer(&*self.zone(ZONE_MAX_AGE).await, &qname, qtype);
        if answer.authoritative && answer.answers.is_empty() {
            // Perhaps a name granted since the zone was built.
            answer = self.answer(&*self.zone(ZONE_MISS_AGE).await, &qname, qtype);
        }
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = answer.authoritative;
        metadata.response_code = answer.code;
        let response = builder.build(
            metadata,
            answer.answers.iter(),
            std::iter::empty(),
            answer.soa.iter(),
            answer.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(err) => {
                tracing::debug!(error = %err, "DNS: cannot send an answer");
                failed(&request.metadata)
            }
        }
    }
}
