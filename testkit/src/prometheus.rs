//! A throwaway Prometheus (Debian's `prometheus` binary) on a free loopback port in a temporary directory,
//! scraping static HTTP targets and evaluating a rules file, so a test can assert that an alert fires on
//! live metrics (and resolves) through `/api/v1/alerts`.
//!
//! ```no_run
//! # async fn f(rules: &std::path::Path) -> anyhow::Result<()> {
//! use hookfleet_testkit::prometheus::{Prometheus, Target};
//! let prom = Prometheus::start(&[Target::new("workers", ["127.0.0.1:9090"])], Some(rules)).await?;
//! prom.wait_firing("HookfleetConsumersBelowReadyWorkers", std::time::Duration::from_secs(300)).await?;
//! # Ok(()) }
//! ```
//!
//! Scrapes and rule evaluations run every second by default ([`Options`]), so a rule's `for:` is what
//! decides how soon it fires; tests shorten `for:` through the chart's values (and say so).
//!
//! Each job's targets are a file Prometheus watches (`file_sd`), so a harness whose targets move (pods
//! replaced during a soak) changes them with [`Prometheus::set_targets`], without a restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::process::{Process, free_port, wait_for};

/// Where Debian's package installs the server (`HOOKFLEET_PROMETHEUS` overrides it).
const DEFAULT_BINARY: &str = "/usr/bin/prometheus";

/// One scrape job: static `host:port` targets over plain HTTP.
#[derive(Clone, Debug)]
pub struct Target {
    pub job: String,
    pub targets: Vec<String>,
    pub metrics_path: String,
}

impl Target {
    /// A job scraping `/metrics` of each `host:port`.
    pub fn new<I, S>(job: &str, targets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            job: job.into(),
            targets: targets.into_iter().map(Into::into).collect(),
            metrics_path: "/metrics".into(),
        }
    }
}

/// Intervals of the server.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub scrape_interval: Duration,
    pub evaluation_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            scrape_interval: Duration::from_secs(1),
            evaluation_interval: Duration::from_secs(1),
        }
    }
}

/// An alert as `/api/v1/alerts` reports it.
#[derive(Clone, Debug, Deserialize)]
pub struct Alert {
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    /// `pending` or `firing`.
    pub state: String,
    #[serde(default, rename = "activeAt")]
    pub active_at: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

impl Alert {
    pub fn name(&self) -> &str {
        self.labels.get("alertname").map(String::as_str).unwrap_or("")
    }
}

/// A running Prometheus; stopped (and its directory removed) when dropped.
pub struct Prometheus {
    // Drops first: the process, then its directory.
    process: Process,
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

fn seconds(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// The binary: `HOOKFLEET_PROMETHEUS`, else Debian's.
pub fn binary() -> PathBuf {
    std::env::var_os("HOOKFLEET_PROMETHEUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BINARY))
}

impl Prometheus {
    /// Starts Prometheus with `targets` and, when given, the rules file `rules` (copied into its directory).
    pub async fn start(targets: &[Target], rules: Option<&Path>) -> Result<Self> {
        Self::start_with(targets, rules, Options::default()).await
    }

    pub async fn start_with(targets: &[Target], rules: Option<&Path>, options: Options) -> Result<Self> {
        let bin = binary();
        if !bin.is_file() {
            bail!(
                "{} not found: install Debian's prometheus package (`make deps`) or set HOOKFLEET_PROMETHEUS",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new().prefix("hookfleet-prom-").tempdir()?;
        let mut config = serde_json::json!({
            "global": {
                "scrape_interval": seconds(options.scrape_interval),
                "scrape_timeout": seconds(options.scrape_interval),
                "evaluation_interval": seconds(options.evaluation_interval),
            },
            "scrape_configs": targets.iter().map(|t| serde_json::json!({
                "job_name": t.job,
                "metrics_path": t.metrics_path,
                "file_sd_configs": [{"files": [targets_file(dir.path(), &t.job)]}],
            })).collect::<Vec<_>>(),
        });
        for t in targets {
            write_targets(dir.path(), t)?;
        }
        if let Some(rules) = rules {
            let copy = dir.path().join("rules.yaml");
            std::fs::copy(rules, &copy).with_context(|| format!("copying {}", rules.display()))?;
            config["rule_files"] = serde_json::json!([copy]);
        }
        // JSON is YAML: no second serializer needed.
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let process = Process::spawn(
            "prometheus",
            &bin,
            &[
                format!("--config.file={}", config_path.display()),
                format!("--storage.tsdb.path={}", dir.path().join("data").display()),
                format!("--web.listen-address={addr}"),
                "--storage.tsdb.retention.time=1h".into(),
                "--log.level=warn".into(),
            ],
            &[],
            &dir.path().join("prometheus.log"),
        )?;
        let prom = Self { process, dir, addr };
        wait_for(
            "prometheus /-/ready",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                let running = prom.process.check_running();
                async move {
                    running?;
                    Ok(match http_get(addr, "/-/ready").await {
                        Ok((200, _)) => Some(()),
                        _ => None,
                    })
                }
            },
        )
        .await?;
        tracing::debug!(%addr, dir = %prom.dir.path().display(), "prometheus ready");
        Ok(prom)
    }

    /// Replaces the targets of job `target.job` (one given to [`Prometheus::start`]); Prometheus notices
    /// the file change within seconds.
    pub fn set_targets(&self, target: &Target) -> Result<()> {
        write_targets(self.dir.path(), target)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The temporary directory (config, rules, data, `prometheus.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of Prometheus's own log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    async fn api(&self, path: &str) -> Result<serde_json::Value> {
        self.process.check_running()?;
        let (status, body) = http_get(self.addr, path).await?;
        let v: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("GET {path}: {status} {body}"))?;
        if v["status"] != "success" {
            bail!("GET {path}: {status} {body}");
        }
        Ok(v["data"].clone())
    }

    /// Every pending or firing alert.
    pub async fn alerts(&self) -> Result<Vec<Alert>> {
        let data = self.api("/api/v1/alerts").await?;
        Ok(serde_json::from_value(data["alerts"].clone())?)
    }

    /// The result of an instant query (`data.result` of `/api/v1/query`).
    pub async fn query(&self, promql: &str) -> Result<serde_json::Value> {
        let data = self
            .api(&format!("/api/v1/query?query={}", url_encode(promql)))
            .await?;
        Ok(data["result"].clone())
    }

    /// Waits until alert `name` is firing and returns it (the first instance).
    pub async fn wait_firing(&self, name: &str, timeout: Duration) -> Result<Alert> {
        wait_for(
            &format!("alert {name} firing"),
            timeout,
            Duration::from_millis(500),
            || async move {
                let alerts = self.alerts().await?;
                match alerts.iter().find(|a| a.name() == name && a.state == "firing") {
                    Some(a) => Ok(Some(a.clone())),
                    None => bail!("alerts now: {}", summary(&alerts)),
                }
            },
        )
        .await
    }

    /// Waits until alert `name` is neither firing nor pending.
    pub async fn wait_not_firing(&self, name: &str, timeout: Duration) -> Result<()> {
        wait_for(
            &format!("alert {name} resolved"),
            timeout,
            Duration::from_millis(500),
            || async move {
                let alerts = self.alerts().await?;
                if alerts.iter().any(|a| a.name() == name) {
                    bail!("alerts now: {}", summary(&alerts));
                }
                Ok(Some(()))
            },
        )
        .await
    }
}

fn targets_file(dir: &Path, job: &str) -> PathBuf {
    dir.join(format!("targets-{job}.json"))
}

/// Writes a job's `file_sd` file whole (a temporary file renamed over it, so Prometheus never reads half).
fn write_targets(dir: &Path, target: &Target) -> Result<()> {
    let path = targets_file(dir, &target.job);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(&serde_json::json!([{"targets": target.targets}]))?,
    )?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn summary(alerts: &[Alert]) -> String {
    if alerts.is_empty() {
        return "none".into();
    }
    alerts
        .iter()
        .map(|a| format!("{} ({})", a.name(), a.state))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters stay).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain HTTP/1.0 GET on loopback: `(status, body)`. The harness talks to local servers only, so no HTTP
/// client stack is pulled in for this.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .context("response timed out")??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status in {head:?}"))?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            url_encode(r#"up{job="a b"} == 1"#),
            "up%7Bjob%3D%22a%20b%22%7D%20%3D%3D%201"
        );
    }
}
