//! Operator settings (the binary fills them from flags and env; tests build them directly).

use std::net::SocketAddr;
use std::time::Duration;

/// Operator-wide settings that shape the worker pods.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerSettings {
    /// Container image of `hookfleet-worker`.
    pub image: String,
    /// `imagePullPolicy`, when set.
    pub image_pull_policy: Option<String>,
    /// Operator-wide defaults of `spec.workers.podTemplate` (labels, scheduling, pull Secrets).
    pub pod_template: Option<hookfleet_crds::integration::WorkerPodTemplate>,
}

/// Leader election on a `coordination.k8s.io/v1` Lease.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    pub lease_name: String,
    pub lease_namespace: String,
    /// Unique per instance (the pod name in a cluster).
    pub identity: String,
    /// Seconds a lease stays valid after its last renewal.
    pub lease_duration_secs: u64,
    /// Seconds before expiry at which the holder renews.
    pub renew_grace_secs: u64,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub worker: WorkerSettings,
    /// Field manager of every apply, children and status alike.
    pub field_manager: String,
    /// Watch Integrations in this namespace only; all namespaces when None.
    pub namespace: Option<String>,
    /// Integrations reconciled at the same time.
    pub concurrency: u16,
    /// How often a healthy Integration's status (consumers, backlog) is refreshed.
    pub resync: Duration,
    /// Requeue after a problem an application team must fix (missing Secret, broker refusing login).
    pub retry: Duration,
    /// Upper bound of the error backoff.
    pub max_backoff: Duration,
    /// An autoscaled fleet grows at most ×2 per period; also its re-evaluation interval.
    pub scale_up_period: Duration,
    /// `/healthz`, `/readyz`, `/metrics`; not served when None.
    pub http_addr: Option<SocketAddr>,
    /// None: run as the only instance (development).
    pub leader_election: Option<LeaderElection>,
    /// Reporting instance of Events (the pod name).
    pub instance: String,
    /// A Webhook's status is written at most this often when its state (a condition, the generation,
    /// the host) changed.
    pub webhook_status_every: Duration,
    /// ... and at most this often when only its counts and timestamps changed.
    pub webhook_counts_every: Duration,
    /// A node the workers are kept off (fd limit not met) is tried again after this, unless cleared
    /// sooner (its `Ready` condition changed, or the `hookfleet.io/retry-nodes` annotation).
    pub node_exclusion_ttl: Duration,
    /// How long after its deletion the operator keeps trying to delete the queues of an Integration with
    /// `deletionPolicy: Delete` (workers still stopping, broker unreachable, a queue in use); then it removes
    /// its finalizer anyway, with a Warning Event naming the queues left behind.
    pub queue_deletion_timeout: Duration,
}

impl Config {
    pub fn new(worker_image: impl Into<String>) -> Self {
        Self {
            worker: WorkerSettings {
                image: worker_image.into(),
                image_pull_policy: None,
                pod_template: None,
            },
            field_manager: "hookfleet-operator".into(),
            namespace: None,
            concurrency: 8,
            resync: Duration::from_secs(30),
            retry: Duration::from_secs(15),
            max_backoff: Duration::from_secs(300),
            scale_up_period: Duration::from_secs(15),
            http_addr: None,
            leader_election: None,
            instance: "hookfleet-operator".into(),
            webhook_status_every: Duration::from_secs(10),
            webhook_counts_every: Duration::from_secs(60),
            node_exclusion_ttl: Duration::from_secs(3600),
            queue_deletion_timeout: Duration::from_secs(300),
        }
    }
}
