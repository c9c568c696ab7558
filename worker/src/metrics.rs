//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` server.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Static label pairs (result, reason).
pub type Labels = Vec<(&'static str, &'static str)>;

/// A Webhook's own series: (`webhook`, its name) and, for states, (`state`, one of them).
pub type WebhookLabels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    /// Attempts by result (`delivered`, `retried`, `deferred`, `dead_lettered`, `handed_back`) and reason.
    pub deliveries: Family<Labels, Counter>,
    pub latency: Histogram,
    pub in_flight: Gauge,
    pub retries: Counter,
    /// By reason.
    pub dead_letters: Family<Labels, Counter>,
    pub broker_connected: Gauge,
    pub consuming: Gauge,
    pub reconnects: Counter,
    pub open_fds: Gauge,
    pub max_fds: Gauge<i64, AtomicI64>,
    pub fd_exhausted: Counter,
    pub publish_failures: Counter,
    pub circuit_open: Gauge,
    pub rate_limited_seconds: Counter<f64, AtomicU64>,
    /// 1 while the broker blocks the connection (flow control): nothing is confirmed or acked.
    pub broker_blocked: Gauge,
    /// Messages the consumer yielded (each redelivery again).
    pub consumed: Counter,
    /// Messages whose fate is settled, by fate (`delivered`, `retried`, `dead_lettered`, `handed_back`).
    pub settled: Family<Labels, Counter>,
    /// Messages consumed and not yet settled.
    pub unsettled: Gauge,
    /// 1 once the destination answered 410 Gone (the worker then drains and exits 5).
    pub destination_gone: Gauge,
    /// Deliveries the adaptive throttle lets run at once (absent without it).
    pub throttle_limit: Gauge,
    /// This worker's rate limit in requests/s (its share of a fleet-wide limit); 0 when unlimited.
    pub rate_limit: Gauge<f64, AtomicU64>,
    /// Webhooks in the loaded snapshot (`--webhooks-secret`).
    pub webhooks_configured: Gauge,
    /// Snapshot loads by result (`ok`, `invalid`, `deleted`, `api_error`).
    pub snapshot_loads: Family<Labels, Counter>,
    /// When the last good snapshot was loaded (Unix seconds).
    pub snapshot_loaded_at: Gauge<f64, AtomicU64>,
    /// Messages no Webhook matched, acked (`--unmatched ack`).
    pub unmatched: Counter,
    /// Report publishes by result (`ok`, `failed`).
    pub reports: Family<Labels, Counter>,
    /// Webhooks in trouble at this worker, by state (`failing`, `circuit_open`, `throttled`, `paused`):
    /// always these four series, whatever the number of Webhooks.
    pub webhooks_by_state: Family<Labels, Gauge>,
    /// Webhooks in trouble beyond the ones with series of their own.
    pub webhooks_unlisted: Gauge,
    /// 1 per (webhook, state) of the worst Webhooks in trouble (at most `webhooks::series::TOP`).
    pub webhook_state: Family<WebhookLabels, Gauge>,
    /// Their failed attempts in a row at this worker.
    pub webhook_consecutive_failures: Family<WebhookLabels, Gauge>,
    /// Their copies set aside for want of capacity over the last refresh.
    pub webhook_set_aside: Family<WebhookLabels, Gauge>,
}

impl Metrics {
    pub fn new(integration: &str) -> Self {
        let mut registry = if integration.is_empty() {
            Registry::with_prefix("hookfleet")
        } else {
            Registry::with_prefix_and_labels(
                "hookfleet",
                [(Cow::Borrowed("integration"), Cow::Owned(integration.to_owned()))].into_iter(),
            )
        };
        let m = Self {
            deliveries: Family::default(),
            latency: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            in_flight: Gauge::default(),
            retries: Counter::default(),
            dead_letters: Family::default(),
            broker_connected: Gauge::default(),
            consuming: Gauge::default(),
            reconnects: Counter::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            fd_exhausted: Counter::default(),
            publish_failures: Counter::default(),
            circuit_open: Gauge::default(),
            rate_limited_seconds: Counter::default(),
            broker_blocked: Gauge::default(),
            consumed: Counter::default(),
            settled: Family::default(),
            unsettled: Gauge::default(),
            destination_gone: Gauge::default(),
            throttle_limit: Gauge::default(),
            rate_limit: Gauge::default(),
            webhooks_configured: Gauge::default(),
            snapshot_loads: Family::default(),
            snapshot_loaded_at: Gauge::default(),
            unmatched: Counter::default(),
            reports: Family::default(),
            webhooks_by_state: Family::default(),
            webhooks_unlisted: Gauge::default(),
            webhook_state: Family::default(),
            webhook_consecutive_failures: Family::default(),
            webhook_set_aside: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "deliveries",
            "Delivery attempts by result and reason",
            m.deliveries.clone(),
        );
        r.register(
            "delivery_duration_seconds",
            "Time of one HTTP attempt, request to response",
            m.latency.clone(),
        );
        r.register("in_flight", "Deliveries in progress", m.in_flight.clone());
        r.register(
            "retries",
            "Messages published to a delay queue for another attempt",
            m.retries.clone(),
        );
        r.register(
            "dead_letters",
            "Messages published to the dead-letter queue, by reason",
            m.dead_letters.clone(),
        );
        r.register(
            "broker_connected",
            "1 while connected to the broker",
            m.broker_connected.clone(),
        );
        r.register(
            "consuming",
            "1 while consuming the queue (readiness)",
            m.consuming.clone(),
        );
        r.register(
            "broker_reconnects",
            "Broker sessions that ended and were retried",
            m.reconnects.clone(),
        );
        r.register(
            "open_fds",
            "Open file descriptors of the worker",
            m.open_fds.clone(),
        );
        r.register("max_fds", "Soft RLIMIT_NOFILE of the worker", m.max_fds.clone());
        r.register(
            "fd_exhausted",
            "Connect attempts that failed with EMFILE/ENFILE (retried)",
            m.fd_exhausted.clone(),
        );
        r.register(
            "publish_failures",
            "Retry or dead-letter publishes the broker did not confirm (message handed back)",
            m.publish_failures.clone(),
        );
        r.register(
            "circuit_open",
            "1 while the destination's circuit breaker is open or probing",
            m.circuit_open.clone(),
        );
        r.register(
            "rate_limited_seconds",
            "Time deliveries waited for the rate limit",
            m.rate_limited_seconds.clone(),
        );
        r.register(
            "broker_blocked",
            "1 while the broker blocks the connection (memory or disk alarm): not ready",
            m.broker_blocked.clone(),
        );
        r.register(
            "messages_consumed",
            "Messages received from the queue (redeliveries included); equals the sum of \
             messages_settled_total and messages_unsettled",
            m.consumed.clone(),
        );
        r.register(
            "messages_settled",
            "Messages whose fate is settled: delivered (acked after 2xx), retried (copy confirmed in a \
             delay queue, then acked; deferrals included), dead_lettered (copy confirmed in the \
             dead-letter queue, then acked), handed_back (left to the broker unacked or nacked)",
            m.settled.clone(),
        );
        r.register(
            "messages_unsettled",
            "Messages received and not yet settled",
            m.unsettled.clone(),
        );
        r.register(
            "destination_gone",
            "1 once the destination answered 410 Gone: the worker stops taking messages and exits 5",
            m.destination_gone.clone(),
        );
        r.register(
            "throttle_limit",
            "Deliveries the adaptive throttle lets run at once",
            m.throttle_limit.clone(),
        );
        r.register(
            "rate_limit_per_second",
            "This worker's request rate limit (its share of a fleet-wide limit); 0 when unlimited",
            m.rate_limit.clone(),
        );
        r.register(
            "webhooks_configured",
            "Webhooks in the loaded snapshot (with --webhooks-secret)",
            m.webhooks_configured.clone(),
        );
        r.register(
            "webhooks_snapshot_loads",
            "Webhooks snapshot loads by result: ok, invalid (kept the last good one), deleted, api_error",
            m.snapshot_loads.clone(),
        );
        r.register(
            "webhooks_snapshot_loaded_timestamp_seconds",
            "When the last good Webhooks snapshot was loaded",
            m.snapshot_loaded_at.clone(),
        );
        r.register(
            "messages_unmatched",
            "Messages no Webhook matched, acked (--unmatched ack)",
            m.unmatched.clone(),
        );
        r.register(
            "webhook_reports",
            "Webhook status reports published, by result (ok, failed: merged into the next)",
            m.reports.clone(),
        );
        r.register(
            "webhooks_in_state",
            "Webhooks in trouble at this worker, by state: failing (failed attempts in a row), circuit_open, \
             throttled (copies set aside at their in-flight cap, throttle or rate limit), paused",
            m.webhooks_by_state.clone(),
        );
        r.register(
            "webhooks_unlisted",
            "Webhooks in trouble at this worker without series of their own (beyond the worst 20)",
            m.webhooks_unlisted.clone(),
        );
        r.register(
            "webhook_state",
            "1 per state of each of the worst 20 Webhooks in trouble at this worker (healthy ones have none)",
            m.webhook_state.clone(),
        );
        r.register(
            "webhook_consecutive_failures",
            "Failed attempts in a row at this worker, for the worst 20 Webhooks in trouble",
            m.webhook_consecutive_failures.clone(),
        );
        r.register(
            "webhook_set_aside",
            "Copies set aside without an attempt for want of capacity over the last refresh (5 s), for the \
             worst 20 Webhooks in trouble",
            m.webhook_set_aside.clone(),
        );
        Self { registry, ..m }
    }

    pub fn snapshot_load(&self, result: &'static str) {
        self.snapshot_loads.get_or_create(&vec![("result", result)]).inc();
    }

    pub fn delivery(&self, result: &'static str, reason: &'static str) {
        self.deliveries
            .get_or_create(&vec![("result", result), ("reason", reason)])
            .inc();
    }

    pub fn encode(&self) -> String {
        if let Some(n) = crate::fdlimit::open_fds() {
            self.open_fds.set(n as i64);
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.consuming.get() == 1 && m.broker_blocked.get() == 1 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the broker blocks the connection (flow control)\n",
        )
    } else if m.consuming.get() == 1 && m.broker_connected.get() == 0 {
        // NATS: the client lost its server and reconnects by itself while the session goes on.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the connection to the broker is lost; reconnecting\n",
        )
    } else if m.consuming.get() == 1 {
        (StatusCode::OK, "consuming\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not consuming\n")
    }
}

/// Binds the server (failing now, not later, when the address is taken) and serves it in the background.
pub async fn serve(addr: SocketAddr, m: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(m);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_documented_series() {
        let m = Metrics::new("team-a/orders");
        m.delivery("delivered", "ok");
        m.dead_letters
            .get_or_create(&vec![("reason", "http_status")])
            .inc();
        m.latency.observe(0.02);
        let text = m.encode();
        for series in [
            "hookfleet_deliveries_total{integration=\"team-a/orders\",result=\"delivered\",reason=\"ok\"} 1",
            "hookfleet_delivery_duration_seconds_bucket",
            "hookfleet_in_flight",
            "hookfleet_retries_total",
            "hookfleet_dead_letters_total",
            "hookfleet_broker_connected",
            "hookfleet_consuming",
            "hookfleet_open_fds",
            "hookfleet_max_fds",
            "hookfleet_fd_exhausted_total",
            "hookfleet_broker_blocked",
            "hookfleet_messages_consumed_total",
            "hookfleet_messages_unsettled",
            "hookfleet_destination_gone{",
            "hookfleet_rate_limit_per_second",
        ] {
            assert!(text.contains(series), "{series} missing in:\n{text}");
        }
    }
}
