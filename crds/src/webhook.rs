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

use crate::integration::{DestinationSpec, RateLimitScope};
use crate::limits;

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

/// What one Webhook may take of its fleet, and when it is paused for failing (`docs/webhooks.md`,
/// "Isolation"): on an Integration (`webhooks.perWebhook`) the defaults and ceilings of its Webhooks; on
/// a Webhook (`limits`) its own, lower values.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookLimits {
    /// Requests of this Webhook in flight at once in one worker (never more than half the worker's
    /// `delivery.concurrency`). A copy that finds the Webhook at its cap is set aside on its retry
    /// path without spending an attempt (reason `throttled`), and the worker goes on with the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = limits::CONCURRENCY.min, max = limits::CONCURRENCY.max))]
    pub max_in_flight: Option<u32>,
    /// Requests per second to this Webhook (a token bucket in each worker), per worker or for the whole
    /// fleet (`scope`). A copy that finds no token is set aside without spending an attempt (reason
    /// `rate_limited`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<WebhookRateLimit>,
    /// When the operator pauses a Webhook that keeps failing (`Paused=True`, reason `Failing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<AutoPauseSpec>,
}

/// A Webhook's request rate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookRateLimit {
    /// Sustained requests per second (per worker, or for the fleet: `scope`).
    #[schemars(range(min = limits::RATE_LIMIT.min, max = limits::RATE_LIMIT.max))]
    pub per_second: u32,
    /// Requests allowed in a burst; defaults to `perSecond`. Divided like `perSecond` when
    /// `scope: fleet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = limits::RATE_LIMIT.min, max = limits::RATE_LIMIT.max))]
    pub burst: Option<u32>,
    /// `worker` (the default, as for `delivery.rateLimit`): each worker sends up to `perSecond` to this
    /// Webhook, a fleet of N workers up to N × perSecond. `fleet`: the whole fleet sends up to
    /// `perSecond`; each worker takes `perSecond / consumers` (the consumers attached to the work
    /// queue, re-read every 5 s). On a Webhook, unset means its Integration's `perWebhook` scope; a
    /// Webhook may not widen a `fleet` scope to `worker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<RateLimitScope>,
}

impl WebhookRateLimit {
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.per_second)
    }

    /// `worker` unless set.
    pub fn scope(&self) -> RateLimitScope {
        self.scope.unwrap_or_default()
    }
}

/// Auto-pause: after `consecutiveFailures` failed attempts in a row (over every worker) whose run spans
/// at least `after`, the Webhook is paused (reason `Failing`); its messages are kept on its retry path
/// and delivered after it resumes (annotation `hookfleet.io/resume`, or `spec.paused` set and cleared).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoPauseSpec {
    #[schemars(range(min = limits::AUTO_PAUSE_FAILURES.min, max = limits::AUTO_PAUSE_FAILURES.max))]
    pub consecutive_failures: u32,
    /// The least time from the run's first failure to its last (Go duration, e.g. `30m`).
    #[x_kube(validation = kube::core::Rule::new(limits::AUTO_PAUSE_AFTER.cel()).message(limits::AUTO_PAUSE_AFTER.message().as_str()))]
    #[schemars(regex(pattern = crate::duration::PATTERN))]
    pub after: kube::core::Duration,
}

impl Default for AutoPauseSpec {
    /// 50 failures in a row over at least 30 minutes.
    fn default() -> Self {
        Self {
            consecutive_failures: 50,
            after: std::time::Duration::from_secs(30 * 60).into(),
        }
    }
}

/// A Webhook's limits as its fleet applies them: its own values where it set them, else its
/// Integration's `perWebhook` (auto-pause: [`AutoPauseSpec::default`] when neither says).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Effective {
    pub max_in_flight: Option<u32>,
    pub rate_limit: Option<WebhookRateLimit>,
    pub auto_pause: AutoPauseSpec,
}

impl WebhookLimits {
    /// The limits of a Webhook with `own` in a fleet with `fleet` (a value above the fleet's is clamped
    /// to it here; `validate_webhook` refuses it first).
    pub fn effective(fleet: Option<&WebhookLimits>, own: Option<&WebhookLimits>) -> Effective {
        let fleet = fleet.cloned().unwrap_or_default();
        let own = own.cloned().unwrap_or_default();
        let min = |a: Option<u32>, b: Option<u32>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let rate_limit = match (fleet.rate_limit, own.rate_limit) {
            (Some(f), Some(o)) => Some(WebhookRateLimit {
                per_second: f.per_second.min(o.per_second),
                burst: Some(f.burst().min(o.burst())),
                // The narrower of the two: a fleet-wide limit is never widened to each worker's.
                scope: Some(if f.scope() == RateLimitScope::Fleet {
                    RateLimitScope::Fleet
                } else {
                    o.scope.unwrap_or(f.scope())
                }),
            }),
            (f, o) => f.or(o).map(|r| WebhookRateLimit {
                scope: Some(r.scope()),
                ..r
            }),
        };
        let fa = fleet.auto_pause.unwrap_or_default();
        let auto_pause = match own.auto_pause {
            Some(o) => AutoPauseSpec {
                consecutive_failures: o.consecutive_failures.min(fa.consecutive_failures),
                after: std::time::Duration::from(o.after)
                    .min(std::time::Duration::from(fa.after))
                    .into(),
            },
            None => fa,
        };
        Effective {
            max_in_flight: min(fleet.max_in_flight, own.max_in_flight),
            rate_limit,
            auto_pause,
        }
    }

    /// `(field, reason)` of each of `own`'s values above `fleet`'s: a Webhook may only lower them.
    pub fn above(fleet: Option<&WebhookLimits>, own: &WebhookLimits) -> Vec<(String, String)> {
        let fleet = fleet.cloned().unwrap_or_default();
        let mut out = Vec::new();
        let mut over = |field: &str, own: String, fleet: String| {
            out.push((
                format!("spec.limits.{field}"),
                format!(
                    "{own} is above the Integration's webhooks.perWebhook.{field} ({fleet}): a Webhook may \
                     only lower its limits"
                ),
            ))
        };
        if let (Some(o), Some(f)) = (own.max_in_flight, fleet.max_in_flight)
            && o > f
        {
            over("maxInFlight", o.to_string(), f.to_string());
        }
        if let (Some(o), Some(f)) = (own.rate_limit, fleet.rate_limit) {
            if o.per_second > f.per_second {
                over(
                    "rateLimit.perSecond",
                    o.per_second.to_string(),
                    f.per_second.to_string(),
                );
            }
            if o.burst() > f.burst() {
                over("rateLimit.burst", o.burst().to_string(), f.burst().to_string());
            }
            if f.scope() == RateLimitScope::Fleet && o.scope == Some(RateLimitScope::Worker) {
                over("rateLimit.scope", "worker".into(), "fleet".into());
            }
        }
        if let Some(o) = &own.auto_pause {
            let f = fleet.auto_pause.unwrap_or_default();
            if o.consecutive_failures > f.consecutive_failures {
                over(
                    "autoPause.consecutiveFailures",
                    o.consecutive_failures.to_string(),
                    f.consecutive_failures.to_string(),
                );
            }
            let (od, fd) = (
                std::time::Duration::from(o.after),
                std::time::Duration::from(f.after),
            );
            if od > fd {
                over(
                    "autoPause.after",
                    crate::duration::render(od),
                    crate::duration::render(fd),
                );
            }
        }
        out
    }
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
