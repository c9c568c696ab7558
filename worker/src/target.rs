//! [`Target`]: a [`Destination`] ready to send to: its static headers as the client takes them, its
//! OAuth2 token cache, its signer, and the HTTP client its requests go through (the worker's shared
//! one, or its own when it brings TLS material). The single destination and every Webhook are built
//! here alike; every client resolves names through the SSRF guard with the Integration's
//! `--allow-private-networks`.

use std::time::Duration;

use reqwest::header::HeaderMap;

use crate::config::{Destination, TlsFiles};
use crate::ssrf::GuardedResolver;

/// A destination and what sending to it needs.
pub struct Target {
    pub dest: Destination,
    /// The client its requests go through.
    pub http: reqwest::Client,
    /// Static headers (secret ones marked sensitive), built once.
    pub headers: HeaderMap,
    /// The OAuth2 token cache, when the destination wants one.
    pub tokens: Option<crate::auth::TokenSource>,
    /// Standard Webhooks signing, when secrets are set.
    pub signer: Option<crate::signing::Signer>,
}

/// How the worker's HTTP clients are built: no redirects, no proxy, the SSRF-guarded resolver.
#[derive(Clone, Copy, Debug)]
pub struct ClientPolicy {
    pub allow_private_networks: bool,
    /// Idle keep-alive connections kept per host: with the requests in flight (bounded by the
    /// concurrency) they make the fd budget of `fdlimit::required`.
    pub idle_per_host: usize,
    /// The worker's `--concurrency`.
    pub concurrency: usize,
}

/// A client for `tls` (none: the system roots, no client certificate). `timeout` bounds every request
/// (a request may bound itself tighter).
pub fn client(
    tls: &TlsFiles,
    timeout: Duration,
    policy: ClientPolicy,
) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder().tls_backend_rustls();
    if let Some(pem) = &tls.ca_pem {
        builder = builder.tls_certs_merge(reqwest::Certificate::from_pem_bundle(pem)?);
    }
    if let Some(pem) = &tls.identity_pem {
        builder = builder.identity(reqwest::Identity::from_pem(pem)?);
    }
    builder
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .pool_max_idle_per_host(policy.idle_per_host)
        .pool_idle_timeout(Duration::from_secs(30))
        .dns_resolver(GuardedResolver::new(policy.allow_private_networks))
        .no_proxy()
        .user_agent(concat!("hookfleet-worker/", env!("CARGO_PKG_VERSION")))
        .build()
}

impl Target {
    /// `dest` sent through `shared` unless it brings TLS material (then through a client of its own,
    /// built with `policy`).
    pub fn new(
        dest: Destination,
        shared: &reqwest::Client,
        policy: ClientPolicy,
    ) -> Result<Self, reqwest::Error> {
        let http = if dest.tls.ca_pem.is_some() || dest.tls.identity_pem.is_some() {
            client(&dest.tls, dest.timeout, policy)?
        } else {
            shared.clone()
        };
        let mut headers = HeaderMap::new();
        for (n, v) in &dest.headers {
            headers.append(n.clone(), v.clone());
        }
        Ok(Self {
            tokens: dest.oauth2.clone().map(crate::auth::TokenSource::new),
            signer: crate::signing::Signer::new(&dest.signing_secrets),
            http,
            headers,
            dest,
        })
    }

    /// Whether it has a client of its own (TLS material).
    pub fn own_client(&self) -> bool {
        self.dest.tls.ca_pem.is_some() || self.dest.tls.identity_pem.is_some()
    }
}
