//! Delivery scenarios of issue 3 against a real RabbitMQ node, the harness's sink and the real worker
//! binary: a healthy stream (1), an endpoint that fails then recovers (4, and Retry-After), dead
//! letters (5), invalid configuration (8), and a queue that exists with another type. Each test counts ids: every published id reaches the
//! sink or the dead-letter queue; none vanishes.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::*;
use hookfleet_crds::integration::QueueType;
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::process::free_port;
use hookfleet_testkit::sink::{Mode, Sink};
use hookfleet_worker::message::{
    H_ATTEMPTS, H_DEAD_REASON, H_FIRST_SEEN, H_LAST_STATUS, header_int, header_str,
};

/// Scenario 1: N = 2000 messages, healthy sink: all delivered exactly once, every header right, queue empty and
/// nothing unacked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_healthy_stream_delivers_every_message_once() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 2000;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    let published = ids("s1", N);
    publish(&rmq, "s1.q", &published).await?;

    let secret = "whsec_c2VjcmV0LWZvci10ZXN0cw==";
    let w = start_worker(
        &rmq,
        "s1.q",
        &sink.url(),
        &[
            "--concurrency",
            "64",
            "--prefetch",
            "128",
            "--header",
            "X-Source: hookfleet",
        ],
        &[("HOOKFLEET_SIGNING_SECRET", secret)],
        dir.path(),
        "worker",
    )
    .await?;
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(120)).await?;

    let delivered = sink.delivered();
    let dups = account(&published, &delivered, &HashSet::new())?;
    assert_eq!(dups, 0, "a healthy run delivers each message once");

    // Headers: stable id, timestamp, a signature that verifies, the configured header, the body as sent.
    let secrets = hookfleet_worker::signing::parse_secrets(secret).unwrap();
    for hit in sink.hits().iter().take(50) {
        let id = hit.id.as_deref().expect("webhook-id");
        let ts: i64 = hit.headers["webhook-timestamp"].parse()?;
        assert!((ts - chrono_now()).abs() < 300, "timestamp {ts} is not now");
        let expected = hookfleet_worker::signing::signature(&secrets, id, ts, &hit.body);
        assert_eq!(hit.headers["webhook-signature"], expected);
        assert_eq!(hit.headers["x-source"], "hookfleet");
        assert_eq!(hit.headers["content-type"], "application/json");
        assert_eq!(hit.method, "POST");
        assert_eq!(
            String::from_utf8_lossy(&hit.body),
            format!(r#"{{"id":"{id}","data":{{"n":1}}}}"#)
        );
    }

    // All acked: nothing ready, nothing unacked; the worker still consumes; no dead letters or retries.
    let settled = hookfleet_testkit::process::wait_for(
        "queue settled",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            let s = queue_stats(&rmq, "s1.q");
            async move { Ok(s.ok().filter(|(r, u, _)| *r == 0 && *u == 0)) }
        },
    )
    .await;
    settled?;
    // A passive declare, as the operator counts consumers (`list_queues` reports a quorum queue's
    // consumers only with the next statistics emission).
    assert_eq!(consumers(&rmq, "s1.q").await?, 1, "one consumer attached");
    assert_eq!(queue_stats(&rmq, "s1.q.dead")?.0, 0);
    assert_eq!(messages_under(&rmq, "s1.q.delay.")?, 0);
    let m = w.metrics().await?;
    assert_eq!(
        metric(
            &m,
            "hookfleet_deliveries_total{integration=\"test/worker\",result=\"delivered\""
        ),
        N as f64,
        "{m}"
    );
    assert_eq!(metric(&m, "hookfleet_consuming{"), 1.0);
    assert!(metric(&m, "hookfleet_max_fds{") >= 320.0);
    assert!(metric(&m, "hookfleet_open_fds{") > 0.0);
    eprintln!(
        "s1: {N} published, {} delivered, {dups} duplicates, sink connections {}",
        delivered.len(),
        sink.connections_accepted()
    );
    Ok(())
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Scenario 4: The sink answers 503 for 3 s, then 200: everything is delivered, each id's attempts are spaced
/// by the backoff schedule (200 ms, 400 ms, 800 ms, … with jitter off), and there is no requeue storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_failing_endpoint_recovers_with_backoff() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 100;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    sink.set_mode(Mode::status(503));
    let published = ids("s4", N);
    publish(&rmq, "s4.q", &published).await?;
    let failing_for = Duration::from_secs(3);
    let _w = start_worker(
        &rmq,
        "s4.q",
        &sink.url(),
        &[
            "--backoff-initial",
            "200ms",
            "--backoff-multiplier",
            "2",
            "--backoff-jitter",
            "none",
            "--backoff-max",
            "5s",
            "--max-attempts",
            "10",
            // This test is about the backoff schedule alone; the breaker has its own test.
            "--circuit-breaker-threshold",
            "0",
        ],
        &[],
        dir.path(),
        "worker",
    )
    .await?;
    let started = Instant::now();
    tokio::time::sleep(failing_for).await;
    let failed_requests = sink.requests();
    sink.set_mode(Mode::ok());
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(60)).await?;
    let dups = account(&published, &sink.delivered(), &HashSet::new())?;

    // No storm: in 3 s the schedule 0, 0.2, 0.6, 1.4, 3.0 s allows at most 5 attempts per message.
    assert!(
        failed_requests <= (N * 5) as u64,
        "{failed_requests} requests in {failing_for:?} for {N} messages: a requeue storm"
    );
    assert!(
        failed_requests >= (N * 3) as u64,
        "only {failed_requests} attempts: retries are not happening"
    );

    // The gaps follow the schedule: the k-th gap is about 200 ms × 2^(k−1) (delay queues round to
    // within 10%; delivery adds a little).
    let attempts = sink.attempts();
    let mut checked = 0;
    for id in &published {
        let times = &attempts[id];
        assert!(times.len() >= 2, "{id} was attempted once only");
        for (k, w) in times.windows(2).enumerate() {
            let gap = w[1] - w[0];
            let base = Duration::from_millis(200 * (1 << k));
            assert!(
                gap >= base.mul_f64(0.85),
                "{id}: gap {k} is {gap:?}, schedule says {base:?}"
            );
            assert!(
                gap <= base.mul_f64(1.15) + Duration::from_millis(1500),
                "{id}: gap {k} is {gap:?} (> {base:?})"
            );
            checked += 1;
        }
    }
    assert_eq!(queue_stats(&rmq, "s4.q.dead")?.0, 0, "nothing dead-lettered");
    eprintln!(
        "s4: {N} ids, {failed_requests} failed attempts in {failing_for:?}, {checked} gaps checked, {dups} duplicates, all delivered {:?} after start",
        started.elapsed()
    );
    Ok(())
}

/// Retry-After: a 429 with `Retry-After: 2` is retried after 2 s, not after the 200 ms backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 20;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    sink.set_mode(Mode::Answer {
        status: 429,
        delay: Duration::ZERO,
        retry_after: Some("2".into()),
    });
    let published = ids("ra", N);
    publish(&rmq, "ra.q", &published).await?;
    let _w = start_worker(
        &rmq,
        "ra.q",
        &sink.url(),
        &["--backoff-initial", "200ms", "--backoff-jitter", "none"],
        &[],
        dir.path(),
        "worker",
    )
    .await?;
    // Every id gets its first (429) answer, then the sink recovers.
    hookfleet_testkit::process::wait_for(
        "first attempts",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            let n = sink.attempts().len();
            async move { Ok((n == N).then_some(())) }
        },
    )
    .await?;
    sink.set_mode(Mode::ok());
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(30)).await?;
    account(&published, &sink.delivered(), &HashSet::new())?;
    for (id, times) in sink.attempts() {
        let gap = times[1] - times[0];
        assert!(
            gap >= Duration::from_millis(1800),
            "{id}: retried after {gap:?} despite Retry-After: 2"
        );
    }
    Ok(())
}

/// Scenario 5: A 400 is dead-lettered after one attempt with its reason and status; a 500 forever is
/// dead-lettered after max attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_dead_letters_carry_reason_status_and_attempts() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 20;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;

    // 400: straight to the dead-letter queue.
    let sink = Sink::start().await?;
    sink.set_mode(Mode::status(400));
    let published = ids("s5a", N);
    publish(&rmq, "s5a.q", &published).await?;
    let w = start_worker(&rmq, "s5a.q", &sink.url(), &[], &[], dir.path(), "worker-400").await?;
    let dead = wait_dead(&rmq, "s5a.q.dead", N).await?;
    drop(w);
    let dead_ids: HashSet<String> = dead.iter().map(|d| d.id.clone()).collect();
    account(&published, &HashMap::new(), &dead_ids)?;
    for d in &dead {
        let h = Some(&d.headers);
        assert_eq!(
            header_str(h, H_DEAD_REASON).as_deref(),
            Some("http_status"),
            "{d:?}"
        );
        assert_eq!(header_int(h, H_LAST_STATUS), Some(400));
        assert_eq!(header_int(h, H_ATTEMPTS), Some(1));
        assert!(header_int(h, H_FIRST_SEEN).is_some());
    }
    let per_id = sink.attempts();
    assert!(per_id.values().all(|t| t.len() == 1), "a 400 is attempted once");

    // 500 forever, 3 attempts.
    let sink = Sink::start().await?;
    sink.set_mode(Mode::status(500));
    let published = ids("s5b", N);
    publish(&rmq, "s5b.q", &published).await?;
    let _w = start_worker(
        &rmq,
        "s5b.q",
        &sink.url(),
        &[
            "--max-attempts",
            "3",
            "--backoff-initial",
            "100ms",
            "--backoff-jitter",
            "none",
            "--circuit-breaker-threshold",
            "0",
        ],
        &[],
        dir.path(),
        "worker-500",
    )
    .await?;
    let dead = wait_dead(&rmq, "s5b.q.dead", N).await?;
    let dead_ids: HashSet<String> = dead.iter().map(|d| d.id.clone()).collect();
    account(&published, &HashMap::new(), &dead_ids)?;
    for d in &dead {
        let h = Some(&d.headers);
        assert_eq!(
            header_str(h, H_DEAD_REASON).as_deref(),
            Some("attempts_exhausted"),
            "{d:?}"
        );
        assert_eq!(header_int(h, H_LAST_STATUS), Some(500));
        assert_eq!(header_int(h, H_ATTEMPTS), Some(3));
    }
    let per_id = sink.attempts();
    assert_eq!(per_id.len(), N);
    assert!(
        per_id.values().all(|t| t.len() == 3),
        "a 500 is attempted max-attempts times"
    );
    assert_eq!(queue_stats(&rmq, "s5b.q")?.0, 0);
    assert_eq!(messages_under(&rmq, "s5b.q.delay.")?, 0);
    Ok(())
}

/// Body templates: every renderable message reaches the sink as the template's rendering (signed
/// over the rendered body); a message missing a variable, one that is not a JSON object and one that
/// is not JSON are dead-lettered at once with a `template: …` reason, after one handling, never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_template_renders_and_dead_letters_what_it_cannot() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 200;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;

    let good = ids("tpl", N);
    let mut messages: Vec<(String, Vec<u8>)> = good
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let body = serde_json::json!({
                "id": id,
                "device_id": format!("dev-{i}"),
                "data": {"n": i, "items": ["a", "b\"c"], "paid": i.is_multiple_of(2), "note": null},
            });
            (id.clone(), body.to_string().into_bytes())
        })
        .collect();
    let bad: Vec<(String, Vec<u8>, &str)> = vec![
        (
            "tpl-bad-missing-0".into(),
            br#"{"data": {"n": 1}}"#.to_vec(),
            "device_id",
        ),
        (
            "tpl-bad-missing-1".into(),
            br#"{"device_id": "d", "extra": 1}"#.to_vec(),
            "data",
        ),
        ("tpl-bad-array".into(), b"[1, 2, 3]".to_vec(), "array"),
        ("tpl-bad-json".into(), b"not json".to_vec(), "not JSON"),
    ];
    // Interleaved, so the bad ones sit among good ones in flight.
    for (k, (id, body, _)) in bad.iter().enumerate() {
        messages.insert(k * 40, (id.clone(), body.clone()));
    }
    publish_bodies(&rmq, "tpl.q", &messages).await?;

    let secret = "whsec_c2VjcmV0LWZvci10ZXN0cw==";
    let template = r#"{"order": {{ data | tojson }}, "device": "{{ device_id }}", "rk": "{{ routing_key }}", "id": "{{ webhook_id }}", "n": {{ message.data.n }}}"#;
    let w = start_worker(
        &rmq,
        "tpl.q",
        &sink.url(),
        &["--concurrency", "16"],
        &[
            ("HOOKFLEET_SIGNING_SECRET", secret),
            ("HOOKFLEET_BODY_TEMPLATE", template),
        ],
        dir.path(),
        "worker",
    )
    .await?;

    let want: HashSet<String> = good.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(60)).await?;
    let dead = wait_dead(&rmq, "tpl.q.dead", bad.len()).await?;

    // Every good id delivered once, with the rendered body, signed over what was sent.
    let dead_ids: HashSet<String> = dead.iter().map(|d| d.id.clone()).collect();
    let published: Vec<String> = messages.iter().map(|(id, _)| id.clone()).collect();
    let dups = account(&published, &sink.delivered(), &dead_ids)?;
    assert_eq!(dups, 0);
    let secrets = hookfleet_worker::signing::parse_secrets(secret).unwrap();
    let hits = sink.hits();
    assert_eq!(
        hits.len(),
        N,
        "one request per renderable message, none for the others"
    );
    for hit in &hits {
        let id = hit.id.as_deref().expect("webhook-id");
        let i: usize = id.strip_prefix("tpl-").unwrap().parse()?;
        let got: serde_json::Value = serde_json::from_slice(&hit.body)
            .map_err(|e| anyhow::anyhow!("{id}: {e}: {}", String::from_utf8_lossy(&hit.body)))?;
        assert_eq!(
            got,
            serde_json::json!({
                "order": {"n": i, "items": ["a", "b\"c"], "paid": i.is_multiple_of(2), "note": null},
                "device": format!("dev-{i}"),
                "rk": "tpl.q",
                "id": id,
                "n": i,
            }),
            "{id}"
        );
        let ts: i64 = hit.headers["webhook-timestamp"].parse()?;
        assert_eq!(
            hit.headers["webhook-signature"],
            hookfleet_worker::signing::signature(&secrets, id, ts, &hit.body),
            "the signature covers the rendered body"
        );
        assert_eq!(hit.headers["content-type"], "application/json");
    }

    // The unrenderable ones: dead-lettered after one handling, with the reason, the original body.
    assert_eq!(dead.len(), bad.len());
    for (id, body, says) in &bad {
        let d = dead.iter().find(|d| &d.id == id).expect("dead-lettered");
        let h = Some(&d.headers);
        let reason = header_str(h, H_DEAD_REASON).unwrap_or_default();
        assert!(reason.starts_with("template: "), "{id}: {reason}");
        assert!(reason.contains(says), "{id}: {reason:?} does not mention {says}");
        assert_eq!(header_int(h, H_ATTEMPTS), Some(1), "{id}");
        assert_eq!(header_int(h, H_LAST_STATUS), None, "{id}");
        assert_eq!(&d.body, body, "{id}: the dead letter keeps the original body");
        eprintln!("template dead letter {id}: {reason}");
    }
    assert_eq!(queue_stats(&rmq, "tpl.q")?.0, 0);
    assert_eq!(messages_under(&rmq, "tpl.q.delay.")?, 0, "nothing was retried");
    let m = w.metrics().await?;
    assert_eq!(
        metric(
            &m,
            "hookfleet_deliveries_total{integration=\"test/worker\",result=\"dead_lettered\",reason=\"template\"}"
        ),
        bad.len() as f64,
        "{m}"
    );
    assert_eq!(metric(&m, "hookfleet_retries_total{"), 0.0, "{m}");
    Ok(())
}

/// A template that does not compile is bad configuration: exit 2, one line naming --body-template.
#[test]
fn body_template_that_does_not_compile_exits_2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let term = dir.path().join("termination-log");
    for template in [r#"{"a": {{ data | tojson }"#, "{{ data | no_such_filter }}"] {
        let out = std::process::Command::new(WORKER)
            .args([
                "--amqp-uri",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "--queue",
                "q",
                "--destination-url",
                "http://127.0.0.1:1/hook",
                "--allow-private-networks",
                "--termination-log",
            ])
            .arg(&term)
            .env("HOOKFLEET_BODY_TEMPLATE", template)
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
        assert!(
            stderr.contains("invalid configuration: --body-template (HOOKFLEET_BODY_TEMPLATE): "),
            "{stderr}"
        );
        let written = std::fs::read_to_string(&term)?;
        assert_eq!(
            format!("hookfleet-worker: {}", written.trim_end()),
            stderr.trim_end()
        );
        eprintln!("bad template: {}", stderr.trim_end());
    }
    Ok(())
}

/// Waits until `queue` holds `n` messages, then drains them.
async fn wait_dead(rmq: &RabbitMq, queue: &str, n: usize) -> Result<Vec<DeadLetter>> {
    hookfleet_testkit::process::wait_for(
        "dead letters",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let s = queue_stats(rmq, queue);
            async move { Ok(s.ok().filter(|(r, _, _)| *r as usize >= n).map(|_| ())) }
        },
    )
    .await?;
    drain(rmq, queue).await
}

/// Scenario 8: Invalid configuration: non-zero exit, one clear line naming the setting, the same line in the
/// termination-message file. No broker needed: configuration is checked before connecting.
#[test]
fn s8_invalid_config_exits_with_one_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let term = dir.path().join("termination-log");
    let base = |uri: &str, queue: Option<&str>, timeout: &str| {
        let mut v = vec![
            "--amqp-uri".to_owned(),
            uri.to_owned(),
            "--destination-url".into(),
            "http://127.0.0.1:1/hook".into(),
            "--allow-private-networks".into(),
            "--timeout".into(),
            timeout.into(),
            "--termination-log".into(),
            term.display().to_string(),
        ];
        if let Some(q) = queue {
            v.extend(["--queue".to_owned(), q.to_owned()]);
        }
        v
    };
    let cases = [
        (
            base("rabbit://guest:hunter2@host", Some("q"), "10s"),
            "--amqp-uri",
        ),
        (
            base("amqp://guest:guest@127.0.0.1:5672/%2f", None, "10s"),
            "--queue",
        ),
        (
            base("amqp://guest:guest@127.0.0.1:5672/%2f", Some("q"), "ten seconds"),
            "--timeout",
        ),
        (
            base("amqp://guest:guest@127.0.0.1:5672/%2f", Some("q"), "10s")
                .into_iter()
                .chain(["--prefetch".into(), "lots".into()])
                .collect(),
            "--prefetch",
        ),
    ];
    for (args, setting) in cases {
        let _ = std::fs::remove_file(&term);
        let out = std::process::Command::new(WORKER)
            .args(&args)
            .env_remove("HOOKFLEET_AMQP_URI")
            .env_remove("HOOKFLEET_QUEUE")
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{setting}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{setting}: not one line: {stderr}"
        );
        assert!(stderr.contains(setting), "{setting} not named: {stderr}");
        assert!(stderr.contains("invalid configuration"), "{stderr}");
        assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
        let written = std::fs::read_to_string(&term)?;
        assert_eq!(
            format!("hookfleet-worker: {}", written.trim_end()),
            stderr.trim_end()
        );
        eprintln!("s8 {setting}: {}", stderr.trim_end());
    }
    Ok(())
}

/// A delay queue deleted behind the worker's back: the retry publish is returned as unroutable, the
/// original stays unacked, the session ends and the reconnect re-declares the topology. Nothing is lost
/// and the worker does not loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_delay_queue_is_redeclared_and_nothing_is_lost() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 20;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    sink.set_mode(Mode::status(503));
    let w = start_worker(
        &rmq,
        "dq.q",
        &sink.url(),
        &[
            "--backoff-initial",
            "200ms",
            "--backoff-jitter",
            "none",
            "--backoff-max",
            "1s",
            "--circuit-breaker-threshold",
            "0",
            // The checks below call rabbitmqctl, which takes seconds on a loaded machine: enough
            // attempts that no message runs out of them before the sink answers 200 (10 attempts
            // at these delays last about 8 s; 100, about 100 s).
            "--max-attempts",
            "100",
        ],
        &[],
        dir.path(),
        "worker",
    )
    .await?;
    rmq.ctl(&["delete_queue", "dq.q.delay.200ms"])?;
    let published = ids("dq", N);
    publish(&rmq, "dq.q", &published).await?;
    // The first retries are returned; the worker reconnects and re-declares.
    hookfleet_testkit::process::wait_for(
        "publish failure seen",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || {
            let w = &w;
            async move {
                let m = w.metrics().await.unwrap_or_default();
                Ok((metric(&m, "hookfleet_publish_failures_total{") >= 1.0).then_some(()))
            }
        },
    )
    .await?;
    w.wait_ready(true, Duration::from_secs(20)).await?;
    assert!(
        queue_stats(&rmq, "dq.q.delay.200ms").is_ok(),
        "the delay queue was re-declared"
    );
    sink.set_mode(Mode::ok());
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(30)).await?;
    account(&published, &sink.delivered(), &HashSet::new())?;
    let m = w.metrics().await?;
    assert!(metric(&m, "hookfleet_broker_reconnects_total{") >= 1.0);
    assert!(metric(&m, "hookfleet_publish_failures_total{") <= N as f64, "{m}");
    Ok(())
}

/// The circuit breaker: an endpoint answering 503 gets the first failures and then about one probe per
/// cooldown instead of every message and every retry; deferred messages spend no attempt, so nothing
/// is dead-lettered by the outage, and everything is delivered once the probe succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_stops_hammering_a_failing_endpoint() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 200;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    sink.set_mode(Mode::status(503));
    let published = ids("cb", N);
    publish(&rmq, "cb.q", &published).await?;
    let w = start_worker(
        &rmq,
        "cb.q",
        &sink.url(),
        &[
            "--concurrency",
            "16",
            "--circuit-breaker-threshold",
            "10",
            "--circuit-breaker-cooldown",
            "1s",
            "--backoff-initial",
            "200ms",
            "--backoff-max",
            "2s",
            "--max-attempts",
            "5",
        ],
        &[],
        dir.path(),
        "worker",
    )
    .await?;
    let outage = Duration::from_secs(4);
    tokio::time::sleep(outage).await;
    let during = sink.requests();
    let m = w.metrics().await?;
    assert_eq!(metric(&m, "hookfleet_circuit_open{"), 1.0, "{m}");
    assert!(
        metric(
            &m,
            "hookfleet_deliveries_total{integration=\"test/worker\",result=\"deferred\""
        ) > 0.0
    );
    // The opening wave (at most the 16 in flight) plus about one probe per second; without the
    // breaker the same 4 s cost 3 or more attempts per message (scenario 4): 600 here.
    assert!(
        during <= 16 + 10,
        "{during} requests during a {outage:?} outage: the breaker does not hold"
    );

    sink.set_mode(Mode::ok());
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(60)).await?;
    let dups = account(&published, &sink.delivered(), &HashSet::new())?;
    assert_eq!(
        queue_stats(&rmq, "cb.q.dead")?.0,
        0,
        "the outage dead-lettered nothing"
    );
    let m = w.metrics().await?;
    assert_eq!(metric(&m, "hookfleet_circuit_open{"), 0.0);
    eprintln!(
        "breaker: {N} ids, {during} requests during a {outage:?} outage, all delivered after, duplicates={dups}"
    );
    Ok(())
}

/// A work queue that exists as a classic queue while the worker asks for quorum (the default): the
/// broker refuses the declaration and the worker exits 4 at once with one line naming the queue and the
/// differing argument (before: a silent reconnect loop, 0 messages delivered). The same queue works
/// with `--queue-type classic`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_type_mismatch_exits_4_naming_queue_and_argument() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    const N: usize = 50;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    // An existing classic queue holding messages.
    let published = ids("mm", N);
    {
        let conn = lapin::Connection::connect(&rmq.amqp_uri(), Default::default()).await?;
        let ch = conn.create_channel().await?;
        declare_work_queue(&ch, "mm.q", QueueType::Classic).await?;
        let _ = conn.close(200, "declared".into()).await;
    }
    publish_existing(&rmq, "mm.q", &published).await?;

    let started = std::time::Instant::now();
    let out = tokio::process::Command::new(WORKER)
        .args(base_args(&rmq, "mm.q", &sink.url(), free_port()?, dir.path()))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .context("the worker did not exit: a reconnect loop")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    let term = std::fs::read_to_string(dir.path().join("termination-log"))?;
    for part in [
        "queue mm.q exists on the broker with other arguments than the quorum queue this worker declares (differs at least in x-",
        "inequivalent arg",
        "--queue-type",
    ] {
        assert!(
            term.contains(part),
            "{part:?} missing in the termination message: {term}"
        );
    }
    assert_eq!(term.lines().count(), 1, "{term}");
    assert!(sink.hits().is_empty());
    let names = rmq.ctl(&["list_queues", "-q", "--no-table-headers", "name"])?;
    assert_eq!(
        names.split_whitespace().collect::<Vec<_>>(),
        ["mm.q"],
        "the refused worker left no queue of the wrong type behind"
    );
    eprintln!("mismatch: exit 4 after {:?}: {}", started.elapsed(), term.trim());

    // With the queue's own type the worker consumes it.
    let w = start_worker(
        &rmq,
        "mm.q",
        &sink.url(),
        &["--queue-type", "classic"],
        &[],
        dir.path(),
        "worker-classic",
    )
    .await?;
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(30)).await?;
    account(&published, &sink.delivered(), &HashSet::new())?;
    let a = settled_accounting(&w).await?;
    assert_eq!(a.delivered, N as f64, "{a:?}");
    Ok(())
}
