//! The hookfleet API, shared by the operator and the worker.
//!
//! The CRD YAML under `crds/` is generated from these types (`cargo run -p hookfleet-crds --bin crdgen`),
//! never edited by hand; `tests/crd_yaml.rs` fails when it is out of date.

pub mod address;
pub mod broker;
pub mod contract;
pub mod duration;
pub mod integration;
pub mod limits;
pub mod redact;
pub mod template;
#[cfg(feature = "testing")]
pub mod testing;
mod validate;

pub use contract::Invalid;
pub use integration::{Integration, IntegrationSpec, IntegrationStatus};
pub use validate::validate;

use kube::CustomResourceExt;

/// Path of the generated CRD, relative to the `crds/` directory.
pub const CRD_FILE: &str = "integrations.hookfleet.io.yaml";

/// The Helm chart's copy of the same CRD, relative to the `crds/` directory (Helm installs a chart's `crds/`
/// before its templates; `make crds` writes both, and a test fails when either is stale).
pub const CHART_CRD_FILE: &str = "../charts/hookfleet/crds/integrations.hookfleet.io.yaml";

/// The CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&Integration::crd()).expect("the CRD serializes to YAML");
    format!("# Generated from crds/src/integration.rs by `make crds`; do not edit.\n---\n{body}")
}
