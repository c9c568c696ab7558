//! The broker operations settling a message needs ([`Settle`]), so that the settle site
//! (`settlement`) runs on lapin (`broker`) and in memory for the unit tests (`memory`) alike.

use std::future::Future;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;

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
    /// The `deliveries_total` reason of the message whose copy was not stored.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Timeout(_) => "confirm_timeout",
            _ => "publish_failed",
        }
    }
}
