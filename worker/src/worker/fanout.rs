//! With Webhooks: one message, many deliveries. A fresh message goes to every Webhook it matches
//! (event name and headers, `webhooks::Index`); a copy that came back through the retry ladder
//! (`H_WEBHOOK`) goes to its Webhook alone, with its attempt count. Each Webhook's outcome has its
//! own fate (`fate::decide`), and `settlement` stores the copies and acks the original only once
//! every copy is delivered or confirmed stored. One Webhook's trouble stays its own: a 410
//! dead-letters its copy (reason `gone`), a panic defers it, a paused Webhook's copy is deferred
//! without spending an attempt, and a deleted one's copies go to the dead letters
//! (`webhook_deleted`).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use hookfleet_crds::contract::webhooks::{FailureNote, webhook_id};
use hookfleet_crds::integration::Unmatched;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use tracing::{Instrument, error, info_span, warn};

use super::delivery::original_routing_key;
use super::fate::{self, Fate, Limits, Store};
use super::settle::Settle;
use super::settlement::{Accounted, Copy, Settler, settled};
use super::shared::Worker;
use crate::message::{self, Failure, H_WEBHOOK, Meta, header_str};
use crate::outcome::Outcome;
use crate::webhooks::Hook;
use crate::webhooks::report::Seen;

/// How long a paused Webhook's copy waits before it is looked at again (at most the backoff's
/// longest delay, rounded to a rung of the ladder).
const PAUSED_RECHECK: Duration = Duration::from_secs(10);

/// What to do for one Webhook.
enum Job {
    Attempt(Arc<Hook>),
    /// Not attempted, kept for later: paused, or its entry cannot be built.
    Defer(Arc<Hook>, &'static str),
    /// A copy for a Webhook no longer in the snapshot.
    Deleted(String),
}

impl Job {
    fn of(hook: Arc<Hook>) -> Self {
        if hook.paused {
            Job::Defer(hook, "paused")
        } else if hook.target.is_none() {
            Job::Defer(hook, "webhook_invalid")
        } else {
            Job::Attempt(hook)
        }
    }
}

/// A header's value as text (strings; integers and booleans written out), for matching.
fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::Boolean(b) => Some(b.to_string()),
        _ => message::header_int(headers, name).map(|i| i.to_string()),
    }
}

impl Worker {
    /// One message with Webhooks, start to settled.
    pub(super) async fn fan_out(
        &self,
        broker: &impl Settle,
        d: &Delivery,
        body: &Bytes,
        meta: &Meta,
        acct: &mut Accounted,
    ) {
        let hooks = self.hooks.as_ref().expect("fan-out only with Webhooks");
        let Some(snapshot) = hooks.live.current() else {
            // Never consumed before the first snapshot; should it happen, the message goes back.
            error!("no webhooks snapshot loaded; handing the message back");
            let fate = Fate::HandBack {
                reason: "no_snapshot",
                requeue_now: true,
            };
            return self.settler().settle(broker, d, body, meta, fate, acct).await;
        };
        let headers = d.properties.headers().as_ref();
        let jobs: Vec<Job> = match header_str(headers, H_WEBHOOK) {
            Some(name) => match snapshot.get(&name) {
                Some(hook) => vec![Job::of(hook.clone())],
                None => vec![Job::Deleted(name)],
            },
            None => {
                let event = match &hooks.mode.event_name_header {
                    Some(h) => header_text(headers, h).unwrap_or_else(|| original_routing_key(d).to_owned()),
                    None => original_routing_key(d).to_owned(),
                };
                let matched = snapshot.matching(&event, |k| header_text(headers, k));
                if matched.is_empty() {
                    return self.unmatched(broker, d, body, meta, acct).await;
                }
                matched.into_iter().map(Job::of).collect()
            }
        };
        let copies =
            futures::future::join_all(jobs.into_iter().map(|job| self.copy(d, body, meta, job))).await;
        self.settler()
            .settle_copies(broker, d, body, meta, copies, acct)
            .await;
    }

    pub(super) fn settler(&self) -> Settler<'_> {
        Settler {
            metrics: &self.metrics,
            queue: &self.cfg.queue,
            dead_letter_queue: &self.cfg.dead_letter_queue,
            gone: &self.gone,
        }
    }

    async fn unmatched(
        &self,
        broker: &impl Settle,
        d: &Delivery,
        body: &Bytes,
        meta: &Meta,
        acct: &mut Accounted,
    ) {
        let unmatched = self.hooks.as_ref().map(|h| h.mode.unmatched).unwrap_or_default();
        match unmatched {
            Unmatched::Ack => {
                self.metrics.unmatched.inc();
                if broker.ack(d.delivery_tag).await {
                    acct.record_fate(settled::UNMATCHED);
                } else {
                    acct.record_fate(settled::HANDED_BACK);
                }
            }
            Unmatched::DeadLetter => {
                let fate = Fate::Store(Store::DeadLetter {
                    reason: "unmatched",
                    failure: Failure {
                        reason: "unmatched",
                        status: None,
                    },
                    attempts: meta.attempts,
                    detail: None,
                });
                self.settler().settle(broker, d, body, meta, fate, acct).await;
            }
        }
    }

    /// The fate of one Webhook's copy (attempting it when its job says so).
    async fn copy(&self, d: &Delivery, body: &Bytes, meta: &Meta, job: Job) -> Copy {
        let deferred = |reason| {
            Fate::Store(Store::Defer {
                attempts: meta.attempts,
                next_in: self.cfg.backoff.bucket(PAUSED_RECHECK.min(self.cfg.backoff.max)),
                reason,
            })
        };
        match job {
            Job::Deleted(webhook) => {
                warn!(webhook = %webhook, id = %meta.id, "a copy for a webhook no longer configured; dead-lettered");
                Copy {
                    webhook,
                    fate: Fate::Store(Store::DeadLetter {
                        reason: "webhook_deleted",
                        failure: Failure {
                            reason: "webhook_deleted",
                            status: None,
                        },
                        attempts: meta.attempts,
                        detail: None,
                    }),
                }
            }
            Job::Defer(hook, reason) => Copy {
                webhook: hook.name.clone(),
                fate: deferred(reason),
            },
            Job::Attempt(hook) => {
                let span = info_span!("webhook", webhook = %hook.name);
                let mut head = Vec::new();
                let outcome = AssertUnwindSafe(self.attempt_hook(&hook, d, body, meta, &mut head))
                    .catch_unwind()
                    .instrument(span.clone())
                    .await
                    .unwrap_or(Outcome::Panicked);
                let fate = match outcome {
                    Outcome::Panicked => {
                        span.in_scope(|| error!("delivery to the webhook panicked; its copy is deferred"));
                        deferred("panic")
                    }
                    // 410: this Webhook will never take it; the fleet goes on.
                    Outcome::Gone => self.decide(
                        Outcome::Reject {
                            reason: "gone",
                            status: Some(410),
                        },
                        meta,
                    ),
                    o => self.decide(o, meta),
                };
                self.tally(&hook, &fate, &head);
                Copy {
                    webhook: hook.name.clone(),
                    fate,
                }
            }
        }
    }

    fn decide(&self, outcome: Outcome, meta: &Meta) -> Fate {
        let limits = Limits {
            max_attempts: self.cfg.max_attempts,
            backoff: &self.cfg.backoff,
        };
        fate::decide(outcome, meta.attempts + 1, limits, &mut rand::rng())
    }

    /// Renders and attempts one Webhook's delivery, within the worker's bound on requests in flight.
    async fn attempt_hook(
        &self,
        hook: &Hook,
        d: &Delivery,
        message: &Bytes,
        meta: &Meta,
        head: &mut Vec<u8>,
    ) -> Outcome {
        let target = hook.target.as_ref().expect("attempted only when built");
        let id = webhook_id(&meta.id, &hook.name);
        let body = match Self::body(target, d, message, &id) {
            Ok(b) => b,
            Err(o) => return o,
        };
        let hooks = self.hooks.as_ref().expect("with Webhooks");
        let _permit = hooks.requests.acquire().await.expect("never closed");
        self.metrics.in_flight.inc();
        let outcome = self.attempt(target, d, &id, body, Some(head)).await;
        self.metrics.in_flight.dec();
        outcome
    }

    /// What this copy's attempt tells the Webhook's status.
    fn tally(&self, hook: &Hook, fate: &Fate, head: &[u8]) {
        let Some(hooks) = &self.hooks else { return };
        let now = message::now_ms();
        let failed = |failure: &Failure, dead: bool| Seen::Failed {
            note: FailureNote {
                at_ms: now,
                status: failure.status,
                kind: failure.reason.to_owned(),
                excerpt: hookfleet_crds::contract::webhooks::excerpt(
                    head,
                    hook.secrets.iter().map(String::as_str),
                ),
            },
            dead,
        };
        let seen = match fate {
            Fate::Ack { .. } => Seen::Delivered,
            Fate::Store(Store::Retry { failure, .. }) => failed(failure, false),
            Fate::Store(Store::DeadLetter { failure, .. }) => failed(failure, true),
            Fate::Store(Store::Defer { .. }) | Fate::HandBack { .. } | Fate::Stop => return,
        };
        hooks.tallies.record(&hook.name, hook.generation, now, seen);
    }
}
