//! The delivery loop: one broker session at a time (connect, declare, consume), reconnecting with
//! jittered backoff; each message delivered by its own task under a concurrency bound.
//!
//! The rule everything here serves: a message is acked only after its fate is settled somewhere
//! durable: the endpoint answered 2xx, or a copy sits in a delay queue or the dead-letter queue
//! and the broker confirmed it. Whatever happens in between (crash, kill -9, broker restart), the
//! broker still holds the original and redelivers it; the receiver may see a duplicate, with the same
//! `webhook-id`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rand::Rng;
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use tokio::sync::{Semaphore, watch};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::breaker::{Admit, Breaker, Transition};
use crate::config::{Config, redact_uri};
use crate::message::{self, Failure, Meta};
use crate::metrics::Metrics;
use crate::outcome::{Outcome, classify_error, classify_status};
use crate::ratelimit::RateLimiter;
use crate::ssrf::GuardedResolver;
use crate::template::Extras;

/// How long one connection attempt (TCP, TLS, AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a broker session ended (and will be retried).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connecting to the broker: {0}")]
    Connect(#[source] lapin::Error),
    #[error("connecting to the broker: no answer within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    #[error("opening a channel: {0}")]
    Channel(#[source] lapin::Error),
    #[error("declaring {what}: {source}")]
    Declare {
        what: String,
        #[source]
        source: lapin::Error,
    },
    #[error("starting the consumer: {0}")]
    Consume(#[source] lapin::Error),
    #[error("consumer failed: {0}")]
    Consumer(#[source] lapin::Error),
    #[error("the broker cancelled the consumer")]
    ConsumerEnded,
    #[error("the broker refused or returned a retry/dead-letter publish; re-declaring the topology")]
    PublishRefused,
}

/// Everything a delivery task needs; shared by all sessions.
pub struct Worker {
    cfg: Config,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    limiter: Option<RateLimiter>,
    breaker: Breaker,
    permits: Arc<Semaphore>,
    ladder: Vec<Duration>,
    /// Static headers, built once.
    headers: reqwest::header::HeaderMap,
}

/// Per-session state: the confirm-mode channel that retries and dead letters are published on.
struct Session {
    publish: Channel,
    /// Signalled when the broker refused or returned a publish (e.g. a delay queue was deleted): the
    /// session ends and the reconnect re-declares the topology, with backoff, instead of looping.
    publish_failed: tokio::sync::Notify,
}

impl Worker {
    pub fn new(cfg: Config, metrics: Arc<Metrics>) -> Result<Arc<Self>, reqwest::Error> {
        let http = reqwest::Client::builder()
            .tls_backend_rustls()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
            // In-flight requests are bounded by the semaphore; idle keep-alive connections by this.
            // Together they are the fd budget of `fdlimit::required`.
            .pool_max_idle_per_host(cfg.concurrency)
            .pool_idle_timeout(Duration::from_secs(30))
            .dns_resolver(GuardedResolver {
                allow_private: cfg.allow_private_networks,
            })
            .no_proxy()
            .user_agent(concat!("hookfleet-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut headers = reqwest::header::HeaderMap::new();
        for (n, v) in &cfg.headers {
            headers.append(n.clone(), v.clone());
        }
        Ok(Arc::new(Self {
            limiter: cfg.rate_limit.map(|(r, b)| RateLimiter::new(r, b)),
            breaker: Breaker::new(cfg.circuit_breaker.0, cfg.circuit_breaker.1),
            permits: Arc::new(Semaphore::new(cfg.concurrency)),
            ladder: cfg.backoff.ladder(),
            http,
            metrics,
            headers,
            cfg,
        }))
    }

    fn retry_queue(&self, ttl: Duration) -> String {
        format!("{}.retry.{}ms", self.cfg.queue, ttl.as_millis())
    }

    /// Runs until `shutdown` turns true: sessions, reconnects, then the drain.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut failures: u32 = 0;
        loop {
            let started = Instant::now();
            match self.clone().session(shutdown.clone()).await {
                Ok(()) => return,
                Err(e) => {
                    self.metrics.consuming.set(0);
                    self.metrics.broker_connected.set(0);
                    self.metrics.reconnects.inc();
                    // A session that ran a while was healthy: start the backoff over.
                    if started.elapsed() > Duration::from_secs(30) {
                        failures = 0;
                    }
                    failures = failures.saturating_add(1);
                    let delay = reconnect_delay(failures, &mut rand::rng());
                    warn!(error = %e, retry_in = ?delay, "broker session ended; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.wait_for(|s| *s) => {
                            self.drain(None).await;
                            return;
                        }
                    }
                }
            }
        }
    }

    /// One connection: declare, consume until shutdown (Ok) or until the broker goes away (Err).
    async fn session(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) -> Result<(), SessionError> {
        let cfg = &self.cfg;
        let props = ConnectionProperties::default().with_connection_name(
            format!("hookfleet-worker {} {}", cfg.integration, std::process::id()).into(),
        );
        info!(broker = %redact_uri(&cfg.amqp_uri), "connecting to the broker");
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&cfg.amqp_uri, props));
        let conn = tokio::select! {
            c = connect => match c {
                Ok(c) => c.map_err(SessionError::Connect)?,
                Err(_) => return Err(SessionError::ConnectTimeout),
            },
            _ = shutdown.wait_for(|s| *s) => {
                self.drain(None).await;
                return Ok(());
            }
        };
        self.metrics.broker_connected.set(1);
        let result = self.consume(&conn, &mut shutdown).await;
        self.metrics.consuming.set(0);
        match result {
            Ok(consume_ch) => {
                // Shutdown: the consumer is cancelled; let in-flight deliveries finish, then close.
                self.drain(Some(&consume_ch)).await;
                let _ = conn.close(200, "worker shutting down".into()).await;
                self.metrics.broker_connected.set(0);
                info!("closed the broker connection");
                Ok(())
            }
            Err(e) => {
                let _ = conn.close(320, "worker reconnecting".into()).await;
                Err(e)
            }
        }
    }

    async fn consume(
        self: &Arc<Self>,
        conn: &Connection,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Channel, SessionError> {
        let cfg = &self.cfg;
        let ch = conn.create_channel().await.map_err(SessionError::Channel)?;
        let publish = conn.create_channel().await.map_err(SessionError::Channel)?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(SessionError::Channel)?;
        self.declare_topology(&ch).await?;
        ch.basic_qos(cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(SessionError::Consume)?;
        let tag = format!("hookfleet-{}", std::process::id());
        let mut consumer = ch
            .basic_consume(
                cfg.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(SessionError::Consume)?;
        self.metrics.consuming.set(1);
        info!(queue = %cfg.queue, prefetch = cfg.prefetch, concurrency = cfg.concurrency, "consuming");
        let session = Arc::new(Session {
            publish,
            publish_failed: tokio::sync::Notify::new(),
        });

        loop {
            let delivery = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break,
                _ = session.publish_failed.notified() => return Err(SessionError::PublishRefused),
                next = consumer.next() => match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => return Err(SessionError::Consumer(e)),
                    None => return Err(SessionError::ConsumerEnded),
                },
            };
            // Backpressure: no new task until a slot is free. A delivery waiting here is still
            // unacked, so on shutdown it goes back to the queue with the channel.
            let permit = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break,
                p = self.permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let worker = self.clone();
            let session = session.clone();
            tokio::spawn(async move {
                worker.deliver(&session, delivery).await;
                drop(permit);
            });
        }
        info!("shutdown: cancelling the consumer");
        self.metrics.consuming.set(0);
        if let Err(e) = ch
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await
        {
            warn!(error = %e, "cancelling the consumer");
        }
        Ok(ch)
    }

    /// Waits up to the grace period for in-flight deliveries, then closes `ch`, which hands every
    /// unacked message (prefetched but not started, or still in flight) back to the queue.
    async fn drain(&self, ch: Option<&Channel>) {
        let all = self.cfg.concurrency as u32;
        let grace = self.cfg.shutdown_grace;
        let in_flight = self.cfg.concurrency - self.permits.available_permits();
        info!(in_flight, grace = ?grace, "draining in-flight deliveries");
        match tokio::time::timeout(grace, self.permits.acquire_many(all)).await {
            Ok(_) => info!("in-flight deliveries finished"),
            Err(_) => {
                let left = self.cfg.concurrency - self.permits.available_permits();
                warn!(
                    left,
                    "grace period over; unfinished deliveries go back to the queue"
                );
            }
        }
        if let Some(ch) = ch {
            let _ = ch.close(200, "worker shutting down".into()).await;
        }
    }

    async fn declare_topology(&self, ch: &Channel) -> Result<(), SessionError> {
        let cfg = &self.cfg;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let declare = |what: String| move |source| SessionError::Declare { what, source };
        ch.queue_declare(cfg.queue.as_str().into(), durable, FieldTable::default())
            .await
            .map_err(declare(format!("queue {}", cfg.queue)))?;
        for (exchange, key) in &cfg.bindings {
            ch.queue_bind(
                cfg.queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(declare(format!("binding {exchange}={key}")))?;
        }
        ch.queue_declare(
            cfg.dead_letter_queue.as_str().into(),
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(declare(format!("queue {}", cfg.dead_letter_queue)))?;
        // Delay queues: no consumer; each message waits its queue's TTL, then the broker dead-letters
        // it through the default exchange back to the work queue.
        for ttl in &self.ladder {
            let name = self.retry_queue(*ttl);
            let mut args = FieldTable::default();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(ttl.as_millis() as i64),
            );
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from("")),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(LongString::from(cfg.queue.as_bytes().to_vec())),
            );
            ch.queue_declare(name.as_str().into(), durable, args)
                .await
                .map_err(declare(format!("queue {name}")))?;
        }
        debug!(delay_queues = self.ladder.len(), "topology declared");
        Ok(())
    }

    /// One message, start to settled.
    async fn deliver(&self, session: &Session, d: Delivery) {
        let meta = message::meta(
            &d.properties,
            d.exchange.as_str(),
            d.routing_key.as_str(),
            &d.data,
            message::now_ms(),
        );
        let attempt = meta.attempts + 1;
        let span = info_span!("delivery", id = %meta.id, attempt, redelivered = d.redelivered);
        async {
            // The request body: the message's, or the template's rendering of it. A message the
            // template cannot render never will: dead-letter it now, before the breaker or the rate
            // limit spend anything on it.
            let rendered;
            let body: &[u8] = match &self.cfg.body_template {
                None => &d.data,
                Some(t) => {
                    let extras = Extras {
                        routing_key: original_routing_key(&d),
                        webhook_id: &meta.id,
                    };
                    match t.render(&d.data, extras) {
                        Ok(b) => {
                            rendered = b;
                            rendered.as_bytes()
                        }
                        Err(e) => {
                            let failure = Failure {
                                reason: "template",
                                status: None,
                            };
                            let detail = format!("template: {e}");
                            self.dead_letter(session, &d, &meta, attempt, failure, "template", Some(&detail))
                                .await;
                            return;
                        }
                    }
                }
            };
            let admit = self.breaker.admit();
            let outcome = match admit {
                Admit::Defer(remaining) => {
                    // Spread the deferred messages over half a cooldown so they do not return in one wave.
                    let spread = remaining.mul_f64(1.0 + rand::rng().random_range(0.0..0.5));
                    Outcome::Deferred { delay: spread }
                }
                Admit::Go | Admit::Probe => {
                    self.metrics.in_flight.inc();
                    let outcome = self.attempt(&d, &meta, body).await;
                    self.metrics.in_flight.dec();
                    let healthy = !matches!(outcome, Outcome::Retry { .. });
                    match self.breaker.record(healthy, admit == Admit::Probe) {
                        Some(Transition::Opened) => {
                            self.metrics.circuit_open.set(1);
                            warn!(
                                threshold = self.cfg.circuit_breaker.0,
                                cooldown = ?self.cfg.circuit_breaker.1,
                                "circuit breaker opened: deferring deliveries"
                            );
                        }
                        Some(Transition::Closed) => {
                            self.metrics.circuit_open.set(0);
                            info!("circuit breaker closed: the destination recovered");
                        }
                        None => {}
                    }
                    outcome
                }
            };
            self.settle(session, &d, &meta, attempt, outcome).await;
        }
        .instrument(span)
        .await
    }

    /// One HTTP attempt with `body` (the message's, or its rendering).
    async fn attempt(&self, d: &Delivery, meta: &Meta, body: &[u8]) -> Outcome {
        if let Some(limiter) = &self.limiter {
            let waited = Instant::now();
            limiter.acquire().await;
            self.metrics
                .rate_limited_seconds
                .inc_by(waited.elapsed().as_secs_f64());
        }
        let ts = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let method =
            reqwest::Method::from_bytes(self.cfg.method.as_str().as_bytes()).expect("a valid method");
        let content_type = d
            .properties
            .content_type()
            .as_ref()
            .and_then(|c| HeaderValue::from_str(c.as_str()).ok())
            .unwrap_or(HeaderValue::from_static("application/json"));
        let mut req = self
            .http
            .request(method, self.cfg.destination.clone())
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, content_type)
            .header("webhook-id", meta.id.as_str())
            .header("webhook-timestamp", ts.to_string());
        if !self.cfg.signing_secrets.is_empty() {
            req = req.header(
                "webhook-signature",
                crate::signing::signature(&self.cfg.signing_secrets, &meta.id, ts, body),
            );
        }
        let started = Instant::now();
        let result = req.body(body.to_vec()).send().await;
        let outcome = match result {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| crate::backoff::parse_retry_after(v, SystemTime::now()));
                // Read (a bounded part of) the body so the connection can be reused.
                let mut read = 0usize;
                while read < 64 * 1024 {
                    match resp.chunk().await {
                        Ok(Some(c)) => read += c.len(),
                        _ => break,
                    }
                }
                classify_status(status, retry_after)
            }
            Err(e) => {
                let o = classify_error(&e);
                if matches!(
                    o,
                    Outcome::Retry {
                        reason: "fd_exhausted",
                        ..
                    }
                ) {
                    self.metrics.fd_exhausted.inc();
                }
                debug!(error = %e, "request failed");
                o
            }
        };
        self.metrics.latency.observe(started.elapsed().as_secs_f64());
        outcome
    }

    /// Acks, or publishes the retry or dead letter, waits for its confirm, then acks.
    async fn settle(&self, session: &Session, d: &Delivery, meta: &Meta, attempt: u32, outcome: Outcome) {
        let (exchange, rk) = (d.exchange.as_str(), d.routing_key.as_str());
        match outcome {
            Outcome::Delivered { status } => {
                self.metrics.delivery("delivered", "ok");
                info!(status, "delivered");
                ack(d).await;
            }
            Outcome::Retry {
                reason,
                status,
                retry_after,
            } if attempt < self.cfg.max_attempts => {
                let delay = self
                    .cfg
                    .backoff
                    .next_delay(attempt, retry_after, &mut rand::rng());
                let ttl = self.cfg.backoff.bucket(delay);
                let props = message::retry_properties(
                    &d.properties,
                    exchange,
                    rk,
                    meta,
                    attempt,
                    Failure { reason, status },
                    ttl.as_millis() as u64,
                );
                let queue = self.retry_queue(ttl);
                if self.publish(session, &queue, d, props).await {
                    self.metrics.retries.inc();
                    self.metrics.delivery("retried", reason);
                    info!(reason, status, next_in = ?ttl, "attempt failed; retry scheduled");
                    ack(d).await;
                } else {
                    hand_back(&self.metrics);
                }
            }
            Outcome::Deferred { delay } => {
                // Not attempted: the attempt count stays as it was.
                let ttl = self.cfg.backoff.bucket(delay.min(self.cfg.backoff.max));
                let failure = Failure {
                    reason: "circuit_open",
                    status: None,
                };
                let props = message::retry_properties(
                    &d.properties,
                    exchange,
                    rk,
                    meta,
                    meta.attempts,
                    failure,
                    ttl.as_millis() as u64,
                );
                if self.publish(session, &self.retry_queue(ttl), d, props).await {
                    self.metrics.delivery("deferred", "circuit_open");
                    debug!(next_in = ?ttl, "circuit open; deferred");
                    ack(d).await;
                } else {
                    hand_back(&self.metrics);
                }
            }
            Outcome::Retry { reason, status, .. } => {
                self.dead_letter(
                    session,
                    d,
                    meta,
                    attempt,
                    Failure { reason, status },
                    "attempts_exhausted",
                    None,
                )
                .await;
            }
            Outcome::Reject { reason, status } => {
                self.dead_letter(
                    session,
                    d,
                    meta,
                    attempt,
                    Failure { reason, status },
                    reason,
                    None,
                )
                .await;
            }
        }
    }

    /// Publishes the dead letter, waits for its confirm, acks. `dead_reason` is the metric label;
    /// the `x-hookfleet-dead-reason` header is `detail` when given (e.g. `template: <error>`).
    #[allow(clippy::too_many_arguments)]
    async fn dead_letter(
        &self,
        session: &Session,
        d: &Delivery,
        meta: &Meta,
        attempt: u32,
        failure: Failure,
        dead_reason: &'static str,
        detail: Option<&str>,
    ) {
        let props = message::dead_letter_properties(
            &d.properties,
            d.exchange.as_str(),
            d.routing_key.as_str(),
            meta,
            attempt,
            failure,
            detail.unwrap_or(dead_reason),
        );
        if self.publish(session, &self.cfg.dead_letter_queue, d, props).await {
            self.metrics.delivery("dead_lettered", dead_reason);
            self.metrics
                .dead_letters
                .get_or_create(&vec![("reason", dead_reason)])
                .inc();
            warn!(
                reason = dead_reason,
                detail,
                last_error = failure.reason,
                status = failure.status,
                attempts = attempt,
                queue = %self.cfg.dead_letter_queue,
                "dead-lettered"
            );
            ack(d).await;
        } else {
            hand_back(&self.metrics);
        }
    }

    /// Publishes a persistent copy through the default exchange and waits for the broker's confirm.
    async fn publish(&self, session: &Session, queue: &str, d: &Delivery, props: BasicProperties) -> bool {
        let confirm = session
            .publish
            .basic_publish(
                ShortString::from(""),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &d.data,
                props,
            )
            .await;
        match confirm {
            Ok(pending) => match pending.await {
                Ok(lapin::Confirmation::Ack(None)) => true,
                Ok(c) => {
                    error!(queue, confirm = ?c, "broker refused or returned the publish");
                    session.publish_failed.notify_one();
                    false
                }
                Err(e) => {
                    warn!(queue, error = %e, "publish not confirmed");
                    session.publish_failed.notify_one();
                    false
                }
            },
            Err(e) => {
                warn!(queue, error = %e, "publish failed");
                session.publish_failed.notify_one();
                false
            }
        }
    }
}

/// The routing key the message was published with (a retry comes back through the default exchange
/// with the queue's name as its key; the original is kept in a header).
fn original_routing_key(d: &Delivery) -> &str {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(message::H_ROUTING_KEY))
    {
        Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes()).unwrap_or(""),
        Some(AMQPValue::ShortString(s)) => s.as_str(),
        _ => d.routing_key.as_str(),
    }
}

async fn ack(d: &Delivery) {
    // A failed ack means the channel is gone; the broker redelivers the message (a duplicate the
    // receiver can recognise by its webhook-id).
    if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
        warn!(error = %e, "ack failed; the broker will redeliver");
    }
}

/// The copy could not be stored, so the original stays unacked: the session ends (see
/// `Session::publish_failed`) and closing its connection hands the message back to the queue. Nacking
/// it here instead would redeliver it at once on a session that cannot publish: a requeue loop.
fn hand_back(metrics: &Metrics) {
    metrics.publish_failures.inc();
    metrics.delivery("handed_back", "publish_failed");
}

/// Delay before reconnect attempt `n` (1-based): equal jitter over 0.5 s × 2^(n−1), at most 30 s, so
/// a fleet that lost its broker does not come back in one wave.
pub fn reconnect_delay(n: u32, rng: &mut impl Rng) -> Duration {
    let base = Duration::from_millis(500)
        .saturating_mul(1u32 << n.saturating_sub(1).min(10))
        .min(Duration::from_secs(30));
    base / 2 + (base / 2).mul_f64(rng.random_range(0.0..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_backoff_grows_with_jitter_and_is_capped() {
        let mut rng = rand::rng();
        for n in 1..20 {
            let d = reconnect_delay(n, &mut rng);
            let base = Duration::from_millis(500 * (1u64 << (n - 1).min(10))).min(Duration::from_secs(30));
            assert!(d >= base / 2 && d <= base, "{n}: {d:?}");
        }
    }
}
