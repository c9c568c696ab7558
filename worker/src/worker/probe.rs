//! A test delivery (`hookfleet-worker test-delivery`, the `oneshot` entry): one message that never came
//! from the broker, taken through this worker's own delivery path (the body or its template rendering,
//! the request `delivery` builds, with its headers, signature, auth, TLS and SSRF-guarded client), sent
//! once with the marker header, and judged by the same `fate::decide` as a real message. Nothing is
//! consumed, acknowledged or published: no broker connection is made. The rate limit, circuit breaker
//! and throttles are not consulted (one request).

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hookfleet_crds::contract::test_delivery::{H_TEST_DELIVERY, exit};
use hookfleet_crds::contract::webhooks::{Snapshot, webhook_id};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use reqwest::header::HeaderMap;

use super::delivery::{NO_TOKEN, answered};
use super::fate::{self, Fate, Limits, Store};
use super::shared::Worker;
use crate::auth::SendError;
use crate::outcome::{Outcome, classify_error, error_chain};
use crate::target::Target;

/// Bytes of a body (sent or answered) a report shows.
pub const SHOWN_BODY: usize = 2048;

/// The test message.
#[derive(Clone, Debug, Default)]
pub struct TestMessage {
    /// Its delivery id (fresh: `test_…`); with Webhooks the `webhook-id` is derived from it as for any
    /// message.
    pub id: String,
    /// Its routing key (and event name); `""` when not given.
    pub event: String,
    pub body: Vec<u8>,
    /// Its headers, as a publisher sets them.
    pub headers: Vec<(String, String)>,
    /// With Webhooks: the Webhook to send to (else the one the message matches).
    pub webhook: Option<String>,
}

/// The request as sent (secret values shown as `***`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shown {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// The destination's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// What a test delivery did, and what a worker would make of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestReport {
    /// `Integration NS/NAME` or `Webhook W of Integration NS/NAME`.
    pub to: String,
    /// Remarks before the request (a paused Webhook).
    pub notes: Vec<String>,
    /// `None` when nothing was sent (the template cannot render the message, it is too large).
    pub request: Option<Shown>,
    pub answer: Option<Answer>,
    /// Why there was no answer (a transport error, no OAuth2 token).
    pub error: Option<String>,
    pub latency: Option<Duration>,
    /// What a worker would do: `delivered`, `retry`, `dead-letter` or `gone`, and why.
    pub verdict: String,
    /// The exit code ([`exit`]).
    pub exit: i32,
}

impl Worker {
    /// Sends `msg` once to the single destination, or with Webhooks (`snapshot`: the fleet's, as the
    /// operator compiled it) to the named or the one matching Webhook. `Err`: nothing was sent, and why.
    pub async fn test_delivery(
        &self,
        msg: &TestMessage,
        snapshot: Option<&Snapshot>,
    ) -> Result<TestReport, String> {
        let mut headers = FieldTable::default();
        for (k, v) in &msg.headers {
            headers.insert(
                ShortString::from(k.as_str()),
                AMQPValue::LongString(LongString::from(v.as_bytes().to_vec())),
            );
        }
        let integration = format!("Integration {}", self.cfg.integration);
        let mut notes = Vec::new();
        let (to, id, hook) = match (&self.single, &self.hooks) {
            (Some(_), _) => {
                if let Some(w) = &msg.webhook {
                    return Err(format!(
                        "{integration} has a single destination, no Webhooks (--webhook {w})"
                    ));
                }
                (integration, msg.id.clone(), None)
            }
            (None, Some(hooks)) => {
                let snapshot = snapshot.ok_or("no Webhooks snapshot")?;
                // The event name as the fan-out reads it: the configured header, else the routing key.
                if let Some(h) = &hooks.mode.event_name_header
                    && !msg.headers.iter().any(|(k, _)| k == h)
                    && !msg.event.is_empty()
                {
                    headers.insert(
                        ShortString::from(h.as_str()),
                        AMQPValue::LongString(LongString::from(msg.event.as_bytes().to_vec())),
                    );
                }
                let loaded = hooks.builder.build(snapshot, "test-delivery", None);
                let hook = match &msg.webhook {
                    Some(name) => loaded.get(name).cloned().ok_or_else(|| {
                        format!(
                            "Webhook {name} is not in the fleet's snapshot (not valid, or not compiled yet: \
                             kubectl describe webhook {name})"
                        )
                    })?,
                    None => {
                        let event = match &hooks.mode.event_name_header {
                            Some(h) => header_of(&msg.headers, h).unwrap_or_else(|| msg.event.clone()),
                            None => msg.event.clone(),
                        };
                        let mut found = loaded.matching(&event, |k| header_of(&msg.headers, k));
                        match found.len() {
                            1 => found.remove(0),
                            0 => {
                                return Err(format!(
                                    "no Webhook matches event {event:?}: name one with --webhook"
                                ));
                            }
                            _ => {
                                let names: Vec<&str> = found.iter().map(|h| h.name.as_str()).collect();
                                return Err(format!(
                                    "{} Webhooks match event {event:?} ({}): name one with --webhook",
                                    names.len(),
                                    names.join(", ")
                                ));
                            }
                        }
                    }
                };
                if hook.paused {
                    notes.push(format!(
                        "Webhook {} is paused: the fleet holds its messages; the test delivery is sent anyway",
                        hook.name
                    ));
                }
                if hook.target.is_none() {
                    // Why it cannot be built, as the worker logs it (setting, never a value).
                    let entry = snapshot.webhooks.iter().find(|e| e.name == hook.name);
                    let why = entry
                        .map(|e| crate::webhooks::build_destination(e, self.cfg.allow_private_networks))
                        .and_then(Result::err)
                        .map_or_else(|| "its destination cannot be built".to_owned(), |e| e.to_string());
                    return Err(format!("Webhook {}: {why}", hook.name));
                }
                (
                    format!("Webhook {} of {integration}", hook.name),
                    webhook_id(&msg.id, &hook.name),
                    Some(hook),
                )
            }
            (None, None) => return Err("the worker has no destination".into()),
        };
        let target: &Target = match (&hook, &self.single) {
            (Some(h), _) => h.target.as_ref().expect("checked above"),
            (None, Some(t)) => t,
            (None, None) => unreachable!("resolved above"),
        };
        let mut d = Delivery::mock(
            0,
            ShortString::from(""),
            ShortString::from(msg.event.as_str()),
            false,
            Vec::new(),
        );
        d.properties = BasicProperties::default()
            .with_message_id(ShortString::from(msg.id.as_str()))
            .with_headers(headers);
        let mut report = TestReport {
            to,
            notes,
            request: None,
            answer: None,
            error: None,
            latency: None,
            verdict: String::new(),
            exit: exit::NOT_SENT,
        };
        let outcome = self.send_test(target, &d, &id, &msg.body, &mut report).await;
        let (code, verdict) = self.verdict(outcome);
        report.exit = code;
        report.verdict = verdict;
        Ok(report)
    }

    /// Renders and sends, filling `report` with what was sent and answered; the outcome.
    async fn send_test(
        &self,
        target: &Target,
        d: &Delivery,
        id: &str,
        message: &[u8],
        report: &mut TestReport,
    ) -> Outcome {
        if message.len() > self.cfg.max_message_bytes {
            return Outcome::TooLarge {
                size: message.len(),
                max: self.cfg.max_message_bytes,
            };
        }
        let body = match Self::body(target, d, &Bytes::copy_from_slice(message), id) {
            Ok(b) => b,
            Err(o) => return o,
        };
        let secrets = &target.dest.secrets;
        let req = Self::request(target, d, id, body.clone()).header(H_TEST_DELIVERY, "true");
        if let Some(built) = req.try_clone().and_then(|r| r.build().ok()) {
            let mut headers = shown_headers(built.headers(), secrets);
            if let Some(o) = &target.dest.oauth2 {
                headers.push((
                    "authorization".into(),
                    format!("*** (an OAuth2 token from {})", o.token_url),
                ));
            }
            report.request = Some(Shown {
                method: built.method().to_string(),
                url: hookfleet_crds::redact::userinfo(built.url().as_str()),
                headers,
                body: shown_body(&body, secrets),
            });
        }
        let started = Instant::now();
        let outcome = match crate::auth::send(&target.http, target.tokens.as_ref(), req).await {
            Ok(resp) => {
                let outcome = answered(&resp);
                let (status, headers) = (resp.status().as_u16(), shown_headers(resp.headers(), secrets));
                let mut read = Vec::new();
                let mut resp = resp;
                while read.len() < 64 * 1024 {
                    match resp.chunk().await {
                        Ok(Some(c)) => read.extend_from_slice(&c),
                        _ => break,
                    }
                }
                report.answer = Some(Answer {
                    status,
                    headers,
                    body: shown_body(&read, secrets),
                });
                outcome
            }
            Err(SendError::Token(e)) => {
                report.error = Some(scrub(&e.to_string(), secrets));
                NO_TOKEN
            }
            Err(SendError::Http(e)) => {
                report.error = Some(scrub(&error_chain(&e), secrets));
                classify_error(&e)
            }
        };
        report.latency = Some(started.elapsed());
        outcome
    }

    /// What a worker would do with a first attempt that came to `outcome`: (exit code, one line).
    fn verdict(&self, outcome: Outcome) -> (i32, String) {
        let limits = Limits {
            max_attempts: self.cfg.max_attempts,
            backoff: &self.cfg.backoff,
        };
        let status = |s: Option<u16>| s.map(|s| format!(" {s}")).unwrap_or_default();
        match outcome {
            Outcome::Gone if self.hooks.is_some() => (
                exit::GONE,
                "gone (410): the operator would pause this Webhook; its messages would wait".into(),
            ),
            Outcome::Gone => (
                exit::GONE,
                "gone (410): the workers would stop and the operator scale the fleet to 0 (DestinationGone); \
                 messages would wait in the queue"
                    .into(),
            ),
            o => match fate::decide(o, 1, limits, &mut rand::rng()) {
                Fate::Ack { status } => (
                    exit::DELIVERED,
                    format!("delivered ({status}): a worker would acknowledge the message"),
                ),
                Fate::Store(Store::Retry {
                    failure, next_in, ..
                }) => (
                    exit::RETRY,
                    format!(
                        "retry ({}{}): a worker would retry the message in about {} (attempt 1 of {})",
                        failure.reason,
                        status(failure.status),
                        hookfleet_crds::duration::render(next_in),
                        self.cfg.max_attempts
                    ),
                ),
                Fate::Store(Store::DeadLetter {
                    reason,
                    failure,
                    detail,
                    ..
                }) => (
                    exit::DEAD_LETTER,
                    format!(
                        "dead-letter ({reason}{}{}): a worker would move the message to {}",
                        status(failure.status),
                        detail.map(|d| format!(": {d}")).unwrap_or_default(),
                        self.cfg.dead_letter_queue
                    ),
                ),
                other => (exit::RETRY, format!("not delivered: {other:?}")),
            },
        }
    }
}

/// A header of the test message.
fn header_of(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

/// `text` with every secret value replaced by `***`.
fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s.as_str(), "***");
    }
    out
}

/// Headers as shown: sensitive values (credentials, headers from Secrets) as `***`, secrets scrubbed.
fn shown_headers(headers: &HeaderMap, secrets: &[String]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            let value = if v.is_sensitive() {
                "***".to_owned()
            } else {
                scrub(&String::from_utf8_lossy(v.as_bytes()), secrets)
            };
            (n.as_str().to_owned(), value)
        })
        .collect()
}

/// At most [`SHOWN_BODY`] bytes of `body` as text, secrets scrubbed, control characters other than line
/// breaks and tabs as spaces.
fn shown_body(body: &[u8], secrets: &[String]) -> String {
    let mut end = body.len().min(SHOWN_BODY);
    let text = loop {
        match std::str::from_utf8(&body[..end]) {
            Ok(t) => break t.to_owned(),
            // Cut inside a character: one byte less (a non-UTF-8 body falls back to lossy below).
            Err(e) if e.valid_up_to() + 4 >= end && e.valid_up_to() > 0 => end = e.valid_up_to(),
            Err(_) => break String::from_utf8_lossy(&body[..end]).into_owned(),
        }
    };
    let text: String = text
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                ' '
            } else {
                c
            }
        })
        .collect();
    let mut text = scrub(&text, secrets);
    if body.len() > SHOWN_BODY {
        text.push_str(&format!("… ({} bytes in all)", body.len()));
    }
    text
}

impl fmt::Display for TestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "test delivery to {}", self.to)?;
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        match &self.request {
            Some(r) => {
                writeln!(f, "> {} {}", r.method, r.url)?;
                for (k, v) in &r.headers {
                    writeln!(f, "> {k}: {v}")?;
                }
                writeln!(f, ">")?;
                for line in r.body.lines() {
                    writeln!(f, "> {line}")?;
                }
            }
            None => writeln!(f, "(no request sent)")?,
        }
        if let Some(a) = &self.answer {
            let reason = reqwest::StatusCode::from_u16(a.status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("");
            let took = self
                .latency
                .map(|l| format!(" in {} ms", l.as_millis()))
                .unwrap_or_default();
            writeln!(f, "< {} {reason}{took}", a.status)?;
            for (k, v) in &a.headers {
                writeln!(f, "< {k}: {v}")?;
            }
            writeln!(f, "<")?;
            for line in a.body.lines() {
                writeln!(f, "< {line}")?;
            }
        }
        if let Some(e) = &self.error {
            let took = self
                .latency
                .map(|l| format!(" after {} ms", l.as_millis()))
                .unwrap_or_default();
            writeln!(f, "no answer{took}: {e}")?;
        }
        writeln!(f, "result: {}", self.verdict)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::http::HeaderMap as Received;
    use hookfleet_crds::integration::Unmatched;

    use super::*;
    use crate::config::{Config, WebhooksMode};
    use crate::metrics::Metrics;

    /// A destination on loopback answering 200, keeping the `webhook-id` and path of each request.
    async fn destination() -> (String, Arc<Mutex<Vec<(String, String)>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: Received| {
            let g = g.clone();
            async move {
                let id = headers["webhook-id"].to_str().unwrap().to_owned();
                g.lock().unwrap().push((uri.path().to_owned(), id));
                "ok"
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, got)
    }

    #[tokio::test]
    async fn with_webhooks_the_named_or_the_one_matching_webhook_gets_it() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (url, got) = destination().await;
        let cfg = Config::for_tests(
            None,
            Some(WebhooksMode {
                secret: "fleet-webhooks".into(),
                namespace: "ns".into(),
                event_name_header: None,
                unmatched: Unmatched::default(),
            }),
        );
        let w = Worker::new(cfg, Arc::new(Metrics::new(""))).unwrap();
        let hook = |name: &str, event: &str| {
            crate::webhooks::entry(
                name,
                &[event],
                serde_json::json!({"url": format!("{url}/{name}")}),
                &[],
            )
        };
        let snapshot = Snapshot {
            webhooks: vec![hook("acme", "temp"), hook("beta", "temp"), hook("gamma", "door")],
        };
        let msg = |webhook: Option<&str>, event: &str| TestMessage {
            id: "test_1".into(),
            event: event.into(),
            body: b"{}".to_vec(),
            headers: Vec::new(),
            webhook: webhook.map(Into::into),
        };
        let r = w
            .test_delivery(&msg(Some("acme"), ""), Some(&snapshot))
            .await
            .unwrap();
        assert_eq!(
            (r.exit, r.to.as_str()),
            (exit::DELIVERED, "Webhook acme of Integration ")
        );
        let r = w
            .test_delivery(&msg(None, "door/front"), Some(&snapshot))
            .await
            .unwrap();
        assert_eq!(r.exit, exit::DELIVERED);
        assert_eq!(
            *got.lock().unwrap(),
            [
                ("/acme".to_owned(), "test_1:acme".to_owned()),
                ("/gamma".into(), "test_1:gamma".into())
            ]
        );
        let e = w
            .test_delivery(&msg(None, "temperature"), Some(&snapshot))
            .await
            .unwrap_err();
        assert!(e.contains("2 Webhooks match") && e.contains("acme, beta"), "{e}");
        let e = w
            .test_delivery(&msg(None, "window"), Some(&snapshot))
            .await
            .unwrap_err();
        assert!(e.starts_with("no Webhook matches"), "{e}");
        let e = w
            .test_delivery(&msg(Some("nope"), ""), Some(&snapshot))
            .await
            .unwrap_err();
        assert!(e.contains("not in the fleet's snapshot"), "{e}");
        assert_eq!(got.lock().unwrap().len(), 2, "nothing sent for a refusal");
    }

    #[test]
    fn shown_bodies_are_bounded_scrubbed_and_keep_their_lines() {
        let secrets = vec!["s3cr3t".to_owned()];
        assert_eq!(shown_body(b"a\nb s3cr3t\x07", &secrets), "a\nb *** ");
        let long = "é".repeat(SHOWN_BODY);
        let shown = shown_body(long.as_bytes(), &[]);
        assert!(shown.starts_with("éé") && shown.ends_with(&format!("({} bytes in all)", long.len())));
        assert!(!shown.contains('\u{FFFD}'), "never cut inside a character");
        let mut h = HeaderMap::new();
        let mut secret = reqwest::header::HeaderValue::from_static("Bearer t");
        secret.set_sensitive(true);
        h.insert("authorization", secret);
        h.insert("x-echo", "got s3cr3t".parse().unwrap());
        assert_eq!(
            shown_headers(&h, &secrets),
            [
                ("authorization".to_owned(), "***".to_owned()),
                ("x-echo".into(), "got ***".into())
            ]
        );
    }
}
