//! Webhooks between the operator and the worker: the **snapshot** the operator compiles for a fleet
//! (every valid Webhook naming the Integration, with the values of the Secret keys it references) and
//! writes to one Secret the workers of that Integration alone may read ([`snapshot_secret`],
//! [`SNAPSHOT_KEY`]); and the **reports** the workers publish on the broker ([`reports_queue`]; on a NATS
//! source a JetStream stream, [`nats`]) from which the operator writes each Webhook's status.
//!
//! Also what both sides name the same way: the header that ties a retry or dead-letter copy to its
//! Webhook ([`H_WEBHOOK`]), and the `webhook-id` of a (message, Webhook) pair ([`webhook_id`]).

use std::collections::BTreeMap;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::integration::{DestinationSpec, SecretKeyRef};
use crate::webhook::WebhookRateLimit;

/// The Secret holding the snapshot of Integration `integration`'s Webhooks: `<integration>-webhooks`.
pub fn snapshot_secret(integration: &str) -> String {
    format!("{integration}-webhooks")
}

/// The key of the snapshot in its Secret: gzip-compressed JSON of a [`Snapshot`].
pub const SNAPSHOT_KEY: &str = "webhooks.json.gz";

/// Header on a retry or dead-letter copy naming the Webhook it is for: a retry goes to that Webhook
/// alone, and a Webhook's dead letters can be found (and replayed) by it.
pub const H_WEBHOOK: &str = "x-hookfleet-webhook";

/// Where a Webhook's TLS files are looked up in its entry's secrets (the paths of
/// [`super::WorkerSetup::for_webhook`]'s file flags).
pub const TLS_CA_FILE: &str = "webhook:tls-ca";
pub const TLS_CLIENT_CERT_FILE: &str = "webhook:tls-client-cert";
pub const TLS_CLIENT_KEY_FILE: &str = "webhook:tls-client-key";

/// The `webhook-id` of message `message_id` delivered to `webhook`: stable across retries and
/// redeliveries (both parts are), different for each Webhook the message matches.
pub fn webhook_id(message_id: &str, webhook: &str) -> String {
    format!("{message_id}:{webhook}")
}

/// The key of a Secret key's value in [`Entry::secrets`]: `<secret>/<key>`.
pub fn secret_key(r: &SecretKeyRef) -> String {
    format!("{}/{}", r.name, r.key)
}

/// Every Webhook a fleet delivers, as the operator compiled them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Sorted by name.
    pub webhooks: Vec<Entry>,
}

/// One Webhook in a [`Snapshot`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub name: String,
    /// The Webhook's `metadata.generation` (reported back, so status says which spec was delivered).
    pub generation: i64,
    pub events: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub paused: bool,
    pub destination: DestinationSpec,
    /// The values of the Secret keys this destination references ([`secret_key`] → value): this
    /// Webhook's and no other's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
    /// Its requests in flight per worker (its own `limits` or its Integration's `perWebhook`, as the
    /// operator resolved them); the worker takes at most half its concurrency in any case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// Its request rate, resolved likewise, with its scope always set (`fleet`: divided among the
    /// consumers of the work queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<WebhookRateLimit>,
}

impl Snapshot {
    /// Gzip-compressed JSON (what [`SNAPSHOT_KEY`] holds).
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("a snapshot serializes");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&json).expect("writing to memory");
        gz.finish().expect("writing to memory")
    }

    /// The snapshot in `bytes` (as [`Snapshot::encode`] wrote it).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut json)
            .map_err(|e| format!("not gzip: {e}"))?;
        serde_json::from_slice(&json).map_err(|e| format!("not a Webhooks snapshot: {e}"))
    }
}

/// The queue the workers of `queue`'s fleet publish their reports to: `<queue>.webhook-reports`.
pub fn reports_queue(queue: &str) -> String {
    format!("{queue}.webhook-reports")
}

/// On a NATS source, the JetStream names of a fleet with Webhooks (durable consumer `consumer`), and the
/// reports stream both sides create alike ([`nats::reports_stream_config`]), like the RabbitMQ reports
/// queue.
pub mod nats {
    /// The stream the workers publish their reports to: `<consumer>-reports`.
    pub fn reports_stream(consumer: &str) -> String {
        format!("{consumer}-reports")
    }

    /// The subject of the reports: `hookfleet.reports.<consumer>`.
    pub fn reports_subject(consumer: &str) -> String {
        format!("hookfleet.reports.{consumer}")
    }

    /// The reports stream as JetStream's API takes it (`$JS.API.STREAM.CREATE`), for the worker and the
    /// operator alike to read into their client's type: work-queue retention (a report is gone once the
    /// operator acked it), the newest [`REPORTS_MAX_LENGTH`] reports of at most [`REPORTS_TTL_MS`] age,
    /// file storage.
    ///
    /// [`REPORTS_MAX_LENGTH`]: super::REPORTS_MAX_LENGTH
    /// [`REPORTS_TTL_MS`]: super::REPORTS_TTL_MS
    pub fn reports_stream_config(consumer: &str) -> serde_json::Value {
        serde_json::json!({
            "name": reports_stream(consumer),
            "subjects": [reports_subject(consumer)],
            "retention": "workqueue",
            "max_msgs": super::REPORTS_MAX_LENGTH,
            "max_age": super::REPORTS_TTL_MS * 1_000_000,
            "discard": "old",
            "storage": "file",
            "num_replicas": 1,
        })
    }

    /// The operator's durable consumer on the reports stream.
    pub const REPORTS_CONSUMER: &str = "hookfleet-operator";

    /// The stream holding a fleet's Webhook retry copies: `<consumer>-retry` (also the name of the
    /// workers' durable consumer on it). A copy is published as a message schedule on a subject of its
    /// own under [`schedule_prefix`] and fired, at its due time, to [`retry_subject`].
    pub fn retry_stream(consumer: &str) -> String {
        format!("{consumer}-retry")
    }

    /// The subjects under which Webhook copies wait for their due time: `hookfleet.sched.<consumer>`.
    pub fn schedule_prefix(consumer: &str) -> String {
        format!("hookfleet.sched.{consumer}")
    }

    /// The subject due Webhook copies are fired to, consumed in the workers' retry lane:
    /// `hookfleet.retry.<consumer>`.
    pub fn retry_subject(consumer: &str) -> String {
        format!("hookfleet.retry.{consumer}")
    }
}

/// `x-max-length` and `x-message-ttl` (ms) of the reports queue (both sides declare it alike): reports
/// a stopped operator never reads are dropped, oldest first, instead of growing on the broker.
pub const REPORTS_MAX_LENGTH: i64 = 10_000;
pub const REPORTS_TTL_MS: i64 = 10 * 60 * 1000;

/// What one worker saw of the Webhooks since its previous report (counts are deltas).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The pod (or host) name of the worker.
    pub worker: String,
    /// When the report was made (ms since the epoch).
    pub at_ms: i64,
    /// Webhook name → what happened to it.
    pub webhooks: BTreeMap<String, Tally>,
}

/// One Webhook in a [`Report`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Tally {
    /// The generation of the entry the worker delivered with.
    pub generation: i64,
    pub delivered: u64,
    pub failed: u64,
    pub dead_lettered: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<FailureNote>,
    /// Failed attempts at this worker since its last success for this Webhook.
    pub consecutive_failures: u64,
}

/// A failed attempt, as reported (no secrets: the worker removes the Webhook's secret values and
/// control characters from the excerpt).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FailureNote {
    pub at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excerpt: Option<String>,
}

/// Most bytes of a response body an excerpt keeps.
pub const EXCERPT_MAX: usize = 256;

/// A response excerpt fit for status: at most [`EXCERPT_MAX`] bytes of `body` as text, control
/// characters as spaces, every one of `secrets` (non-empty values) replaced by `***`.
pub fn excerpt<'a>(body: &[u8], secrets: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut text: String = String::from_utf8_lossy(body)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    for s in secrets {
        if !s.is_empty() {
            text = text.replace(s, "***");
        }
    }
    let mut end = text.len().min(EXCERPT_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let text = text[..end].trim();
    (!text.is_empty()).then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_round_trips_through_its_encoding() {
        let dst: DestinationSpec =
            serde_json::from_value(serde_json::json!({"url": "https://a.example/h"})).unwrap();
        let snap = Snapshot {
            webhooks: vec![Entry {
                name: "acme".into(),
                generation: 3,
                events: vec!["temp".into()],
                match_headers: BTreeMap::from([("device".into(), "d-1".into())]),
                paused: false,
                destination: dst,
                secrets: BTreeMap::from([("acme-key/key".into(), "s3cr3t".into())]),
                max_in_flight: Some(4),
                rate_limit: Some(WebhookRateLimit {
                    per_second: 10,
                    burst: None,
                    scope: Some(crate::integration::RateLimitScope::Fleet),
                }),
            }],
        };
        assert_eq!(Snapshot::decode(&snap.encode()), Ok(snap));
        assert!(Snapshot::decode(b"{}").unwrap_err().starts_with("not gzip"));
    }

    #[test]
    fn an_excerpt_has_no_secret_and_no_control_character() {
        let e = excerpt(b"bad token s3cr3t\r\nfor acme", ["s3cr3t", ""]).unwrap();
        assert_eq!(e, "bad token ***  for acme");
        assert_eq!(excerpt(&[b'x'; 1000], []).unwrap().len(), EXCERPT_MAX);
        assert_eq!(excerpt(b"  \n", []), None);
        // Never cut inside a character.
        let long = "é".repeat(200);
        assert!(excerpt(long.as_bytes(), []).unwrap().len() <= EXCERPT_MAX);
    }

    #[test]
    fn ids_and_names() {
        assert_eq!(webhook_id("m-1", "acme"), "m-1:acme");
        assert_eq!(snapshot_secret("fleet"), "fleet-webhooks");
        assert_eq!(reports_queue("events"), "events.webhook-reports");
    }
}
