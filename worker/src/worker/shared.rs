//! The worker's state, shared by every session and delivery task: the configuration, the destination
//! (one [`Target`], or the live Webhooks snapshot), the guards (rate limit, circuit breaker, adaptive
//! throttle), the lanes' slots and the 410 latch. What it does lives beside it: sessions in `session`,
//! the consume loop in `consume`, one message in `delivery` (and `fanout` with Webhooks), its fate in
//! `fate` and `settlement`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::gone::GoneLatch;
use super::lanes::Lanes;
use crate::breaker::Breaker;
use crate::config::{Config, WebhooksMode};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::target::{self, ClientPolicy, Target};
use crate::throttle::Throttle;
use crate::webhooks::Live;
use crate::webhooks::report::Tallies;
use crate::webhooks::series::{Exported, SetAside};
use crate::webhooks::watch::Builder;

/// Everything a delivery task needs; shared by all sessions.
pub struct Worker {
    pub(super) cfg: Config,
    pub(super) metrics: Arc<Metrics>,
    pub(super) limiter: Option<RateLimiter>,
    pub(super) breaker: Breaker,
    /// Concurrency slots, split between fresh messages and retries.
    pub(super) lanes: Lanes,
    pub(super) ladder: Vec<Duration>,
    /// The single destination (`None` with Webhooks).
    pub(super) single: Option<Target>,
    /// With Webhooks: the snapshot and what fan-out needs.
    pub(super) hooks: Option<Hooks>,
    /// Set by the first 410 Gone (see `gone`).
    pub(super) gone: GoneLatch,
    /// `--adaptive-throttle`: a limit on attempts in flight that follows the failure ratio.
    pub(super) throttle: Option<Throttle>,
}

/// Where the reports go while a session is up.
#[derive(Clone)]
pub enum ReportSink {
    /// The RabbitMQ session's confirm-mode publisher, to the reports queue.
    Amqp(Arc<super::broker::Session>),
    /// The NATS session's JetStream context, to the reports stream's subject.
    Nats(Box<async_nats::jetstream::Context>),
}

/// What a worker with Webhooks keeps besides the common state.
pub struct Hooks {
    pub(super) mode: WebhooksMode,
    pub(super) live: Arc<Live>,
    /// Builds each snapshot (the watcher's; tests load through it too).
    pub(super) builder: Arc<Builder>,
    /// HTTP requests in flight, all Webhooks together: `--concurrency` (a message fans out to many
    /// requests; the fd budget counts requests, not messages).
    pub(super) requests: Semaphore,
    pub(super) tallies: Tallies,
    /// Copies each Webhook had set aside for want of capacity, for its metric series.
    pub(super) set_aside: SetAside,
    /// The per-Webhook series exported at the last refresh (`metric_series`), to remove the stale.
    pub(super) exported: Mutex<Exported>,
    /// This worker's name in its reports.
    pub(super) worker_name: String,
    /// The session the reports are published through, while there is one.
    pub(super) session: Mutex<Option<ReportSink>>,
}

impl Worker {
    pub fn new(cfg: Config, metrics: Arc<Metrics>) -> Result<Arc<Self>, reqwest::Error> {
        let policy = ClientPolicy {
            allow_private_networks: cfg.allow_private_networks,
            idle_per_host: cfg.concurrency,
            concurrency: cfg.concurrency,
        };
        let single = match &cfg.destination {
            Some(dest) => {
                let http = target::client(&dest.tls, dest.timeout, policy)?;
                Some(Target::new(dest.clone(), &http, policy)?)
            }
            None => None,
        };
        let hooks = cfg.webhooks.clone().map(|mode| Hooks {
            mode,
            live: Arc::new(Live::default()),
            builder: Arc::new(Builder::new(
                cfg.allow_private_networks,
                cfg.concurrency,
                crate::webhooks::Guards {
                    breaker: cfg.circuit_breaker,
                    throttle: cfg.adaptive_throttle,
                    consumers: 0,
                },
            )),
            requests: Semaphore::new(cfg.concurrency),
            tallies: Tallies::default(),
            set_aside: SetAside::default(),
            exported: Mutex::default(),
            worker_name: crate::webhooks::report::worker_name(&|k| std::env::var(k).ok()),
            session: Mutex::new(None),
        });
        if let Some((r, _)) = cfg.rate_limit {
            metrics.rate_limit.set(f64::from(r));
        }
        if cfg.adaptive_throttle.is_some() {
            metrics.throttle_limit.set(cfg.concurrency as i64);
        }
        Ok(Arc::new(Self {
            limiter: cfg.rate_limit.map(|(r, b)| RateLimiter::new(r, b)),
            gone: GoneLatch::new(cfg.destination.as_ref().map(|d| d.url.clone())),
            throttle: cfg
                .adaptive_throttle
                .map(|(min, window)| Throttle::new(min as usize, cfg.concurrency, window)),
            breaker: Breaker::new(cfg.circuit_breaker.0, cfg.circuit_breaker.1),
            lanes: Lanes::new(cfg.concurrency),
            ladder: cfg.backoff.ladder(),
            metrics,
            single,
            hooks,
            cfg,
        }))
    }

    /// With Webhooks: the live snapshot (the watcher swaps into it; tests load it directly).
    pub fn webhooks(&self) -> Option<&Arc<Live>> {
        self.hooks.as_ref().map(|h| &h.live)
    }
}
