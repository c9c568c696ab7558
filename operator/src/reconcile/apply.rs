//! Step 3, apply: server-side apply of each desired child, only when it changed (the memory holds what was
//! last applied and what the API server returned).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::debug;

use super::build::Desired;
use super::dereference::World;
use crate::config::Config;
use crate::memory::{Entry, fingerprint};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

fn hash_of<T: Serialize>(obj: &T) -> u64 {
    let mut h = DefaultHasher::new();
    serde_json::to_vec(obj).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// Applies the desired children that differ from what was last applied (the Integration's `memory` says
/// what that was; nothing while the Integration is paused), each in its own namespace, under the
/// configured field manager.
pub async fn apply(
    client: &Client,
    config: &Config,
    metrics: &Metrics,
    memory: &Entry,
    desired: &Desired,
    world: &World,
) -> Result<(), ApplyError> {
    let Some(children) = &desired.children else {
        if desired.stop {
            return stop(client, config, metrics, world).await;
        }
        return Ok(());
    };
    let to = Target {
        client,
        params: PatchParams::apply(&config.field_manager).force(),
        metrics,
        memory,
    };
    // Three independent objects: applied together, a first reconcile waits for one round trip, not three.
    futures::try_join!(
        apply_one(&to, &children.deployment, world.deployment.clone()),
        apply_one(&to, &children.pdb, world.pdb.clone()),
        apply_one(&to, &children.service, world.service.clone()),
    )?;
    Ok(())
}

/// Scales the running Deployment to 0 through its scale subresource (a suspend while the spec cannot be
/// rendered): the one field it changes; the next apply of a valid spec owns it again.
async fn stop(client: &Client, config: &Config, metrics: &Metrics, world: &World) -> Result<(), ApplyError> {
    let Some(d) = world.deployment.as_deref() else {
        return Ok(());
    };
    if world.current_replicas() == Some(0) {
        return Ok(());
    }
    let (ns, name) = (d.namespace().unwrap_or_default(), d.name_any());
    let api: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), &ns);
    let params = PatchParams {
        field_manager: Some(config.field_manager.clone()),
        ..PatchParams::default()
    };
    api.patch_scale(
        &name,
        &params,
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 0}})),
    )
    .await
    .map_err(|source| ApplyError::Apply {
        kind: "Deployment".into(),
        name: name.clone(),
        source,
    })?;
    metrics.write("Deployment");
    debug!(%name, "scaled to 0 (suspended, spec not applied)");
    Ok(())
}

/// Whether the child whose desired object hashes to `h` and which the cache shows at fingerprint `cached`
/// (None: not in the cache) needs no apply, given what was `applied` last (see [`apply_one`]).
pub(crate) fn unchanged(h: u64, cached: Option<String>, applied: Option<&(u64, String, Instant)>) -> bool {
    match (cached, applied) {
        (Some(fp), Some((ah, afp, _))) => *ah == h && *afp == fp,
        (None, Some((ah, _, at))) => *ah == h && at.elapsed() < WATCH_LAG,
        (_, None) => false,
    }
}

/// What the applies of one Integration's children share.
struct Target<'a> {
    client: &'a Client,
    params: PatchParams,
    metrics: &'a Metrics,
    memory: &'a Entry,
}

/// How long after an apply a child missing from the cache counts as not yet delivered by its watch rather
/// than gone: a new child's watch event lags its apply by milliseconds, and in the meantime the events of
/// the Integration's other children reconcile it again.
pub(crate) const WATCH_LAG: Duration = Duration::from_secs(5);

/// Server-side applies `desired` unless the cached object is what we last applied and the desired object
/// has not changed since, or the cache does not show the object yet but this process applied exactly it
/// less than [`WATCH_LAG`] ago (a child deleted within that time is applied again by the first reconcile
/// after it: the requeue, the resync at the latest).
async fn apply_one<K>(to: &Target<'_>, desired: &K, cached: Option<Arc<K>>) -> Result<(), ApplyError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let kind = K::kind(&()).to_string();
    let name = desired.name_any();
    let h = hash_of(desired);
    let applied = to.memory.with(|m| m.applied.get(&kind).cloned());
    if unchanged(h, cached.as_deref().map(fingerprint), applied.as_ref()) {
        to.metrics.applies_skipped.inc();
        return Ok(());
    }
    let before = cached.as_ref().map(|c| c.meta().resource_version.clone());
    let out = server_side_apply(to.client, &to.params, desired)
        .await
        .map_err(|source| ApplyError::Apply {
            kind: kind.clone(),
            name: name.clone(),
            source,
        })?;
    if before != Some(out.meta().resource_version.clone()) {
        to.metrics.write(&kind);
        debug!(%kind, %name, "applied");
    }
    let fp = fingerprint(&out);
    to.memory.with(|m| {
        m.applied.insert(kind, (h, fp, Instant::now()));
    });
    Ok(())
}

/// Server-side apply of the namespaced object `obj` with `params` (its apiVersion and kind are part of
/// the body): the one apply of the reconcile's steps.
pub(crate) async fn server_side_apply<K>(
    client: &Client,
    params: &PatchParams,
    obj: &K,
) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let mut body = serde_json::to_value(obj).expect("k8s objects serialize");
    body["apiVersion"] = K::api_version(&()).into();
    body["kind"] = K::kind(&()).into();
    let ns = obj.meta().namespace.as_deref().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.patch(&obj.name_any(), params, &Patch::Apply(&body)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_apply_is_skipped_while_nothing_changed_and_a_fresh_child_may_be_missing_from_the_cache() {
        let now = Instant::now();
        let applied = (7, "g1".to_string(), now);
        // Cached at what was applied: skipped; desired changed or child changed: applied.
        assert!(unchanged(7, Some("g1".into()), Some(&applied)));
        assert!(!unchanged(8, Some("g1".into()), Some(&applied)));
        assert!(!unchanged(7, Some("g2".into()), Some(&applied)));
        // Not in the cache yet, applied just now: the watch lags, skipped.
        assert!(unchanged(7, None, Some(&applied)));
        assert!(!unchanged(8, None, Some(&applied)));
        // Not in the cache long after the apply: gone, applied again.
        let Some(long_ago) = now.checked_sub(WATCH_LAG + Duration::from_secs(1)) else {
            return;
        };
        assert!(!unchanged(7, None, Some(&(7, "g1".into(), long_ago))));
        // Never applied by this process: applied.
        assert!(!unchanged(7, Some("g1".into()), None));
        assert!(!unchanged(7, None, None));
    }
}
