//! The end-to-end stack for hookfleet, on [`hookfleet_testkit`] (control plane, RabbitMQ, sinks, processes;
//! re-exported here so that this crate's tests and binaries name one crate): as root, a real node
//! (containerd, kubelet, kube-proxy, a bridge pod network: [`Cluster`]); the Helm chart rendered and installed
//! with the pinned helm ([`chart`], [`install`]). Usable from `cargo test` (this crate's `tests/`) and from the
//! shell (`hookfleet-env up`, `hookfleet-env up --node`).
//! Container images without Docker: [`oci`] (the OCI archive writer) and [`images`] (the worker, operator,
//! pause and tools images; `hookfleet-images`). A pod's host processes: [`pods`].
//!
//! Every process runs on free loopback ports in a temporary directory and is stopped when its handle
//! is dropped, also when a test panics.

pub mod chaos;
pub mod chart;
pub mod cluster;
pub mod images;
pub mod install;
pub mod node;
pub mod oci;
pub mod pods;
pub mod release;

pub use cluster::{Cluster, ClusterOptions};
pub use hookfleet_testkit::{
    ControlPlane, RabbitCluster, RabbitMq, control_plane, init_tracing, merge_json, messages, pki, process,
    prometheus, rabbitmq, sink, stats, token, tools,
};
