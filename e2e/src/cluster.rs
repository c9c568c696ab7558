//! The local stack with a real node: control plane (etcd, kube-apiserver, controller-manager, scheduler; no
//! kwok) plus [`crate::node`], started and torn down together. Needs root.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use hookfleet_e2e::{Cluster, ClusterOptions, RabbitMq, sink::Sink};
//! let cluster = Cluster::start(ClusterOptions::default()).await?;   // containerd at nofile 1024:4096
//! let rmq = RabbitMq::start_on(Some(cluster.host_addr().into())).await?; // rmq.amqp_uri_for_pods()
//! let sink = Sink::start_on(cluster.host_addr().into(), true).await?;   // sink.url() reachable from pods
//! cluster.node().import_image(std::path::Path::new("worker.oci.tar"))?;
//! # Ok(()) }
//! ```
//!
//! Only one such cluster runs on a machine at a time (a lock file in the temp dir; a second one waits):
//! kube-proxy and the kubelet own iptables chains that are global to the host.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::Client;
use nix::fcntl::{Flock, FlockArg};

use crate::control_plane::{ControlPlane, Options};
use crate::node::{self, Node, NodeOptions, PodNetwork};

/// How to start a [`Cluster`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// containerd's `RLIMIT_NOFILE` (soft, hard), inherited by every container: (1024, 4096) by default,
    /// like the incident's server; (1024, 1024) for a node that cannot give a worker more.
    pub nofile: (u64, u64),
    /// How long to wait for another cluster on this machine to finish.
    pub lock_timeout: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nofile: (1024, 4096),
            lock_timeout: Duration::from_secs(20 * 60),
        }
    }
}

/// A control plane with one real node. Dropping it stops everything and removes what the node left on
/// the host (also after a panic; a run killed outright is cleaned up by the next one).
pub struct Cluster {
    // Dropped in this order: the node's processes, the control plane, then the host clean-up, then the lock.
    node: Node,
    control_plane: ControlPlane,
    network: PodNetwork,
    _cleanup: CleanupOnDrop,
    _lock: Flock<File>,
}

impl Cluster {
    /// Takes the machine's node lock, removes what an earlier killed run left, creates the pod network,
    /// starts the control plane advertised on the bridge's gateway, and the node; returns once the node is
    /// Ready and the `kubernetes` Service is programmed.
    pub async fn start(options: ClusterOptions) -> Result<Self> {
        require_root()?;
        let t0 = Instant::now();
        let lock = take_lock(options.lock_timeout).await?;
        node::clean_up().context("removing what an earlier node run left")?;
        let cleanup = CleanupOnDrop;
        let id = format!("{:08x}", rand::random::<u32>());
        let network = PodNetwork::create(&id)?;
        let control_plane = ControlPlane::start_with(Options {
            workloads: true,
            no_fake_node: true,
            advertise_address: Some(network.gateway()),
        })
        .await?;
        // Under the node prefix, so that the sweep removes it with the rest.
        let images = std::env::temp_dir().join(format!("{}{id}-images", node::PREFIX));
        std::fs::create_dir(&images).with_context(|| format!("creating {}", images.display()))?;
        let pause = crate::images::pause(&images)?;
        let node = Node::start(
            &control_plane,
            &network,
            &NodeOptions {
                nofile: options.nofile,
                sandbox_image: (pause.path, pause.name),
            },
        )
        .await?;
        tracing::info!(elapsed = ?t0.elapsed(), "cluster with a real node up");
        Ok(Self {
            node,
            control_plane,
            network,
            _cleanup: cleanup,
            _lock: lock,
        })
    }

    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// An admin client.
    pub fn client(&self) -> Client {
        self.control_plane.client()
    }

    /// The host's address on the pod network (the bridge's gateway): servers the harness runs for pods
    /// (RabbitMQ, sinks) listen here, and the API server does too.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.network.gateway()
    }

    /// The pod network, `10.213.X.0/24`.
    pub fn pod_cidr(&self) -> String {
        self.network.cidr()
    }

    /// The bridge's name (`hfn<id>`).
    pub fn bridge(&self) -> &str {
        self.network.bridge()
    }

    /// Fails (with a log tail) if a component of the control plane or node has exited.
    pub fn check_running(&self) -> Result<()> {
        self.control_plane.check_running()?;
        self.node.check_running()
    }
}

/// Runs [`node::clean_up`] when dropped: declared before anything is created on the host, so that a start
/// that fails half-way leaves nothing either.
struct CleanupOnDrop;

impl Drop for CleanupOnDrop {
    fn drop(&mut self) {
        if let Err(e) = node::clean_up() {
            eprintln!("hookfleet-e2e: {e:#}");
        }
    }
}

/// Whether this process may run a node (bridge, iptables, mounts, cgroups need root).
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn require_root() -> Result<()> {
    if !is_root() {
        bail!(
            "the real node needs root (it creates a bridge, iptables rules, mounts and cgroups); \
             without root use ControlPlane::start_with_workloads() (kwok, no containers)"
        );
    }
    Ok(())
}

fn lock_path() -> PathBuf {
    std::env::temp_dir().join("hookfleet-node.lock")
}

/// The machine-wide node lock (flock: released by the kernel when its holder dies). The holder's pid is
/// written into it for the waiting message.
async fn take_lock(timeout: Duration) -> Result<Flock<File>> {
    use std::io::Write;
    let path = lock_path();
    let deadline = Instant::now() + timeout;
    let mut said = false;
    loop {
        let file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                lock.set_len(0)?;
                write!(lock, "{}", std::process::id())?;
                return Ok(lock);
            }
            Err((_, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                if Instant::now() >= deadline {
                    bail!(
                        "another hookfleet node (pid {}) still holds {} after {timeout:?}",
                        holder.trim(),
                        path.display()
                    );
                }
                if !said {
                    eprintln!(
                        "hookfleet-e2e: waiting for another hookfleet node (pid {}) to finish (one per machine)",
                        holder.trim()
                    );
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err((_, errno)) => bail!("locking {}: {errno}", path.display()),
        }
    }
}
