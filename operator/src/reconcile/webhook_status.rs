//! The Webhook status writer: once a second it computes every Webhook's status from where it stands
//! with its fleet (the fleet's last compile, or no fleet) and from what the fleet's workers reported
//! (`crate::fleets`), and merge-patches the status subresource of those that changed, at most once per
//! `Config::webhook_status_every` per Webhook when a condition (or the generation or host) changed and once
//! per `Config::webhook_counts_every` when only counts and timestamps did. So the cost in API writes is
//! bounded by the number of Webhooks, never by the number of deliveries. A pass writes at most
//! `WRITES_PER_PASS`, state changes first, so thousands of count-only writes due at once never hold back a
//! Webhook that starts failing or is paused.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hookfleet_crds::{Webhook, WebhookStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use tracing::{debug, info, warn};

use crate::context::Context;
use crate::core::webhooks::{
    Base, Fleet, PauseChange, may_write, pause, paused_reason, state_changed, status,
};
use hookfleet_crds::webhook::WebhookLimits;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;

/// How often the writer looks.
const TICK: Duration = Duration::from_secs(1);
/// Status writes in flight at once.
const WRITES_IN_FLIGHT: usize = 8;
/// Status writes one pass makes at most (about a second's worth). When the counts of thousands of Webhooks
/// changed at once, a pass that wrote every one (10,000 took 46 s on the bench machine) held back every state
/// change behind them, and spaced each Webhook's next count write by the pass's length on top of
/// `webhook_counts_every`; the rest stay due and go in the next passes.
const WRITES_PER_PASS: usize = 256;

/// What the writer remembers of one Webhook (one uid).
struct Known {
    /// Its status when this process first saw it: the counts continue from there.
    base: Base,
    /// What this process last wrote, and when.
    last: Option<(WebhookStatus, Instant)>,
}

/// Writes Webhook statuses until the task is dropped.
pub async fn run(ctx: Arc<Context>) {
    let mut known: HashMap<String, Known> = HashMap::new();
    let mut names: HashMap<(String, String), String> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        pass(&ctx, &mut known, &mut names).await;
    }
}

/// One Event per auto-pause (and one per resume), once the status that says so is written.
async fn announce(ctx: &Context, name: &str, was: bool, new: &WebhookStatus, regarding: &ObjectReference) {
    match (&new.auto_paused, was) {
        (Some(a), false) => {
            warn!(webhook = %name, reason = %a.reason, "Webhook paused by the operator");
            ctx.event(regarding, true, &format!("Paused{}", a.reason), a.message.clone())
                .await;
        }
        (None, true) => {
            info!(webhook = %name, "Webhook resumed");
            ctx.event(
                regarding,
                false,
                "Resumed",
                "resumed: its kept messages are delivered again".into(),
            )
            .await;
        }
        _ => {}
    }
}

async fn pass(
    ctx: &Context,
    known: &mut HashMap<String, Known>,
    names: &mut HashMap<(String, String), String>,
) {
    let webhooks = ctx.webhooks.state();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let uids: HashSet<String> = webhooks.iter().filter_map(|w| w.metadata.uid.clone()).collect();
    known.retain(|uid, _| uids.contains(uid));
    // Aggregates of Webhooks that are gone, or were re-created under their name, start again.
    let mut present: HashMap<String, HashSet<String>> = HashMap::new();
    for w in &webhooks {
        let ns = w.namespace().unwrap_or_default();
        let key = crate::memory::key(&ns, &w.spec.integration);
        let uid = w.metadata.uid.clone().unwrap_or_default();
        let name = w.name_any();
        if names
            .insert((key.clone(), name.clone()), uid.clone())
            .is_some_and(|old| old != uid)
        {
            present.entry(key.clone()).or_default();
        } else {
            present.entry(key).or_default().insert(name);
        }
    }
    names.retain(|(key, name), _| present.get(key).is_some_and(|p| p.contains(name)));
    for key in ctx.fleets.keys() {
        let p = present.get(&key);
        ctx.fleets
            .retain_aggregates(&key, |n| p.is_some_and(|p| p.contains(n)));
    }

    let mut writes = Vec::new();
    let mut paused_now: HashMap<(String, String), i64> = HashMap::new();
    for w in &webhooks {
        if w.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let (Some(uid), Some(ns)) = (w.metadata.uid.clone(), w.namespace()) else {
            continue;
        };
        let name = w.name_any();
        let key = crate::memory::key(&ns, &w.spec.integration);
        let (has_fleet, per_webhook, suspended) = match ctx
            .integrations
            .get(&ObjectRef::new(&w.spec.integration).within(&ns))
        {
            None => (false, None, false),
            Some(i) => match &i.0 {
                Ok(i) => (
                    i.spec.webhooks.is_some(),
                    i.spec.webhooks.as_ref().and_then(|s| s.per_webhook.clone()),
                    i.spec.suspend && !i.spec.paused,
                ),
                // A malformed Integration has its own condition; its Webhooks wait.
                Err(_) => continue,
            },
        };
        let decided = if has_fleet { ctx.fleets.decided(&key) } else { None };
        let fleet = if has_fleet {
            Fleet::of(decided.as_deref().and_then(|d| d.get(&name)), suspended)
        } else {
            Fleet::Missing
        };
        let k = known.entry(uid.clone()).or_insert_with(|| Known {
            base: Base::of(w.status.as_ref()),
            last: None,
        });
        let old = k
            .last
            .as_ref()
            .map(|(s, _)| s.clone())
            .or_else(|| w.status.clone())
            .unwrap_or_default();
        let mut agg = if has_fleet {
            ctx.fleets.aggregate(&key, &name)
        } else {
            None
        };
        // Auto-pause (or resume) from the reports and the Webhook's own status, as last written.
        let rule = WebhookLimits::effective(per_webhook.as_ref(), w.spec.limits.as_ref()).auto_pause;
        let (paused, change) = pause(w, agg.as_ref(), &rule, &old, &now);
        if change == PauseChange::Resumed {
            // What failed before the resume does not count towards the next pause.
            ctx.fleets.reset_run(&key, &name);
            agg = ctx.fleets.aggregate(&key, &name);
        }
        let Some(new) = status(w, fleet, &k.base, agg.as_ref(), &paused, &old, &now) else {
            continue;
        };
        if let Some(r) = paused_reason(&new) {
            *paused_now.entry((key.clone(), r.to_owned())).or_insert(0) += 1;
        }
        let since = k.last.as_ref().map(|(_, at)| at.elapsed());
        let (state_every, counts_every) = (ctx.config.webhook_status_every, ctx.config.webhook_counts_every);
        if may_write(&old, &new, since, state_every, counts_every) {
            let was = old.auto_paused.is_some();
            let state = state_changed(&old, &new);
            writes.push((state, (ns, name, uid, new, was, w.object_ref(&()))));
        }
    }
    ctx.metrics.webhooks_paused(&paused_now);
    let writes = plan(writes, WRITES_PER_PASS);
    if writes.is_empty() {
        return;
    }
    let params = PatchParams {
        field_manager: Some(ctx.config.field_manager.clone()),
        ..PatchParams::default()
    };
    let params = &params;
    // Each write is accounted as it completes (its time is when the next one may follow).
    let mut done = futures::stream::iter(writes)
        .map(|(ns, name, uid, new, was, regarding)| async move {
            let api: Api<Webhook> = Api::namespaced(ctx.client.clone(), &ns);
            // A merge patch removes only what it sets to null.
            let mut status = serde_json::to_value(&new).unwrap_or_default();
            for (field, absent) in [
                ("lastFailure", new.last_failure.is_none()),
                ("lastSuccessTime", new.last_success_time.is_none()),
                ("destinationHost", new.destination_host.is_none()),
                ("autoPaused", new.auto_paused.is_none()),
            ] {
                if absent {
                    status[field] = serde_json::Value::Null;
                }
            }
            let body = serde_json::json!({ "status": status });
            let r = api.patch_status(&name, params, &Patch::Merge(&body)).await;
            (name, uid, new, was, regarding, r)
        })
        .buffer_unordered(WRITES_IN_FLIGHT);
    while let Some((name, uid, new, was, regarding, r)) = done.next().await {
        match r {
            Ok(_) => {
                ctx.metrics.write("WebhookStatus");
                debug!(webhook = %name, "Webhook status written");
                announce(ctx, &name, was, &new, &regarding).await;
                if let Some(k) = known.get_mut(&uid) {
                    k.last = Some((new, Instant::now()));
                }
            }
            // Deleted meanwhile, or the API server is away: the next pass tries again.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => warn!(webhook = %name, error = %e, "writing a Webhook status"),
        }
    }
}

/// The writes of one pass, each with whether its state changed (not only counts and timestamps): the state
/// changes first (a Webhook that starts failing, is paused or resumed is not held behind count-only writes),
/// then the others, each group in the order found; at most `budget`.
fn plan<T>(mut writes: Vec<(bool, T)>, budget: usize) -> Vec<T> {
    // A stable sort: the order found is kept within each group.
    writes.sort_by_key(|(state, _)| !*state);
    writes.into_iter().take(budget).map(|(_, w)| w).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_writes_state_changes_first_and_at_most_its_budget() {
        let writes = vec![
            (false, "c1"),
            (true, "s1"),
            (false, "c2"),
            (true, "s2"),
            (false, "c3"),
        ];
        assert_eq!(plan(writes.clone(), 10), ["s1", "s2", "c1", "c2", "c3"]);
        assert_eq!(plan(writes.clone(), 3), ["s1", "s2", "c1"]);
        assert_eq!(plan(writes, 1), ["s1"]);
        // Thousands of count-only writes leave the rest for the next passes.
        let many: Vec<(bool, usize)> = (0..10_000).map(|i| (i == 9_999, i)).collect();
        let first = plan(many, WRITES_PER_PASS);
        assert_eq!(first.len(), WRITES_PER_PASS);
        assert_eq!(first[0], 9_999, "the one state change goes first");
        assert_eq!(first[1..], (0..WRITES_PER_PASS - 1).collect::<Vec<_>>()[..]);
    }
}
