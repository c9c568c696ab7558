//! The reconcile pipeline: dereference (Secret, broker, cached children) → validate → build desired
//! objects → apply what changed → status (written only when it changed; Events only on transitions).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use hookfleet_crds::{Integration, IntegrationStatus};
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
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{debug, info, instrument, warn};

use crate::broker::Broker;
use crate::config::Config;
use crate::desired::{self, INTEGRATION_LABEL, MANAGED_BY};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::replicas::{self, Autoscaler};
use crate::secrets;
use crate::status::{self, DeploymentObs, Observed, SourceObs, reason};

/// State shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub broker: Broker,
    deployments: Store<Deployment>,
    pdbs: Store<PodDisruptionBudget>,
    services: Store<Service>,
    pods: Store<Pod>,
    /// What was last applied per child: (hash of the desired object, fingerprint of the object the API
    /// server returned). An apply is skipped while both still match, so a steady state makes no request.
    applied: Mutex<HashMap<String, (u64, String)>>,
    autoscalers: Mutex<HashMap<String, Autoscaler>>,
    failures: Mutex<HashMap<String, u32>>,
    /// The status this leader last wrote, per Integration (with its uid). Only the leader writes status, so
    /// this is fresher than the watch cache, which can lag behind our own write when reconciles come in
    /// quick succession: comparing against a stale cached status would publish a transition's Event twice.
    written: Mutex<HashMap<String, (String, IntegrationStatus)>>,
}

fn key(kind: &str, ns: &str, name: &str) -> String {
    format!("{kind}/{ns}/{name}")
}

/// Changes with every spec change of the object (generation), or with every change when it has none.
fn fingerprint<K: Resource>(obj: &K) -> String {
    match obj.meta().generation {
        Some(g) => format!("g{g}"),
        None => format!("rv{}", obj.meta().resource_version.clone().unwrap_or_default()),
    }
}

fn hash_of<T: Serialize>(obj: &T) -> u64 {
    let mut h = DefaultHasher::new();
    serde_json::to_vec(obj).unwrap_or_default().hash(&mut h);
    h.finish()
}

impl Context {
    /// Server-side applies `desired` unless the cached object is what we last applied and the desired
    /// object has not changed since.
    async fn apply<K>(&self, desired: &K, cached: Option<Arc<K>>) -> Result<()>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let kind = K::kind(&());
        let ns = desired.meta().namespace.clone().unwrap_or_default();
        let name = desired.meta().name.clone().unwrap_or_default();
        let k = key(&kind, &ns, &name);
        let h = hash_of(desired);
        if let Some(c) = &cached {
            let applied = self.applied.lock().expect("lock").get(&k).cloned();
            if applied == Some((h, fingerprint(c.as_ref()))) {
                self.metrics.applies_skipped.inc();
                return Ok(());
            }
        }
        // apiVersion and kind are part of the apply body.
        let mut body = serde_json::to_value(desired).expect("k8s objects serialize");
        body["apiVersion"] = K::api_version(&()).into();
        body["kind"] = kind.as_ref().into();
        let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
        let pp = PatchParams::apply(&self.config.field_manager).force();
        let before = cached.as_ref().map(|c| c.meta().resource_version.clone());
        let out = api
            .patch(&name, &pp, &Patch::Apply(&body))
            .await
            .map_err(|source| Error::Apply {
                kind: kind.to_string(),
                name: name.clone(),
                source,
            })?;
        if before != Some(out.meta().resource_version.clone()) {
            self.metrics.write(&kind);
            debug!(%kind, %name, "applied");
        }
        self.applied
            .lock()
            .expect("lock")
            .insert(k, (h, fingerprint(&out)));
        Ok(())
    }

    fn forget(&self, ns: &str, name: &str) {
        let svc = desired::service_name(name);
        let mut applied = self.applied.lock().expect("lock");
        for (kind, n) in [
            ("Deployment", name),
            ("PodDisruptionBudget", name),
            ("Service", svc.as_str()),
        ] {
            applied.remove(&key(kind, ns, n));
        }
        self.written
            .lock()
            .expect("lock")
            .remove(&key("Integration", ns, name));
        self.autoscalers
            .lock()
            .expect("lock")
            .remove(&key("Integration", ns, name));
        self.metrics.forget_integration(&format!("{ns}/{name}"));
    }

    async fn event(&self, regarding: &ObjectReference, warning: bool, reason: &str, note: String) {
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

/// Dereference: the referenced Secrets (the broker URI, that every other key exists, the checksum of
/// their versions), then the queue as the broker sees it.
async fn observe_source(intg: &Integration, ctx: &Context, ns: &str) -> Result<(SourceObs, Option<String>)> {
    let spec = &intg.spec;
    let secrets = match secrets::dereference(&ctx.client, ns, spec).await? {
        Ok(d) => d,
        Err(problem) => return Ok((problem, None)),
    };
    let Ok(uri) = String::from_utf8(secrets.amqp_uri) else {
        return Ok((
            SourceObs::Problem {
                reason: reason::INVALID_BROKER_URI,
                message: "the broker URI in spec.source.connectionSecretRef is not UTF-8".into(),
            },
            Some(secrets.checksum),
        ));
    };
    Ok((
        ctx.broker.observe(uri.trim(), &spec.source.queue).await,
        Some(secrets.checksum),
    ))
}

/// Integrations are watched through a [`DeserializeGuard`]: one stored object that does not fit the Rust
/// types (written under an older or looser CRD; stored objects are not re-validated) reaches `reconcile`
/// as an error instead of failing the list/watch of every Integration.
type Watched = DeserializeGuard<Integration>;

#[instrument(skip_all, fields(integration = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())))]
async fn reconcile(obj: Arc<Watched>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.timer();
    ctx.metrics.reconciles.inc();
    let ns = obj
        .namespace()
        .ok_or(Error::InvalidObject("metadata.namespace is missing"))?;
    let name = obj.name_any();
    if obj.meta().deletion_timestamp.is_some() {
        // The garbage collector removes the children through their owner references.
        ctx.forget(&ns, &name);
        return Ok(Action::await_change());
    }
    let intg = match &obj.0 {
        Ok(intg) => intg,
        Err(invalid) => return Err(malformed(invalid, &ctx, &ns, &name).await),
    };
    let spec = &intg.spec;

    // Dereference.
    let (source, secrets_checksum) = observe_source(intg, &ctx, &ns).await?;
    let cached_deployment = ctx.deployments.get(&ObjectRef::new(&name).within(&ns));
    let current = cached_deployment
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas);
    let backlog = match source {
        SourceObs::Queue { backlog, .. } => Some(backlog),
        SourceObs::QueueMissing => Some(0),
        SourceObs::Problem { .. } => None,
    };

    // Validate and decide the replica count.
    let fixed = replicas::fixed(&spec.workers);
    let desired_replicas = match (&spec.workers.autoscale, fixed) {
        (_, Some(n)) => n,
        (Some(auto), None) if !spec.paused => {
            let decision = ctx
                .autoscalers
                .lock()
                .expect("lock")
                .entry(key("Integration", &ns, &name))
                .or_default()
                .next(auto, current, backlog, Instant::now(), ctx.config.scale_up_period);
            decision.replicas
        }
        (Some(auto), None) => current.unwrap_or(auto.min),
        (None, None) => replicas::DEFAULT_REPLICAS,
    };

    // Build and apply.
    if !spec.paused {
        let mut deployment = desired::deployment(intg, &ctx.config.worker, desired_replicas)?;
        // A Secret that cannot be read keeps the checksum the pods run with: no roll into pods that
        // would not start.
        let checksum =
            secrets_checksum.or_else(|| cached_deployment.as_deref().and_then(desired::secrets_checksum));
        if let Some(c) = checksum {
            desired::set_secrets_checksum(&mut deployment, c);
        }
        let pdb = desired::pod_disruption_budget(intg)?;
        let service = desired::metrics_service(intg)?;
        ctx.apply(&deployment, cached_deployment.clone()).await?;
        ctx.apply(&pdb, ctx.pdbs.get(&ObjectRef::new(&name).within(&ns)))
            .await?;
        ctx.apply(
            &service,
            ctx.services
                .get(&ObjectRef::new(&desired::service_name(&name)).within(&ns)),
        )
        .await?;
        if let (Some(auto), Some(cur)) = (&spec.workers.autoscale, current)
            && cur != desired_replicas
        {
            ctx.event(
                &intg.object_ref(&()),
                false,
                "Scaled",
                format!(
                    "{cur} → {desired_replicas} workers (backlog {}, target {} per worker)",
                    backlog.map(|b| b.to_string()).unwrap_or_else(|| "unknown".into()),
                    auto.target_backlog_per_replica
                ),
            )
            .await;
        }
    }

    // Status.
    let pods: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns.as_str()) && p.labels().get(INTEGRATION_LABEL) == Some(&name)
        })
        .collect();
    let pod_problems = pods.iter().filter_map(|p| status::pod_problem(p)).collect();
    let restarts = pods.iter().map(|p| status::worker_restarts(p)).sum::<i64>();
    let observed = Observed {
        generation: intg.metadata.generation,
        paused: spec.paused,
        queue: spec.source.queue.clone(),
        desired: desired_replicas,
        single_replica: fixed == Some(1),
        deployment: cached_deployment.as_deref().map(DeploymentObs::from_deployment),
        pod_problems,
        source,
        selector: desired::selector_string(&name),
    };
    let cached_status = intg.status.clone().unwrap_or_default();
    let uid = intg.metadata.uid.clone().unwrap_or_default();
    let old = ctx
        .written
        .lock()
        .expect("lock")
        .get(&key("Integration", &ns, &name))
        .filter(|(written_uid, _)| *written_uid == uid)
        .map(|(_, st)| st.clone())
        .unwrap_or_else(|| cached_status.clone());
    let mut new = status::compute(&observed);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    new.conditions = status::merge_conditions(&old.conditions, new.conditions, &now);
    // Metrics mirror the status on every pass (in memory: the steady state still writes nothing).
    ctx.metrics
        .integration_status(&format!("{ns}/{name}"), &new, restarts);
    let has_problem = new
        .conditions
        .iter()
        .any(|c| c.type_ == hookfleet_crds::integration::condition::DEGRADED && c.status == "True");
    // Write when either our last write or the cached object differs (someone may have edited the status);
    // in a steady state all three agree and nothing is written.
    if new != old || new != cached_status {
        for t in status::transitions(&old.conditions, &new.conditions) {
            ctx.event(&intg.object_ref(&()), t.warning, &t.reason, t.note)
                .await;
        }
        if fixed == Some(1) && old.replicas != Some(1) {
            ctx.event(
                &intg.object_ref(&()),
                true,
                reason::SINGLE_REPLICA,
                "spec.workers.replicas is 1: a single worker is a single point of failure; use 2 or more"
                    .into(),
            )
            .await;
        }
        let body = serde_json::json!({
            "apiVersion": Integration::api_version(&()),
            "kind": Integration::kind(&()),
            "status": new,
        });
        let api: Api<Integration> = Api::namespaced(ctx.client.clone(), &ns);
        let written = api
            .patch_status(
                &name,
                &PatchParams::apply(&ctx.config.field_manager).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(Error::WriteStatus)?;
        // Remember the status as the API server stored it (timestamps at its precision), so it compares
        // equal to what the watch cache later shows.
        ctx.written.lock().expect("lock").insert(
            key("Integration", &ns, &name),
            (uid, written.status.unwrap_or_else(|| new.clone())),
        );
        ctx.metrics.write("IntegrationStatus");
        info!(
            ready = new.ready_replicas,
            consumers = new.consumers,
            backlog = new.backlog,
            "status updated"
        );
    }
    ctx.failures
        .lock()
        .expect("lock")
        .remove(&key("Integration", &ns, &name));

    let next = if has_problem {
        ctx.config.retry
    } else if spec.workers.autoscale.is_some() {
        ctx.config.resync.min(ctx.config.scale_up_period)
    } else {
        ctx.config.resync
    };
    Ok(Action::requeue(next))
}

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
async fn malformed(invalid: &InvalidObject, ctx: &Context, ns: &str, name: &str) -> Error {
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

fn error_policy(obj: Arc<Watched>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(err.metric_label());
    let k = key(
        "Integration",
        &obj.namespace().unwrap_or_default(),
        &obj.name_any(),
    );
    if let Error::InvalidSpec(_) = err {
        // Retrying cannot fix a malformed object; its next change triggers a reconcile.
        ctx.failures.lock().expect("lock").remove(&k);
        warn!(error = %err, "malformed Integration; waiting for it to change");
        return Action::await_change();
    }
    let n = {
        let mut f = ctx.failures.lock().expect("lock");
        let n = f.entry(k).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = ctx
        .config
        .retry
        .checked_mul(1u32 << n.min(10).saturating_sub(1))
        .unwrap_or(ctx.config.max_backoff)
        .min(ctx.config.max_backoff);
    warn!(error = %err, attempt = n, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
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
    let dep_stream = reflector::reflector(
        dw,
        watcher(child_api(&client, &config.namespace), children.clone()),
    )
    .default_backoff()
    .touched_objects();
    let pdb_stream = reflector::reflector(
        pw,
        watcher(child_api(&client, &config.namespace), children.clone()),
    )
    .default_backoff()
    .touched_objects();
    let svc_stream = reflector::reflector(
        sw,
        watcher(child_api(&client, &config.namespace), children.clone()),
    )
    .default_backoff()
    .touched_objects();
    let pod_stream = reflector::reflector(podw, watcher(child_api(&client, &config.namespace), children))
        .default_backoff()
        .touched_objects();

    // Secrets by metadata only (the operator never caches Secret data): a change to one that an
    // Integration references reconciles that Integration now, which rolls its workers through the
    // checksum annotation, instead of at the next resync.
    let secret_stream = watcher(
        child_api::<PartialObjectMeta<Secret>>(&client, &config.namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();

    let integrations: Api<Watched> = child_api(&client, &config.namespace);
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
        applied: Mutex::default(),
        autoscalers: Mutex::default(),
        failures: Mutex::default(),
        written: Mutex::default(),
    });

    let controller = Controller::new(integrations, watcher::Config::default().any_semantic());
    let integration_store = controller.store();
    let controller = controller
        .watches_stream(secret_stream, move |secret| {
            let (Some(ns), name) = (secret.namespace(), secret.name_any()) else {
                return Vec::new();
            };
            integration_store
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
            pods.wait_until_ready()
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
