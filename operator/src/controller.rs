//! The controller: watches Integrations and their children, runs the reconcile (`crate::reconcile`:
//! dereference → build → apply → status) for each, and keeps one memory per Integration
//! (`crate::memory`), dropped when the Integration is deleted.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use hookfleet_crds::Integration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::error_boundary::InvalidObject;
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use crate::broker::Broker;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::memory::Memories;
use crate::metrics::Metrics;
use crate::names::{INTEGRATION_LABEL, MANAGED_BY};
use crate::reconcile::reconcile;
use crate::secrets;
use crate::slim;
use crate::core::status::{self, reason};

/// State shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub broker: Broker,
    pub(crate) deployments: Store<Deployment>,
    pub(crate) pdbs: Store<PodDisruptionBudget>,
    pub(crate) services: Store<Service>,
    pub(crate) pods: Store<Pod>,
    /// The Secrets' versions (metadata only, see `secrets::Versions`).
    pub(crate) secrets: secrets::Versions,
    /// The referenced Secrets as last read, shared by the Integrations (see `secrets::Reads`).
    pub(crate) secret_reads: secrets::Reads,
    /// The Integrations as the controller's cache holds them.
    pub(crate) integrations: Store<Watched>,
    /// One memory per Integration (see `crate::memory`).
    pub(crate) memory: Arc<Memories>,
    /// Requeue delays paced to what the concurrency serves (see `crate::core::pacing`).
    pub(crate) pacer: crate::core::pacing::Pacer,
}

impl Context {
    /// Drops everything remembered about Integration `ns/name`, and its metric series.
    pub(crate) fn forget(&self, ns: &str, name: &str) {
        self.memory.forget(ns, name);
        self.metrics.forget_integration(&format!("{ns}/{name}"));
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

/// Integrations are watched through a [`DeserializeGuard`]: one stored object that does not fit the Rust
/// types (written under an older or looser CRD; stored objects are not re-validated) reaches `reconcile`
/// as an error instead of failing the list/watch of every Integration.
pub(crate) type Watched = DeserializeGuard<Integration>;

/// Where a stored Integration does not fit the types, with the field: `spec.workers.replicas: invalid
/// type: string "three", expected i32`. The guard's own error has no path, so the raw object is read
/// once more (only for malformed objects, once per change) and deserialized with path tracking.
async fn deserialize_error(
    ctx: &Context,
    ns: &str,
    name: &str,
    invalid: &InvalidObject,
) -> (String, serde_json::Value) {
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &ApiResource::erase::<Integration>(&()));
    let raw = match api.get(name).await.map(serde_json::to_value) {
        Ok(Ok(raw)) => raw,
        _ => return (invalid.error.clone(), serde_json::Value::Null),
    };
    let message = match serde_path_to_error::deserialize::<_, Integration>(raw.clone()) {
        Err(e) if e.path().to_string() != "." => format!("{}: {}", e.path(), e.inner()),
        Err(e) => e.inner().to_string(),
        // Changed in between: the next watch event brings the new object.
        Ok(_) => invalid.error.clone(),
    };
    (message, raw)
}

/// A stored Integration that does not deserialize: nothing is applied; Ready=False/Degraded=True with
/// reason `InvalidSpec` quoting the error (the field named) and a Warning Event when that changes. The
/// caller's error policy then waits for the object to change: retrying cannot fix it.
pub(crate) async fn malformed(invalid: &InvalidObject, ctx: &Context, ns: &str, name: &str) -> Error {
    let (message, raw) = deserialize_error(ctx, ns, name, invalid).await;
    let message = format!("the Integration does not match hookfleet.io/v1alpha1: {message}; fix the object");
    let generation = invalid.metadata.generation;
    // The old conditions, read leniently: the status may be as wrong as the spec.
    let old: Vec<Condition> = raw
        .pointer("/status/conditions")
        .cloned()
        .and_then(|c| serde_json::from_value(c).ok())
        .unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let cond = |type_: &str| Condition {
        type_: type_.into(),
        status: if type_ == hookfleet_crds::integration::condition::DEGRADED {
            "True"
        } else {
            "False"
        }
        .into(),
        reason: reason::INVALID_SPEC.into(),
        message: message.clone(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    };
    let new = status::merge_conditions(
        &old,
        vec![
            cond(hookfleet_crds::integration::condition::READY),
            cond(hookfleet_crds::integration::condition::DEGRADED),
        ],
        &now,
    );
    let unchanged = |t: &str| {
        let find = |cs: &[Condition]| {
            cs.iter()
                .find(|c| c.type_ == t)
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        };
        find(&old) == find(&new)
    };
    let regarding = ObjectReference {
        api_version: Some(Integration::api_version(&()).into()),
        kind: Some(Integration::kind(&()).into()),
        name: Some(name.into()),
        namespace: Some(ns.into()),
        uid: invalid.metadata.uid.clone(),
        resource_version: invalid.metadata.resource_version.clone(),
        ..Default::default()
    };
    ctx.metrics.integration_conditions(&format!("{ns}/{name}"), &new);
    if !(unchanged(hookfleet_crds::integration::condition::READY)
        && unchanged(hookfleet_crds::integration::condition::DEGRADED))
    {
        ctx.event(&regarding, true, reason::INVALID_SPEC, message.clone())
            .await;
        // A merge patch, not server-side apply: apply must convert the live object to its schema type, which
        // fails on exactly the fields that are wrong (500 "failed to create typed live object").
        let body = serde_json::json!({
            "status": {"observedGeneration": generation, "conditions": new},
        });
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), ns, &ApiResource::erase::<Integration>(&()));
        let pp = PatchParams {
            field_manager: Some(ctx.config.field_manager.clone()),
            ..Default::default()
        };
        match api.patch_status(name, &pp, &Patch::Merge(&body)).await {
            Ok(_) => ctx.metrics.write("IntegrationStatus"),
            // The Event already says it; a status the API server refuses must not hide the cause.
            Err(e) => warn!(error = %e, "writing the status of a malformed Integration"),
        }
    }
    Error::InvalidSpec(message)
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

fn error_policy(obj: Arc<Watched>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(err.metric_label());
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let uid = obj.meta().uid.clone().unwrap_or_default();
    if let Error::InvalidSpec(_) = err {
        // Retrying cannot fix a malformed object; its next change triggers a reconcile.
        ctx.memory.with(&ns, &name, &uid, |m| m.failures = 0);
        ctx.forget_if_deleted(&ns, &name, &uid);
        warn!(error = %err, "malformed Integration; waiting for it to change");
        return Action::await_change();
    }
    let n = ctx.memory.with(&ns, &name, &uid, |m| {
        m.failures = m.failures.saturating_add(1);
        m.failures
    });
    if ctx.forget_if_deleted(&ns, &name, &uid) {
        return Action::await_change();
    }
    let delay = ctx
        .config
        .retry
        .checked_mul(1u32 << n.min(10).saturating_sub(1))
        .unwrap_or(ctx.config.max_backoff)
        .min(ctx.config.max_backoff);
    warn!(error = %err, attempt = n, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Keeps the memories in step with the Integrations that exist: a deleted Integration (no finalizer: the
/// controller never reconciles it again) is forgotten on its Delete event, and after a re-list (a watch that
/// restarted may have missed Deletes) whatever the store no longer holds is forgotten too.
fn follow_deletions(ctx: &Context, event: &watcher::Event<Watched>) {
    match event {
        watcher::Event::Delete(obj) => {
            ctx.forget(&obj.namespace().unwrap_or_default(), &obj.name_any());
        }
        watcher::Event::InitDone => {
            let dropped = ctx.memory.retain(|key, uid| {
                let Some((ns, name)) = key.split_once('/') else {
                    return false;
                };
                ctx.integrations
                    .get(&ObjectRef::new(name).within(ns))
                    .is_some_and(|o| o.meta().uid.as_deref() == Some(uid) || uid.is_empty())
            });
            for key in dropped {
                ctx.metrics.forget_integration(&key);
            }
        }
        _ => {}
    }
}

fn child_api<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A `try_filter` predicate passing the watch events of a child that change what a reconcile reads of it
/// (`slim::Changes`).
fn changes<K: Resource>(
    reads: fn(&K) -> u64,
) -> impl FnMut(&watcher::Event<K>) -> futures::future::Ready<bool> {
    let mut changes = slim::Changes::new(reads);
    move |event| futures::future::ready(changes.passes(event))
}

/// A `try_filter` predicate that drops the watch event which only echoes this process's own apply of a
/// child: the object at the fingerprint its Integration's memory holds for that kind (`reconcile::apply`),
/// and `fresh` (for a Deployment: no status yet; the controller-manager's status updates pass). Nothing a
/// reconcile reads has changed, and the reconcile that applied it wrote the status: without this, each
/// first reconcile was followed by one reconcile per new child (with 1,000 Integrations, 3 reconciles per
/// Integration until all had a status, each one a slot a first reconcile waited for). Deletes, re-lists
/// and every change by someone else pass.
fn not_an_echo<K>(
    memory: Arc<Memories>,
    fresh: fn(&K) -> bool,
) -> impl FnMut(&watcher::Event<K>) -> futures::future::Ready<bool>
where
    K: Resource<DynamicType = ()>,
{
    move |event| {
        let echo = match event {
            watcher::Event::Apply(obj) => fresh(obj) && echoes(&memory, obj),
            _ => false,
        };
        futures::future::ready(!echo)
    }
}

/// `obj` is at the fingerprint of this process's last apply of it.
fn echoes<K: Resource<DynamicType = ()>>(memory: &Memories, obj: &K) -> bool {
    let meta = obj.meta();
    let Some(owner) = meta
        .owner_references
        .as_ref()
        .and_then(|o| o.iter().find(|o| o.kind == Integration::kind(&())))
    else {
        return false;
    };
    let kind = K::kind(&());
    let fp = crate::memory::fingerprint(obj);
    memory
        .peek(
            meta.namespace.as_deref().unwrap_or_default(),
            &owner.name,
            &owner.uid,
            |m| {
                m.applied
                    .get(kind.as_ref())
                    .is_some_and(|(_, applied, _)| *applied == fp)
            },
        )
        .unwrap_or(false)
}

/// Runs the controller until `stop` resolves. Marks `metrics.ready` once every cache has synced.
pub async fn run(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let children = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let (deployments, dw) = reflector::store::<Deployment>();
    let (pdbs, pw) = reflector::store::<PodDisruptionBudget>();
    let (services, sw) = reflector::store::<Service>();
    let (pods, podw) = reflector::store::<Pod>();
    let memory = Arc::new(Memories::new(metrics.remembered.clone()));
    // Each cache keeps only what a reconcile reads (see `slim`): with 1,000 Integrations the managed
    // fields and pod templates alone were tens of MiB.
    let dep_stream = reflector::reflector(
        dw,
        watcher(child_api(&client, &config.namespace), children.clone()).modify(slim::deployment),
    )
    .default_backoff()
    .try_filter(changes(slim::deployment_reads))
    .try_filter(not_an_echo(memory.clone(), |d: &Deployment| {
        d.status.as_ref().is_none_or(|s| s.observed_generation.is_none())
    }))
    .touched_objects();
    let pdb_stream = reflector::reflector(
        pw,
        watcher(child_api(&client, &config.namespace), children.clone()).modify(slim::pdb),
    )
    .default_backoff()
    .try_filter(changes(slim::pdb_reads))
    .try_filter(not_an_echo(memory.clone(), |_: &PodDisruptionBudget| true))
    .touched_objects();
    let svc_stream = reflector::reflector(
        sw,
        watcher(child_api(&client, &config.namespace), children.clone()).modify(slim::service),
    )
    .default_backoff()
    .try_filter(not_an_echo(memory.clone(), |_: &Service| true))
    .touched_objects();
    let pod_stream = reflector::reflector(
        podw,
        watcher(child_api(&client, &config.namespace), children).modify(slim::pod),
    )
    .default_backoff()
    .try_filter(changes(slim::pod_reads))
    .touched_objects();

    // Secrets by metadata only (the operator never caches Secret data): a change to one that an
    // Integration references reconciles that Integration now, which rolls its workers through the
    // checksum annotation, instead of at the next resync. The versions it stores let a reconcile reuse the
    // Secrets it read last while they are unchanged (`secrets::dereference`).
    let (secret_versions, secretw) = reflector::store::<PartialObjectMeta<Secret>>();
    let secret_stream = reflector::reflector(
        secretw,
        watcher(
            child_api::<PartialObjectMeta<Secret>>(&client, &config.namespace),
            watcher::Config::default(),
        )
        .modify(secrets::slim_meta),
    )
    .default_backoff()
    .touched_objects();

    let integrations: Api<Watched> = child_api(&client, &config.namespace);
    let (store, store_writer) = reflector::store::<Watched>();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "hookfleet-operator".into(),
            instance: Some(config.instance.clone()),
        },
    );
    let concurrency = config.concurrency;
    let ctx = Arc::new(Context {
        client: client.clone(),
        config,
        recorder,
        metrics: metrics.clone(),
        broker: Broker::default(),
        deployments: deployments.clone(),
        pdbs: pdbs.clone(),
        services: services.clone(),
        pods: pods.clone(),
        secrets: secret_versions.clone(),
        secret_reads: secrets::Reads::default(),
        integrations: store.clone(),
        memory,
        pacer: crate::core::pacing::Pacer::default(),
    });
    // What `Controller::new` builds, plus a look at each event to drop the memory of deleted Integrations.
    let follow = ctx.clone();
    let integration_stream = watcher(integrations, watcher::Config::default().any_semantic())
        .modify(slim::integration)
        .default_backoff()
        .reflect(store_writer)
        .inspect_ok(move |event| follow_deletions(&follow, event))
        .try_filter(changes(slim::integration_reads))
        .applied_objects();

    let secret_store = store.clone();
    let controller = Controller::for_stream(integration_stream, store)
        .watches_stream(secret_stream, move |secret| {
            let (Some(ns), name) = (secret.namespace(), secret.name_any()) else {
                return Vec::new();
            };
            secret_store
                .state()
                .into_iter()
                .filter(|w| w.namespace().as_deref() == Some(ns.as_str()))
                .filter(|w| {
                    w.0.as_ref()
                        .is_ok_and(|i| secrets::referenced_names(&i.spec).contains(&name))
                })
                .map(|w| ObjectRef::from_obj(&*w))
                .collect()
        })
        .owns_stream(dep_stream)
        .owns_stream(pdb_stream)
        .owns_stream(svc_stream)
        .watches_stream(pod_stream, |pod: Pod| {
            let ns = pod.namespace();
            pod.labels()
                .get(INTEGRATION_LABEL)
                .cloned()
                .zip(ns)
                .map(|(name, ns)| ObjectRef::<Watched>::new(&name).within(&ns))
        })
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(stop);
    let store = controller.store();

    let ready_metrics = metrics.clone();
    let ready = async move {
        let _ = futures::join!(
            store.wait_until_ready(),
            deployments.wait_until_ready(),
            pdbs.wait_until_ready(),
            services.wait_until_ready(),
            pods.wait_until_ready(),
            secret_versions.wait_until_ready()
        );
        ready_metrics.ready.set(1);
        info!("caches synced; reconciling");
        futures::future::pending::<()>().await
    };
    let run = controller
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                debug!(error = %e, "controller");
            }
        });
    tokio::select! {
        () = run => {}
        () = ready => {}
    }
    ctx.broker.close().await;
    metrics.ready.set(0);
}

/// Fails with a message that says how to install the CRD when it is missing.
///
/// With `namespace` set (namespaced mode) the list is in that namespace: the operator's Role grants no
/// cluster-wide list there.
pub async fn check_crd(client: &Client, namespace: Option<&str>) -> Result<()> {
    // Metadata only: a malformed Integration must not make the operator refuse to start.
    let api: Api<Integration> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match api
        .list_metadata(&kube::api::ListParams::default().limit(1))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(Error::CrdNotInstalled),
        Err(e) => Err(Error::Kube(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookfleet_crds::IntegrationStatus;
    use kube::runtime::reflector::store::Writer;

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
    fn the_echo_of_an_own_apply_is_dropped_and_nothing_else() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
        let memory = Arc::new(Memories::new(Default::default()));
        let pdb = |rv: &str, generation: i64, owner: Option<&str>| PodDisruptionBudget {
            metadata: ObjectMeta {
                name: Some("a".into()),
                namespace: Some("ns".into()),
                resource_version: Some(rv.into()),
                generation: Some(generation),
                owner_references: owner.map(|uid| {
                    vec![OwnerReference {
                        api_version: "hookfleet.io/v1alpha1".into(),
                        kind: "Integration".into(),
                        name: "a".into(),
                        uid: uid.into(),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        // Nothing applied by this process yet: passes.
        assert!(!echoes(&memory, &pdb("1", 1, Some("uid-a"))));
        memory.with("ns", "a", "uid-a", |m| {
            m.applied.insert(
                "PodDisruptionBudget".into(),
                (1, "g1".into(), std::time::Instant::now()),
            )
        });
        assert!(echoes(&memory, &pdb("1", 1, Some("uid-a"))));
        // Changed by someone else (another generation), another owner's, or no owner: passes.
        assert!(!echoes(&memory, &pdb("2", 2, Some("uid-a"))));
        assert!(!echoes(&memory, &pdb("1", 1, Some("uid-b"))));
        assert!(!echoes(&memory, &pdb("1", 1, None)));
        // Through the filter: the echo is dropped; a delete of the same object, or a re-list, passes.
        let mut keep = not_an_echo(memory.clone(), |_| true);
        let own = || pdb("1", 1, Some("uid-a"));
        assert!(!futures::executor::block_on(keep(&watcher::Event::Apply(own()))));
        assert!(futures::executor::block_on(keep(&watcher::Event::Delete(own()))));
        assert!(futures::executor::block_on(keep(&watcher::Event::InitApply(
            own()
        ))));
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
        memory.with("ns", "b", "uid-b", |m| {
            m.written = Some(IntegrationStatus {
                observed_generation: Some(1),
                ..Default::default()
            })
        });
        assert!(!catching_up(&s, &memory, "uid-a"));
        // A new generation of b (a spec change) waits again, unless its reconciles are failing.
        let s = store(vec![intg("a", 1, Some(1)), intg("b", 2, Some(1))]);
        assert!(catching_up(&s, &memory, "uid-a"));
        memory.with("ns", "b", "uid-b", |m| m.failures = 1);
        assert!(!catching_up(&s, &memory, "uid-a"));
    }
}
