//! Settlement: the one place that carries out a message's [`Fate`] ([`Settler::settle`]), through
//! the few broker operations it needs ([`Settle`]). The ack rule lives here and nowhere else: the
//! original is acked after a 2xx, or after the broker confirmed the copy stored in a delay or
//! dead-letter queue; otherwise it is handed back to the broker, unacked.
//!
//! Every message the consumer yields is accounted for exactly once (see [`Accounted`]), so that
//! `consumed = delivered + retried + dead-lettered + handed back + unsettled` holds on `/metrics`.
//!
//! [`Settle`] is implemented on a lapin consume channel (`broker`) and in memory for the unit tests
//! (`memory`).

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;
use tracing::{debug, error, info, warn};

use super::fate::{Fate, Store};
use super::gone::GoneLatch;
use super::topology;
use crate::message::{self, Failure, Meta};
use crate::metrics::Metrics;

/// The broker operations settling a message needs, on the channel it came from.
pub trait Settle: Send + Sync {
    /// Acks `tag`; true once a frame carrying it was sent, false when it could not be (the broker
    /// then redelivers the message: a duplicate with the same webhook-id).
    fn ack(&self, tag: u64) -> impl Future<Output = bool> + Send;

    /// Hands `d` back now (`nack` with requeue); true once the frame was sent.
    fn requeue(&self, d: &Delivery) -> impl Future<Output = bool> + Send;

    /// Publishes a persistent copy to `queue` through the default exchange with `mandatory`, and waits
    /// for the broker's confirm: `Ok` only when the broker took it.
    fn publish(
        &self,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> impl Future<Output = Result<(), PublishError>> + Send;

    /// A copy was not stored: the session ends, and the reconnect re-declares the topology, with
    /// backoff, instead of looping.
    fn publish_failed(&self);
}

/// Why a copy was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker returned it (no such queue)")]
    Returned,
    #[error("the broker refused it (nack)")]
    Refused,
    #[error("no confirm within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Channel(#[source] lapin::Error),
    #[error("the session is closing")]
    Closed,
}

impl PublishError {
    fn reason(&self) -> &'static str {
        match self {
            PublishError::Timeout(_) => "confirm_timeout",
            _ => "publish_failed",
        }
    }
}

/// The fate names of `hookfleet_messages_settled_total{fate}`.
pub mod settled {
    pub const DELIVERED: &str = "delivered";
    pub const RETRIED: &str = "retried";
    pub const DEAD_LETTERED: &str = "dead_lettered";
    pub const HANDED_BACK: &str = "handed_back";
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

impl Drop for Accounted {
    fn drop(&mut self) {
        self.record(settled::HANDED_BACK, "handed_back", "not_started");
    }
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
                if let Err(e) = broker.publish(&queue, body, props).await {
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
                let acked = broker.ack(d.delivery_tag).await;
                self.stored(store, acked, acct);
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
            Store::Defer { attempts, next_in } => {
                let failure = Failure {
                    reason: "circuit_open",
                    status: None,
                };
                retry(*attempts, failure, *next_in)
            }
            Store::DeadLetter {
                reason,
                failure,
                attempts,
                detail,
            } => {
                let dead_reason = detail.as_deref().unwrap_or(reason);
                let props = message::dead_letter_properties(
                    props,
                    exchange,
                    rk,
                    meta,
                    *attempts,
                    *failure,
                    dead_reason,
                );
                (Cow::Borrowed(self.dead_letter_queue), props)
            }
        }
    }

    /// The copy is stored and the original `acked` (or not): metrics, log line, accounting.
    fn stored(&self, store: Store, acked: bool, acct: &mut Accounted) {
        match store {
            Store::Retry { failure, next_in, .. } => {
                self.metrics.retries.inc();
                let Failure { reason, status } = failure;
                info!(reason, status, next_in = ?next_in, "attempt failed; retry scheduled");
                if acked {
                    acct.record(settled::RETRIED, "retried", reason);
                }
            }
            Store::Defer { next_in, .. } => {
                debug!(next_in = ?next_in, "circuit open; deferred");
                if acked {
                    acct.record(settled::RETRIED, "deferred", "circuit_open");
                }
            }
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
                warn!(
                    reason,
                    detail,
                    last_error = failure.reason,
                    status = failure.status,
                    attempts,
                    queue = %self.dead_letter_queue,
                    "dead-lettered"
                );
                if acked {
                    acct.record(settled::DEAD_LETTERED, "dead_lettered", reason);
                }
            }
        }
        if !acked {
            // The copy is stored and the original comes back too: a duplicate, same id.
            acct.record(settled::HANDED_BACK, "handed_back", "ack_failed");
        }
    }
}
