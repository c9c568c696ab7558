//! The finalizer `hookfleet.io/queues` (`spec.source.deletionPolicy: Delete`): [`ensure`] adds or removes it
//! as the policy says while the Integration lives; once it is deleted, [`finalize`] stops the workers,
//! deletes the queues that are the Integration's own and removes the finalizer, or gives up after the
//! operator's `--queue-deletion-timeout` (the order and the rules: `core::deletion`). An Integration
//! without the finalizer is deleted at once, as before; its children go with it (owner references).

use std::time::Duration;

use hookfleet_crds::integration::condition;
use hookfleet_crds::{Integration, IntegrationStatus};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{debug, info, warn};

use crate::context::Context;
use crate::core::deletion::{self, Attempt, FinalizerChange, Verdict, event};
use crate::core::status::{self, reason};
use crate::memory::Entry;
use crate::names::INTEGRATION_LABEL;
use crate::{queues, secrets};

#[derive(Debug, thiserror::Error)]
pub enum FinalizeError {
    #[error("updating the finalizers of the Integration: {0}")]
    Finalizers(#[source] kube::Error),
    #[error("scaling the worker Deployment to 0 before deleting the queues: {0}")]
    ScaleDown(#[source] kube::Error),
    #[error("writing the QueuesDeleted condition: {0}")]
    Status(#[source] kube::Error),
}

/// How soon a pass whose finalizer patch met a newer object (409) runs again, on the newer object.
const CONFLICT_RETRY: Duration = Duration::from_secs(1);

/// Sets the finalizers of the object `meta` describes to its own with ours added or removed, guarded by its
/// `resourceVersion` (a merge patch replaces the whole list, so it must not race another writer's). False when
/// the object changed since the cache saw it (409: the cache lags, e.g. behind this operator's own status
/// write): nothing was changed, and the next pass decides again on the newer object.
/// Through the metadata endpoint, so a malformed object can be released too.
async fn change_finalizer(
    ctx: &Context,
    meta: &ObjectMeta,
    change: FinalizerChange,
) -> Result<bool, FinalizeError> {
    let ns = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let finalizers = deletion::with_change(meta.finalizers.as_deref().unwrap_or_default(), change);
    let body = serde_json::json!({"metadata": {
        "resourceVersion": meta.resource_version,
        "finalizers": finalizers,
    }});
    let api: Api<Integration> = Api::namespaced(ctx.client.clone(), &ns);
    let pp = PatchParams {
        field_manager: Some(ctx.config.field_manager.clone()),
        ..PatchParams::default()
    };
    match api.patch_metadata(&name, &pp, &Patch::Merge(&body)).await {
        Ok(_) => {}
        // Already gone: nothing holds it any more.
        Err(kube::Error::Api(s)) if s.code == 404 && change == FinalizerChange::Remove => return Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            debug!(
                ?change,
                "the Integration changed since the cache saw it; deciding again"
            );
            return Ok(false);
        }
        Err(e) => return Err(FinalizeError::Finalizers(e)),
    }
    ctx.metrics.write("IntegrationFinalizers");
    Ok(true)
}

/// Adds the finalizer to a live Integration whose policy is `Delete`, removes it from one whose policy is
/// `Retain` (a switch from `Delete`); no request otherwise.
pub async fn ensure(ctx: &Context, intg: &Integration) -> Result<(), FinalizeError> {
    let Some(change) =
        deletion::finalizer_change(intg.spec.source.effective_deletion_policy(), intg.finalizers())
    else {
        return Ok(());
    };
    if !change_finalizer(ctx, &intg.metadata, change).await? {
        // The reconcile goes on; its next pass (requeue or the newer object's event) tries again.
        return Ok(());
    }
    info!(
        ?change,
        policy = intg.spec.source.effective_deletion_policy().as_str(),
        "queue finalizer updated"
    );
    Ok(())
}

/// A deleted Integration that does not fit the types cannot name its queues: its finalizer is removed,
/// with a Warning Event, so it never blocks the deletion.
pub async fn release_malformed(
    ctx: &Context,
    meta: &ObjectMeta,
    regarding: &ObjectReference,
) -> Result<Action, FinalizeError> {
    match change_finalizer(ctx, meta, FinalizerChange::Remove).await {
        Ok(true) => {}
        Ok(false) => return Ok(Action::requeue(CONFLICT_RETRY)),
        Err(FinalizeError::Finalizers(kube::Error::Api(s))) if s.code == 422 => {
            // The API server validates every update of the object, a metadata patch too, and refuses it
            // for what is wrong in the spec (e.g. a scale subresource path of the wrong type): only fixing
            // the spec (or the CRD) lets anyone remove the finalizer. Retried with the error policy's backoff;
            // the Event recorder folds the repeated Warning into one series.
            let note = format!(
                "the Integration does not fit the types and the API server refuses any update to it, so the \
                 finalizer {} cannot be removed until the spec is fixed: {}",
                hookfleet_crds::integration::finalizer::QUEUES,
                s.message
            );
            warn!(%note, "finalizer not removed");
            ctx.event(regarding, true, event::FINALIZER_NOT_REMOVED, note)
                .await;
            return Err(FinalizeError::Finalizers(kube::Error::Api(s)));
        }
        Err(e) => return Err(e),
    }
    let note = "the Integration does not fit the types (see Degraded): its queues cannot be named, so none is \
                deleted; the finalizer is removed";
    warn!(note, "queues left behind");
    ctx.event(regarding, true, event::QUEUES_LEFT_BEHIND, note.into())
        .await;
    Ok(Action::await_change())
}

/// The connection Secret's value, or why it cannot be had.
async fn broker_value(ctx: &Context, ns: &str, intg: &Integration) -> Result<String, (&'static str, String)> {
    let r = &intg.spec.source.connection_secret_ref;
    let secret = secrets::read(
        &ctx.client,
        ns,
        &r.name,
        &ctx.caches.secrets,
        &ctx.caches.secret_reads,
    )
    .await
    .map_err(|e| (reason::SECRET_UNREADABLE, e.to_string()))?
    .ok_or_else(|| {
        (
            reason::SECRET_NOT_FOUND,
            format!(
                "Secret {:?} (spec.source.connectionSecretRef) not found in namespace {ns}",
                r.name
            ),
        )
    })?;
    let value = secrets::value(&secret, &r.key).ok_or_else(|| {
        (
            reason::SECRET_KEY_NOT_FOUND,
            format!(
                "Secret {:?} (spec.source.connectionSecretRef) has no key {:?}",
                r.name, r.key
            ),
        )
    })?;
    String::from_utf8(value).map_err(|_| {
        (
            reason::INVALID_BROKER_URI,
            "the broker URI in spec.source.connectionSecretRef is not UTF-8".into(),
        )
    })
}

/// Scales the worker Deployment to 0 unless it is there already; the worker pods still there.
async fn stop_workers(ctx: &Context, ns: &str, name: &str) -> Result<usize, FinalizeError> {
    let cached = ctx.caches.deployments.get(&ObjectRef::new(name).within(ns));
    if let Some(d) = cached
        && d.spec.as_ref().and_then(|s| s.replicas) != Some(0)
    {
        let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
        let pp = PatchParams {
            field_manager: Some(ctx.config.field_manager.clone()),
            ..PatchParams::default()
        };
        let body = serde_json::json!({"spec": {"replicas": 0}});
        match api.patch(name, &pp, &Patch::Merge(&body)).await {
            Ok(_) => {
                ctx.metrics.write("Deployment");
                info!("workers scaled to 0 before deleting the queues");
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(FinalizeError::ScaleDown(e)),
        }
    }
    Ok(ctx
        .caches
        .pods
        .state()
        .iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns)
                && p.labels().get(INTEGRATION_LABEL).map(String::as_str) == Some(name)
        })
        .count())
}

/// The queues another Integration the operator sees also declares (queue → `namespace/name`). One being
/// deleted with policy `Delete` does not count: its queues go too. A malformed one cannot be read.
fn shared_queues(ctx: &Context, uid: &str, ours: &[String]) -> std::collections::BTreeMap<String, String> {
    let others: Vec<(String, Vec<String>)> = ctx
        .integrations
        .state()
        .iter()
        .filter_map(|w| w.0.as_ref().ok())
        .filter(|i| i.metadata.uid.as_deref() != Some(uid))
        .filter(|i| !(i.metadata.deletion_timestamp.is_some() && i.spec.source.queues_deleted()))
        .map(|i| {
            (
                crate::memory::key(&i.namespace().unwrap_or_default(), &i.name_any()),
                deletion::declared_queues(&i.spec),
            )
        })
        .collect();
    deletion::shared(ours, &others)
}

/// One pass over a deleted Integration that holds the finalizer: see the module.
pub async fn finalize(ctx: &Context, memory: &Entry, intg: &Integration) -> Result<Action, FinalizeError> {
    let ns = intg.namespace().unwrap_or_default();
    let name = intg.name_any();
    let uid = intg.metadata.uid.clone().unwrap_or_default();
    let regarding = intg.object_ref(&());
    if !intg.spec.source.queues_deleted() {
        if !change_finalizer(ctx, &intg.metadata, FinalizerChange::Remove).await? {
            return Ok(Action::requeue(CONFLICT_RETRY));
        }
        info!("deletionPolicy is Retain: the queues stay; finalizer removed");
        ctx.event(
            &regarding,
            false,
            event::QUEUES_RETAINED,
            "spec.source.deletionPolicy is Retain: the queues and their messages stay on the broker".into(),
        )
        .await;
        ctx.forget(&ns, &name);
        return Ok(Action::await_change());
    }
    // The operator's own consumer of a Webhooks fleet's reports queue goes first.
    ctx.fleets.stop(&crate::memory::key(&ns, &name));
    let timeout = ctx.config.queue_deletion_timeout;
    let deleted_at = intg
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or_else(k8s_openapi::jiff::Timestamp::now);
    let deadline = deleted_at.checked_add(timeout).unwrap_or(deleted_at);
    let remaining = Duration::try_from(deadline.duration_since(k8s_openapi::jiff::Timestamp::now()))
        .unwrap_or(Duration::ZERO);
    let expired = remaining.is_zero();

    let declared = deletion::declared_queues(&intg.spec);
    let shared = shared_queues(ctx, &uid, &declared);
    let mine: Vec<String> = declared.into_iter().filter(|q| !shared.contains_key(q)).collect();
    let first = memory.with(|m| !std::mem::replace(&mut m.deletion.started, true));
    if first && let Some(note) = deletion::shared_note(&shared) {
        warn!(%note, "shared queues kept");
        ctx.event(&regarding, true, event::QUEUE_SHARED, note).await;
    }

    let pods = stop_workers(ctx, &ns, &name).await?;
    let attempt = if pods > 0 && !expired {
        Attempt::WaitingForWorkers { pods }
    } else {
        match broker_value(ctx, &ns, intg).await {
            Err((reason, message)) => Attempt::Blocked { reason, message },
            Ok(value) => match queues::delete(&value, &mine).await {
                Ok(fates) => Attempt::Queues(fates),
                Err((reason, message)) => Attempt::Blocked { reason, message },
            },
        }
    };
    let (gone, deleted, attempts) = memory.with(|m| {
        let d = &mut m.deletion;
        d.gone.extend(deletion::gone(&attempt));
        d.deleted.extend(deletion::deleted(&attempt));
        d.attempts = d.attempts.saturating_add(1);
        (d.gone.clone(), d.deleted.clone(), d.attempts)
    });
    // Once the finalizer is removed (the Events of an object that is gone are still listed in its namespace).
    let deleted_event = async {
        if let Some(note) = deletion::deleted_note(&deleted) {
            info!(%note, "queues deleted");
            ctx.event(&regarding, false, event::QUEUES_DELETED, note).await;
        }
    };
    match deletion::verdict(&attempt, &mine, &gone, expired) {
        Verdict::Done => {
            if !change_finalizer(ctx, &intg.metadata, FinalizerChange::Remove).await? {
                return Ok(Action::requeue(CONFLICT_RETRY));
            }
            info!(queues = mine.len(), "queues gone; finalizer removed");
            deleted_event.await;
            ctx.forget(&ns, &name);
            Ok(Action::await_change())
        }
        Verdict::GiveUp { left, why } => {
            if !change_finalizer(ctx, &intg.metadata, FinalizerChange::Remove).await? {
                return Ok(Action::requeue(CONFLICT_RETRY));
            }
            deleted_event.await;
            let note = deletion::left_behind_note(&left, &why, timeout);
            warn!(%note, "queues left behind");
            ctx.event(&regarding, true, event::QUEUES_LEFT_BEHIND, note).await;
            ctx.forget(&ns, &name);
            Ok(Action::await_change())
        }
        Verdict::Retry { reason, message } => {
            let wait = deletion::retry_in(attempts, ctx.config.retry, ctx.config.max_backoff, remaining);
            warn!(reason, %message, retry_in = ?wait, "queues not deleted yet");
            report(ctx, memory, intg, reason, &message, &Time(deadline), &regarding).await?;
            Ok(Action::requeue(wait))
        }
    }
}

/// Writes the `QueuesDeleted` False condition when it changed (the rest of the status as last written),
/// with an Event when its reason changed: a Warning unless the workers are only stopping.
async fn report(
    ctx: &Context,
    memory: &Entry,
    intg: &Integration,
    why: &'static str,
    message: &str,
    deadline: &Time,
    regarding: &ObjectReference,
) -> Result<(), FinalizeError> {
    let old: IntegrationStatus = memory.with(|m| m.last_status(intg).cloned()).unwrap_or_default();
    let cond = deletion::condition(why, message, deadline, intg.metadata.generation);
    let before = old
        .conditions
        .iter()
        .find(|c| c.type_ == condition::QUEUES_DELETED);
    if before.is_some_and(|b| b.status == cond.status && b.reason == cond.reason && b.message == cond.message)
    {
        return Ok(());
    }
    let reason_changed = before.is_none_or(|b| b.reason != cond.reason);
    let note = cond.message.clone();
    let mut wanted: Vec<_> = old
        .conditions
        .iter()
        .filter(|c| c.type_ != condition::QUEUES_DELETED)
        .cloned()
        .collect();
    wanted.push(cond);
    let mut new = old.clone();
    new.conditions = status::merge_conditions(
        &old.conditions,
        wanted,
        &Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let body = serde_json::json!({
        "apiVersion": Integration::api_version(&()),
        "kind": Integration::kind(&()),
        "status": new,
    });
    let api: Api<Integration> = Api::namespaced(ctx.client.clone(), &intg.namespace().unwrap_or_default());
    let pp = PatchParams::apply(&ctx.config.field_manager).force();
    let written = api
        .patch_status(&intg.name_any(), &pp, &Patch::Apply(&body))
        .await
        .map_err(FinalizeError::Status)?;
    memory.with(|m| {
        m.written = Some(written.status.unwrap_or(new));
        m.written_at = Some(std::time::Instant::now());
    });
    ctx.metrics.write("IntegrationStatus");
    if reason_changed {
        ctx.event(regarding, why != reason::WAITING_FOR_WORKERS, why, note)
            .await;
    }
    Ok(())
}
