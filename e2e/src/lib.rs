//! The local test stack for hookfleet, on real parts: a Kubernetes control plane built from the Go module
//! proxy (etcd, kube-apiserver, and on request kube-controller-manager, kube-scheduler and kwok) and a
//! throwaway RabbitMQ node. Usable from `cargo test` (this crate's `tests/`) and from the shell
//! (`hookfleet-env up`). Container images without Docker: [`oci`] (the OCI archive writer) and [`images`]
//! (the worker, operator, pause and tools images; `hookfleet-images`).
//!
//! Every process runs on free loopback ports in a temporary directory and is stopped when its handle
//! is dropped, also when a test panics.

pub mod control_plane;
pub mod images;
pub mod oci;
pub mod pki;
pub mod process;
pub mod rabbitmq;
pub mod sink;
pub mod tools;

pub use control_plane::ControlPlane;
pub use rabbitmq::RabbitMq;

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
