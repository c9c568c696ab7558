//! `Webhook` (hookfleet.io/v1alpha1): one customer endpoint, delivered by the fleet of the Integration it
//! names (same namespace). It takes the events whose name starts with one of its prefixes (and whose
//! headers carry the values it asks for), and sends each to its destination: the same
//! [`DestinationSpec`] an Integration's single `destination` uses.
//!
//! The fleet reads Webhooks from a snapshot the operator compiles (the contract's `webhooks` module); the
//! operator writes their status from what the workers report, at most once per 10 s per Webhook.

// Several `printcolumn(type_ = …)` entries on one derive read to clippy as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

// The isolation settings are shared with the Integration (`webhooks.perWebhook`), so they live beside it.
use crate::integration::DestinationSpec;
pub use crate::integration::{AutoPauseSpec, Effective, WebhookLimits, WebhookRateLimit};

/// Desired state of a Webhook.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hookfleet.io",
    version = "v1alpha1",
    kind = "Webhook",
    namespaced,
    status = "WebhookStatus",
    derive = "PartialEq",
    shortname = "wh",
    category = "hookfleet",
    doc = "A Webhook is one customer endpoint: the events it takes (event-name prefixes, header matches) \
           and where they go, delivered by the fleet of the Integration it names.",
    printcolumn(name = "Integration", type_ = "string", json_path = ".spec.integration"),
    printcolumn(name = "Events", type_ = "string", json_path = ".spec.events"),
    printcolumn(name = "Host", type_ = "string", json_path = ".status.destinationHost"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Failures",
        type_ = "integer",
        json_path = ".status.consecutiveFailures"
    ),
    printcolumn(name = "Last-Delivery", type_ = "date", json_path = ".status.lastSuccessTime"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
// The Integration decides who may reach private networks, never a tenant's Webhook.
#[x_kube(validation = kube::core::Rule::new("!self.destination.allowPrivateNetworks")
    .message("a Webhook cannot allow private networks: the Integration's webhooks.allowPrivateNetworks decides")
    .field_path(".destination.allowPrivateNetworks"))]
pub struct WebhookSpec {
    /// The Integration (same namespace, with `spec.webhooks`) whose fleet delivers this Webhook.
    #[schemars(length(min = 1, max = 253))]
    pub integration: String,
    /// Event-name prefixes: an event is taken when its name starts with one of them (`temp` takes
    /// `temp`, `temperature` and `temperature/basement`, not `high_temp`); `""` takes every event.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = kube::core::Rule::new("self.all(p, size(p) <= 255)")
        .message("event prefixes are at most 255 characters"))]
    pub events: Vec<String>,
    /// Exact matches on message headers (e.g. a device or product id), all of which must hold.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub match_headers: BTreeMap<String, String>,
    /// Where the events go: URL, method, headers, auth, TLS, signing keys, body template.
    pub destination: DestinationSpec,
    /// When true nothing is sent; the Webhook's messages are kept and delivered after it resumes.
    #[serde(default)]
    pub paused: bool,
    /// This Webhook's own isolation and auto-pause settings. They may only be lower than its
    /// Integration's `webhooks.perWebhook` (a value above is refused, naming the field): the platform
    /// team raises limits, a tenant only lowers them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<WebhookLimits>,
}

/// Observed state of a Webhook, written by the operator from the workers' reports.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookStatus {
    /// The `metadata.generation` the fleet delivers with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (in the fleet's configuration and not failing) and `Paused`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The destination's host (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_host: Option<String>,
    /// The last 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<Time>,
    /// The last failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<WebhookFailure>,
    /// Failed attempts since the last success.
    #[serde(default)]
    pub consecutive_failures: i64,
    /// Deliveries (2xx) since the Webhook was created.
    #[serde(default)]
    pub delivered: i64,
    /// Failed attempts since the Webhook was created.
    #[serde(default)]
    pub failed: i64,
    /// Messages dead-lettered for this Webhook since it was created.
    #[serde(default)]
    pub dead_lettered: i64,
    /// Set while the operator keeps this Webhook paused for failing (reason `Failing`) or because its
    /// endpoint answered 410 (`Gone`); its messages wait on its retry path. Read back after an operator
    /// restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_paused: Option<AutoPaused>,
    /// The value of the annotation `hookfleet.io/resume` the operator last acted on: setting it to
    /// another value resumes an auto-paused Webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_seen: Option<String>,
    /// When it was last resumed from an auto-pause: failures before it do not pause it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at: Option<Time>,
}

/// Why and since when the operator pauses a Webhook.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AutoPaused {
    /// `Failing` or `Gone`.
    pub reason: String,
    pub since: Time,
    pub message: String,
}

/// The annotation that resumes an auto-paused Webhook when its value changes
/// (`kubectl annotate webhook NAME hookfleet.io/resume="$(date +%s)" --overwrite`).
pub const RESUME_ANNOTATION: &str = "hookfleet.io/resume";

/// One failed attempt, without secrets.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookFailure {
    pub time: Time,
    /// The HTTP status, when the destination answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// What failed: `http_status`, `timeout`, `connect`, `tls`, `redirect`, `template`, …
    pub kind: String,
    /// The start of the response body (at most 256 bytes, control characters and the Webhook's own
    /// secret values removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excerpt: Option<String>,
}

/// Reasons of a Webhook's `Ready` condition.
pub mod reason {
    /// In the fleet's configuration, and its last attempt (if any) succeeded.
    pub const DELIVERING: &str = "Delivering";
    /// `spec.paused`.
    pub const PAUSED: &str = "Paused";
    /// Its last attempt failed; with `Paused=True`, the operator paused it after repeated failures.
    pub const FAILING: &str = "Failing";
    /// Its endpoint answered 410 Gone: paused by the operator until resumed.
    pub const GONE: &str = "Gone";
    /// The spec is refused (the condition names the field); the fleet does not deliver it.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// No Integration of that name in the namespace, or it has no `spec.webhooks`.
    pub const NO_INTEGRATION: &str = "IntegrationNotFound";
    /// A Secret it references is missing or lacks the key.
    pub const SECRET_MISSING: &str = "SecretMissing";
    /// Its Integration is suspended (`spec.suspend`): no worker delivers; its messages wait in the queue.
    pub const FLEET_SUSPENDED: &str = "FleetSuspended";
}

impl Webhook {
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integration::RateLimitScope;

    fn limits(v: serde_json::Value) -> WebhookLimits {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_webhook_only_lowers_its_integrations_limits() {
        let fleet = limits(
            serde_json::json!({"maxInFlight": 8, "rateLimit": {"perSecond": 10},
            "autoPause": {"consecutiveFailures": 20, "after": "10m"}}),
        );
        let own = limits(
            serde_json::json!({"maxInFlight": 4, "rateLimit": {"perSecond": 20, "burst": 5},
            "autoPause": {"consecutiveFailures": 5, "after": "1h"}}),
        );
        let fields: Vec<String> = WebhookLimits::above(Some(&fleet), &own)
            .into_iter()
            .map(|(f, _)| f)
            .collect();
        assert_eq!(
            fields,
            ["spec.limits.rateLimit.perSecond", "spec.limits.autoPause.after"]
        );
        let e = WebhookLimits::effective(Some(&fleet), Some(&own));
        assert_eq!(e.max_in_flight, Some(4));
        assert_eq!(
            e.rate_limit,
            Some(WebhookRateLimit {
                per_second: 10,
                burst: Some(5),
                scope: Some(RateLimitScope::Worker),
            }),
            "clamped"
        );
        assert_eq!(e.auto_pause.consecutive_failures, 5);
        assert_eq!(
            std::time::Duration::from(e.auto_pause.after),
            std::time::Duration::from_secs(600)
        );
        // Without an Integration value: the Webhook's own, or the defaults.
        let e = WebhookLimits::effective(None, None);
        assert_eq!((e.max_in_flight, e.rate_limit), (None, None));
        assert_eq!(e.auto_pause, AutoPauseSpec::default());
        assert!(
            WebhookLimits::above(None, &own)
                .iter()
                .all(|(f, _)| f.contains("autoPause.after"))
        );
    }

    /// A fleet-wide rate limit on the Integration is never widened to each worker's by a Webhook;
    /// unset, a Webhook takes its Integration's scope; the snapshot always says which.
    #[test]
    fn the_rate_limit_scope_is_the_narrower() {
        let fleet = limits(serde_json::json!({"rateLimit": {"perSecond": 10, "scope": "fleet"}}));
        let widen = limits(serde_json::json!({"rateLimit": {"perSecond": 5, "scope": "worker"}}));
        let above = WebhookLimits::above(Some(&fleet), &widen);
        assert_eq!(above.len(), 1, "{above:?}");
        assert_eq!(above[0].0, "spec.limits.rateLimit.scope");
        assert!(above[0].1.starts_with("worker is above"), "{}", above[0].1);
        let scope = |f: Option<&WebhookLimits>, o: Option<&WebhookLimits>| {
            WebhookLimits::effective(f, o).rate_limit.map(|r| r.scope)
        };
        assert_eq!(
            scope(Some(&fleet), Some(&widen)),
            Some(Some(RateLimitScope::Fleet))
        );
        let lower = limits(serde_json::json!({"rateLimit": {"perSecond": 5}}));
        assert_eq!(
            scope(Some(&fleet), Some(&lower)),
            Some(Some(RateLimitScope::Fleet))
        );
        assert_eq!(scope(Some(&fleet), None), Some(Some(RateLimitScope::Fleet)));
        let own_fleet = limits(serde_json::json!({"rateLimit": {"perSecond": 5, "scope": "fleet"}}));
        assert_eq!(scope(None, Some(&own_fleet)), Some(Some(RateLimitScope::Fleet)));
        assert_eq!(scope(None, Some(&lower)), Some(Some(RateLimitScope::Worker)));
        let per_worker = limits(serde_json::json!({"rateLimit": {"perSecond": 10}}));
        assert_eq!(
            scope(Some(&per_worker), Some(&own_fleet)),
            Some(Some(RateLimitScope::Fleet))
        );
        assert!(WebhookLimits::above(Some(&per_worker), &own_fleet).is_empty());
    }
}
