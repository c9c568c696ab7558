//! A throwaway NATS server with JetStream (`nats-server`, built from the Go module proxy by
//! `hack/build-tools.sh`), or several joined into one JetStream cluster, on free loopback ports with
//! their stores in a temporary directory, stopped on drop. [`NatsServer::start_on`] listens on another
//! address instead (a node's bridge gateway, so that workers and the operator in pods reach it).
//!
//! A node can be killed (`kill -9`), stopped and started again on the same ports and store
//! ([`NatsServer::kill_node`], [`NatsServer::stop_node`], [`NatsServer::start_node`]): streams and their
//! messages survive that, as they would in production.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::{Process, free_port, wait_for};
use crate::tools::{self, Tool};

/// One server: its ports, store and (while it runs) its process.
struct Node {
    process: Option<Process>,
    args: Vec<String>,
    port: u16,
    monitor_port: u16,
    log: PathBuf,
    runs: u32,
}

/// A NATS server, or a cluster of them, with JetStream.
pub struct NatsServer {
    nodes: Vec<Node>,
    bin: PathBuf,
    /// The address every node listens on (clients and monitoring; a cluster's routes stay on loopback).
    host: IpAddr,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// One server with JetStream.
    pub async fn start() -> Result<Self> {
        Self::start_cluster(1).await
    }

    /// `n` servers joined into one JetStream cluster (`n` = 1: a single server, no cluster), each ready
    /// (its health endpoint says JetStream is up: in a cluster, once the meta leader is elected).
    pub async fn start_cluster(n: usize) -> Result<Self> {
        Self::start_cluster_on(n, IpAddr::V4(Ipv4Addr::LOCALHOST)).await
    }

    /// One server with JetStream listening on `ip` (clients and monitoring), not on loopback: with
    /// hookfleet-e2e's `Cluster::host_addr`, pods reach it, and [`NatsServer::url`] names that address.
    pub async fn start_on(ip: IpAddr) -> Result<Self> {
        Self::start_cluster_on(1, ip).await
    }

    async fn start_cluster_on(n: usize, host: IpAddr) -> Result<Self> {
        let bin = tools::path(Tool::NatsServer)?;
        let dir = tempfile::Builder::new().prefix("hookfleet-nats-").tempdir()?;
        let mut ports = Vec::new();
        for _ in 0..n {
            ports.push((free_port()?, free_port()?, free_port()?));
        }
        let routes = ports
            .iter()
            .map(|(_, _, c)| format!("nats://127.0.0.1:{c}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        for (i, (port, monitor_port, cluster_port)) in ports.iter().enumerate() {
            let store = dir.path().join(format!("n{}", i + 1));
            std::fs::create_dir_all(&store)?;
            let mut args: Vec<String> = [
                "-a",
                &host.to_string(),
                "-p",
                &port.to_string(),
                "-m",
                &monitor_port.to_string(),
                "-js",
                "-sd",
                &store.display().to_string(),
                "-n",
                &format!("hookfleet-n{}", i + 1),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if n > 1 {
                for a in [
                    "--cluster_name".to_owned(),
                    "hookfleet".to_owned(),
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{cluster_port}"),
                    "--routes".to_owned(),
                    routes.clone(),
                ] {
                    args.push(a);
                }
            }
            nodes.push(Node {
                process: None,
                args,
                port: *port,
                monitor_port: *monitor_port,
                log: PathBuf::new(),
                runs: 0,
            });
        }
        let mut me = Self {
            nodes,
            bin,
            host,
            _dir: dir,
        };
        for i in 0..n {
            me.spawn(i)?;
        }
        for i in 0..n {
            me.wait_healthy(i).await?;
        }
        Ok(me)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        // One log per run of the node, so that a restart keeps the earlier run's.
        node.runs += 1;
        node.log = self._dir.path().join(format!("n{}.run{}.log", i + 1, node.runs));
        node.process = Some(Process::spawn(
            &format!("nats-server {}", i + 1),
            &self.bin,
            &node.args,
            &[],
            &node.log,
        )?);
        Ok(())
    }

    /// Waits until node `i` answers `/healthz` with 200 (60 s at most): the server is up and its
    /// JetStream current (in a cluster, with a meta leader).
    async fn wait_healthy(&self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let (host, port) = (self.host, node.monitor_port);
        wait_for(
            &format!("nats-server {} healthy", i + 1),
            Duration::from_secs(60),
            Duration::from_millis(100),
            || async move {
                if let Some(p) = &node.process {
                    p.check_running()?;
                }
                Ok(healthz(host, port).await.ok().filter(|&ok| ok))
            },
        )
        .await
        .with_context(|| format!("nats-server {}: {}", i + 1, crate::process::tail(&node.log, 20)))?;
        Ok(())
    }

    /// How many servers.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `nats://<address>:<port>` of node `i` (`127.0.0.1` unless started with [`NatsServer::start_on`]).
    pub fn url(&self, i: usize) -> String {
        format!("nats://{}:{}", self.host, self.nodes[i].port)
    }

    /// Every node's URL, comma-separated (what a worker's `--nats-url` takes).
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client port of node `i`.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// `kill -9` of node `i`.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].process.take() {
            p.kill();
        }
    }

    /// SIGTERM to node `i`, then SIGKILL after 10 s.
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].process.take() {
            p.stop(Duration::from_secs(10));
        }
    }

    /// Starts node `i` again on its ports and store, and waits until it is healthy.
    pub async fn start_node(&mut self, i: usize) -> Result<()> {
        if self.nodes[i].process.is_some() {
            bail!("nats-server {} is running", i + 1);
        }
        self.spawn(i)?;
        self.wait_healthy(i).await
    }

    /// Whether node `i` runs.
    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].process.as_ref().is_some_and(|p| !p.exited())
    }

    /// The last `lines` of node `i`'s log.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        crate::process::tail(&self.nodes[i].log, lines)
    }
}

/// Whether the monitoring endpoint on `host`:`port` says the server and its JetStream are healthy.
async fn healthz(host: IpAddr, port: u16) -> Result<bool> {
    let mut s = tokio::net::TcpStream::connect((host, port)).await?;
    s.write_all(format!("GET /healthz HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await??;
    Ok(out.starts_with(b"HTTP/1.0 200") || out.starts_with(b"HTTP/1.1 200"))
}

/// The headers of every message in `stream` (a dead-letter stream, say), read without consuming them:
/// empty when the stream does not exist yet.
pub async fn stream_headers(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> Result<Vec<async_nats::HeaderMap>> {
    use async_nats::jetstream::consumer;
    // One request: the stream's info comes with it.
    let Ok(s) = js.get_stream(stream).await else {
        return Ok(Vec::new());
    };
    let n = s.cached_info().state.messages;
    let mut out = Vec::new();
    if n == 0 {
        return Ok(out);
    }
    let c = s
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut batch = c
        .fetch()
        .max_messages(n as usize)
        .expires(Duration::from_secs(2))
        .messages()
        .await?;
    while let Some(m) = batch.next().await {
        let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
        out.push(m.headers.clone().unwrap_or_default());
    }
    Ok(out)
}
