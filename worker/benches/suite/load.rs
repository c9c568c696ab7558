//! Messages into the broker: the bodies, queue declarations as the worker makes them, a prefill (as
//! fast as confirms allow) and an open-loop publisher at a fixed rate.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use futures::future::try_join_all;
use hookfleet_crds::contract::queues;
use hookfleet_crds::integration::{QueueType, default_delivery_limit};
use hookfleet_worker::worker::topology;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

/// A JSON body of exactly `size` bytes (at least the id's own length): `{"id":"…","pad":"xx…"}`.
pub fn body(id: &str, size: usize) -> Vec<u8> {
    let mut b = format!(r#"{{"id":"{id}","pad":""#).into_bytes();
    b.resize(size.saturating_sub(2).max(b.len()), b'x');
    b.extend_from_slice(b"\"}");
    b
}

/// Declares `queue` as a worker of `queue_type` does (so a worker started later accepts it).
pub async fn declare(ch: &Channel, queue: &str, queue_type: QueueType) -> Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let args = topology::work_queue_args(queue_type, &queues::dead_letter(queue), default_delivery_limit());
    ch.queue_declare(queue.into(), durable, args).await?;
    Ok(())
}

async fn channel(uri: &str) -> Result<(Connection, Channel)> {
    let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, ch))
}

fn props(id: &str, sent: Option<SystemTime>) -> BasicProperties {
    let p = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(id.into())
        .with_content_type("application/json".into());
    match sent {
        // For the bare consumer, which has no other way to know: microseconds since the epoch.
        Some(t) => p.with_timestamp(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64),
        None => p,
    }
}

/// Declares `queue` and publishes `n` persistent messages `prefix-0 …` of `size` bytes, with confirms,
/// 1,000 in flight at a time.
pub async fn prefill(
    uri: &str,
    queue: &str,
    queue_type: QueueType,
    prefix: &str,
    n: usize,
    size: usize,
) -> Result<()> {
    let (conn, ch) = channel(uri).await?;
    declare(&ch, queue, queue_type).await?;
    let ids: Vec<usize> = (0..n).collect();
    for window in ids.chunks(1000) {
        publish_confirmed(&ch, queue, prefix, window, size).await?;
    }
    let _ = conn.close(200, "published".into()).await;
    Ok(())
}

/// Publishes the persistent messages `prefix-i` (i in `ids`) of `size` bytes on `ch`, all of them before
/// it waits for any confirm; fails unless the broker confirmed each.
async fn publish_confirmed(
    ch: &Channel,
    queue: &str,
    prefix: &str,
    ids: &[usize],
    size: usize,
) -> Result<()> {
    let batch: Vec<(String, Vec<u8>)> = ids
        .iter()
        .map(|&i| {
            let id = format!("{prefix}-{i}");
            let body = body(&id, size);
            (id, body)
        })
        .collect();
    hookfleet_testkit::messages::publish_batch(ch, queue, &batch).await
}

/// Publishes `n` persistent messages `prefix-0 …` of `size` bytes to `queue` (which exists) as fast as
/// confirms allow, message i from connection i mod [`PUBLISHERS`], each connection with 1,000 in
/// flight at a time (a closed loop). Returns when the publishing started and when the last confirm came.
pub async fn flat_out(
    uri: &str,
    queue: &str,
    prefix: &str,
    n: usize,
    size: usize,
) -> Result<(Instant, Instant)> {
    let mut channels = Vec::with_capacity(PUBLISHERS);
    for _ in 0..PUBLISHERS {
        channels.push(channel(uri).await?);
    }
    let start = Instant::now();
    let tasks = channels.into_iter().enumerate().map(|(k, (conn, ch))| {
        let (queue, prefix) = (queue.to_owned(), prefix.to_owned());
        tokio::spawn(async move {
            let mine: Vec<usize> = (k..n).step_by(PUBLISHERS).collect();
            for window in mine.chunks(1000) {
                publish_confirmed(&ch, &queue, &prefix, window, size).await?;
            }
            let _ = conn.close(200, "published".into()).await;
            Ok::<_, anyhow::Error>(())
        })
    });
    for r in try_join_all(tasks).await? {
        r?;
    }
    Ok((start, Instant::now()))
}

/// What an open-loop run published.
pub struct Published {
    /// Ids `prefix-i`, i = 0 … n-1.
    pub prefix: String,
    /// When message i was due (its latency counts from here, so a publisher falling behind shows).
    pub due: Vec<Instant>,
    /// When message i was handed to its connection: its due time plus the publisher's lag (on a
    /// saturated machine the publisher, sharing the cores, falls behind its schedule).
    pub sent: Vec<Instant>,
    pub confirmed: usize,
    /// Messages the broker did not confirm (nacked or returned): not counted as published.
    pub refused: Vec<usize>,
}

impl Published {
    pub fn index(&self, id: &str) -> Option<usize> {
        id.strip_prefix(&self.prefix)?.strip_prefix('-')?.parse().ok()
    }

    pub fn ids(&self) -> Vec<String> {
        (0..self.due.len())
            .filter(|i| self.refused.binary_search(i).is_err())
            .map(|i| format!("{}-{i}", self.prefix))
            .collect()
    }

    /// How late each message was handed to its connection, in ms.
    pub fn lags_ms(&self) -> Vec<f64> {
        self.sent
            .iter()
            .zip(&self.due)
            .map(|(s, d)| s.saturating_duration_since(*d).as_secs_f64() * 1e3)
            .collect()
    }

    /// Seconds the publisher ran behind its schedule at most.
    pub fn max_lag(&self) -> f64 {
        self.lags_ms().into_iter().fold(0.0, f64::max) / 1e3
    }
}

/// Publishing connections of the open-loop publisher: one lapin connection (one I/O thread) falls
/// behind a schedule of ~10,000 msg/s on this machine.
const PUBLISHERS: usize = 4;

/// Publishes to `queue` (which exists) at `rate` messages a second for `secs`, each at its due time
/// whatever the consumers do (open loop), message i from connection i mod [`PUBLISHERS`]. `stamp`
/// writes the due time into the `timestamp` property.
pub async fn open_loop(
    uri: &str,
    queue: &str,
    prefix: &str,
    size: usize,
    rate: f64,
    secs: f64,
    stamp: bool,
) -> Result<Published> {
    let n = (rate * secs).round() as usize;
    let mut channels = Vec::with_capacity(PUBLISHERS);
    for _ in 0..PUBLISHERS {
        channels.push(channel(uri).await?);
    }
    let start = Instant::now();
    let wall = SystemTime::now();
    let tasks = channels.into_iter().enumerate().map(|(k, (conn, ch))| {
        let (queue, prefix) = (queue.to_owned(), prefix.to_owned());
        tokio::spawn(async move {
            let mut pending = Vec::with_capacity(n / PUBLISHERS + 1);
            let mut sent = Vec::with_capacity(n / PUBLISHERS + 1);
            for i in (k..n).step_by(PUBLISHERS) {
                let offset = Duration::from_secs_f64(i as f64 / rate);
                let at = start + offset;
                if at > Instant::now() {
                    tokio::time::sleep_until(at.into()).await;
                }
                sent.push(Instant::now());
                let id = format!("{prefix}-{i}");
                let stamped = stamp.then(|| wall + offset);
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &body(&id, size),
                        props(&id, stamped),
                    )
                    .await?;
                pending.push((i, confirm));
            }
            let mut refused = Vec::new();
            for (i, c) in pending {
                if !matches!(c.await?, Confirmation::Ack(None)) {
                    refused.push(i);
                }
            }
            let _ = conn.close(200, "published".into()).await;
            Ok::<_, anyhow::Error>((refused, sent))
        })
    });
    let mut refused = Vec::new();
    let mut sent_at = vec![start; n];
    for (k, r) in try_join_all(tasks).await?.into_iter().enumerate() {
        let (r, sent) = r?;
        refused.extend(r);
        for (i, t) in (k..n).step_by(PUBLISHERS).zip(sent) {
            sent_at[i] = t;
        }
    }
    refused.sort_unstable();
    let due = (0..n)
        .map(|i| start + Duration::from_secs_f64(i as f64 / rate))
        .collect();
    Ok(Published {
        prefix: prefix.to_owned(),
        confirmed: n - refused.len(),
        due,
        sent: sent_at,
        refused,
    })
}
