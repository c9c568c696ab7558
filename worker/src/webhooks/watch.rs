//! Keeps the snapshot live: watches the one Secret (by name, in the Integration's namespace: all the
//! worker's Role grants) and on every change decodes it, builds it ([`super::Loaded::build`]) and
//! swaps it in. Whatever goes wrong (the API server away, a Secret deleted or not decodable) keeps the
//! last good snapshot: delivery never stops for the control plane.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hookfleet_crds::contract::webhooks::{SNAPSHOT_KEY, Snapshot};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tracing::{error, info, warn};

use super::{Guards, Live, Loaded, idle_per_host, pools};
use crate::config::WebhooksMode;
use crate::metrics::Metrics;
use crate::target::{self, ClientPolicy};

/// What building a snapshot needs besides the snapshot, and the shared client of the last build.
pub struct Builder {
    allow_private_networks: bool,
    concurrency: usize,
    /// Each Webhook's circuit breaker and adaptive throttle settings.
    guards: Guards,
    /// (idle connections per host, the client): kept while the number of pools is unchanged, so that
    /// unchanged Webhooks keep their connections and token caches across snapshots.
    shared: Mutex<Option<(usize, reqwest::Client)>>,
    /// Consumers on the work queue as last read (0: not yet), for fleet-wide rate limits.
    consumers: AtomicU32,
}

impl Builder {
    pub fn new(allow_private_networks: bool, concurrency: usize, guards: Guards) -> Self {
        Self {
            allow_private_networks,
            concurrency,
            guards,
            shared: Mutex::new(None),
            consumers: AtomicU32::new(0),
        }
    }

    /// The consumers on the work queue now: snapshots built from here on share fleet-wide rate limits
    /// among them.
    pub fn set_consumers(&self, n: u32) {
        self.consumers.store(n, Ordering::Relaxed);
    }

    /// Decodes and builds the snapshot in `secret` (`Err`: why not, for the log and the metric),
    /// reusing what is unchanged since `previous`.
    pub fn load(&self, secret: &Secret, previous: Option<&Loaded>) -> Result<Loaded, String> {
        let revision = secret.metadata.resource_version.clone().unwrap_or_default();
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(SNAPSHOT_KEY))
            .ok_or_else(|| format!("no key {SNAPSHOT_KEY}"))?;
        let snapshot = Snapshot::decode(&bytes.0)?;
        Ok(self.build(&snapshot, &revision, previous))
    }

    pub fn build(&self, snapshot: &Snapshot, revision: &str, previous: Option<&Loaded>) -> Loaded {
        let policy = ClientPolicy {
            allow_private_networks: self.allow_private_networks,
            idle_per_host: idle_per_host(self.concurrency, pools(snapshot)),
            concurrency: self.concurrency,
        };
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let same = matches!(&*shared, Some((idle, _)) if *idle == policy.idle_per_host);
        if !same {
            // Requests bound themselves by their Webhook's timeout; this bounds any (the CRD's most).
            let client = target::client(&Default::default(), Duration::from_secs(300), policy)
                .expect("a client without TLS material builds");
            *shared = Some((policy.idle_per_host, client));
        }
        let (_, client) = shared.as_ref().expect("set above");
        let previous = if same { previous } else { None };
        Loaded::build(
            snapshot,
            revision,
            self.allow_private_networks,
            client,
            policy,
            Guards {
                consumers: self.consumers.load(Ordering::Relaxed),
                ..self.guards
            },
            previous,
        )
    }
}

/// Watches the snapshot Secret until the task is dropped, swapping each good snapshot into `live`.
pub async fn run(
    client: kube::Client,
    mode: WebhooksMode,
    builder: Arc<Builder>,
    live: Arc<Live>,
    metrics: Arc<Metrics>,
) {
    let api: Api<Secret> = Api::namespaced(client, &mode.namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", mode.secret));
    let mut events = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut seen_any = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Apply(secret) | Event::InitApply(secret)) => {
                seen_any = true;
                let started = std::time::Instant::now();
                let previous = live.current();
                match builder.load(&secret, previous.as_deref()) {
                    Ok(loaded) => {
                        let (count, built, reused, revision) = (
                            loaded.hooks.len(),
                            loaded.built(),
                            loaded.reused,
                            loaded.revision.clone(),
                        );
                        live.swap(loaded);
                        metrics.snapshot_load("ok");
                        metrics.webhooks_configured.set(count as i64);
                        metrics
                            .snapshot_loaded_at
                            .set(crate::message::now_ms() as f64 / 1000.0);
                        info!(webhooks = count, built, unchanged = reused, revision = %revision, took = ?started.elapsed(),
                              secret = %mode.secret, "webhooks snapshot loaded");
                    }
                    Err(e) => {
                        metrics.snapshot_load("invalid");
                        error!(secret = %mode.secret, error = %e, "webhooks snapshot not usable; keeping the last good one");
                    }
                }
            }
            Ok(Event::Delete(_)) => {
                metrics.snapshot_load("deleted");
                warn!(secret = %mode.secret, "webhooks snapshot Secret deleted; keeping the last good snapshot");
            }
            Ok(Event::Init) => {}
            Ok(Event::InitDone) => {
                if !seen_any && live.current().is_none() {
                    warn!(secret = %mode.secret, namespace = %mode.namespace,
                          "webhooks snapshot Secret not found; not consuming until it exists");
                }
            }
            Err(e) => {
                metrics.snapshot_load("api_error");
                warn!(error = %e, "watching the webhooks snapshot failed; keeping the last good snapshot, retrying");
            }
        }
    }
}
