//! The consume loop, one for both lanes: take the next message, count it, register its tag with the
//! channel's ack ledger, wait for a slot of its lane, and hand it to a delivery task. What ends a
//! loop besides its consumer (and what a lane does while it waits) is the lane's [`Interrupts`]: a
//! shutdown for the retry lane; for the work queue's loop (`session`) also a copy that was not
//! stored, the retry lane failing, and the flow-control poll. The retry lane's loop runs in a task
//! of its own beside the session's ([`RetryLane`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::acks::Acks;
use super::broker::{LapinSettle, Session};
use super::error::SessionError;
use super::lanes::Lane;
use super::settle::Settle;
use super::settlement::Accounted;
use super::shared::Worker;
use super::topology;

/// What ends a consume loop besides its consumer.
pub trait Interrupts: Send {
    /// Resolves when the loop must end: `Ok` after a shutdown, `Err` when the session failed. While
    /// `idle` (the loop waits for the next message, not for a slot) it also does the lane's
    /// housekeeping. Cancel-safe.
    fn interrupted(&mut self, idle: bool) -> impl Future<Output = Result<(), SessionError>> + Send;
}

/// The retry lane ends with the shutdown (or with the session, which aborts it).
impl Interrupts for watch::Receiver<bool> {
    async fn interrupted(&mut self, _idle: bool) -> Result<(), SessionError> {
        let _ = self.wait_for(|s| *s).await;
        Ok(())
    }
}

impl Worker {
    /// Starts consuming `queue` on `ch` as `tag`, with the lane's prefetch (lowered to the in-flight
    /// bytes budget: RabbitMQ ignores a prefetch in bytes).
    pub(super) async fn consumer(
        &self,
        ch: &Channel,
        queue: &str,
        tag: &str,
    ) -> Result<Consumer, SessionError> {
        ch.basic_qos(self.cfg.lane_prefetch(), BasicQosOptions::default())
            .await
            .map_err(SessionError::Consume)?;
        ch.basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(SessionError::Consume)
    }

    /// Consumes for `lane` until `interrupts` ends it (`Ok` after a shutdown: the caller cancels the
    /// consumer) or the session fails (`Err`). Every message is counted as consumed and its tag
    /// registered with the ack ledger before its task starts. Backpressure: no new task until a slot
    /// is free; a message waiting for one is still unacked, so when the session ends it goes back to
    /// the queue with the channel (and its `Accounted`, dropped, counts it as handed back).
    pub(super) async fn consume_lane<S: Settle + 'static>(
        self: &Arc<Self>,
        consumer: &mut (impl Stream<Item = Result<Delivery, SessionError>> + Unpin),
        lane: &mut Lane,
        settle: &Arc<S>,
        interrupts: &mut impl Interrupts,
    ) -> Result<(), SessionError> {
        loop {
            let delivery = tokio::select! {
                biased;
                r = interrupts.interrupted(true) => return r,
                next = consumer.next() => match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => return Err(e),
                    None => return Err(SessionError::ConsumerEnded),
                },
            };
            let acct = Accounted::new(self.metrics.clone());
            settle.received(delivery.delivery_tag);
            let permit = tokio::select! {
                biased;
                r = interrupts.interrupted(false) => return r,
                p = self.lanes.acquire(lane) => p,
            };
            let worker = self.clone();
            let settle = settle.clone();
            tokio::spawn(async move {
                worker.deliver(&*settle, delivery, acct).await;
                drop(permit);
            });
        }
    }

    /// Opens the retry lane's channel on `conn`, starts its consumer on the retry-ready queue and runs
    /// its loop in a task until `shutdown` or a failure.
    pub(super) async fn start_retry_lane(
        self: &Arc<Self>,
        conn: &Connection,
        mut shutdown: watch::Receiver<bool>,
        session: Arc<Session>,
    ) -> Result<RetryLane, SessionError> {
        let ch = conn.create_channel().await.map_err(SessionError::Channel)?;
        let queue = topology::retry_ready_queue(&self.cfg.queue);
        let tag = format!("hookfleet-{}-retries", std::process::id());
        let mut consumer = self.consumer(&ch, &queue, &tag).await?;
        info!(queue = %queue, shared_slots = self.lanes.shared(), "retry lane consuming");
        let worker = self.clone();
        let task = tokio::spawn(async move {
            let settle = Arc::new(LapinSettle {
                session,
                acks: Acks::start(ch.clone(), worker.cfg.confirm_timeout),
                timeout: worker.cfg.confirm_timeout,
            });
            let mut lane = Lane::Retries;
            worker
                .consume_lane(&mut deliveries(&mut consumer), &mut lane, &settle, &mut shutdown)
                .await?;
            cancel(&ch, &tag, "the retry-lane consumer").await;
            Ok(())
        });
        Ok(RetryLane { task: Some(task) })
    }
}

/// A lapin consumer's deliveries as [`Worker::consume_lane`] takes them.
pub(super) fn deliveries(
    consumer: &mut Consumer,
) -> impl Stream<Item = Result<Delivery, SessionError>> + Unpin + '_ {
    consumer.map(|r| r.map_err(SessionError::Consumer))
}

/// Cancels the consumer `tag` on `ch` (`what` names it in the warning when that fails).
pub(super) async fn cancel(ch: &Channel, tag: &str, what: &str) {
    if let Err(e) = ch.basic_cancel(tag.into(), BasicCancelOptions::default()).await {
        warn!(error = %e, "cancelling {what}");
    }
}

/// The retry lane's consume loop, running beside the session's work-queue loop. Aborted when dropped.
pub struct RetryLane {
    task: Option<JoinHandle<Result<(), SessionError>>>,
}

impl RetryLane {
    /// Waits for the loop to end (cancel-safe): `Err` when it failed; `Ok` after a shutdown. Pending
    /// for ever once it has been reported.
    pub async fn ended(&mut self) -> Result<(), SessionError> {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let r = task.await;
        self.task = None;
        r.unwrap_or(Err(SessionError::ConsumerEnded))
    }

    /// After a shutdown: lets the loop cancel its consumer (bounded), then drops it.
    pub async fn finish(mut self) {
        if let Some(task) = self.task.as_mut()
            && tokio::time::timeout(Duration::from_secs(5), task).await.is_err()
        {
            warn!("the retry lane did not stop in time");
        }
    }
}

impl Drop for RetryLane {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}
