//! What every reconcile shares, built once by the controller (`controller::run`): the client and the
//! settings, the Event recorder and the metrics, the broker, the caches the watches fill, one memory per
//! Integration and the pacer. Above the adapters, below the reconcile steps: it imports neither the steps
//! nor the controller, and the steps take from it only the parts they need.

use std::sync::Arc;
use std::time::Duration;

use hookfleet_crds::{Integration, Webhook};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::DeserializeGuard;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};
use tracing::warn;

use crate::broker::Broker;
use crate::config::Config;
use crate::core::pacing::Pacer;
use crate::fleets::Fleets;
use crate::memory::Memories;
use crate::metrics::Metrics;
use crate::nats::Nats;
use crate::secrets;

/// Integrations are watched through a [`DeserializeGuard`]: one stored object that does not fit the Rust
/// types (written under an older or looser CRD; stored objects are not re-validated) reaches `reconcile`
/// as an error instead of failing the list/watch of every Integration.
pub(crate) type Watched = DeserializeGuard<Integration>;

/// State shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub broker: Arc<Broker>,
    /// The JetStream consumers of Integrations with `source.nats`.
    pub nats: Arc<Nats>,
    pub(crate) caches: Caches,
    /// The Integrations as the controller's cache holds them.
    pub(crate) integrations: Store<Watched>,
    /// One memory per Integration (see `crate::memory`).
    pub(crate) memory: Arc<Memories>,
    /// Requeue delays paced to what the concurrency serves (see `crate::core::pacing`).
    pub(crate) pacer: Pacer,
    /// The Webhooks as the controller's cache holds them.
    pub(crate) webhooks: Store<Webhook>,
    /// What the leader knows of each Webhooks fleet: compiles and reports (see `crate::fleets`).
    pub(crate) fleets: Arc<Fleets>,
}

/// What the watches cache of the Integrations' children, worker pods and Secrets (each kept slim, see
/// `slim` and `secrets::Versions`), and the referenced Secrets as last read: what dereferencing reads.
pub struct Caches {
    pub deployments: Store<Deployment>,
    pub pdbs: Store<PodDisruptionBudget>,
    pub services: Store<Service>,
    pub pods: Store<Pod>,
    /// The Nodes (slim: name, cordon, `Ready`; see `slim::node`).
    pub nodes: Store<Node>,
    /// Set once the Node cache has synced: until then (or without RBAC to read Nodes) a reconcile sees
    /// no Nodes and excludes none (`core::nodes`).
    pub nodes_synced: Arc<std::sync::atomic::AtomicBool>,
    /// The Secrets' versions (metadata only, see `secrets::Versions`).
    pub secrets: secrets::Versions,
    /// The referenced Secrets as last read, shared by the Integrations (see `secrets::Reads`).
    pub secret_reads: secrets::Reads,
}

impl Context {
    /// Drops everything remembered about Integration `ns/name`, and its metric series.
    pub(crate) fn forget(&self, ns: &str, name: &str) {
        self.memory.forget(ns, name);
        self.fleets.stop(&crate::memory::key(ns, name));
        self.metrics.forget_integration(&crate::memory::key(ns, name));
    }

    /// Forgets `ns/name` if the cache no longer holds it (with this uid): the last thing a reconcile or the
    /// error policy does, so one that was in flight while the Integration was deleted (its Delete event
    /// already handled) does not leave a memory behind. True when forgotten.
    pub(crate) fn forget_if_deleted(&self, ns: &str, name: &str, uid: &str) -> bool {
        let exists = self
            .integrations
            .get(&ObjectRef::new(name).within(ns))
            .is_some_and(|o| o.meta().uid.as_deref().unwrap_or_default() == uid);
        if !exists {
            self.forget(ns, name);
        }
        !exists
    }

    /// Whether some Integration other than `uid` waits for its first status of its current generation
    /// (the operator is catching up, see `pacing::hold_status`). One that keeps failing does not count (its
    /// error policy retries it; it must not hold the others' status), nor one being deleted, nor a
    /// malformed one (it gets its status from `malformed`). The cache's status can lag this leader's own
    /// writes, so the status last written counts too.
    pub(crate) fn catching_up(&self, uid: &str) -> bool {
        catching_up(&self.integrations, &self.memory, uid)
    }

    /// How soon to reconcile an Integration again after a reconcile that took `took`: after the retry while
    /// it has a problem, the scale-up period (when sooner than the resync) while it autoscales, else the
    /// resync; paced to what the concurrency serves (`core::pacing`).
    pub(crate) fn requeue_after(&self, took: Duration, has_problem: bool, autoscale: bool) -> Duration {
        let c = &self.config;
        let base = if has_problem {
            c.retry
        } else if autoscale {
            c.resync.min(c.scale_up_period)
        } else {
            c.resync
        };
        self.pacer.observe(took);
        self.pacer.next(base, self.integrations.len(), c.concurrency)
    }

    pub(crate) async fn event(&self, regarding: &ObjectReference, warning: bool, reason: &str, note: String) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        match self.recorder.publish(&ev, regarding).await {
            Ok(()) => self.metrics.write("Event"),
            // An Event is best effort: losing one must not fail the reconcile.
            Err(e) => warn!(error = %e, "publishing an Event"),
        }
    }
}

/// See [`Context::catching_up`].
fn catching_up(integrations: &Store<Watched>, memory: &Memories, uid: &str) -> bool {
    integrations.state().iter().any(|w| {
        let Ok(i) = &w.0 else {
            return false;
        };
        let m = &i.metadata;
        let other = m.uid.as_deref().unwrap_or_default();
        let generation = m.generation;
        if other == uid
            || m.deletion_timestamp.is_some()
            || i.status
                .as_ref()
                .is_some_and(|s| s.observed_generation == generation)
        {
            return false;
        }
        let (ns, name) = (
            m.namespace.as_deref().unwrap_or_default(),
            m.name.as_deref().unwrap_or_default(),
        );
        let (answered, failing) = memory
            .peek(ns, name, other, |mem| {
                (
                    mem.written
                        .as_ref()
                        .is_some_and(|s| s.observed_generation == generation),
                    mem.failures > 0,
                )
            })
            .unwrap_or((false, false));
        !answered && !failing
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookfleet_crds::IntegrationStatus;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher;

    fn intg(name: &str, generation: i64, observed: Option<i64>) -> Watched {
        let mut i: Integration = serde_json::from_value(serde_json::json!({
            "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "generation": generation},
            "spec": {
                "source": {"connectionSecretRef": {"name": "rabbitmq", "key": "uri"}, "queue": "q"},
                "destination": {"url": "https://erp.example.com/hooks"},
            }
        }))
        .expect("a valid Integration");
        i.status = observed.map(|g| IntegrationStatus {
            observed_generation: Some(g),
            ..Default::default()
        });
        DeserializeGuard(Ok(i))
    }

    fn store(items: Vec<Watched>) -> Store<Watched> {
        let mut w = Writer::<Watched>::default();
        for i in items {
            w.apply_watcher_event(&watcher::Event::Apply(i));
        }
        w.as_reader()
    }

    #[test]
    fn catching_up_while_another_waits_for_its_first_status() {
        let memory = Memories::new(Default::default());
        // a answered its generation; b has none yet: for a, the operator is catching up; for b, not (it
        // is the one waiting).
        let s = store(vec![intg("a", 1, Some(1)), intg("b", 1, None)]);
        assert!(catching_up(&s, &memory, "uid-a"));
        assert!(!catching_up(&s, &memory, "uid-b"));
        // b's status written by this leader, not yet in the cache: answered.
        memory.entry("ns", "b", "uid-b").with(|m| {
            m.written = Some(IntegrationStatus {
                observed_generation: Some(1),
                ..Default::default()
            })
        });
        assert!(!catching_up(&s, &memory, "uid-a"));
        // A new generation of b (a spec change) waits again, unless its reconciles are failing.
        let s = store(vec![intg("a", 1, Some(1)), intg("b", 2, Some(1))]);
        assert!(catching_up(&s, &memory, "uid-a"));
        memory.entry("ns", "b", "uid-b").with(|m| m.failures = 1);
        assert!(!catching_up(&s, &memory, "uid-a"));
    }
}
