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
use super::settlement::{Accounted, Settle, Settler};
use super::shared::Worker;
use crate::auth::SendError;
use crate::breaker::{Admit, Transition};
use crate::message::{self, Meta};
use crate::outcome::{Outcome, classify_error, classify_status};
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
                let outcome = self.outcome(&d, &body, &meta).await;
                self.settle(broker, &d, &body, &meta, outcome, &mut acct).await;
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
    async fn settle(
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
        let settler = Settler {
            metrics: &self.metrics,
            queue: &self.cfg.queue,
            dead_letter_queue: &self.cfg.dead_letter_queue,
            gone: &self.gone,
        };
        settler.settle(broker, d, body, meta, fate, acct).await;
    }

    /// Renders, admits, attempts: the outcome of this delivery.
    async fn outcome(&self, d: &Delivery, message: &Bytes, meta: &Meta) -> Outcome {
        // The destination is gone (an earlier 410): no more requests; the message waits in its queue.
        if self.gone.is_set() {
            return Outcome::Stopped;
        }
        // The request body: the message's, or the template's rendering of it. A message the
        // template cannot render never will: its outcome comes before the breaker or the rate
        // limit spend anything on it.
        let body = match &self.cfg.body_template {
            None => message.clone(),
            Some(t) => {
                let extras = Extras {
                    routing_key: original_routing_key(d),
                    webhook_id: &meta.id,
                };
                match t.render(message, extras) {
                    Ok(b) => Bytes::from(b),
                    Err(e) => return Outcome::Unrenderable { error: e.to_string() },
                }
            }
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
                let outcome = self.attempt(d, meta, body).await;
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

    /// One HTTP attempt with `body` (the message's, or its rendering).
    async fn attempt(&self, d: &Delivery, meta: &Meta, body: Bytes) -> Outcome {
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
            .unwrap_or(0)
            .to_string();
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
            .header("webhook-timestamp", ts.as_str());
        if let Some(signer) = &self.signer {
            req = req.header("webhook-signature", signer.sign(&meta.id, &ts, &body));
        }
        let started = Instant::now();
        let result = crate::auth::send(&self.http, self.tokens.as_ref(), req.body(body)).await;
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
            Err(SendError::Token(e)) => {
                warn!(error = %e, "no OAuth2 token; the message is retried later");
                Outcome::Retry {
                    reason: "oauth2_token",
                    status: None,
                    retry_after: None,
                }
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
