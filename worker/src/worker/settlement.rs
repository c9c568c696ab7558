//! Settlement: what an attempt's outcome means for the message (its [`Fate`]), and the one function
//! that carries out every fate ([`Worker::settle`]). The ack rule lives here and nowhere else: the
//! original is acked after a 2xx, or after the broker confirmed the copy stored in a delay or
//! dead-letter queue; otherwise it is handed back to the broker, unacked.
//!
//! Every message the consumer yields is accounted for exactly once (see [`Accounted`]), so that
//! `consumed = delivered + retried + dead-lettered + handed back + unsettled` holds on `/metrics`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, error, info, warn};

use super::acks::Acks;
use super::error::SessionError;
use super::shared::Worker;
use super::topology;
use crate::message::{self, Failure, Meta};
use crate::metrics::Metrics;
use crate::outcome::Outcome;

/// Publish channels per session. Each carries at most one unconfirmed publish (see [`Publisher`]),
/// so this bounds concurrent retry/dead-letter publishes; a confirm takes a few milliseconds, so 16
/// channels store thousands of copies a second.
const PUBLISH_CHANNELS: usize = 16;

/// What becomes of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// Delivered (2xx): ack.
    Ack { status: u16 },
    /// Store a copy in `queue`, wait for the broker's confirm, then ack.
    Store {
        queue: String,
        /// Boxed: properties with headers are large, and most fates are plain acks.
        props: Box<BasicProperties>,
        copy: Copy,
    },
    /// Leave it to the broker: `nack` with requeue when `requeue_now`, else leave it unacked until the
    /// session's channel closes (the session is ending anyway).
    HandBack { reason: &'static str, requeue_now: bool },
}

/// Why a copy is stored, for metrics and logs.
#[derive(Debug, Clone, PartialEq)]
pub enum Copy {
    Retry {
        reason: &'static str,
        status: Option<u16>,
        next_in: Duration,
    },
    /// The circuit breaker is open: not attempted, back in about `next_in`.
    Deferred { next_in: Duration },
    DeadLetter {
        /// Metric label: the refusal's reason, `attempts_exhausted` or `template`.
        reason: &'static str,
        failure: Failure,
        attempts: u32,
        detail: Option<String>,
    },
}

/// The fate names of `hookfleet_messages_settled_total{fate}`.
pub mod fate {
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
        self.record(fate::HANDED_BACK, "handed_back", "not_started");
    }
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

/// Confirm-mode channels for retries and dead letters, each with at most one unconfirmed publish.
///
/// Why one: lapin pairs a `basic.return` with whichever confirm it resolves next on that channel (a
/// FIFO of returned messages; a `multiple` ack resolves pending tags in hash-map order). With several
/// publishes outstanding on one channel, a returned copy could be reported to another task as a
/// plain `Ack`, and that task would ack an original whose copy was dropped. With one outstanding
/// publish per channel, the return (sent by the broker before the confirm) can only belong to it.
pub struct Publisher {
    free: Mutex<Vec<Channel>>,
    slots: Semaphore,
    timeout: Duration,
}

impl Publisher {
    pub async fn open(conn: &Connection, timeout: Duration) -> Result<Self, SessionError> {
        let mut free = Vec::with_capacity(PUBLISH_CHANNELS);
        for _ in 0..PUBLISH_CHANNELS {
            let ch = conn.create_channel().await.map_err(SessionError::Channel)?;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(SessionError::Channel)?;
            free.push(ch);
        }
        Ok(Self {
            free: Mutex::new(free),
            slots: Semaphore::new(PUBLISH_CHANNELS),
            timeout,
        })
    }

    /// Wakes every task waiting for a channel: the session is ending.
    pub fn close(&self) {
        self.slots.close();
    }

    /// Publishes a persistent copy through the default exchange with `mandatory`, and waits (at most
    /// the confirm timeout, channel wait included) for the broker's confirm.
    pub async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        let permit = match tokio::time::timeout(self.timeout, self.slots.acquire()).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(PublishError::Closed),
            Err(_) => return Err(PublishError::Timeout(self.timeout)),
        };
        let ch = self
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .expect("a slot always has a free channel");
        let result = tokio::time::timeout(self.timeout, async {
            let pending = ch
                .basic_publish(
                    ShortString::from(""),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    props,
                )
                .await
                .map_err(PublishError::Channel)?;
            match pending.await.map_err(PublishError::Channel)? {
                Confirmation::Ack(None) => Ok(()),
                Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => Err(PublishError::Returned),
                Confirmation::Nack(None) => Err(PublishError::Refused),
                Confirmation::NotRequested => Err(PublishError::Refused),
            }
        })
        .await
        .unwrap_or(Err(PublishError::Timeout(self.timeout)));
        match &result {
            // The channel has nothing outstanding: reuse it.
            Ok(()) | Err(PublishError::Returned | PublishError::Refused) => {
                self.free.lock().unwrap_or_else(|e| e.into_inner()).push(ch);
                drop(permit);
            }
            // A publish may still be outstanding on it (timeout) or it is dead: never reuse it, and
            // retire its slot. The session ends on this failure, so the pool is not needed long.
            Err(_) => permit.forget(),
        }
        result
    }
}

/// Per-session state shared by its delivery tasks.
pub struct Session {
    pub publisher: Publisher,
    /// Signalled when a copy could not be stored (refused, returned, unconfirmed): the session ends
    /// and the reconnect re-declares the topology, with backoff, instead of looping.
    pub publish_failed: Notify,
}

impl Worker {
    /// The fate an outcome decides. Pure but for the jitter of the retry delay.
    pub(super) fn decide(&self, d: &Delivery, meta: &Meta, attempt: u32, outcome: Outcome) -> Fate {
        let (exchange, rk) = (d.exchange.as_str(), d.routing_key.as_str());
        match outcome {
            Outcome::Delivered { status } => Fate::Ack { status },
            Outcome::Retry {
                reason,
                status,
                retry_after,
            } if attempt < self.cfg.max_attempts => {
                let delay = self
                    .cfg
                    .backoff
                    .next_delay(attempt, retry_after, &mut rand::rng());
                let ttl = self.cfg.backoff.bucket(delay);
                let failure = Failure { reason, status };
                Fate::Store {
                    queue: topology::delay_queue(&self.cfg.queue, ttl),
                    props: Box::new(message::retry_properties(
                        &d.properties,
                        exchange,
                        rk,
                        meta,
                        attempt,
                        failure,
                        ttl.as_millis() as u64,
                    )),
                    copy: Copy::Retry {
                        reason,
                        status,
                        next_in: ttl,
                    },
                }
            }
            Outcome::Deferred { delay } => {
                // Not attempted: the attempt count stays as it was.
                let ttl = self.cfg.backoff.bucket(delay.min(self.cfg.backoff.max));
                let failure = Failure {
                    reason: "circuit_open",
                    status: None,
                };
                Fate::Store {
                    queue: topology::delay_queue(&self.cfg.queue, ttl),
                    props: Box::new(message::retry_properties(
                        &d.properties,
                        exchange,
                        rk,
                        meta,
                        meta.attempts,
                        failure,
                        ttl.as_millis() as u64,
                    )),
                    copy: Copy::Deferred { next_in: ttl },
                }
            }
            Outcome::Retry { reason, status, .. } => self.dead_letter(
                d,
                meta,
                attempt,
                Failure { reason, status },
                "attempts_exhausted",
                None,
            ),
            Outcome::Reject { reason, status } => {
                self.dead_letter(d, meta, attempt, Failure { reason, status }, reason, None)
            }
            // Left unacked: the session ends (the worker stops) and the broker requeues it.
            Outcome::Gone => Fate::HandBack {
                reason: "gone",
                requeue_now: false,
            },
        }
    }

    /// The fate of a message that goes to the dead-letter queue. `reason` is the metric label; the
    /// `x-hookfleet-dead-reason` header is `detail` when given (e.g. `template: <error>`).
    pub(super) fn dead_letter(
        &self,
        d: &Delivery,
        meta: &Meta,
        attempt: u32,
        failure: Failure,
        reason: &'static str,
        detail: Option<String>,
    ) -> Fate {
        let props = message::dead_letter_properties(
            &d.properties,
            d.exchange.as_str(),
            d.routing_key.as_str(),
            meta,
            attempt,
            failure,
            detail.as_deref().unwrap_or(reason),
        );
        Fate::Store {
            queue: self.cfg.dead_letter_queue.clone(),
            props: Box::new(props),
            copy: Copy::DeadLetter {
                reason,
                failure,
                attempts: attempt,
                detail,
            },
        }
    }

    /// Carries out `fate`: the only place a message is acked, nacked or left to the broker.
    pub(super) async fn settle(
        &self,
        session: &Session,
        acks: &Acks,
        d: &Delivery,
        body: &[u8],
        fate: Fate,
        acct: &mut Accounted,
    ) {
        match fate {
            Fate::Ack { status } => {
                if acks.ack(d.delivery_tag).await {
                    debug!(status, "delivered");
                    acct.record(fate::DELIVERED, "delivered", "ok");
                } else {
                    acct.record(fate::HANDED_BACK, "handed_back", "ack_failed");
                }
            }
            Fate::HandBack { reason, requeue_now } => {
                if requeue_now {
                    let requeue = BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    };
                    match tokio::time::timeout(self.cfg.confirm_timeout, d.acker.nack(requeue)).await {
                        // Settled: it no longer holds back a `multiple` ack of the tags above it.
                        Ok(Ok(true)) => acks.nacked(d.delivery_tag),
                        _ => warn!("nack not sent; the broker requeues the message with the channel"),
                    }
                }
                acct.record(fate::HANDED_BACK, "handed_back", reason);
            }
            Fate::Store { queue, props, copy } => {
                if let Err(e) = session.publisher.publish(&queue, body, *props).await {
                    // The original stays unacked: the session ends and closing its connection hands
                    // it back. Nacking it here instead would redeliver it at once on a session that
                    // cannot publish: a requeue loop.
                    if matches!(e, PublishError::Closed) {
                        debug!(queue, "session closing; copy not stored");
                    } else {
                        error!(queue, error = %e, "copy not stored; handing the message back");
                    }
                    self.metrics.publish_failures.inc();
                    session.publish_failed.notify_one();
                    acct.record(fate::HANDED_BACK, "handed_back", e.reason());
                    return;
                }
                let acked = acks.ack(d.delivery_tag).await;
                match copy {
                    Copy::Retry {
                        reason,
                        status,
                        next_in,
                    } => {
                        self.metrics.retries.inc();
                        info!(reason, status, next_in = ?next_in, "attempt failed; retry scheduled");
                        if acked {
                            acct.record(fate::RETRIED, "retried", reason);
                        }
                    }
                    Copy::Deferred { next_in } => {
                        debug!(next_in = ?next_in, "circuit open; deferred");
                        if acked {
                            acct.record(fate::RETRIED, "deferred", "circuit_open");
                        }
                    }
                    Copy::DeadLetter {
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
                            queue = %self.cfg.dead_letter_queue,
                            "dead-lettered"
                        );
                        if acked {
                            acct.record(fate::DEAD_LETTERED, "dead_lettered", reason);
                        }
                    }
                }
                if !acked {
                    // The copy is stored and the original comes back too: a duplicate, same id.
                    acct.record(fate::HANDED_BACK, "handed_back", "ack_failed");
                }
            }
        }
    }
}
