//! What the leader knows of each Webhooks fleet (an Integration with `spec.webhooks`) between
//! reconciles: what its last compile decided of each Webhook, and what its workers reported. The reports
//! arrive on the broker the fleet consumes from ([`ReportsFrom`]): a RabbitMQ queue
//! ([`hookfleet_crds::contract::webhooks::reports_queue`]) or, on a NATS source, a JetStream stream
//! ([`hookfleet_crds::contract::webhooks::nats::reports_stream`]). One consumer per fleet, started and
//! stopped with the Integration, folds them into per-Webhook aggregates in memory
//! ([`crate::core::webhooks::Agg`]). Nothing here writes to the API server.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use futures::StreamExt;
use hookfleet_crds::contract::webhooks::nats::{REPORTS_CONSUMER, reports_stream, reports_subject};
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
/// How often the NATS server says it is there while no report arrives: two missed, and the consumer
/// connects anew.
const NATS_HEARTBEAT: Duration = Duration::from_secs(15);
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

/// Where a fleet's reports are consumed from: the connection Secret's value, and what the fleet's source
/// names the reports by. Two equal values consume the same reports the same way (the consumer is kept).
#[derive(Clone, PartialEq, Eq)]
pub enum ReportsFrom {
    /// The RabbitMQ queue `queue` ([`hookfleet_crds::contract::webhooks::reports_queue`]) on the brokers
    /// of `uris` (one URI, or several separated by commas or whitespace).
    Amqp { uris: String, queue: String },
    /// The JetStream reports stream of the fleet whose work stream's durable consumer is `consumer`
    /// (`spec.source.queue`), on the NATS servers of `urls` (separated by commas or whitespace), logged
    /// in with a credentials file's content or a token when given.
    Nats {
        urls: String,
        credentials: Option<String>,
        token: Option<String>,
        consumer: String,
    },
}

impl ReportsFrom {
    /// What a log line may name: the queue or the stream, never a URL or a credential.
    fn place(&self) -> String {
        match self {
            ReportsFrom::Amqp { queue, .. } => queue.clone(),
            ReportsFrom::Nats { consumer, .. } => reports_stream(consumer),
        }
    }
}

impl std::fmt::Debug for ReportsFrom {
    // The URIs and the credentials stay out of any log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReportsFrom::Amqp { queue, .. } => f
                .debug_struct("Amqp")
                .field("queue", queue)
                .finish_non_exhaustive(),
            ReportsFrom::Nats { consumer, .. } => f
                .debug_struct("Nats")
                .field("consumer", consumer)
                .finish_non_exhaustive(),
        }
    }
}

struct Consumer {
    from: ReportsFrom,
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

    /// Consumes fleet `key`'s reports from `queue` on the RabbitMQ broker of `uris` (a connection Secret's
    /// value): [`Fleets::consume_from`] with [`ReportsFrom::Amqp`].
    pub fn consume(&self, key: &str, uris: &str, queue: &str) {
        self.consume_from(
            key,
            ReportsFrom::Amqp {
                uris: uris.to_owned(),
                queue: queue.to_owned(),
            },
        );
    }

    /// Consumes fleet `key`'s reports from `from`: starts the consumer, or restarts it when the broker,
    /// the credentials or the names changed.
    pub fn consume_from(&self, key: &str, from: ReportsFrom) {
        let mut map = self.map.lock().expect("fleets");
        let fleet = map.entry(key.to_owned()).or_default();
        if fleet.consumer.as_ref().is_some_and(|c| c.from == from) {
            return;
        }
        let (stop, stopped) = watch::channel(false);
        let task = consume(key.to_owned(), from.clone(), fleet.aggregates.clone(), stopped);
        tokio::spawn(task);
        // Replacing the consumer drops (stops) the previous one.
        fleet.consumer = Some(Consumer { from, stop });
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

/// The reports stream of a NATS fleet whose work stream's durable consumer is `consumer`, as the workers
/// create it too (whichever side comes first creates it; an existing one is used as it is): work-queue
/// retention (a report is gone once the operator acked it), at most [`REPORTS_MAX_LENGTH`] reports of at
/// most [`REPORTS_TTL_MS`] age, the oldest dropped first, like the RabbitMQ reports queue.
pub fn nats_reports_stream_config(consumer: &str) -> jetstream::stream::Config {
    serde_json::from_value(hookfleet_crds::contract::webhooks::nats::reports_stream_config(
        consumer,
    ))
    .expect("the contract's reports stream reads as a stream config")
}

/// The consumer of one fleet's reports until `stopped`: reconnects with jittered backoff.
async fn consume(key: String, from: ReportsFrom, aggregates: Aggregates, mut stopped: watch::Receiver<bool>) {
    let mut failures = 0u32;
    let place = from.place();
    loop {
        let session = async {
            match &from {
                ReportsFrom::Amqp { uris, queue } => session(uris, queue, &aggregates, &mut failures).await,
                ReportsFrom::Nats {
                    urls,
                    credentials,
                    token,
                    consumer,
                } => {
                    let (credentials, token) = (credentials.as_deref(), token.as_deref());
                    nats_session(urls, credentials, token, consumer, &aggregates, &mut failures).await
                }
            }
        };
        tokio::select! {
            r = session => {
                if let Err(e) = r {
                    warn!(integration = %key, reports = %place, error = %e, "consuming Webhook reports");
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

/// One NATS connection's consume of the reports stream of `consumer`'s fleet (its durable consumer
/// [`REPORTS_CONSUMER`], created if missing, as the stream is): returns only with why it ended. `failures`
/// is reset once consuming.
async fn nats_session(
    urls: &str,
    credentials: Option<&str>,
    token: Option<&str>,
    consumer: &str,
    aggregates: &Mutex<HashMap<String, Agg>>,
    failures: &mut u32,
) -> Result<(), String> {
    // The messages never show a URL nor the credentials.
    let client = crate::nats::connect_to(urls, credentials, token, "hookfleet-operator-reports")
        .await
        .map_err(|(_, message)| message)?;
    let mut js = jetstream::new(client);
    js.set_timeout(BROKER_TIMEOUT);
    let name = reports_stream(consumer);
    let stream = js
        .get_or_create_stream(nats_reports_stream_config(consumer))
        .await
        .map_err(|e| format!("creating or reading stream {name}: {e}"))?;
    let reader: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            REPORTS_CONSUMER,
            pull::Config {
                durable_name: Some(REPORTS_CONSUMER.into()),
                ack_policy: AckPolicy::Explicit,
                filter_subject: reports_subject(consumer),
                max_ack_pending: i64::from(PREFETCH),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("creating or reading consumer {REPORTS_CONSUMER} of stream {name}: {e}"))?;
    let mut messages = reader
        .stream()
        .max_messages_per_batch(usize::from(PREFETCH))
        .heartbeat(NATS_HEARTBEAT)
        .messages()
        .await
        .map_err(|e| format!("pulling from stream {name}: {e}"))?;
    info!(stream = %name, "consuming Webhook reports");
    *failures = 0;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| format!("pulling from stream {name}: {e}"))?;
        match serde_json::from_slice::<Report>(&message.payload) {
            Ok(report) => fold(aggregates, &report),
            // A report this operator cannot read is dropped: a redelivery would not read better.
            Err(err) => debug!(stream = %name, error = %err, "an unreadable Webhook report"),
        }
        message
            .ack()
            .await
            .map_err(|e| format!("acking a report on stream {name}: {e}"))?;
    }
    Err("the NATS server ended the consumer".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookfleet_crds::contract::webhooks::Tally;

    #[test]
    fn a_reports_source_shows_no_url_and_no_credential() {
        let nats = ReportsFrom::Nats {
            urls: "nats://u:s3cret@h:4222".into(),
            credentials: Some("-----BEGIN NATS USER JWT-----".into()),
            token: Some("t0ken".into()),
            consumer: "hooks".into(),
        };
        let amqp = ReportsFrom::Amqp {
            uris: "amqp://u:s3cret@h:5672".into(),
            queue: "events.webhook-reports".into(),
        };
        for from in [&nats, &amqp] {
            let shown = format!("{from:?} {}", from.place());
            for secret in ["s3cret", "JWT", "t0ken"] {
                assert!(!shown.contains(secret), "{shown}");
            }
        }
        assert_eq!(nats.place(), "hooks-reports");
        // Another token is another login: the consumer restarts.
        let other = ReportsFrom::Nats {
            urls: "nats://u:s3cret@h:4222".into(),
            credentials: Some("-----BEGIN NATS USER JWT-----".into()),
            token: Some("t1ken".into()),
            consumer: "hooks".into(),
        };
        assert_ne!(nats, other);
    }

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
