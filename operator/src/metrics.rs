//! The operator's own Prometheus metrics (one registry per operator instance, so tests can run two).

use std::sync::atomic::AtomicU64;
use std::time::Instant;

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

pub struct Metrics {
    pub reconciles: Counter,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub reconcile_duration: Histogram,
    /// Writes to the API server by object kind (applies that changed or created something, status writes,
    /// events). A steady state adds nothing here.
    pub writes: Family<KindLabels, Counter>,
    /// Applies skipped because the cached object already matches what was applied.
    pub applies_skipped: Counter,
    pub leader: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub ready: Gauge<i64, std::sync::atomic::AtomicI64>,
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
        let leader = Gauge::default();
        let ready = Gauge::default();
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
            "leader",
            "1 while this instance holds the leader lease",
            leader.clone(),
        );
        registry.register(
            "ready",
            "1 once this instance is ready (standby, or leader with caches synced)",
            ready.clone(),
        );
        Self {
            reconciles,
            reconcile_errors,
            reconcile_duration,
            writes,
            applies_skipped,
            leader,
            ready,
            registry,
        }
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
            "Event",
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
