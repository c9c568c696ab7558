//! The NATS JetStream source: a durable pull consumer on a stream, shared by the fleet, feeding the same
//! consume loop (`consume`), delivery pipeline (`delivery`) and settle site (`settlement`) as RabbitMQ,
//! through [`Settle`]:
//!
//! - a JetStream message becomes a lapin [`Delivery`] ([`delivery`]): the subject is the routing key
//!   (the event name a template or a Webhook sees), the NATS headers are the properties' headers,
//!   `Nats-Msg-Id` (else `<stream>-<sequence>`) is the message id, and JetStream's count of deliveries
//!   is both the attempts before this one and `x-delivery-count`;
//! - ack after a 2xx: `+ACK`, confirmed by the server (double ack);
//! - a retry is JetStream's own: `-NAK` with the backoff's delay; the message stays in the stream and
//!   comes back after it (no delay queues);
//! - a dead letter is published to the dead-letter subject and confirmed by JetStream (its `PubAck`:
//!   a stream stored it) before the original is terminated (`+TERM`);
//! - a delivery that takes longer than a third of AckWait is kept with in-progress acks (`+WPI`), so
//!   JetStream does not hand it to another worker meanwhile;
//! - the delivery limit: the consumer's `MaxDeliver` is `--max-attempts` + 1. Every delivery counts as
//!   an attempt; a message whose last attempt never settled (the worker died during it) gets one more
//!   delivery, on which it is dead-lettered unattempted (`delivery_limit`) rather than dropped by
//!   JetStream;
//! - a shutdown stops pulling, lets in-flight deliveries finish within the grace period, and naks
//!   what is left, so another worker takes it at once instead of after AckWait.
//!
//! With Webhooks (`--webhooks-secret`) a Webhook's retry cannot be a nak of the original (that would bring the
//! message back to every Webhook): each copy to retry is published as a JetStream message schedule
//! ([`Schedules`], nats-server 2.12+) in the stream `<consumer>-retry`, fired at its due time to
//! `hookfleet.retry.<consumer>`, which the retry lane consumes through a second durable consumer (also
//! `<consumer>-retry`) beside the work stream's, in the shared slots (`lanes`). The original is acked once
//! every copy is stored (`settlement::settle_copies`). The reports go to the stream `<consumer>-reports`.
//!
//! With `--topology managed` the worker creates the durable consumer (and a stream for the dead-letter
//! subject, `<consumer>-dead`, when no stream captures it) and updates the consumer's settings to its
//! own; with `external` it checks that they exist (exit `QUEUES_MISSING` naming what is missing). The
//! work stream is never the worker's: it must exist. A dead-letter subject the work stream captures is
//! refused (`QUEUE_MISMATCH`): dead letters would come back to the consumer.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamByNameErrorKind, GetStreamErrorKind};
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{HeaderMap, Subject};
use futures::StreamExt;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::consume::Interrupts;
use super::error::{CONNECT_TIMEOUT, SessionError};
use super::fate::Store;
use super::lanes::{FreshWait, Lane};
use super::pubacks::publish_confirmed;
use super::settle::{PublishError, Settle};
use super::shared::{ReportSink, Worker};
use crate::config::{Config, NatsSource, redact_uri};
use crate::message::{H_ATTEMPTS, H_DEAD_AT, H_FIRST_SEEN, H_LAST_STATUS, H_NEXT_DELAY};
use crate::metrics::Metrics;
use hookfleet_crds::contract::webhooks::nats as webhooks_nats;
use hookfleet_crds::integration::Topology;

/// The worker's headers that hold numbers (a copy's, read back from text).
const INT_HEADERS: [&str; 5] = [H_ATTEMPTS, H_FIRST_SEEN, H_LAST_STATUS, H_NEXT_DELAY, H_DEAD_AT];

/// The retry stream's metadata key naming the work stream whose consumer it serves: a retry stream of
/// the same name serving another work stream (another Integration with the same consumer name on the same
/// NATS account) is refused rather than shared.
const WORK_STREAM_KEY: &str = "hookfleet.io/work-stream";

/// The header JetStream's count of earlier deliveries is written to (the name the external RabbitMQ
/// topology's check reads, `delivery::delivery_count`).
const DELIVERY_COUNT: &str = "x-delivery-count";

impl Worker {
    /// One NATS connection: find (or create) the consumer, consume until shutdown (Ok) or until the
    /// session fails (Err), then drain and hand back what is left.
    pub(super) async fn jetstream_session(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        let nats = self.cfg.nats.as_ref().expect("a NATS source");
        let client = tokio::select! {
            c = connect(&self.cfg, nats, self.metrics.clone()) => c?,
            _ = shutdown.wait_for(|s| *s) => {
                self.drain().await;
                return Ok(());
            }
        };
        self.metrics.broker_connected.set(1);
        let js = jetstream::new(client.clone());
        let schedules = self.cfg.webhooks.is_some().then(|| Schedules {
            prefix: webhooks_nats::schedule_prefix(&self.cfg.queue),
            target: webhooks_nats::retry_subject(&self.cfg.queue),
        });
        let settle = Arc::new(JetStreamSettle::new(
            js.clone(),
            self.cfg.confirm_timeout,
            schedules,
        ));
        let result = self.jetstream_consume(&js, nats, &settle, &mut shutdown).await;
        self.metrics.consuming.set(0);
        if result.is_err() {
            self.metrics.broker_connected.set(0);
            self.set_report_session(None);
        }
        // Shutdown or failure alike: in-flight deliveries finish and settle (those that still can),
        // then whatever is still held goes back now. The pull request is gone with its subscription;
        // the flush makes sure the server saw that before the naks, so that it does not hand them
        // straight back to this worker's dead request.
        self.drain().await;
        if result.is_ok() {
            // The last report, through the connection still open.
            self.report().await;
            self.set_report_session(None);
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
        let handed_back = settle.nak_all().await;
        if handed_back > 0 {
            // The naks are written before the connection closes.
            let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
            info!(handed_back, "handed the unsettled messages back to JetStream");
        }
        if let Err(e) = tokio::time::timeout(Duration::from_secs(5), client.drain()).await {
            warn!(error = %e, "closing the NATS connection timed out");
        }
        self.metrics.broker_connected.set(0);
        if result.is_ok() {
            info!("closed the NATS connection");
        }
        result
    }

    async fn jetstream_consume(
        self: &Arc<Self>,
        js: &jetstream::Context,
        nats: &NatsSource,
        settle: &Arc<JetStreamSettle>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        let (consumer, work) = prepare(js, &self.cfg, nats).await?;
        let retries = match self.cfg.webhooks {
            Some(_) => {
                let c = prepare_webhooks(js, &self.cfg, nats, &work).await?;
                self.set_report_session(Some(ReportSink::Nats(Box::new(js.clone()))));
                Some(c)
            }
            None => None,
        };
        let progress = settle.keep_in_progress(nats.ack_wait / 3);
        let batch = usize::from(self.cfg.lane_prefetch());
        self.metrics.consuming.set(1);
        info!(stream = %nats.stream, consumer = %self.cfg.queue, subjects = ?nats.subjects,
              dead_letter_subject = %self.cfg.dead_letter_queue, batch, ack_wait = ?nats.ack_wait,
              max_attempts = self.cfg.max_attempts, concurrency = self.cfg.concurrency, "consuming");
        let interrupts = || JetStreamLane {
            shutdown: shutdown.clone(),
            publish_failed: &settle.publish_failed,
        };
        let fresh = self.jetstream_lane(consumer, Lane::Fresh(FreshWait::default()), settle, interrupts());
        let result = match retries {
            None => fresh.await,
            Some(retries) => {
                info!(consumer = %webhooks_nats::retry_stream(&self.cfg.queue),
                      subject = %webhooks_nats::retry_subject(&self.cfg.queue),
                      shared_slots = self.lanes.shared(), "retry lane consuming");
                let retries = self.jetstream_lane(retries, Lane::Retries, settle, interrupts());
                tokio::pin!(fresh, retries);
                // A lane that ends Ok saw the shutdown, and so does the other; one that fails ends both.
                tokio::select! {
                    r = &mut fresh => match r {
                        Ok(()) => retries.await,
                        Err(e) => Err(e),
                    },
                    r = &mut retries => match r {
                        Ok(()) => fresh.await,
                        Err(e) => Err(e),
                    },
                }
            }
        };
        progress.abort();
        result
    }

    /// One lane's consume loop on `consumer` (the work stream's, or with Webhooks the retry stream's),
    /// until a shutdown (then the rest of the current pull request is taken and held, so that the
    /// hand-back naks it instead of leaving it to AckWait) or a failure.
    async fn jetstream_lane(
        self: &Arc<Self>,
        consumer: PullConsumer,
        mut lane: Lane,
        settle: &Arc<JetStreamSettle>,
        mut interrupts: JetStreamLane<'_>,
    ) -> Result<(), SessionError> {
        let batch = usize::from(self.cfg.lane_prefetch());
        let stopping = Arc::new(AtomicBool::new(false));
        let held = settle.clone();
        let mut deliveries = Box::pin(pulls(consumer, batch, stopping.clone()).then(move |m| {
            let held = held.clone();
            async move {
                match m {
                    Ok(m) => delivery(m, &held).await.map_err(SessionError::Nats),
                    Err(e) => Err(SessionError::Nats(format!("pulling messages: {e}"))),
                }
            }
        }));
        let result = self
            .consume_lane(&mut deliveries, &mut lane, settle, &mut interrupts)
            .await;
        if result.is_ok() {
            // The rest of the current pull request (no new one is made): converting holds each message.
            stopping.store(true, Ordering::Relaxed);
            let mut rest = 0;
            while let Ok(Some(Ok(_))) =
                tokio::time::timeout(Duration::from_millis(200), deliveries.next()).await
            {
                rest += 1;
            }
            let lane = match lane {
                Lane::Fresh(_) => "fresh",
                Lane::Retries => "retries",
            };
            info!(lane, rest_of_the_pull = rest, "shutdown: stopped pulling");
        }
        result
    }
}

/// How long one pull request waits for messages before the server ends it (408). No idle heartbeats:
/// async-nats 0.52's batch stream returns `Pending` on a heartbeat without waiting for the next
/// message, so a message after a heartbeat would sit unread until the request's client-side timer
/// (seen: a nak'd retry came 8 s late). A dead connection shows as the client's failed pings and the
/// next pull request failing.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// The consumer's messages, one pull request of `batch` at a time: the next request is made only once
/// the loop took every message of the last one, so a worker never holds more than `batch` messages
/// besides those in delivery; once `stopping`, no new request is made.
fn pulls(
    consumer: PullConsumer,
    batch: usize,
    stopping: Arc<AtomicBool>,
) -> impl futures::Stream<Item = Result<jetstream::Message, String>> + Send {
    futures::stream::unfold((consumer, None::<pull::Batch>), move |(consumer, mut current)| {
        let stopping = stopping.clone();
        async move {
            loop {
                if let Some(b) = current.as_mut()
                    && let Some(m) = b.next().await
                {
                    return Some((m.map_err(|e| e.to_string()), (consumer, current)));
                }
                // The last request is over (or there was none): a new one, unless stopping.
                if stopping.load(Ordering::Relaxed) {
                    return None;
                }
                match consumer
                    .batch()
                    .max_messages(batch)
                    .expires(PULL_EXPIRES)
                    .messages()
                    .await
                {
                    Ok(b) => current = Some(b),
                    Err(e) => return Some((Err(e.to_string()), (consumer, None))),
                }
            }
        }
    })
}

/// Connects to the first server that answers (the client tries them in turn, and reconnects on its
/// own with the worker's jittered backoff; `broker_connected` follows its events).
async fn connect(
    cfg: &Config,
    nats: &NatsSource,
    metrics: Arc<Metrics>,
) -> Result<async_nats::Client, SessionError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!(
            "hookfleet-worker {} {}",
            cfg.integration,
            std::process::id()
        ))
        .connection_timeout(CONNECT_TIMEOUT)
        .ping_interval(Duration::from_secs(10))
        .reconnect_delay_callback(|attempts| super::reconnect_delay(attempts.max(1) as u32, &mut rand::rng()))
        .event_callback(move |event| {
            let metrics = metrics.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        info!("NATS connection (re)established");
                        metrics.broker_connected.set(1);
                    }
                    async_nats::Event::Disconnected => {
                        warn!("NATS connection lost; the client reconnects");
                        metrics.broker_connected.set(0);
                    }
                    other => info!(event = %other, "NATS connection event"),
                }
            }
        });
    if let Some(path) = &nats.creds_file {
        opts = opts.credentials_file(path).await.map_err(|e| {
            SessionError::Nats(format!("reading the credentials file {}: {e}", path.display()))
        })?;
    }
    if let Some(token) = &nats.token {
        opts = opts.token(token.clone());
    }
    let shown: Vec<String> = nats.urls.iter().map(|u| redact_uri(u)).collect();
    info!(servers = ?shown, "connecting to NATS");
    let addrs: Vec<async_nats::ServerAddr> = nats
        .urls
        .iter()
        .map(|u| u.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| SessionError::Nats(format!("a server URL: {e}")))?;
    let client = opts
        .connect(addrs)
        .await
        .map_err(|e| SessionError::Nats(format!("connecting to NATS ({}): {e}", shown.join(", "))))?;
    info!(servers = ?shown, "connected to NATS");
    Ok(client)
}

/// The durable consumer and the work stream's config, after checking the stream, the dead-letter
/// subject's stream and the consumer's settings (managed: created or updated to the worker's; external:
/// they must exist).
async fn prepare(
    js: &jetstream::Context,
    cfg: &Config,
    nats: &NatsSource,
) -> Result<(PullConsumer, jetstream::stream::Config), SessionError> {
    let managed = cfg.topology == Topology::Managed;
    let mut missing = Vec::new();
    let stream = match js.get_stream(&nats.stream).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Err(SessionError::NatsMissing {
                missing: vec![format!("stream {}", nats.stream)],
            });
        }
        Err(e) => {
            return Err(SessionError::Nats(format!(
                "looking up stream {}: {e}",
                nats.stream
            )));
        }
    };
    // `get_stream` read the stream's info: no second request.
    let info = stream.cached_info().clone();
    let dead = &cfg.dead_letter_queue;
    if let Some(pattern) = info.config.subjects.iter().find(|p| subject_matches(p, dead)) {
        return Err(SessionError::NatsMismatch(format!(
            "the dead-letter subject {dead} is captured by the work stream {} (its subject {pattern}): dead \
             letters would come back to the consumer; set --dead-letter-queue (spec.delivery.deadLetter.queue) \
             to a subject the work stream does not hold",
            nats.stream
        )));
    }
    match js.stream_by_subject(dead.clone()).await {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), GetStreamByNameErrorKind::NotFound) => {
            if managed {
                let name = format!("{}-dead", cfg.queue);
                js.create_stream(jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![dead.clone()],
                    num_replicas: info.config.num_replicas,
                    storage: info.config.storage,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    SessionError::Nats(format!("creating the dead-letter stream {name} for {dead}: {e}"))
                })?;
                info!(stream = %name, subject = %dead, replicas = info.config.num_replicas, "created the dead-letter stream");
            } else {
                missing.push(format!("stream capturing the dead-letter subject {dead}"));
            }
        }
        Err(e) => {
            return Err(SessionError::Nats(format!(
                "looking up the stream of {dead}: {e}"
            )));
        }
    }
    let have = existing_consumer(&stream, &cfg.queue).await?;
    if !missing.is_empty() || (have.is_none() && !managed) {
        if have.is_none() {
            missing.insert(
                0,
                format!("durable consumer {} on stream {}", cfg.queue, nats.stream),
            );
        }
        return Err(SessionError::NatsMissing { missing });
    }
    let consumer = open_durable(&stream, have, consumer_config(cfg, nats), cfg).await?;
    Ok((consumer, info.config))
}

/// With Webhooks: the retry stream and the retry lane's durable consumer on it (managed: created when
/// missing; external: they must exist), and the reports stream (created when missing, as the operator
/// does; a worker that cannot create it keeps its reports until it can publish them).
async fn prepare_webhooks(
    js: &jetstream::Context,
    cfg: &Config,
    nats: &NatsSource,
    work: &jetstream::stream::Config,
) -> Result<PullConsumer, SessionError> {
    let managed = cfg.topology == Topology::Managed;
    let name = webhooks_nats::retry_stream(&cfg.queue);
    let stream = match js.get_stream(&name).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
        {
            if !managed {
                return Err(SessionError::NatsMissing {
                    missing: vec![format!("stream {name} (the Webhooks' retry copies)")],
                });
            }
            let s = js
                .create_stream(retry_stream_config(&cfg.queue, work))
                .await
                .map_err(|e| SessionError::Nats(format!("creating the retry stream {name}: {e}")))?;
            info!(stream = %name, replicas = work.num_replicas, "created the Webhooks' retry stream");
            s
        }
        Err(e) => {
            return Err(SessionError::Nats(format!("looking up stream {name}: {e}")));
        }
    };
    let info = stream.cached_info();
    if let Some(owner) = info.config.metadata.get(WORK_STREAM_KEY)
        && owner != &nats.stream
    {
        return Err(SessionError::NatsMismatch(format!(
            "stream {name} holds the Webhook retries of consumer {queue} on the work stream {owner}, not on {work}: \
             the streams named after the consumer ({name}, {queue}-reports, {queue}-dead) are the NATS account's, so \
             two Integrations on one account need different consumer names (spec.source.queue)",
            queue = cfg.queue,
            work = nats.stream,
        )));
    }
    if !info.config.allow_message_schedules {
        return Err(SessionError::NatsMismatch(format!(
            "stream {name} does not allow message schedules: a Webhook's retry copy waits for its due time as \
             one; it needs nats-server 2.12 or later and the stream's allow_msg_schedules"
        )));
    }
    let have = existing_consumer(&stream, &name).await?;
    if have.is_none() && !managed {
        return Err(SessionError::NatsMissing {
            missing: vec![format!("durable consumer {name} on stream {name}")],
        });
    }
    let consumer = open_durable(&stream, have, retry_consumer_config(cfg, nats), cfg).await?;
    let reports = webhooks_nats::reports_stream(&cfg.queue);
    if let Err(e) = js.get_or_create_stream(reports_stream_config(&cfg.queue)).await {
        warn!(stream = %reports, error = %e, "cannot find or create the reports stream; reports wait until they can be published");
    }
    Ok(consumer)
}

/// The retry stream: the schedules and the copies they fire, work-queue retention (a copy is gone once
/// acked), replicas and storage of the work stream.
fn retry_stream_config(consumer: &str, work: &jetstream::stream::Config) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: webhooks_nats::retry_stream(consumer),
        description: Some("hookfleet: Webhook retry copies, scheduled".into()),
        subjects: vec![
            format!("{}.>", webhooks_nats::schedule_prefix(consumer)),
            webhooks_nats::retry_subject(consumer),
        ],
        retention: jetstream::stream::RetentionPolicy::WorkQueue,
        allow_message_schedules: true,
        metadata: [(WORK_STREAM_KEY.to_owned(), work.name.clone())].into(),
        num_replicas: work.num_replicas,
        storage: work.storage,
        ..Default::default()
    }
}

/// The reports stream, as the operator creates it too (the contract's).
fn reports_stream_config(consumer: &str) -> jetstream::stream::Config {
    serde_json::from_value(webhooks_nats::reports_stream_config(consumer))
        .expect("the contract's reports stream reads as a stream config")
}

/// The durable consumer a managed topology wants: explicit acks, AckWait, MaxDeliver one more than the
/// attempts, the subject filters.
fn consumer_config(cfg: &Config, nats: &NatsSource) -> pull::Config {
    let mut c = pull::Config {
        durable_name: Some(cfg.queue.clone()),
        description: Some(format!("hookfleet workers of {}", cfg.integration)),
        ack_policy: AckPolicy::Explicit,
        ack_wait: nats.ack_wait,
        max_deliver: i64::from(cfg.max_attempts) + 1,
        ..Default::default()
    };
    match nats.subjects.as_slice() {
        [] => {}
        [one] => c.filter_subject = one.clone(),
        many => c.filter_subjects = many.to_vec(),
    }
    c
}

/// With Webhooks, the retry lane's durable consumer: the work consumer's acks, AckWait and MaxDeliver,
/// filtered on the retry stream's target subject alone (never the work subjects).
fn retry_consumer_config(cfg: &Config, nats: &NatsSource) -> pull::Config {
    pull::Config {
        durable_name: Some(webhooks_nats::retry_stream(&cfg.queue)),
        description: Some(format!(
            "hookfleet workers of {}: Webhook retries",
            cfg.integration
        )),
        filter_subject: webhooks_nats::retry_subject(&cfg.queue),
        filter_subjects: Vec::new(),
        ..consumer_config(cfg, nats)
    }
}

/// The durable consumer `name`'s settings on `stream`, or `None` when there is no such consumer.
async fn existing_consumer(
    stream: &jetstream::stream::Stream,
    name: &str,
) -> Result<Option<jetstream::consumer::Config>, SessionError> {
    match stream.consumer_info(name).await {
        Ok(i) => Ok(Some(i.config.clone())),
        Err(e)
            if matches!(e.kind(), ConsumerInfoErrorKind::NotFound)
                || matches!(e.kind(), ConsumerInfoErrorKind::JetStream(j) if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND) =>
        {
            Ok(None)
        }
        Err(e) => Err(SessionError::Nats(format!("looking up consumer {name}: {e}"))),
    }
}

/// Opens the durable consumer `wanted` names on `stream`, whose settings are `have` (`None`: it does not
/// exist, and is created; the caller refuses that with `--topology external`). It must ack explicitly;
/// managed, its settings are updated to `wanted`'s; external, its MaxDeliver must leave the worker room to
/// dead-letter a message first.
async fn open_durable(
    stream: &jetstream::stream::Stream,
    have: Option<jetstream::consumer::Config>,
    wanted: pull::Config,
    cfg: &Config,
) -> Result<PullConsumer, SessionError> {
    let name = wanted.durable_name.clone().unwrap_or_default();
    let Some(have) = have else {
        let max_deliver = wanted.max_deliver;
        let c = stream
            .create_consumer(wanted)
            .await
            .map_err(|e| SessionError::Nats(format!("creating consumer {name}: {e}")))?;
        info!(consumer = %name, stream = %stream.cached_info().config.name, max_deliver, "created the durable consumer");
        return Ok(c);
    };
    if have.ack_policy != AckPolicy::Explicit {
        return Err(SessionError::NatsMismatch(format!(
            "consumer {name} acks {:?}, not explicitly: the worker acks each message after its send",
            have.ack_policy
        )));
    }
    let theirs = Settings::existing(&have);
    if cfg.topology == Topology::Managed {
        if theirs != Settings::of(&wanted) {
            let c = stream
                .update_consumer(wanted)
                .await
                .map_err(|e| SessionError::Nats(format!("updating consumer {name}: {e}")))?;
            info!(consumer = %name, was = ?theirs, "updated the durable consumer's settings to the worker's");
            return Ok(c);
        }
    } else if have.max_deliver > 0 && have.max_deliver <= i64::from(cfg.max_attempts) {
        return Err(SessionError::NatsMismatch(format!(
            "consumer {name} has MaxDeliver {} ≤ --max-attempts {}: JetStream would drop a message before the \
             worker dead-letters it; set its MaxDeliver to at least {}, or -1",
            have.max_deliver,
            cfg.max_attempts,
            cfg.max_attempts + 1
        )));
    }
    stream
        .get_consumer::<pull::Config>(&name)
        .await
        .map_err(|e| SessionError::Nats(format!("opening consumer {name}: {e}")))
}

/// What the worker sets on a managed consumer, to compare an existing one's with.
#[derive(Debug, PartialEq, Eq)]
struct Settings {
    ack_wait: Duration,
    max_deliver: i64,
    filters: Vec<String>,
}

impl Settings {
    /// What `c` would set.
    fn of(c: &pull::Config) -> Self {
        Self::new(c.ack_wait, c.max_deliver, &c.filter_subject, &c.filter_subjects)
    }

    /// What an existing consumer has.
    fn existing(c: &jetstream::consumer::Config) -> Self {
        Self::new(c.ack_wait, c.max_deliver, &c.filter_subject, &c.filter_subjects)
    }

    fn new(ack_wait: Duration, max_deliver: i64, filter: &str, filters: &[String]) -> Self {
        let mut filters = filters.to_vec();
        if !filter.is_empty() {
            filters.push(filter.to_owned());
        }
        filters.sort();
        Self {
            ack_wait,
            max_deliver,
            filters,
        }
    }
}

/// Whether the subject `s` matches the pattern `p` (`*` one token, `>` the rest).
pub(crate) fn subject_matches(p: &str, s: &str) -> bool {
    let mut pt = p.split('.');
    let mut st = s.split('.');
    loop {
        match (pt.next(), st.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// What ends a NATS consume loop besides its message stream: a shutdown, or a copy (a dead letter, or
/// with Webhooks any copy) that was not stored.
struct JetStreamLane<'a> {
    shutdown: watch::Receiver<bool>,
    publish_failed: &'a Notify,
}

impl Interrupts for JetStreamLane<'_> {
    async fn interrupted(&mut self, _idle: bool) -> Result<(), SessionError> {
        tokio::select! {
            biased;
            _ = self.shutdown.wait_for(|s| *s) => Ok(()),
            _ = self.publish_failed.notified() => Err(SessionError::PublishFailed),
        }
    }
}

/// Settling on JetStream: each message the consumer yielded is held (its reply subject, under a local
/// tag) until it is acked, nak'd or terminated.
///
/// In-progress acks and naks are written under the lock of the held messages: an in-progress ack
/// written after a nak with a delay would restart the message's AckWait and undo the delay.
pub(super) struct JetStreamSettle {
    js: jetstream::Context,
    held: tokio::sync::Mutex<HashMap<u64, Subject>>,
    next_tag: AtomicU64,
    timeout: Duration,
    publish_failed: Notify,
    /// With Webhooks: where a Webhook's retry copy waits for its due time.
    schedules: Option<Schedules>,
}

/// A Webhook's retry copy is a JetStream message schedule (nats-server 2.12+): published on a subject
/// of its own under `prefix` with `Nats-Schedule: @at <due time>`, it is fired to `target` (the retry
/// lane's subject) when due, and the schedule is purged. The original's nak cannot carry one Webhook's
/// retry: it would bring the message back to every Webhook.
struct Schedules {
    prefix: String,
    target: String,
}

impl Schedules {
    /// The subject and the headers that schedule `props`'s copy to be fired `after` from now.
    fn schedule(&self, props: &BasicProperties, after: Duration) -> (String, HeaderMap) {
        let mut headers = nats_headers(props);
        let due = time::OffsetDateTime::now_utc() + after;
        let due = due
            .format(&time::format_description::well_known::Rfc3339)
            .expect("a time after now formats as RFC 3339");
        headers.insert("Nats-Schedule", format!("@at {due}").as_str());
        headers.insert("Nats-Schedule-Target", self.target.as_str());
        // One schedule per subject: a subject of its own for each copy.
        let id: u128 = rand::random();
        (format!("{}.{id:032x}", self.prefix), headers)
    }
}

impl JetStreamSettle {
    fn new(js: jetstream::Context, timeout: Duration, schedules: Option<Schedules>) -> Self {
        Self {
            js,
            held: tokio::sync::Mutex::new(HashMap::new()),
            next_tag: AtomicU64::new(1),
            timeout,
            publish_failed: Notify::new(),
            schedules,
        }
    }

    /// Publishes to `subject` and waits for JetStream's `PubAck`, within the confirm timeout
    /// ([`publish_confirmed`]).
    async fn publish_stored(
        &self,
        subject: String,
        headers: HeaderMap,
        body: &[u8],
    ) -> Result<(), PublishError> {
        publish_confirmed(&self.js, subject, headers, body, self.timeout).await
    }

    async fn hold(&self, reply: Subject) -> u64 {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        self.held.lock().await.insert(tag, reply);
        tag
    }

    /// Sends `kind` (an ack or a term) for `tag` and waits for the server to confirm it (bounded by
    /// the confirm timeout).
    async fn settle_with(&self, tag: u64, kind: AckKind) -> bool {
        let Some(reply) = self.held.lock().await.remove(&tag) else {
            return false;
        };
        let acker = Acker::new(self.js.clone(), Some(reply));
        match tokio::time::timeout(self.timeout, acker.double_ack_with(kind)).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                warn!(error = %e, ?kind, "JetStream did not confirm the ack; it redelivers the message after AckWait");
                false
            }
            Err(_) => {
                warn!(?kind, timeout = ?self.timeout, "no ack confirmation in time; JetStream redelivers the message after AckWait");
                false
            }
        }
    }

    /// Naks `tag` (JetStream redelivers it after `delay`, or now): written under the lock, so that no
    /// in-progress ack follows it. Not confirmed: a nak that is lost only means the redelivery comes
    /// after AckWait instead.
    async fn nak(&self, tag: u64, delay: Option<Duration>) -> bool {
        let mut held = self.held.lock().await;
        let Some(reply) = held.remove(&tag) else {
            return false;
        };
        Acker::new(self.js.clone(), Some(reply))
            .ack_with(AckKind::Nak(delay))
            .await
            .is_ok()
    }

    /// Naks every message still held (the session is ending): JetStream hands them to another worker
    /// now. Returns how many.
    async fn nak_all(&self) -> usize {
        let mut held = self.held.lock().await;
        let mut n = 0;
        for (_, reply) in held.drain() {
            if Acker::new(self.js.clone(), Some(reply))
                .ack_with(AckKind::Nak(None))
                .await
                .is_ok()
            {
                n += 1;
            }
        }
        n
    }

    /// Every `every`, an in-progress ack for each message held, so that a long send (or a wait for a
    /// slot) does not outlast AckWait and get the message delivered to another worker meanwhile.
    fn keep_in_progress(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        let every = every.max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else { return };
                let held = me.held.lock().await;
                for reply in held.values() {
                    let acker = Acker::new(me.js.clone(), Some(reply.clone()));
                    if let Err(e) = acker.ack_with(AckKind::Progress).await {
                        warn!(error = %e, "in-progress ack not sent");
                    }
                }
            }
        })
    }
}

impl Settle for JetStreamSettle {
    async fn ack(&self, tag: u64) -> bool {
        self.settle_with(tag, AckKind::Ack).await
    }

    async fn requeue(&self, d: &Delivery) -> bool {
        self.nak(d.delivery_tag, None).await
    }

    /// Publishes to `subject` and waits for JetStream's `PubAck` (a stream stored it).
    async fn publish(&self, subject: &str, body: &[u8], props: BasicProperties) -> Result<(), PublishError> {
        self.publish_stored(subject.to_owned(), nats_headers(&props), body)
            .await
    }

    /// A Webhook's retry (or deferral) is scheduled on the retry stream ([`Schedules`]); its dead
    /// letter goes to the dead-letter subject. Both confirmed by JetStream.
    async fn publish_copy(
        &self,
        store: &Store,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        match (store, &self.schedules) {
            (Store::Retry { next_in, .. } | Store::Defer { next_in, .. }, Some(schedules)) => {
                let (subject, headers) = schedules.schedule(&props, *next_in);
                self.publish_stored(subject, headers, body).await
            }
            _ => self.publish(queue, body, props).await,
        }
    }

    fn publish_failed(&self) {
        self.publish_failed.notify_one();
    }

    /// A retry (or a deferral) is JetStream's own: the original is nak'd with the delay and stays in
    /// the stream. A dead letter is published (PubAck) and the original then terminated.
    async fn store(
        &self,
        tag: u64,
        store: &Store,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<bool, PublishError> {
        match store {
            Store::Retry { next_in, .. } | Store::Defer { next_in, .. } => {
                Ok(self.nak(tag, Some(*next_in)).await)
            }
            Store::DeadLetter { .. } => {
                self.publish(queue, body, props).await?;
                Ok(self.settle_with(tag, AckKind::Term).await)
            }
        }
    }
}

/// A JetStream message as the pipeline takes it (see the module's docs), held in `settle` under the
/// delivery's tag.
async fn delivery(m: jetstream::Message, settle: &JetStreamSettle) -> Result<Delivery, String> {
    let info = m
        .info()
        .map_err(|e| format!("a message without JetStream metadata: {e}"))?;
    let delivered = u64::try_from(info.delivered).unwrap_or(1).max(1);
    let stream = info.stream.to_owned();
    let seq = info.stream_sequence;
    let published_ms = (info.published.unix_timestamp_nanos() / 1_000_000) as i64;
    let mut msg = m.message;
    let reply = msg.reply.take().ok_or("a message without a reply subject")?;
    let mut headers = FieldTable::default();
    let mut message_id = None;
    let mut content_type = None;
    if let Some(h) = &msg.headers {
        for (name, values) in h.iter() {
            let Some(v) = values.last() else { continue };
            let (name, v) = (name.to_string(), v.as_str());
            if name.eq_ignore_ascii_case("Nats-Msg-Id") {
                message_id = Some(v.to_owned());
            } else if name.eq_ignore_ascii_case("Content-Type") {
                content_type = Some(v.to_owned());
            } else if name.len() > 5 && name[..5].eq_ignore_ascii_case("Nats-") {
                // The server's own (a fired schedule's `Nats-Scheduler`, a publisher's expectations):
                // never carried onto a copy, where they would mean something else or refuse it.
                continue;
            } else if INT_HEADERS.contains(&name.as_str())
                && let Ok(n) = v.parse::<i64>()
            {
                // Our counts come back as text from a copy (NATS headers are text).
                headers.insert(ShortString::from(name), AMQPValue::LongLongInt(n));
            } else {
                headers.insert(
                    ShortString::from(name),
                    AMQPValue::LongString(LongString::from(v.as_bytes().to_vec())),
                );
            }
        }
    }
    if !headers.contains_key(H_ATTEMPTS) {
        headers.insert(
            ShortString::from(H_ATTEMPTS),
            AMQPValue::LongLongInt((delivered - 1) as i64),
        );
    }
    if !headers.contains_key(H_FIRST_SEEN) {
        headers.insert(
            ShortString::from(H_FIRST_SEEN),
            AMQPValue::LongLongInt(published_ms),
        );
    }
    headers.insert(
        ShortString::from(DELIVERY_COUNT),
        AMQPValue::LongLongInt((delivered - 1) as i64),
    );
    let mut props = BasicProperties::default()
        .with_message_id(ShortString::from(
            message_id.unwrap_or_else(|| format!("{stream}-{seq}")),
        ))
        .with_timestamp((published_ms / 1000).max(0) as u64)
        .with_headers(headers);
    if let Some(ct) = content_type {
        props = props.with_content_type(ShortString::from(ct));
    }
    let tag = settle.hold(reply).await;
    let mut d = Delivery::mock(
        tag,
        ShortString::from(""),
        ShortString::from(msg.subject.as_str()),
        delivered > 1,
        msg.payload.to_vec(),
    );
    d.properties = props;
    Ok(d)
}

/// The headers of a copy (a dead letter) as NATS headers: each AMQP value as text.
fn nats_headers(props: &BasicProperties) -> HeaderMap {
    let mut out = HeaderMap::new();
    if let Some(ct) = props.content_type() {
        out.insert("Content-Type", ct.as_str());
    }
    let Some(h) = props.headers() else { return out };
    for (k, v) in h.inner() {
        let text = match v {
            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            AMQPValue::ShortString(s) => s.as_str().to_owned(),
            AMQPValue::Boolean(b) => b.to_string(),
            AMQPValue::ShortShortInt(n) => n.to_string(),
            AMQPValue::ShortShortUInt(n) => n.to_string(),
            AMQPValue::ShortInt(n) => n.to_string(),
            AMQPValue::ShortUInt(n) => n.to_string(),
            AMQPValue::LongInt(n) => n.to_string(),
            AMQPValue::LongUInt(n) => n.to_string(),
            AMQPValue::LongLongInt(n) => n.to_string(),
            AMQPValue::Timestamp(n) => n.to_string(),
            _ => continue,
        };
        // The delivery count is the original's, not the dead letter's.
        if k.as_str() == DELIVERY_COUNT {
            continue;
        }
        out.insert(k.as_str(), text.as_str());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_patterns_token_by_token() {
        for (p, s, want) in [
            ("orders.>", "orders.created", true),
            ("orders.>", "orders.created.eu", true),
            ("orders.>", "orders", false),
            ("orders.*", "orders.created", true),
            ("orders.*", "orders.created.eu", false),
            ("*.created", "orders.created", true),
            (">", "hookfleet.dead.orders", true),
            ("hookfleet.dead.orders", "hookfleet.dead.orders", true),
            ("hookfleet.dead.orders", "hookfleet.dead.order", false),
            ("orders", "orders.created", false),
        ] {
            assert_eq!(subject_matches(p, s), want, "{p} vs {s}");
        }
    }

    #[test]
    fn a_dead_letter_copy_carries_its_headers_as_text_and_not_the_delivery_count() {
        let mut h = FieldTable::default();
        h.insert(
            ShortString::from("x-hookfleet-attempts"),
            AMQPValue::LongLongInt(3),
        );
        h.insert(
            ShortString::from("x-hookfleet-dead-reason"),
            AMQPValue::LongString(LongString::from(b"http_status".to_vec())),
        );
        h.insert(ShortString::from(DELIVERY_COUNT), AMQPValue::LongLongInt(2));
        let props = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_headers(h);
        let out = nats_headers(&props);
        assert_eq!(out.get("x-hookfleet-attempts").map(|v| v.as_str()), Some("3"));
        assert_eq!(
            out.get("x-hookfleet-dead-reason").map(|v| v.as_str()),
            Some("http_status")
        );
        assert_eq!(
            out.get("Content-Type").map(|v| v.as_str()),
            Some("application/json")
        );
        assert!(out.get(DELIVERY_COUNT).is_none());
    }

    #[test]
    fn the_reports_stream_is_a_bounded_work_queue() {
        let c = reports_stream_config("hooks");
        assert_eq!(c.name, "hooks-reports");
        assert_eq!(c.subjects, ["hookfleet.reports.hooks"]);
        assert_eq!(c.retention, jetstream::stream::RetentionPolicy::WorkQueue);
        assert_eq!(c.max_messages, 10_000);
        assert_eq!(c.max_age, Duration::from_secs(600));
        assert_eq!(c.discard, jetstream::stream::DiscardPolicy::Old);
        assert_eq!(c.storage, jetstream::stream::StorageType::File);
    }

    #[test]
    fn the_retry_stream_holds_the_schedules_and_the_due_copies() {
        let work = jetstream::stream::Config {
            name: "EVENTS".into(),
            num_replicas: 3,
            ..Default::default()
        };
        let c = retry_stream_config("hooks", &work);
        assert_eq!(c.name, "hooks-retry");
        assert_eq!(c.subjects, ["hookfleet.sched.hooks.>", "hookfleet.retry.hooks"]);
        assert_eq!(c.retention, jetstream::stream::RetentionPolicy::WorkQueue);
        assert!(c.allow_message_schedules);
        assert_eq!(c.num_replicas, 3, "replicated like the work stream");
        assert_eq!(
            c.metadata.get(WORK_STREAM_KEY),
            Some(&work.name),
            "it names its work stream"
        );
    }

    #[test]
    fn a_scheduled_copy_has_a_subject_of_its_own_and_its_due_time() {
        let s = Schedules {
            prefix: "hookfleet.sched.hooks".into(),
            target: "hookfleet.retry.hooks".into(),
        };
        let props = BasicProperties::default().with_headers({
            let mut h = FieldTable::default();
            h.insert(ShortString::from(H_ATTEMPTS), AMQPValue::LongLongInt(2));
            h
        });
        let before = time::OffsetDateTime::now_utc();
        let (a, h) = s.schedule(&props, Duration::from_millis(1500));
        let (b, _) = s.schedule(&props, Duration::from_millis(1500));
        assert!(a.starts_with("hookfleet.sched.hooks.") && a != b, "{a} {b}");
        assert_eq!(a.split('.').count(), 4, "one token after the prefix: {a}");
        assert_eq!(
            h.get("Nats-Schedule-Target").map(|v| v.as_str()),
            Some("hookfleet.retry.hooks")
        );
        assert_eq!(h.get(H_ATTEMPTS).map(|v| v.as_str()), Some("2"));
        let at = h
            .get("Nats-Schedule")
            .unwrap()
            .as_str()
            .strip_prefix("@at ")
            .unwrap()
            .to_owned();
        let at = time::OffsetDateTime::parse(&at, &time::format_description::well_known::Rfc3339).unwrap();
        let after = (at - before).whole_milliseconds();
        assert!((1500..2500).contains(&after), "due {after} ms after");
    }

    #[test]
    fn the_managed_consumer_acks_explicitly_with_one_delivery_more_than_the_attempts() {
        let mut cfg = Config::for_tests(None, None);
        cfg.max_attempts = 5;
        let nats = NatsSource {
            urls: vec!["nats://127.0.0.1:4222".into()],
            stream: "EVENTS".into(),
            subjects: vec!["orders.>".into()],
            creds_file: None,
            token: None,
            ack_wait: Duration::from_secs(30),
        };
        let c = consumer_config(&cfg, &nats);
        assert_eq!(c.durable_name.as_deref(), Some("orders"));
        assert_eq!(c.ack_policy, AckPolicy::Explicit);
        assert_eq!(c.max_deliver, 6);
        assert_eq!(c.filter_subject, "orders.>");
        let ours = Settings::of(&c);
        // One filter given as the list, not the single field: the same settings.
        let listed = pull::Config {
            filter_subject: String::new(),
            filter_subjects: vec!["orders.>".to_owned()],
            ..c.clone()
        };
        assert_eq!(ours, Settings::of(&listed));
        let unlimited = pull::Config {
            max_deliver: -1,
            ..c.clone()
        };
        assert_ne!(ours, Settings::of(&unlimited));
    }

    #[test]
    fn the_retry_lanes_consumer_filters_the_retry_subject_alone_whatever_the_work_subjects() {
        let mut cfg = Config::for_tests(None, None);
        cfg.queue = "hooks".into();
        cfg.max_attempts = 5;
        let nats = NatsSource {
            urls: vec!["nats://127.0.0.1:4222".into()],
            stream: "EVENTS".into(),
            subjects: vec!["orders.>".into(), "invoices.>".into()],
            creds_file: None,
            token: None,
            ack_wait: Duration::from_secs(30),
        };
        let c = retry_consumer_config(&cfg, &nats);
        assert_eq!(c.durable_name.as_deref(), Some("hooks-retry"));
        assert_eq!(c.ack_policy, AckPolicy::Explicit);
        assert_eq!((c.ack_wait, c.max_deliver), (Duration::from_secs(30), 6));
        assert_eq!(c.filter_subject, "hookfleet.retry.hooks");
        assert!(c.filter_subjects.is_empty(), "{:?}", c.filter_subjects);
        assert_eq!(Settings::of(&c).filters, ["hookfleet.retry.hooks"]);
    }
}
