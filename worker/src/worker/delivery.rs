//! One message from received to settled: its outcome (the body or its template rendering, the
//! circuit breaker, the rate limit, the HTTP attempt), the fate that outcome decides (`fate`), and
//! the settle site carrying it out (`settlement`).

use std::panic::AssertUnwindSafe;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use futures::FutureExt;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use rand::Rng;
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::fate::{self, Limits};
use super::settle::Settle;
use super::settlement::Accounted;
use super::shared::Worker;
use crate::auth::SendError;
use crate::breaker::{Admit, Transition};
use crate::message::{self, Meta};
use crate::outcome::{Outcome, classify_error, classify_status};
use crate::target::Target;
use crate::template::Extras;

impl Worker {
    /// One message, start to settled. A panic anywhere in its handling is an outcome too
    /// ([`Outcome::Panicked`]): the message goes back to the broker at once instead of staying
    /// unacked until the next reconnect.
    pub(super) async fn deliver(&self, broker: &impl Settle, mut d: Delivery, mut acct: Accounted) {
        // The body, shared from here on (request, retry or dead-letter copy) without a copy.
        let body = Bytes::from(std::mem::take(&mut d.data));
        let meta = message::meta(
            &d.properties,
            d.exchange.as_str(),
            d.routing_key.as_str(),
            &body,
            message::now_ms(),
        );
        let span =
            info_span!("delivery", id = %meta.id, attempt = meta.attempts + 1, redelivered = d.redelivered);
        let handled = AssertUnwindSafe(
            async {
                // External topology: the queue may have no delivery limit of its own, so the worker
                // keeps it, from the broker's count of redeliveries (quorum queues keep one). NATS:
                // JetStream's count of deliveries (`worker::jetstream` writes it as x-delivery-count).
                if let Some(limit) = self.cfg.worker_delivery_limit()
                    && let Some(count) = delivery_count(&d)
                    && count >= u64::from(limit)
                {
                    warn!(
                        count,
                        limit, "redelivered as often as the delivery limit; dead-lettering it unattempted"
                    );
                    let outcome = Outcome::DeliveryLimit { count, limit };
                    return self.settle(broker, &d, &body, &meta, outcome, &mut acct).await;
                }
                // Too large for this worker's memory bound: dead-lettered unread, before the mode
                // split (no HTTP request, no Webhook matched).
                if body.len() > self.cfg.max_message_bytes {
                    let outcome = Outcome::TooLarge {
                        size: body.len(),
                        max: self.cfg.max_message_bytes,
                    };
                    warn!(
                        size = body.len(),
                        max = self.cfg.max_message_bytes,
                        "message too large; dead-lettering it"
                    );
                    return self.settle(broker, &d, &body, &meta, outcome, &mut acct).await;
                }
                match &self.single {
                    Some(target) => {
                        let outcome = self.outcome(target, &d, &body, &meta).await;
                        self.settle(broker, &d, &body, &meta, outcome, &mut acct).await;
                    }
                    None => self.fan_out(broker, &d, &body, &meta, &mut acct).await,
                }
            }
            .instrument(span.clone()),
        )
        .catch_unwind()
        .await;
        if handled.is_err() && !acct.is_settled() {
            async {
                error!("delivery task panicked; handing the message back");
                self.settle(broker, &d, &body, &meta, Outcome::Panicked, &mut acct)
                    .await;
            }
            .instrument(span)
            .await;
        }
    }

    /// Carries out the fate `outcome` decides.
    pub(super) async fn settle(
        &self,
        broker: &impl Settle,
        d: &Delivery,
        body: &[u8],
        meta: &Meta,
        outcome: Outcome,
        acct: &mut Accounted,
    ) {
        let limits = Limits {
            max_attempts: self.cfg.max_attempts,
            backoff: &self.cfg.backoff,
        };
        let fate = fate::decide(outcome, meta.attempts + 1, limits, &mut rand::rng());
        self.settler().settle(broker, d, body, meta, fate, acct).await;
    }

    /// The request body for `target`: the message's, or its template's rendering of it (`Err`: the
    /// outcome of a message the template cannot render, which it never will).
    pub(super) fn body(target: &Target, d: &Delivery, message: &Bytes, id: &str) -> Result<Bytes, Outcome> {
        match &target.dest.body_template {
            None => Ok(message.clone()),
            Some(t) => {
                let extras = Extras {
                    routing_key: original_routing_key(d),
                    webhook_id: id,
                };
                t.render(message, extras)
                    .map(Bytes::from)
                    .map_err(|e| Outcome::Unrenderable { error: e.to_string() })
            }
        }
    }

    /// Renders, admits, attempts: the outcome of this delivery to the single destination.
    async fn outcome(&self, target: &Target, d: &Delivery, message: &Bytes, meta: &Meta) -> Outcome {
        // The destination is gone (an earlier 410): no more requests; the message waits in its queue.
        if self.gone.is_set() {
            return Outcome::Stopped;
        }
        // A message the template cannot render never will: its outcome comes before the breaker or
        // the rate limit spend anything on it.
        let body = match Self::body(target, d, message, &meta.id) {
            Ok(b) => b,
            Err(o) => return o,
        };
        let admit = self.breaker.admit();
        match admit {
            Admit::Defer(remaining) => {
                // Spread the deferred messages over half a cooldown so they do not return in one wave.
                let spread = remaining.mul_f64(1.0 + rand::rng().random_range(0.0..0.5));
                Outcome::Deferred { delay: spread }
            }
            Admit::Go | Admit::Probe => {
                let pass = match &self.throttle {
                    Some(t) => Some(t.acquire().await),
                    None => None,
                };
                self.metrics.in_flight.inc();
                let outcome = self.attempt(target, d, &meta.id, body, None).await;
                self.metrics.in_flight.dec();
                drop(pass);
                let healthy = !matches!(outcome, Outcome::Retry { .. });
                if let Some(t) = &self.throttle
                    && let Some(limit) = t.record(healthy)
                {
                    self.metrics.throttle_limit.set(limit as i64);
                    info!(
                        limit,
                        "adaptive throttle: deliveries in flight now limited to {limit}"
                    );
                }
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
        }
    }

    /// One HTTP attempt to `target` with `body` (the message's, or its rendering) as `webhook-id`
    /// `id`. When `head` is given, the first bytes of a failed answer's body are kept there.
    pub(super) async fn attempt(
        &self,
        target: &Target,
        d: &Delivery,
        id: &str,
        body: Bytes,
        mut head: Option<&mut Vec<u8>>,
    ) -> Outcome {
        if let Some(limiter) = &self.limiter {
            let waited = Instant::now();
            limiter.acquire().await;
            self.metrics
                .rate_limited_seconds
                .inc_by(waited.elapsed().as_secs_f64());
        }
        let req = Self::request(target, d, id, body);
        let started = Instant::now();
        let result = crate::auth::send(&target.http, target.tokens.as_ref(), req).await;
        let outcome = match result {
            Ok(mut resp) => {
                let outcome = answered(&resp);
                let failed = !resp.status().is_success();
                // Read (a bounded part of) the body so the connection can be reused.
                let mut read = 0usize;
                while read < 64 * 1024 {
                    match resp.chunk().await {
                        Ok(Some(c)) => {
                            if let Some(h) = head.as_deref_mut().filter(|h| failed && h.len() < HEAD) {
                                h.extend_from_slice(&c[..c.len().min(HEAD - h.len())]);
                            }
                            read += c.len();
                        }
                        _ => break,
                    }
                }
                outcome
            }
            Err(SendError::Token(e)) => {
                warn!(error = %e, "no OAuth2 token; the message is retried later");
                NO_TOKEN
            }
            Err(SendError::Http(e)) => {
                let o = classify_error(&e);
                if let Outcome::Retry { reason: "tls", .. } = o {
                    warn!(error = %crate::outcome::error_chain(&e), "TLS with the destination failed");
                }
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

    /// The request of one attempt to `target` with `body` as `webhook-id` `id`: the destination's method,
    /// URL, timeout and headers, the message's trace context and content type, the Standard Webhooks
    /// headers and signature (timestamped now). Every attempt is built here, a test delivery's too.
    pub(super) fn request(target: &Target, d: &Delivery, id: &str, body: Bytes) -> reqwest::RequestBuilder {
        let ts = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
            .to_string();
        let dest = &target.dest;
        let method = reqwest::Method::from_bytes(dest.method.as_str().as_bytes()).expect("a valid method");
        let content_type = d
            .properties
            .content_type()
            .as_ref()
            .and_then(|c| HeaderValue::from_str(c.as_str()).ok())
            .unwrap_or(HeaderValue::from_static("application/json"));
        let mut req = target
            .http
            .request(method, dest.url.clone())
            .timeout(dest.timeout)
            .headers(target.headers.clone())
            // The publisher's trace (W3C Trace Context) continues at the receiver; over a configured header
            // of the same name, since it is this message's.
            .headers(crate::tracecontext::headers(d.properties.headers().as_ref()))
            .header(CONTENT_TYPE, content_type)
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.as_str());
        if let Some(signer) = &target.signer {
            req = req.header("webhook-signature", signer.sign(id, &ts, &body));
        }
        req.body(body)
    }
}

/// The outcome of an attempt that got no OAuth2 token: retried (the token endpoint may recover).
pub(super) const NO_TOKEN: Outcome = Outcome::Retry {
    reason: "oauth2_token",
    status: None,
    retry_after: None,
};

/// What an answer means: its status classified, with its `Retry-After`.
pub(super) fn answered(resp: &reqwest::Response) -> Outcome {
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| crate::backoff::parse_retry_after(v, SystemTime::now()));
    classify_status(resp.status().as_u16(), retry_after)
}

/// Bytes of a failed answer's body kept for the Webhook's status excerpt (which keeps fewer, once
/// secrets are scrubbed).
const HEAD: usize = 1024;

/// The broker's count of earlier deliveries of this message (`x-delivery-count`, which quorum queues
/// set on a redelivery), if it has one.
pub(super) fn delivery_count(d: &Delivery) -> Option<u64> {
    let headers = d.properties.headers().as_ref()?;
    match headers.inner().get("x-delivery-count")? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        _ => None,
    }
}

/// The routing key the message was published with (a retry comes back through the default exchange
/// with the queue's name as its key; the original is kept in a header).
pub(super) fn original_routing_key(d: &Delivery) -> &str {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::http::{HeaderMap, StatusCode};
    use hookfleet_crds::integration::HttpMethod;
    use lapin::types::{AMQPValue, FieldTable};
    use reqwest::Url;

    use super::*;
    use crate::config::{self, Config, TlsFiles};
    use crate::message::{H_ATTEMPTS, H_DEAD_REASON, H_LAST_ERROR, header_int, header_str};
    use crate::metrics::Metrics;
    use crate::template::BodyTemplate;
    use crate::worker::memory::{Memory, delivery, settled};

    /// A destination on loopback answering `status` to every request; it keeps what it got.
    struct Destination {
        url: Url,
        status: Arc<AtomicU16>,
        got: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    }

    impl Destination {
        async fn start() -> Self {
            let status = Arc::new(AtomicU16::new(200));
            let got = Arc::new(Mutex::new(Vec::new()));
            let (s, g) = (status.clone(), got.clone());
            let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
                let (s, g) = (s.clone(), g.clone());
                async move {
                    g.lock().unwrap().push((headers, body));
                    StatusCode::from_u16(s.load(Ordering::SeqCst)).unwrap()
                }
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = Url::parse(&format!("http://{}/hooks", listener.local_addr().unwrap())).unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await });
            Self { url, status, got }
        }

        fn answer(&self, status: u16) {
            self.status.store(status, Ordering::SeqCst);
        }

        fn requests(&self) -> usize {
            self.got.lock().unwrap().len()
        }
    }

    /// A worker for `destination`: 3 attempts, backoff 1 s × 2 without jitter, no breaker.
    fn config(destination: Url) -> Config {
        Config::for_tests(
            Some(config::Destination {
                url: destination,
                method: HttpMethod::Post,
                headers: Vec::new(),
                signing_secrets: Vec::new(),
                oauth2: None,
                tls: TlsFiles::default(),
                body_template: None,
                timeout: Duration::from_secs(5),
                secrets: Vec::new(),
            }),
            None,
        )
    }

    fn worker(cfg: Config) -> Arc<Worker> {
        // As `main` does before it builds the client.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Worker::new(cfg, Arc::new(Metrics::new(""))).unwrap()
    }

    /// Message `tag` with `attempts` already made (0: a fresh one).
    fn message(tag: u64, body: &[u8], attempts: i64) -> Delivery {
        let mut d = delivery(tag, body);
        if attempts > 0 {
            let mut h = FieldTable::default();
            h.insert(H_ATTEMPTS.into(), AMQPValue::LongLongInt(attempts));
            d.properties = d.properties.clone().with_headers(h);
        }
        d
    }

    async fn deliver(w: &Worker, broker: &Memory, d: Delivery) {
        w.deliver(broker, d, Accounted::new(w.metrics.clone())).await;
        assert_eq!(w.metrics.unsettled.get(), 0, "settled once delivered");
    }

    fn delay_queue(w: &Worker, secs: u64) -> String {
        let ttl = w.cfg.backoff.bucket(Duration::from_secs(secs));
        format!("publish orders.delay.{}ms", ttl.as_millis())
    }

    /// What the destination answers × the attempts already made → what the broker was asked and
    /// how the message was counted.
    #[tokio::test]
    async fn each_answer_settles_the_message_as_its_fate_says() {
        let dest = Destination::start().await;
        #[rustfmt::skip]
        let table: Vec<(u16, i64, Vec<String>, [&str; 3])> = vec![
            (200, 0, vec!["ack 1".into()], ["delivered", "delivered", "ok"]),
            (204, 2, vec!["ack 1".into()], ["delivered", "delivered", "ok"]),
            (503, 0, vec![String::new(), "ack 1".into()], ["retried", "retried", "http_status"]),
            (429, 1, vec![String::new(), "ack 1".into()], ["retried", "retried", "http_status"]),
            (301, 0, vec![String::new(), "ack 1".into()], ["retried", "retried", "redirect"]),
            (503, 2, vec!["publish orders.dead".into(), "ack 1".into()], ["dead_lettered", "dead_lettered", "attempts_exhausted"]),
            (400, 0, vec!["publish orders.dead".into(), "ack 1".into()], ["dead_lettered", "dead_lettered", "http_status"]),
            (410, 0, vec![], ["handed_back", "handed_back", "gone"]),
        ];
        for (status, attempts, mut ops, [fate, result, reason]) in table {
            dest.answer(status);
            let w = worker(config(dest.url.clone()));
            if ops.first().is_some_and(String::is_empty) {
                // A retry: the delay queue of this attempt's backoff (1 s, then 2 s).
                ops[0] = delay_queue(&w, 1 << attempts);
            }
            let broker = Memory::default();
            deliver(&w, &broker, message(1, br#"{"n":1}"#, attempts)).await;
            assert_eq!(broker.log(), ops, "{status} after {attempts} attempts");
            assert_eq!(settled(&w.metrics, fate, result, reason), (1, 1), "{status}");
            assert_eq!(w.gone.is_set(), status == 410);
        }
    }

    #[tokio::test]
    async fn the_request_carries_the_id_and_the_body_and_copies_count_this_attempt() {
        let dest = Destination::start().await;
        dest.answer(503);
        let w = worker(config(dest.url.clone()));
        let broker = Memory::default();
        deliver(&w, &broker, message(1, br#"{"n":1}"#, 1)).await;
        let (headers, body) = dest.got.lock().unwrap()[0].clone();
        assert_eq!(headers["webhook-id"], "m-1");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(body, br#"{"n":1}"#.as_slice());
        let (_, props) = &broker.published()[0];
        assert_eq!(header_int(props.headers().as_ref(), H_ATTEMPTS), Some(2));
    }

    #[tokio::test]
    async fn after_a_410_no_request_is_made_and_messages_stay_in_the_queue() {
        let dest = Destination::start().await;
        dest.answer(410);
        let w = worker(config(dest.url.clone()));
        let broker = Memory::default();
        deliver(&w, &broker, message(1, b"{}", 0)).await;
        assert!(w.gone.is_set());
        assert_eq!(w.metrics.destination_gone.get(), 1);
        deliver(&w, &broker, message(2, b"{}", 0)).await;
        assert_eq!(dest.requests(), 1, "no request after the 410");
        assert!(
            broker.log().is_empty(),
            "neither acked nor copied: {:?}",
            broker.log()
        );
        assert_eq!(settled(&w.metrics, "handed_back", "handed_back", "gone"), (2, 2));
    }

    #[tokio::test]
    async fn a_message_the_template_cannot_render_is_dead_lettered_without_a_request() {
        let dest = Destination::start().await;
        let mut cfg = config(dest.url.clone());
        let template = BodyTemplate::compile(r#"{"device": "{{ device_id }}"}"#).unwrap();
        cfg.destination.as_mut().unwrap().body_template = Some(Arc::new(template));
        let w = worker(cfg);
        let broker = Memory::default();
        deliver(&w, &broker, message(1, br#"{"n":1}"#, 0)).await;
        assert_eq!(dest.requests(), 0);
        assert_eq!(broker.log(), ["publish orders.dead", "ack 1"]);
        let (_, props) = &broker.published()[0];
        let h = props.headers().as_ref();
        let why = header_str(h, H_DEAD_REASON).unwrap();
        assert!(
            why.starts_with("template: ") && why.contains("device_id"),
            "{why}"
        );
        assert_eq!(header_str(h, H_LAST_ERROR).as_deref(), Some("template"));
        assert_eq!(header_int(h, H_ATTEMPTS), Some(1));
        assert_eq!(
            settled(&w.metrics, "dead_lettered", "dead_lettered", "template"),
            (1, 1)
        );
        // One that renders is sent rendered.
        deliver(&w, &broker, message(2, br#"{"device_id":"d-7"}"#, 0)).await;
        assert_eq!(dest.got.lock().unwrap()[0].1, br#"{"device": "d-7"}"#.as_slice());
    }

    #[tokio::test]
    async fn a_message_above_the_maximum_is_dead_lettered_too_large_without_a_request() {
        let dest = Destination::start().await;
        let mut cfg = config(dest.url.clone());
        cfg.max_message_bytes = 8;
        let w = worker(cfg);
        let broker = Memory::default();
        deliver(&w, &broker, message(1, br#"{"n":12345}"#, 0)).await;
        assert_eq!(dest.requests(), 0);
        assert_eq!(broker.log(), ["publish orders.dead", "ack 1"]);
        let (_, props) = &broker.published()[0];
        let h = props.headers().as_ref();
        assert_eq!(
            header_str(h, H_DEAD_REASON).as_deref(),
            Some("the body of 11 bytes is larger than maxMessageBytes (8)")
        );
        assert_eq!(header_str(h, H_LAST_ERROR).as_deref(), Some("too_large"));
        assert_eq!(
            settled(&w.metrics, "dead_lettered", "dead_lettered", "too_large"),
            (1, 1)
        );
        assert_eq!(
            w.metrics
                .dead_letters
                .get_or_create(&vec![("reason", "too_large")])
                .get(),
            1
        );
        // One of the maximum size is sent.
        deliver(&w, &broker, message(2, br#"{"n":1}"#, 0)).await;
        assert_eq!(dest.requests(), 1);
    }

    /// With Webhooks too: the size is checked before the fan-out, so no Webhook is sent the message.
    #[tokio::test]
    async fn a_message_above_the_maximum_is_dead_lettered_before_the_fan_out() {
        use hookfleet_crds::contract::webhooks::Snapshot;
        use hookfleet_crds::integration::Unmatched;

        let dest = Destination::start().await;
        let mut cfg = Config::for_tests(
            None,
            Some(config::WebhooksMode {
                secret: "fleet-webhooks".into(),
                namespace: "ns".into(),
                event_name_header: None,
                unmatched: Unmatched::default(),
            }),
        );
        cfg.max_message_bytes = 8;
        let w = worker(cfg);
        let hook = crate::webhooks::entry(
            "acme",
            &["orders.created"],
            serde_json::json!({"url": dest.url.as_str()}),
            &[],
        );
        let hooks = w.hooks.as_ref().unwrap();
        let loaded = hooks.builder.build(&Snapshot { webhooks: vec![hook] }, "1", None);
        w.webhooks().unwrap().swap(loaded);
        let broker = Memory::default();
        deliver(&w, &broker, message(1, br#"{"n":12345}"#, 0)).await;
        assert_eq!(dest.requests(), 0, "no Webhook is sent it");
        assert_eq!(broker.log(), ["publish orders.dead", "ack 1"]);
        assert_eq!(
            settled(&w.metrics, "dead_lettered", "dead_lettered", "too_large"),
            (1, 1)
        );
        // One within the maximum goes to the matching Webhook.
        deliver(&w, &broker, message(2, br#"{"n":1}"#, 0)).await;
        assert_eq!(dest.requests(), 1);
    }

    #[tokio::test]
    async fn a_panic_hands_the_message_back_at_once() {
        let dest = Destination::start().await;
        let w = worker(config(dest.url.clone()));
        let broker = Memory::default();
        broker.panic_on_next_ack.store(true, Ordering::SeqCst);
        deliver(&w, &broker, message(1, b"{}", 0)).await;
        assert_eq!(broker.log(), ["ack 1", "requeue 1"]);
        assert_eq!(settled(&w.metrics, "handed_back", "handed_back", "panic"), (1, 1));
    }

    #[tokio::test]
    async fn an_open_breaker_defers_without_an_attempt() {
        let dest = Destination::start().await;
        dest.answer(503);
        let mut cfg = config(dest.url.clone());
        cfg.circuit_breaker = (1, Duration::from_secs(10));
        let w = worker(cfg);
        let broker = Memory::default();
        deliver(&w, &broker, message(1, b"{}", 0)).await;
        assert_eq!(w.metrics.circuit_open.get(), 1, "one failure opens it");
        deliver(&w, &broker, message(2, b"{}", 1)).await;
        assert_eq!(dest.requests(), 1, "not attempted");
        let (queue, props) = &broker.published()[1];
        let ladder = w.cfg.backoff.ladder();
        let ttl = ladder
            .iter()
            .find(|t| format!("orders.delay.{}ms", t.as_millis()) == *queue);
        assert!(
            ttl.is_some_and(|t| *t >= Duration::from_secs(8) && *t <= Duration::from_secs(16)),
            "about the cooldown, spread by half: {queue}"
        );
        let h = props.headers().as_ref();
        assert_eq!(header_str(h, H_LAST_ERROR).as_deref(), Some("circuit_open"));
        assert_eq!(header_int(h, H_ATTEMPTS), Some(1), "no attempt spent");
        // Both messages settled as retried: the first retried, the second deferred.
        assert_eq!(settled(&w.metrics, "retried", "deferred", "circuit_open"), (2, 1));
    }
}
