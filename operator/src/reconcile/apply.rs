//! Step 3, apply: server-side apply of each desired child, only when it changed (the memory holds what was
//! last applied and what the API server returned).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::debug;

use super::build::Children;
use super::dereference::World;
use crate::context::Context;
use crate::memory::fingerprint;

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

/// Applies the children of Integration `ns/name` (uid `uid`) that differ from what was last applied.
pub async fn apply(
    ctx: &Context,
    (ns, name, uid): (&str, &str, &str),
    children: &Children,
    world: &World,
) -> Result<(), ApplyError> {
    let owner = Owner { ns, name, uid };
    // Three independent objects: applied together, a first reconcile waits for one round trip, not three.
    futures::try_join!(
        apply_one(ctx, &owner, &children.deployment, world.deployment.clone()),
        apply_one(ctx, &owner, &children.pdb, world.pdb.clone()),
        apply_one(ctx, &owner, &children.service, world.service.clone()),
    )?;
    Ok(())
}

/// Whether the child whose desired object hashes to `h` and which the cache shows at fingerprint `cached`
/// (None: not in the cache) needs no apply, given what was `applied` last (see [`apply_one`]).
fn unchanged(h: u64, cached: Option<String>, applied: Option<&(u64, String, Instant)>) -> bool {
    match (cached, applied) {
        (Some(fp), Some((ah, afp, _))) => *ah == h && *afp == fp,
        (None, Some((ah, _, at))) => *ah == h && at.elapsed() < WATCH_LAG,
        (_, None) => false,
    }
}

struct Owner<'a> {
    ns: &'a str,
    name: &'a str,
    uid: &'a str,
}

/// How long after an apply a child missing from the cache counts as not yet delivered by its watch rather
/// than gone: a new child's watch event lags its apply by milliseconds, and in the meantime the events of
/// the Integration's other children reconcile it again.
const WATCH_LAG: Duration = Duration::from_secs(5);

/// Server-side applies `desired` unless the cached object is what we last applied and the desired object
/// has not changed since, or the cache does not show the object yet but this process applied exactly it
/// less than [`WATCH_LAG`] ago (a child deleted within that time is applied again by the first reconcile
/// after it: the requeue, the resync at the latest).
async fn apply_one<K>(
    ctx: &Context,
    owner: &Owner<'_>,
    desired: &K,
    cached: Option<Arc<K>>,
) -> Result<(), ApplyError>
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
    let applied = ctx
        .memory
        .with(owner.ns, owner.name, owner.uid, |m| m.applied.get(&kind).cloned());
    if unchanged(h, cached.as_deref().map(fingerprint), applied.as_ref()) {
        ctx.metrics.applies_skipped.inc();
        return Ok(());
    }
    // apiVersion and kind are part of the apply body.
    let mut body = serde_json::to_value(desired).expect("k8s objects serialize");
    body["apiVersion"] = K::api_version(&()).into();
    body["kind"] = kind.as_str().into();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), owner.ns);
    let pp = PatchParams::apply(&ctx.config.field_manager).force();
    let before = cached.as_ref().map(|c| c.meta().resource_version.clone());
    let out = api
        .patch(&name, &pp, &Patch::Apply(&body))
        .await
        .map_err(|source| ApplyError::Apply {
            kind: kind.clone(),
            name: name.clone(),
            source,
        })?;
    if before != Some(out.meta().resource_version.clone()) {
        ctx.metrics.write(&kind);
        debug!(%kind, %name, "applied");
    }
    let fp = fingerprint(&out);
    ctx.memory.with(owner.ns, owner.name, owner.uid, |m| {
        m.applied.insert(kind, (h, fp, Instant::now()));
    });
    Ok(())
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
