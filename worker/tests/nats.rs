//! The NATS JetStream source (`--nats-url`), on a real `nats-server` with JetStream (one server, or a
//! 3-node JetStream cluster): what the worker does with the stream and the durable consumer, and the
//! fault table of the RabbitMQ source (`faults.rs`) replayed on NATS: kill -9, SIGTERM, a server
//! restart, a cluster node loss, a sink outage, a poison message, fd pressure. Each counts ids: every
//! published id reaches the sink at least once or sits in the dead-letter stream; duplicates are
//! counted (`fault-table:` lines).

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use async_nats::jetstream::{self, consumer, stream};
use common::*;
use hookfleet_crds::contract::exit;
use hookfleet_crds::contract::headers::{H_ATTEMPTS, H_DEAD_REASON, H_ID, H_LAST_ERROR};
use hookfleet_testkit::NatsServer;
use hookfleet_testkit::process::{free_port, wait_for};
use hookfleet_testkit::sink::{Mode, Sink};

const SUBJECT: &str = "orders.created";

async fn connect(nats: &NatsServer) -> Result<jetstream::Context> {
    let servers: Vec<async_nats::ServerAddr> = (0..nats.len())
        .map(|i| nats.url(i).parse())
        .collect::<Result<_, _>>()?;
    let client = async_nats::connect(servers).await?;
    Ok(jetstream::new(client))
}

/// The work stream `EVENTS` on `orders.>`, with `replicas`.
async fn work_stream(js: &jetstream::Context, replicas: usize) -> Result<()> {
    js.create_stream(stream::Config {
        name: "EVENTS".into(),
        subjects: vec!["orders.>".into()],
        num_replicas: replicas,
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Publishes one message per id to `SUBJECT` (`Nats-Msg-Id` = the id), each confirmed by JetStream.
async fn publish(js: &jetstream::Context, ids: &[String]) -> Result<()> {
    for chunk in ids.chunks(500) {
        let mut acks = Vec::new();
        for id in chunk {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", id.as_str());
            h.insert("Content-Type", "application/json");
            let body = format!(r#"{{"id":"{id}"}}"#);
            acks.push(js.publish_with_headers(SUBJECT, h, body.into()).await?);
        }
        for a in acks {
            a.await?;
        }
    }
    Ok(())
}

/// Every message of the dead-letter stream: (its `x-hookfleet-id`, its headers).
async fn dead_letters(js: &jetstream::Context, stream: &str) -> Result<Vec<(String, async_nats::HeaderMap)>> {
    Ok(hookfleet_testkit::nats::stream_headers(js, stream)
        .await?
        .into_iter()
        .map(|h| {
            let id = h.get(H_ID).map(|v| v.as_str().to_owned()).unwrap_or_default();
            (id, h)
        })
        .collect())
}

fn dead_ids(dead: &[(String, async_nats::HeaderMap)]) -> HashSet<String> {
    dead.iter().map(|(id, _)| id.clone()).collect()
}

/// (messages not yet delivered, delivered and not acked) of the durable consumer.
async fn backlog(js: &jetstream::Context, consumer: &str) -> Result<(u64, usize)> {
    let s = js.get_stream("EVENTS").await?;
    let i = s.consumer_info(consumer).await?;
    Ok((i.num_pending, i.num_ack_pending))
}

/// Waits until the durable consumer has nothing pending or unacked.
async fn wait_settled(js: &jetstream::Context, consumer: &str, timeout: Duration) -> Result<()> {
    wait_for(
        "the consumer settled",
        timeout,
        Duration::from_millis(100),
        || async move { Ok((backlog(js, consumer).await? == (0, 0)).then_some(())) },
    )
    .await
}

/// What every scenario starts from: a server (or a JetStream cluster of `nodes`, the stream replicated
/// on each), the work stream, a sink answering `mode`, and `n` ids `<prefix>-i` published.
struct Scene {
    nats: NatsServer,
    js: jetstream::Context,
    dir: tempfile::TempDir,
    sink: Sink,
    published: Vec<String>,
}

async fn scene(nodes: usize, prefix: &str, n: usize, mode: Mode) -> Result<Scene> {
    let nats = NatsServer::start_cluster(nodes).await?;
    let js = connect(&nats).await?;
    work_stream(&js, nodes).await?;
    let sink = Sink::start().await?;
    sink.set_mode(mode);
    let published = ids(prefix, n);
    publish(&js, &published).await?;
    Ok(Scene {
        nats,
        js,
        dir: tempfile::tempdir()?,
        sink,
        published,
    })
}

/// Every id delivered (2xx at the sink), then the consumer settled: the scenario's `fault-table:` row,
/// with none lost.
async fn all_delivered(sc: &Scene, scenario: &str, timeout: Duration) -> Result<FaultRow> {
    let want: HashSet<String> = sc.published.iter().cloned().collect();
    sc.sink.wait_delivered(&want, timeout).await?;
    wait_settled(&sc.js, "hooks", Duration::from_secs(60)).await?;
    let dead = dead_letters(&sc.js, "hooks-dead").await?;
    let row = fault_table(scenario, &sc.published, &sc.sink.delivered(), &dead_ids(&dead), 0);
    assert_eq!(row.lost, 0);
    Ok(row)
}

fn source(nats: &NatsServer) -> Vec<String> {
    [
        "--nats-url".to_owned(),
        nats.urls(),
        "--nats-stream".into(),
        "EVENTS".into(),
    ]
    .to_vec()
}

async fn start(nats: &NatsServer, sink: &Sink, extra: &[&str], dir: &Path, log: &str) -> Result<Worker> {
    let src = source(nats);
    let src: Vec<&str> = src.iter().map(String::as_str).collect();
    start_worker_source(&src, "hooks", &sink.url(), extra, &[], dir, log).await
}

async fn wait_count(sink: &Sink, n: usize, timeout: Duration) -> Result<()> {
    wait_for("deliveries", timeout, Duration::from_millis(20), || {
        let got = sink.delivered().len();
        async move { Ok((got >= n).then_some(())) }
    })
    .await
}

/// Ack after a 2xx, retries as JetStream naks with the backoff's delay, a message that never succeeds
/// dead-lettered (confirmed by JetStream) and terminated; the consumer the worker created; the
/// accounting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_retries_by_nak_and_dead_letters_with_a_pub_ack() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    // Every other request fails: about half the messages are retried at least once.
    let flaky = Mode::Flaky {
        status: 503,
        failures: 1,
        delay: Duration::ZERO,
    };
    let Scene {
        nats,
        js,
        dir,
        sink,
        published,
    } = scene(1, "n1", 200, flaky).await?;
    let poison = published[7].clone();
    sink.set_poison(Some(&poison));
    // 20 attempts: an id the alternating sink fails 20 times in a row is a one-in-a-million event; the
    // poison message, never answered, times out on each.
    let args = [
        "--max-attempts",
        "20",
        "--backoff-initial",
        "200ms",
        "--backoff-max",
        "200ms",
        "--backoff-jitter",
        "none",
        "--timeout",
        "300ms",
        "--circuit-breaker-threshold",
        "0",
    ];
    let t0 = Instant::now();
    let w = start(&nats, &sink, &args, dir.path(), "worker").await?;
    let want: HashSet<String> = published.iter().filter(|id| **id != poison).cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(60)).await?;
    wait_settled(&js, "hooks", Duration::from_secs(30)).await?;
    let took = t0.elapsed();

    // The poison message: 20 attempts, then one dead letter naming why, and the original terminated.
    let dead = dead_letters(&js, "hooks-dead").await?;
    ensure!(dead.len() == 1, "dead letters: {:?}", dead_ids(&dead));
    let (id, h) = &dead[0];
    assert_eq!(id, &poison);
    assert_eq!(h.get(H_ATTEMPTS).map(|v| v.as_str()), Some("20"));
    assert_eq!(
        h.get(H_DEAD_REASON).map(|v| v.as_str()),
        Some("attempts_exhausted")
    );
    assert_eq!(sink.poison_arrivals(), 20, "one request per attempt");

    // Retried by nak with the delay: the second attempt of a retried id came at least the backoff's
    // 200 ms (no jitter) after the first.
    let attempts = sink.attempts();
    let retried: Vec<Duration> = attempts
        .iter()
        .filter(|(id, a)| **id != poison && a.len() >= 2)
        .map(|(_, a)| a[1] - a[0])
        .collect();
    ensure!(retried.len() > 50, "only {} ids retried", retried.len());
    let fastest = retried.iter().min().copied().unwrap_or_default();
    assert!(fastest >= Duration::from_millis(190), "a retry after {fastest:?}");

    let consumer = js.get_stream("EVENTS").await?.consumer_info("hooks").await?;
    assert_eq!(consumer.config.ack_policy, consumer::AckPolicy::Explicit);
    assert_eq!(consumer.config.max_deliver, 21, "--max-attempts + 1");
    let a = settled_accounting(&w).await?;
    assert_eq!(a.dead_lettered, 1.0);
    assert_eq!(a.delivered, 199.0);
    let dups = account(&published, &sink.delivered(), &dead_ids(&dead))?;
    eprintln!(
        "nats: 200 published, 199 delivered, {} retried at least once (fastest second attempt {fastest:?}), \
         poison dead-lettered after 20 attempts, {dups} duplicates, in {took:?}; accounting {a:?}",
        retried.len()
    );
    Ok(())
}

/// What is missing or wrong is named, and the worker exits instead of retrying: no stream (exit 6), a
/// dead-letter subject the work stream captures (exit 4), `--topology external` without the consumer
/// (exit 6); a bad flag is refused at start (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_or_consumer_and_a_looping_dead_letter_subject_are_refused() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let nats = NatsServer::start().await?;
    let js = connect(&nats).await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    let run = |extra: Vec<String>| {
        let mut args = base_args_source(
            &["--nats-url", &nats.urls(), "--nats-stream", "EVENTS"],
            "hooks",
            &sink.url(),
            0,
            dir.path(),
        );
        args.extend(extra);
        let out = std::process::Command::new(worker_bin()).args(&args).output();
        let term = std::fs::read_to_string(dir.path().join("termination-log")).unwrap_or_default();
        out.map(|o| {
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
                term,
            )
        })
    };
    let (code, _, term) = run(vec![])?;
    assert_eq!(code, Some(exit::QUEUES_MISSING), "{term}");
    assert!(term.contains("stream EVENTS"), "{term}");
    eprintln!("no stream: exit {code:?}: {term}");

    work_stream(&js, 1).await?;
    let (code, _, term) = run(vec!["--dead-letter-queue".into(), "orders.dead".into()])?;
    assert_eq!(code, Some(exit::QUEUE_MISMATCH), "{term}");
    assert!(term.contains("captured by the work stream EVENTS"), "{term}");
    eprintln!("looping dead letters: exit {code:?}: {term}");

    let (code, _, term) = run(vec!["--topology".into(), "external".into()])?;
    assert_eq!(code, Some(exit::QUEUES_MISSING), "{term}");
    assert!(term.contains("durable consumer hooks on stream EVENTS"), "{term}");
    assert!(
        term.contains("dead-letter subject hookfleet.dead.hooks"),
        "{term}"
    );
    eprintln!("external, nothing there: exit {code:?}: {term}");

    let (code, stderr, _) = run(vec!["--binding".into(), "ex=rk".into()])?;
    assert_eq!(code, Some(exit::INVALID_CONFIG), "{stderr}");
    assert!(stderr.contains("no bindings"), "{stderr}");
    Ok(())
}

/// kill -9 of a worker mid-stream, then another: every id delivered; duplicates (the killed worker's
/// in-flight messages, redelivered after AckWait) counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_kill_9_mid_stream_loses_nothing() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 2000;
    let sc = scene(1, "nk", N, Mode::delayed(200, Duration::from_millis(5))).await?;
    let args = ["--concurrency", "32", "--prefetch", "64", "--nats-ack-wait", "3s"];
    let mut w = start(&sc.nats, &sc.sink, &args, sc.dir.path(), "worker-1").await?;
    wait_count(&sc.sink, N / 4, Duration::from_secs(60)).await?;
    w.process.kill();
    let at_kill = sc.sink.delivered().len();
    assert!(at_kill < N, "the kill came too late to be mid-stream");
    let t = Instant::now();
    let w2 = start(&sc.nats, &sc.sink, &args, sc.dir.path(), "worker-2").await?;
    all_delivered(&sc, "nats-kill-9-worker", Duration::from_secs(120)).await?;
    settled_accounting(&w2).await?;
    eprintln!(
        "nats kill -9: {at_kill} delivered at the kill, the rest {:?} after the restart",
        t.elapsed()
    );
    Ok(())
}

/// SIGTERM under load: in-flight deliveries finish and are acked, the rest are nak'd back at once, the
/// worker exits 0; a second worker delivers the rest without a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_sigterm_drains_and_hands_back() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let sc = scene(1, "nt", 400, Mode::delayed(200, Duration::from_millis(300))).await?;
    // AckWait 60 s: a message not handed back at shutdown would wait a minute for the second worker.
    let args = [
        "--concurrency",
        "16",
        "--prefetch",
        "32",
        "--nats-ack-wait",
        "60s",
        "--shutdown-grace",
        "10s",
    ];
    let w = start(&sc.nats, &sc.sink, &args, sc.dir.path(), "worker-1").await?;
    wait_count(&sc.sink, 40, Duration::from_secs(30)).await?;
    let t = Instant::now();
    w.process.signal(nix::sys::signal::Signal::SIGTERM)?;
    wait_for(
        "worker exit",
        Duration::from_secs(15),
        Duration::from_millis(20),
        || {
            let done = w.process.exited();
            async move { Ok(done.then_some(())) }
        },
    )
    .await?;
    let drain_took = t.elapsed();
    let log = std::fs::read_to_string(sc.dir.path().join("worker-1.log"))?;
    ensure!(
        log.contains("handed the unsettled messages back to JetStream"),
        "{log}"
    );
    sc.sink.set_mode(Mode::ok());
    let t2 = Instant::now();
    let w2 = start(&sc.nats, &sc.sink, &args, sc.dir.path(), "worker-2").await?;
    let row = all_delivered(&sc, "nats-sigterm-under-load", Duration::from_secs(30)).await?;
    let rest = t2.elapsed();
    assert_eq!(
        row.duplicates, 0,
        "every in-flight delivery was acked before the exit"
    );
    assert!(
        rest < Duration::from_secs(30),
        "the rest waited for AckWait: {rest:?}"
    );
    settled_accounting(&w2).await?;
    eprintln!("nats SIGTERM: exited in {drain_took:?}; the second worker delivered the rest in {rest:?}");
    Ok(())
}

/// The server stopped and started again mid-stream (same store): the worker turns not ready,
/// reconnects and delivers everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_server_restart_mid_stream() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 1000;
    let mut sc = scene(1, "nr", N, Mode::delayed(200, Duration::from_millis(5))).await?;
    let args = ["--concurrency", "16", "--nats-ack-wait", "5s"];
    let w = start(&sc.nats, &sc.sink, &args, sc.dir.path(), "worker").await?;
    wait_count(&sc.sink, N / 4, Duration::from_secs(60)).await?;
    sc.nats.stop_node(0);
    let down = Instant::now();
    w.wait_ready(false, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    sc.nats.start_node(0).await?;
    w.wait_ready(true, Duration::from_secs(60)).await?;
    let back = down.elapsed();
    sc.js = connect(&sc.nats).await?;
    all_delivered(&sc, "nats-server-restart", Duration::from_secs(120)).await?;
    w.process.check_running()?;
    settled_accounting(&w).await?;
    eprintln!("nats server restart: ready again {back:?} after the stop");
    Ok(())
}

/// A 3-node JetStream cluster, the stream and the consumer replicated 3 times: kill -9 of the stream's
/// leader under load; two workers deliver everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_cluster_node_loss() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 2000;
    let mut sc = scene(3, "nc", N, Mode::delayed(200, Duration::from_millis(5))).await?;
    let args = ["--concurrency", "16", "--nats-ack-wait", "5s"];
    let w1 = start(&sc.nats, &sc.sink, &args, sc.dir.path(), "worker-1").await?;
    let w2 = start(&sc.nats, &sc.sink, &args, sc.dir.path(), "worker-2").await?;
    wait_count(&sc.sink, N / 4, Duration::from_secs(60)).await?;
    let leader = sc
        .js
        .get_stream("EVENTS")
        .await?
        .info()
        .await?
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .context("the stream has a leader")?;
    let i: usize = leader.trim_start_matches("hookfleet-n").parse::<usize>()? - 1;
    sc.nats.kill_node(i);
    let killed = Instant::now();
    // The test's own client moves to a node that is up.
    sc.js = jetstream::new(async_nats::connect(sc.nats.url((i + 1) % 3)).await?);
    all_delivered(&sc, "nats-cluster-leader-kill-9", Duration::from_secs(180)).await?;
    let all_in = killed.elapsed();
    w1.process.check_running()?;
    w2.process.check_running()?;
    sc.nats.start_node(i).await?;
    eprintln!(
        "nats cluster: killed the stream leader {leader}; every id delivered and settled {all_in:?} after the kill"
    );
    Ok(())
}

/// The sink down (503) for 4 s, then back: everything delivered after retries, nothing dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_sink_outage() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let sc = scene(1, "no", 500, Mode::status(503)).await?;
    let args = [
        "--max-attempts",
        "50",
        "--backoff-initial",
        "200ms",
        "--backoff-max",
        "1s",
    ];
    let w = start(&sc.nats, &sc.sink, &args, sc.dir.path(), "worker").await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = sc.sink.requests();
    sc.sink.set_mode(Mode::ok());
    let row = all_delivered(&sc, "nats-sink-outage-4s", Duration::from_secs(60)).await?;
    assert_eq!(row.dead_lettered, 0);
    let a = settled_accounting(&w).await?;
    assert!(a.retried > 0.0, "{a:?}");
    eprintln!("nats sink outage: {during} requests refused during the 4 s outage; accounting {a:?}");
    Ok(())
}

/// Under a 256 descriptor limit with a sink that stalls every connection: the worker keeps its
/// descriptors under the limit, does not crash, and delivers everything once the sink recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_stalling_sink_under_a_low_fd_limit() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let sc = scene(1, "nf", 500, Mode::Stall).await?;
    let port = free_port()?;
    let src = source(&sc.nats);
    let src: Vec<&str> = src.iter().map(String::as_str).collect();
    let mut args = base_args_source(&src, "hooks", &sc.sink.url(), port, sc.dir.path());
    args.extend(STALLING_SINK_FLAGS.map(String::from));
    let w = start_worker_limited(256, args, port, sc.dir.path()).await?;
    let mut peak = 0;
    let stall_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < stall_until {
        peak = peak.max(w.open_fds().context("worker gone")?);
        w.process.check_running()?;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(peak < 256, "open descriptors reached {peak} of 256");
    sc.sink.set_mode(Mode::ok());
    let row = all_delivered(&sc, "nats-stalling-sink-fd-limit-256", Duration::from_secs(60)).await?;
    assert_eq!(row.dead_lettered, 0);
    w.process.check_running()?;
    settled_accounting(&w).await?;
    eprintln!("nats fd pressure: peak open fds {peak} (limit 256)");
    Ok(())
}

/// A message the sink never answers (poison): dead-lettered after --max-attempts, with the delivery
/// count; a worker killed during its last attempt does not make JetStream drop it: the spare delivery
/// (MaxDeliver = attempts + 1) dead-letters it unattempted (`delivery_limit`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_poison_message_is_dead_lettered_even_when_its_last_attempt_kills_the_worker() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let Scene {
        nats,
        js,
        dir,
        sink,
        published,
    } = scene(1, "np", 20, Mode::ok()).await?;
    let poison = published[3].clone();
    sink.set_poison(Some(&poison));
    // 3 attempts of 2 s each against a sink that never answers it; AckWait 3 s.
    let args = [
        "--max-attempts",
        "3",
        "--timeout",
        "2s",
        "--backoff-initial",
        "100ms",
        "--backoff-max",
        "100ms",
        "--nats-ack-wait",
        "3s",
    ];
    let mut w = start(&nats, &sink, &args, dir.path(), "worker-1").await?;
    // Kill the worker during the third (last) attempt.
    wait_for(
        "the third attempt",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || {
            let n = sink.poison_arrivals();
            async move { Ok((n >= 3).then_some(())) }
        },
    )
    .await?;
    w.process.kill();
    let w2 = start(&nats, &sink, &args, dir.path(), "worker-2").await?;
    let dead = wait_for(
        "the dead letter",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let js = js.clone();
            async move {
                let d = dead_letters(&js, "hooks-dead").await?;
                Ok((!d.is_empty()).then_some(d))
            }
        },
    )
    .await?;
    assert_eq!(dead.len(), 1);
    let (id, h) = &dead[0];
    assert_eq!(id, &poison);
    assert_eq!(
        h.get(H_LAST_ERROR).map(|v| v.as_str()),
        Some("delivery_limit"),
        "{h:?}"
    );
    let why = h
        .get(H_DEAD_REASON)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    assert!(why.contains("redelivered 3 times"), "{why}");
    assert_eq!(sink.poison_arrivals(), 3, "the spare delivery is not attempted");
    let want: HashSet<String> = published.iter().filter(|id| **id != poison).cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(30)).await?;
    wait_settled(&js, "hooks", Duration::from_secs(30)).await?;
    let row = fault_table(
        "nats-poison-message",
        &published,
        &sink.delivered(),
        &dead_ids(&dead),
        0,
    );
    assert_eq!(row.lost, 0);
    settled_accounting(&w2).await?;
    Ok(())
}

/// Webhooks on a NATS source (the snapshot Secret on a real API server): each message goes to every
/// Webhook matching its subject; a Webhook's failed copy is retried alone, as a JetStream message
/// schedule on the retry stream fired to the retry lane at its due time, so that another Webhook never
/// sees the message twice; a Webhook that never answers 2xx gets its copies dead-lettered after its
/// attempts, naming it; scheduled copies outlive a kill -9 of the worker; the reports reach the
/// reports stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_retry_each_copy_alone_through_schedules_and_report() -> Result<()> {
    use hookfleet_crds::contract::webhooks::{Entry, H_WEBHOOK, Report, Snapshot};
    use hookfleet_testkit::control_plane::ControlPlane;
    use k8s_openapi::api::core::v1::Secret;
    use std::collections::{BTreeMap, HashMap};

    init();
    let _serial = SERIAL.lock().await;
    let t0 = Instant::now();
    let nats = NatsServer::start().await?;
    let js = connect(&nats).await?;
    work_stream(&js, 1).await?;
    let cp = ControlPlane::start().await?;
    cp.create_namespace("fleet-ns").await?;
    let secrets: kube::Api<Secret> = kube::Api::namespaced(cp.client(), "fleet-ns");
    let kubeconfig = cp.kubeconfig().display().to_string();
    // `ok` answers at once; `flaky` fails every other request; `down` never answers 2xx.
    let mut sinks = HashMap::new();
    for (name, mode) in [
        ("ok", Mode::ok()),
        ("flaky", Mode::flaky(503, 1, Duration::ZERO)),
        ("down", Mode::status(503)),
    ] {
        let sink = Sink::start().await?;
        sink.set_mode(mode);
        sinks.insert(name, sink);
    }
    let snapshot = Snapshot {
        webhooks: ["ok", "flaky", "down"]
            .into_iter()
            .map(|name| Entry {
                name: name.into(),
                generation: 1,
                events: vec!["orders.".into()],
                match_headers: BTreeMap::new(),
                paused: false,
                destination: serde_json::from_value(serde_json::json!({"url": sinks[name].url()})).unwrap(),
                secrets: BTreeMap::new(),
                max_in_flight: None,
                rate_limit: None,
            })
            .collect(),
    };
    put_snapshot(&secrets, "fleet-webhooks", &snapshot).await?;
    let published = ids("wh", 60);
    publish(&js, &published).await?;
    // What each Webhook's sink sees: the webhook-id of (message, Webhook).
    let want_of =
        |hook: &str| -> HashSet<String> { published.iter().map(|id| format!("{id}:{hook}")).collect() };
    let dir = tempfile::tempdir()?;
    let w = WebhooksWorker {
        kubeconfig: &kubeconfig,
        integration: "fleet-ns/fleet",
        queue: "hooks",
        secret: "fleet-webhooks",
        unmatched: "ack",
        concurrency: 16,
        nofile: None,
    };
    // AckWait 3 s: what the kill -9 left unacked comes back soon. Two subject filters on the work
    // consumer: the retry lane's consumer filters its own subject alone all the same.
    let extra = [
        "--max-attempts",
        "6",
        "--circuit-breaker-threshold",
        "0",
        "--nats-ack-wait",
        "3s",
        "--nats-subject",
        SUBJECT,
        "--nats-subject",
        "orders.cancelled",
    ];
    let worker = spawn_webhooks_worker_source(&source(&nats), &w, dir.path(), "worker-a", &extra)?;
    worker.wait_ready(true, Duration::from_secs(30)).await?;
    eprintln!(
        "nats webhooks: server, API server and worker up in {:?}",
        t0.elapsed()
    );

    // Every `ok` copy delivered while the other two Webhooks' retries wait on the retry stream.
    sinks["ok"]
        .wait_delivered(&want_of("ok"), Duration::from_secs(30))
        .await?;
    let retry = js.get_stream("hooks-retry").await?;
    ensure!(
        retry.cached_info().config.allow_message_schedules,
        "the worker created the retry stream with message schedules"
    );
    ensure!(
        retry
            .cached_info()
            .config
            .metadata
            .get("hookfleet.io/work-stream")
            .map(String::as_str)
            == Some("EVENTS"),
        "the retry stream names its work stream: {:?}",
        retry.cached_info().config.metadata
    );
    // kill -9 with copies scheduled: they are the server's, not the worker's.
    let mut worker = worker;
    worker.process.kill();
    let scheduled = js.get_stream("hooks-retry").await?.info().await?.state.messages;
    // Dead letters from here on are the next worker's (its reports count them).
    let dead_at_kill = dead_letters(&js, "hooks-dead").await?.len() as u64;
    let worker = spawn_webhooks_worker_source(&source(&nats), &w, dir.path(), "worker-b", &extra)?;
    worker.wait_ready(true, Duration::from_secs(30)).await?;
    // Every `down` copy dead-lettered after its attempts; every `flaky` copy delivered, or (when it
    // met 6 failures in a row, which its sink's pattern allows) dead-lettered too.
    let flaky_want = want_of("flaky");
    wait_for(
        "every copy settled",
        Duration::from_secs(90),
        Duration::from_millis(200),
        || {
            let js = js.clone();
            let flaky = sinks["flaky"].delivered();
            let flaky_want = &flaky_want;
            async move {
                let dead = dead_letters(&js, "hooks-dead").await.unwrap_or_default();
                let of = |hook: &str| -> HashSet<String> {
                    dead.iter()
                        .filter(|(_, h)| h.get(H_WEBHOOK).map(|v| v.as_str()) == Some(hook))
                        .map(|(id, _)| format!("{id}:{hook}"))
                        .collect()
                };
                let flaky_done = flaky_want
                    .iter()
                    .all(|i| flaky.contains_key(i) || of("flaky").contains(i));
                Ok((of("down").len() == 60 && flaky_done).then_some(()))
            }
        },
    )
    .await?;
    wait_settled(&js, "hooks", Duration::from_secs(30)).await?;
    wait_for(
        "the retry stream drained",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let js = js.clone();
            async move {
                let s = js.get_stream("hooks-retry").await?;
                let i = s.consumer_info("hooks-retry").await?;
                let n = s.cached_info().state.messages;
                Ok((n == 0 && i.num_pending == 0 && i.num_ack_pending == 0).then_some(()))
            }
        },
    )
    .await?;
    // Every copy settled: the dead letters are all made.
    let dead = dead_letters(&js, "hooks-dead").await?;

    // Isolation: the retries of `flaky` and `down` never brought a message back to `ok`, except what
    // the kill -9 handed back (an original unacked at the kill goes to every Webhook again).
    let ok = sinks["ok"].delivered();
    let ok_dups: usize = ok.values().map(|n| n - 1).sum();
    ensure!(
        ok.keys().cloned().collect::<HashSet<_>>() == want_of("ok"),
        "ok got exactly the published ids"
    );
    ensure!(
        ok_dups <= 16,
        "{ok_dups} duplicates at ok: more than the originals in flight at the kill"
    );
    // Every dead letter is a Webhook's copy after its 6 attempts: each of `down`'s, and `flaky`'s only if
    // it was not delivered.
    let flaky = sinks["flaky"].delivered();
    let mut pairs = HashSet::new();
    for (id, h) in &dead {
        ensure!(h.get(H_ATTEMPTS).map(|v| v.as_str()) == Some("6"), "{id}: {h:?}");
        let hook = h
            .get(H_WEBHOOK)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        ensure!(
            hook == "down" || hook == "flaky",
            "{id}: a dead letter for {hook:?}"
        );
        if hook == "flaky" {
            ensure!(
                !flaky.contains_key(&format!("{id}:flaky")),
                "{id}: delivered and dead-lettered"
            );
        }
        pairs.insert(format!("{id}:{hook}"));
    }
    let flaky_dead = pairs.iter().filter(|p| p.ends_with(":flaky")).count();
    // A copy twice in the dead letters: its original was unacked at the kill, fanned out again.
    let dead_dups = dead.len() - pairs.len();
    ensure!(
        dead_dups <= 16,
        "{dead_dups} duplicate dead letters: more than the originals in flight at the kill"
    );
    ensure!(
        sinks["down"].requests() as usize <= 6 * 60 + 16,
        "at most 6 attempts per copy (and the kill's)"
    );

    // The reports: what the second worker saw of each Webhook, on the reports stream (no operator reads
    // it here; the first worker's tallies died with it), add up to the dead letters it made.
    let made = dead.len() as u64 - dead_at_kill;
    let totals = wait_for(
        "the reports",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || {
            let js = js.clone();
            async move {
                let mut s = js.get_stream("hooks-reports").await?;
                let n = s.info().await?.state.last_sequence;
                let mut totals: HashMap<String, (u64, u64)> = HashMap::new();
                for seq in 1..=n {
                    let Ok(m) = s.get_raw_message(seq).await else {
                        continue;
                    };
                    let r: Report = serde_json::from_slice(&m.payload)?;
                    if r.worker != "worker-b" {
                        continue;
                    }
                    for (name, t) in r.webhooks {
                        let e = totals.entry(name).or_default();
                        e.0 += t.delivered;
                        e.1 += t.dead_lettered;
                    }
                }
                let dead: u64 = totals.values().map(|t| t.1).sum();
                Ok((dead == made && totals.contains_key("flaky")).then_some(totals))
            }
        },
    )
    .await?;
    let m = worker.metrics().await?;
    eprintln!(
        "nats webhooks: 60 messages × 3 Webhooks; {scheduled} copies scheduled at the kill -9; ok {} delivered ({ok_dups} duplicates), flaky {} delivered and {flaky_dead} dead-lettered after {} requests, down {} dead-lettered after {} requests ({dead_dups} duplicate dead letters); reports {totals:?}; in {:?}",
        ok.len(),
        flaky.len(),
        sinks["flaky"].requests(),
        pairs.len() - flaky_dead,
        sinks["down"].requests(),
        t0.elapsed()
    );
    ensure!(
        m.lines()
            .any(|l| l.starts_with("hookfleet_webhook_reports_total") && l.contains("result=\"ok\"")),
        "{m}"
    );

    // Retry streams the worker refuses at start rather than retry a Webhook's copy some other way: one
    // without message schedules (made by hand, or by a server older than 2.12), and another Integration's
    // (the same consumer name on another work stream: stream names are the account's, so it would be shared).
    let plain = stream::Config {
        name: "plain-retry".into(),
        subjects: vec!["hookfleet.sched.plain.>".into(), "hookfleet.retry.plain".into()],
        ..Default::default()
    };
    let twin = stream::Config {
        name: "twin-retry".into(),
        subjects: vec!["hookfleet.sched.twin.>".into(), "hookfleet.retry.twin".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        allow_message_schedules: true,
        metadata: [("hookfleet.io/work-stream".to_owned(), "INVOICES".to_owned())].into(),
        ..Default::default()
    };
    for (queue, retry, refusal) in [
        (
            "plain",
            plain,
            "stream plain-retry does not allow message schedules",
        ),
        (
            "twin",
            twin,
            "stream twin-retry holds the Webhook retries of consumer twin on the work stream INVOICES, not on EVENTS",
        ),
    ] {
        js.create_stream(retry).await?;
        let log = format!("worker-{queue}");
        let refused = spawn_webhooks_worker_source(
            &source(&nats),
            &WebhooksWorker { queue, ..w },
            dir.path(),
            &log,
            &extra,
        )?;
        wait_for(
            "the worker to exit",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                let exited = refused.process.exited();
                async move { Ok(exited.then_some(())) }
            },
        )
        .await?;
        let term = std::fs::read_to_string(dir.path().join(format!("{log}.termination-log")))?;
        ensure!(term.contains(refusal), "{term}");
        ensure!(
            js.get_stream(format!("{queue}-retry"))
                .await?
                .info()
                .await?
                .state
                .messages
                == 0,
            "nothing was scheduled on the refused retry stream {queue}-retry"
        );
        eprintln!("nats webhooks: retry stream {queue}-retry refused: {term}");
    }
    Ok(())
}
