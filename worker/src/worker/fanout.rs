//! With Webhooks: one message, many deliveries. A fresh message goes to every Webhook it matches
//! (event name and headers, `webhooks::Index`); a copy that came back through the retry ladder
//! (`H_WEBHOOK`) goes to its Webhook alone, with its attempt count. Each Webhook's outcome has its
//! own fate (`fate::decide`), and `settlement` stores the copies and acks the original only once
//! every copy is delivered or confirmed stored. One Webhook's trouble stays its own: a copy that finds
//! its Webhook paused, its breaker open, at its in-flight cap (`throttled`) or without a rate-limit
//! token (`rate_limited`) is set aside on its retry path without spending an attempt, and the worker
//! goes on with the others (it never waits on one Webhook's share); a 410 defers the copy (reported
//! as failure kind `gone`, on which the operator pauses that Webhook alone); a panic defers it; a
//! deleted Webhook's copies go to the dead letters (`webhook_deleted`).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use hookfleet_crds::contract::webhooks::{FailureNote, webhook_id};
use hookfleet_crds::integration::Unmatched;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use rand::Rng;
use tracing::{Instrument, error, info, info_span, warn};

use super::delivery::original_routing_key;
use super::fate::{self, Fate, Limits, Store};
use super::settle::Settle;
use super::settlement::{Accounted, Copy, Settler, settled};
use super::shared::Worker;
use crate::breaker::{Admit, Transition};
use crate::message::{self, Failure, H_WEBHOOK, Meta, header_str};
use crate::outcome::Outcome;
use crate::webhooks::Hook;
use crate::webhooks::report::Seen;

/// How long a paused Webhook's copy waits before it is looked at again (at most the backoff's
/// longest delay, rounded to a rung of the ladder).
const PAUSED_RECHECK: Duration = Duration::from_secs(10);
/// About how long a copy set aside at its Webhook's in-flight cap waits (a request's time or so;
/// spread over up to twice that).
const THROTTLED_RECHECK: Duration = Duration::from_secs(1);

/// An attempt, or why the copy was set aside without one (reason, about how long).
type Tried = Result<Outcome, (&'static str, Duration)>;

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
        let deferred_in = |reason, delay: Duration| {
            Fate::Store(Store::Defer {
                attempts: meta.attempts,
                next_in: self.cfg.backoff.bucket(delay.min(self.cfg.backoff.max)),
                reason,
            })
        };
        let deferred = |reason| deferred_in(reason, PAUSED_RECHECK);
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
                let tried = AssertUnwindSafe(self.attempt_hook(&hook, d, body, meta, &mut head))
                    .catch_unwind()
                    .instrument(span.clone())
                    .await
                    .unwrap_or(Ok(Outcome::Panicked));
                let fate = match tried {
                    // Set aside at its cap or for want of a token: spread over up to twice the wait.
                    Err((reason, about)) => {
                        if let Some(hooks) = &self.hooks {
                            hooks.set_aside.record(&hook.name);
                        }
                        let spread = about.mul_f64(1.0 + rand::rng().random_range(0.0..1.0));
                        return Copy {
                            webhook: hook.name.clone(),
                            fate: deferred_in(reason, spread),
                        };
                    }
                    Ok(Outcome::Panicked) => {
                        span.in_scope(|| error!("delivery to the webhook panicked; its copy is deferred"));
                        deferred("panic")
                    }
                    // 410: this Webhook's endpoint is gone, not the message: the copy is kept (deferred,
                    // no attempt spent) and reported as kind `gone`, on which the operator pauses this
                    // Webhook alone; the fleet goes on.
                    Ok(Outcome::Gone) => {
                        self.tally_gone(&hook, &head);
                        return Copy {
                            webhook: hook.name.clone(),
                            fate: deferred("gone"),
                        };
                    }
                    Ok(o) => self.decide(o, meta),
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

    /// Renders and attempts one Webhook's delivery, within the worker's bound on requests in flight;
    /// `Err` when the copy is set aside without an attempt (its in-flight cap, its rate limit).
    async fn attempt_hook(
        &self,
        hook: &Hook,
        d: &Delivery,
        message: &Bytes,
        meta: &Meta,
        head: &mut Vec<u8>,
    ) -> Tried {
        let target = hook.target.as_ref().expect("attempted only when built");
        let id = webhook_id(&meta.id, &hook.name);
        let body = match Self::body(target, d, message, &id) {
            Ok(b) => b,
            Err(o) => return Ok(o),
        };
        let admit = hook.breaker.admit();
        if let Admit::Defer(remaining) = admit {
            // Spread over half a cooldown, as with a single destination.
            return Ok(Outcome::Deferred {
                delay: remaining.mul_f64(1.0 + rand::rng().random_range(0.0..0.5)),
            });
        }
        let hooks = self.hooks.as_ref().expect("with Webhooks");
        // Its own share first, never waited for: at its cap the copy is set aside and the worker goes
        // on with the other Webhooks' copies (so one Webhook never holds the worker's slots or fds).
        let Ok(own) = hook.in_flight.try_acquire() else {
            return Err(("throttled", THROTTLED_RECHECK));
        };
        // Its adaptive throttle, below the cap while its endpoint fails more than it succeeds.
        let pass = match &hook.throttle {
            Some(t) => match t.try_acquire() {
                Some(p) => Some(p),
                None => return Err(("throttled", THROTTLED_RECHECK)),
            },
            None => None,
        };
        if let Some(rate) = &hook.rate
            && let Err(wait) = rate.try_take().await
        {
            return Err(("rate_limited", wait.max(THROTTLED_RECHECK)));
        }
        // Then one of the worker's request slots (bounded by its concurrency, shared fairly).
        let permit = hooks.requests.acquire().await.expect("never closed");
        self.metrics.in_flight.inc();
        let outcome = self.attempt(target, d, &id, body, Some(head)).await;
        self.metrics.in_flight.dec();
        drop((permit, own, pass));
        let healthy = !matches!(outcome, Outcome::Retry { .. } | Outcome::Gone);
        if let Some(t) = &hook.throttle
            && let Some(limit) = t.record(healthy)
        {
            info!(limit, "webhook adaptive throttle: requests allowed in flight");
        }
        match hook.breaker.record(healthy, admit == Admit::Probe) {
            Some(Transition::Opened) => warn!(
                threshold = self.cfg.circuit_breaker.0,
                cooldown = ?self.cfg.circuit_breaker.1,
                "webhook circuit breaker opened: deferring its copies"
            ),
            Some(Transition::Closed) => info!("webhook circuit breaker closed: the endpoint recovered"),
            None => {}
        }
        Ok(outcome)
    }

    /// A 410 from `hook`, for its status: a failure of kind `gone` (the operator pauses it).
    fn tally_gone(&self, hook: &Hook, head: &[u8]) {
        let Some(hooks) = &self.hooks else { return };
        let now = message::now_ms();
        let note = FailureNote {
            at_ms: now,
            status: Some(410),
            kind: "gone".into(),
            excerpt: hookfleet_crds::contract::webhooks::excerpt(
                head,
                hook.secrets.iter().map(String::as_str),
            ),
        };
        hooks.tallies.record(
            &hook.name,
            hook.generation,
            now,
            Seen::Failed { note, dead: false },
        );
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::{Arc, Mutex};

    use axum::extract::Path;
    use axum::http::{HeaderMap, StatusCode};
    use hookfleet_crds::contract::webhooks::{Entry, Snapshot};
    use hookfleet_crds::integration::Unmatched;
    use lapin::types::{AMQPValue, FieldTable, LongString};

    use super::*;
    use crate::config::{Config, WebhooksMode};
    use crate::message::{H_ATTEMPTS, H_DEAD_REASON, H_LAST_ERROR, header_int};
    use crate::metrics::Metrics;
    use crate::worker::memory::{Memory, delivery};
    use crate::worker::settle::PublishError;

    /// One loopback server; `/<name>` answers what `status` says for that name (200 by default),
    /// and keeps every request's path and headers.
    struct Sinks {
        base: String,
        status: Arc<Mutex<HashMap<String, u16>>>,
        got: Arc<Mutex<Vec<(String, HeaderMap)>>>,
        /// Per name: how long it takes to answer (ms), and (requests in flight, the most at once).
        slow: Arc<Mutex<HashMap<String, u64>>>,
        in_flight: Arc<Mutex<HashMap<String, (usize, usize)>>>,
    }

    impl Sinks {
        async fn start() -> Self {
            let status: Arc<Mutex<HashMap<String, u16>>> = Arc::default();
            let got: Arc<Mutex<Vec<(String, HeaderMap)>>> = Arc::default();
            let slow: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
            let in_flight: Arc<Mutex<HashMap<String, (usize, usize)>>> = Arc::default();
            let (s, g, sl, f) = (status.clone(), got.clone(), slow.clone(), in_flight.clone());
            let app = axum::Router::new().route(
                "/{name}",
                axum::routing::post(move |Path(name): Path<String>, headers: HeaderMap| {
                    let (s, g, sl, f) = (s.clone(), g.clone(), sl.clone(), f.clone());
                    async move {
                        g.lock().unwrap().push((name.clone(), headers));
                        {
                            let mut f = f.lock().unwrap();
                            let e = f.entry(name.clone()).or_default();
                            e.0 += 1;
                            e.1 = e.1.max(e.0);
                        }
                        let delay = sl.lock().unwrap().get(&name).copied().unwrap_or(0);
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        f.lock().unwrap().get_mut(&name).unwrap().0 -= 1;
                        let code = s.lock().unwrap().get(&name).copied().unwrap_or(200);
                        (StatusCode::from_u16(code).unwrap(), "bad key s3cr3t-A here")
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            Self {
                base,
                status,
                got,
                slow,
                in_flight,
            }
        }

        fn peak(&self, name: &str) -> usize {
            self.in_flight.lock().unwrap().get(name).map_or(0, |e| e.1)
        }

        fn answer(&self, name: &str, status: u16) {
            self.status.lock().unwrap().insert(name.into(), status);
        }

        /// Requests per path.
        fn hits(&self, name: &str) -> Vec<HeaderMap> {
            let got = self.got.lock().unwrap();
            got.iter()
                .filter(|(n, _)| n == name)
                .map(|(_, h)| h.clone())
                .collect()
        }

        fn total(&self) -> usize {
            self.got.lock().unwrap().len()
        }

        fn entry(&self, name: &str, events: &[&str]) -> Entry {
            let url = serde_json::json!({"url": format!("{}/{name}", self.base)});
            crate::webhooks::entry(name, events, url, &[])
        }
    }

    fn config(unmatched: Unmatched) -> Config {
        Config::for_tests(
            None,
            Some(WebhooksMode {
                secret: "fleet-webhooks".into(),
                namespace: "ns".into(),
                event_name_header: None,
                unmatched,
            }),
        )
    }

    fn worker(unmatched: Unmatched, hooks: Vec<Entry>) -> Arc<Worker> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let w = Worker::new(config(unmatched), Arc::new(Metrics::new(""))).unwrap();
        load(&w, hooks);
        w
    }

    fn load(w: &Worker, hooks: Vec<Entry>) {
        let live = w.webhooks().unwrap();
        let previous = live.current();
        let builder = &w.hooks.as_ref().unwrap().builder;
        let loaded = builder.build(&Snapshot { webhooks: hooks }, "1", previous.as_deref());
        assert_eq!(loaded.built(), loaded.hooks.len(), "every entry builds");
        w.webhooks().unwrap().swap(loaded);
    }

    async fn deliver(w: &Worker, broker: &Memory, d: Delivery) {
        w.deliver(broker, d, Accounted::new(w.metrics.clone())).await;
        assert_eq!(w.metrics.unsettled.get(), 0, "settled once");
        assert_eq!(
            w.metrics.consumed.get(),
            settled_total(&w.metrics),
            "each message recorded once"
        );
    }

    fn settled_total(m: &Metrics) -> u64 {
        [
            "delivered",
            "retried",
            "dead_lettered",
            "handed_back",
            "unmatched",
        ]
        .iter()
        .map(|f| m.settled.get_or_create(&vec![("fate", *f)]).get())
        .sum()
    }

    fn fate_count(m: &Metrics, fate: &'static str) -> u64 {
        m.settled.get_or_create(&vec![("fate", fate)]).get()
    }

    fn deliveries(m: &Metrics, result: &'static str, reason: &'static str) -> u64 {
        m.deliveries
            .get_or_create(&vec![("result", result), ("reason", reason)])
            .get()
    }

    /// A copy for `webhook` with `attempts` made (as it comes back from the retry ladder).
    fn copy_for(tag: u64, webhook: &str, attempts: i64) -> Delivery {
        let mut d = delivery(tag, b"{}");
        let mut h = FieldTable::default();
        h.insert(H_ATTEMPTS.into(), AMQPValue::LongLongInt(attempts));
        h.insert(
            H_WEBHOOK.into(),
            AMQPValue::LongString(LongString::from(webhook.as_bytes().to_vec())),
        );
        d.properties = d.properties.clone().with_headers(h);
        d
    }

    fn webhook_of(props: &lapin::BasicProperties) -> Option<String> {
        header_str(props.headers().as_ref(), H_WEBHOOK)
    }

    #[tokio::test]
    async fn three_webhooks_one_503_one_retry_copy_for_it_then_the_ack() {
        let sinks = Sinks::start().await;
        sinks.answer("b", 503);
        let hooks = vec![
            sinks.entry("a", &["orders"]),
            sinks.entry("b", &["orders.created"]),
            sinks.entry("c", &[""]),
            sinks.entry("d", &["invoices"]),
        ];
        let w = worker(Unmatched::Ack, hooks);
        let broker = Memory::default();
        deliver(&w, &broker, delivery(1, b"{}")).await;
        assert_eq!(
            (
                sinks.hits("a").len(),
                sinks.hits("b").len(),
                sinks.hits("c").len()
            ),
            (1, 1, 1)
        );
        assert!(sinks.hits("d").is_empty(), "not matched");
        let delay = format!(
            "publish orders.delay.{}ms",
            w.cfg.backoff.bucket(Duration::from_secs(1)).as_millis()
        );
        assert_eq!(
            broker.log(),
            [delay.as_str(), "ack 1"],
            "the copy confirmed, then the ack"
        );
        let (_, props) = &broker.published()[0];
        assert_eq!(webhook_of(props).as_deref(), Some("b"));
        let h = props.headers().as_ref();
        assert_eq!(header_int(h, H_ATTEMPTS), Some(1));
        assert_eq!(header_str(h, H_LAST_ERROR).as_deref(), Some("http_status"));
        assert_eq!(fate_count(&w.metrics, "retried"), 1, "the worst copy's fate");
        assert_eq!(deliveries(&w.metrics, "delivered", "ok"), 2);
        assert_eq!(deliveries(&w.metrics, "retried", "http_status"), 1);
        // The report: b failed once with the excerpt of its answer, a and c delivered.
        let report = w.hooks.as_ref().unwrap().tallies.take("w", 1).unwrap();
        assert_eq!(report.webhooks["a"].delivered, 1);
        let b = &report.webhooks["b"];
        assert_eq!((b.failed, b.consecutive_failures), (1, 1));
        let note = b.last_failure.as_ref().unwrap();
        assert_eq!((note.status, note.kind.as_str()), (Some(503), "http_status"));
        assert_eq!(note.excerpt.as_deref(), Some("bad key s3cr3t-A here"));
    }

    #[tokio::test]
    async fn a_copy_not_stored_hands_the_original_back() {
        let sinks = Sinks::start().await;
        sinks.answer("b", 503);
        let w = worker(
            Unmatched::Ack,
            vec![sinks.entry("a", &[""]), sinks.entry("b", &[""])],
        );
        let broker = Memory::failing_publish(PublishError::Refused);
        deliver(&w, &broker, delivery(1, b"{}")).await;
        let delay = format!(
            "publish orders.delay.{}ms unconfirmed",
            w.cfg.backoff.bucket(Duration::from_secs(1)).as_millis()
        );
        assert_eq!(broker.log(), [delay.as_str(), "publish_failed"], "never acked");
        assert_eq!(fate_count(&w.metrics, "handed_back"), 1);
        assert_eq!(w.metrics.publish_failures.get(), 1);
        assert_eq!(deliveries(&w.metrics, "handed_back", "publish_failed"), 1);
    }

    #[tokio::test]
    async fn a_retry_copy_goes_to_its_webhook_alone_with_its_attempts() {
        let sinks = Sinks::start().await;
        sinks.answer("b", 503);
        let w = worker(
            Unmatched::Ack,
            vec![sinks.entry("a", &[""]), sinks.entry("b", &[""])],
        );
        let broker = Memory::default();
        // Its third attempt (of 3): the dead letters, naming b.
        deliver(&w, &broker, copy_for(1, "b", 2)).await;
        assert_eq!(sinks.hits("a").len(), 0, "not to a");
        assert_eq!(sinks.hits("b").len(), 1);
        assert_eq!(broker.log(), ["publish orders.dead", "ack 1"]);
        let (_, props) = &broker.published()[0];
        assert_eq!(webhook_of(props).as_deref(), Some("b"));
        let h = props.headers().as_ref();
        assert_eq!(header_int(h, H_ATTEMPTS), Some(3));
        assert_eq!(
            header_str(h, H_DEAD_REASON).as_deref(),
            Some("attempts_exhausted")
        );
        assert_eq!(fate_count(&w.metrics, "dead_lettered"), 1);
        // Delivered when b is back: acked, nothing stored.
        sinks.answer("b", 200);
        deliver(&w, &broker, copy_for(2, "b", 1)).await;
        assert_eq!(broker.log()[2..], ["ack 2"]);
        assert_eq!(sinks.hits("a").len(), 0);
    }

    #[tokio::test]
    async fn a_paused_webhook_gets_a_deferred_copy_without_an_attempt() {
        let sinks = Sinks::start().await;
        let mut paused = sinks.entry("b", &[""]);
        paused.paused = true;
        let w = worker(Unmatched::Ack, vec![sinks.entry("a", &[""]), paused.clone()]);
        let broker = Memory::default();
        deliver(&w, &broker, delivery(1, b"{}")).await;
        assert_eq!((sinks.hits("a").len(), sinks.hits("b").len()), (1, 0));
        let delay = format!(
            "publish orders.delay.{}ms",
            w.cfg.backoff.bucket(PAUSED_RECHECK).as_millis()
        );
        assert_eq!(broker.log(), [delay.as_str(), "ack 1"]);
        let (_, props) = &broker.published()[0];
        assert_eq!(webhook_of(props).as_deref(), Some("b"));
        let h = props.headers().as_ref();
        assert_eq!(header_str(h, H_LAST_ERROR).as_deref(), Some("paused"));
        assert_eq!(header_int(h, H_ATTEMPTS), Some(0), "no attempt spent");
        assert_eq!(deliveries(&w.metrics, "deferred", "paused"), 1);
        // Still paused when its copy comes back: deferred again, attempts kept.
        deliver(&w, &broker, copy_for(2, "b", 0)).await;
        assert_eq!(broker.log()[2..], [delay.as_str(), "ack 2"]);
        assert_eq!(sinks.hits("b").len(), 0);
        // Resumed: delivered.
        paused.paused = false;
        load(&w, vec![sinks.entry("a", &[""]), paused]);
        deliver(&w, &broker, copy_for(3, "b", 0)).await;
        assert_eq!(sinks.hits("b").len(), 1);
        assert_eq!(broker.log()[4..], ["ack 3"]);
    }

    #[tokio::test]
    async fn a_failing_webhook_s_breaker_defers_its_copies_the_others_are_delivered() {
        let sinks = Sinks::start().await;
        sinks.answer("b", 503);
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut cfg = config(Unmatched::Ack);
        cfg.circuit_breaker = (2, Duration::from_secs(10));
        let w = Worker::new(cfg, Arc::new(Metrics::new(""))).unwrap();
        load(&w, vec![sinks.entry("a", &[""]), sinks.entry("b", &[""])]);
        let broker = Memory::default();
        for tag in 1..=4 {
            deliver(&w, &broker, delivery(tag, b"{}")).await;
        }
        assert_eq!(sinks.hits("a").len(), 4, "a is not held back");
        assert_eq!(sinks.hits("b").len(), 2, "two failures open b's breaker");
        let reasons: Vec<String> = broker
            .published()
            .iter()
            .map(|(_, p)| header_str(p.headers().as_ref(), H_LAST_ERROR).unwrap())
            .collect();
        assert_eq!(
            reasons,
            ["http_status", "http_status", "circuit_open", "circuit_open"]
        );
        let attempts: Vec<i64> = broker
            .published()
            .iter()
            .map(|(_, p)| header_int(p.headers().as_ref(), H_ATTEMPTS).unwrap())
            .collect();
        assert_eq!(attempts, [1, 1, 0, 0], "a deferral spends no attempt");
        assert_eq!(deliveries(&w.metrics, "deferred", "circuit_open"), 2);
        // A new snapshot with b unchanged keeps its open breaker.
        load(&w, vec![sinks.entry("a", &["x"]), sinks.entry("b", &[""])]);
        deliver(&w, &broker, delivery(5, b"{}")).await;
        assert_eq!(sinks.hits("b").len(), 2);
    }

    /// A slow endpoint holds at most half the request slots: with concurrency 4, at most 2 of its
    /// requests at once (a third copy is set aside, `throttled`) while another Webhook's messages go
    /// through beside it.
    #[tokio::test]
    async fn a_slow_webhook_holds_at_most_half_the_request_slots() {
        let sinks = Sinks::start().await;
        sinks.slow.lock().unwrap().insert("slow".into(), 300);
        sinks.slow.lock().unwrap().insert("fast".into(), 100);
        let hooks = vec![
            sinks.entry("slow", &["orders"]),
            sinks.entry("fast", &["invoices"]),
        ];
        let w = worker(Unmatched::Ack, hooks);
        let broker = Arc::new(Memory::default());
        let mut tasks = Vec::new();
        for tag in 1..=6u64 {
            let (w, broker) = (w.clone(), broker.clone());
            let mut d = delivery(tag, b"{}");
            if tag > 3 {
                d.routing_key = "invoices.paid".into();
            }
            tasks.push(tokio::spawn(async move {
                w.deliver(&*broker, d, Accounted::new(w.metrics.clone())).await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let (slow, fast) = (sinks.hits("slow").len(), sinks.hits("fast").len());
        assert_eq!(sinks.peak("slow"), 2, "half of 4");
        assert!(fast >= 2, "the fast one got the other slots");
        assert_eq!(slow, 2, "the third is set aside, not waiting");
        assert_eq!(
            deliveries(&w.metrics, "deferred", "throttled") as usize,
            6 - slow - fast
        );
        assert_eq!(
            fate_count(&w.metrics, "delivered") as usize,
            slow + fast,
            "the others"
        );
    }

    #[tokio::test]
    async fn a_copy_for_a_deleted_webhook_is_dead_lettered() {
        let sinks = Sinks::start().await;
        let w = worker(Unmatched::Ack, vec![sinks.entry("a", &[""])]);
        let broker = Memory::default();
        deliver(&w, &broker, copy_for(1, "gone-one", 1)).await;
        assert_eq!(sinks.total(), 0);
        assert_eq!(broker.log(), ["publish orders.dead", "ack 1"]);
        let (_, props) = &broker.published()[0];
        assert_eq!(webhook_of(props).as_deref(), Some("gone-one"));
        assert_eq!(
            header_str(props.headers().as_ref(), H_DEAD_REASON).as_deref(),
            Some("webhook_deleted")
        );
        assert_eq!(deliveries(&w.metrics, "dead_lettered", "webhook_deleted"), 1);
    }

    #[tokio::test]
    async fn unmatched_is_acked_and_counted_or_dead_lettered() {
        let sinks = Sinks::start().await;
        let w = worker(Unmatched::Ack, vec![sinks.entry("a", &["invoices"])]);
        let broker = Memory::default();
        deliver(&w, &broker, delivery(1, b"{}")).await;
        assert_eq!(broker.log(), ["ack 1"]);
        assert_eq!(w.metrics.unmatched.get(), 1);
        assert_eq!(fate_count(&w.metrics, "unmatched"), 1);

        let w = worker(Unmatched::DeadLetter, vec![sinks.entry("a", &["invoices"])]);
        let broker = Memory::default();
        deliver(&w, &broker, delivery(1, b"{}")).await;
        assert_eq!(broker.log(), ["publish orders.dead", "ack 1"]);
        let (_, props) = &broker.published()[0];
        assert_eq!(webhook_of(props), None);
        assert_eq!(
            header_str(props.headers().as_ref(), H_DEAD_REASON).as_deref(),
            Some("unmatched")
        );
        assert_eq!(fate_count(&w.metrics, "dead_lettered"), 1);
        assert_eq!(sinks.total(), 0);
    }

    #[tokio::test]
    async fn a_410_defers_that_webhook_s_copy_reports_gone_and_the_fleet_goes_on() {
        let sinks = Sinks::start().await;
        sinks.answer("b", 410);
        let w = worker(
            Unmatched::Ack,
            vec![sinks.entry("a", &[""]), sinks.entry("b", &[""])],
        );
        let broker = Memory::default();
        deliver(&w, &broker, copy_for(1, "b", 2)).await;
        let delay = format!(
            "publish orders.delay.{}ms",
            w.cfg.backoff.bucket(PAUSED_RECHECK).as_millis()
        );
        assert_eq!(broker.log(), [delay.as_str(), "ack 1"], "kept, not dead-lettered");
        let h = broker.published()[0].1.headers().clone();
        assert_eq!(header_str(h.as_ref(), H_LAST_ERROR).as_deref(), Some("gone"));
        assert_eq!(header_int(h.as_ref(), H_ATTEMPTS), Some(2), "no attempt spent");
        assert_eq!(webhook_of(&broker.published()[0].1).as_deref(), Some("b"));
        assert!(!w.gone.is_set(), "the worker does not stop");
        deliver(&w, &broker, delivery(2, b"{}")).await;
        assert_eq!(sinks.hits("a").len(), 1);
        // Reported as a failure of kind `gone` (the operator pauses b on it).
        let report = w.hooks.as_ref().unwrap().tallies.take("w", 1).unwrap();
        let b = &report.webhooks["b"];
        assert_eq!((b.failed, b.dead_lettered, b.consecutive_failures), (2, 0, 2));
        let note = b.last_failure.as_ref().unwrap();
        assert_eq!((note.status, note.kind.as_str()), (Some(410), "gone"));
    }

    /// At its in-flight cap a Webhook's copies are set aside (no waiting, no attempt spent) while the
    /// other Webhook's are delivered beside it.
    #[tokio::test]
    async fn at_its_in_flight_cap_a_webhook_s_copies_are_set_aside_throttled() {
        let sinks = Sinks::start().await;
        sinks.slow.lock().unwrap().insert("slow".into(), 300);
        let mut slow = sinks.entry("slow", &[""]);
        slow.max_in_flight = Some(1);
        let w = worker(Unmatched::Ack, vec![slow, sinks.entry("fast", &[""])]);
        let broker = Arc::new(Memory::default());
        let mut tasks = Vec::new();
        for tag in 1..=3u64 {
            let (w, broker) = (w.clone(), broker.clone());
            tasks.push(tokio::spawn(async move {
                w.deliver(&*broker, delivery(tag, b"{}"), Accounted::new(w.metrics.clone()))
                    .await;
            }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(sinks.hits("fast").len(), 3, "the other Webhook is not held back");
        assert_eq!(sinks.hits("slow").len(), 1, "one at a time");
        assert_eq!(sinks.peak("slow"), 1);
        let set_aside: Vec<(Option<String>, Option<i64>)> = broker
            .published()
            .iter()
            .map(|(_, p)| {
                let h = p.headers().as_ref();
                (header_str(h, H_LAST_ERROR), header_int(h, H_ATTEMPTS))
            })
            .collect();
        assert_eq!(
            set_aside,
            [
                (Some("throttled".into()), Some(0)),
                (Some("throttled".into()), Some(0))
            ]
        );
        assert!(
            broker
                .published()
                .iter()
                .all(|(_, p)| webhook_of(p).as_deref() == Some("slow"))
        );
        assert_eq!(deliveries(&w.metrics, "deferred", "throttled"), 2);
        assert_eq!(w.metrics.unsettled.get(), 0);
        // Its own series say so (throttled, 2 set aside); the other Webhook has none.
        w.metric_series();
        let text = w.metrics.encode();
        assert!(
            text.contains(r#"hookfleet_webhook_state{webhook="slow",state="throttled"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"hookfleet_webhook_set_aside{webhook="slow"} 2"#),
            "{text}"
        );
        assert!(!text.contains(r#"webhook="fast""#), "{text}");
        // The next refresh, with nothing set aside since: no longer throttled.
        w.metric_series();
        let text = w.metrics.encode();
        assert!(!text.contains(r#"webhook="slow""#), "{text}");
        assert!(
            text.contains(r#"hookfleet_webhooks_in_state{state="throttled"} 0"#),
            "{text}"
        );
    }

    /// Per-Webhook series only for the Webhooks in trouble: a failing one gets its own (its states, its
    /// run of failures), a paused one its state, a healthy one none, and every state is counted; once
    /// the failing one succeeds again, its series go.
    #[tokio::test]
    async fn only_webhooks_in_trouble_have_series_of_their_own() {
        let sinks = Sinks::start().await;
        sinks.answer("b", 503);
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut cfg = config(Unmatched::Ack);
        cfg.circuit_breaker = (3, Duration::from_secs(10));
        let w = Worker::new(cfg, Arc::new(Metrics::new(""))).unwrap();
        let mut paused = sinks.entry("p", &["never"]);
        paused.paused = true;
        load(&w, vec![sinks.entry("a", &[""]), sinks.entry("b", &[""]), paused]);
        let broker = Memory::default();
        for tag in 1..=2 {
            deliver(&w, &broker, delivery(tag, b"{}")).await;
        }
        w.metric_series();
        let text = w.metrics.encode();
        for series in [
            r#"hookfleet_webhook_state{webhook="b",state="failing"} 1"#,
            r#"hookfleet_webhook_consecutive_failures{webhook="b"} 2"#,
            r#"hookfleet_webhook_state{webhook="p",state="paused"} 1"#,
            r#"hookfleet_webhooks_in_state{state="failing"} 1"#,
            r#"hookfleet_webhooks_in_state{state="paused"} 1"#,
            r#"hookfleet_webhooks_in_state{state="circuit_open"} 0"#,
            "hookfleet_webhooks_unlisted 0",
        ] {
            assert!(text.contains(series), "{series} missing in:\n{text}");
        }
        assert!(
            !text.contains(r#"webhook="a""#),
            "a healthy Webhook has no series: {text}"
        );
        assert!(!text.contains(r#"webhook="b",state="circuit_open""#), "{text}");
        sinks.answer("b", 200);
        deliver(&w, &broker, delivery(3, b"{}")).await;
        w.metric_series();
        let text = w.metrics.encode();
        assert!(
            !text.contains(r#"webhook="b""#),
            "recovered: its series are gone: {text}"
        );
        assert!(
            text.contains(r#"hookfleet_webhooks_in_state{state="failing"} 0"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn without_a_token_a_webhook_s_copy_is_set_aside_rate_limited() {
        let sinks = Sinks::start().await;
        let mut limited = sinks.entry("limited", &[""]);
        limited.rate_limit = Some(hookfleet_crds::webhook::WebhookRateLimit {
            per_second: 1,
            burst: Some(2),
            scope: None,
        });
        let w = worker(Unmatched::Ack, vec![limited, sinks.entry("free", &[""])]);
        let broker = Memory::default();
        for tag in 1..=4 {
            deliver(&w, &broker, delivery(tag, b"{}")).await;
        }
        assert_eq!((sinks.hits("limited").len(), sinks.hits("free").len()), (2, 4));
        let reasons: Vec<Option<String>> = broker
            .published()
            .iter()
            .map(|(_, p)| header_str(p.headers().as_ref(), H_LAST_ERROR))
            .collect();
        assert_eq!(
            reasons,
            [Some("rate_limited".into()), Some("rate_limited".into())]
        );
        assert!(
            broker
                .published()
                .iter()
                .all(|(_, p)| header_int(p.headers().as_ref(), H_ATTEMPTS) == Some(0))
        );
        assert_eq!(deliveries(&w.metrics, "deferred", "rate_limited"), 2);
    }

    /// `scope: fleet`: each worker takes its share of a Webhook's rate limit among the consumers of
    /// the work queue, in the snapshot it builds and, on a change of the count, in the live one.
    #[tokio::test]
    async fn a_fleet_wide_webhook_rate_limit_is_shared_among_the_consumers() {
        let sinks = Sinks::start().await;
        let fleet_wide = |name: &str| {
            let mut e = sinks.entry(name, &[""]);
            e.rate_limit = Some(hookfleet_crds::webhook::WebhookRateLimit {
                per_second: 1,
                burst: Some(8),
                scope: Some(hookfleet_crds::integration::RateLimitScope::Fleet),
            });
            e
        };
        let w = worker(Unmatched::Ack, vec![sinks.entry("free", &["x"])]);
        // 4 consumers: a burst of 8 for the fleet is 2 for this worker.
        assert_eq!(w.share_webhook_limits(4).await, 0, "nothing fleet-wide yet");
        load(&w, vec![fleet_wide("shared"), sinks.entry("free", &["x"])]);
        let broker = Memory::default();
        for tag in 1..=4 {
            deliver(&w, &broker, delivery(tag, b"{}")).await;
        }
        assert_eq!(sinks.hits("shared").len(), 2, "a quarter of the burst");
        assert_eq!(deliveries(&w.metrics, "deferred", "rate_limited"), 2);
        let rate = |w: &Worker| {
            let snapshot = w.webhooks().unwrap().current().unwrap();
            let hook = snapshot.get("shared").unwrap().clone();
            async move { hook.rate.as_ref().unwrap().rate().await }
        };
        assert_eq!(rate(&w).await, (0.25, 2.0));
        // Down to 2 consumers: the live Webhook is reshared (half the rate and burst), once.
        assert_eq!(w.share_webhook_limits(2).await, 1);
        assert_eq!(rate(&w).await, (0.5, 4.0));
        assert_eq!(w.share_webhook_limits(2).await, 0, "same count: nothing to do");
        // A Webhook limited per worker is never shared.
        let mut own = sinks.entry("own", &[""]);
        own.rate_limit = Some(hookfleet_crds::webhook::WebhookRateLimit {
            per_second: 3,
            burst: None,
            scope: None,
        });
        load(&w, vec![fleet_wide("shared"), own]);
        assert_eq!(w.share_webhook_limits(1).await, 1, "only the fleet-wide one");
        let snapshot = w.webhooks().unwrap().current().unwrap();
        assert_eq!(
            snapshot.get("own").unwrap().rate.as_ref().unwrap().rate().await,
            (3.0, 3.0)
        );
    }

    #[tokio::test]
    async fn the_webhook_id_is_per_pair_and_stable_and_secrets_stay_with_their_webhook() {
        let sinks = Sinks::start().await;
        let mut a = sinks.entry("a", &[""]);
        a.destination = serde_json::from_value(serde_json::json!({
            "url": format!("{}/a", sinks.base),
            "headersFrom": [{"name": "X-Api-Key", "secretKeyRef": {"name": "a", "key": "k"}}],
            "auth": {"bearer": {"tokenFrom": {"name": "a", "key": "t"}}},
            "signing": {"secretRef": {"name": "a", "key": "s"}},
        }))
        .unwrap();
        a.secrets = BTreeMap::from([
            ("a/k".into(), "s3cr3t-A".into()),
            ("a/t".into(), "tok-A".into()),
            ("a/s".into(), "sign-A".into()),
        ]);
        let mut b = sinks.entry("b", &[""]);
        b.destination = serde_json::from_value(serde_json::json!({
            "url": format!("{}/b", sinks.base),
            "signing": {"secretRef": {"name": "b", "key": "s"}},
        }))
        .unwrap();
        b.secrets = BTreeMap::from([("b/s".into(), "sign-B".into())]);
        sinks.answer("b", 500);
        let w = worker(Unmatched::Ack, vec![a, b]);
        let broker = Memory::default();
        // The same message twice (a redelivery), then its retry copy for b.
        deliver(&w, &broker, delivery(1, b"{}")).await;
        deliver(&w, &broker, delivery(2, b"{}")).await;
        deliver(&w, &broker, copy_for(3, "b", 1)).await;
        let id = |h: &HeaderMap| h["webhook-id"].to_str().unwrap().to_owned();
        let (ha, hb) = (sinks.hits("a"), sinks.hits("b"));
        assert_eq!(ha.iter().map(id).collect::<Vec<_>>(), ["m-1:a", "m-1:a"]);
        assert_eq!(hb.iter().map(id).collect::<Vec<_>>(), ["m-1:b", "m-1:b", "m-1:b"]);
        // a's request carries a's key, token and signature; b's none of a's secrets.
        assert_eq!(ha[0]["x-api-key"], "s3cr3t-A");
        assert_eq!(ha[0]["authorization"], "Bearer tok-A");
        for h in &hb {
            assert!(h.get("x-api-key").is_none() && h.get("authorization").is_none());
            for (_, v) in h {
                let v = v.to_str().unwrap_or("");
                assert!(
                    !v.contains("s3cr3t-A") && !v.contains("tok-A") && !v.contains("sign-A"),
                    "{v}"
                );
            }
        }
        let verify = |h: &HeaderMap, secret: &str| {
            let signer = crate::signing::Signer::new(&[secret.as_bytes().to_vec()]).unwrap();
            let want = signer.sign(&id(h), h["webhook-timestamp"].to_str().unwrap(), b"{}");
            h["webhook-signature"].to_str().unwrap() == want
        };
        assert!(verify(&ha[0], "sign-A") && !verify(&ha[0], "sign-B"));
        assert!(verify(&hb[0], "sign-B") && !verify(&hb[0], "sign-A"));
        let report = w.hooks.as_ref().unwrap().tallies.take("w", 1).unwrap();
        assert_eq!(report.webhooks["b"].failed, 3);
        assert_eq!(report.webhooks["a"].delivered, 2);
        // An answer quoting a's own secret: scrubbed from a's failure note.
        sinks.answer("a", 500);
        deliver(&w, &broker, copy_for(4, "a", 0)).await;
        let report = w.hooks.as_ref().unwrap().tallies.take("w", 2).unwrap();
        let note = report.webhooks["a"].last_failure.clone().unwrap();
        assert_eq!(note.excerpt.as_deref(), Some("bad key *** here"));
    }
}
