//! Scenarios that need several real nodes (`HOOKFLEET_E2E_NODES=3`, `make test-incident`); on one node they
//! are skipped and say so.
//!
//! - `incident`: the night hookfleet was built after, replayed. Node 3's containerd is at nofile 1024:1024 (the
//!   default), nodes 1 and 2 at 1024:4096; an Integration of 3 workers that need 4,096 descriptors each
//!   (concurrency 2,016), spread over the nodes, while messages are published at a steady rate. The worker on
//!   node 3 refuses to start (exit 3), the Integration turns Degraded naming the node and its limit, the
//!   operator keeps the workers off node 3 so the fleet is back to 3 Ready workers with no human, and a page
//!   fires on a live Prometheus evaluating the chart's rules with their default `for:` (scrape and evaluation
//!   every 30 s, as the chart's monitors). The timeline is printed beside the incident's.
//! - `drain`: `kubectl drain` of a node running workers under load: the PodDisruptionBudget holds (never fewer
//!   Ready workers than `minAvailable`), nothing lost.
//! - `nodeloss`: a node running workers is lost (kill -9 of its kubelet, containerd and containers) under load:
//!   the broker hands back what its workers held, the workers are replaced on the other nodes once the node is
//!   NotReady (the operator's 30 s tolerations), nothing lost; each step timed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use hookfleet_e2e::messages;
use hookfleet_e2e::prometheus::{self, Prometheus};
use hookfleet_e2e::sink::Mode;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Api;

use hookfleet_e2e::pods::node_of;

use super::{INCIDENT_NOFILE, Outcome, Stack, cond, is_ready, live_prometheus_with};

/// Names of the local nodes and their nofile limits, or why the scenario cannot run.
async fn nodes(s: &Stack, at_least: usize) -> Result<std::result::Result<Vec<(String, (u64, u64))>, String>> {
    let Some(cluster) = &s.cluster else {
        return Ok(Err("skipped: needs the local nodes".into()));
    };
    let c = cluster.lock().await;
    if c.nodes().len() < at_least {
        return Ok(Err(format!(
            "skipped: needs {at_least} nodes (HOOKFLEET_E2E_NODES={at_least}, make test-incident)"
        )));
    }
    Ok(Ok(c
        .nodes()
        .iter()
        .map(|n| (n.name().to_string(), n.nofile()))
        .collect()))
}

/// Seconds since `t0`, for timelines.
fn secs(t: Instant, t0: Instant) -> f64 {
    t.saturating_duration_since(t0).as_secs_f64()
}

/// When the container of `pod` exited with `code` (now or last time), the earliest such exit.
fn exit_time(pod: &Pod, code: i32) -> Option<Time> {
    pod.status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .flat_map(|c| {
            let now = c.state.as_ref().and_then(|s| s.terminated.as_ref());
            let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref());
            [now, last]
        })
        .flatten()
        .filter(|t| t.exit_code == code)
        .filter_map(|t| t.finished_at.clone())
        .min_by_key(|t| t.0)
}

/// Alerts seen firing, with the first time each (name, severity) was seen (seconds after `t0`).
#[derive(Default)]
struct Pages(BTreeMap<(String, String), f64>);

impl Pages {
    async fn poll(&mut self, p: &Prometheus, t0: Instant) {
        // A failed poll is retried at the next tick; the scenario's deadline bounds it.
        let Ok(alerts) = p.alerts().await else {
            return;
        };
        for a in alerts.iter().filter(|a| a.state == "firing") {
            let severity = a.labels.get("severity").cloned().unwrap_or_default();
            self.0
                .entry((a.name().to_string(), severity))
                .or_insert_with(|| t0.elapsed().as_secs_f64());
        }
    }

    fn first(&self, name: &str) -> Option<f64> {
        self.0
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, t)| *t)
            .reduce(f64::min)
    }

    fn list(&self) -> String {
        let mut out: Vec<String> = self
            .0
            .iter()
            .map(|((n, sev), t)| format!("{n} ({sev}) at {t:.0} s"))
            .collect();
        if out.is_empty() {
            out.push("none".into());
        }
        out.join(", ")
    }
}

/// The incident, replayed (module doc).
pub async fn incident(s: &Stack) -> Outcome {
    let nodes = match nodes(s, 3).await? {
        Ok(n) => n,
        Err(skip) => return Ok((None, skip)),
    };
    let low = nodes
        .iter()
        .find(|(_, nofile)| *nofile == INCIDENT_NOFILE)
        .map(|(n, _)| n.clone())
        .context("no node at the incident's nofile limit")?;
    const NS: &str = "e2e-incident";
    const QUEUE: &str = "e2e.incident";
    const RATE: u32 = 40;
    const SECONDS: usize = 300;
    let api = s.namespace(NS, "").await?;
    // The chart's rules as installed (default `for:`), at the chart's monitors' 30 s scrape interval.
    let (prom, _) = live_prometheus_with(
        s,
        &[],
        prometheus::Options {
            scrape_interval: Duration::from_secs(30),
            evaluation_interval: Duration::from_secs(30),
        },
    )
    .await?;
    let (t0, t0_wall) = (Instant::now(), Timestamp::now());
    // 2 × 2,016 + 64 = 4,096 descriptors: nodes 1 and 2 give them (hard 4,096), node 3 (hard 1,024) cannot.
    s.integration(
        &api,
        "devices",
        QUEUE,
        serde_json::json!({
            "delivery": {"concurrency": 2016},
            "workers": {"replicas": 3, "fileDescriptorLimit": 4096},
        }),
    )
    .await?;
    let ids = messages::ids("incident", RATE as usize * SECONDS);
    let mut publishing = None;

    // Times in seconds after the Integration was created: the API's own timestamps where there are
    // (container exit, condition transition, exclusion; whole seconds), else when this loop saw it.
    let since = |t: &Time| (t.0.as_millisecond() - t0_wall.as_millisecond()) as f64 / 1000.0;
    let seen = || t0.elapsed().as_secs_f64();
    let pods_api: Api<Pod> = Api::namespaced(s.client.clone(), NS);
    let (mut on_low, mut exit3, mut degraded, mut excluded, mut recovered, mut published_from) =
        (None, None, None, None, None, None);
    let mut message = String::new();
    let mut pages = Pages::default();
    let deadline = t0 + Duration::from_secs(420);
    let page_name = "HookfleetFileDescriptorLimitNotMet";
    while Instant::now() < deadline {
        let pods = pods_api
            .list(&kube::api::ListParams::default().labels("hookfleet.io/integration=devices"))
            .await?
            .items;
        if on_low.is_none()
            && let Some(p) = pods.iter().find(|p| node_of(p) == low)
        {
            on_low = Some(p.metadata.creation_timestamp.as_ref().map_or_else(seen, since));
        }
        if exit3.is_none() {
            exit3 = pods
                .iter()
                .filter(|p| node_of(p) == low)
                .filter_map(|p| exit_time(p, 3))
                .map(|t| since(&t))
                .reduce(f64::min);
        }
        let i = api.get("devices").await?;
        let st = i.status.clone().unwrap_or_default();
        if publishing.is_none() && st.consumers.unwrap_or(0) >= 1 {
            // The workers declare the queue: publish once one consumes.
            publishing = Some(s.publish_in_background(QUEUE, &ids, RATE));
            published_from = Some(seen());
        }
        if let Some(c) = i.condition("Degraded")
            && c.reason == "FileDescriptorLimitNotMet"
            && c.message.contains(&low)
        {
            degraded.get_or_insert(since(&c.last_transition_time));
            message = c.message.clone();
        }
        if excluded.is_none()
            && let Some(e) = st.excluded_nodes.iter().find(|e| e.node == low)
        {
            excluded = Some(since(&e.since));
        }
        let live: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        if recovered.is_none()
            && exit3.is_some()
            && cond(&i, "Ready").0 == "True"
            && st.ready_replicas == Some(3)
            && st.consumers == Some(3)
            && live.len() == 3
            && live.iter().all(|p| is_ready(p) && node_of(p) != low)
        {
            recovered = Some(seen());
        }
        pages.poll(&prom, t0).await;
        if recovered.is_some() && pages.first(page_name).is_some() {
            break;
        }
        if on_low.is_none() && t0.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let published = match publishing {
        Some(p) => p.await?,
        None => Err(anyhow::anyhow!("never published: no worker consumed")),
    };
    let account = s.settle(QUEUE, &ids, 300).await?;
    published?;
    let page = pages.first(page_name);

    // The timeline: seconds after the Integration was created, and after the worker on the low node exited.
    let exit = exit3.unwrap_or(0.0);
    let at = |t: Option<f64>| {
        t.map_or("   never            ".to_string(), |t| {
            format!("{t:>7.1} s ({:>+7.1} s)", t - exit)
        })
    };
    let mut timeline = String::new();
    writeln!(
        timeline,
        "incident timeline on 3 real nodes (s after the Integration was created; in brackets, after the exit 3):"
    )?;
    writeln!(
        timeline,
        "  {}  a worker pod created on {low} (nofile {}:{})",
        at(on_low),
        INCIDENT_NOFILE.0,
        INCIDENT_NOFILE.1
    )?;
    writeln!(
        timeline,
        "  {}  that worker exits 3 (refuses to start; container finishedAt)",
        at(exit3)
    )?;
    writeln!(
        timeline,
        "  {}  Integration Degraded/FileDescriptorLimitNotMet naming {low} (lastTransitionTime)",
        at(degraded)
    )?;
    writeln!(
        timeline,
        "  {}  {low} in status.excludedNodes (since; required node affinity, the Deployment rolls)",
        at(excluded)
    )?;
    writeln!(
        timeline,
        "  {}  publishing {RATE}/s from here (the first consumer)",
        at(published_from)
    )?;
    writeln!(
        timeline,
        "  {}  3 Ready workers consuming, none on {low}: no human",
        at(recovered)
    )?;
    writeln!(
        timeline,
        "  {}  page {page_name} firing (default for: 2m; scrape and evaluation every 30 s)",
        at(page)
    )?;
    writeln!(timeline, "  condition: {message}")?;
    writeln!(timeline, "  alerts fired: {}", pages.list())?;
    writeln!(
        timeline,
        "  the incident: a non-paging alert after 8 min, a person after 6.5 h, the crashed worker's messages lost; \
         here: {} published, {} delivered, {} lost, {} duplicates",
        account.published, account.delivered, account.lost, account.duplicates
    )?;
    println!("{timeline}");

    ensure!(
        on_low.is_some(),
        "no worker was scheduled on {low}: nothing replayed\n{timeline}"
    );
    ensure!(exit3.is_some(), "the worker on {low} did not exit 3\n{timeline}");
    ensure!(
        degraded.is_some() && message.contains(&INCIDENT_NOFILE.1.to_string()),
        "the condition does not name {low} and its limit\n{timeline}"
    );
    let remedy = format!("raise containerd's LimitNOFILE on {low}");
    ensure!(
        message.contains(&remedy),
        "the condition does not say what to do ({remedy})\n{timeline}"
    );
    ensure!(excluded.is_some(), "{low} was never excluded\n{timeline}");
    ensure!(
        recovered.is_some(),
        "the fleet did not get back to 3 Ready workers\n{timeline}"
    );
    let page = page.with_context(|| format!("no page\n{timeline}"))?;
    ensure!(
        page - exit <= 300.0,
        "the page took more than 5 minutes\n{timeline}"
    );
    ensure!(
        pages.0.contains_key(&(page_name.to_string(), "page".to_string())),
        "{page_name} is not severity page\n{timeline}"
    );
    // The runbook the page links says in one line what to do.
    let runbook = hookfleet_e2e::tools::repo_root().join(format!("docs/runbooks/{page_name}.md"));
    let text = std::fs::read_to_string(&runbook).with_context(|| runbook.display().to_string())?;
    ensure!(
        text.contains("In one line: raise containerd's `LimitNOFILE`"),
        "{} has no one-line remedy",
        runbook.display()
    );
    s.drop_namespace(NS).await;
    let after = |t: Option<f64>| t.map_or("never".to_string(), |t| format!("{:.0} s", t - exit));
    Ok((
        Some(account),
        format!(
            "exit 3 on {low} {exit:.0} s after apply; then Degraded naming it {}, excluded {}, 3 Ready on the \
             other nodes {}, page (default for:) {}",
            after(degraded),
            after(excluded),
            after(recovered),
            after(Some(page))
        ),
    ))
}

/// `kubectl drain` of a node running workers, under load (module doc).
pub async fn drain(s: &Stack) -> Outcome {
    if let Err(skip) = nodes(s, 2).await? {
        return Ok((None, skip));
    }
    const NS: &str = "e2e-drain";
    const QUEUE: &str = "e2e.drain";
    let api = s.namespace(NS, "").await?;
    s.integration(&api, "dr", QUEUE, serde_json::json!({"workers": {"replicas": 3}}))
        .await?;
    s.ready_with_consumers(&api, "dr", 3).await?;
    let min_available = 2; // the PDB's default: replicas − 1
    s.sink.set_mode(Mode::delayed(200, Duration::from_millis(20)));
    let ids = messages::ids("drain", 9000);
    let publishing = s.publish_in_background(QUEUE, &ids, 300);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let running = s.running_pods(NS, "dr").await?;
    let victim = node_of(running.first().context("no running worker")?).to_string();
    let on_victim = running.iter().filter(|p| node_of(p) == victim).count();
    // Watch Ready workers while the node drains.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (pods, watching) = (Api::<Pod>::namespaced(s.client.clone(), NS), watching.clone());
        tokio::spawn(async move {
            let mut min = usize::MAX;
            let lp = kube::api::ListParams::default().labels("hookfleet.io/integration=dr");
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(list) = pods.list(&lp).await {
                    min = min.min(list.items.iter().filter(|p| is_ready(p)).count());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            min
        })
    };
    let t0 = Instant::now();
    let drained = s.kubectl(&[
        "drain",
        &victim,
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--timeout=240s",
    ]);
    let drain_took = t0.elapsed();
    let back = s.ready_with_consumers(&api, "dr", 3).await;
    let back_after = t0.elapsed();
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let min_ready = watcher.await?;
    let uncordoned = s.kubectl(&["uncordon", &victim]);
    let published = publishing.await?;
    let account = s.settle(QUEUE, &ids, 300).await;
    s.sink.set_mode(Mode::ok());
    drained?;
    back?;
    uncordoned?;
    published?;
    let account = account?;
    let left = s.running_pods(NS, "dr").await?;
    ensure!(
        left.iter().all(|p| node_of(p) != victim),
        "a worker still runs on the drained node {victim}"
    );
    ensure!(
        min_ready >= min_available,
        "{min_ready} Ready workers during the drain, below the PDB's minAvailable {min_available}"
    );
    s.drop_namespace(NS).await;
    Ok((
        Some(account),
        format!(
            "kubectl drain {victim} ({on_victim} of 3 workers there) took {:.1} s; 3 Ready again {:.1} s after it \
             began; fewest Ready workers seen {min_ready} (PDB minAvailable {min_available})",
            drain_took.as_secs_f64(),
            back_after.as_secs_f64()
        ),
    ))
}

/// A node running workers lost under load (module doc).
pub async fn node_loss(s: &Stack) -> Outcome {
    if let Err(skip) = nodes(s, 2).await? {
        return Ok((None, skip));
    }
    let cluster = s.cluster.as_ref().context("no local nodes")?;
    const NS: &str = "e2e-nodeloss";
    const QUEUE: &str = "e2e.nodeloss";
    let api = s.namespace(NS, "").await?;
    s.integration(&api, "nl", QUEUE, serde_json::json!({"workers": {"replicas": 3}}))
        .await?;
    s.ready_with_consumers(&api, "nl", 3).await?;
    s.sink.set_mode(Mode::delayed(200, Duration::from_millis(20)));
    let ids = messages::ids("nodeloss", 150 * 120);
    let publishing = s.publish_in_background(QUEUE, &ids, 150);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let running = s.running_pods(NS, "nl").await?;
    let victim = node_of(running.first().context("no running worker")?).to_string();
    let on_victim = running.iter().filter(|p| node_of(p) == victim).count();
    let index = {
        let mut c = cluster.lock().await;
        let index = c
            .nodes()
            .iter()
            .position(|n| n.name() == victim)
            .with_context(|| format!("{victim} is not a local node"))?;
        c.node_mut(index).kill_hard()?;
        index
    };
    let t0 = Instant::now();
    let nodes_api: Api<Node> = Api::all(s.client.clone());
    let pods_api: Api<Pod> = Api::namespaced(s.client.clone(), NS);
    let (mut fewer_consumers, mut not_consuming, mut not_ready, mut evicted, mut recovered) =
        (None, None, None, None, None);
    let deadline = t0 + Duration::from_secs(300);
    while Instant::now() < deadline && recovered.is_none() {
        let now = Instant::now();
        let i = api.get("nl").await?;
        let st = i.status.clone().unwrap_or_default();
        if fewer_consumers.is_none() && st.consumers.is_some_and(|c| c < 3) {
            fewer_consumers = Some(now);
        }
        if not_consuming.is_none() && cond(&i, "Degraded").1 == "NotConsuming" {
            not_consuming = Some(now);
        }
        let node = nodes_api.get(&victim).await?;
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.clone())
            .unwrap_or_default();
        if not_ready.is_none() && ready != "True" {
            not_ready = Some(now);
        }
        let pods = pods_api
            .list(&kube::api::ListParams::default().labels("hookfleet.io/integration=nl"))
            .await?
            .items;
        if evicted.is_none()
            && pods
                .iter()
                .any(|p| node_of(p) == victim && p.metadata.deletion_timestamp.is_some())
        {
            evicted = Some(now);
        }
        let elsewhere = pods
            .iter()
            .filter(|p| node_of(p) != victim && is_ready(p))
            .count();
        if elsewhere == 3 && st.consumers == Some(3) {
            recovered = Some(now);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The node comes back (its kubelet cleans up the evicted pods), then the account.
    let restarted = cluster.lock().await.node_mut(index).restart().await;
    let published = publishing.await?;
    let account = s.settle(QUEUE, &ids, 300).await;
    s.sink.set_mode(Mode::ok());
    restarted?;
    published?;
    let account = account?;
    let at = |t: Option<Instant>| t.map_or("never".to_string(), |t| format!("{:.1} s", secs(t, t0)));
    let note = format!(
        "{victim} killed ({on_victim} of 3 workers there): consumers < 3 at {}, Degraded NotConsuming at {}, node \
         NotReady at {}, its workers evicted at {}, 3 Ready workers consuming on the other nodes at {}",
        at(fewer_consumers),
        at(not_consuming),
        at(not_ready),
        at(evicted),
        at(recovered)
    );
    ensure!(recovered.is_some(), "the workers were not replaced: {note}");
    s.drop_namespace(NS).await;
    Ok((Some(account), note))
}
