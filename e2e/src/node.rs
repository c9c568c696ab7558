//! A real Kubernetes node next to the local control plane: Debian's containerd (CRI) and runc, kubelet and
//! kube-proxy built like the control plane, and a bridge pod network the harness owns. Pods run real
//! containers, reach the API server through the `kubernetes` Service, and reach servers the harness runs on
//! the host at the bridge's gateway address ([`crate::Cluster::host_addr`]).
//!
//! Needs root (bridge, iptables, mounts, cgroups). Start it through [`crate::Cluster`], which also takes a
//! machine-wide lock: two clusters on one machine would fight over kube-proxy's and kubelet's iptables
//! chains. A cluster may have several nodes on the one bridge, each its own containerd and kubelet, with one
//! kube-proxy for all (the layout and why: the module doc of `e2e/src/cluster.rs`); [`Node::kill_hard`] and
//! [`Node::restart`] are a node's loss and return.
//!
//! Everything a node creates carries the prefix [`PREFIX`] (`hookfleet-node-<id>`, `hookfleet-node-<id>-n<n>`
//! for the n-th node of several: its directory, its cgroup root, its CNI network; `hfn<id>`: the bridge;
//! `HOOKFLEET-<id>`: its iptables chain), so that [`clean_up`] removes what a killed run left behind, at the
//! start of the next run and at the end of this one (while the lock is held, whatever carries the prefix
//! belongs to no live run).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node as NodeObject;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::api::Api;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::control_plane::{ControlPlane, SERVICE_IP};
use crate::process::{Process, free_port, wait_for};
use crate::tools::{self, Tool};

/// The prefix of every name a node gives to what it creates on the host.
pub const PREFIX: &str = "hookfleet-node-";
/// Bridges are named `hfn<id>` (interface names are at most 15 bytes).
const BRIDGE_PREFIX: &str = "hfn";
/// The iptables chain that keeps pod traffic on this machine is `HOOKFLEET-<id>`.
const CHAIN_PREFIX: &str = "HOOKFLEET-";
/// Pod subnets are /24s of this /16 (a range no Debian or cloud default uses), so that network namespaces a
/// killed run left can be recognised by their address.
const POD_POOL: (u8, u8) = (10, 213);
/// Where CNI (libcni, as containerd runs it) caches results, keyed by network name.
const CNI_CACHE: &str = "/var/lib/cni/results";
/// Where the kubelet links container logs, whatever its configuration says.
const CONTAINER_LOG_LINKS: &str = "/var/log/containers";
/// The kubelet's device manager socket directory (not under its root dir).
const DEVICE_PLUGINS: &str = "/var/lib/kubelet/device-plugins";
/// The node's name in the API.
pub const NODE_NAME: &str = "hookfleet-node";
/// containerd's registry host configuration, under the node's directory.
const REGISTRY_HOSTS: &str = "containerd/certs.d";

/// What the node runs with.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// `RLIMIT_NOFILE` (soft, hard) of containerd and of every container (through its base runtime spec,
    /// see `base_runtime_spec` below): what a worker starts with. 1024:4096 like the incident's server by
    /// default.
    pub nofile: (u64, u64),
    /// The sandbox ("pause") image: an OCI archive and the name it is imported under, which containerd is
    /// told to use as `sandbox_image` (nothing can be pulled here).
    pub sandbox_image: (PathBuf, String),
    /// The node's place in the cluster, 0 for the first: names its directory, cgroup root and API name
    /// ([`node_name`]).
    pub index: usize,
    /// The node's address (kubelet `--address` and `--node-ip`): the bridge's gateway for a single node,
    /// an address of its own on the bridge ([`PodNetwork::add_address`]) for each node of several.
    pub address: Ipv4Addr,
    /// The node's slice of the pod subnet (host-local `rangeStart`, `rangeEnd`); `None`: the whole subnet
    /// (one node).
    pub pod_range: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Whether this node runs kube-proxy (exactly one node does: see the module doc).
    pub kube_proxy: bool,
}

/// The bridge pod network: created before the API server, which listens on its gateway address.
#[derive(Clone, Debug)]
pub struct PodNetwork {
    id: String,
    bridge: String,
    subnet: Ipv4Addr,
    gateway: Ipv4Addr,
}

impl PodNetwork {
    /// Creates the bridge `hfn<id>` with the gateway address on a /24 of [`POD_POOL`] that no route or
    /// address of the host overlaps, turns on IPv4 forwarding (the CNI bridge plugin would anyway), and
    /// installs `HOOKFLEET-<id>` in FORWARD: pod traffic to or from any other interface is dropped, so pods
    /// reach the host and each other and nothing else. No masquerading is set up (nothing needs it: the
    /// host's services listen on the gateway address).
    pub fn create(id: &str) -> Result<Self> {
        let subnet = pick_subnet()?;
        let o = subnet.octets();
        let gateway = Ipv4Addr::new(o[0], o[1], o[2], 1);
        let bridge = format!("{BRIDGE_PREFIX}{id}");
        let net = Self {
            id: id.to_owned(),
            bridge: bridge.clone(),
            subnet,
            gateway,
        };
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        run("ip", &["addr", "add", &format!("{gateway}/24"), "dev", &bridge])?;
        run("ip", &["link", "set", &bridge, "up"])?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling net.ipv4.ip_forward")?;
        let chain = format!("{CHAIN_PREFIX}{id}");
        run("iptables", &["-w", "-N", &chain])?;
        run(
            "iptables",
            &[
                "-w", "-A", &chain, "-i", &bridge, "!", "-o", &bridge, "-j", "DROP",
            ],
        )?;
        run(
            "iptables",
            &[
                "-w", "-A", &chain, "!", "-i", &bridge, "-o", &bridge, "-j", "DROP",
            ],
        )?;
        run("iptables", &["-w", "-I", "FORWARD", "1", "-j", &chain])?;
        tracing::debug!(bridge, %subnet, "pod network created");
        Ok(net)
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The host's address on the bridge: pods reach host services here.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// `10.213.X.0/24`.
    pub fn cidr(&self) -> String {
        format!("{}/24", self.subnet)
    }

    /// `10.213.X.<last>`.
    pub fn host(&self, last: u8) -> Ipv4Addr {
        let o = self.subnet.octets();
        Ipv4Addr::new(o[0], o[1], o[2], last)
    }

    /// Adds `addr` (a /32) to the bridge: a node's own address. Goes with the bridge.
    pub fn add_address(&self, addr: Ipv4Addr) -> Result<()> {
        run("ip", &["addr", "add", &format!("{addr}/32"), "dev", &self.bridge])
    }
}

/// A running node: containerd, kubelet and (on the first node only, see the module doc) kube-proxy. Dropping
/// it stops them; [`crate::Cluster`] then runs [`clean_up`].
pub struct Node {
    // Dropped in this order: kube-proxy and kubelet before the runtime under them. `None` while the node is
    // down ([`Node::kill_hard`]).
    kube_proxy: Option<Process>,
    kubelet: Option<Process>,
    containerd: Option<Process>,
    /// What [`Node::restart`] starts again.
    launch: Launch,
    client: Client,
    index: usize,
    name: String,
    address: Ipv4Addr,
    dir: PathBuf,
    socket: PathBuf,
    nofile: (u64, u64),
    restarts: u32,
}

/// The command lines of a node's containerd and kubelet, kept for [`Node::restart`].
struct Launch {
    kubelet_bin: PathBuf,
    containerd_args: Vec<String>,
    kubelet_args: Vec<String>,
}

impl Node {
    /// Starts containerd, the kubelet and (when `options.kube_proxy`) kube-proxy for `cp` on `net`, and
    /// waits until the node is Ready and kube-proxy has programmed the `kubernetes` Service.
    pub async fn start(cp: &ControlPlane, net: &PodNetwork, options: &NodeOptions) -> Result<Self> {
        let kubelet_bin = tools::path(Tool::Kubelet)?;
        let dir = std::env::temp_dir().join(node_dir_name(&net.id, options.index));
        std::fs::create_dir(&dir)
            .with_context(|| format!("creating the node directory {}", dir.display()))?;
        let (soft, hard) = options.nofile;
        if soft > hard {
            bail!("node nofile limit: soft {soft} is above hard {hard}");
        }
        let name = node_name(options.index);
        let address = options.address;

        // containerd, its CRI plugin pointed at our CNI config, sandbox image and directories.
        let socket = dir.join("containerd.sock");
        let cni_conf = dir.join("cni/net.d");
        std::fs::create_dir_all(&cni_conf)?;
        std::fs::write(
            cni_conf.join("10-hookfleet.conflist"),
            cni_conflist(net, &dir, options.pod_range),
        )?;
        let base_spec = dir.join("base-spec.json");
        std::fs::write(&base_spec, base_runtime_spec(options.nofile)?)?;
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            containerd_config(&dir, &socket, &cni_conf, &base_spec, &options.sandbox_image.1),
        )?;
        let containerd_args = vec![
            format!("--nofile={soft}:{hard}"),
            "/usr/bin/containerd".into(),
            format!("--config={}", config.display()),
        ];
        let t0 = Instant::now();
        let containerd = start_containerd(&dir, &socket, &containerd_args, "containerd.log").await?;
        crate::images::import_archive(&socket, &options.sandbox_image.0)?;
        tracing::debug!(node = name, elapsed = ?t0.elapsed(), "containerd up");

        // The kubelet: its own root dir, pod logs and cgroup root; serving on the node's address with a
        // certificate of the harness CA, so that `kubectl logs` works.
        let cgroup_root = format!("/{}", node_dir_name(&net.id, options.index));
        create_cgroup_root(&cgroup_root)?;
        let (tls_cert, tls_key) = cp.pki().issue(
            &dir.join("pki"),
            "kubelet",
            &name,
            &[address.to_string(), name.clone()],
        )?;
        let kubelet_port = free_port()?;
        let kubelet_config = dir.join("kubelet.yaml");
        std::fs::write(
            &kubelet_config,
            kubelet_config_yaml(&KubeletConfig {
                dir: &dir,
                socket: &socket,
                address,
                port: kubelet_port,
                healthz_port: free_port()?,
                cgroup_root: &cgroup_root,
                tls_cert: &tls_cert,
                tls_key: &tls_key,
                client_ca: &cp.pki().ca_cert,
            }),
        )?;
        let kubelet_args = vec![
            format!("--config={}", kubelet_config.display()),
            format!("--kubeconfig={}", cp.kubeconfig().display()),
            format!("--hostname-override={name}"),
            format!("--node-ip={address}"),
            format!("--root-dir={}", dir.join("kubelet").display()),
            format!("--cert-dir={}", dir.join("kubelet-pki").display()),
            format!("--pod-infra-container-image={}", options.sandbox_image.1),
            "--v=1".into(),
        ];
        let kubelet = Process::spawn(
            "kubelet",
            &kubelet_bin,
            &kubelet_args,
            &[],
            &dir.join("kubelet.log"),
        )?;
        let mut node = Self {
            kube_proxy: None,
            kubelet: Some(kubelet),
            containerd: Some(containerd),
            launch: Launch {
                kubelet_bin,
                containerd_args,
                kubelet_args,
            },
            client: cp.client(),
            index: options.index,
            name,
            address,
            dir,
            socket,
            nofile: options.nofile,
            restarts: 0,
        };
        node.wait_ready(None).await?;
        tracing::debug!(node = node.name, elapsed = ?t0.elapsed(), "kubelet registered a Ready node");

        if options.kube_proxy {
            node.kube_proxy = Some(start_kube_proxy(cp, net, &node.dir, &node.name).await?);
        }
        tracing::info!(
            elapsed = ?t0.elapsed(),
            bridge = net.bridge,
            address = %node.address,
            "node {} Ready",
            node.name
        );
        Ok(node)
    }

    /// Waits until the node is Ready in the API; with `after` (the Ready condition's heartbeat when the
    /// kubelet was started again), only once a newer heartbeat came in.
    async fn wait_ready(&self, after: Option<Option<Time>>) -> Result<()> {
        let nodes: Api<NodeObject> = Api::all(self.client.clone());
        let name = self.name.clone();
        wait_for(
            &format!("node {name} Ready"),
            Duration::from_secs(120),
            Duration::from_millis(250),
            || {
                let nodes = nodes.clone();
                let name = name.clone();
                let running = self.check_running();
                let after = after.clone();
                async move {
                    running?;
                    let Some(n) = nodes.get_opt(&name).await? else {
                        return Ok(None);
                    };
                    let fresh = after.is_none_or(|old| ready_heartbeat(&n) != old);
                    Ok((fresh && crate::control_plane::node_ready(&n)).then_some(()))
                }
            },
        )
        .await
        .with_context(|| format!("kubelet log tail:\n{}", tail(&self.kubelet_log())))
    }

    fn kubelet_log(&self) -> PathBuf {
        self.kubelet
            .as_ref()
            .map(|p| p.log_path().to_owned())
            .unwrap_or_else(|| self.dir.join("kubelet.log"))
    }

    /// Imports an OCI image archive (an `oci-layout` tar whose index names the image) into the node's
    /// containerd, where pods find it by that name (use `imagePullPolicy: Never` or `IfNotPresent`:
    /// nothing can be pulled). [`crate::Cluster::import_image`] imports into every node.
    pub fn import_image(&self, oci_archive: &Path) -> Result<()> {
        crate::images::import_archive(&self.socket, oci_archive)
    }

    /// Imports archives written by [`crate::images`] (e.g. `images::build`'s worker and operator images).
    pub fn import(&self, archives: &[crate::oci::ImageArchive]) -> Result<()> {
        crate::images::import(&self.socket, archives)
    }

    /// Lets this node's containerd pull from the plain-HTTP registry at `host` (`address:port`), as an image
    /// reference names it: a `hosts.toml` for that host, which containerd reads at every pull.
    pub fn trust_registry(&self, host: &str) -> Result<()> {
        let dir = self.dir.join(REGISTRY_HOSTS).join(host);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "# Written by hookfleet-e2e: a local registry over plain HTTP.\nserver = \"http://{host}\"\n\n\
                 [host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .with_context(|| format!("writing {}/hosts.toml", dir.display()))
    }

    /// A `ctr` command bound to the node's containerd, in the CRI's namespace (`k8s.io`).
    pub fn ctr(&self) -> Command {
        let mut cmd = ctr(&self.socket);
        cmd.args(["-n", "k8s.io"]);
        cmd
    }

    /// The node's directory: logs (`containerd.log`, `kubelet.log`, `kube-proxy.log` on the first node,
    /// `pods/`), configs, containerd's and the kubelet's state.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The node's name in the API: `hookfleet-node` for the first, `hookfleet-node-<n>` for the n-th.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// 0 for the first node.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The node's address (its InternalIP, where its kubelet serves): the bridge's gateway for the first
    /// node, an address of its own on the bridge for the others.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// containerd's (and so the containers') `RLIMIT_NOFILE`, (soft, hard).
    pub fn nofile(&self) -> (u64, u64) {
        self.nofile
    }

    /// Whether the node's containerd and kubelet run (false between [`Node::kill_hard`] and
    /// [`Node::restart`]).
    pub fn is_up(&self) -> bool {
        self.kubelet.is_some()
    }

    /// Fails (with the log tail) if containerd, the kubelet or kube-proxy has exited, or the node was
    /// killed.
    pub fn check_running(&self) -> Result<()> {
        match (&self.containerd, &self.kubelet) {
            (Some(c), Some(k)) => {
                c.check_running()?;
                k.check_running()?;
            }
            _ => bail!("node {} is down (killed)", self.name),
        }
        match &self.kube_proxy {
            Some(p) => p.check_running(),
            None => Ok(()),
        }
    }

    /// Stops kube-proxy, the kubelet and containerd (dropping does the same).
    pub fn stop(&mut self) {
        for p in [&mut self.kube_proxy, &mut self.kubelet, &mut self.containerd]
            .into_iter()
            .flatten()
        {
            p.stop(Duration::from_secs(5));
        }
    }

    /// Node loss: SIGKILL to the kubelet, containerd, and every process of the node's pods and shims (its
    /// cgroup root and whatever runs from its directory), nothing graceful. The node's state on disk
    /// (images, pod sandboxes, mounts, network namespaces) stays, as after a power cut; the API goes on
    /// showing the node until the node lifecycle controller marks it NotReady (about 40 s). kube-proxy,
    /// which serves the whole machine (see the module doc), keeps running.
    pub fn kill_hard(&mut self) -> Result<()> {
        // SIGKILL first (`Process::kill` would send SIGTERM just before), then reap.
        for p in [&mut self.kubelet, &mut self.containerd].into_iter().flatten() {
            let _ = p.signal(Signal::SIGKILL);
            p.kill();
        }
        self.kubelet = None;
        self.containerd = None;
        let keep: BTreeSet<u32> = self.kube_proxy.iter().filter_map(Process::pid).collect();
        let cgroup = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        kill_processes(|name| name == cgroup, &format!("{}/", self.dir.display()), &keep)
            .with_context(|| format!("killing node {}", self.name))?;
        tracing::info!(node = self.name, "node killed (kill -9)");
        Ok(())
    }

    /// Starts containerd and the kubelet again after [`Node::kill_hard`] with the same configuration and
    /// state, and waits until the restarted kubelet reports the node Ready (the pods it had are then
    /// restarted by the kubelet). Earlier logs are kept as `containerd.<n>.log`, `kubelet.<n>.log`.
    pub async fn restart(&mut self) -> Result<()> {
        if self.is_up() {
            bail!("node {} is running; kill it first", self.name);
        }
        self.restarts += 1;
        let n = self.restarts;
        for log in ["containerd", "kubelet"] {
            let from = self.dir.join(format!("{log}.log"));
            let to = self.dir.join(format!("{log}.{n}.log"));
            std::fs::rename(&from, &to).with_context(|| format!("keeping {}", from.display()))?;
        }
        let nodes: Api<NodeObject> = Api::all(self.client.clone());
        let before = nodes.get_opt(&self.name).await?.map(|n| ready_heartbeat(&n));
        let containerd = start_containerd(
            &self.dir,
            &self.socket,
            &self.launch.containerd_args,
            "containerd.log",
        )
        .await?;
        self.containerd = Some(containerd);
        self.kubelet = Some(Process::spawn(
            "kubelet",
            &self.launch.kubelet_bin,
            &self.launch.kubelet_args,
            &[],
            &self.dir.join("kubelet.log"),
        )?);
        self.wait_ready(before).await?;
        tracing::info!(node = self.name, "node restarted and Ready");
        Ok(())
    }
}

/// The Ready condition's last heartbeat.
fn ready_heartbeat(node: &NodeObject) -> Option<Time> {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_heartbeat_time.clone())
}

fn tail(log: &Path) -> String {
    crate::process::tail(log, 30)
}

/// `prlimit … containerd …` (`args`), logging to `log` in `dir`; returns once its socket answers.
async fn start_containerd(dir: &Path, socket: &Path, args: &[String], log: &str) -> Result<Process> {
    let containerd = Process::spawn(
        "containerd",
        Path::new("/usr/bin/prlimit"),
        args,
        &[],
        &dir.join(log),
    )?;
    wait_for(
        "containerd's socket",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let running = containerd.check_running();
            let ready = socket.exists()
                && ctr(socket)
                    .args(["version"])
                    .output()
                    .is_ok_and(|o| o.status.success());
            async move {
                running?;
                Ok(ready.then_some(()))
            }
        },
    )
    .await?;
    Ok(containerd)
}

/// kube-proxy for the whole machine (one per network namespace: see the module doc), named after `node`;
/// returns once the `kubernetes` Service's DNAT is in place.
async fn start_kube_proxy(cp: &ControlPlane, net: &PodNetwork, dir: &Path, node: &str) -> Result<Process> {
    let proxy_bin = tools::path(Tool::KubeProxy)?;
    let proxy_config = dir.join("kube-proxy.yaml");
    std::fs::write(
        &proxy_config,
        kube_proxy_config_yaml(cp.kubeconfig(), net, node, free_port()?, free_port()?),
    )?;
    let kube_proxy = Process::spawn(
        "kube-proxy",
        &proxy_bin,
        &[format!("--config={}", proxy_config.display()), "--v=1".into()],
        &[],
        &dir.join("kube-proxy.log"),
    )?;
    let service = format!("{SERVICE_IP}/32");
    wait_for(
        "kube-proxy to program the kubernetes Service",
        Duration::from_secs(60),
        Duration::from_millis(250),
        || {
            let running = kube_proxy.check_running();
            let programmed = output("iptables-save", &["-t", "nat"]).is_ok_and(|rules| {
                rules
                    .lines()
                    .any(|l| l.contains(&service) && l.contains("KUBE-SVC-"))
            });
            async move {
                running?;
                Ok(programmed.then_some(()))
            }
        },
    )
    .await
    .with_context(|| format!("kube-proxy log tail:\n{}", kube_proxy.log_tail(30)))?;
    Ok(kube_proxy)
}

/// The name of node `index` (0-based) in the API: [`NODE_NAME`] for the first, `hookfleet-node-<n>` (1-based
/// n) for the others.
pub fn node_name(index: usize) -> String {
    if index == 0 {
        NODE_NAME.to_owned()
    } else {
        format!("{NODE_NAME}-{}", index + 1)
    }
}

/// The directory (under the temp dir) and cgroup root of node `index` of run `id`: `hookfleet-node-<id>` for
/// the first (as with one node), `hookfleet-node-<id>-n<n>` for the others.
fn node_dir_name(id: &str, index: usize) -> String {
    if index == 0 {
        format!("{PREFIX}{id}")
    } else {
        format!("{PREFIX}{id}-n{}", index + 1)
    }
}

fn ctr(socket: &Path) -> Command {
    let mut cmd = Command::new("/usr/bin/ctr");
    cmd.arg("--address").arg(socket);
    cmd
}

// ---- configuration files -------------------------------------------------------------------------------

/// The pod network: bridge + host-local IPAM + portmap. Each pod's `lo` is brought up by containerd's CRI
/// itself with the `loopback` plugin from the same bin dir, so it is not listed here.
fn cni_conflist(net: &PodNetwork, dir: &Path, range: Option<(Ipv4Addr, Ipv4Addr)>) -> String {
    let mut ipam_range = serde_json::json!({"subnet": net.cidr(), "gateway": net.gateway.to_string()});
    if let Some((start, end)) = range {
        ipam_range["rangeStart"] = start.to_string().into();
        ipam_range["rangeEnd"] = end.to_string().into();
    }
    // The node directory's name: `hookfleet-node-<id>[-n<n>]`, so that the CNI cache sweep finds it.
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    serde_json::to_string_pretty(&serde_json::json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": net.bridge,
                "isGateway": true,
                // Nothing leaves the machine (see PodNetwork::create), so nothing is masqueraded.
                "ipMasq": false,
                // A pod reaching a Service whose endpoint is itself.
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[ipam_range]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": dir.join("cni/ipam").display().to_string()
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    }))
    .expect("a JSON value serialises")
}

/// containerd's default OCI spec (`ctr oci spec`) with `RLIMIT_NOFILE` at (soft, hard): the CRI's base for
/// every container. Starting containerd with those limits is not enough: containerd, its shim and runc are
/// Go programs, and Go raises its own soft limit to the hard one at start, so a container that inherited
/// them would start at hard:hard (seen: 4096:4096 under `prlimit --nofile=1024:4096`).
fn base_runtime_spec((soft, hard): (u64, u64)) -> Result<String> {
    let spec = output("/usr/bin/ctr", &["oci", "spec"])?;
    let mut spec: serde_json::Value = serde_json::from_str(&spec).context("parsing `ctr oci spec`")?;
    let process = spec
        .get_mut("process")
        .and_then(|p| p.as_object_mut())
        .context("`ctr oci spec` has no process object")?;
    process.insert(
        "rlimits".into(),
        serde_json::json!([{"type": "RLIMIT_NOFILE", "soft": soft, "hard": hard}]),
    );
    Ok(serde_json::to_string_pretty(&spec)?)
}

fn containerd_config(
    dir: &Path,
    socket: &Path,
    cni_conf: &Path,
    base_spec: &Path,
    sandbox_image: &str,
) -> String {
    let d = |sub: &str| dir.join(sub).display().to_string();
    format!(
        r#"# Written by hookfleet-e2e (e2e/src/node.rs): a containerd 1.6 confined to this directory.
version = 2
root = "{root}"
state = "{state}"
# Snapshotters that cannot work here; skipping them keeps the log readable.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  level = "warn"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  # Built locally and imported; nothing can be pulled here.
  sandbox_image = "{sandbox_image}"
  # Without CAP_SYS_RESOURCE runc cannot lower a sandbox's oom_score_adj to -998 and fails with "can't get
  # final child's PID from pipe: EOF"; this keeps it at or above containerd's own.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      # The containers' nofile limits (see base_runtime_spec in e2e/src/node.rs).
      base_runtime_spec = "{base_spec}"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
  # One directory per registry host (`<host:port>/hosts.toml`), read at each pull: see Node::trust_registry.
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{registry_hosts}"
"#,
        root = d("containerd/root"),
        state = d("containerd/state"),
        opt = d("containerd/opt"),
        runc = d("runc"),
        registry_hosts = d(REGISTRY_HOSTS),
        socket = socket.display(),
        cni_conf = cni_conf.display(),
        base_spec = base_spec.display(),
    )
}

struct KubeletConfig<'a> {
    dir: &'a Path,
    socket: &'a Path,
    address: Ipv4Addr,
    port: u16,
    healthz_port: u16,
    cgroup_root: &'a str,
    tls_cert: &'a Path,
    tls_key: &'a Path,
    client_ca: &'a Path,
}

fn kubelet_config_yaml(c: &KubeletConfig<'_>) -> String {
    format!(
        r#"# Written by hookfleet-e2e (e2e/src/node.rs).
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine: cgroup v1 without systemd as init, swap allowed, no node-allocatable enforcement.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
# The node's pods live under their own cgroup root, so that teardown finds (and kills) exactly them.
cgroupRoot: {cgroup_root}
containerRuntimeEndpoint: unix://{socket}
enforceNodeAllocatable: []
# A shared test machine's disk and memory are not this node's to police.
evictionHard: {{}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
podLogsDir: {logs}
address: {address}
port: {port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {healthz_port}
tlsCertFile: {tls_cert}
tlsPrivateKeyFile: {tls_key}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {client_ca}}}
authorization:
  mode: Webhook
rotateCertificates: false
serverTLSBootstrap: false
registerNode: true
# No cluster DNS here: pods that need names get them from the host's resolv.conf.
clusterDNS: []
resolvConf: /etc/resolv.conf
nodeStatusUpdateFrequency: 5s
"#,
        cgroup_root = c.cgroup_root,
        socket = c.socket.display(),
        logs = c.dir.join("pods").display(),
        address = c.address,
        port = c.port,
        healthz_port = c.healthz_port,
        tls_cert = c.tls_cert.display(),
        tls_key = c.tls_key.display(),
        client_ca = c.client_ca.display(),
    )
}

fn kube_proxy_config_yaml(
    kubeconfig: &Path,
    net: &PodNetwork,
    node: &str,
    healthz_port: u16,
    metrics_port: u16,
) -> String {
    format!(
        r#"# Written by hookfleet-e2e (e2e/src/node.rs).
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {node}
bindAddress: {gateway}
clusterCIDR: {cidr}
healthzBindAddress: 127.0.0.1:{healthz_port}
metricsBindAddress: 127.0.0.1:{metrics_port}
# NodePorts only on the bridge, never on the host's other interfaces.
nodePortAddresses: ["{gateway}/32"]
# Leave the host's conntrack sysctls as they are (0 = do not touch).
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  masqueradeAll: false
  minSyncPeriod: 0s
"#,
        kubeconfig = kubeconfig.display(),
        gateway = net.gateway,
        cidr = net.cidr(),
    )
}

// ---- host plumbing ----------------------------------------------------------------------------------------

/// A /24 of [`POD_POOL`] that no address or route of the host overlaps.
fn pick_subnet() -> Result<Ipv4Addr> {
    use rand::Rng;
    let routes =
        output("ip", &["-4", "-o", "route", "show", "table", "all"])? + &output("ip", &["-4", "-o", "addr"])?;
    let mut used = BTreeSet::new();
    for word in routes.split_whitespace() {
        let (addr, prefix) = word.split_once('/').unwrap_or((word, "32"));
        let (Ok(addr), Ok(prefix)) = (addr.parse::<Ipv4Addr>(), prefix.parse::<u32>()) else {
            continue;
        };
        used.insert((u32::from(addr), prefix.min(32)));
    }
    let overlaps = |net: u32| {
        used.iter().any(|&(addr, prefix)| {
            // Two prefixes overlap when they agree on the shorter one's bits.
            let p = prefix.min(24);
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            addr & mask == net & mask && prefix != 0
        })
    };
    let mut rng = rand::rng();
    for _ in 0..200 {
        let third: u8 = rng.random();
        let net = Ipv4Addr::new(POD_POOL.0, POD_POOL.1, third, 0);
        if !overlaps(u32::from(net)) {
            return Ok(net);
        }
    }
    bail!(
        "no free /24 in {}.{}.0.0/16 for the pod network",
        POD_POOL.0,
        POD_POOL.1
    )
}

/// Every mounted cgroup hierarchy: the v1 controllers, named ones, and the v2 `unified` one of a hybrid
/// setup (where runc creates the containers' cgroups too).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists())
                .collect()
        })
        .unwrap_or_default()
}

/// The kubelet requires its cgroup root to exist in every hierarchy. A new cpuset cgroup starts with no
/// CPUs or memory nodes (tasks could not join it), so it gets its parent's.
fn create_cgroup_root(name: &str) -> Result<()> {
    // The v1 hierarchies: the kubelet uses cgroupfs on v1 here (runc adds the unified ones it needs).
    for h in cgroup_hierarchies()
        .into_iter()
        .filter(|h| !h.ends_with("unified"))
    {
        let dir = h.join(name.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        if h.ends_with("cpuset") {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let v = std::fs::read_to_string(h.join(f))?;
                std::fs::write(dir.join(f), v.trim())
                    .with_context(|| format!("writing {}", dir.join(f).display()))?;
            }
        }
    }
    Ok(())
}

/// Removes everything a node leaves on the host: its processes (containers, shims, and anything else
/// running from its directory), network namespaces with an address in the pod pool, mounts under its
/// directory, iptables chains (`KUBE-*` of the kubelet and kube-proxy, `CNI-*` of the portmap plugin,
/// `HOOKFLEET-*`), bridges, cgroups, CNI caches, container log links and directories. Idempotent; every
/// step goes on after a failure, and the failures are returned together.
///
/// Call it only with the node lock held ([`crate::Cluster`] does, at start and on drop): it removes *every*
/// node's leftovers. It also removes all `KUBE-*` and `CNI-*` chains, so never run the node mode on a
/// machine that is itself a Kubernetes node or runs CNI containers of its own.
pub fn clean_up() -> Result<()> {
    let mut errors: Vec<String> = Vec::new();
    let mut step = |what: &str, r: Result<()>| {
        if let Err(e) = r {
            errors.push(format!("{what}: {e:#}"));
        }
    };
    let tmp = std::env::temp_dir();
    let dir_prefix = tmp.join(PREFIX).display().to_string();

    step(
        "killing the node's processes",
        kill_processes(|name| name.starts_with(PREFIX), &dir_prefix, &BTreeSet::new()),
    );
    step("deleting network namespaces", delete_netns());
    step("unmounting", unmount_under(&dir_prefix));
    for bin in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle"] {
            step(&format!("{bin} -t {table}"), drop_chains(bin, table));
        }
    }
    step("deleting bridges", delete_bridges());
    step("removing cgroups", remove_cgroups());
    step(
        "removing CNI caches",
        remove_matching(Path::new(CNI_CACHE), |name, _| name.starts_with(PREFIX)),
    );
    step(
        "removing container log links",
        remove_matching(Path::new(CONTAINER_LOG_LINKS), |_, path| {
            std::fs::read_link(path).is_ok_and(|t| t.display().to_string().starts_with(&dir_prefix))
        }),
    );
    step("removing node directories", remove_node_dirs(&tmp, &dir_prefix));
    step("removing the kubelet's fixed paths", remove_fixed_paths());
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("cleaning up the node left:\n{}", errors.join("\n"))
    }
}

/// PIDs in the cgroup roots (top-level cgroups in every hierarchy) whose name `cgroup` accepts, then
/// processes whose command line contains `cmdline_part` (a node directory: containerd's shims daemonise and
/// so escape `PR_SET_PDEATHSIG`), except `keep`, with SIGKILL, until none is left.
fn kill_processes(cgroup: impl Fn(&str) -> bool, cmdline_part: &str, keep: &BTreeSet<u32>) -> Result<()> {
    let me = std::process::id();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut pids = BTreeSet::new();
        for h in cgroup_hierarchies() {
            for root in node_cgroups(&h) {
                if root.file_name().is_some_and(|n| cgroup(&n.to_string_lossy())) {
                    collect_cgroup_pids(&root, &mut pids);
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if let Ok(cmdline) = std::fs::read(e.path().join("cmdline"))
                    && String::from_utf8_lossy(&cmdline).contains(cmdline_part)
                {
                    pids.insert(pid);
                }
            }
        }
        pids.remove(&me);
        pids.retain(|p| !keep.contains(p));
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("processes still alive after SIGKILL: {pids:?}");
        }
        for &pid in &pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn node_cgroups(hierarchy: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(hierarchy)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX) && e.path().is_dir())
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn collect_cgroup_pids(dir: &Path, pids: &mut BTreeSet<u32>) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_cgroup_pids(&e.path(), pids);
            }
        }
    }
}

/// Network namespaces (containerd names them `cni-<uuid>`) holding an address of the pod pool: deleting
/// one also deletes its end of the veth pair.
fn delete_netns() -> Result<()> {
    let list = output("ip", &["netns", "list"]).unwrap_or_default();
    let pool = format!("inet {}.{}.", POD_POOL.0, POD_POOL.1);
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let addrs = output("ip", &["-n", name, "-4", "-o", "addr"]).unwrap_or_default();
        if addrs.contains(&pool) {
            run("ip", &["netns", "delete", name])?;
        }
    }
    Ok(())
}

/// Unmounts (lazily, deepest first) every mount point under a node directory.
fn unmount_under(dir_prefix: &str) -> Result<()> {
    let mut failed = Vec::new();
    for _ in 0..3 {
        let points = mounts_under(dir_prefix);
        if points.is_empty() {
            return Ok(());
        }
        failed.clear();
        for p in points.iter().rev() {
            if let Err(e) = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH) {
                failed.push(format!("{p}: {e}"));
            }
        }
    }
    if mounts_under(dir_prefix).is_empty() {
        Ok(())
    } else {
        bail!("still mounted: {}", failed.join(", "))
    }
}

/// Mount points under `prefix`, in mount order (from `/proc/self/mountinfo`, octal escapes decoded).
fn mounts_under(prefix: &str) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount)
        .filter(|p| p.starts_with(prefix))
        .collect()
}

fn unescape_mount(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let digit = |k: usize| u32::from(b[i + k] - b'0');
            out.push((digit(1) * 64 + digit(2) * 8 + digit(3)) as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether an iptables chain is one a node creates.
fn node_chain(name: &str) -> bool {
    name.starts_with("KUBE-") || name.starts_with("CNI-") || name.starts_with(CHAIN_PREFIX)
}

/// Rewrites `table` without the node's chains and without the rules that jump to them, in one
/// `iptables-restore` (atomic, and no ordering between chains that reference each other).
fn drop_chains(bin: &str, table: &str) -> Result<()> {
    let Ok(saved) = output(&format!("{bin}-save"), &["-t", table]) else {
        return Ok(()); // no such table (e.g. IPv6 off): nothing of ours in it either
    };
    let (kept, dropped) = filter_rules(&saved);
    if dropped == 0 {
        return Ok(());
    }
    run_with_input(&format!("{bin}-restore"), &["-w"], &kept)
        .with_context(|| format!("restoring {table} without {dropped} node chain lines"))
}

/// The `iptables-save` text without node chains, their rules, and rules jumping to them; and how many
/// lines went.
fn filter_rules(saved: &str) -> (String, usize) {
    let mut kept = String::with_capacity(saved.len());
    let mut dropped = 0;
    for line in saved.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let ours = match words.first() {
            Some(w) if w.starts_with(':') => node_chain(&w[1..]),
            Some(&"-A") => {
                words.get(1).is_some_and(|c| node_chain(c))
                    || words
                        .windows(2)
                        .any(|w| (w[0] == "-j" || w[0] == "-g") && node_chain(w[1]))
            }
            _ => false,
        };
        if ours {
            dropped += 1;
        } else {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    (kept, dropped)
}

fn delete_bridges() -> Result<()> {
    let links = output("ip", &["-o", "link", "show", "type", "bridge"])?;
    for line in links.lines() {
        // "7: hfn1a2b3c4d: <BROADCAST,...> ..."
        let Some(name) = line.split(':').nth(1).map(str::trim) else {
            continue;
        };
        if name.starts_with(BRIDGE_PREFIX) {
            run("ip", &["link", "delete", name])?;
        }
    }
    Ok(())
}

fn remove_cgroups() -> Result<()> {
    fn rmdir_tree(dir: &Path) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)?.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path())?;
            }
        }
        // A cgroup directory goes with its control files, but only once it has no children.
        std::fs::remove_dir(dir)
    }
    let mut failed = Vec::new();
    for h in cgroup_hierarchies() {
        for root in node_cgroups(&h) {
            if let Err(e) = rmdir_tree(&root) {
                failed.push(format!("{}: {e}", root.display()));
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("{}", failed.join(", "))
    }
}

fn remove_matching(dir: &Path, matches: impl Fn(&str, &Path) -> bool) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if matches(&name, &e.path()) {
            std::fs::remove_file(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// What the kubelet and libcni create at fixed paths whatever their configuration says: the kubelet's
/// device-plugin socket, and the directories of that, of container log links and of CNI's cache, when empty
/// (a directory with anything else in it is not ours to remove).
fn remove_fixed_paths() -> Result<()> {
    let sock = Path::new(DEVICE_PLUGINS).join("kubelet.sock");
    if sock.exists() {
        std::fs::remove_file(&sock).with_context(|| format!("removing {}", sock.display()))?;
    }
    for dir in [
        DEVICE_PLUGINS,
        "/var/lib/kubelet",
        CONTAINER_LOG_LINKS,
        CNI_CACHE,
        "/var/lib/cni",
    ] {
        // Fails when not empty or absent: both mean there is nothing of ours to remove.
        let _ = std::fs::remove_dir(dir);
    }
    Ok(())
}

/// Node directories, once nothing is mounted under them (removing files through a mount that is still
/// there could reach outside the directory).
fn remove_node_dirs(tmp: &Path, dir_prefix: &str) -> Result<()> {
    let mounted = mounts_under(dir_prefix);
    if !mounted.is_empty() {
        bail!("not removing node directories, still mounted: {mounted:?}");
    }
    let Ok(rd) = std::fs::read_dir(tmp) else {
        return Ok(());
    };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(PREFIX) && e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// What is left on the host of any node, one line per kind (empty when clean): for tests and diagnostics.
pub fn leftovers() -> Vec<String> {
    let mut left = Vec::new();
    let tmp = std::env::temp_dir();
    let dir_prefix = tmp.join(PREFIX).display().to_string();
    let bridges = output("ip", &["-o", "link", "show", "type", "bridge"]).unwrap_or_default();
    let bridges: Vec<&str> = bridges
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(str::trim))
        .filter(|n| n.starts_with(BRIDGE_PREFIX))
        .collect();
    if !bridges.is_empty() {
        left.push(format!("bridges: {bridges:?}"));
    }
    let pool = format!("inet {}.{}.", POD_POOL.0, POD_POOL.1);
    let netns: Vec<String> = output("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|n| {
            output("ip", &["-n", n, "-4", "-o", "addr"])
                .unwrap_or_default()
                .contains(&pool)
        })
        .collect();
    if !netns.is_empty() {
        left.push(format!("network namespaces: {netns:?}"));
    }
    for bin in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle"] {
            let saved = output(&format!("{bin}-save"), &["-t", table]).unwrap_or_default();
            let (_, n) = filter_rules(&saved);
            if n > 0 {
                left.push(format!(
                    "{bin} -t {table}: {n} lines of KUBE-/CNI-/{CHAIN_PREFIX} chains"
                ));
            }
        }
    }
    let mounts = mounts_under(&dir_prefix);
    if !mounts.is_empty() {
        left.push(format!("mounts: {mounts:?}"));
    }
    let me = std::process::id();
    let procs: Vec<u32> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
                    let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                    (pid != me && String::from_utf8_lossy(&cmd).contains(&dir_prefix)).then_some(pid)
                })
                .collect()
        })
        .unwrap_or_default();
    if !procs.is_empty() {
        left.push(format!("processes: {procs:?}"));
    }
    let cgroups: Vec<PathBuf> = cgroup_hierarchies()
        .iter()
        .flat_map(|h| node_cgroups(h))
        .collect();
    if !cgroups.is_empty() {
        left.push(format!("cgroups: {cgroups:?}"));
    }
    let dirs: Vec<PathBuf> = std::fs::read_dir(&tmp)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    if !dirs.is_empty() {
        left.push(format!("directories: {dirs:?}"));
    }
    left
}

/// Runs a command, failing with its stderr.
fn run(program: &str, args: &[&str]) -> Result<()> {
    output(program, args).map(|_| ())
}

/// Runs a command and returns its stdout, failing with its stderr.
fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_with_input(program: &str, args: &[&str], input: &str) -> Result<()> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_rules_drops_node_chains_and_jumps_to_them_only() {
        let saved = "\
# Generated by iptables-save
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:KUBE-FORWARD - [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
:HOOKFLEET-1a2b3c4d - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -j HOOKFLEET-1a2b3c4d
-A FORWARD -j DOCKER-USER
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A HOOKFLEET-1a2b3c4d -i hfn1a2b3c4d ! -o hfn1a2b3c4d -j DROP
-A INPUT -p tcp --dport 22 -j ACCEPT
COMMIT
";
        let (kept, dropped) = filter_rules(saved);
        assert_eq!(dropped, 7, "{kept}");
        assert_eq!(
            kept,
            "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n\
             :DOCKER-USER - [0:0]\n-A FORWARD -j DOCKER-USER\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"
        );
    }

    #[test]
    fn mount_points_with_spaces_are_unescaped() {
        assert_eq!(unescape_mount("/tmp/a\\040b/c"), "/tmp/a b/c");
        assert_eq!(unescape_mount("/plain"), "/plain");
        assert_eq!(unescape_mount("/end\\04"), "/end\\04");
    }
}
