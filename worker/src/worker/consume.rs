//! The retry lane's consume loop, running beside the session's work-queue loop.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::acks::Acks;
use super::broker::{LapinSettle, Session};
use super::error::SessionError;
use super::settlement::Accounted;
use super::shared::Worker;
use super::topology;

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

impl Worker {
    /// Opens the retry lane's channel on `conn`, starts its consumer on the retry-ready queue and runs
    /// its loop in a task until `shutdown` or a failure.
    pub(super) async fn start_retry_lane(
        self: &Arc<Self>,
        conn: &Connection,
        shutdown: watch::Receiver<bool>,
        session: Arc<Session>,
    ) -> Result<RetryLane, SessionError> {
        let ch = conn.create_channel().await.map_err(SessionError::Channel)?;
        ch.basic_qos(self.cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(SessionError::Consume)?;
        let queue = topology::retry_ready_queue(&self.cfg.queue);
        let tag = format!("hookfleet-{}-retries", std::process::id());
        let consumer = ch
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(SessionError::Consume)?;
        info!(queue = %queue, shared_slots = self.lanes.shared(), "retry lane consuming");
        let worker = self.clone();
        let task = tokio::spawn(async move { worker.retry_loop(ch, consumer, tag, shutdown, session).await });
        Ok(RetryLane { task: Some(task) })
    }

    async fn retry_loop(
        self: Arc<Self>,
        ch: Channel,
        mut consumer: lapin::Consumer,
        tag: String,
        mut shutdown: watch::Receiver<bool>,
        session: Arc<Session>,
    ) -> Result<(), SessionError> {
        let settle = Arc::new(LapinSettle {
            session,
            acks: Acks::start(ch.clone(), self.cfg.confirm_timeout),
            timeout: self.cfg.confirm_timeout,
        });
        loop {
            let delivery = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break,
                next = consumer.next() => match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => return Err(SessionError::Consumer(e)),
                    None => return Err(SessionError::ConsumerEnded),
                },
            };
            // As in the work-queue loop: counted at once; a message still waiting for a slot when the
            // session ends goes back to the queue with the channel.
            let acct = Accounted::new(self.metrics.clone());
            settle.acks.received(delivery.delivery_tag);
            let permit = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break,
                p = self.lanes.acquire_retry() => p,
            };
            let worker = self.clone();
            let settle = settle.clone();
            tokio::spawn(async move {
                worker.deliver(&*settle, delivery, acct).await;
                drop(permit);
            });
        }
        if let Err(e) = ch
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await
        {
            warn!(error = %e, "cancelling the retry-lane consumer");
        }
        Ok(())
    }
}
