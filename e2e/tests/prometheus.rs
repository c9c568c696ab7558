//! The Prometheus harness on live metrics: a real Prometheus (Debian's binary) scrapes a stub target and
//! evaluates the chart's rules as `helm template` renders them, with `for:` shortened to 2s through the
//! chart's values (the defaults are minutes). The stub first shows a worker at 90% of its fd limit and a
//! fleet with fewer consumers than Ready workers; both alerts must fire, then resolve once the stub shows a
//! healthy fleet. A suspended Integration with the same symptoms (`spec.suspend`: its workers on their way
//! out) fires neither.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use hookfleet_e2e::chart;
use hookfleet_e2e::prometheus::{Prometheus, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `body` (changeable) as `/metrics` on a loopback port until dropped.
struct StubTarget {
    addr: std::net::SocketAddr,
    body: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl StubTarget {
    async fn start(body: &str) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let body = Arc::new(Mutex::new(body.to_owned()));
        let shared = body.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let text = shared.lock().unwrap().clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                        text.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        Ok(Self { addr, body, task })
    }

    fn set(&self, body: &str) {
        *self.body.lock().unwrap() = body.to_owned();
    }
}

impl Drop for StubTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const SICK: &str = r#"hookfleet_open_fds{integration="team-a/orders"} 930
hookfleet_max_fds{integration="team-a/orders"} 1024
hookfleet_operator_integration_ready_workers{integration="team-a/orders"} 2
hookfleet_operator_integration_consumers{integration="team-a/orders"} 1
hookfleet_operator_integration_suspended{integration="team-a/orders"} 0
hookfleet_open_fds{integration="team-a/held"} 930
hookfleet_max_fds{integration="team-a/held"} 1024
hookfleet_operator_integration_ready_workers{integration="team-a/held"} 2
hookfleet_operator_integration_consumers{integration="team-a/held"} 0
hookfleet_operator_integration_suspended{integration="team-a/held"} 1
"#;

const HEALTHY: &str = r#"hookfleet_open_fds{integration="team-a/orders"} 40
hookfleet_max_fds{integration="team-a/orders"} 1024
hookfleet_operator_integration_ready_workers{integration="team-a/orders"} 2
hookfleet_operator_integration_consumers{integration="team-a/orders"} 2
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_alerts_fire_and_resolve_on_a_live_prometheus() -> Result<()> {
    hookfleet_e2e::init_tracing();
    let home = tempfile::tempdir()?;
    let dir = tempfile::tempdir()?;
    let rules = chart::rules_file(
        home.path(),
        dir.path(),
        &[
            "--set",
            "prometheusRule.alerts.FileDescriptorsHigh.for=2s",
            "--set",
            "prometheusRule.alerts.ConsumersBelowReadyWorkers.for=2s",
        ],
    )?;
    let stub = StubTarget::start(SICK).await?;
    let prom = Prometheus::start(&[Target::new("stub", [stub.addr.to_string()])], Some(&rules)).await?;

    let t0 = Instant::now();
    let fds = prom
        .wait_firing("HookfleetFileDescriptorsHigh", Duration::from_secs(60))
        .await?;
    assert_eq!(fds.labels["severity"], "page");
    assert_eq!(fds.labels["integration"], "team-a/orders");
    assert!(fds.annotations["runbook_url"].ends_with("/HookfleetFileDescriptorsHigh.md"));
    let consumers = prom
        .wait_firing("HookfleetConsumersBelowReadyWorkers", Duration::from_secs(60))
        .await?;
    assert_eq!(consumers.labels["integration"], "team-a/orders");
    let fired = t0.elapsed();
    eprintln!("both alerts firing {fired:?} after Prometheus started");
    let value = prom
        .query(
            r#"hookfleet_open_fds{job="stub",integration="team-a/orders"} / hookfleet_max_fds{job="stub"}"#,
        )
        .await?;
    assert_eq!(value[0]["value"][1], "0.908203125");
    // The suspended one pages no one (nor is anything pending), though its series are the same.
    let held = prom.query(r#"ALERTS{integration="team-a/held"}"#).await?;
    assert_eq!(held, serde_json::json!([]), "a suspended Integration alerts");

    stub.set(HEALTHY);
    prom.wait_not_firing("HookfleetFileDescriptorsHigh", Duration::from_secs(60))
        .await?;
    prom.wait_not_firing("HookfleetConsumersBelowReadyWorkers", Duration::from_secs(60))
        .await?;
    eprintln!("both alerts resolved {:?} after recovery", t0.elapsed() - fired);
    Ok(())
}
