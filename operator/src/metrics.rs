//! The operator's own Prometheus metrics (one registry per operator instance, so tests can run two).
//!
//! Besides its own health (reconciles, writes, leader) the operator exports, per Integration, what its
//! status says (desired and ready workers, consumers, backlog, conditions): the alert rules in
//! `charts/hookfleet` are written against these series (docs/metrics.md lists them all). Only the leader
//! reconciles, so only the leader exports per-Integration series; they live in memory (no API writes).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Instant;

use hookfleet_crds::IntegrationStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// One Integration, as `namespace/name`: the same `integration` label the worker puts on its own series
/// (`--integration`), so rules can join operator and worker series on it. A single label rather than
/// `namespace` + `name`: Prometheus sets `namespace` itself from the scrape target (the operator's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IntegrationLabels {
    pub integration: String,
}

/// One condition of an Integration (kube-state-metrics style: value 1 for the condition as it is now).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub integration: String,
    #[prometheus(flatten)]
    pub condition: ConditionKey,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionKey {
    pub r#type: String,
    pub status: String,
    pub reason: String,
}

/// Paused Webhooks of one Integration by why (`Paused`: spec.paused; `Failing`, `Gone`: by the operator).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PausedLabels {
    pub integration: String,
    pub reason: String,
}

type IntGauge = Gauge<i64, AtomicI64>;

/// Per-Integration gauges, mirroring the status the operator computed.
pub struct IntegrationMetrics {
    pub desired_workers: Family<IntegrationLabels, IntGauge>,
    pub ready_workers: Family<IntegrationLabels, IntGauge>,
    /// Absent while the broker cannot be asked (a Degraded reason says why).
    pub consumers: Family<IntegrationLabels, IntGauge>,
    /// Absent while the broker cannot be asked or the queue does not exist.
    pub backlog: Family<IntegrationLabels, IntGauge>,
    pub worker_restarts: Family<IntegrationLabels, IntGauge>,
    /// 1 while the destination is gone (HTTP 410, workers scaled to 0), else 0.
    pub destination_gone: Family<IntegrationLabels, IntGauge>,
    /// 1 while the workers are scaled to 0 for `spec.suspend` (condition `Suspended` True), else 0: the
    /// alert rules page no one for a suspended Integration.
    pub suspended: Family<IntegrationLabels, IntGauge>,
    pub conditions: Family<ConditionLabels, IntGauge>,
    /// Paused Webhooks per Integration and reason (`hookfleet_operator_webhooks_paused`).
    pub webhooks_paused: Family<PausedLabels, IntGauge>,
    paused_exported: Mutex<Vec<PausedLabels>>,
    /// The condition series exported per Integration, so a changed reason replaces the old series instead
    /// of leaving it behind at 1.
    exported: Mutex<HashMap<String, Vec<ConditionKey>>>,
}

pub struct Metrics {
    pub reconciles: Counter,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub reconcile_duration: Histogram,
    /// Writes to the API server by object kind (applies that changed or created something, status writes,
    /// events). A steady state adds nothing here.
    pub writes: Family<KindLabels, Counter>,
    /// Applies skipped because the cached object already matches what was applied.
    pub applies_skipped: Counter,
    /// Status changes held back while the operator catches up (`crate::core::pacing::hold_status`); each is
    /// written later, with whatever changed since.
    pub status_held: Counter,
    pub leader: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub ready: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Integrations the operator keeps a memory for (applied fingerprints, autoscaler, failures, last
    /// written status): follows the Integrations that exist, so a deleted one leaves nothing behind.
    pub remembered: IntGauge,
    pub integrations: IntegrationMetrics,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hookfleet_operator");
        let reconciles = Counter::<u64, AtomicU64>::default();
        let reconcile_errors = Family::<ReasonLabels, Counter>::default();
        let reconcile_duration =
            Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        let writes = Family::<KindLabels, Counter>::default();
        let applies_skipped = Counter::default();
        let status_held = Counter::default();
        let leader = Gauge::default();
        let ready = Gauge::default();
        let remembered = IntGauge::default();
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by reason",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            reconcile_duration.clone(),
        );
        registry.register("writes", "Writes to the API server, by kind", writes.clone());
        registry.register(
            "applies_skipped",
            "Applies skipped because the object is unchanged",
            applies_skipped.clone(),
        );
        registry.register(
            "status_writes_held",
            "Status changes held back while Integrations wait for their first status (written later)",
            status_held.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance holds the leader lease",
            leader.clone(),
        );
        registry.register(
            "ready",
            "1 once this instance is ready (standby, or leader with caches synced)",
            ready.clone(),
        );
        registry.register(
            "integrations_remembered",
            "Integrations this instance keeps a memory for (applied fingerprints, autoscaler, failures, status)",
            remembered.clone(),
        );
        let integrations = IntegrationMetrics {
            desired_workers: Family::default(),
            ready_workers: Family::default(),
            consumers: Family::default(),
            backlog: Family::default(),
            worker_restarts: Family::default(),
            destination_gone: Family::default(),
            suspended: Family::default(),
            conditions: Family::default(),
            webhooks_paused: Family::default(),
            paused_exported: Mutex::default(),
            exported: Mutex::default(),
        };
        let i = &integrations;
        registry.register(
            "integration_desired_workers",
            "Workers the Integration should run now (fixed or autoscaled)",
            i.desired_workers.clone(),
        );
        registry.register(
            "integration_ready_workers",
            "Worker pods of the Integration that are Ready",
            i.ready_workers.clone(),
        );
        registry.register(
            "integration_consumers",
            "Consumers attached to the Integration's queue, as the broker reports them",
            i.consumers.clone(),
        );
        registry.register(
            "integration_backlog_messages",
            "Messages ready in the Integration's queue, as the broker reports them",
            i.backlog.clone(),
        );
        registry.register(
            "integration_worker_restarts",
            "Container restarts summed over the Integration's current worker pods",
            i.worker_restarts.clone(),
        );
        registry.register(
            "integration_destination_gone",
            "1 while the Integration's destination is gone (HTTP 410: workers scaled to 0, messages wait), else 0",
            i.destination_gone.clone(),
        );
        registry.register(
            "integration_suspended",
            "1 while the Integration is suspended (spec.suspend: workers scaled to 0, messages wait; no alert pages), else 0",
            i.suspended.clone(),
        );
        registry.register(
            "webhooks_paused",
            "Paused Webhooks by Integration and reason (Paused: spec.paused; Failing, Gone: paused by the operator)",
            i.webhooks_paused.clone(),
        );
        registry.register(
            "integration_condition",
            "1 for each condition of the Integration as it is now (type, status, reason)",
            i.conditions.clone(),
        );
        Self {
            reconciles,
            reconcile_errors,
            reconcile_duration,
            writes,
            applies_skipped,
            status_held,
            leader,
            ready,
            remembered,
            integrations,
            registry,
        }
    }

    /// Exports what `status` says about Integration `integration` (`namespace/name`); `restarts` is the
    /// restart count summed over its worker pods.
    pub fn integration_status(&self, integration: &str, status: &IntegrationStatus, restarts: i64) {
        let i = &self.integrations;
        let l = IntegrationLabels {
            integration: integration.into(),
        };
        let set = |f: &Family<IntegrationLabels, IntGauge>, v: Option<i64>| match v {
            Some(v) => {
                f.get_or_create(&l).set(v);
            }
            // Unknown is absent, not 0: a 0 would claim "no consumers" when the broker was not asked.
            None => {
                f.remove(&l);
            }
        };
        set(&i.desired_workers, status.replicas.map(i64::from));
        set(&i.ready_workers, status.ready_replicas.map(i64::from));
        set(&i.consumers, status.consumers.map(i64::from));
        set(&i.backlog, status.backlog);
        set(&i.worker_restarts, Some(restarts));
        set(
            &i.destination_gone,
            Some(i64::from(status.destination_gone.is_some())),
        );
        let suspended = status
            .conditions
            .iter()
            .any(|c| c.type_ == hookfleet_crds::integration::condition::SUSPENDED && c.status == "True");
        set(&i.suspended, Some(i64::from(suspended)));
        self.integration_conditions(integration, &status.conditions);
    }

    /// Exports `conditions` of Integration `integration`, replacing the series of its previous ones.
    pub fn integration_conditions(&self, integration: &str, conditions: &[Condition]) {
        let i = &self.integrations;
        let now: Vec<ConditionKey> = conditions
            .iter()
            .map(|c| ConditionKey {
                r#type: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
            })
            .collect();
        let mut exported = i.exported.lock().expect("lock");
        let before = exported
            .insert(integration.into(), now.clone())
            .unwrap_or_default();
        for old in before.into_iter().filter(|k| !now.contains(k)) {
            i.conditions.remove(&ConditionLabels {
                integration: integration.into(),
                condition: old,
            });
        }
        for key in now {
            i.conditions
                .get_or_create(&ConditionLabels {
                    integration: integration.into(),
                    condition: key,
                })
                .set(1);
        }
    }

    /// Sets the paused Webhooks to `now` ((integration, reason) → count), removing the series of
    /// pairs no longer paused.
    pub fn webhooks_paused(&self, now: &HashMap<(String, String), i64>) {
        let i = &self.integrations;
        let labels: Vec<PausedLabels> = now
            .keys()
            .map(|(integration, reason)| PausedLabels {
                integration: integration.clone(),
                reason: reason.clone(),
            })
            .collect();
        let mut exported = i.paused_exported.lock().expect("lock");
        for old in exported.iter().filter(|l| !labels.contains(l)) {
            i.webhooks_paused.remove(old);
        }
        for ((integration, reason), n) in now {
            i.webhooks_paused
                .get_or_create(&PausedLabels {
                    integration: integration.clone(),
                    reason: reason.clone(),
                })
                .set(*n);
        }
        *exported = labels;
    }

    /// Drops every series of a deleted Integration.
    pub fn forget_integration(&self, integration: &str) {
        let i = &self.integrations;
        let l = IntegrationLabels {
            integration: integration.into(),
        };
        for f in [
            &i.desired_workers,
            &i.ready_workers,
            &i.consumers,
            &i.backlog,
            &i.worker_restarts,
            &i.destination_gone,
            &i.suspended,
        ] {
            f.remove(&l);
        }
        self.integration_conditions(integration, &[]);
        i.exported.lock().expect("lock").remove(integration);
    }

    pub fn write(&self, kind: &str) {
        self.writes.get_or_create(&KindLabels { kind: kind.into() }).inc();
    }

    /// Total writes of every kind.
    pub fn total_writes(&self) -> u64 {
        [
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "IntegrationStatus",
            "IntegrationFinalizers",
            "Event",
            "Secret",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "WebhookStatus",
        ]
        .iter()
        .map(|k| self.writes.get_or_create(&KindLabels { kind: (*k).into() }).get())
        .sum()
    }

    pub fn error(&self, reason: &str) {
        self.reconcile_errors
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Records the reconcile duration when dropped.
    pub fn timer(&self) -> ReconcileTimer<'_> {
        ReconcileTimer {
            start: Instant::now(),
            metrics: self,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

pub struct ReconcileTimer<'a> {
    start: Instant,
    metrics: &'a Metrics,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn cond(t: &str, status: &str, reason: &str) -> Condition {
        Condition {
            type_: t.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }
    }

    fn lines(m: &Metrics, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = m
            .encode()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn integration_series_follow_the_status() {
        let m = Metrics::new();
        let st = IntegrationStatus {
            replicas: Some(3),
            ready_replicas: Some(3),
            consumers: Some(2),
            backlog: Some(40),
            conditions: vec![
                cond("Ready", "False", "NotConsuming"),
                cond("Degraded", "True", "NotConsuming"),
            ],
            ..IntegrationStatus::default()
        };
        m.integration_status("team-a/orders", &st, 4);
        let l = r#"{integration="team-a/orders"}"#;
        assert_eq!(
            lines(&m, "hookfleet_operator_integration_")
                .into_iter()
                .filter(|s| !s.contains("_condition"))
                .collect::<Vec<_>>(),
            vec![
                format!("hookfleet_operator_integration_backlog_messages{l} 40"),
                format!("hookfleet_operator_integration_consumers{l} 2"),
                format!("hookfleet_operator_integration_desired_workers{l} 3"),
                format!("hookfleet_operator_integration_destination_gone{l} 0"),
                format!("hookfleet_operator_integration_ready_workers{l} 3"),
                format!("hookfleet_operator_integration_suspended{l} 0"),
                format!("hookfleet_operator_integration_worker_restarts{l} 4"),
            ]
        );
        assert_eq!(
            lines(&m, "hookfleet_operator_integration_condition{"),
            vec![
                r#"hookfleet_operator_integration_condition{integration="team-a/orders",type="Degraded",status="True",reason="NotConsuming"} 1"#,
                r#"hookfleet_operator_integration_condition{integration="team-a/orders",type="Ready",status="False",reason="NotConsuming"} 1"#,
            ]
        );
    }

    #[test]
    fn suspended_is_1_only_while_the_suspend_is_applied() {
        let m = Metrics::new();
        let series = |m: &Metrics| lines(m, "hookfleet_operator_integration_suspended{");
        let with = |c: Vec<Condition>| IntegrationStatus {
            conditions: c,
            ..IntegrationStatus::default()
        };
        m.integration_status(
            "a/x",
            &with(vec![cond("Suspended", "True", "SuspendedBySpec")]),
            0,
        );
        assert_eq!(
            series(&m),
            [r#"hookfleet_operator_integration_suspended{integration="a/x"} 1"#]
        );
        // Asked for but not applied (paused): the workers run, so the alerts stay on.
        m.integration_status("a/x", &with(vec![cond("Suspended", "False", "Paused")]), 0);
        assert_eq!(
            series(&m),
            [r#"hookfleet_operator_integration_suspended{integration="a/x"} 0"#]
        );
        m.integration_status("a/x", &with(vec![]), 0);
        assert_eq!(
            series(&m),
            [r#"hookfleet_operator_integration_suspended{integration="a/x"} 0"#]
        );
        m.forget_integration("a/x");
        assert!(series(&m).is_empty());
    }

    #[test]
    fn paused_webhooks_replace_their_series() {
        let m = Metrics::new();
        let key = |r: &str| ("team-a/fleet".to_owned(), r.to_owned());
        m.webhooks_paused(&HashMap::from([(key("Failing"), 2), (key("Gone"), 1)]));
        assert_eq!(
            lines(&m, "hookfleet_operator_webhooks_paused{"),
            vec![
                r#"hookfleet_operator_webhooks_paused{integration="team-a/fleet",reason="Failing"} 2"#,
                r#"hookfleet_operator_webhooks_paused{integration="team-a/fleet",reason="Gone"} 1"#,
            ]
        );
        m.webhooks_paused(&HashMap::from([(key("Gone"), 1)]));
        assert_eq!(
            lines(&m, "hookfleet_operator_webhooks_paused{"),
            vec![r#"hookfleet_operator_webhooks_paused{integration="team-a/fleet",reason="Gone"} 1"#]
        );
        m.webhooks_paused(&HashMap::new());
        assert!(lines(&m, "hookfleet_operator_webhooks_paused{").is_empty());
    }

    #[test]
    fn a_changed_condition_replaces_its_series_and_unknowns_are_absent() {
        let m = Metrics::new();
        let degraded = IntegrationStatus {
            replicas: Some(2),
            ready_replicas: Some(2),
            consumers: Some(1),
            backlog: Some(5),
            conditions: vec![cond("Ready", "False", "NotConsuming")],
            ..IntegrationStatus::default()
        };
        m.integration_status("a/x", &degraded, 0);
        // The broker became unreachable: consumers and backlog are unknown, the reason changed.
        let unreachable = IntegrationStatus {
            consumers: None,
            backlog: None,
            conditions: vec![cond("Ready", "False", "BrokerUnreachable")],
            ..degraded
        };
        m.integration_status("a/x", &unreachable, 0);
        let text = m.encode();
        assert!(
            !text.contains("NotConsuming"),
            "stale condition series left:\n{text}"
        );
        assert!(text.contains(r#"reason="BrokerUnreachable"} 1"#), "{text}");
        assert!(
            !text.contains("hookfleet_operator_integration_consumers{"),
            "unknown consumers must be absent, not 0:\n{text}"
        );
        assert!(
            !text.contains("hookfleet_operator_integration_backlog_messages{"),
            "{text}"
        );

        m.forget_integration("a/x");
        assert_eq!(lines(&m, "hookfleet_operator_integration_"), Vec::<String>::new());
    }
}
