//! Settlement: the one place that carries out a message's [`Fate`] ([`Settler::settle`]), through
//! the few broker operations it needs ([`Settle`], in `settle`). The ack rule lives here and nowhere
//! else: the original is acked after a 2xx, or after the broker confirmed the copy stored in a delay
//! or dead-letter queue; otherwise it is handed back to the broker, unacked.
//!
//! Every message the consumer yields is accounted for exactly once (see [`Accounted`]), so that
//! `consumed = delivered + retried + dead-lettered + handed back + unsettled` holds on `/metrics`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;
use tracing::{debug, error, info, warn};

use super::fate::{Fate, Store};
use super::gone::GoneLatch;
use super::settle::{PublishError, Settle};
use super::topology;
use crate::message::{self, Failure, Meta};
use crate::metrics::Metrics;

/// The fate names of `hookfleet_messages_settled_total{fate}`.
pub mod settled {
    pub const DELIVERED: &str = "delivered";
    pub const RETRIED: &str = "retried";
    pub const DEAD_LETTERED: &str = "dead_lettered";
    pub const HANDED_BACK: &str = "handed_back";
    /// With Webhooks: no Webhook matched, acked (`--unmatched ack`).
    pub const UNMATCHED: &str = "unmatched";
}

/// A message the consumer yielded, until its fate is recorded. Counted as consumed when created;
/// dropped without a fate (a task that never started because the session ended, or a runtime torn
/// down) it counts as handed back, which is what the broker does with it.
pub struct Accounted {
    metrics: Arc<Metrics>,
    settled: bool,
}

impl Accounted {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        metrics.consumed.inc();
        metrics.unsettled.inc();
        Self {
            metrics,
            settled: false,
        }
    }

    pub fn is_settled(&self) -> bool {
        self.settled
    }

    /// Records the message's fate (once; later calls are ignored) with its delivery result and reason.
    pub fn record(&mut self, fate: &'static str, result: &'static str, reason: &'static str) {
        if self.settled {
            return;
        }
        self.settled = true;
        self.metrics.settled.get_or_create(&vec![("fate", fate)]).inc();
        self.metrics.unsettled.dec();
        self.metrics.delivery(result, reason);
    }
}

impl Accounted {
    /// Records the message's fate only (with Webhooks: each copy's result is counted in
    /// `deliveries_total` on its own).
    pub fn record_fate(&mut self, fate: &'static str) {
        if self.settled {
            return;
        }
        self.settled = true;
        self.metrics.settled.get_or_create(&vec![("fate", fate)]).inc();
        self.metrics.unsettled.dec();
    }
}

impl Drop for Accounted {
    fn drop(&mut self) {
        self.record(settled::HANDED_BACK, "handed_back", "not_started");
    }
}

/// One Webhook's copy of a message, and its fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub webhook: String,
    /// [`Fate::Ack`] (delivered) or [`Fate::Store`].
    pub fate: Fate,
}

/// What the settle site needs besides the broker: where copies go, what it reports to, and the 410
/// latch a [`Fate::Stop`] sets.
pub struct Settler<'a> {
    pub metrics: &'a Metrics,
    /// The work queue, which names the delay queues.
    pub queue: &'a str,
    pub dead_letter_queue: &'a str,
    pub gone: &'a GoneLatch,
}

impl Settler<'_> {
    /// Carries out `fate` for `d` (whose body is `body`): the only place a message is acked, nacked
    /// or left to the broker.
    pub async fn settle(
        &self,
        broker: &impl Settle,
        d: &Delivery,
        body: &[u8],
        meta: &Meta,
        fate: Fate,
        acct: &mut Accounted,
    ) {
        match fate {
            Fate::Ack { status } => {
                if broker.ack(d.delivery_tag).await {
                    debug!(status, "delivered");
                    acct.record(settled::DELIVERED, "delivered", "ok");
                } else {
                    acct.record(settled::HANDED_BACK, "handed_back", "ack_failed");
                }
            }
            Fate::HandBack { reason, requeue_now } => {
                if requeue_now && !broker.requeue(d).await {
                    warn!("nack not sent; the broker requeues the message with the channel");
                }
                acct.record(settled::HANDED_BACK, "handed_back", reason);
            }
            Fate::Stop => {
                self.gone.set(self.metrics);
                acct.record(settled::HANDED_BACK, "handed_back", "gone");
            }
            Fate::Store(store) => {
                let (queue, props) = self.copy(d, meta, &store);
                let acked = match broker.store(d.delivery_tag, &store, &queue, body, props).await {
                    Ok(acked) => acked,
                    Err(e) => {
                        // The original stays unacked: the session ends and closing its connection hands
                        // it back. Nacking it here instead would redeliver it at once on a session that
                        // cannot publish: a requeue loop.
                        if matches!(e, PublishError::Closed) {
                            debug!(queue = &*queue, "session closing; copy not stored");
                        } else {
                            error!(queue = &*queue, error = %e, "copy not stored; handing the message back");
                        }
                        self.metrics.publish_failures.inc();
                        broker.publish_failed();
                        acct.record(settled::HANDED_BACK, "handed_back", e.reason());
                        return;
                    }
                };
                self.stored(store, acked, acct);
            }
        }
    }

    /// With Webhooks: carries out the fate of each Webhook's copy of `d`, then of `d` itself. Every
    /// copy to store is published (concurrently, each naming its Webhook in `H_WEBHOOK`) and
    /// confirmed; only when all are (and the others delivered) is the original acked, counted by
    /// its worst copy (dead_lettered > retried > delivered). A copy not stored hands the original
    /// back: every Webhook gets it again (duplicates, never a loss).
    pub async fn settle_copies(
        &self,
        broker: &impl Settle,
        d: &Delivery,
        body: &[u8],
        meta: &Meta,
        copies: Vec<Copy>,
        acct: &mut Accounted,
    ) {
        let mut worst = settled::DELIVERED;
        let mut stores = Vec::new();
        for c in copies {
            match c.fate {
                Fate::Ack { status } => {
                    debug!(webhook = %c.webhook, status, "delivered");
                    self.metrics.delivery("delivered", "ok");
                }
                Fate::Store(store) => {
                    let (queue, props) = self.copy(d, meta, &store);
                    let props = message::for_webhook(props, &c.webhook);
                    stores.push((c.webhook, store, queue, props));
                }
                // Never decided with Webhooks (a 410 or a panic is that Webhook's alone).
                Fate::HandBack { .. } | Fate::Stop => unreachable!("a copy's fate is an ack or a store"),
            }
        }
        let published = futures::future::join_all(
            stores
                .iter()
                .map(|(_, store, queue, props)| broker.publish_copy(store, queue, body, props.clone())),
        )
        .await;
        let mut failed = None;
        for ((webhook, store, queue, _), r) in stores.into_iter().zip(published) {
            match r {
                Ok(()) => {
                    let (result, fate, reason) = match &store {
                        Store::Retry { failure, .. } => ("retried", settled::RETRIED, failure.reason),
                        Store::Defer { reason, .. } => ("deferred", settled::RETRIED, *reason),
                        Store::DeadLetter { reason, .. } => {
                            ("dead_lettered", settled::DEAD_LETTERED, *reason)
                        }
                    };
                    self.metrics.delivery(result, reason);
                    if fate == settled::DEAD_LETTERED || worst == settled::DELIVERED {
                        worst = fate;
                    }
                    let span = tracing::info_span!("copy", webhook = %webhook);
                    let _g = span.enter();
                    self.stored_copy(store);
                }
                Err(e) => {
                    if matches!(e, PublishError::Closed) {
                        debug!(queue = &*queue, webhook = %webhook, "session closing; copy not stored");
                    } else {
                        error!(queue = &*queue, webhook = %webhook, error = %e,
                               "copy not stored; handing the message back");
                    }
                    self.metrics.delivery("handed_back", e.reason());
                    failed = Some(e);
                }
            }
        }
        if failed.is_some() {
            self.metrics.publish_failures.inc();
            broker.publish_failed();
            acct.record_fate(settled::HANDED_BACK);
            return;
        }
        if broker.ack(d.delivery_tag).await {
            acct.record_fate(worst);
        } else {
            acct.record_fate(settled::HANDED_BACK);
        }
    }

    /// A copy is stored (a single destination's or a Webhook's): metrics and log line; the message is
    /// accounted by the caller.
    fn stored_copy(&self, store: Store) {
        match store {
            Store::Retry { failure, next_in, .. } => {
                self.metrics.retries.inc();
                let Failure { reason, status } = failure;
                info!(reason, status, next_in = ?next_in, "attempt failed; retry scheduled");
            }
            Store::Defer { next_in, reason, .. } => debug!(next_in = ?next_in, reason, "deferred"),
            Store::DeadLetter {
                reason,
                failure,
                attempts,
                detail,
            } => {
                self.metrics
                    .dead_letters
                    .get_or_create(&vec![("reason", reason)])
                    .inc();
                warn!(reason, detail, last_error = failure.reason, status = failure.status, attempts,
                      queue = %self.dead_letter_queue, "dead-lettered");
            }
        }
    }

    /// Where the copy goes, and its properties (the message's, with our headers).
    fn copy(&self, d: &Delivery, meta: &Meta, store: &Store) -> (Cow<'_, str>, BasicProperties) {
        let (props, exchange, rk) = (&d.properties, d.exchange.as_str(), d.routing_key.as_str());
        let retry = |attempts, failure, next_in: Duration| {
            let queue = topology::delay_queue(self.queue, next_in);
            let ms = next_in.as_millis() as u64;
            let props = message::retry_properties(props, exchange, rk, meta, attempts, failure, ms);
            (Cow::Owned(queue), props)
        };
        match store {
            Store::Retry {
                failure,
                attempts,
                next_in,
            } => retry(*attempts, *failure, *next_in),
            Store::Defer {
                attempts,
                next_in,
                reason,
            } => {
                let failure = Failure { reason, status: None };
                retry(*attempts, failure, *next_in)
            }
            Store::DeadLetter {
                reason,
                failure,
                attempts,
                detail,
            } => {
                // The `x-hookfleet-dead-reason` header: the detail, or else the reason.
                let why = detail.as_deref().unwrap_or(reason);
                let props =
                    message::dead_letter_properties(props, exchange, rk, meta, *attempts, *failure, why);
                (Cow::Borrowed(self.dead_letter_queue), props)
            }
        }
    }

    /// The copy is stored and the original `acked` (or not): metrics, log line, accounting.
    fn stored(&self, store: Store, acked: bool, acct: &mut Accounted) {
        let (fate, result, reason) = match &store {
            Store::Retry { failure, .. } => (settled::RETRIED, "retried", failure.reason),
            Store::Defer { reason, .. } => (settled::RETRIED, "deferred", *reason),
            Store::DeadLetter { reason, .. } => (settled::DEAD_LETTERED, "dead_lettered", *reason),
        };
        self.stored_copy(store);
        if acked {
            acct.record(fate, result, reason);
        }
        if !acked {
            // The copy is stored and the original comes back too: a duplicate, same id.
            acct.record(settled::HANDED_BACK, "handed_back", "ack_failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use reqwest::Url;

    use super::*;
    use crate::message::{
        H_ATTEMPTS, H_DEAD_REASON, H_ID, H_LAST_ERROR, H_LAST_STATUS, H_NEXT_DELAY, header_int, header_str,
    };
    use crate::worker::fate::Store;
    use crate::worker::memory::{Memory, Op, delivery, settled};

    const BODY: &[u8] = br#"{"n":1}"#;

    fn retry() -> Fate {
        Fate::Store(Store::Retry {
            failure: Failure {
                reason: "http_status",
                status: Some(503),
            },
            attempts: 2,
            next_in: Duration::from_millis(1000),
        })
    }

    fn defer() -> Fate {
        Fate::Store(Store::Defer {
            attempts: 1,
            next_in: Duration::from_millis(2000),
            reason: "circuit_open",
        })
    }

    fn dead(reason: &'static str, detail: Option<&str>) -> Fate {
        Fate::Store(Store::DeadLetter {
            reason,
            failure: Failure { reason, status: None },
            attempts: 3,
            detail: detail.map(str::to_owned),
        })
    }

    /// Settles `fate` of message 7 on `broker`: the metrics and the latch it left.
    async fn settle(broker: &Memory, fate: Fate) -> (Arc<Metrics>, GoneLatch) {
        let metrics = Arc::new(Metrics::new(""));
        let gone = GoneLatch::new(Some(Url::parse("https://hooks.example.com/a").unwrap()));
        let settler = Settler {
            metrics: &metrics,
            queue: "orders",
            dead_letter_queue: "orders.dead",
            gone: &gone,
        };
        let d = delivery(7, BODY);
        let meta = message::meta(&d.properties, "ex", "orders.created", BODY, 5);
        let mut acct = Accounted::new(metrics.clone());
        settler.settle(broker, &d, BODY, &meta, fate, &mut acct).await;
        assert!(acct.is_settled());
        (metrics, gone)
    }

    /// Every fate × what the broker answers → the operations asked of it, in order, and the one
    /// record of the message (`messages_settled_total{fate}`, `deliveries_total{result,reason}`).
    #[tokio::test]
    async fn every_fate_is_carried_out_and_accounted_once() {
        let refused = || Memory::failing_publish(PublishError::Refused);
        #[rustfmt::skip]
        let table: Vec<(Fate, Memory, &[&str], [&str; 3])> = vec![
            (Fate::Ack { status: 200 }, Memory::default(), &["ack 7"], ["delivered", "delivered", "ok"]),
            // An ack that is not sent: the broker redelivers it.
            (Fate::Ack { status: 200 }, Memory::failing_frames(), &["ack 7"], ["handed_back", "handed_back", "ack_failed"]),
            // A copy, then (only once confirmed) the ack.
            (retry(), Memory::default(), &["publish orders.delay.1000ms", "ack 7"], ["retried", "retried", "http_status"]),
            (defer(), Memory::default(), &["publish orders.delay.2000ms", "ack 7"], ["retried", "deferred", "circuit_open"]),
            (dead("http_status", None), Memory::default(), &["publish orders.dead", "ack 7"], ["dead_lettered", "dead_lettered", "http_status"]),
            (dead("template", Some("template: x")), Memory::default(), &["publish orders.dead", "ack 7"], ["dead_lettered", "dead_lettered", "template"]),
            // A copy not stored: no ack, the session ends (the original goes back with the channel).
            (retry(), refused(), &["publish orders.delay.1000ms unconfirmed", "publish_failed"], ["handed_back", "handed_back", "publish_failed"]),
            (retry(), Memory::failing_publish(PublishError::Timeout(Duration::from_secs(30))),
                &["publish orders.delay.1000ms unconfirmed", "publish_failed"], ["handed_back", "handed_back", "confirm_timeout"]),
            (defer(), Memory::failing_publish(PublishError::Closed),
                &["publish orders.delay.2000ms unconfirmed", "publish_failed"], ["handed_back", "handed_back", "publish_failed"]),
            (dead("http_status", None), Memory::failing_publish(PublishError::Returned),
                &["publish orders.dead unconfirmed", "publish_failed"], ["handed_back", "handed_back", "publish_failed"]),
            // A copy stored whose original cannot be acked: a duplicate, same id.
            (retry(), Memory::failing_frames(), &["publish orders.delay.1000ms", "ack 7"], ["handed_back", "handed_back", "ack_failed"]),
            (dead("http_status", None), Memory::failing_frames(), &["publish orders.dead", "ack 7"], ["handed_back", "handed_back", "ack_failed"]),
            // Handed back now (nack with requeue, sent or not), or left unacked.
            (Fate::HandBack { reason: "panic", requeue_now: true }, Memory::default(), &["requeue 7"], ["handed_back", "handed_back", "panic"]),
            (Fate::HandBack { reason: "panic", requeue_now: true }, Memory::failing_frames(), &["requeue 7"], ["handed_back", "handed_back", "panic"]),
            (Fate::HandBack { reason: "gone", requeue_now: false }, Memory::default(), &[], ["handed_back", "handed_back", "gone"]),
            (Fate::Stop, Memory::default(), &[], ["handed_back", "handed_back", "gone"]),
        ];
        for (fate, broker, ops, [fate_label, result, reason]) in table {
            let (metrics, _) = settle(&broker, fate.clone()).await;
            assert_eq!(broker.log(), ops, "{fate:?}");
            assert_eq!(settled(&metrics, fate_label, result, reason), (1, 1), "{fate:?}");
            assert_eq!(metrics.consumed.get(), 1);
            assert_eq!(metrics.unsettled.get(), 0, "{fate:?}");
            let stored = ops.iter().any(|op| op.starts_with("publish "));
            let failed = ops.contains(&"publish_failed");
            assert_eq!(metrics.publish_failures.get(), u64::from(failed), "{fate:?}");
            let retries = matches!(fate, Fate::Store(Store::Retry { .. })) && stored && !failed;
            assert_eq!(metrics.retries.get(), u64::from(retries), "{fate:?}");
        }
    }

    #[tokio::test]
    async fn a_retry_copy_carries_the_attempts_the_error_and_the_delay() {
        let broker = Memory::default();
        settle(&broker, retry()).await;
        let Op::Publish { body, props, .. } = &broker.ops()[0] else {
            panic!("{:?}", broker.ops());
        };
        assert_eq!(body, BODY, "the original body");
        let h = props.headers().as_ref();
        assert_eq!(header_str(h, H_ID).as_deref(), Some("m-1"));
        assert_eq!(header_int(h, H_ATTEMPTS), Some(2));
        assert_eq!(header_str(h, H_LAST_ERROR).as_deref(), Some("http_status"));
        assert_eq!(header_int(h, H_LAST_STATUS), Some(503));
        assert_eq!(header_int(h, H_NEXT_DELAY), Some(1000));
        assert_eq!(*props.delivery_mode(), Some(2), "persistent");
    }

    #[tokio::test]
    async fn a_deferral_says_the_breaker_was_open_and_keeps_the_attempts() {
        let broker = Memory::default();
        settle(&broker, defer()).await;
        let (queue, props) = &broker.published()[0];
        assert_eq!(queue, "orders.delay.2000ms");
        let h = props.headers().as_ref();
        assert_eq!(header_int(h, H_ATTEMPTS), Some(1));
        assert_eq!(header_str(h, H_LAST_ERROR).as_deref(), Some("circuit_open"));
        assert_eq!(header_int(h, H_LAST_STATUS), None);
    }

    #[tokio::test]
    async fn a_dead_letter_says_why_and_is_counted_by_reason() {
        for (reason, detail, header) in [
            ("attempts_exhausted", None, "attempts_exhausted"),
            (
                "template",
                Some("template: `x` is undefined"),
                "template: `x` is undefined",
            ),
        ] {
            let broker = Memory::default();
            let (metrics, _) = settle(&broker, dead(reason, detail)).await;
            let (queue, props) = &broker.published()[0];
            assert_eq!(queue, "orders.dead");
            let h = props.headers().as_ref();
            assert_eq!(header_str(h, H_DEAD_REASON).as_deref(), Some(header));
            assert_eq!(header_int(h, H_ATTEMPTS), Some(3));
            let counted = metrics
                .dead_letters
                .get_or_create(&vec![("reason", reason)])
                .get();
            assert_eq!(counted, 1, "{reason}");
        }
    }

    #[tokio::test]
    async fn a_stop_sets_the_gone_latch_and_leaves_the_message_to_the_broker() {
        let broker = Memory::default();
        let (metrics, gone) = settle(&broker, Fate::Stop).await;
        assert!(broker.ops().is_empty(), "neither acked nor nacked");
        assert!(gone.is_set());
        assert_eq!(metrics.destination_gone.get(), 1);
        let fatal = gone.fatal().expect("the exit after the drain");
        assert_eq!(fatal.code, hookfleet_crds::contract::exit::DESTINATION_GONE);
        // A hand-back with reason `gone` (a message not attempted after the 410) does not set the
        // latch (a fresh one here): only a stop does.
        let (_, other) = settle(
            &broker,
            Fate::HandBack {
                reason: "gone",
                requeue_now: false,
            },
        )
        .await;
        assert!(!other.is_set());
    }
}
