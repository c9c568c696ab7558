//! Pages during the soak: a live Prometheus with the chart's rules at their default `for:` (as `helm
//! template` renders them), scraping the operator pods and the workers as their pods come and go (targets
//! refreshed from the API at every poll), and a watcher that polls `/api/v1/alerts` and keeps every alert
//! of severity `page` that went firing, with when it fired and resolved.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams};

use super::stack::{NAME, NS};
use crate::chart;
use crate::install::NAMESPACE as SYSTEM_NS;
use crate::prometheus::{Prometheus, Target};

/// The operator's job: the name the chart's rules select by default.
const OPERATOR_JOB: &str = "hookfleet-operator-metrics";
const WORKER_JOB: &str = "hookfleet-workers";
/// The operator's metrics port (the chart's `operator.port` default).
const OPERATOR_PORT: u16 = 8080;
/// How often alerts are polled and targets refreshed.
pub const POLL: Duration = Duration::from_secs(15);

/// One page: an alert (name and labels other than `alertname` and `severity`) firing from `fired` to
/// `resolved` (times since the load started, as this watcher saw them).
#[derive(Clone, Debug)]
pub struct Page {
    pub alert: String,
    pub labels: String,
    pub active_at: String,
    pub fired: Duration,
    pub resolved: Option<Duration>,
}

/// What the watcher saw.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Every page that went firing.
    pub pages: Vec<Page>,
    /// Page alerts seen pending (by name): when first, and in how many polls.
    pub pending: BTreeMap<String, (Duration, u32)>,
    /// Polls of `/api/v1/alerts` answered, and failed.
    pub polls: (u32, u32),
}

/// Starts Prometheus with the chart's rules (helm home `helm_home`), scraping the current pods.
pub async fn start(client: &Client, helm_home: &Path) -> Result<Prometheus> {
    let rules = chart::rules_file(helm_home, helm_home, &[])?;
    let (operators, workers) = targets(client).await?;
    Prometheus::start(&[operators, workers], Some(&rules)).await
}

/// Scrape targets: every operator pod and every worker pod with an address.
async fn targets(client: &Client) -> Result<(Target, Target)> {
    let ips = |pods: Vec<Pod>, port: u16| -> Vec<String> {
        pods.iter()
            .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
            .map(|ip| format!("{ip}:{port}"))
            .collect()
    };
    let operators = Api::<Pod>::namespaced(client.clone(), SYSTEM_NS)
        .list(&ListParams::default())
        .await?
        .items;
    let workers = Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels(&format!("hookfleet.io/integration={NAME}")))
        .await?
        .items;
    Ok((
        Target::new(OPERATOR_JOB, ips(operators, OPERATOR_PORT)),
        Target::new(WORKER_JOB, ips(workers, hookfleet_crds::contract::METRICS_PORT)),
    ))
}

/// Polls until `stop`: refreshes the targets, records pages. `t0`: the start of the load.
pub async fn watch(
    prom: Arc<Prometheus>,
    client: Client,
    t0: Instant,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        if let Ok((operators, workers)) = targets(&client).await {
            let _ = prom.set_targets(&operators);
            let _ = prom.set_targets(&workers);
        }
        let alerts = prom.alerts().await;
        let now = t0.elapsed();
        record(&mut seen.lock().unwrap(), alerts, now);
        tokio::time::sleep(POLL).await;
    }
}

/// Counts a poll, and notes pending pages and pages that went firing or resolved.
fn record(seen: &mut Seen, alerts: Result<Vec<crate::prometheus::Alert>>, now: Duration) {
    match &alerts {
        Ok(_) => seen.polls.0 += 1,
        Err(_) => seen.polls.1 += 1,
    }
    if let Ok(alerts) = alerts {
        for a in alerts
            .iter()
            .filter(|a| a.state == "pending" && a.labels.get("severity").map(String::as_str) == Some("page"))
        {
            seen.pending.entry(a.name().to_owned()).or_insert((now, 0)).1 += 1;
        }
        let firing: BTreeMap<(String, String), String> = alerts
            .iter()
            .filter(|a| a.state == "firing" && a.labels.get("severity").map(String::as_str) == Some("page"))
            .map(|a| {
                let labels = a
                    .labels
                    .iter()
                    .filter(|(k, _)| *k != "alertname" && *k != "severity")
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",");
                (
                    (a.name().to_owned(), labels),
                    a.active_at.clone().unwrap_or_default(),
                )
            })
            .collect();
        let pages = &mut seen.pages;
        for p in pages.iter_mut().filter(|p| p.resolved.is_none()) {
            if !firing.contains_key(&(p.alert.clone(), p.labels.clone())) {
                p.resolved = Some(now);
            }
        }
        for ((alert, labels), active_at) in firing {
            let open = pages
                .iter()
                .any(|p| p.resolved.is_none() && p.alert == alert && p.labels == labels);
            if !open {
                println!(
                    "chaos: [{}] PAGE {alert} {{{labels}}} firing (active since {active_at})",
                    mmss(now)
                );
                pages.push(Page {
                    alert,
                    labels,
                    active_at,
                    fired: now,
                    resolved: None,
                });
            }
        }
    }
}

/// Targets up / scraped per job, as Prometheus last saw them (`up`).
pub async fn targets_up(prom: &Prometheus) -> Result<BTreeMap<String, (usize, usize)>> {
    let mut by_job: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in prom.query("up").await?.as_array().cloned().unwrap_or_default() {
        let job = r["metric"]["job"].as_str().unwrap_or("").to_owned();
        let e = by_job.entry(job).or_default();
        e.1 += 1;
        if r["value"][1] == "1" {
            e.0 += 1;
        }
    }
    Ok(by_job)
}

/// `mm:ss`.
pub fn mmss(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}", s / 60, s % 60)
}
