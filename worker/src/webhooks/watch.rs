//! Keeps the snapshot live: watches the one Secret (by name, in the Integration's namespace: all the
//! worker's Role grants) and on every change decodes it, builds it ([`super::Loaded::build`]) and
//! swaps it in. Whatever goes wrong (the API server away, a Secret deleted or not decodable) keeps the
//! last good snapshot: delivery never stops for the control plane.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hookfleet_crds::contract::webhooks::{SNAPSHOT_KEY, Snapshot};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tracing::{error, info, warn};

use super::{Live, Loaded, idle_per_host, pools};
use crate::config::WebhooksMode;
use crate::metrics::Metrics;
use crate::target::{self, ClientPolicy};

/// What building a snapshot needs besides the snapshot.
pub struct Builder {
    pub allow_private_networks: bool,
    pub concurrency: usize,
}

impl Builder {
    /// Decodes and builds the snapshot in `secret` (`Err`: why not, for the log and the metric).
    pub fn load(&self, secret: &Secret) -> Result<Loaded, String> {
        let revision = secret.metadata.resource_version.clone().unwrap_or_default();
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(SNAPSHOT_KEY))
            .ok_or_else(|| format!("no key {SNAPSHOT_KEY}"))?;
        let snapshot = Snapshot::decode(&bytes.0)?;
        Ok(self.build(&snapshot, &revision))
    }

    pub fn build(&self, snapshot: &Snapshot, revision: &str) -> Loaded {
        let policy = ClientPolicy {
            allow_private_networks: self.allow_private_networks,
            idle_per_host: idle_per_host(self.concurrency, pools(snapshot)),
        };
        // Requests bound themselves by their Webhook's timeout; this one bounds any (the CRD's most).
        let shared = target::client(&Default::default(), Duration::from_secs(300), policy)
            .expect("a client without TLS material builds");
        Loaded::build(snapshot, revision, self.allow_private_networks, &shared, policy)
    }
}

/// Watches the snapshot Secret until the task is dropped, swapping each good snapshot into `live`.
pub async fn run(
    client: kube::Client,
    mode: WebhooksMode,
    builder: Builder,
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
                match builder.load(&secret) {
                    Ok(loaded) => {
                        let (count, built, revision) =
                            (loaded.hooks.len(), loaded.built(), loaded.revision.clone());
                        live.swap(loaded);
                        metrics.snapshot_load("ok");
                        metrics.webhooks_configured.set(count as i64);
                        metrics
                            .snapshot_loaded_at
                            .set(crate::message::now_ms() as f64 / 1000.0);
                        info!(webhooks = count, built, revision = %revision, took = ?started.elapsed(),
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
