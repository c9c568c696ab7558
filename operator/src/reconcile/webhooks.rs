//! Step 1b, webhooks (an Integration with `spec.webhooks` only): compiles the fleet's snapshot from the
//! Webhooks naming it and the Secret keys they reference, and server-side applies it to the Secret the
//! workers watch (`<integration>-webhooks`) when it changed; applies the workers' ServiceAccount, Role
//! (that Secret, by name, and nothing else) and RoleBinding; keeps the fleet's report consumer running;
//! and counts the Webhooks by state for the Integration's status.
//!
//! Why a compiled Secret and not a watch of Webhooks by the workers: RBAC cannot scope a list or watch of
//! Webhooks or Secrets by label or field, so a worker allowed to watch Webhooks would see every tenant's;
//! the snapshot holds only this fleet's valid Webhooks and only the Secret keys each references.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hookfleet_crds::contract::webhooks::{reports_queue, snapshot_secret};
use hookfleet_crds::integration::WebhookCounts;
use hookfleet_crds::{Integration, Webhook};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tracing::{debug, info};

use super::apply::{server_side_apply, unchanged};
use crate::context::Context;
use crate::core::desired;
use crate::core::webhooks::{self as core, Base, Fleet, SNAPSHOT_MAX_BYTES};
use crate::fleets::ReportsFrom;
use crate::memory::{Entry, fingerprint};
use crate::secrets;

#[derive(Debug, thiserror::Error)]
pub enum WebhooksError {
    #[error(transparent)]
    Read(#[from] secrets::ReadError),
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Build(#[from] desired::Error),
}

/// What the step tells the status.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub counts: WebhookCounts,
    /// Why the snapshot could not be written (Degraded).
    pub problem: Option<String>,
}

/// How often the workers' ServiceAccount, Role and RoleBinding (not watched) are applied again while
/// unchanged, to repair a deletion by hand.
const ACCESS_REAPPLY: Duration = Duration::from_secs(600);

/// The Webhooks in the cache that name Integration `ns/name`.
pub fn of_fleet(
    webhooks: &kube::runtime::reflector::Store<Webhook>,
    ns: &str,
    name: &str,
) -> Vec<Arc<Webhook>> {
    webhooks
        .state()
        .into_iter()
        .filter(|w| {
            w.metadata.namespace.as_deref() == Some(ns)
                && w.spec.integration == name
                && w.metadata.deletion_timestamp.is_none()
        })
        .collect()
}

/// Runs the step (see the module); None for an Integration without `spec.webhooks` (its fleet, if it had
/// one, is forgotten and its consumer stopped).
pub async fn webhooks(
    ctx: &Context,
    memory: &Entry,
    intg: &Integration,
) -> Result<Option<Outcome>, WebhooksError> {
    let ns = intg.namespace().unwrap_or_default();
    let name = intg.name_any();
    let key = crate::memory::key(&ns, &name);
    let Some(spec) = &intg.spec.webhooks else {
        ctx.fleets.stop(&key);
        remove_snapshot(ctx, memory, intg).await?;
        return Ok(None);
    };
    let allow = spec.allow_private_networks;
    let mine = of_fleet(&ctx.webhooks, &ns, &name);

    // The Secrets the valid Webhooks reference, each read once.
    let mut read: BTreeMap<String, Option<Arc<Secret>>> = BTreeMap::new();
    for w in &mine {
        if hookfleet_crds::validate_webhook(&w.spec, allow, spec.per_webhook.as_ref()).is_err() {
            continue;
        }
        for r in core::secret_refs(w, allow) {
            if !read.contains_key(&r.name) {
                let s = secrets::read(
                    &ctx.client,
                    &ns,
                    &r.name,
                    &ctx.caches.secrets,
                    &ctx.caches.secret_reads,
                )
                .await?;
                read.insert(r.name.clone(), s);
            }
        }
    }
    let lookup = |r: &hookfleet_crds::integration::SecretKeyRef| match read.get(&r.name) {
        Some(Some(s)) => Some(secrets::value(s, &r.key).map(|v| String::from_utf8_lossy(&v).into_owned())),
        _ => None,
    };
    let compiled = core::compile(
        mine.iter().map(|w| &**w),
        allow,
        spec.per_webhook.as_ref(),
        &lookup,
    );
    let hash = snapshot_hash(&compiled.snapshot, &read);
    let encoded = compiled.snapshot.encode();
    let n = compiled.snapshot.webhooks.len();
    let problem = if encoded.len() > SNAPSHOT_MAX_BYTES {
        Some(format!(
            "the Webhooks snapshot of {n} Webhooks is {} KiB compressed, over the {} KiB a Secret can hold: \
             it is not updated and the workers keep delivering the last one. Move some of the {} Webhooks to \
             another Integration",
            encoded.len() / 1024,
            SNAPSHOT_MAX_BYTES / 1024,
            mine.len()
        ))
    } else {
        apply_snapshot(ctx, memory, intg, encoded, &hash, n).await?;
        None
    };
    apply_access(ctx, memory, intg).await?;

    let decided = compiled.decided;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let none = hookfleet_crds::WebhookStatus::default();
    let statuses: Vec<_> = mine
        .iter()
        .filter_map(|w| {
            let wname = w.name_any();
            let old = w.status.as_ref().unwrap_or(&none);
            let agg = ctx.fleets.aggregate(&key, &wname);
            core::status(
                w,
                Fleet::of(decided.get(&wname), intg.spec.suspend && !intg.spec.paused),
                &Base::of(w.status.as_ref()),
                agg.as_ref(),
                &core::Pause::of(old),
                old,
                &now,
            )
        })
        .collect();
    let counts = core::counts(&statuses);
    ctx.fleets.set_decided(&key, decided);

    // The reports consumer, on the broker the fleet consumes from (known once its Secret was read).
    let from = memory.with(|m| m.secrets.as_ref().and_then(|s| reports_from(intg, s)));
    if let Some(from) = from {
        ctx.fleets.consume_from(&key, from);
    }
    Ok(Some(Outcome { counts, problem }))
}

/// Where the reports of `intg`'s fleet are consumed from, with the values of its source's Secrets: the
/// RabbitMQ reports queue, or on a NATS source the JetStream reports stream of its durable consumer.
/// None while a value is not UTF-8 (the dereference step tells that in the status).
fn reports_from(intg: &Integration, found: &secrets::Dereferenced) -> Option<ReportsFrom> {
    let source = &intg.spec.source;
    let text = |v: &[u8]| String::from_utf8(v.to_vec());
    let uri = text(&found.amqp_uri).ok()?;
    if source.nats.is_none() {
        return Some(ReportsFrom::Amqp {
            uris: uri.trim().to_owned(),
            queue: reports_queue(&source.queue),
        });
    }
    Some(ReportsFrom::Nats {
        urls: uri.trim().to_owned(),
        credentials: found.nats_credentials.as_deref().map(text).transpose().ok()?,
        token: found.nats_token.as_deref().map(text).transpose().ok()?,
        consumer: source.queue.clone(),
    })
}

/// Deletes the snapshot Secret of an Integration that no longer has `spec.webhooks` (it holds its former
/// Webhooks' Secret values), if this Integration owns it: a Secret of that name that is someone else's stays.
async fn remove_snapshot(ctx: &Context, memory: &Entry, intg: &Integration) -> Result<(), WebhooksError> {
    let ns = intg.namespace().unwrap_or_default();
    let name = snapshot_secret(&intg.name_any());
    if ctx
        .caches
        .secrets
        .get(&ObjectRef::new(&name).within(&ns))
        .is_none()
    {
        return Ok(());
    }
    let uid = intg.metadata.uid.clone().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let fail = |source| WebhooksError::Apply {
        kind: "Secret".into(),
        name: name.clone(),
        source,
    };
    let Some(meta) = api.get_metadata_opt(&name).await.map_err(fail)? else {
        return Ok(());
    };
    let ours = meta
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.kind == Integration::kind(&()));
    if !ours {
        return Ok(());
    }
    let dp = kube::api::DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: meta.metadata.uid.clone(),
            resource_version: None,
        }),
        ..kube::api::DeleteParams::default()
    };
    match api.delete(&name, &dp).await {
        Ok(_) => {
            info!(secret = %name, "deleted the Webhooks snapshot of an Integration without spec.webhooks")
        }
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
        Err(e) => return Err(fail(e)),
    }
    memory.with(|m| m.applied.remove(SNAPSHOT_KIND));
    Ok(())
}

/// What the snapshot was compiled from: the entries without their Secret values, and the uid and version
/// of each Secret read (a hash of values would let anyone who reads the annotation test guesses of a
/// short secret).
fn snapshot_hash(
    snapshot: &hookfleet_crds::contract::webhooks::Snapshot,
    read: &BTreeMap<String, Option<Arc<Secret>>>,
) -> String {
    let mut h = Sha256::new();
    for e in &snapshot.webhooks {
        let mut e = e.clone();
        let keys: Vec<String> = e.secrets.keys().cloned().collect();
        e.secrets.clear();
        h.update(serde_json::to_vec(&e).unwrap_or_default());
        h.update(keys.join("\0").as_bytes());
        h.update(b"\n");
    }
    for (name, s) in read {
        let (uid, rv) = s.as_deref().map(secrets::version).unwrap_or_default();
        h.update(format!("{name}\0{uid}\0{rv}\n").as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn hash64(s: &str) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// Applies the snapshot Secret unless the Secret watch shows it at what this process applied last from
/// the same `hash`.
async fn apply_snapshot(
    ctx: &Context,
    memory: &Entry,
    intg: &Integration,
    encoded: Vec<u8>,
    hash: &str,
    n: usize,
) -> Result<(), WebhooksError> {
    let ns = intg.namespace().unwrap_or_default();
    let secret_name = snapshot_secret(&intg.name_any());
    let h = hash64(hash);
    let cached = ctx
        .caches
        .secrets
        .get(&ObjectRef::new(&secret_name).within(&ns))
        .map(|m| fingerprint(&*m));
    let applied = memory.with(|m| m.applied.get(SNAPSHOT_KIND).cloned());
    if unchanged(h, cached.clone(), applied.as_ref()) {
        ctx.metrics.applies_skipped.inc();
        return Ok(());
    }
    let secret = desired::snapshot_secret(intg, encoded, hash)?;
    // The cache may lag behind this process's last apply (its watch event not in yet): a write is an
    // object at neither.
    let before: Vec<String> = cached
        .into_iter()
        .chain(applied.as_ref().map(|(_, fp, _)| fp.clone()))
        .collect();
    let out = apply(ctx, &secret, &before).await?;
    if applied.is_none_or(|(_, fp, _)| fp != fingerprint(&out)) {
        info!(secret = %secret_name, webhooks = n, "Webhooks snapshot applied");
    }
    memory.with(|m| {
        m.applied
            .insert(SNAPSHOT_KIND.into(), (h, fingerprint(&out), Instant::now()))
    });
    Ok(())
}

/// The key of the snapshot Secret in `Memory::applied` (the child kinds' keys are their kinds).
pub const SNAPSHOT_KIND: &str = "Secret";

/// Applies the workers' ServiceAccount, Role and RoleBinding when they changed (or every
/// [`ACCESS_REAPPLY`]).
async fn apply_access(ctx: &Context, memory: &Entry, intg: &Integration) -> Result<(), WebhooksError> {
    let (sa, role, binding) = desired::worker_access(intg)?;
    // The binding after its Role: the API server grants a binding to an operator without the `bind` verb
    // only by checking that it holds the Role's rules, which needs the Role to exist (a binding applied
    // first answers NotFound).
    let (sa, role) = futures::join!(
        apply_if_changed(ctx, memory, &sa),
        apply_if_changed(ctx, memory, &role)
    );
    sa?;
    role?;
    apply_if_changed(ctx, memory, &binding).await
}

async fn apply_if_changed<K>(ctx: &Context, memory: &Entry, obj: &K) -> Result<(), WebhooksError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let kind = K::kind(&()).to_string();
    let h = hash64(&serde_json::to_string(obj).unwrap_or_default());
    let applied = memory.with(|m| m.applied.get(&kind).cloned());
    if applied
        .as_ref()
        .is_some_and(|(ah, _, at)| *ah == h && at.elapsed() < ACCESS_REAPPLY)
    {
        ctx.metrics.applies_skipped.inc();
        return Ok(());
    }
    let before: Vec<String> = applied.iter().map(|(_, fp, _)| fp.clone()).collect();
    let out = apply(ctx, obj, &before).await?;
    memory.with(|m| m.applied.insert(kind, (h, fingerprint(&out), Instant::now())));
    Ok(())
}

/// Server-side apply of `obj` under the operator's field manager; counts a write when the object is at
/// none of the fingerprints `before` (what the cache showed, what this process applied last) afterwards.
async fn apply<K>(ctx: &Context, obj: &K, before: &[String]) -> Result<K, WebhooksError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let kind = K::kind(&()).to_string();
    let name = obj.name_any();
    let params = PatchParams::apply(&ctx.config.field_manager).force();
    let out = server_side_apply(&ctx.client, &params, obj)
        .await
        .map_err(|source| WebhooksError::Apply {
            kind: kind.clone(),
            name: name.clone(),
            source,
        })?;
    if !before.contains(&fingerprint(&out)) {
        ctx.metrics.write(&kind);
        debug!(%kind, %name, "applied");
    }
    Ok(out)
}
