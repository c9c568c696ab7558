//! What the leader knows of each Webhooks fleet (an Integration with `spec.webhooks`) between
//! reconciles: what its last compile decided of each Webhook, and what its workers reported. The reports
//! arrive on the broker ([`hookfleet_crds::contract::webhooks::reports_queue`]): one consumer per fleet,
//! started and stopped with the Integration, folds them into per-Webhook aggregates in memory
//! ([`crate::core::webhooks::Agg`]). Nothing here writes to the API server.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hookfleet_crds::contract::webhooks::{REPORTS_MAX_LENGTH, REPORTS_TTL_MS, Report};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use rand::Rng;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::core::webhooks::{Agg, Decided};

/// Per Webhook name, what its workers reported.
pub type Aggregates = Arc<Mutex<HashMap<String, Agg>>>;

/// Reports read before their acks are due: the broker sends at most this many unacknowledged.
const PREFETCH: u16 = 256;
/// How long a connect or a declare may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);
/// The reconnect backoff: full jitter below a cap doubling from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Every fleet this leader knows, keyed by `namespace/name` (`crate::memory::key`).
#[derive(Default)]
pub struct Fleets {
    map: Mutex<HashMap<String, Fleet>>,
}

#[derive(Default)]
struct Fleet {
    decided: Arc<BTreeMap<String, Decided>>,
    aggregates: Aggregates,
    consumer: Option<Consumer>,
}

struct Consumer {
    uris: String,
    queue: String,
    stop: watch::Sender<bool>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Fleets {
    /// Records what the last compile of fleet `key` decided of its Webhooks.
    pub fn set_decided(&self, key: &str, decided: BTreeMap<String, Decided>) {
        let mut map = self.map.lock().expect("fleets");
        map.entry(key.to_owned()).or_default().decided = Arc::new(decided);
    }

    /// What the last compile of fleet `key` decided (None: no compile yet).
    pub fn decided(&self, key: &str) -> Option<Arc<BTreeMap<String, Decided>>> {
        let map = self.map.lock().expect("fleets");
        map.get(key).map(|f| f.decided.clone())
    }

    /// What the workers of fleet `key` reported of Webhook `webhook`.
    pub fn aggregate(&self, key: &str, webhook: &str) -> Option<Agg> {
        let aggregates = {
            let map = self.map.lock().expect("fleets");
            map.get(key)?.aggregates.clone()
        };
        aggregates.lock().expect("aggregates").get(webhook).cloned()
    }

    /// Forgets Webhook `webhook`'s current run of failures (it was resumed).
    pub fn reset_run(&self, key: &str, webhook: &str) {
        let aggregates = {
            let map = self.map.lock().expect("fleets");
            match map.get(key) {
                Some(f) => f.aggregates.clone(),
                None => return,
            }
        };
        if let Some(a) = aggregates.lock().expect("aggregates").get_mut(webhook) {
            a.reset_run();
        }
    }

    /// Drops the aggregates of fleet `key`'s Webhooks that `keep` refuses (deleted Webhooks).
    pub fn retain_aggregates(&self, key: &str, keep: impl Fn(&str) -> bool) {
        let aggregates = {
            let map = self.map.lock().expect("fleets");
            match map.get(key) {
                Some(f) => f.aggregates.clone(),
                None => return,
            }
        };
        aggregates.lock().expect("aggregates").retain(|k, _| keep(k));
    }

    /// The fleets known.
    pub fn keys(&self) -> Vec<String> {
        self.map.lock().expect("fleets").keys().cloned().collect()
    }

    /// Consumes fleet `key`'s reports from `queue` on the broker of `uris` (a connection Secret's
    /// value): starts the consumer, or restarts it when the broker or the queue changed.
    pub fn consume(&self, key: &str, uris: &str, queue: &str) {
        let mut map = self.map.lock().expect("fleets");
        let fleet = map.entry(key.to_owned()).or_default();
        if fleet
            .consumer
            .as_ref()
            .is_some_and(|c| c.uris == uris && c.queue == queue)
        {
            return;
        }
        let (stop, stopped) = watch::channel(false);
        let task = consume(
            key.to_owned(),
            uris.to_owned(),
            queue.to_owned(),
            fleet.aggregates.clone(),
            stopped,
        );
        tokio::spawn(task);
        // Replacing the consumer drops (stops) the previous one.
        fleet.consumer = Some(Consumer {
            uris: uris.to_owned(),
            queue: queue.to_owned(),
            stop,
        });
    }

    /// Forgets fleet `key` and stops its consumer (the Integration was deleted, or has no Webhooks now).
    pub fn stop(&self, key: &str) {
        let gone = self.map.lock().expect("fleets").remove(key);
        if gone.is_some_and(|f| f.consumer.is_some()) {
            info!(integration = %key, "stopped consuming Webhook reports");
        }
    }

    /// Stops every consumer (the operator stops leading).
    pub fn close(&self) {
        self.map.lock().expect("fleets").clear();
    }
}

/// Folds `report` into `aggregates`.
pub fn fold(aggregates: &Mutex<HashMap<String, Agg>>, report: &Report) {
    let mut map = aggregates.lock().expect("aggregates");
    for (name, tally) in &report.webhooks {
        map.entry(name.clone())
            .or_default()
            .fold(&report.worker, report.at_ms, tally);
    }
}

/// The arguments of the reports queue, as the workers declare it (classic, durable).
pub fn reports_queue_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(REPORTS_MAX_LENGTH));
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(REPORTS_TTL_MS));
    args
}

/// The consumer of one fleet's reports until `stopped`: reconnects with jittered backoff.
async fn consume(
    key: String,
    uris: String,
    queue: String,
    aggregates: Aggregates,
    mut stopped: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        let session = session(&uris, &queue, &aggregates, &mut failures);
        tokio::select! {
            r = session => {
                if let Err(e) = r {
                    warn!(integration = %key, %queue, error = %e, "consuming Webhook reports");
                }
            }
            _ = stopped.wait_for(|s| *s) => return,
        }
        failures = failures.saturating_add(1);
        let cap = BACKOFF_FIRST
            .saturating_mul(1u32 << failures.min(6))
            .min(BACKOFF_MAX);
        let delay = cap.mul_f64(rand::rng().random_range(0.1..=1.0));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}

/// One connection's consume: returns only with why it ended. `failures` is reset once consuming.
async fn session(
    uris: &str,
    queue: &str,
    aggregates: &Mutex<HashMap<String, Agg>>,
    failures: &mut u32,
) -> Result<(), String> {
    let list = crate::broker::parse_uris(uris)?;
    let mut last = String::new();
    let mut conn = None;
    for uri in list {
        let props = ConnectionProperties::default().with_connection_name("hookfleet-operator-reports".into());
        match tokio::time::timeout(BROKER_TIMEOUT, Connection::connect(uri, props)).await {
            Ok(Ok(c)) => {
                conn = Some(c);
                break;
            }
            // Never the URI (it may hold a password).
            Ok(Err(e)) => last = e.to_string().replace(uri, "<uri>"),
            Err(_) => last = format!("no answer within {BROKER_TIMEOUT:?}"),
        }
    }
    let conn = conn.ok_or_else(|| format!("cannot connect to the broker: {last}"))?;
    let result = consume_on(&conn, queue, aggregates, failures).await;
    let _ = tokio::time::timeout(BROKER_TIMEOUT, conn.close(200, "done".into())).await;
    result
}

async fn consume_on(
    conn: &Connection,
    queue: &str,
    aggregates: &Mutex<HashMap<String, Agg>>,
    failures: &mut u32,
) -> Result<(), String> {
    let e = |e: lapin::Error| e.to_string();
    let mut ch = conn.create_channel().await.map_err(e)?;
    let declared = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            reports_queue_args(),
        )
        .await;
    if let Err(err) = declared {
        // Declared by a worker with other arguments: consume it as it is rather than not at all.
        warn!(%queue, error = %err, "the reports queue exists with other arguments; consuming it as it is");
        ch = conn.create_channel().await.map_err(e)?;
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(e)?;
    }
    ch.basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(e)?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "hookfleet-operator".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(e)?;
    info!(%queue, "consuming Webhook reports");
    *failures = 0;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.map_err(e)?;
        match serde_json::from_slice::<Report>(&delivery.data) {
            Ok(report) => fold(aggregates, &report),
            // A report this operator cannot read is dropped: a redelivery would not read better.
            Err(err) => debug!(%queue, error = %err, "an unreadable Webhook report"),
        }
        delivery.ack(BasicAckOptions::default()).await.map_err(e)?;
    }
    Err("the broker ended the consumer".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookfleet_crds::contract::webhooks::Tally;

    #[test]
    fn a_report_folds_into_each_webhooks_aggregate() {
        let aggs = Mutex::new(HashMap::new());
        let report = Report {
            worker: "w1".into(),
            at_ms: 10,
            webhooks: BTreeMap::from([
                (
                    "a".into(),
                    Tally {
                        delivered: 2,
                        ..Tally::default()
                    },
                ),
                (
                    "b".into(),
                    Tally {
                        failed: 1,
                        consecutive_failures: 1,
                        ..Tally::default()
                    },
                ),
            ]),
        };
        fold(&aggs, &report);
        fold(&aggs, &report);
        let map = aggs.lock().unwrap();
        assert_eq!(map["a"].delivered, 4);
        assert_eq!(
            map["b"].consecutive_failures(),
            1,
            "a worker's trailing count, not a sum of its reports"
        );
    }
}
