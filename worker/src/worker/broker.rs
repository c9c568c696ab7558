//! Settling on the broker (lapin): [`Settle`] on a consume channel ([`LapinSettle`]), acking through
//! the channel's ack ledger and storing copies through the session's confirm-mode [`Publisher`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::{Notify, Semaphore};

use super::acks::Acks;
use super::error::SessionError;
use super::settle::{PublishError, Settle};

/// Publish channels per session. Each carries at most one unconfirmed publish (see [`Publisher`]),
/// so this bounds concurrent retry/dead-letter publishes; a confirm takes a few milliseconds, so 16
/// channels store thousands of copies a second.
const PUBLISH_CHANNELS: usize = 16;

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

/// Per-session state shared by its consume channels and delivery tasks.
pub struct Session {
    pub publisher: Publisher,
    /// Signalled when a copy could not be stored (refused, returned, unconfirmed): the session ends
    /// and the reconnect re-declares the topology, with backoff, instead of looping.
    pub publish_failed: Notify,
}

/// [`Settle`] on one consume channel: its acks (coalesced by its ledger) and nacks, the session's
/// copies. Shared by the channel's delivery tasks.
pub struct LapinSettle {
    pub session: Arc<Session>,
    pub acks: Acks,
    /// The longest wait for a nack frame (a connection the broker blocks writes nothing).
    pub timeout: Duration,
}

impl Settle for LapinSettle {
    async fn ack(&self, tag: u64) -> bool {
        self.acks.ack(tag).await
    }

    async fn requeue(&self, d: &Delivery) -> bool {
        let requeue = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        match tokio::time::timeout(self.timeout, d.acker.nack(requeue)).await {
            Ok(Ok(true)) => {
                // Settled: it no longer holds back a `multiple` ack of the tags above it.
                self.acks.nacked(d.delivery_tag);
                true
            }
            _ => false,
        }
    }

    async fn publish(&self, queue: &str, body: &[u8], props: BasicProperties) -> Result<(), PublishError> {
        self.session.publisher.publish(queue, body, props).await
    }

    fn publish_failed(&self) {
        self.session.publish_failed.notify_one();
    }

    fn received(&self, tag: u64) {
        self.acks.received(tag);
    }
}
