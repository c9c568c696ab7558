//! One Integration's reconcile: the steps of [`crate::reconcile`] in order. It sits above
//! [`crate::error`], which wraps the steps' errors, and below the controller, which runs it.

use std::sync::Arc;
use std::time::Instant;

use hookfleet_crds::integration::finalizer;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::instrument;

use crate::context::{Context, Watched};
use crate::error::{Error, Result};
use crate::reconcile::{apply, build, dereference, finalize, malformed, status, webhooks};

#[instrument(skip_all, fields(integration = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())))]
pub(crate) async fn reconcile(obj: Arc<Watched>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.timer();
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = obj
        .namespace()
        .ok_or(Error::InvalidObject("metadata.namespace is missing"))?;
    let name = obj.name_any();
    let queue_finalizer = obj.finalizers().iter().any(|f| f == finalizer::QUEUES);
    if obj.meta().deletion_timestamp.is_some() {
        if queue_finalizer {
            // `deletionPolicy: Delete`: the queues go first (bounded by the queue deletion timeout).
            let uid = obj.meta().uid.clone().unwrap_or_default();
            return match &obj.0 {
                Ok(intg) => {
                    let memory = ctx.memory.entry(&ns, &name, &uid);
                    Ok(finalize::finalize(&ctx, &memory, intg).await?)
                }
                Err(_) => {
                    let next = finalize::release_malformed(&ctx, obj.meta(), &obj.object_ref(&())).await?;
                    ctx.forget(&ns, &name);
                    Ok(next)
                }
            };
        }
        // The garbage collector removes the children through their owner references.
        ctx.forget(&ns, &name);
        return Ok(Action::await_change());
    }
    let intg = match &obj.0 {
        Ok(intg) => intg,
        Err(invalid) => return Err(malformed::malformed(invalid, &ctx, &ns, &name).await.into()),
    };
    // The queue finalizer as `spec.source.deletionPolicy` says (paused or not: it applies nothing to the fleet).
    finalize::ensure(&ctx, intg).await?;
    let uid = intg.metadata.uid.clone().unwrap_or_default();
    let memory = ctx.memory.entry(&ns, &name, &uid);
    let world =
        dereference::dereference(intg, &ctx.client, &ctx.caches, &ctx.broker, &ctx.nats, &memory).await?;
    // Before the children: a Webhook's change reaches the snapshot without waiting for the broker probe.
    let fleet = webhooks::webhooks(&ctx, &memory, intg).await?;
    let backlog = build::backlog(intg, &world).await;
    let desired = memory.with(|m| {
        build::build(
            intg,
            &world,
            backlog,
            &ctx.config,
            m,
            Instant::now(),
            k8s_openapi::jiff::Timestamp::now(),
        )
    })?;
    // A failed apply fails the reconcile (its error policy retries); the status written meanwhile says what
    // was observed, which is what it is computed from (the caches, the broker), never the apply's answers.
    let (applied, reported) = futures::join!(
        apply::apply(&ctx.client, &ctx.config, &ctx.metrics, &memory, &desired, &world),
        status::status(&ctx, &memory, intg, &world, &desired, fleet.as_ref()),
    );
    applied?;
    let reported = reported?;
    memory.with(|m| m.failures = 0);
    ctx.forget_if_deleted(&ns, &name, &uid);
    let autoscale = intg.spec.workers.autoscale.is_some();
    let next = ctx.requeue_after(started.elapsed(), reported.has_problem, autoscale);
    // A held status is written when its hold ends, not a paced resync later.
    Ok(Action::requeue(reported.held.map_or(next, |h| h.min(next))))
}
