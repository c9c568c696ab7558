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
pub mod webhook;

pub use contract::Invalid;
pub use integration::{Integration, IntegrationSpec, IntegrationStatus};
pub use validate::{validate, validate_webhook};
pub use webhook::{Webhook, WebhookSpec, WebhookStatus};

use kube::CustomResourceExt;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// Path of the generated Integration CRD, relative to the `crds/` directory.
pub const CRD_FILE: &str = "integrations.hookfleet.io.yaml";

/// The Helm chart's copy of the same CRD, relative to the `crds/` directory (Helm installs a chart's `crds/`
/// before its templates; `make crds` writes both, and a test fails when either is stale).
pub const CHART_CRD_FILE: &str = "../charts/hookfleet/crds/integrations.hookfleet.io.yaml";

/// The Webhook CRD's files, as [`CRD_FILE`] and [`CHART_CRD_FILE`].
pub const WEBHOOK_CRD_FILE: &str = "webhooks.hookfleet.io.yaml";
pub const CHART_WEBHOOK_CRD_FILE: &str = "../charts/hookfleet/crds/webhooks.hookfleet.io.yaml";

fn yaml(crd: &CustomResourceDefinition, source: &str) -> String {
    let body = serde_yaml::to_string(crd).expect("the CRD serializes to YAML");
    format!("# Generated from crds/src/{source} by `make crds`; do not edit.\n---\n{body}")
}

/// The Integration CRD as YAML, exactly as committed under `crds/`.
pub fn crd_yaml() -> String {
    yaml(&Integration::crd(), "integration.rs")
}

/// The Webhook CRD as YAML, exactly as committed under `crds/`.
pub fn webhook_crd_yaml() -> String {
    yaml(&Webhook::crd(), "webhook.rs")
}

/// Every CRD: (file, the chart's copy, YAML).
pub fn crds() -> [(&'static str, &'static str, String); 2] {
    [
        (CRD_FILE, CHART_CRD_FILE, crd_yaml()),
        (WEBHOOK_CRD_FILE, CHART_WEBHOOK_CRD_FILE, webhook_crd_yaml()),
    ]
}
