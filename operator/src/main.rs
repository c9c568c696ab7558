//! `hookfleet-operator`: flags (each with an env equivalent) around [`hookfleet_operator::Operator`].

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use hookfleet_operator::{Config, LeaderElection, Operator};
use tracing_subscriber::EnvFilter;

/// A duration flag: a Go duration (`500ms`, `30s`, `5m`, `1m30s`; the project's one parser), or a
/// bare number of seconds.
fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => hookfleet_crds::duration::parse(s),
    }
}

fn parse_pod_template(s: &str) -> Result<hookfleet_crds::integration::WorkerPodTemplate, String> {
    serde_json::from_str(s)
        .map_err(|e| format!("not a worker pod template (spec.workers.podTemplate as JSON): {e}"))
}

/// Reconciles hookfleet Integrations into worker fleets.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Image of the hookfleet-worker container.
    #[arg(long, env = "HOOKFLEET_WORKER_IMAGE", default_value = concat!("ghcr.io/hookfleet/worker:", env!("CARGO_PKG_VERSION")))]
    worker_image: String,
    /// imagePullPolicy of the worker container (Always, IfNotPresent, Never); the cluster default when unset.
    #[arg(long, env = "HOOKFLEET_WORKER_IMAGE_PULL_POLICY")]
    worker_image_pull_policy: Option<String>,
    /// Defaults of every Integration's `spec.workers.podTemplate`, as JSON (`{"metadata": {"labels": ..},
    /// "spec": {"tolerations": [..], "nodeSelector": {..}, ..}}`; the chart's `worker.podTemplate`).
    #[arg(long, env = "HOOKFLEET_WORKER_POD_TEMPLATE", value_parser = parse_pod_template)]
    worker_pod_template: Option<hookfleet_crds::integration::WorkerPodTemplate>,
    /// Watch this namespace only (default: all namespaces).
    #[arg(long, env = "HOOKFLEET_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Integrations reconciled concurrently.
    #[arg(long, env = "HOOKFLEET_CONCURRENCY", default_value_t = 8)]
    concurrency: u16,
    /// Refresh interval of a healthy Integration's status (consumers, backlog).
    #[arg(long, env = "HOOKFLEET_RESYNC", default_value = "30s", value_parser = parse_secs)]
    resync: Duration,
    /// Requeue interval while an Integration has a problem (missing Secret, broker refusing login).
    #[arg(long, env = "HOOKFLEET_RETRY", default_value = "15s", value_parser = parse_secs)]
    retry: Duration,
    /// An autoscaled fleet grows at most ×2 per period.
    #[arg(long, env = "HOOKFLEET_SCALE_UP_PERIOD", default_value = "15s", value_parser = parse_secs)]
    scale_up_period: Duration,
    /// A node the workers were kept off (fd limit not met there) is tried again after this, unless its
    /// Ready condition changed or the Integration's hookfleet.io/retry-nodes annotation was changed first.
    #[arg(long, env = "HOOKFLEET_NODE_EXCLUSION_TTL", default_value = "1h", value_parser = parse_secs)]
    node_exclusion_ttl: Duration,
    /// How long after an Integration with deletionPolicy Delete is deleted the operator keeps trying to
    /// delete its queues (workers stopping, broker unreachable); then it removes the finalizer anyway, and a
    /// Warning Event names the queues left behind.
    #[arg(long, env = "HOOKFLEET_QUEUE_DELETION_TIMEOUT", default_value = "5m", value_parser = parse_secs)]
    queue_deletion_timeout: Duration,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "HOOKFLEET_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Run without leader election (a single instance, development only).
    #[arg(long, env = "HOOKFLEET_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "HOOKFLEET_LEASE_NAME", default_value = "hookfleet-operator")]
    lease_name: String,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "hookfleet-system")]
    lease_namespace: String,
    /// Seconds the lease stays valid without renewal (failover time after a crash).
    #[arg(long, env = "HOOKFLEET_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// This instance's identity (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format.
    #[arg(long, env = "HOOKFLEET_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // lapin logs every channel the broker closes at ERROR, including the 404 of a passive declare on a queue
    // the workers have not created yet; the operator reports broker answers in conditions, so mute them.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube=warn,lapin::channel=off"));
    if args.log_format == "json" {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let identity = args.identity.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "hookfleet-operator".into()),
            std::process::id()
        )
    });
    let mut config = Config::new(args.worker_image);
    config.worker.image_pull_policy = args.worker_image_pull_policy;
    config.worker.pod_template = args.worker_pod_template;
    config.namespace = args.namespace;
    config.concurrency = args.concurrency.max(1);
    config.resync = args.resync;
    config.retry = args.retry;
    config.scale_up_period = args.scale_up_period;
    config.node_exclusion_ttl = args.node_exclusion_ttl;
    config.queue_deletion_timeout = args.queue_deletion_timeout;
    config.http_addr = Some(args.http_addr);
    config.instance = identity.clone();
    if !args.no_leader_election {
        config.leader_election = Some(LeaderElection {
            lease_name: args.lease_name,
            lease_namespace: args.lease_namespace,
            identity,
            lease_duration_secs: args.lease_duration.max(2),
            renew_grace_secs: (args.lease_duration / 3).max(1),
        });
    }
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no Kubernetes client configuration (in-cluster or KUBECONFIG)");
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    match Operator::new(config).run(client, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "hookfleet-operator stopped");
            std::process::ExitCode::FAILURE
        }
    }
}
