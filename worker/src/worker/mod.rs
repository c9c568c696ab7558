//! The delivery loop, by concern:
//!
//! - [`session`]: one broker connection at a time (connect, declare, consume), reconnecting with
//!   jittered backoff, draining in-flight deliveries before a connection is closed;
//! - [`lanes`]: the concurrency split between fresh messages and due retries, and the retry lane's
//!   consume loop;
//! - [`topology`]: the queues and their arguments (classic or quorum), and a declaration the broker
//!   refuses because the queue exists with other arguments;
//! - [`delivery`]: one message from received to an [`Outcome`](crate::outcome::Outcome) (template,
//!   circuit breaker, rate limit, the HTTP attempt);
//! - [`settlement`]: the outcome's *fate* (ack; store a copy in a queue, then ack; hand back) and
//!   the one function that carries out every fate, with the message accounting;
//! - [`acks`]: the acks of one consume channel, coalesced into `multiple` acks where no other
//!   unsettled message is covered.
//!
//! The rule everything here serves: a message is acked only after its fate is settled somewhere
//! durable: the endpoint answered 2xx, or a copy sits in a delay queue or the dead-letter queue
//! and the broker confirmed it. Whatever happens in between (crash, kill -9, broker restart), the
//! broker still holds the original and redelivers it; the receiver may see a duplicate, with the same
//! `webhook-id`.

mod acks;
mod delivery;
mod fleet;
mod gone;
mod lanes;
mod session;
mod settlement;
pub mod topology;

use std::sync::Arc;
use std::time::Duration;

use crate::breaker::Breaker;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::ssrf::GuardedResolver;
use crate::throttle::Throttle;

pub use gone::Gone;
pub use lanes::{FreshWait, Lanes};
pub use session::{Fatal, SessionError, reconnect_delay};
pub use settlement::Fate;

/// Everything a delivery task needs; shared by all sessions.
pub struct Worker {
    cfg: Config,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    limiter: Option<RateLimiter>,
    breaker: Breaker,
    /// Concurrency slots, split between fresh messages and retries.
    lanes: Lanes,
    ladder: Vec<Duration>,
    /// Static headers, built once.
    headers: reqwest::header::HeaderMap,
    /// The OAuth2 token cache, when the destination wants one.
    tokens: Option<crate::auth::TokenSource>,
    /// Set by the first 410 Gone (see `gone`).
    gone: tokio::sync::watch::Sender<Option<Gone>>,
    /// `--adaptive-throttle`: a limit on attempts in flight that follows the failure ratio.
    throttle: Option<Throttle>,
    /// Standard Webhooks signing, when secrets are set.
    signer: Option<crate::signing::Signer>,
}

impl Worker {
    pub fn new(cfg: Config, metrics: Arc<Metrics>) -> Result<Arc<Self>, reqwest::Error> {
        let mut builder = reqwest::Client::builder().tls_backend_rustls();
        if let Some(pem) = &cfg.tls.ca_pem {
            builder = builder.tls_certs_merge(reqwest::Certificate::from_pem_bundle(pem)?);
        }
        if let Some(pem) = &cfg.tls.identity_pem {
            builder = builder.identity(reqwest::Identity::from_pem(pem)?);
        }
        let http = builder
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
            // In-flight requests are bounded by the semaphore; idle keep-alive connections by this.
            // Together they are the fd budget of `fdlimit::required`.
            .pool_max_idle_per_host(cfg.concurrency)
            .pool_idle_timeout(Duration::from_secs(30))
            .dns_resolver(GuardedResolver::new(cfg.allow_private_networks))
            .no_proxy()
            .user_agent(concat!("hookfleet-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let mut headers = reqwest::header::HeaderMap::new();
        for (n, v) in &cfg.headers {
            headers.append(n.clone(), v.clone());
        }
        if let Some((r, _)) = cfg.rate_limit {
            metrics.rate_limit.set(f64::from(r));
        }
        if cfg.adaptive_throttle.is_some() {
            metrics.throttle_limit.set(cfg.concurrency as i64);
        }
        Ok(Arc::new(Self {
            limiter: cfg.rate_limit.map(|(r, b)| RateLimiter::new(r, b)),
            gone: tokio::sync::watch::Sender::new(None),
            throttle: cfg
                .adaptive_throttle
                .map(|(min, window)| Throttle::new(min as usize, cfg.concurrency, window)),
            breaker: Breaker::new(cfg.circuit_breaker.0, cfg.circuit_breaker.1),
            lanes: Lanes::new(cfg.concurrency),
            ladder: cfg.backoff.ladder(),
            http,
            metrics,
            headers,
            tokens: cfg.oauth2.clone().map(crate::auth::TokenSource::new),
            signer: crate::signing::Signer::new(&cfg.signing_secrets),
            cfg,
        }))
    }

    fn delay_queue(&self, ttl: Duration) -> String {
        topology::delay_queue(&self.cfg.queue, ttl)
    }
}
