//! Broker sessions: connect, declare, consume until shutdown or until the session fails; reconnect
//! with jittered backoff. With several broker URIs (the nodes of a cluster) a connect tries them in
//! turn, starting at a random one (so a fleet spreads over the nodes) and, after a session ends, at the
//! node after the one it was on; the backoff comes between full rounds. A session that ends for any reason first lets its in-flight deliveries
//! finish (within the grace period), then closes its connection, which hands every unacked message
//! back to the queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::{Channel, Connection, ConnectionProperties};
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Interval;
use tracing::{error, info, warn};

use super::acks::Acks;
use super::broker::{LapinSettle, Publisher, Session};
use super::consume::{Interrupts, RetryLane, cancel, deliveries};
use super::error::{CONNECT_TIMEOUT, Fatal, SessionError};
use super::lanes::{FreshWait, Lane};
use super::shared::Worker;
use super::topology;
use crate::backoff::Backoff;
use crate::config::redact_uri;
use crate::metrics::Metrics;
use hookfleet_crds::integration::{Jitter, Topology};

/// How often the consume loop looks at whether the broker blocked the connection (flow control).
const BLOCKED_POLL: Duration = Duration::from_millis(250);

impl Worker {
    /// [`Worker::run`] until `shutdown`, or until the destination is gone (see `gone`): then the same
    /// drain as a shutdown, and `Err` with exit code `DESTINATION_GONE`.
    pub async fn serve(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) -> Result<(), Fatal> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut gone = self.gone.subscribe();
        let forward = tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => {}
                _ = gone.wait_for(|g| g.is_some()) => {}
            }
            let _ = stop_tx.send(true);
        });
        // With Webhooks: the snapshot first (not consuming, not ready until it is loaded), kept live
        // beside the sessions; the reports every few seconds.
        let mut background = Vec::new();
        if let Some(hooks) = &self.hooks {
            let client = kube::Client::try_default().await.map_err(|e| Fatal {
                code: 1,
                message: format!("connecting to the Kubernetes API (for the webhooks snapshot): {e}"),
            })?;
            background.push(tokio::spawn(crate::webhooks::watch::run(
                client,
                hooks.mode.clone(),
                hooks.builder.clone(),
                hooks.live.clone(),
                self.metrics.clone(),
            )));
            let mut stop = stop_rx.clone();
            info!(secret = %hooks.mode.secret, namespace = %hooks.mode.namespace, "waiting for the webhooks snapshot");
            tokio::select! {
                _ = hooks.live.wait_loaded() => {}
                _ = stop.wait_for(|s| *s) => {
                    forward.abort();
                    return Ok(());
                }
            }
            let worker = self.clone();
            background.push(tokio::spawn(async move {
                let mut every = tokio::time::interval(super::report::EVERY);
                every.tick().await;
                loop {
                    every.tick().await;
                    worker.metric_series();
                    worker.report().await;
                }
            }));
        }
        let result = self.clone().run(stop_rx).await;
        for task in background {
            task.abort();
        }
        forward.abort();
        result?;
        match self.gone.fatal() {
            Some(fatal) => Err(fatal),
            None => Ok(()),
        }
    }

    /// Runs until `shutdown` turns true (Ok) or an error a reconnect cannot fix (Err): sessions,
    /// reconnects, then the drain.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) -> Result<(), Fatal> {
        let mut failures: u32 = 0;
        // The node the next round of connects tries first.
        let mut first = rand::rng().random_range(0..self.cfg.amqp_uris.len().max(1));
        loop {
            let started = Instant::now();
            let session = if self.cfg.nats.is_some() {
                self.clone().jetstream_session(shutdown.clone()).await
            } else {
                self.clone().session(shutdown.clone(), &mut first).await
            };
            match session {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.metrics.consuming.set(0);
                    self.metrics.broker_connected.set(0);
                    if let Some(fatal) = e.fatal() {
                        error!(error = %e, "cannot consume; exiting");
                        return Err(fatal);
                    }
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
                            self.drain().await;
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// One connection: declare, consume until shutdown (Ok) or until the session fails (Err). `first`
    /// is the node to try first; it is left at the node after the one this session connected to.
    async fn session(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
        first: &mut usize,
    ) -> Result<(), SessionError> {
        let conn = tokio::select! {
            c = self.connect_any(first) => c?,
            _ = shutdown.wait_for(|s| *s) => {
                self.drain().await;
                return Ok(());
            }
        };
        self.metrics.broker_connected.set(1);
        let mut session = None;
        let result = self.consume(&conn, &mut shutdown, &mut session).await;
        if result.is_err() {
            // The session is over (the connection may already be gone): say so before readiness turns
            // false with `consuming`, not after the drain and the close.
            self.metrics.broker_connected.set(0);
        }
        self.metrics.consuming.set(0);
        self.metrics.broker_blocked.set(0);
        if result.is_err() {
            self.set_report_session(None);
        }
        // Shutdown or failure alike: in-flight deliveries finish and settle (those that can still
        // ack do), then the connection closes and the broker requeues whatever is left unacked.
        if result.is_err()
            && let Some(s) = &session
        {
            // Tasks waiting for a publish channel give up at once: the session is over.
            s.publisher.close();
        }
        match result {
            Ok(consume_ch) => {
                self.drain().await;
                // The last report, through the session still open.
                self.report().await;
                self.set_report_session(None);
                close(&conn, Some(&consume_ch), 200, "worker shutting down").await;
                self.metrics.broker_connected.set(0);
                info!("closed the broker connection");
                Ok(())
            }
            Err(e) => {
                if e.fatal().is_none() {
                    self.drain().await;
                }
                close(&conn, None, 320, "worker reconnecting").await;
                Err(e)
            }
        }
    }

    /// One round of connects: each node once, from `*first` on, until one accepts. On success `*first`
    /// moves past the node connected to, so the next round (after this session ends) starts elsewhere.
    async fn connect_any(&self, first: &mut usize) -> Result<Connection, SessionError> {
        let cfg = &self.cfg;
        let n = cfg.amqp_uris.len();
        let mut errors = Vec::new();
        let mut last = None;
        for k in 0..n {
            let i = (*first + k) % n;
            let uri = &cfg.amqp_uris[i];
            let props = ConnectionProperties::default().with_connection_name(
                format!("hookfleet-worker {} {}", cfg.integration, std::process::id()).into(),
            );
            info!(broker = %redact_uri(uri), node = i + 1, nodes = n, "connecting to the broker");
            let e = match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(uri, props)).await {
                Ok(Ok(conn)) => {
                    info!(broker = %redact_uri(uri), node = i + 1, nodes = n, "connected to the broker");
                    *first = (i + 1) % n;
                    return Ok(conn);
                }
                Ok(Err(e)) => SessionError::Connect(e),
                Err(_) => SessionError::ConnectTimeout,
            };
            if n > 1 {
                warn!(broker = %redact_uri(uri), node = i + 1, nodes = n, error = %e, "broker node did not answer; trying the next");
            }
            errors.push(format!("{}: {e}", redact_uri(uri)));
            last = Some(e);
        }
        match last {
            Some(e) if n == 1 => Err(e),
            _ => Err(SessionError::NoNodeAnswered {
                nodes: n,
                errors: errors.join("; "),
            }),
        }
    }

    /// The work queue's lane: declares the topology, opens the publisher, starts the retry lane and
    /// consumes until shutdown (`Ok` with the consume channel, to close) or until the session fails.
    async fn consume(
        self: &Arc<Self>,
        conn: &Connection,
        shutdown: &mut watch::Receiver<bool>,
        session_out: &mut Option<Arc<Session>>,
    ) -> Result<Channel, SessionError> {
        let cfg = &self.cfg;
        let ch = conn.create_channel().await.map_err(SessionError::Channel)?;
        match cfg.topology {
            Topology::Managed => topology::declare(&ch, cfg, &self.ladder).await?,
            Topology::External => topology::check(conn, cfg, &self.ladder).await?,
        }
        let publisher = Publisher::open(conn, cfg.confirm_timeout).await?;
        let tag = format!("hookfleet-{}", std::process::id());
        let mut consumer = self.consumer(&ch, &cfg.queue, &tag).await?;
        self.metrics.consuming.set(1);
        info!(queue = %cfg.queue, queue_type = cfg.queue_type.as_str(), topology = cfg.topology.as_str(), prefetch = cfg.lane_prefetch(),
              max_message_bytes = cfg.max_message_bytes, in_flight_bytes = cfg.in_flight_bytes, concurrency = cfg.concurrency, "consuming");
        let session = Arc::new(Session {
            publisher,
            publish_failed: tokio::sync::Notify::new(),
        });
        *session_out = Some(session.clone());
        self.set_report_session(Some(super::shared::ReportSink::Amqp(session.clone())));
        let mut retry_lane = self
            .start_retry_lane(conn, shutdown.clone(), session.clone())
            .await?;
        let _fleet_share = self.start_fleet_share(conn).await?;
        let settle = Arc::new(LapinSettle {
            session: session.clone(),
            acks: Acks::start(ch.clone(), cfg.confirm_timeout),
            timeout: cfg.confirm_timeout,
        });
        let mut lane = Lane::Fresh(FreshWait::default());
        let mut interrupts = WorkLane {
            shutdown,
            session: &session,
            retry_lane: &mut retry_lane,
            blocked_poll: tokio::time::interval(BLOCKED_POLL),
            conn,
            metrics: &self.metrics,
        };
        self.consume_lane(
            &mut deliveries(&mut consumer),
            &mut lane,
            &settle,
            &mut interrupts,
        )
        .await?;
        info!("shutdown: cancelling the consumer");
        self.metrics.consuming.set(0);
        cancel(&ch, &tag, "the consumer").await;
        retry_lane.finish().await;
        Ok(ch)
    }

    /// Waits up to the grace period for in-flight deliveries to finish and settle.
    pub(super) async fn drain(&self) {
        let grace = self.cfg.shutdown_grace;
        let in_flight = self.lanes.in_flight();
        if in_flight == 0 {
            return;
        }
        info!(in_flight, grace = ?grace, "draining in-flight deliveries");
        match self.lanes.wait_idle(grace).await {
            true => info!("in-flight deliveries finished"),
            false => {
                let left = self.lanes.in_flight();
                warn!(
                    left,
                    "grace period over; unfinished deliveries go back to the queue"
                );
            }
        }
    }
}

/// What ends the work queue's consume loop: a shutdown, a copy that was not stored, the retry lane
/// failing. While it waits for a message it also polls whether the broker blocked the connection.
struct WorkLane<'a> {
    shutdown: &'a mut watch::Receiver<bool>,
    session: &'a Session,
    retry_lane: &'a mut RetryLane,
    blocked_poll: Interval,
    conn: &'a Connection,
    metrics: &'a Metrics,
}

impl Interrupts for WorkLane<'_> {
    async fn interrupted(&mut self, idle: bool) -> Result<(), SessionError> {
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.wait_for(|s| *s) => return Ok(()),
                _ = self.session.publish_failed.notified() => return Err(SessionError::PublishFailed),
                r = self.retry_lane.ended() => return r,
                _ = self.blocked_poll.tick(), if idle => poll_blocked(self.conn, self.metrics),
            }
        }
    }
}

/// Under flow control (a memory or disk alarm) the broker stops reading this connection: no
/// confirm, no ack gets through. Not ready meanwhile.
fn poll_blocked(conn: &Connection, metrics: &Metrics) {
    let blocked = conn.status().blocked();
    if blocked != (metrics.broker_blocked.get() == 1) {
        if blocked {
            warn!("the broker blocked the connection (flow control): not ready");
        } else {
            info!("the broker unblocked the connection");
        }
    }
    metrics.broker_blocked.set(i64::from(blocked));
}

/// How long closing a channel or the connection may take: a connection the broker blocks (flow
/// control) writes nothing, so a close would wait for ever.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes `ch` (if given), then `conn`, each bounded by [`CLOSE_TIMEOUT`]. A connection that cannot be
/// closed cleanly is dropped; the broker requeues its unacked messages when the socket goes.
async fn close(conn: &Connection, ch: Option<&Channel>, code: u16, why: &str) {
    if let Some(ch) = ch
        && tokio::time::timeout(CLOSE_TIMEOUT, ch.close(code, why.into()))
            .await
            .is_err()
    {
        warn!("closing the channel timed out");
    }
    if tokio::time::timeout(CLOSE_TIMEOUT, conn.close(code, why.into()))
        .await
        .is_err()
    {
        warn!("closing the connection timed out; dropping it");
    }
}

/// Delay before reconnect round `n` (1-based): equal jitter over 0.5 s × 2^(n−1), at most 30 s, so
/// a fleet that lost its broker does not come back in one wave.
pub fn reconnect_delay(n: u32, rng: &mut impl Rng) -> Duration {
    const RECONNECT: Backoff = Backoff {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(30),
        multiplier: 2.0,
        jitter: Jitter::Equal,
    };
    RECONNECT.jittered(n, rng)
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
