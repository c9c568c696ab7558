//! The reconcile of one Integration, in four steps, each a function in its own file with its own error:
//!
//! 1. [`dereference`]: what the world is (Secrets, the broker's view of the queue, children, worker pods);
//! 2. [`build`]: the desired children (pure);
//! 3. [`apply`]: server-side apply of what changed;
//! 4. [`status`]: conditions, written only when they changed, and the Events of their transitions.
//!
//! Steps 3 and 4 run at the same time: the status reads what step 1 observed and step 2 decided, not what
//! the apply returns.

pub mod apply;
pub mod build;
pub mod dereference;
pub mod malformed;
pub mod status;

use std::sync::Arc;
use std::time::Instant;

use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::instrument;

use crate::context::{Context, Watched};
use crate::error::{Error, Result};

#[instrument(skip_all, fields(integration = %format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())))]
pub(crate) async fn reconcile(obj: Arc<Watched>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.timer();
    let started = Instant::now();
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
        Err(invalid) => {
            return Err(Error::InvalidSpec(
                malformed::malformed(invalid, &ctx, &ns, &name).await,
            ));
        }
    };
    let uid = intg.metadata.uid.clone().unwrap_or_default();
    let spec = &intg.spec;

    let (mut world, question) = dereference::dereference(intg, &ctx).await?;
    // The broker's answer feeds the autoscaler; otherwise only the status reads it, so the probe runs
    // while the children are built and applied instead of before (a first reconcile waits for one round
    // trip fewer).
    let autoscaled = spec.workers.autoscale.is_some() && !spec.paused;
    if autoscaled && let Some(q) = &question {
        world.source = q.ask(&ctx).await;
    }
    let desired = ctx.memory.with(&ns, &name, &uid, |m| {
        // The status last written (fresher than the cache) says whether the destination is gone.
        let previous = m.written.as_ref().or(intg.status.as_ref());
        let previous_gone = previous.and_then(|s| s.destination_gone.clone());
        build::build(
            intg,
            &world,
            &ctx.config.worker,
            m,
            previous_gone.as_ref(),
            Instant::now(),
            ctx.config.scale_up_period,
        )
    })?;
    // The status is computed from what was observed before the apply (the caches, the broker) and from
    // what was decided (`desired`), never from the apply's answers, so it is written while the children are
    // applied: a first reconcile waits for one round trip, not two. A failed apply still fails the
    // reconcile (its error policy retries); the status it wrote meanwhile says what was observed.
    let apply = async {
        if let Some(children) = &desired.children {
            apply::apply(&ctx, (&ns, &name, &uid), children, &world).await?;
        }
        Ok::<_, Error>(())
    };
    let report = async {
        let mut seen = world.clone();
        if let Some(q) = &question
            && !autoscaled
        {
            seen.source = q.ask(&ctx).await;
        }
        status::status(&ctx, intg, &seen, &desired).await
    };
    let (applied, reported) = futures::join!(apply, report);
    applied?;
    let reported = reported?;
    ctx.memory.with(&ns, &name, &uid, |m| m.failures = 0);
    ctx.forget_if_deleted(&ns, &name, &uid);

    let next = if reported.has_problem {
        ctx.config.retry
    } else if spec.workers.autoscale.is_some() {
        ctx.config.resync.min(ctx.config.scale_up_period)
    } else {
        ctx.config.resync
    };
    ctx.pacer.observe(started.elapsed());
    let next = ctx
        .pacer
        .next(next, ctx.integrations.len(), ctx.config.concurrency);
    // A held status is written when its hold ends, not a paced resync later.
    Ok(Action::requeue(reported.held.map_or(next, |h| h.min(next))))
}
