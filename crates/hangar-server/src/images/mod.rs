//! Images as the control plane sees them: build tasks, the inventory, promotion and
//! eviction ([`policy`]). Images themselves come from the host's image source
//! (`hangar_host::images`: the local cache [`LocalImages`], exports); their wire views
//! from `hangar_api`.

pub mod blobs;
pub mod policy;

pub use hangar_host::images::{
    DEFAULT_MIRROR, ExportInfo, ImageSource, ImageSourceError, LocalImages, NoImages, ProgressFn,
    RootImage,
};

pub use hangar_api::{ImageView, LayerView};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod farm_tests;
