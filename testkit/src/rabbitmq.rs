//! A throwaway RabbitMQ node (Debian's `rabbitmq-server`) on free loopback ports in a temporary
//! directory, with its own epmd, stopped on drop. [`RabbitMq::start_on`] also listens on a node's bridge
//! gateway so that workers in pods reach it ([`RabbitMq::amqp_uri_for_pods`]).
//!
//! The node can be stopped and started again on the same ports and data directory ([`RabbitMq::restart`],
//! [`RabbitMq::stop_node`], [`RabbitMq::start_node`]) to test reconnects; durable queues and persistent
//! messages survive that, as they would in production.
//!
//! [`RabbitCluster`] is several such nodes joined into one cluster, for tests of node loss.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lapin::{Connection, ConnectionProperties};

use crate::process::{Process, free_port, wait_for};

/// The server script run directly: `/usr/sbin/rabbitmq-server` switches to the `rabbitmq` user with
/// `su`, which cannot write a root-owned temporary directory.
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
/// The Erlang cookie every node of one harness shares (and `rabbitmqctl` presents).
const COOKIE: &str = "HOOKFLEETTESTCOOKIE";

/// One node: its directory, environment and (while it runs) its Erlang VM.
struct Node {
    process: Option<Process>,
    env: Vec<(String, String)>,
    nodename: String,
    port: u16,
    dir: PathBuf,
}

impl Node {
    /// Writes the node's configuration under `dir`; the node registers with the epmd on `epmd_port` and
    /// reads its cookie from `home`.
    fn prepare(dir: &Path, home: &Path, epmd_port: u16, pod_addr: Option<IpAddr>) -> Result<Self> {
        let port = free_port()?;
        let dist_port = free_port()?;
        let nodename = format!("hookfleet-{port}@localhost");
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let mut conf = format!("listeners.tcp.1 = 127.0.0.1:{port}\n");
        match pod_addr {
            Some(addr) => conf.push_str(&format!(
                "listeners.tcp.2 = {addr}:{port}\nloopback_users = none\n"
            )),
            None => conf.push_str("loopback_users.guest = true\n"),
        }
        conf.push_str("log.console = true\nlog.console.level = warning\nlog.file = false\n");
        std::fs::write(dir.join("rabbitmq.conf"), conf)?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        // At-least-once dead-lettering (quorum queues) re-sends a message its target refused (say a
        // full work queue) only after this timeout, 3 minutes by default; 5 s keeps tests short.
        std::fs::write(
            dir.join("advanced.config"),
            "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 5000}]}].\n",
        )?;
        let p = |sub: &str| dir.join(sub).display().to_string();
        let mut env: Vec<(String, String)> = [
            ("RABBITMQ_NODENAME", nodename.clone()),
            ("RABBITMQ_DIST_PORT", dist_port.to_string()),
            ("ERL_EPMD_PORT", epmd_port.to_string()),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_MNESIA_BASE", p("mnesia")),
            ("RABBITMQ_LOG_BASE", p("log")),
            ("RABBITMQ_FEATURE_FLAGS_FILE", p("mnesia/feature_flags")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", p("enabled_plugins")),
            // A `.conf` named without its suffix.
            ("RABBITMQ_CONFIG_FILE", p("rabbitmq")),
            ("RABBITMQ_ADVANCED_CONFIG_FILE", p("advanced.config")),
            ("RABBITMQ_PID_FILE", p("rabbitmq.pid")),
            ("RABBITMQ_CONF_ENV_FILE", p("rabbitmq-env.conf")),
            ("HOME", home.display().to_string()),
            // A node that fails to boot writes a crash dump; keep it with the node's logs, not in the cwd.
            ("ERL_CRASH_DUMP", p("log/erl_crash.dump")),
            // The script then `exec`s the VM instead of running it as a background child: the VM is the
            // process the harness started, so its parent-death signal (SIGKILL, see `process`) and a kill
            // of its process group reach the VM itself. As a child of the script it outlived a harness
            // killed with SIGKILL.
            ("RUNNING_UNDER_SYSTEMD", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if pod_addr.is_none() {
            // These two override the config file's listeners with a single one.
            env.push(("RABBITMQ_NODE_IP_ADDRESS".into(), "127.0.0.1".into()));
            env.push(("RABBITMQ_NODE_PORT".into(), port.to_string()));
        }
        Ok(Self {
            process: None,
            env,
            nodename,
            port,
            dir: dir.to_owned(),
        })
    }

    fn amqp_uri(&self) -> String {
        self.amqp_uri_on(None)
    }

    /// The URI at `host` (loopback when `None`).
    fn amqp_uri_on(&self, host: Option<IpAddr>) -> String {
        let host = host.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        format!("amqp://guest:guest@{host}:{}/%2f", self.port)
    }

    /// Starts the VM (if stopped) and waits until it accepts AMQP connections.
    async fn start(&mut self) -> Result<()> {
        if self.process.is_some() {
            return Ok(());
        }
        let log = self.dir.join(format!("node-{}.log", std::process::id()));
        let node = Process::spawn("rabbitmq-server", Path::new(SERVER), &[], &self.env, &log)?;
        let uri = self.amqp_uri();
        let port = self.port;
        let started = wait_for(
            "RabbitMQ to accept AMQP connections",
            Duration::from_secs(90),
            Duration::from_millis(250),
            || {
                let running = node.check_running();
                let uri = uri.clone();
                async move {
                    running?;
                    if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                        return Ok(None);
                    }
                    let conn = Connection::connect(&uri, ConnectionProperties::default()).await?;
                    let _ = conn.close(200, "ready check".into()).await;
                    Ok(Some(()))
                }
            },
        )
        .await;
        if let Err(e) = started {
            bail!("{e:#}\nlast lines of {}:\n{}", log.display(), node.log_tail(40));
        }
        self.process = Some(node);
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut node) = self.process.take() {
            let _ = self.ctl(&["stop"]);
            node.stop(Duration::from_secs(20));
        }
    }

    /// SIGKILL to the VM's process group; fails if anything of the VM is still alive a few seconds later.
    fn kill(&mut self) -> Result<()> {
        if let Some(mut node) = self.process.take() {
            node.kill();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = vm_pids(&self.nodename);
            if left.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("the VM of {} survived SIGKILL: pids {left:?}", self.nodename);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(CTL)
            .arg("-n")
            .arg(&self.nodename)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .context("running rabbitmqctl")?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Processes of the Erlang VM of node `nodename`, from `/proc` (a `beam.smp` whose environment names the
/// node: the node name is not among its arguments).
pub fn vm_pids(nodename: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let wanted = format!("RABBITMQ_NODENAME={nodename}");
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let is_vm = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0)
                    .next()
                    .is_some_and(|a| a.ends_with(b"beam.smp"))
            });
            is_vm
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|e| e.split(|b| *b == 0).any(|v| v == wanted.as_bytes()))
        })
        .collect()
}

/// The epmd of one harness (each node registers there; nodes of one cluster find each other through it).
fn start_epmd(dir: &Path) -> Result<(Process, u16)> {
    let epmd_port = free_port()?;
    let epmd = Process::spawn(
        "epmd",
        Path::new("/usr/bin/epmd"),
        &[
            "-port".into(),
            epmd_port.to_string(),
            "-address".into(),
            "127.0.0.1".into(),
        ],
        &[],
        &dir.join("epmd.log"),
    )?;
    Ok((epmd, epmd_port))
}

/// A home directory holding the shared Erlang cookie (the VM refuses a cookie file others may read).
fn cookie_home(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let home = dir.join("home");
    std::fs::create_dir_all(&home)?;
    let cookie = home.join(".erlang.cookie");
    std::fs::write(&cookie, COOKIE)?;
    std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))?;
    Ok(home)
}

/// A running RabbitMQ node.
pub struct RabbitMq {
    // Dropped in this order: the node, its epmd, then the directory.
    node: Node,
    epmd: Process,
    dir: tempfile::TempDir,
    pod_addr: Option<IpAddr>,
}

impl RabbitMq {
    /// Starts a node and waits until it accepts AMQP connections (installs the Debian package first when
    /// it is missing and this process may).
    pub async fn start() -> Result<Self> {
        Self::start_on(None).await
    }

    /// Like [`RabbitMq::start`]; with `pod_addr` (e.g. hookfleet-e2e's `Cluster::host_addr`) the node also
    /// listens there, on the same port, and `guest` may log in from any address: it is loopback-only by
    /// default, and a pod's connection comes from the pod network.
    pub async fn start_on(pod_addr: Option<IpAddr>) -> Result<Self> {
        ensure_installed()?;
        let dir = tempfile::Builder::new().prefix("hookfleet-rmq-").tempdir()?;
        let base = dir.path();
        let home = cookie_home(base)?;
        let (epmd, epmd_port) = start_epmd(base)?;
        let node = Node::prepare(base, &home, epmd_port, pod_addr)?;
        let mut rmq = Self {
            node,
            epmd,
            dir,
            pod_addr,
        };
        rmq.start_node().await?;
        Ok(rmq)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn amqp_uri(&self) -> String {
        self.node.amqp_uri()
    }

    /// The URI for workers in pods: `amqp://guest:guest@<pod address>:<port>/%2f` (the loopback URI when
    /// started without one).
    pub fn amqp_uri_for_pods(&self) -> String {
        self.node.amqp_uri_on(self.pod_addr)
    }

    pub fn port(&self) -> u16 {
        self.node.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the node (after [`RabbitMq::stop_node`]) and waits until it accepts AMQP connections.
    pub async fn start_node(&mut self) -> Result<()> {
        self.node.start().await
    }

    /// Stops the node the way an operator's `rabbitmqctl stop` would (connections are closed by the
    /// broker; durable state is kept).
    pub fn stop_node(&mut self) {
        self.node.stop();
    }

    /// Kills the node with SIGKILL (a crash: no clean shutdown).
    pub fn kill_node(&mut self) {
        if let Err(e) = self.node.kill() {
            tracing::error!("{e:#}");
        }
    }

    /// Stops and starts the node on the same ports and data.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop_node();
        self.start_node().await
    }

    /// Runs `rabbitmqctl -n <node> args…` and returns its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        self.node.ctl(args)
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        if let Some(mut node) = self.node.process.take() {
            // A clean stop is quick; the Process drop SIGKILLs whatever is left of the VM.
            node.stop(Duration::from_secs(10));
        }
        self.epmd.stop(Duration::from_secs(1));
    }
}

/// A RabbitMQ cluster on loopback: `n` nodes of Debian's server, each on its own ports and data
/// directory, sharing one epmd and Erlang cookie, joined with `rabbitmqctl join_cluster` to the first.
/// Nodes can be killed (SIGKILL of the VM) and started again, which rejoins them; every process and the
/// temporary directory go on drop.
pub struct RabbitCluster {
    nodes: Vec<Node>,
    epmd: Process,
    dir: tempfile::TempDir,
    pod_addr: Option<IpAddr>,
}

impl RabbitCluster {
    /// Starts `n` nodes and clusters them; returns once every node accepts AMQP connections and the
    /// cluster lists all `n` as running.
    pub async fn start(n: usize) -> Result<Self> {
        Self::start_on(n, None).await
    }

    /// Like [`RabbitCluster::start`]; with `pod_addr` every node also listens there (on its own port), as
    /// [`RabbitMq::start_on`] does, for workers in pods ([`RabbitCluster::amqp_uris_for_pods`]).
    pub async fn start_on(n: usize, pod_addr: Option<IpAddr>) -> Result<Self> {
        anyhow::ensure!(n >= 1, "a cluster needs a node");
        ensure_installed()?;
        let dir = tempfile::Builder::new()
            .prefix("hookfleet-rmq-cluster-")
            .tempdir()?;
        let base = dir.path();
        let home = cookie_home(base)?;
        let (epmd, epmd_port) = start_epmd(base)?;
        let nodes = (0..n)
            .map(|i| Node::prepare(&base.join(format!("node-{i}")), &home, epmd_port, pod_addr))
            .collect::<Result<Vec<_>>>()?;
        let mut cluster = Self {
            nodes,
            epmd,
            dir,
            pod_addr,
        };
        // One at a time: three VMs booting at once on a loaded two-core machine time out.
        for i in 0..n {
            cluster.nodes[i].start().await?;
            if i > 0 {
                let first = cluster.nodes[0].nodename.clone();
                let node = &cluster.nodes[i];
                node.ctl(&["stop_app"])?;
                node.ctl(&["reset"])?;
                node.ctl(&["join_cluster", &first])?;
                node.ctl(&["start_app"])?;
            }
        }
        cluster.wait_running(n, Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `amqp://guest:guest@127.0.0.1:<port of node i>/%2f`.
    pub fn amqp_uri(&self, i: usize) -> String {
        self.nodes[i].amqp_uri()
    }

    /// Every node's URI, comma-separated: a connection Secret's value for the whole cluster.
    pub fn amqp_uris(&self) -> String {
        self.nodes
            .iter()
            .map(Node::amqp_uri)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node's URI at the pod address, comma-separated (the loopback ones when started without one):
    /// the connection Secret of workers in pods.
    pub fn amqp_uris_for_pods(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.amqp_uri_on(self.pod_addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// The Erlang node name of node `i` (`hookfleet-<port>@localhost`).
    pub fn nodename(&self, i: usize) -> &str {
        &self.nodes[i].nodename
    }

    /// The index of the node named `nodename`.
    pub fn index_of(&self, nodename: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.nodename == nodename)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether node `i`'s VM was started by this harness and not stopped or killed since.
    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].process.is_some()
    }

    /// Runs `rabbitmqctl args…` against node `i`.
    pub fn ctl(&self, i: usize, args: &[&str]) -> Result<String> {
        self.nodes[i].ctl(args)
    }

    /// Runs `rabbitmqctl args…` against the first node that is up.
    pub fn ctl_any(&self, args: &[&str]) -> Result<String> {
        let i = (0..self.nodes.len())
            .find(|&i| self.is_up(i))
            .context("no node is up")?;
        self.ctl(i, args)
    }

    /// Every queue with its type, counts, consumers and leader (`rabbitmqctl list_queues`, through the
    /// first node that is up): what a failed cluster test keeps as evidence.
    pub fn list_queues(&self) -> Result<String> {
        self.ctl_any(&[
            "list_queues",
            "name",
            "type",
            "messages",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
            "leader",
        ])
    }

    /// Kills node `i`'s VM with SIGKILL (a crash: no clean shutdown) and checks that no process of it is
    /// left.
    pub fn kill_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].kill()
    }

    /// Stops node `i` with `rabbitmqctl stop`.
    pub fn stop_node(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts node `i` again on its ports and data: it rejoins the cluster by itself. Returns once it
    /// accepts AMQP connections and the cluster lists it as running.
    pub async fn restart_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].stop();
        self.nodes[i].start().await?;
        let want = (0..self.nodes.len()).filter(|&j| self.is_up(j)).count();
        self.wait_running(want, Duration::from_secs(60)).await
    }

    /// The running nodes' names as node `i` sees them (`rabbitmqctl cluster_status`).
    pub fn running_nodes(&self, i: usize) -> Result<Vec<String>> {
        let out = self.ctl(i, &["cluster_status", "--formatter", "json"])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("cluster_status: {out}"))?;
        let mut nodes: Vec<String> = v["running_nodes"]
            .as_array()
            .context("cluster_status has no running_nodes")?
            .iter()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect();
        nodes.sort();
        Ok(nodes)
    }

    /// Waits until the first node that is up lists `n` running nodes.
    async fn wait_running(&self, n: usize, timeout: Duration) -> Result<()> {
        wait_for(
            "the cluster's nodes to run",
            timeout,
            Duration::from_millis(500),
            || {
                let running = (0..self.nodes.len())
                    .find(|&i| self.is_up(i))
                    .context("no node is up")
                    .and_then(|i| self.running_nodes(i));
                async move {
                    let running = running?;
                    if running.len() == n {
                        Ok(Some(()))
                    } else {
                        anyhow::bail!("running: {running:?}")
                    }
                }
            },
        )
        .await
    }

    /// A quorum queue's leader node and members, each with whether it is online, as a running node sees
    /// them (`rabbitmqctl list_queues name leader members online`).
    pub fn quorum_queue(&self, queue: &str) -> Result<QuorumQueue> {
        let out = self.ctl_any(&[
            "list_queues",
            "--formatter",
            "json",
            "name",
            "leader",
            "members",
            "online",
        ])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("list_queues: {out}"))?;
        let q = v
            .as_array()
            .context("list_queues is not a list")?
            .iter()
            .find(|q| q["name"] == queue)
            .with_context(|| format!("queue {queue} not listed: {out}"))?;
        let names = |key: &str| -> Vec<String> {
            let mut v: Vec<String> = q[key]
                .as_array()
                .map(|a| a.iter().filter_map(|n| n.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            v.sort();
            v
        };
        Ok(QuorumQueue {
            leader: q["leader"].as_str().unwrap_or("").to_owned(),
            members: names("members"),
            online: names("online"),
        })
    }
}

/// A quorum queue's replicas, by Erlang node name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumQueue {
    pub leader: String,
    pub members: Vec<String>,
    pub online: Vec<String>,
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        // The nodes first (a clean stop each, SIGKILL after), then epmd; the directory goes last.
        for node in &mut self.nodes {
            if let Some(mut p) = node.process.take() {
                p.stop(Duration::from_secs(10));
            }
        }
        self.epmd.stop(Duration::from_secs(1));
    }
}

/// Installs Debian's rabbitmq-server when it is missing and we are root with apt-get.
fn ensure_installed() -> Result<()> {
    if Path::new(SERVER).exists() {
        return Ok(());
    }
    let root = nix::unistd::Uid::effective().is_root();
    if !root || !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "{SERVER} is missing: install Debian's rabbitmq-server (`sudo apt-get install rabbitmq-server`)"
        );
    }
    eprintln!("hookfleet-testkit: installing rabbitmq-server with apt-get");
    let install = || {
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "rabbitmq-server",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    if !install()?.success() {
        // The package lists may be missing on a fresh machine.
        Command::new("apt-get").args(["update", "-q"]).status()?;
        if !install()?.success() {
            bail!("apt-get install rabbitmq-server failed");
        }
    }
    Ok(())
}
