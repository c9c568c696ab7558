//! The local test stack for hookfleet, on real parts: a Kubernetes control plane built from the Go module
//! proxy (etcd, kube-apiserver, and on request kube-controller-manager, kube-scheduler and kwok) and a
//! throwaway RabbitMQ node; as root, also a real node (containerd, kubelet, kube-proxy, a bridge pod network:
//! [`Cluster`]); the Helm chart rendered and installed with the pinned helm ([`chart`], [`install`]), and a
//! throwaway Prometheus evaluating the chart's alert rules ([`prometheus`]). Usable from `cargo test` (this
//! crate's `tests/`) and from the shell (`hookfleet-env up`, `hookfleet-env up --node`).
//! Container images without Docker: [`oci`] (the OCI archive writer) and [`images`] (the worker, operator,
//! pause and tools images; `hookfleet-images`).
//!
//! Every process runs on free loopback ports in a temporary directory and is stopped when its handle
//! is dropped, also when a test panics.

pub mod chart;
pub mod cluster;
pub mod control_plane;

pub mod images;
pub mod install;
pub mod messages;
pub mod node;
pub mod oci;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod rabbitmq;
pub mod sink;
pub mod token;
pub mod tools;

pub use cluster::{Cluster, ClusterOptions};
pub use control_plane::ControlPlane;
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
