//! A throwaway RabbitMQ node (Debian's `rabbitmq-server`) on free loopback ports in a temporary
//! directory, with its own epmd, stopped on drop. [`RabbitMq::start_on`] also listens on a node's bridge
//! gateway so that workers in pods reach it ([`RabbitMq::amqp_uri_for_pods`]).
//!
//! The node can be stopped and started again on the same ports and data directory ([`RabbitMq::restart`],
//! [`RabbitMq::stop_node`], [`RabbitMq::start_node`]) to test reconnects; durable queues and persistent
//! messages survive that, as they would in production.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lapin::{Connection, ConnectionProperties};

use crate::process::{Process, free_port, wait_for};

/// The server script run directly: `/usr/sbin/rabbitmq-server` switches to the `rabbitmq` user with
/// `su`, which cannot write a root-owned temporary directory.
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// A running RabbitMQ node.
pub struct RabbitMq {
    node: Option<Process>,
    epmd: Process,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    nodename: String,
    port: u16,
    pod_addr: Option<IpAddr>,
}

impl RabbitMq {
    /// Starts a node and waits until it accepts AMQP connections (installs the Debian package first when
    /// it is missing and this process may).
    pub async fn start() -> Result<Self> {
        Self::start_on(None).await
    }

    /// Like [`RabbitMq::start`]; with `pod_addr` (e.g. [`crate::Cluster::host_addr`]) the node also
    /// listens there, on the same port, and `guest` may log in from any address: it is loopback-only by
    /// default, and a pod's connection comes from the pod network.
    pub async fn start_on(pod_addr: Option<IpAddr>) -> Result<Self> {
        ensure_installed()?;
        let dir = tempfile::Builder::new().prefix("hookfleet-rmq-").tempdir()?;
        let port = free_port()?;
        let dist_port = free_port()?;
        let epmd_port = free_port()?;
        let nodename = format!("hookfleet-{port}@localhost");
        let base = dir.path();
        for sub in ["mnesia", "log", "home"] {
            std::fs::create_dir_all(base.join(sub))?;
        }
        let mut conf = format!("listeners.tcp.1 = 127.0.0.1:{port}\n");
        match pod_addr {
            Some(addr) => conf.push_str(&format!(
                "listeners.tcp.2 = {addr}:{port}\nloopback_users = none\n"
            )),
            None => conf.push_str("loopback_users.guest = true\n"),
        }
        conf.push_str("log.console = true\nlog.console.level = warning\nlog.file = false\n");
        std::fs::write(base.join("rabbitmq.conf"), conf)?;
        std::fs::write(base.join("enabled_plugins"), "[].\n")?;
        // At-least-once dead-lettering (quorum queues) re-sends a message its target refused (say a
        // full work queue) only after this timeout, 3 minutes by default; 5 s keeps tests short.
        std::fs::write(
            base.join("advanced.config"),
            "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 5000}]}].\n",
        )?;
        let p = |sub: &str| base.join(sub).display().to_string();
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
            ("HOME", p("home")),
            // A node that fails to boot writes a crash dump; keep it with the node's logs, not in the cwd.
            ("ERL_CRASH_DUMP", p("log/erl_crash.dump")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if pod_addr.is_none() {
            // These two override the config file's listeners with a single one.
            env.push(("RABBITMQ_NODE_IP_ADDRESS".into(), "127.0.0.1".into()));
            env.push(("RABBITMQ_NODE_PORT".into(), port.to_string()));
        }

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
            &base.join("epmd.log"),
        )?;
        let mut rmq = Self {
            node: None,
            epmd,
            dir,
            env,
            nodename,
            port,
            pod_addr,
        };
        rmq.start_node().await?;
        Ok(rmq)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn amqp_uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The URI for workers in pods: `amqp://guest:guest@<pod address>:<port>/%2f` (the loopback URI when
    /// started without one).
    pub fn amqp_uri_for_pods(&self) -> String {
        let host = self.pod_addr.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        format!("amqp://guest:guest@{host}:{}/%2f", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the node (after [`RabbitMq::stop_node`]) and waits until it accepts AMQP connections.
    pub async fn start_node(&mut self) -> Result<()> {
        if self.node.is_some() {
            return Ok(());
        }
        let log = self.dir.path().join(format!("node-{}.log", std::process::id()));
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
        self.node = Some(node);
        Ok(())
    }

    /// Stops the node the way an operator's `rabbitmqctl stop` would (connections are closed by the
    /// broker; durable state is kept).
    pub fn stop_node(&mut self) {
        if let Some(mut node) = self.node.take() {
            let _ = self.ctl(&["stop"]);
            node.stop(Duration::from_secs(20));
        }
    }

    /// Kills the node with SIGKILL (a crash: no clean shutdown).
    pub fn kill_node(&mut self) {
        if let Some(mut node) = self.node.take() {
            node.kill();
        }
    }

    /// Stops and starts the node on the same ports and data.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop_node();
        self.start_node().await
    }

    /// Runs `rabbitmqctl -n <node> args…` and returns its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
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

impl Drop for RabbitMq {
    fn drop(&mut self) {
        if let Some(mut node) = self.node.take() {
            // A clean stop is quick; the Process drop SIGKILLs whatever is left of the VM.
            node.stop(Duration::from_secs(10));
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
    eprintln!("hookfleet-e2e: installing rabbitmq-server with apt-get");
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
