//! Many Webhooks on one fleet (`--webhooks-secret`): the snapshot the operator compiles into a Secret,
//! built into [`Loaded`] (every Webhook's [`Target`], through the same builder as a single destination,
//! and the matching [`Index`]), kept live by [`watch`] and swapped atomically in [`Live`]; and what the
//! worker reports about each Webhook ([`report`]).

pub mod index;
pub mod report;
pub mod series;
pub mod watch;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hookfleet_crds::contract::WorkerSetup;
use hookfleet_crds::contract::webhooks::{Entry, Snapshot, secret_key};
use hookfleet_crds::integration::RateLimitScope;
use tokio::sync::Semaphore;
use tokio::sync::watch as channel;
use tracing::error;

pub use index::Index;

use crate::breaker::Breaker;
use crate::config::{ConfigError, Destination};
use crate::ratelimit::{RateLimiter, share};
use crate::target::{ClientPolicy, Target};
use crate::throttle::Throttle;

/// One Webhook of the loaded snapshot.
pub struct Hook {
    pub name: String,
    pub generation: i64,
    pub paused: bool,
    /// `None` when its entry could not be built (logged): its messages are deferred like a paused
    /// Webhook's, never dropped, until a snapshot fixes it.
    pub target: Option<Target>,
    /// Its secret values (every value of its entry), scrubbed from what is reported.
    pub secrets: Vec<String>,
    /// Its own circuit breaker (`--circuit-breaker-*`): a failing endpoint's copies are deferred
    /// without an attempt, instead of holding every message's fan-out (and the request slots).
    pub breaker: Breaker,
    /// Its requests in flight: its entry's `maxInFlight`, and at most half the worker's (rounded up),
    /// so a slow endpoint never holds every request slot (or fd) of the fleet. A copy that finds no
    /// permit is set aside (deferred `throttled`), never waits.
    pub in_flight: Semaphore,
    /// Its entry's rate limit (a token bucket): a copy that finds no token is deferred `rate_limited`.
    /// With `scope: fleet`, this worker's share of it.
    pub rate: Option<RateLimiter>,
    /// With a fleet-wide rate limit: the fleet's (per second, burst), and the consumers `rate`'s share
    /// was computed for (the worker re-reads them every few seconds and reshares on a change).
    pub fleet_rate: Option<((u32, u32), AtomicU32)>,
    /// Its own adaptive throttle (`--adaptive-throttle`, between its minimum and the Webhook's in-flight
    /// cap): while its failures outnumber its successes, fewer of its requests run at once; a copy over
    /// the throttle's limit is deferred `throttled`.
    pub throttle: Option<Throttle>,
    /// The SHA-256 of the entry it was built from ([`fingerprint`]): an unchanged entry keeps its
    /// Hook, breaker included, across snapshots. (Not the entry itself: with 10,000 Webhooks its copy
    /// was a fifth of the worker's memory.)
    fingerprint: [u8; 32],
}

/// The SHA-256 of `entry`'s JSON (deterministic: its maps are ordered), so that two entries with the
/// same fingerprint are the same entry.
fn fingerprint(entry: &Entry) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let json = serde_json::to_vec(entry).expect("an entry serializes");
    Sha256::digest(&json).into()
}

/// The worker's settings of each Webhook's own guards.
#[derive(Clone, Copy, Debug, Default)]
pub struct Guards {
    /// (threshold, cooldown) of its circuit breaker (`--circuit-breaker-*`).
    pub breaker: (u32, Duration),
    /// (minimum in flight, window) of its adaptive throttle (`--adaptive-throttle*`); `None` when off.
    pub throttle: Option<(u32, Duration)>,
    /// Consumers on the work queue when the snapshot is built (0: not known yet), for the share of a
    /// fleet-wide rate limit.
    pub consumers: u32,
}

/// A snapshot as the worker uses it.
#[derive(Default)]
pub struct Loaded {
    pub hooks: Vec<Arc<Hook>>,
    by_name: HashMap<String, usize>,
    index: Index,
    /// The Secret's resourceVersion it came from.
    pub revision: String,
    /// Webhooks kept as they were in the previous snapshot (unchanged entries).
    pub reused: usize,
}

impl Loaded {
    /// Builds every entry of `snapshot` (an entry that fails is logged by Webhook name and setting,
    /// never by value, and kept as unbuildable), and the index. Clients: `shared` (built by the
    /// caller with `policy`), or a Webhook's own when it has TLS material. A Webhook whose entry is
    /// as in `previous` (built with the same client and policy) is kept as it was: its connections
    /// and its OAuth2 token stay.
    pub fn build(
        snapshot: &Snapshot,
        revision: &str,
        allow_private_networks: bool,
        shared: &reqwest::Client,
        policy: ClientPolicy,
        guards: Guards,
        previous: Option<&Loaded>,
    ) -> Self {
        let mut hooks = Vec::with_capacity(snapshot.webhooks.len());
        let mut by_name = HashMap::with_capacity(snapshot.webhooks.len());
        let mut reused = 0;
        for entry in &snapshot.webhooks {
            let fingerprint = fingerprint(entry);
            if let Some(old) = previous.and_then(|p| p.get(&entry.name))
                && old.fingerprint == fingerprint
            {
                by_name.insert(entry.name.clone(), hooks.len());
                hooks.push(old.clone());
                reused += 1;
                continue;
            }
            let target = build_destination(entry, allow_private_networks)
                .and_then(|d| Target::new(d, shared, policy).map_err(|e| bad_tls(&e)));
            let target = match target {
                Ok(t) => Some(t),
                Err(e) => {
                    error!(webhook = %entry.name, setting = %e.setting, error = %e.message,
                           "webhook cannot be built; its messages are deferred until it is fixed");
                    None
                }
            };
            by_name.insert(entry.name.clone(), hooks.len());
            let cap = in_flight_cap(policy.concurrency, entry.max_in_flight);
            hooks.push(Arc::new(Hook {
                name: entry.name.clone(),
                generation: entry.generation,
                paused: entry.paused,
                target,
                secrets: entry
                    .secrets
                    .values()
                    .filter(|v| !v.is_empty())
                    .cloned()
                    .collect(),
                breaker: Breaker::new(guards.breaker.0, guards.breaker.1),
                in_flight: Semaphore::new(cap),
                throttle: guards
                    .throttle
                    .map(|(min, window)| Throttle::new(min as usize, cap, window)),
                rate: entry.rate_limit.map(|r| match r.scope() {
                    RateLimitScope::Worker => RateLimiter::new(r.per_second, r.burst()),
                    RateLimitScope::Fleet => {
                        let (per_second, burst) = share((r.per_second, r.burst()), guards.consumers);
                        RateLimiter::with_rate(per_second, burst)
                    }
                }),
                fleet_rate: entry
                    .rate_limit
                    .filter(|r| r.scope() == RateLimitScope::Fleet)
                    .map(|r| ((r.per_second, r.burst()), AtomicU32::new(guards.consumers.max(1)))),
                fingerprint,
            }));
        }
        let index = Index::new(
            snapshot
                .webhooks
                .iter()
                .map(|e| (e.events.as_slice(), &e.match_headers)),
        );
        Self {
            hooks,
            by_name,
            index,
            revision: revision.to_owned(),
            reused,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Hook>> {
        self.by_name.get(name).map(|&i| &self.hooks[i])
    }

    /// The Webhooks matching event `name` and the message's headers (`header`).
    pub fn matching(&self, name: &str, header: impl Fn(&str) -> Option<String>) -> Vec<Arc<Hook>> {
        let (found, _) = self.index.lookup(name, header);
        found.into_iter().map(|i| self.hooks[i].clone()).collect()
    }

    /// Webhooks that can be delivered to (built).
    pub fn built(&self) -> usize {
        self.hooks.iter().filter(|h| h.target.is_some()).count()
    }
}

fn bad_tls(e: &reqwest::Error) -> ConfigError {
    ConfigError {
        setting: "tls".into(),
        message: format!("the HTTP client refused the TLS material: {e}"),
    }
}

/// The destination of `entry`, exactly as a single-destination Integration with that destination:
/// its flags from the contract's [`WorkerSetup::for_webhook`], checked by the contract's rules, its
/// Secret-filled variables and files looked up in the entry's secrets.
pub fn build_destination(entry: &Entry, allow_private_networks: bool) -> Result<Destination, ConfigError> {
    let setup = WorkerSetup::for_webhook(&entry.destination, allow_private_networks);
    let mut checked = setup
        .args
        .check()
        .map_err(|mut e| ConfigError::from(e.remove(0)))?;
    // Every Secret key the destination references must be in the entry (the operator leaves out a
    // Webhook whose Secret it cannot read; a missing one here would silently drop auth or a header).
    for f in setup.secret_env.iter().chain(&setup.secret_files) {
        if !entry.secrets.contains_key(&secret_key(&f.secret)) {
            return Err(ConfigError {
                setting: f.name.clone(),
                message: format!(
                    "Secret {} key {} is not in the snapshot entry",
                    f.secret.name, f.secret.key
                ),
            });
        }
    }
    let env = |var: &str| {
        setup
            .secret_env
            .iter()
            .find(|e| e.name == var)
            .and_then(|e| entry.secrets.get(&secret_key(&e.secret)).cloned())
    };
    let files = |path: &Path| {
        setup
            .secret_files
            .iter()
            .find(|f| Path::new(&f.name) == path)
            .and_then(|f| entry.secrets.get(&secret_key(&f.secret)))
            .map(|v| v.clone().into_bytes())
            .ok_or_else(|| format!("{}: not in the snapshot entry", path.display()))
    };
    Destination::build(&setup.args, &mut checked, &env, &files)
}

/// Requests one Webhook may have in flight: half the worker's concurrency, rounded up.
pub fn per_webhook_in_flight(concurrency: usize) -> usize {
    concurrency.div_ceil(2).max(1)
}

/// A Webhook's in-flight cap: its entry's `maxInFlight`, never above [`per_webhook_in_flight`].
pub fn in_flight_cap(concurrency: usize, max_in_flight: Option<u32>) -> usize {
    let half = per_webhook_in_flight(concurrency);
    max_in_flight.map_or(half, |m| (m as usize).clamp(1, half))
}

/// The idle keep-alive connections per host that keep the fd budget with `pools` connection pools
/// (hosts of the shared client, plus each Webhook's own client): `concurrency` in all.
pub fn idle_per_host(concurrency: usize, pools: usize) -> usize {
    concurrency / pools.max(1)
}

/// How many connection pools the destinations of `snapshot` make: distinct (scheme, host, port) of
/// those without TLS material, plus one per Webhook with it.
pub fn pools(snapshot: &Snapshot) -> usize {
    let mut hosts = std::collections::HashSet::new();
    let mut own = 0;
    for e in &snapshot.webhooks {
        if e.destination
            .tls
            .as_ref()
            .is_some_and(|t| t.ca_from.is_some() || t.client_cert_secret.is_some())
        {
            own += 1;
        } else if let Ok(u) = reqwest::Url::parse(&e.destination.url) {
            hosts.insert((
                u.scheme().to_owned(),
                u.host_str().map(str::to_owned),
                u.port_or_known_default(),
            ));
        }
    }
    hosts.len() + own
}

/// The loaded snapshot, swapped whole on every change; `None` until the first one loads (the worker
/// does not consume before: a message must never be unmatched for want of configuration).
pub struct Live {
    current: RwLock<Option<Arc<Loaded>>>,
    loaded: channel::Sender<bool>,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            current: RwLock::new(None),
            loaded: channel::Sender::new(false),
        }
    }
}

impl Live {
    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn swap(&self, loaded: Loaded) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(loaded));
        self.loaded.send_replace(true);
    }

    /// Resolves once a snapshot is loaded.
    pub async fn wait_loaded(&self) {
        let mut rx = self.loaded.subscribe();
        let _ = rx.wait_for(|l| *l).await;
    }
}

/// A snapshot entry for the unit tests.
#[cfg(test)]
pub(crate) fn entry(name: &str, events: &[&str], dst: serde_json::Value, secrets: &[(&str, &str)]) -> Entry {
    Entry {
        name: name.into(),
        generation: 1,
        events: events.iter().map(|s| s.to_string()).collect(),
        match_headers: std::collections::BTreeMap::new(),
        paused: false,
        destination: serde_json::from_value(dst).unwrap(),
        secrets: secrets
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        max_in_flight: None,
        rate_limit: None,
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    const NO_BREAKER: Guards = Guards {
        breaker: (0, Duration::from_secs(1)),
        throttle: None,
        consumers: 0,
    };

    #[test]
    fn an_entry_is_built_like_a_single_destination_with_its_own_secrets() {
        let e = entry(
            "acme",
            &["temp"],
            serde_json::json!({
                "url": "https://acme.example/h",
                "headers": {"X-Team": "a"},
                "headersFrom": [{"name": "X-Key", "secretKeyRef": {"name": "acme", "key": "k"}}],
                "auth": {"bearer": {"tokenFrom": {"name": "acme", "key": "token"}}},
                "signing": {"secretRef": {"name": "acme", "key": "whsec"}},
            }),
            &[
                ("acme/k", "key-1"),
                ("acme/token", "t0k"),
                ("acme/whsec", "sign-me"),
            ],
        );
        let d = build_destination(&e, false).unwrap();
        assert_eq!(d.url.as_str(), "https://acme.example/h");
        let h: Vec<(String, String)> = d
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        assert_eq!(
            h,
            [
                ("x-team".to_owned(), "a".to_owned()),
                ("x-key".into(), "key-1".into()),
                ("authorization".into(), "Bearer t0k".into())
            ]
        );
        assert_eq!(d.signing_secrets, [b"sign-me".to_vec()]);
        for s in ["key-1", "t0k", "sign-me"] {
            assert!(d.secrets.iter().any(|v| v == s), "{s} in the redaction list");
        }
        // A missing secret value names the setting, never a value.
        let mut broken = e.clone();
        broken.secrets.remove("acme/token");
        let err = build_destination(&broken, false).unwrap_err();
        assert!(!err.to_string().contains("key-1"), "{err}");
        // A private destination needs the Integration's allowPrivateNetworks.
        let private = entry(
            "p",
            &[""],
            serde_json::json!({"url": "http://127.0.0.1:9/h"}),
            &[],
        );
        assert!(build_destination(&private, false).is_err());
        assert!(build_destination(&private, true).is_ok());
    }

    #[test]
    fn an_entry_that_cannot_be_built_is_kept_unbuilt_and_the_others_work() {
        let good = entry(
            "good",
            &["a"],
            serde_json::json!({"url": "http://127.0.0.1:9/h"}),
            &[],
        );
        let bad = entry(
            "bad",
            &["a"],
            serde_json::json!({"url": "http://127.0.0.1:9/h", "auth": {"bearer": {"tokenFrom": {"name": "x", "key": "y"}}}}),
            &[],
        );
        let snap = Snapshot {
            webhooks: vec![bad, good],
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let policy = ClientPolicy {
            allow_private_networks: true,
            idle_per_host: 1,
            concurrency: 4,
        };
        let shared =
            crate::target::client(&Default::default(), std::time::Duration::from_secs(1), policy).unwrap();
        let l = Loaded::build(&snap, "7", true, &shared, policy, NO_BREAKER, None);
        assert_eq!(l.built(), 1);
        assert!(l.get("bad").unwrap().target.is_none());
        assert!(l.get("good").unwrap().target.is_some());
        assert_eq!(l.matching("abc", |_| None).len(), 2);
        assert_eq!(pools(&snap), 1);
        assert_eq!(idle_per_host(64, 3), 21);
        assert_eq!((per_webhook_in_flight(1), per_webhook_in_flight(5)), (1, 3));
        assert_eq!(
            (
                in_flight_cap(8, None),
                in_flight_cap(8, Some(2)),
                in_flight_cap(8, Some(100))
            ),
            (4, 2, 4),
            "an entry's cap only lowers the half"
        );
        // Unchanged entries keep their Hook (and its connections, token cache) in the next snapshot.
        let mut next = snap.clone();
        next.webhooks[1].paused = true;
        let again = Loaded::build(&next, "8", true, &shared, policy, NO_BREAKER, Some(&l));
        assert_eq!(again.reused, 1);
        assert!(Arc::ptr_eq(again.get("bad").unwrap(), l.get("bad").unwrap()));
        assert!(!Arc::ptr_eq(again.get("good").unwrap(), l.get("good").unwrap()));
        assert!(again.get("good").unwrap().paused);
        // With --adaptive-throttle each Webhook has its own, up to its in-flight cap.
        let mut capped = snap.clone();
        capped.webhooks[1].max_in_flight = Some(1);
        let guards = Guards {
            breaker: (0, Duration::from_secs(1)),
            throttle: Some((1, Duration::from_secs(5))),
            consumers: 0,
        };
        let t = Loaded::build(&capped, "9", true, &shared, policy, guards, None);
        let limit = |n: &str| t.get(n).unwrap().throttle.as_ref().map(|t| t.limit());
        assert_eq!((limit("bad"), limit("good")), (Some(2), Some(1)));
        assert!(l.get("good").unwrap().throttle.is_none(), "off without the flag");
    }
}
