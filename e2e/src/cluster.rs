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
//!
//! # Several nodes
//!
//! [`ClusterOptions::nodes`] lists the nodes (one by default, exactly the single-node layout). With several,
//! e.g. [`ClusterOptions::with_nodes`]`(3)`, every node is a containerd and a kubelet of its own (own
//! directory, root, state, socket, cgroup root, `RLIMIT_NOFILE`, serving certificate, ports) and they share:
//!
//! - the host's network namespace and the one bridge. Node n (1-based) has its own address on the bridge,
//!   `10.213.X.n` (node 1 keeps the gateway `.1`, the others get a /32 alias), which is its kubelet's
//!   `--address` and `--node-ip`; its pods get addresses from its own slice of the /24 (host-local
//!   `rangeStart`/`rangeEnd`: node n has `.(16+28(n-1))` to `.(43+28(n-1))`, at most [`MAX_NODES`]
//!   nodes), so pods of all nodes are on one L2 segment, reach each other directly, and reach the host's
//!   servers at the gateway as with one node.
//! - ONE kube-proxy, started with node 1 (and named after it). kube-proxy programs the iptables of its
//!   network namespace for every Service and every endpoint whatever node it is on, and several kube-proxies
//!   in one namespace would rewrite each other's `KUBE-*` chains. So Services work from every node's pods,
//!   but anything node-local in kube-proxy (`internalTrafficPolicy`/`externalTrafficPolicy: Local`) is
//!   node 1's view; and a lost node ([`crate::node::Node::kill_hard`]), even node 1, leaves kube-proxy
//!   running, it being the machine's, not that node's.
//!
//! Why not a network namespace per node with veths: the nodes would be closer to real machines (a
//! kube-proxy each, a node's loss taking its kube-proxy), but the kubelet, containerd and CNI would all have
//! to run inside those namespaces (with the mount namespace and fixed paths such as `/var/run/netns` still
//! shared), and routes between per-node bridges be added and swept; the shared namespace reuses the single
//! node's tested plumbing and clean-up unchanged: everything still carries the same prefixes and the sweep
//! removes it.
//!
//! The kubelets do share one fixed path they cannot be told otherwise: `/var/lib/kubelet/device-plugins/`
//! (the device manager's socket and checkpoint). The last kubelet started owns the socket; no device plugins
//! run here, so nothing uses it.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::Client;
use nix::fcntl::{Flock, FlockArg};

use crate::control_plane::{ControlPlane, Options};
use crate::node::{self, Node, NodeOptions, PodNetwork};

/// At most this many nodes in a [`Cluster`] (the pod /24 is sliced among them).
pub const MAX_NODES: usize = 8;

/// How to start a [`Cluster`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// containerd's `RLIMIT_NOFILE` (soft, hard), inherited by every container: (1024, 4096) by default,
    /// like the incident's server; (1024, 1024) for a node that cannot give a worker more. Every node's,
    /// unless its [`NodeSpec::nofile`] says otherwise.
    pub nofile: (u64, u64),
    /// The nodes, 1 to [`MAX_NODES`]: one by default.
    pub nodes: Vec<NodeSpec>,
    /// How long to wait for another cluster on this machine to finish.
    pub lock_timeout: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nofile: (1024, 4096),
            nodes: vec![NodeSpec::default()],
            lock_timeout: Duration::from_secs(20 * 60),
        }
    }
}

impl ClusterOptions {
    /// `n` nodes, each at [`ClusterOptions::nofile`].
    pub fn with_nodes(n: usize) -> Self {
        Self {
            nodes: vec![NodeSpec::default(); n],
            ..Self::default()
        }
    }
}

/// One node of a [`Cluster`].
#[derive(Clone, Debug, Default)]
pub struct NodeSpec {
    /// This node's containerd (and containers') `RLIMIT_NOFILE`; `None`: [`ClusterOptions::nofile`].
    pub nofile: Option<(u64, u64)>,
}

/// A control plane with real nodes (one by default). Dropping it stops everything and removes what the
/// nodes left on the host (also after a panic; a run killed outright is cleaned up by the next one).
pub struct Cluster {
    // Dropped in this order: the nodes' processes (first to last), the control plane, then the host clean-up,
    // then the lock.
    nodes: Vec<Node>,
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
        let count = options.nodes.len();
        if !(1..=MAX_NODES).contains(&count) {
            bail!("a cluster has 1 to {MAX_NODES} nodes, not {count}");
        }
        let t0 = Instant::now();
        let lock = take_lock(options.lock_timeout).await?;
        node::clean_up().context("removing what an earlier node run left")?;
        let cleanup = CleanupOnDrop;
        let id = format!("{:08x}", rand::random::<u32>());
        let network = PodNetwork::create(&id)?;
        if count > 1 && !bridge_calls_iptables() {
            tracing::warn!(
                "net.bridge.bridge-nf-call-iptables is not 1 (modprobe br_netfilter; sysctl -w \
                 net.bridge.bridge-nf-call-iptables=1): a pod reaching a Service whose endpoint is a pod on \
                 the same bridge (any other node's) gets its reply from the pod's address and drops it"
            );
        }
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
        let mut nodes = Vec::with_capacity(count);
        for (index, spec) in options.nodes.iter().enumerate() {
            // One node: the gateway and the whole subnet, as always. Several: see the module doc.
            let (address, pod_range) = if count == 1 {
                (network.gateway(), None)
            } else {
                let address = network.host(index as u8 + 1);
                if index > 0 {
                    network.add_address(address)?;
                }
                let first = 16 + 28 * index as u8;
                (address, Some((network.host(first), network.host(first + 27))))
            };
            nodes.push(
                Node::start(
                    &control_plane,
                    &network,
                    &NodeOptions {
                        nofile: spec.nofile.unwrap_or(options.nofile),
                        sandbox_image: (pause.path.clone(), pause.name.clone()),
                        index,
                        address,
                        pod_range,
                        kube_proxy: index == 0,
                    },
                )
                .await?,
            );
        }
        tracing::info!(elapsed = ?t0.elapsed(), nodes = count, "cluster with real nodes up");
        Ok(Self {
            nodes,
            control_plane,
            network,
            _cleanup: cleanup,
            _lock: lock,
        })
    }

    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// The first node (the only one by default).
    pub fn node(&self) -> &Node {
        &self.nodes[0]
    }

    /// Every node, in [`ClusterOptions::nodes`]' order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `index` (0-based), to kill and restart it ([`Node::kill_hard`], [`Node::restart`]).
    pub fn node_mut(&mut self, index: usize) -> &mut Node {
        &mut self.nodes[index]
    }

    /// Imports an OCI image archive into every node's containerd (see [`Node::import_image`]).
    pub fn import_image(&self, oci_archive: &std::path::Path) -> Result<()> {
        for node in &self.nodes {
            node.import_image(oci_archive)
                .with_context(|| format!("importing into node {}", node.name()))?;
        }
        Ok(())
    }

    /// Imports archives written by [`crate::images`] into every node's containerd.
    pub fn import(&self, archives: &[crate::oci::ImageArchive]) -> Result<()> {
        for node in &self.nodes {
            node.import(archives)
                .with_context(|| format!("importing into node {}", node.name()))?;
        }
        Ok(())
    }

    /// An admin client.
    /// Lets every node pull from the plain-HTTP registry at `host` (`address:port`): [`Node::trust_registry`].
    pub fn trust_registry(&self, host: &str) -> Result<()> {
        self.nodes.iter().try_for_each(|n| n.trust_registry(host))
    }

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

    /// Fails (with a log tail) if a component of the control plane or of a node has exited (a node killed
    /// with [`Node::kill_hard`] and not restarted does not count).
    pub fn check_running(&self) -> Result<()> {
        self.control_plane.check_running()?;
        for node in self.nodes.iter().filter(|n| n.is_up()) {
            node.check_running()?;
        }
        Ok(())
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

/// Whether bridged traffic passes iptables (`br_netfilter`): the reply of a Service endpoint on the bridge
/// must go back through the host's conntrack to be un-DNATed, as the nodes' pods share one L2 segment.
fn bridge_calls_iptables() -> bool {
    std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables").is_ok_and(|v| v.trim() == "1")
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
