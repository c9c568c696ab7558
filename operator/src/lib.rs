//! hookfleet-operator: reconciles `Integration`s (hookfleet.io/v1alpha1) into worker Deployments,
//! PodDisruptionBudgets and metrics Services, and reports on each whether its workers really consume.
//!
//! [`Operator::run`] is the whole operator (the binary is flags around it), so tests run it in-process.
//!
//! The modules in layers, each importing only from the layers below it (`hack/modcycles.py operator/src`
//! lists any import cycle):
//!
//! 1. [`names`], [`config`]: the names every module shares, and the operator's settings;
//! 2. [`core`]: pure decisions (desired objects, status and conditions, replicas, pacing);
//! 3. adapters: [`broker`] (the queue as RabbitMQ sees it), [`queues`] (deleting an Integration's queues on
//!    RabbitMQ), [`secrets`] (the referenced Secrets),
//!    [`memory`] (what this leader remembers per Integration), [`fleets`] (per Webhooks fleet: its last
//!    compile and its workers' reports, consumed from the broker), [`slim`] (what the watches keep and
//!    pass on), [`metrics`];
//! 4. [`context`]: what every reconcile shares;
//! 5. [`reconcile`]'s steps (dereference, webhooks, build, apply, status, malformed), each with its own
//!    error, and the Webhook status writer;
//! 6. [`error`]: the one error enum, wrapping the steps' errors; then [`pipeline`], the reconcile itself,
//!    which runs the steps;
//! 7. [`controller`]: the watches and the error policy;
//! 8. this file, [`http`] and the binary.

pub mod broker;
pub mod config;
pub mod context;
pub mod controller;
pub mod core;
pub mod error;
pub mod fleets;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod names;
pub mod nats;
pub mod pipeline;
pub mod queues;
pub mod reconcile;
pub mod secrets;
pub mod slim;

use std::sync::Arc;

use hookfleet_crds::Integration;
use kube::Client;
use kube::api::Api;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::task::JoinHandle;
use tracing::{info, warn};

// The pure builders and the status computation, also by the paths tests, benches and the e2e crate know
// them by.
pub use crate::core::{desired, status};

pub use config::{Config, LeaderElection};
pub use error::{Error, Result};
pub use metrics::Metrics;

/// Aborts a spawned task when dropped: when the operator's future is dropped (a crash, in tests an
/// aborted task), its lease renewals and HTTP server stop with it.
struct AbortOnDrop<T>(Option<JoinHandle<T>>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

pub struct Operator {
    config: Config,
    metrics: Arc<Metrics>,
}

impl Operator {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            metrics: Arc::new(Metrics::new()),
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Checks the CRD, serves HTTP, waits for the leader lease (when configured) and reconciles until
    /// `shutdown` resolves (Ok) or the lease is lost (Err: exit and let the Deployment restart us, so two
    /// instances never write at once).
    pub async fn run(
        self,
        client: Client,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let Operator { config, metrics } = self;
        check_crd(&client, config.namespace.as_deref()).await?;
        let _http = match config.http_addr {
            Some(addr) => {
                let server = http::serve(addr, metrics.clone()).await?;
                info!(%addr, "serving /healthz /readyz /metrics");
                AbortOnDrop(Some(tokio::spawn(server)))
            }
            None => AbortOnDrop(None),
        };
        let mut shutdown = Box::pin(shutdown);

        let Some(le) = config.leader_election.clone() else {
            metrics.leader.set(1);
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let ctl = controller::run(client, config, metrics, async move {
                let _ = stop_rx.await;
            });
            tokio::pin!(ctl);
            tokio::select! {
                () = &mut ctl => {}
                () = &mut shutdown => {
                    let _ = stop_tx.send(());
                    ctl.await;
                }
            }
            return Ok(());
        };

        let manager = LeaseManagerBuilder::new(client.clone(), &le.lease_name)
            .with_namespace(&le.lease_namespace)
            .with_identity(&le.identity)
            .with_duration(le.lease_duration_secs)
            .with_grace(le.renew_grace_secs)
            .build()
            .await
            .map_err(|e| Error::LeaderElection(e.to_string()))?;
        let (mut leader, task) = manager.watch().await;
        let mut lease_task = AbortOnDrop(Some(task));
        // A standby is ready: it serves, and takes over when the lease frees.
        metrics.ready.set(1);
        info!(identity = %le.identity, lease = %le.lease_name, "waiting for the leader lease");
        loop {
            if *leader.borrow_and_update() {
                break;
            }
            tokio::select! {
                changed = leader.changed() => {
                    if changed.is_err() {
                        return Err(Error::LeaderElection("the lease manager stopped".into()));
                    }
                }
                () = &mut shutdown => {
                    release(leader, &mut lease_task).await;
                    return Ok(());
                }
            }
        }
        info!(identity = %le.identity, "acquired the leader lease");
        metrics.leader.set(1);
        metrics.ready.set(0);

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            let _ = stop_rx.await;
        };
        let mut ctl = Box::pin(controller::run(client, config, metrics.clone(), stop));
        let mut stop_tx = Some(stop_tx);
        let result = loop {
            tokio::select! {
                () = &mut ctl => break Ok(()),
                () = &mut shutdown, if stop_tx.is_some() => {
                    if let Some(tx) = stop_tx.take() {
                        let _ = tx.send(());
                    }
                }
                changed = leader.changed() => {
                    if changed.is_err() || !*leader.borrow_and_update() {
                        warn!("lost the leader lease");
                        break Err(Error::LostLeadership);
                    }
                }
            }
        };
        metrics.leader.set(0);
        drop(ctl);
        release(leader, &mut lease_task).await;
        result
    }
}

/// Fails with a message that says how to install the CRD when it is missing.
///
/// With `namespace` set (namespaced mode) the list is in that namespace: the operator's Role grants no
/// cluster-wide list there.
async fn check_crd(client: &Client, namespace: Option<&str>) -> Result<()> {
    // Metadata only: a malformed Integration must not make the operator refuse to start.
    let api: Api<Integration> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match api
        .list_metadata(&kube::api::ListParams::default().limit(1))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(Error::CrdNotInstalled),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Closing the channel makes the lease manager release the lease, so a standby takes over at once.
async fn release(
    leader: tokio::sync::watch::Receiver<bool>,
    task: &mut AbortOnDrop<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
) {
    drop(leader);
    if let Some(h) = task.0.take() {
        match tokio::time::timeout(std::time::Duration::from_secs(5), h).await {
            Ok(Ok(Ok(_))) => info!("released the leader lease"),
            Ok(Ok(Err(e))) => warn!(error = %e, "releasing the leader lease"),
            Ok(Err(e)) => warn!(error = %e, "lease task"),
            Err(_) => warn!("releasing the leader lease timed out"),
        }
    }
}
