//! Auth, TLS and keys on outgoing calls (issue 10), against a real RabbitMQ node, the harness's sink
//! (plain and HTTPS, with a CA of its own) and the real worker binary: HTTPS with a custom CA and a clear
//! TLS error without it; mTLS required by the sink; OAuth2 client credentials (cached, refreshed,
//! a token endpoint failure retried); basic auth and several signing keys, no secret in logs or dead
//! letters.

mod common;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::Result;
use base64::Engine;
use common::*;
use hookfleet_testkit::RabbitMq;
use hookfleet_testkit::pki::TestCa;
use hookfleet_testkit::sink::{Mode, Sink, SinkTls};
use hookfleet_testkit::token::{TokenAnswer, TokenEndpoint};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Quick retries, so messages held back by a TLS or token failure return within seconds.
const FAST_RETRIES: [&str; 4] = ["--backoff-initial", "200ms", "--backoff-max", "1s"];

fn retried(metrics: &str, reason: &str) -> f64 {
    metric(
        metrics,
        &format!(
            "hookfleet_deliveries_total{{integration=\"test/worker\",result=\"retried\",reason=\"{reason}\"}}"
        ),
    )
}

async fn wait_retried(w: &Worker, reason: &str, at_least: f64) -> Result<f64> {
    hookfleet_testkit::process::wait_for(
        "retries",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let m = w.metrics().await?;
            let n = retried(&m, reason);
            Ok((n >= at_least).then_some(n))
        },
    )
    .await
}

fn write(dir: &std::path::Path, name: &str, pem: &str) -> Result<String> {
    let p = dir.join(name);
    std::fs::write(&p, pem)?;
    Ok(p.display().to_string())
}

/// HTTPS delivery with the sink's CA; without it, a TLS error that is retried (not dead-lettered) and
/// logged with rustls's reason; once the CA is given, every held-back message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_custom_ca_and_a_clear_tls_error_without() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("sink-ca")?;
    let (cert_pem, key_pem) = ca.server(&["127.0.0.1".into()])?;
    let sink = Sink::start_tls(
        LOCALHOST,
        true,
        SinkTls {
            cert_pem,
            key_pem,
            client_ca_pem: None,
        },
    )
    .await?;
    assert!(sink.url().starts_with("https://127.0.0.1:"));
    let ca_file = write(dir.path(), "ca.pem", &ca.ca_pem)?;
    let published = ids("tls", 40);
    publish(&rmq, "tls.q", &published).await?;

    let mut without = start_worker(
        &rmq,
        "tls.q",
        &sink.url(),
        &FAST_RETRIES,
        &[],
        dir.path(),
        "no-ca",
    )
    .await?;
    let n = wait_retried(&without, "tls", 5.0).await?;
    without.process.stop(Duration::from_secs(10));
    let log = std::fs::read_to_string(without.process.log_path())?;
    assert!(
        log.contains("TLS with the destination failed") && log.contains("UnknownIssuer"),
        "the log names the TLS failure:\n{}",
        without.process.log_tail(20)
    );
    assert!(sink.hits().is_empty(), "nothing reached the sink without the CA");
    assert!(sink.tls_refused() > 0);
    assert_eq!(
        queue_stats(&rmq, "tls.q.dead")?.0,
        0,
        "a TLS error is never dead-lettered"
    );

    let with = start_worker(
        &rmq,
        "tls.q",
        &sink.url(),
        &[&FAST_RETRIES[..], &["--tls-ca-file", &ca_file]].concat(),
        &[],
        dir.path(),
        "with-ca",
    )
    .await?;
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(60)).await?;
    let dups = account(&published, &sink.delivered(), &HashSet::new())?;
    assert_eq!(retried(&with.metrics().await?, "tls"), 0.0);
    eprintln!(
        "https: without the CA {n} attempts retried (reason tls), sink refused {} handshakes; with the CA \
         {} of {} delivered over HTTPS, {dups} duplicates",
        sink.tls_refused(),
        sink.delivered().len(),
        published.len(),
    );
    Ok(())
}

/// A sink that requires a client certificate: refused without one (a retryable TLS failure),
/// delivered with the certificate from the files the operator mounts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_delivers_with_the_client_certificate_and_is_refused_without() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let server_ca = TestCa::new("sink-ca")?;
    let client_ca = TestCa::new("client-ca")?;
    let (cert_pem, key_pem) = server_ca.server(&["127.0.0.1".into()])?;
    let sink = Sink::start_tls(
        LOCALHOST,
        true,
        SinkTls {
            cert_pem,
            key_pem,
            client_ca_pem: Some(client_ca.ca_pem.clone()),
        },
    )
    .await?;
    let ca_file = write(dir.path(), "ca.pem", &server_ca.ca_pem)?;
    let (client_cert, client_key) = client_ca.client("hookfleet-worker")?;
    let cert_file = write(dir.path(), "tls.crt", &client_cert)?;
    let key_file = write(dir.path(), "tls.key", &client_key)?;
    // A certificate from another CA is refused too.
    let (stranger_cert, stranger_key) = server_ca.client("stranger")?;
    let stranger_cert_file = write(dir.path(), "stranger.crt", &stranger_cert)?;
    let stranger_key_file = write(dir.path(), "stranger.key", &stranger_key)?;
    let published = ids("mtls", 30);
    publish(&rmq, "mtls.q", &published).await?;

    let trust = [&FAST_RETRIES[..], &["--tls-ca-file", &ca_file]].concat();
    for (name, extra) in [
        ("no-cert", trust.clone()),
        (
            "stranger-cert",
            [
                &trust[..],
                &[
                    "--tls-client-cert-file",
                    &stranger_cert_file,
                    "--tls-client-key-file",
                    &stranger_key_file,
                ],
            ]
            .concat(),
        ),
    ] {
        let refused_before = sink.tls_refused();
        let mut w = start_worker(&rmq, "mtls.q", &sink.url(), &extra, &[], dir.path(), name).await?;
        let n = wait_retried(&w, "tls", 3.0).await?;
        w.process.stop(Duration::from_secs(10));
        assert!(sink.hits().is_empty(), "{name}: no request got through");
        let refused = sink.tls_refused() - refused_before;
        assert!(refused > 0, "{name}: the sink refused the handshake");
        eprintln!(
            "mtls: {name}: {n} attempts retried (reason tls), {refused} handshakes refused by the sink"
        );
    }
    assert_eq!(queue_stats(&rmq, "mtls.q.dead")?.0, 0);

    let _w = start_worker(
        &rmq,
        "mtls.q",
        &sink.url(),
        &[
            &trust[..],
            &[
                "--tls-client-cert-file",
                &cert_file,
                "--tls-client-key-file",
                &key_file,
            ],
        ]
        .concat(),
        &[],
        dir.path(),
        "client-cert",
    )
    .await?;
    let want: HashSet<String> = published.iter().cloned().collect();
    sink.wait_delivered(&want, Duration::from_secs(60)).await?;
    let dups = account(&published, &sink.delivered(), &HashSet::new())?;
    eprintln!(
        "mtls: with the client certificate {} of {} delivered, {dups} duplicates",
        sink.delivered().len(),
        published.len()
    );
    Ok(())
}

/// OAuth2 client credentials: one token for many deliveries; a 401 drops it once and the request is
/// sent again with a fresh one; a token that expires is fetched again; a token endpoint that fails
/// holds messages back (retried, never dead-lettered) until it answers; no credential in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_token_is_cached_refreshed_and_its_failure_retried() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    let tokens = TokenEndpoint::start(TokenAnswer::Token {
        token: "tok-1".into(),
        expires_in: 3600,
    })
    .await?;
    sink.set_accepted_authorization(Some(&["Bearer tok-1"]));
    let (client_id, client_secret) = ("hookfleet-client", "s3cret/with+symbols");
    let w = start_worker(
        &rmq,
        "oauth.q",
        &sink.url(),
        &[
            &FAST_RETRIES[..],
            &[
                "--oauth2-token-url",
                &tokens.url(),
                "--oauth2-scope",
                "hooks.write",
                "--oauth2-scope",
                "hooks.read",
                "--concurrency",
                "16",
            ],
        ]
        .concat(),
        &[
            ("HOOKFLEET_OAUTH2_CLIENT_ID", client_id),
            ("HOOKFLEET_OAUTH2_CLIENT_SECRET", client_secret),
            ("HOOKFLEET_LOG", "debug,lapin=info"),
        ],
        dir.path(),
        "oauth",
    )
    .await?;

    // 1. One token for a whole batch.
    let batch1 = ids("oa1", 50);
    publish(&rmq, "oauth.q", &batch1).await?;
    sink.wait_delivered(&batch1.iter().cloned().collect(), Duration::from_secs(60))
        .await?;
    let reqs = tokens.requests();
    assert_eq!(reqs.len(), 1, "one token request for 50 deliveries");
    let basic = base64::engine::general_purpose::STANDARD.encode("hookfleet-client:s3cret%2Fwith%2Bsymbols");
    assert_eq!(
        reqs[0].authorization.as_deref(),
        Some(format!("Basic {basic}").as_str())
    );
    assert_eq!(
        reqs[0].body,
        "grant_type=client_credentials&scope=hooks.write+hooks.read"
    );

    // 2. The destination stops accepting the token: each request that gets a 401 drops it and is sent
    // again with a fresh one.
    tokens.set_answer(TokenAnswer::Token {
        token: "tok-2".into(),
        expires_in: 2,
    });
    sink.set_accepted_authorization(Some(&["Bearer tok-2"]));
    let batch2 = ids("oa2", 30);
    publish(&rmq, "oauth.q", &batch2).await?;
    sink.wait_delivered(&batch2.iter().cloned().collect(), Duration::from_secs(60))
        .await?;
    let after_401 = tokens.requests().len();
    assert_eq!(after_401, 2, "the 401 invalidated the token once");
    let m = w.metrics().await?;
    assert_eq!(
        metric(&m, "hookfleet_dead_letters_total{"),
        0.0,
        "a 401 answered by a fresh token dead-letters nothing"
    );

    // 3. tok-2 lives 2 s (used for 1 s): after it, a new one is fetched before any request is refused.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    tokens.set_answer(TokenAnswer::Token {
        token: "tok-3".into(),
        expires_in: 3600,
    });
    sink.set_accepted_authorization(Some(&["Bearer tok-2", "Bearer tok-3"]));
    let unauthorized_before = sink.hits().iter().filter(|h| h.status == 401).count();
    let batch3 = ids("oa3", 10);
    publish(&rmq, "oauth.q", &batch3).await?;
    sink.wait_delivered(&batch3.iter().cloned().collect(), Duration::from_secs(60))
        .await?;
    assert_eq!(tokens.requests().len(), 3, "the expired token was fetched again");
    assert!(
        sink.hits()
            .iter()
            .filter(|h| h.id.as_deref().is_some_and(|i| i.starts_with("oa3")))
            .all(|h| h.headers.get("authorization").map(String::as_str) == Some("Bearer tok-3")),
        "batch 3 went out with the new token only"
    );
    assert_eq!(
        sink.hits().iter().filter(|h| h.status == 401).count(),
        unauthorized_before
    );

    // 4. The token endpoint fails while a token is needed: messages wait in delay queues, none is
    // dead-lettered, and they arrive once it answers again.
    tokens.set_answer(TokenAnswer::Status(503));
    sink.set_accepted_authorization(Some(&["Bearer tok-4"]));
    let batch4 = ids("oa4", 20);
    publish(&rmq, "oauth.q", &batch4).await?;
    let held = wait_retried(&w, "oauth2_token", 10.0).await?;
    assert!(sink.delivered().keys().all(|k| !k.starts_with("oa4")));
    tokens.set_answer(TokenAnswer::Token {
        token: "tok-4".into(),
        expires_in: 3600,
    });
    sink.wait_delivered(&batch4.iter().cloned().collect(), Duration::from_secs(60))
        .await?;
    assert_eq!(queue_stats(&rmq, "oauth.q.dead")?.0, 0, "nothing dead-lettered");
    let all: Vec<String> = [batch1, batch2, batch3, batch4].concat();
    let dups = account(&all, &sink.delivered(), &HashSet::new())?;

    let log = std::fs::read_to_string(w.process.log_path())?;
    for secret in [
        client_secret,
        "s3cret",
        "tok-1",
        "tok-2",
        "tok-3",
        "tok-4",
        &basic,
    ] {
        assert!(!log.contains(secret), "the log shows {secret:?}");
    }
    eprintln!(
        "oauth2: {} delivered, {dups} duplicates, {} token requests in all (1 for 50 deliveries, +1 on a \
         401, +1 on expiry, then the 503s and the recovery), {held} attempts held back by the failing token \
         endpoint, 0 dead-lettered; no secret in {} log bytes at debug level",
        all.len(),
        tokens.requests().len(),
        log.len()
    );
    Ok(())
}

/// Basic auth from variables and two signing keys: each request carries the credentials and a
/// signature per key; neither the password nor the Authorization value is in the log (at debug level)
/// or in the dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_and_two_signing_keys_never_leak() -> Result<()> {
    init();
    let _serial = SERIAL.lock().await;
    let rmq = RabbitMq::start().await?;
    let dir = tempfile::tempdir()?;
    let sink = Sink::start().await?;
    let authorization = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("svc:pa55word")
    );
    sink.set_accepted_authorization(Some(&[authorization.as_str()]));
    let (old, new) = ("whsec_b2xkLWtleS1vbGQta2V5", "raw-new-signing-key");
    let w = start_worker(
        &rmq,
        "basic.q",
        &sink.url(),
        &["--signing-secret-env", "NEXT_KEY", "--max-attempts", "1"],
        &[
            ("HOOKFLEET_BASIC_AUTH_USERNAME", "svc"),
            ("HOOKFLEET_BASIC_AUTH_PASSWORD", "pa55word"),
            ("HOOKFLEET_SIGNING_SECRET", old),
            ("NEXT_KEY", new),
            ("HOOKFLEET_LOG", "debug,lapin=info"),
        ],
        dir.path(),
        "basic",
    )
    .await?;
    let ok = ids("ba", 20);
    publish(&rmq, "basic.q", &ok).await?;
    sink.wait_delivered(&ok.iter().cloned().collect(), Duration::from_secs(60))
        .await?;
    for hit in sink.hits() {
        hookfleet_testkit::messages::verify_signature(&hit, old)?;
        hookfleet_testkit::messages::verify_signature(&hit, new)?;
        assert_eq!(hit.headers["webhook-signature"].split(' ').count(), 2);
    }

    // Refused by the destination: dead letters, without the credentials.
    sink.set_mode(Mode::status(400));
    let bad = ids("bad", 5);
    publish(&rmq, "basic.q", &bad).await?;
    let dead = hookfleet_testkit::process::wait_for(
        "dead letters",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let d = drain(&rmq, "basic.q.dead").await?;
            Ok((!d.is_empty()).then_some(d))
        },
    )
    .await?;
    let mut dead = dead;
    while dead.len() < bad.len() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        dead.extend(drain(&rmq, "basic.q.dead").await?);
    }
    for d in &dead {
        let shown = format!("{:?} {}", d.headers, String::from_utf8_lossy(&d.body));
        for secret in ["pa55word", authorization.as_str(), "b2xkLWtleS1vbGQta2V5", new] {
            assert!(
                !shown.contains(secret),
                "dead letter {} carries {secret:?}: {shown}",
                d.id
            );
        }
    }
    drop(w);
    let log = std::fs::read_to_string(dir.path().join("basic.log"))?;
    for secret in ["pa55word", authorization.as_str(), "b2xkLWtleS1vbGQta2V5", new] {
        assert!(!log.contains(secret), "the log shows {secret:?}");
    }
    eprintln!(
        "basic: {} delivered with basic auth and 2 signatures each (both verify), {} dead letters, no \
         secret in {} log bytes at debug level or in the dead letters",
        ok.len(),
        dead.len(),
        log.len()
    );
    Ok(())
}
