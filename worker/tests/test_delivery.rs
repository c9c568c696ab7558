//! `hookfleet-worker test-delivery` (the one-shot `kubectl hookfleet test-delivery` runs in a pod), as the
//! real binary against the harness's sink: the worker's own flags and environment (a body template, a
//! signing secret, a header from a "Secret" variable), no broker at all (the URI points at a closed port).
//!
//! Per answer of the sink (200, 404, 503, 410): exactly one request, rendered by the template, carrying the
//! marker header and a fresh `test_` id, signed with the worker's secret; the report on stdout (request line,
//! headers with the secret one as `***`, status, verdict); and the exit code (0, 7 dead-letter, 6 retry,
//! 5 gone).

use std::process::Command;

use anyhow::{Context, Result, ensure};
use hookfleet_crds::contract::test_delivery::{H_TEST_DELIVERY, TestDeliveryArgs, exit};
use hookfleet_testkit::messages::verify_signature;
use hookfleet_testkit::sink::{Mode, Sink};

const WORKER: &str = env!("CARGO_BIN_EXE_hookfleet-worker");
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const API_KEY: &str = "k3y-from-a-secret";

fn worker_flags(url: &str) -> Vec<String> {
    [
        // Nothing listens there: a test delivery never talks to the broker.
        "--amqp-uri",
        "amqp://guest:guest@127.0.0.1:1/%2f",
        "--queue",
        "orders",
        "--integration",
        "team-a/orders",
        "--destination-url",
        url,
        "--allow-private-networks",
        "--header",
        "X-Source: hookfleet",
        "--header-from-env",
        "X-Api-Key=HOOKFLEET_HEADER_0",
        "--body-template",
        r#"{"order": {{ data | tojson }}, "event": "{{ routing_key }}", "id": "{{ webhook_id }}"}"#,
        "--max-attempts",
        "5",
    ]
    .map(String::from)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_signed_rendered_marked_request_and_the_workers_verdict_as_exit_code() -> Result<()> {
    hookfleet_testkit::init_tracing();
    let sink = Sink::start().await?;
    let url = sink.url();
    let test = TestDeliveryArgs {
        event: Some("orders.created".into()),
        body: Some(r#"{"data": {"n": 7}}"#.into()),
        ..TestDeliveryArgs::default()
    };
    let argv = test.to_argv(&worker_flags(&url));
    let mut seen_ids = Vec::new();
    for (status, code, verdict) in [
        (200, exit::DELIVERED, "result: delivered (200)"),
        (404, exit::DEAD_LETTER, "result: dead-letter (http_status 404)"),
        (503, exit::RETRY, "result: retry (http_status 503)"),
        (410, exit::GONE, "result: gone (410)"),
    ] {
        sink.set_mode(Mode::status(status));
        let before = sink.hits().len();
        let out = tokio::task::spawn_blocking({
            let argv = argv.clone();
            move || {
                Command::new(WORKER)
                    .args(&argv)
                    .env("HOOKFLEET_SIGNING_SECRET", SECRET)
                    .env("HOOKFLEET_HEADER_0", API_KEY)
                    .output()
            }
        })
        .await??;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        println!(
            "--- sink answering {status}: exit {:?}\n{stdout}{stderr}",
            out.status.code()
        );
        ensure!(
            out.status.code() == Some(code),
            "{status}: exit {:?}\n{stdout}{stderr}",
            out.status.code()
        );
        let hits = sink.hits();
        ensure!(
            hits.len() == before + 1,
            "{status}: {} requests, want exactly one",
            hits.len() - before
        );
        let hit = hits.last().context("a request")?;
        verify_signature(hit, SECRET)?;
        let id = hit.id.clone().context("a webhook-id")?;
        ensure!(id.starts_with("test_") && id.len() == 37, "a fresh test id: {id}");
        seen_ids.push(id.clone());
        ensure!(
            hit.headers.get(H_TEST_DELIVERY).map(String::as_str) == Some("true"),
            "marker: {:?}",
            hit.headers
        );
        ensure!(
            hit.headers.get("x-api-key").map(String::as_str) == Some(API_KEY),
            "{:?}",
            hit.headers
        );
        ensure!(hit.headers.get("x-source").map(String::as_str) == Some("hookfleet"));
        ensure!(
            hit.path == "/hook" && hit.method == "POST",
            "{} {}",
            hit.method,
            hit.path
        );
        let body = String::from_utf8_lossy(&hit.body);
        ensure!(
            body == format!(r#"{{"order": {{"n": 7}}, "event": "orders.created", "id": "{id}"}}"#),
            "rendered: {body}"
        );
        // The report: request line, headers (the Secret's value never shown), the answer, the verdict.
        ensure!(stdout.contains(&format!("> POST {url}")), "{stdout}");
        ensure!(stdout.contains(&format!("> webhook-id: {id}")), "{stdout}");
        ensure!(stdout.contains("> webhook-signature: v1,"), "{stdout}");
        ensure!(
            stdout.contains("> x-api-key: ***") && !stdout.contains(API_KEY),
            "{stdout}"
        );
        ensure!(stdout.contains(&format!("> {H_TEST_DELIVERY}: true")), "{stdout}");
        ensure!(stdout.contains(&format!("< {status} ")), "{stdout}");
        ensure!(stdout.contains(verdict), "{stdout}");
        ensure!(!stdout.contains(SECRET) && !stderr.contains(SECRET) && !stderr.contains(API_KEY));
    }
    seen_ids.dedup();
    ensure!(seen_ids.len() == 4, "a fresh id each time: {seen_ids:?}");

    // A body the template cannot render: no request, dead-letter (template), as a worker would.
    let before = sink.requests();
    let bad = TestDeliveryArgs {
        body: Some("[1]".into()),
        ..TestDeliveryArgs::default()
    };
    let out = Command::new(WORKER)
        .args(bad.to_argv(&worker_flags(&url)))
        .env("HOOKFLEET_SIGNING_SECRET", SECRET)
        .env("HOOKFLEET_HEADER_0", API_KEY)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.code() == Some(exit::DEAD_LETTER), "{stdout}");
    ensure!(
        stdout.contains("(no request sent)") && stdout.contains("dead-letter (template"),
        "{stdout}"
    );
    ensure!(
        sink.requests() == before,
        "no request for a message that does not render"
    );

    // The worker's configuration errors are the worker's: exit 2 naming the setting.
    let out = Command::new(WORKER)
        .args(TestDeliveryArgs::default().to_argv(&worker_flags(&url)))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(exit::INVALID_CONFIG), "{stderr}");
    ensure!(stderr.contains("HOOKFLEET_HEADER_0"), "{stderr}");
    Ok(())
}
