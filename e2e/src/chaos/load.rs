//! The steady load: one publisher at a fixed rate with publisher confirms, over the broker cluster's nodes.
//! When a node goes away (or a confirm does not come within [`CONFIRM_TIMEOUT`]), it connects to the next
//! node and publishes the unconfirmed batch again: those re-sends are counted apart, and may reach the
//! sink twice (the broker may have stored the first copy).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};

use crate::messages;

/// How long a batch may wait for its confirms before the publisher gives up on the connection.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages sent together (then confirmed together) at most.
const BATCH: usize = 500;

/// What the publisher did, shared with whoever accounts for it.
#[derive(Default)]
pub struct Published {
    /// Every id handed to the broker at least once, in order, with the time of its first send.
    pub sent: Vec<(String, Instant)>,
    /// Ids whose latest send the broker confirmed.
    pub confirmed: usize,
    /// Sends of an id beyond its first (after a failed or unconfirmed batch).
    pub resends: u64,
    /// Connections opened after the first.
    pub reconnects: u64,
    pub last_error: Option<String>,
}

impl Published {
    /// First-send time of each id.
    pub fn sent_at(&self) -> HashMap<String, Instant> {
        self.sent.iter().cloned().collect()
    }
}

/// Publishes `rate` messages per second (ids `chaos-0`, `chaos-1`, …) to `queue`, which must exist, until
/// `stop`; then goes on until everything generated is confirmed (or `drain` has passed). Returns the ids
/// never confirmed.
pub async fn run(
    uris: Vec<String>,
    queue: String,
    rate: f64,
    state: Arc<Mutex<Published>>,
    stop: Arc<AtomicBool>,
    drain: Duration,
) -> Vec<String> {
    let t0 = Instant::now();
    let mut stopped_at: Option<Instant> = None;
    let mut generated = 0u64;
    let mut pending: Vec<String> = Vec::new();
    let mut node = 0usize;
    let mut session: Option<(Connection, Channel)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if stopped_at.is_none() && stop.load(Ordering::SeqCst) {
            stopped_at = Some(Instant::now());
        }
        if stopped_at.is_none() {
            let due = (t0.elapsed().as_secs_f64() * rate) as u64;
            while generated < due {
                pending.push(format!("chaos-{generated}"));
                generated += 1;
            }
        }
        if pending.is_empty() {
            if stopped_at.is_some() {
                return pending;
            }
            continue;
        }
        if stopped_at.is_some_and(|t| t.elapsed() > drain) {
            return pending;
        }
        if session.is_none() {
            match connect(&uris[node % uris.len()], &queue).await {
                Ok(s) => session = Some(s),
                Err(e) => {
                    state.lock().unwrap().last_error = Some(format!("{e:#}"));
                    node += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
            if node > 0 {
                state.lock().unwrap().reconnects += 1;
            }
        }
        let Some((conn, ch)) = &session else { continue };
        let batch: Vec<String> = pending.iter().take(BATCH).cloned().collect();
        {
            let mut st = state.lock().unwrap();
            let now = Instant::now();
            let known = st.sent.len();
            // Ids are generated in order, so the new ones of a batch are its tail.
            let first_new = batch
                .iter()
                .position(|id| index(id) >= known as u64)
                .unwrap_or(batch.len());
            st.resends += first_new as u64;
            st.sent
                .extend(batch[first_new..].iter().map(|id| (id.clone(), now)));
        }
        let bodies: Vec<(String, Vec<u8>)> =
            batch.iter().map(|id| (id.clone(), messages::body(id))).collect();
        match tokio::time::timeout(CONFIRM_TIMEOUT, messages::publish_batch(ch, &queue, &bodies)).await {
            Ok(Ok(())) => {
                pending.drain(..batch.len());
                state.lock().unwrap().confirmed += batch.len();
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => format!("no confirms within {CONFIRM_TIMEOUT:?}"),
                };
                state.lock().unwrap().last_error = Some(why);
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    conn.close(200, "chaos: moving to another node".into()),
                )
                .await;
                session = None;
                node += 1;
            }
        }
    }
}

/// The number in `chaos-<n>`.
fn index(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}

async fn connect(uri: &str, queue: &str) -> Result<(Connection, Channel)> {
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await??;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
        .await?;
    Ok((conn, ch))
}
