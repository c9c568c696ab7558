//! The controller: the watches (Integrations, their children and worker pods, Secrets) and which of their
//! events reach the reconcile (`crate::reconcile`: dereference → build → apply → status), the context they
//! fill, and the error policy. It keeps one memory per Integration (`crate::memory`) in step with the
//! Integrations that exist.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use hookfleet_crds::{Integration, Webhook};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use crate::broker::Broker;
use crate::config::Config;
use crate::context::{Caches, Context, Watched};
use crate::error::Error;
use crate::fleets::Fleets;
use crate::memory::Memories;
use crate::metrics::Metrics;
use crate::names::{INTEGRATION_LABEL, MANAGED_BY};
use crate::nats::Nats;
use crate::pipeline::reconcile;
use crate::secrets;
use crate::slim;

/// After a failed reconcile: a malformed object waits for its next change; anything else is retried after
/// the retry interval, doubled with each consecutive failure up to the maximum backoff.
fn error_policy(obj: Arc<Watched>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(err.metric_label());
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let uid = obj.meta().uid.clone().unwrap_or_default();
    let memory = ctx.memory.entry(&ns, &name, &uid);
    if let Error::InvalidSpec(_) = err {
        // Retrying cannot fix a malformed object; its next change triggers a reconcile.
        memory.with(|m| m.failures = 0);
        ctx.forget_if_deleted(&ns, &name, &uid);
        warn!(error = %err, "malformed Integration; waiting for it to change");
        return Action::await_change();
    }
    let n = memory.with(|m| {
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

/// The Integrations a change to `secret` concerns: those that reference it, those whose Webhooks
/// reference it, and the fleet whose snapshot it is (unless the change is the echo of this process's
/// own apply of it).
fn secret_owners(
    secret: &PartialObjectMeta<Secret>,
    integrations: &reflector::Store<Watched>,
    webhooks: &reflector::Store<Webhook>,
    memory: &Memories,
) -> Vec<ObjectRef<Watched>> {
    let (Some(ns), name) = (secret.namespace(), secret.name_any()) else {
        return Vec::new();
    };
    let mut out: Vec<ObjectRef<Watched>> = integrations
        .state()
        .into_iter()
        .filter(|w| w.namespace().as_deref() == Some(ns.as_str()))
        .filter(|w| {
            w.0.as_ref()
                .is_ok_and(|i| secrets::referenced_names(&i.spec).contains(&name))
        })
        .map(|w| ObjectRef::from_obj(&*w))
        .collect();
    let mut fleets = std::collections::BTreeSet::new();
    for w in webhooks.state() {
        if w.namespace().as_deref() != Some(ns.as_str()) || fleets.contains(&w.spec.integration) {
            continue;
        }
        // Names only (cheap: this runs for every Webhook on every Secret event, the initial list included).
        if secrets::destination_keys(&w.spec.destination, "spec.destination")
            .iter()
            .any(|r| r.name == name)
        {
            fleets.insert(w.spec.integration.clone());
        }
    }
    if let Some(fleet) = name.strip_suffix("-webhooks")
        && let Some(i) = integrations.get(&ObjectRef::new(fleet).within(&ns))
        && let Ok(intg) = &i.0
        && intg.spec.webhooks.is_some()
    {
        let uid = intg.metadata.uid.clone().unwrap_or_default();
        let fp = crate::memory::fingerprint(secret);
        let echo = memory
            .peek(&ns, fleet, &uid, |m| {
                m.applied
                    .get(crate::reconcile::webhooks::SNAPSHOT_KIND)
                    .is_some_and(|(_, applied, _)| *applied == fp)
            })
            .unwrap_or(false);
        if !echo {
            fleets.insert(fleet.to_owned());
        }
    }
    out.extend(fleets.into_iter().map(|i| ObjectRef::new(&i).within(&ns)));
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup();
    out
}

/// Whether the Webhook CRD is installed (a list of at most one Webhook answers); warns when not.
async fn webhook_crd_installed(api: &Api<Webhook>) -> bool {
    match api
        .list_metadata(&kube::api::ListParams::default().limit(1))
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 404 => {
            warn!(
                "the Webhook CRD (webhooks.hookfleet.io) is not installed: Integrations with spec.webhooks get no \
                 snapshot; install crds/webhooks.hookfleet.io.yaml and restart the operator"
            );
            false
        }
        // Anything else (a permission, a blip): watch, and let the watcher's backoff retry.
        _ => true,
    }
}

/// Whether the operator may list Nodes (the chart grants it; a narrower install may not): warns when not.
async fn nodes_readable(api: &Api<Node>) -> bool {
    match api
        .list_metadata(&kube::api::ListParams::default().limit(1))
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 403 => {
            warn!(
                "the operator may not list Nodes: workers are not kept off nodes where they cannot meet their \
                 file-descriptor limit; grant get/list/watch on nodes (docs/operator.md, RBAC) and restart the operator"
            );
            false
        }
        _ => true,
    }
}

/// The Integrations a change to `node` concerns: those that keep their workers off it (its `Ready`
/// condition changing may clear that, see `core::nodes`).
fn node_users(node: &Node, integrations: &reflector::Store<Watched>) -> Vec<ObjectRef<Watched>> {
    let name = node.name_any();
    integrations
        .state()
        .into_iter()
        .filter(|w| {
            w.0.as_ref().is_ok_and(|i| {
                i.status
                    .as_ref()
                    .is_some_and(|s| s.excluded_nodes.iter().any(|e| e.node == name))
            })
        })
        .map(|w| ObjectRef::from_obj(&*w))
        .collect()
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

    // Webhooks: a change to one reconciles the Integration it names (and the one it named before, when
    // `spec.integration` changed), so its fleet's snapshot follows within a reconcile. Status-only
    // changes (the operator's own status writes) change nothing the compile reads, except setting or
    // clearing `status.autoPaused` (the entry's `paused`): the rest is filtered out.
    let (webhooks, webhookw) = reflector::store::<Webhook>();
    let webhook_api = child_api::<Webhook>(&client, &config.namespace);
    let webhook_stream = if webhook_crd_installed(&webhook_api).await {
        reflector::reflector(webhookw, watcher(webhook_api, watcher::Config::default()))
            .default_backoff()
            .try_filter(changes(slim::webhook_reads))
            .touched_objects()
            .boxed()
    } else {
        // Without the CRD (a cluster upgraded without it: Helm installs CRDs only on first install), the
        // single-destination Integrations are served as before; the store stays empty (its writer dropped,
        // so waiting for it ends at once).
        drop(webhookw);
        futures::stream::pending().boxed()
    };

    // Nodes (cluster-wide, slim): where a worker could not meet its fd limit, and when such a node's
    // `Ready` condition changes (see `core::nodes`). Heartbeats do not pass (`slim::node_reads`).
    let (nodes, nodew) = reflector::store::<Node>();
    let node_api: Api<Node> = Api::all(client.clone());
    let nodes_readable = nodes_readable(&node_api).await;
    let node_stream = if nodes_readable {
        reflector::reflector(
            nodew,
            watcher(node_api, watcher::Config::default()).modify(slim::node),
        )
        .default_backoff()
        .try_filter(changes(slim::node_reads))
        .touched_objects()
        .boxed()
    } else {
        drop(nodew);
        futures::stream::pending().boxed()
    };
    let nodes_synced = Arc::new(std::sync::atomic::AtomicBool::new(false));

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
        broker: Arc::new(Broker::default()),
        nats: Arc::new(Nats::default()),
        caches: Caches {
            deployments: deployments.clone(),
            pdbs: pdbs.clone(),
            services: services.clone(),
            pods: pods.clone(),
            nodes: nodes.clone(),
            nodes_synced: nodes_synced.clone(),
            secrets: secret_versions.clone(),
            secret_reads: secrets::Reads::default(),
        },
        integrations: store.clone(),
        memory: memory.clone(),
        pacer: crate::core::pacing::Pacer::default(),
        webhooks: webhooks.clone(),
        fleets: Arc::new(Fleets::default()),
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
    let node_store = store.clone();
    let secret_webhooks = webhooks.clone();
    let secret_memory = memory;
    let named: std::sync::Mutex<std::collections::HashMap<String, String>> = Default::default();
    let controller = Controller::for_stream(integration_stream, store)
        .watches_stream(secret_stream, move |secret| {
            secret_owners(&secret, &secret_store, &secret_webhooks, &secret_memory)
        })
        .watches_stream(webhook_stream, move |w: Webhook| {
            let ns = w.namespace().unwrap_or_default();
            let now = w.spec.integration.clone();
            let before = named
                .lock()
                .expect("lock")
                .insert(w.metadata.uid.clone().unwrap_or_default(), now.clone());
            std::iter::once(now)
                .chain(before.filter(|b| *b != w.spec.integration))
                .map(|i| ObjectRef::<Watched>::new(&i).within(&ns))
                .collect::<Vec<_>>()
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
        .watches_stream(node_stream, move |node: Node| node_users(&node, &node_store))
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(stop);
    let store = controller.store();

    let ready_metrics = metrics.clone();
    let writer_ctx = ctx.clone();
    let ready = async move {
        let _ = futures::join!(
            store.wait_until_ready(),
            deployments.wait_until_ready(),
            pdbs.wait_until_ready(),
            services.wait_until_ready(),
            pods.wait_until_ready(),
            secret_versions.wait_until_ready(),
            webhooks.wait_until_ready(),
            nodes.wait_until_ready()
        );
        nodes_synced.store(nodes_readable, std::sync::atomic::Ordering::Relaxed);
        ready_metrics.ready.set(1);
        info!("caches synced; reconciling");
        crate::reconcile::webhook_status::run(writer_ctx).await
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
    ctx.fleets.close();
    // A former leader exports no paused Webhooks (the next leader does).
    ctx.metrics.webhooks_paused(&Default::default());
    ctx.broker.close().await;
    metrics.ready.set(0);
}

#[cfg(test)]
mod tests {
    use super::*;

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
        memory.entry("ns", "a", "uid-a").with(|m| {
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
}
