//! The test kit of hookfleet: what the worker's and the operator's tests and the benches run against, on
//! real parts. A throwaway RabbitMQ node or cluster ([`rabbitmq`]) and NATS server or JetStream cluster ([`nats`]); a local Kubernetes control plane built
//! from the Go module proxy ([`control_plane`]: etcd and kube-apiserver, and on request
//! kube-controller-manager, kube-scheduler and kwok with a fake node; the binaries from [`tools`]); HTTP and
//! HTTPS webhook receivers ([`sink`]) and an OAuth2 token endpoint ([`token`]) with a test CA ([`pki`]);
//! publishing and accounting for every message id ([`messages`]); a throwaway Prometheus evaluating alert
//! rules ([`prometheus`]); and the child processes under all of them ([`process`]).
//!
//! The real node, the container images and the chart install are not here: they live in `hookfleet-e2e`,
//! which builds on this crate, so a unit or integration test of the worker or the operator never compiles
//! them (and no crate depends back on `hookfleet-e2e`).
//!
//! Every process runs on free loopback ports in a temporary directory and is stopped when its handle
//! is dropped, also when a test panics.

pub mod control_plane;
pub mod messages;
pub mod nats;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod rabbitmq;
pub mod sink;
pub mod stats;
pub mod token;
pub mod tools;

pub use control_plane::ControlPlane;
pub use nats::NatsServer;
pub use rabbitmq::{RabbitCluster, RabbitMq};

/// Logs from the harness to the test's output, once per process (`RUST_LOG` filters; default `info`, without kube's
/// per-request errors while the API server is still starting).
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,kube_client::client::builder=off")),
        )
        .with_test_writer()
        .try_init();
}

/// Deep-merges JSON `b` into `a`: objects key by key, anything else replaced (a test's overrides of a
/// manifest or spec).
pub fn merge_json(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge_json(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}
