//! The worker's state, shared by every session and delivery task: the configuration, the HTTP
//! client, the destination's guards (rate limit, circuit breaker, adaptive throttle), the lanes'
//! slots and the 410 latch. What it does lives beside it: sessions in `session`, the consume loop in
//! `consume`, one message in `delivery`, its fate in `fate` and `settlement`.

use std::sync::Arc;
use std::time::Duration;

use super::gone::GoneLatch;
use super::lanes::Lanes;
use crate::breaker::Breaker;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::ssrf::GuardedResolver;
use crate::throttle::Throttle;

/// Everything a delivery task needs; shared by all sessions.
pub struct Worker {
    pub(super) cfg: Config,
    pub(super) http: reqwest::Client,
    pub(super) metrics: Arc<Metrics>,
    pub(super) limiter: Option<RateLimiter>,
    pub(super) breaker: Breaker,
    /// Concurrency slots, split between fresh messages and retries.
    pub(super) lanes: Lanes,
    pub(super) ladder: Vec<Duration>,
    /// Static headers, built once.
    pub(super) headers: reqwest::header::HeaderMap,
    /// The OAuth2 token cache, when the destination wants one.
    pub(super) tokens: Option<crate::auth::TokenSource>,
    /// Set by the first 410 Gone (see `gone`).
    pub(super) gone: GoneLatch,
    /// `--adaptive-throttle`: a limit on attempts in flight that follows the failure ratio.
    pub(super) throttle: Option<Throttle>,
    /// Standard Webhooks signing, when secrets are set.
    pub(super) signer: Option<crate::signing::Signer>,
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
            gone: GoneLatch::new(cfg.destination.clone()),
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
}
