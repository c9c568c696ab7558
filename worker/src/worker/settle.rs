//! The broker operations settling a message needs ([`Settle`]), so that the settle site
//! (`settlement`) and the consume loop run on lapin (`broker`), on NATS JetStream (`jetstream`) and in
//! memory for the unit tests (`memory`) alike. Every source hands the pipeline a lapin [`Delivery`]:
//! RabbitMQ's own, or one `jetstream` builds from a JetStream message (its subject as the routing key,
//! its headers as the properties' headers).

use std::future::Future;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;

use super::fate::Store;

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

    /// With Webhooks: stores one Webhook's copy of a message for `store` (the original is acked by the
    /// caller once every copy is). RabbitMQ: publishes it to `queue` (the delay queue of a retry, or the
    /// dead-letter queue), confirmed. `Ok` only once it is stored.
    fn publish_copy(
        &self,
        _store: &Store,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> impl Future<Output = Result<(), PublishError>> + Send {
        self.publish(queue, body, props)
    }

    /// A copy was not stored: the session ends, and the reconnect re-declares the topology, with
    /// backoff, instead of looping.
    fn publish_failed(&self);

    /// The consumer yielded the message `tag`, before its delivery task starts (the ack ledger
    /// registers it).
    fn received(&self, _tag: u64) {}

    /// Settles `tag` by storing its fate durably: `body` and `props` are the copy `settlement` built for
    /// `queue` (the delay queue of a retry, or the dead-letter queue). RabbitMQ: publish the copy
    /// (confirmed), then ack the original. `Ok(acked)` once the copy is stored (the original acked or
    /// not); `Err` when it was not (the original is left unsettled).
    fn store(
        &self,
        tag: u64,
        _store: &Store,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> impl Future<Output = Result<bool, PublishError>> + Send {
        async move {
            self.publish(queue, body, props).await?;
            Ok(self.ack(tag).await)
        }
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
    /// JetStream's answer to a publish, or the NATS client's error.
    #[error("{0}")]
    Nats(String),
    #[error("the session is closing")]
    Closed,
}

impl PublishError {
    /// The `deliveries_total` reason of the message whose copy was not stored.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Timeout(_) => "confirm_timeout",
            _ => "publish_failed",
        }
    }
}
