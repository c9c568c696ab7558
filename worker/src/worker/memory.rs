//! [`Settle`] in memory, for unit tests of settlement and delivery: it records every operation and
//! answers as told (acks and nacks sent, or not; the next publish confirmed, or failed). With a few
//! helpers those tests share: a received message, and the accounting read back from the metrics.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use lapin::BasicProperties;
use lapin::message::Delivery;

use super::settle::{PublishError, Settle};
use crate::metrics::Metrics;

/// One broker operation, as the settle site asked for it.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Ack(u64),
    Requeue(u64),
    /// A copy, with the answer it got.
    Publish {
        queue: String,
        body: Vec<u8>,
        /// Boxed: properties with headers are large.
        props: Box<BasicProperties>,
        confirmed: bool,
    },
    PublishFailed,
}

/// A broker in memory. By default every ack, nack and publish goes through.
#[derive(Default)]
pub struct Memory {
    ops: Mutex<Vec<Op>>,
    /// Whether ack and nack frames fail to go out (a closed channel).
    frames_fail: bool,
    /// The answer to the next publish instead of a confirm.
    fail_next_publish: Mutex<Option<PublishError>>,
    /// Whether the next ack panics (a bug on the settle path).
    pub panic_on_next_ack: AtomicBool,
}

impl Memory {
    pub fn failing_frames() -> Self {
        Self {
            frames_fail: true,
            ..Self::default()
        }
    }

    pub fn failing_publish(e: PublishError) -> Self {
        Self {
            fail_next_publish: Mutex::new(Some(e)),
            ..Self::default()
        }
    }

    /// The operations so far, in order.
    pub fn ops(&self) -> Vec<Op> {
        self.lock().clone()
    }

    /// The operations so far, one short line each: `ack 7`, `requeue 7`, `publish <queue>`
    /// (`unconfirmed` after it when it failed), `publish_failed`.
    pub fn log(&self) -> Vec<String> {
        self.lock()
            .iter()
            .map(|op| match op {
                Op::Ack(t) => format!("ack {t}"),
                Op::Requeue(t) => format!("requeue {t}"),
                Op::Publish { queue, confirmed, .. } if *confirmed => format!("publish {queue}"),
                Op::Publish { queue, .. } => format!("publish {queue} unconfirmed"),
                Op::PublishFailed => "publish_failed".into(),
            })
            .collect()
    }

    /// The copies published so far (confirmed or not): queue and properties.
    pub fn published(&self) -> Vec<(String, BasicProperties)> {
        self.lock()
            .iter()
            .filter_map(|op| match op {
                Op::Publish { queue, props, .. } => Some((queue.clone(), (**props).clone())),
                _ => None,
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Op>> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Settle for Memory {
    async fn ack(&self, tag: u64) -> bool {
        self.lock().push(Op::Ack(tag));
        if self.panic_on_next_ack.swap(false, Ordering::SeqCst) {
            panic!("a bug while acking {tag}");
        }
        !self.frames_fail
    }

    async fn requeue(&self, d: &Delivery) -> bool {
        self.lock().push(Op::Requeue(d.delivery_tag));
        !self.frames_fail
    }

    async fn publish(&self, queue: &str, body: &[u8], props: BasicProperties) -> Result<(), PublishError> {
        let failure = self
            .fail_next_publish
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.lock().push(Op::Publish {
            queue: queue.to_owned(),
            body: body.to_vec(),
            props: Box::new(props),
            confirmed: failure.is_none(),
        });
        failure.map_or(Ok(()), Err)
    }

    fn publish_failed(&self) {
        self.lock().push(Op::PublishFailed);
    }
}

/// A message as the consumer yields it: tag `tag`, published to `ex` with routing key
/// `orders.created` and message id `m-1`.
pub fn delivery(tag: u64, body: &[u8]) -> Delivery {
    let mut d = Delivery::mock(tag, "ex".into(), "orders.created".into(), false, body.to_vec());
    d.properties = BasicProperties::default()
        .with_message_id("m-1".into())
        .with_content_type("application/json".into());
    d
}

/// How many messages were settled with `fate`, and counted in `deliveries_total{result,reason}`:
/// `(settled, deliveries)`.
pub fn settled(m: &Metrics, fate: &'static str, result: &'static str, reason: &'static str) -> (u64, u64) {
    let settled = m.settled.get_or_create(&vec![("fate", fate)]).get();
    let deliveries = m
        .deliveries
        .get_or_create(&vec![("result", result), ("reason", reason)])
        .get();
    (settled, deliveries)
}
