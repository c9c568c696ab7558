//! Fault scenarios of issue 3 (run them with `make test-worker-faults`): kill -9 of the worker mid-stream
//! (2), a broker restart mid-stream (3), a stalling endpoint under a low descriptor limit and a limit
//! the concurrency cannot fit (6), and SIGTERM under load (7). Each counts ids: every published id
//! reaches the sink at least once or sits in the dead-letter queue; duplicates are reported.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::*;
use hookfleet_crds::integration::QueueType;
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::process::{Process, free_port, wait_for};
use hookfleet_testkit::sink::{Mode, Sink};

async fn wait_count(sink: &Sink, n: usize, timeout: Duration) -> Result<()> {
    wait_for("deliveries", timeout, Duration::from_millis(20), || {
        let got = sink.delivered().len();
        async move { Ok((got >= n).then_some(())) }
    })
    .await
}

fn dead_ids(dead: &[DeadLetter]) -> HashSet<String> {
    dead.iter().map(|d| d.id.clone()).collect()
}

/// Scenario 2: kill -9 of the worker in the middle of the stream, then a new worker: all N delivered;
/// duplicates (messages in flight at the kill) are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_kill_9_mid_stream_loses_nothing() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 2000;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    sink.set_mode(Mode::delayed(200, Duration::from_millis(5)));
    let published = ids("s2", N);
    publish(&rmq, "s2.q", &published).await?;
    let args = ["--concurrency", "32", "--prefetch", "64"];
    let mut w = start_worker(&rmq, "s2.q", &sink.url(), &args, &[], dir.path(), "worker-1").await?;
    wait_count(&sink, N / 4, Duration::from_secs(60)).await?;
    w.process.kill();
    let at_kill = sink.delivered().len();
    assert!(at_kill < N, "the kill came too late to be mid-stream");

    let w2 = start_worker(&rmq, "s2.q", &sink.url(), &args, &[], dir.path(), "worker-2").await?;
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(120)).await?;
    let dead = drain(&rmq, "s2.q.dead").await?;
    let dups = account(&published, &sink.delivered(), &dead_ids(&dead))?;
    fault_table(
        "kill-9-worker",
        &published,
        &sink.delivered(),
        &dead_ids(&dead),
        0,
    );
    let a = settled_accounting(&w2).await?;
    eprintln!("s2 accounting (second worker): {a:?}");
    assert!(dead.is_empty(), "nothing should be dead-lettered");
    // At most what the killed worker held unacked (prefetch) can come twice.
    assert!(dups <= 64, "{dups} duplicates for a prefetch of 64");
    eprintln!("s2: N={N}, killed after {at_kill} delivered, all delivered, duplicates={dups}");
    Ok(())
}

/// Scenario 3: the broker is stopped and started mid-stream; the worker reports not-ready while it is
/// gone, reconnects by itself, and all N are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_broker_restart_mid_stream_reconnects() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 2000;
    let mut rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    // ~160 deliveries/s: stopping the node (a few seconds) lands mid-stream.
    sink.set_mode(Mode::delayed(200, Duration::from_millis(50)));
    let published = ids("s3", N);
    publish(&rmq, "s3.q", &published).await?;
    let w = start_worker(
        &rmq,
        "s3.q",
        &sink.url(),
        &["--concurrency", "8", "--prefetch", "16"],
        &[],
        dir.path(),
        "worker",
    )
    .await?;
    wait_count(&sink, N / 5, Duration::from_secs(60)).await?;
    rmq.stop_node();
    let at_stop = sink.delivered().len();
    assert!(at_stop < N, "the broker stopped too late to be mid-stream");
    w.wait_ready(false, Duration::from_secs(10)).await?;
    let down = w.metrics().await?;
    assert_eq!(metric(&down, "hookfleet_broker_connected{"), 0.0, "{down}");
    rmq.start_node().await?;
    w.wait_ready(true, Duration::from_secs(60)).await?;
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(120)).await?;
    let dead = drain(&rmq, "s3.q.dead").await?;
    let dups = account(&published, &sink.delivered(), &dead_ids(&dead))?;
    fault_table(
        "broker-restart",
        &published,
        &sink.delivered(),
        &dead_ids(&dead),
        0,
    );
    assert!(dead.is_empty());
    let m = w.metrics().await?;
    assert!(metric(&m, "hookfleet_broker_reconnects_total{") >= 1.0);
    w.process.check_running()?;
    let a = settled_accounting(&w).await?;
    eprintln!("s3 accounting: {a:?}");
    eprintln!(
        "s3: N={N}, broker stopped after {at_stop} delivered, all delivered after restart, duplicates={dups}"
    );
    Ok(())
}

/// Scenario 6: under a 256 descriptor limit with a sink that stalls every connection, the worker keeps
/// its open descriptors under the limit, neither crashes nor loses a message, and delivers everything
/// once the sink recovers. With a concurrency that cannot fit, it refuses to start and says the numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_stalling_endpoint_under_a_low_fd_limit() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 500;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    sink.set_mode(Mode::Stall);
    let published = ids("s6", N);
    publish(&rmq, "s6.q", &published).await?;

    let port = free_port()?;
    let mut args = base_args(&rmq, "s6.q", &sink.url(), port, dir.path());
    args.extend(STALLING_SINK_FLAGS.map(String::from));
    let w = start_worker_limited(256, args, port, dir.path()).await?;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", w.pid()))?;
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("256")),
        "{limits}"
    );

    // Stalled for 6 s: every attempt times out and is retried; watch the descriptors.
    let mut peak = 0;
    let stall_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < stall_until {
        peak = peak.max(w.open_fds().context("worker gone")?);
        w.process.check_running()?;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (_, sink_peak_conns) = sink.open_connections();
    assert!(peak < 256, "open descriptors reached {peak} of 256");
    assert!(
        sink_peak_conns <= 96 + 8,
        "{sink_peak_conns} connections open at once for a concurrency of 96"
    );
    let m = w.metrics().await?;
    assert_eq!(metric(&m, "hookfleet_max_fds{"), 256.0);
    assert!(
        metric(&m, "hookfleet_retries_total{") > 0.0,
        "stalled attempts should be retried"
    );

    sink.set_mode(Mode::ok());
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(60)).await?;
    let dead = drain(&rmq, "s6.q.dead").await?;
    let dups = account(&published, &sink.delivered(), &dead_ids(&dead))?;
    fault_table(
        "stalling-sink-fd-limit-256",
        &published,
        &sink.delivered(),
        &dead_ids(&dead),
        0,
    );
    assert!(dead.is_empty());
    w.process.check_running()?;
    let a = settled_accounting(&w).await?;
    eprintln!("s6 accounting: {a:?}");
    eprintln!(
        "s6: N={N}, peak open fds {peak} (limit 256), peak sink connections {sink_peak_conns}, all delivered after recovery, duplicates={dups}"
    );

    // A limit the concurrency cannot fit: refused at start, with the numbers.
    let out = std::process::Command::new("/usr/bin/prlimit")
        .arg("--nofile=256:256")
        .arg("--")
        .arg(WORKER)
        .args(base_args(&rmq, "s6.q", &sink.url(), free_port()?, dir.path()))
        .args(["--concurrency", "200"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let line = stderr.lines().last().unwrap_or("");
    for n in ["256", "464", "200"] {
        assert!(line.contains(n), "{n} missing: {line}");
    }
    let term = std::fs::read_to_string(dir.path().join("termination-log"))?;
    assert!(term.contains("file-descriptor limit too low"), "{term}");
    eprintln!("s6 refusal: {line}");
    Ok(())
}

/// Scenario 7: SIGTERM under load. In-flight deliveries finish and are acked, the rest go back to the
/// queue, the worker exits 0 within the grace period; a second worker delivers the rest, without a
/// single duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7_sigterm_drains_in_flight_and_exits_0() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 400;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    sink.set_mode(Mode::delayed(200, Duration::from_millis(300)));
    let published = ids("s7", N);
    publish(&rmq, "s7.q", &published).await?;

    let port = free_port()?;
    let mut args = base_args(&rmq, "s7.q", &sink.url(), port, dir.path());
    args.extend(
        [
            "--concurrency",
            "32",
            "--prefetch",
            "64",
            "--shutdown-grace",
            "10s",
        ]
        .map(String::from),
    );
    let log = std::fs::File::create(dir.path().join("worker-1.log"))?;
    let mut child = tokio::process::Command::new(WORKER)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("no pid")?;
    wait_for("worker ready", Duration::from_secs(30), Duration::from_millis(100), || async move {
        Ok((http_get(port, "/readyz").await.map(|r| r.0).unwrap_or(0) == 200).then_some(()))
    })
    .await?;
    wait_count(&sink, 64, Duration::from_secs(30)).await?;

    let term_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await??;
    let took = term_at.elapsed();
    let worker_log = std::fs::read_to_string(dir.path().join("worker-1.log"))?;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status:?}; log:\n{worker_log}"
    );
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");

    // Requests that were in flight at SIGTERM were answered (after the signal) and acked.
    let finished_after = sink.hits().iter().filter(|h| h.at > term_at).count();
    assert!(
        finished_after > 0,
        "no delivery was in flight at SIGTERM: the test proves nothing"
    );
    let delivered_first = sink.delivered().len();
    // The worker's connection is closed: nothing is unacked any more, so ready is all that is left.
    let (ready, consumers) = queue_counts(&rmq, "s7.q").await?;
    assert_eq!(consumers, 0);
    assert_eq!(
        ready as usize + delivered_first,
        N,
        "each message is delivered or back in the queue"
    );

    let dir2 = tempfile::tempdir()?;
    let w2 = start_worker(
        &rmq,
        "s7.q",
        &sink.url(),
        &["--concurrency", "64"],
        &[],
        dir2.path(),
        "worker-2",
    )
    .await?;
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(60)).await?;
    let dups = account(&published, &sink.delivered(), &HashSet::new())?;
    fault_table(
        "sigterm-under-load",
        &published,
        &sink.delivered(),
        &HashSet::new(),
        0,
    );
    let a = settled_accounting(&w2).await?;
    eprintln!("s7 accounting (second worker): {a:?}");
    assert_eq!(
        dups, 0,
        "in-flight deliveries were acked before exit, so nothing comes twice"
    );
    eprintln!(
        "s7: N={N}, first worker delivered {delivered_first} ({finished_after} of them in flight at SIGTERM, finished after it), exit 0 in {took:?}, rest delivered by a second worker, duplicates={dups}"
    );
    Ok(())
}

/// Waits until `queue` holds every id of `want` (ids may come more than once), draining it as it goes;
/// returns all dead letters read.
async fn wait_dead_ids(
    rmq: &RabbitMq,
    queue: &str,
    want: &HashSet<String>,
    timeout: Duration,
) -> Result<Vec<DeadLetter>> {
    let mut all = Vec::new();
    let deadline = Instant::now() + timeout;
    loop {
        // A queue being re-declared may be missing for a moment.
        all.extend(drain(rmq, queue).await.unwrap_or_default());
        let got = dead_ids(&all);
        if want.iter().all(|id| got.contains(id)) {
            return Ok(all);
        }
        if Instant::now() > deadline {
            let missing: Vec<&String> = want.iter().filter(|id| !got.contains(*id)).take(5).collect();
            anyhow::bail!(
                "{} of {} ids not in {queue} after {timeout:?}, e.g. {missing:?}",
                want.len() - want.iter().filter(|id| got.contains(*id)).count(),
                want.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Finding 1, exact confirms: retries and dead letters are published concurrently on the worker's
/// publish channels while the dead-letter queue keeps disappearing (the test drains it and deletes it
/// whenever it is empty, so the deletion itself drops nothing). Dead letters published meanwhile are
/// returned; a return must fail *its own* publish, never let another task ack its original. The sink
/// always answers 503 with `--max-attempts 2`, so every message ends in the dead-letter queue: each
/// id must get there, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_queue_deleted_under_load_loses_nothing() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 3000;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    // ~300 answers/s for 2 N attempts: the load lasts about 20 s.
    sink.set_mode(Mode::delayed(503, Duration::from_millis(100)));
    let published = ids("dl", N);
    let messages: Vec<(String, Vec<u8>)> = published
        .iter()
        .map(|id| (id.clone(), format!(r#"{{"id":"{id}"}}"#).into_bytes()))
        .collect();
    publish_to(&rmq, "dl.q", &messages, Some(QueueType::Classic)).await?;
    let w = start_worker(
        &rmq,
        "dl.q",
        &sink.url(),
        &[
            "--concurrency",
            "32",
            "--prefetch",
            "64",
            "--max-attempts",
            "2",
            // Dead letters (second attempts) start after 5 s: retries run in their own lane beside
            // the first attempts, so without that pause the dead-letter queue is never empty long
            // enough for `delete_queue --if-empty` (a rabbitmqctl run takes about a second).
            "--backoff-initial",
            "5s",
            "--backoff-max",
            "5s",
            "--backoff-jitter",
            "none",
            "--circuit-breaker-threshold",
            "0",
        ],
        // Classic: quorum queues cannot be deleted only-if-empty. (The variable, not the flag, so
        // the test also runs against builds that predate it: HOOKFLEET_TEST_WORKER_BIN.)
        &[("HOOKFLEET_QUEUE_TYPE", "classic")],
        dir.path(),
        "worker",
    )
    .await?;
    let mut dead = Vec::new();
    let mut deletions = 0;
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        // The queue is missing until the worker re-declares it.
        dead.extend(drain(&rmq, "dl.q.dead").await.unwrap_or_default());
        if rmq
            .ctl(&["delete_queue", "--if-empty", "dl.q.dead"])
            .is_ok_and(|out| out.contains("successfully deleted"))
        {
            deletions += 1;
        }
    }
    let want: HashSet<String> = published.iter().cloned().collect();
    let got = dead_ids(&dead);
    let rest: HashSet<String> = want.difference(&got).cloned().collect();
    dead.extend(wait_dead_ids(&rmq, "dl.q.dead", &rest, Duration::from_secs(180)).await?);
    let dups = account(&published, &sink.delivered(), &dead_ids(&dead))?;
    fault_table(
        "dead-letter-queue-deleted-under-load",
        &published,
        &sink.delivered(),
        &dead_ids(&dead),
        0,
    );
    let m = w.metrics().await?;
    let returned = metric(&m, "hookfleet_publish_failures_total{");
    let a = settled_accounting(&w).await?;
    eprintln!(
        "dead-letter queue deletions: N={N}, {deletions} deletions, {returned} copies returned/refused, {} dead letters for {N} ids ({} extra), duplicate deliveries {dups}, lost 0; accounting {a:?}",
        dead.len(),
        dead.len() - N
    );
    assert!(
        deletions >= 1 && returned >= 1.0,
        "no publish was returned: the test proved nothing\n{m}"
    );
    Ok(())
}

/// Finding 3, poison messages on a quorum queue: a message that takes the worker down every time (here
/// the endpoint never answers it and the test kills the worker with SIGKILL while it waits) is
/// dead-lettered by the broker after `--delivery-limit`, with reason `delivery_limit`, instead of
/// being redelivered forever; other messages are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_is_dead_lettered_after_the_delivery_limit() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const LIMIT: u64 = 3;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    sink.set_poison(Some("poison-0"));
    let args = ["--delivery-limit", "3"];
    let before = ids("ok", 100);
    // The worker declares the queue with its delivery limit; the test publishes into it.
    let mut w = start_worker(&rmq, "pm.q", &sink.url(), &args, &[], dir.path(), "worker-0").await?;
    publish_existing(&rmq, "pm.q", &before).await?;
    sink.wait_delivered(&before.iter().cloned().collect(), Duration::from_secs(30))
        .await?;
    publish_existing(&rmq, "pm.q", &ids("poison", 1)).await?;

    let mut kills = 0u64;
    let dead = loop {
        // The poison reached the endpoint: the worker "crashes" on it.
        wait_for(
            "poison delivery",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || {
                let n = sink.poison_arrivals();
                async move { Ok((n > kills).then_some(())) }
            },
        )
        .await?;
        w.process.kill();
        kills += 1;
        anyhow::ensure!(
            kills <= LIMIT + 2,
            "poison delivered {kills} times with a delivery limit of {LIMIT}"
        );
        w = start_worker(
            &rmq,
            "pm.q",
            &sink.url(),
            &args,
            &[],
            dir.path(),
            &format!("worker-{kills}"),
        )
        .await?;
        // The broker dead-letters it when the killed worker's channel goes.
        if let Ok(d) = wait_dead_ids(
            &rmq,
            "pm.q.dead",
            &HashSet::from(["poison-0".to_owned()]),
            Duration::from_secs(5),
        )
        .await
        {
            break d;
        }
    };
    assert_eq!(
        dead_ids(&dead),
        HashSet::from(["poison-0".to_owned()]),
        "only the poison is dead-lettered"
    );
    let reason = hookfleet_worker::message::header_str(Some(&dead[0].headers), "x-first-death-reason");
    assert_eq!(reason.as_deref(), Some("delivery_limit"), "{:?}", dead[0].headers);
    assert!(
        kills <= LIMIT + 1,
        "{kills} deliveries of the poison for a limit of {LIMIT}"
    );

    // The worker carries on: later messages are delivered, and its accounting adds up.
    let after = ids("after", 50);
    publish_existing(&rmq, "pm.q", &after).await?;
    sink.wait_delivered(&after.iter().cloned().collect(), Duration::from_secs(30))
        .await?;
    let all: Vec<String> = before.iter().chain(&after).cloned().collect();
    let delivered: std::collections::HashMap<String, usize> = sink
        .delivered()
        .into_iter()
        .filter(|(id, _)| id != "poison-0")
        .collect();
    let dups = account(&all, &delivered, &HashSet::new())?;
    let with_poison: Vec<String> = all.iter().cloned().chain(["poison-0".to_owned()]).collect();
    fault_table(
        "poison-message-delivery-limit",
        &with_poison,
        &sink.delivered(),
        &dead_ids(&dead),
        0,
    );
    let a = settled_accounting(&w).await?;
    eprintln!(
        "poison: delivery limit {LIMIT}, the poison reached the endpoint {} times ({kills} kills), then dead-lettered (delivery_limit); 150 others delivered, duplicates={dups}; accounting {a:?}",
        sink.poison_arrivals()
    );
    Ok(())
}

/// Finding 2, the delay-queue hop: retries come back while their target, the retry-ready queue,
/// refuses everything (`max-length 0` with `reject-publish`). On quorum queues the broker dead-letters
/// at least once: the retries wait in their delay queue until the retry-ready queue takes them again.
/// (Classic delay queues drop them: at-most-once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_wait_while_the_work_queue_is_full() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 200;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    sink.set_mode(Mode::status(503));
    let published = ids("ml", N);
    publish(&rmq, "ml.q", &published).await?;
    let args = [
        "--backoff-initial",
        "2s",
        "--backoff-max",
        "2s",
        "--backoff-jitter",
        "none",
        "--circuit-breaker-threshold",
        "0",
    ];
    let mut w = start_worker(&rmq, "ml.q", &sink.url(), &args, &[], dir.path(), "worker-1").await?;
    // Every message failed once and waits in a delay queue; then the work queue refuses everything.
    wait_for(
        "first attempts",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || {
            let n = sink.attempts().len();
            async move { Ok((n >= N).then_some(())) }
        },
    )
    .await?;
    rmq.ctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        "full",
        "^ml\\.q\\.retries$",
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
    ])?;
    // The retries' TTL (2 s) passes several times while the work queue is full.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let waiting = messages_under(&rmq, "ml.q.delay.")?;
    w.process.stop(Duration::from_secs(10));
    rmq.ctl(&["clear_policy", "full"])?;
    sink.set_mode(Mode::ok());
    w = start_worker(&rmq, "ml.q", &sink.url(), &args, &[], dir.path(), "worker-2").await?;
    let want: HashSet<String> = published.iter().cloned().collect();
    // The broker re-sends what the work queue refused on its own schedule (5 s on the test node, but
    // seen to take minutes on 3.10.8 under load): every id must be delivered or still held.
    let all_back = sink.wait_delivered(&want, Duration::from_secs(90)).await.is_ok();
    let delivered = sink.delivered();
    let missing = want.iter().filter(|id| !delivered.contains_key(*id)).count();
    let held = if all_back {
        0
    } else {
        // Counts from `list_queues` lag by one statistics emission (5 s).
        tokio::time::sleep(Duration::from_secs(6)).await;
        messages_under(&rmq, "ml.q.delay.")? + queue_counts(&rmq, "ml.q.retries").await?.0 as u64
    };
    let dead = drain(&rmq, "ml.q.dead").await?;
    assert!(dead.is_empty());
    assert!(
        held as usize >= missing,
        "{missing} ids neither delivered nor held in a queue (held: {held}): lost"
    );
    let dups = delivered.values().map(|n| n - 1).sum::<usize>();
    fault_table(
        "work-queue-full-retries-held",
        &published,
        &delivered,
        &dead_ids(&dead),
        missing,
    );
    let a = settled_accounting(&w).await?;
    eprintln!(
        "work queue full: N={N}, {waiting} retries held in delay queues while the retry-ready queue refused; after it freed up {} delivered within 90 s, {missing} still held by the broker ({held} in queues), 0 lost, duplicates={dups}; accounting {a:?}",
        N - missing
    );
    assert!(waiting > 0, "no retry waited: the test proved nothing");
    Ok(())
}

/// Finding 4, broker flow control: under a memory alarm the broker blocks the worker's connection once
/// it publishes (retries of a 503ing endpoint). The worker reports not-ready while blocked, no copy
/// waits beyond `--confirm-timeout`, and once the alarm clears everything is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_alarm_makes_the_worker_unready_without_hanging() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 200;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    let published = ids("fc", N);
    publish(&rmq, "fc.q", &published).await?;
    sink.set_mode(Mode::delayed(503, Duration::from_millis(20)));
    rmq.ctl(&["set_vm_memory_high_watermark", "0"])?;
    let args = [
        "--confirm-timeout",
        "2s",
        "--shutdown-grace",
        "3s",
        "--backoff-initial",
        "200ms",
        "--backoff-max",
        "1s",
        "--circuit-breaker-threshold",
        "0",
        "--max-attempts",
        "100",
    ];
    // The alarm is on before the worker publishes anything: it connects and consumes (ready), then its
    // first retry publish gets its connection blocked.
    let port = free_port()?;
    let mut argv = base_args(&rmq, "fc.q", &sink.url(), port, dir.path());
    argv.extend(args.iter().map(|s| s.to_string()));
    let process = Process::spawn(
        "worker",
        Path::new(WORKER),
        &argv,
        &[],
        &dir.path().join("worker.log"),
    )?;
    let w = Worker {
        process,
        metrics_port: port,
        dir: dir.path().to_owned(),
    };
    w.wait_ready(false, Duration::from_secs(30)).await?;
    let alarm_at = Instant::now();
    wait_for("a confirm timeout", Duration::from_secs(20), Duration::from_millis(100), || {
        let w = &w;
        async move {
            let m = w.metrics().await.unwrap_or_default();
            Ok((metric(&m, "hookfleet_deliveries_total{integration=\"test/worker\",result=\"handed_back\",reason=\"confirm_timeout\"}") >= 1.0).then_some(()))
        }
    })
    .await
    .with_context(|| w.process.log_tail(30))?;
    let timed_out_after = alarm_at.elapsed();
    // Not ready while the alarm lasts (sampled for 4 s; it may flip to ready briefly between sessions).
    let mut ready_samples = 0;
    for _ in 0..40 {
        if http_get(port, "/readyz").await.map(|r| r.0).unwrap_or(0) == 200 {
            ready_samples += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.process.check_running()?;
    rmq.ctl(&["set_vm_memory_high_watermark", "0.4"])?;
    sink.set_mode(Mode::ok());
    w.wait_ready(true, Duration::from_secs(60)).await?;
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(120)).await?;
    let dead = drain(&rmq, "fc.q.dead").await?;
    let dups = account(&published, &sink.delivered(), &dead_ids(&dead))?;
    fault_table("memory-alarm", &published, &sink.delivered(), &dead_ids(&dead), 0);
    assert!(dead.is_empty());
    let a = settled_accounting(&w).await?;
    eprintln!(
        "memory alarm: N={N}, first confirm timeout (2 s) after {timed_out_after:?}, ready in {ready_samples} of 40 samples during the alarm, all delivered after, duplicates={dups}; accounting {a:?}"
    );
    assert!(
        ready_samples <= 10,
        "ready in {ready_samples} of 40 samples while blocked"
    );
    Ok(())
}
