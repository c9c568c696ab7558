//! What the worker reads from and writes onto a message: its delivery id, attempt count and first-seen
//! time (carried in headers across retries), and the headers of a retry or a dead letter.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use sha2::{Digest, Sha256};

/// The headers the worker reads and writes (the contract's names: `kubectl hookfleet replay` reads them too).
pub use hookfleet_crds::contract::headers::{
    H_ATTEMPTS, H_DEAD_AT, H_DEAD_REASON, H_EXCHANGE, H_FIRST_SEEN, H_ID, H_LAST_ERROR, H_LAST_STATUS,
    H_NEXT_DELAY, H_ROUTING_KEY,
};
/// The Webhook a retry or dead-letter copy is for (the contract's name).
pub use hookfleet_crds::contract::webhooks::H_WEBHOOK;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What the worker knows about a message it received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub id: String,
    /// Attempts before this one.
    pub attempts: u32,
    pub first_seen_ms: i64,
}

/// Reads the message's meta. The id is, in order: our header (a retried message), the publisher's
/// `message_id`, or a digest of exchange, routing key, timestamp and body, which is the same on every
/// redelivery of the same message (publishers should set `message_id`: two identical bodies published
/// without one get the same id).
pub fn meta(props: &BasicProperties, exchange: &str, routing_key: &str, body: &[u8], now_ms: i64) -> Meta {
    let headers = props.headers().as_ref();
    let id = header_str(headers, H_ID)
        .or_else(|| {
            props
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| derive_id(exchange, routing_key, props.timestamp().unwrap_or(0), body));
    Meta {
        id,
        attempts: header_int(headers, H_ATTEMPTS)
            .map(|a| a.clamp(0, u32::MAX as i64) as u32)
            .unwrap_or(0),
        first_seen_ms: header_int(headers, H_FIRST_SEEN).unwrap_or(now_ms),
    }
}

fn derive_id(exchange: &str, routing_key: &str, timestamp: u64, body: &[u8]) -> String {
    let mut h = Sha256::new();
    for part in [
        exchange.as_bytes(),
        routing_key.as_bytes(),
        &timestamp.to_be_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(body);
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("msg_{hex}")
}

pub fn header_str(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

pub fn header_int(headers: Option<&FieldTable>, key: &str) -> Option<i64> {
    Some(match headers?.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => *v as i64,
        AMQPValue::ShortShortUInt(v) => *v as i64,
        AMQPValue::ShortInt(v) => *v as i64,
        AMQPValue::ShortUInt(v) => *v as i64,
        AMQPValue::LongInt(v) => *v as i64,
        AMQPValue::LongUInt(v) => *v as i64,
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::Timestamp(v) => *v as i64,
        _ => return None,
    })
}

/// Why an attempt failed, for the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub reason: &'static str,
    pub status: Option<u16>,
}

fn base_headers(
    props: &BasicProperties,
    exchange: &str,
    routing_key: &str,
    meta: &Meta,
    attempts: u32,
    failure: Failure,
) -> FieldTable {
    let mut h = props.headers().clone().unwrap_or_default();
    let s = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()));
    if !h.contains_key(H_EXCHANGE) {
        h.insert(ShortString::from(H_EXCHANGE), s(exchange));
        h.insert(ShortString::from(H_ROUTING_KEY), s(routing_key));
    }
    h.insert(ShortString::from(H_ID), s(&meta.id));
    h.insert(
        ShortString::from(H_ATTEMPTS),
        AMQPValue::LongLongInt(attempts as i64),
    );
    h.insert(
        ShortString::from(H_FIRST_SEEN),
        AMQPValue::LongLongInt(meta.first_seen_ms),
    );
    h.insert(ShortString::from(H_LAST_ERROR), s(failure.reason));
    match failure.status {
        Some(st) => {
            h.insert(
                ShortString::from(H_LAST_STATUS),
                AMQPValue::LongLongInt(st as i64),
            );
        }
        None => {
            // A status from an earlier attempt would be misleading next to this attempt's error.
            let mut kept = FieldTable::default();
            for (k, v) in h.inner() {
                if k.as_str() != H_LAST_STATUS {
                    kept.insert(k.clone(), v.clone());
                }
            }
            h = kept;
        }
    }
    h
}

/// Properties of the copy published to a delay queue after attempt number `attempts` failed.
pub fn retry_properties(
    props: &BasicProperties,
    exchange: &str,
    routing_key: &str,
    meta: &Meta,
    attempts: u32,
    failure: Failure,
    next_delay_ms: u64,
) -> BasicProperties {
    let mut h = base_headers(props, exchange, routing_key, meta, attempts, failure);
    h.insert(
        ShortString::from(H_NEXT_DELAY),
        AMQPValue::LongLongInt(next_delay_ms as i64),
    );
    copy_properties(props).with_headers(h)
}

/// The publisher's properties for a copy the worker stores (retry or dead letter), persistent, without
/// the two that would break the copy: `expiration` (the publisher's per-message TTL would expire it in
/// the delay queue before its delay, or drop it from the dead-letter queue) and `user_id` (the broker
/// refuses a publish whose `user_id` is not the worker's own user).
pub fn copy_properties(props: &BasicProperties) -> BasicProperties {
    let mut p = BasicProperties::default().with_delivery_mode(2);
    if let Some(v) = props.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = props.headers() {
        p = p.with_headers(v.clone());
    }
    if let Some(v) = props.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = props.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = props.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = props.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = props.cluster_id() {
        p = p.with_cluster_id(v.clone());
    }
    p
}

/// `props` naming Webhook `webhook` ([`H_WEBHOOK`]): a copy for that Webhook alone.
pub fn for_webhook(props: BasicProperties, webhook: &str) -> BasicProperties {
    let mut h = props.headers().clone().unwrap_or_default();
    h.insert(
        ShortString::from(H_WEBHOOK),
        AMQPValue::LongString(LongString::from(webhook.as_bytes().to_vec())),
    );
    props.with_headers(h)
}

/// Properties of the copy published to the dead-letter queue.
pub fn dead_letter_properties(
    props: &BasicProperties,
    exchange: &str,
    routing_key: &str,
    meta: &Meta,
    attempts: u32,
    failure: Failure,
    dead_reason: &str,
) -> BasicProperties {
    let mut h = base_headers(props, exchange, routing_key, meta, attempts, failure);
    h.insert(
        ShortString::from(H_DEAD_REASON),
        AMQPValue::LongString(LongString::from(dead_reason.as_bytes().to_vec())),
    );
    h.insert(ShortString::from(H_DEAD_AT), AMQPValue::LongLongInt(now_ms()));
    copy_properties(props).with_headers(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_prefers_header_then_message_id_then_digest() {
        let plain = BasicProperties::default();
        let a = meta(&plain, "ex", "rk", b"body", 5);
        let b = meta(&plain, "ex", "rk", b"body", 6);
        assert_eq!(a.id, b.id, "the derived id is stable across redeliveries");
        assert!(a.id.starts_with("msg_") && a.id.len() == 36);
        assert_ne!(a.id, meta(&plain, "ex", "rk", b"other", 5).id);
        assert_eq!(a.attempts, 0);
        assert_eq!(a.first_seen_ms, 5);

        let with_id = BasicProperties::default().with_message_id("m-1".into());
        assert_eq!(meta(&with_id, "ex", "rk", b"body", 5).id, "m-1");

        // After a retry the message returns through the default exchange: the header keeps the id.
        let fail = Failure {
            reason: "http_status",
            status: Some(503),
        };
        let retried = retry_properties(&plain, "ex", "rk", &a, 1, fail, 1000);
        let back = meta(&retried, "", "orders", b"body", 99);
        assert_eq!(back.id, a.id);
        assert_eq!(back.attempts, 1);
        assert_eq!(back.first_seen_ms, 5);
    }

    #[test]
    fn a_retry_copy_drops_expiration_and_user_id_and_keeps_the_rest() {
        let props = BasicProperties::default()
            .with_message_id("m-2".into())
            .with_expiration("500".into())
            .with_user_id("publisher".into())
            .with_correlation_id("c-1".into())
            .with_content_type("application/json".into())
            .with_timestamp(42);
        let m = meta(&props, "ex", "rk", b"x", 7);
        let fail = Failure {
            reason: "http_status",
            status: Some(503),
        };
        let p = retry_properties(&props, "ex", "rk", &m, 1, fail, 10_000);
        assert!(
            p.expiration().is_none(),
            "a 500 ms TTL would cut a 10 s delay short"
        );
        assert!(p.user_id().is_none());
        assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some("c-1"));
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(*p.timestamp(), Some(42));
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(header_int(p.headers().as_ref(), H_NEXT_DELAY), Some(10_000));
    }

    #[test]
    fn dead_letters_carry_reason_status_attempts_and_origin() {
        let props = BasicProperties::default()
            .with_message_id("m-9".into())
            .with_expiration("60000".into());
        let m = meta(&props, "ex", "rk", b"x", 7);
        let fail = Failure {
            reason: "http_status",
            status: Some(400),
        };
        let p = dead_letter_properties(&props, "ex", "rk", &m, 1, fail, "http_status");
        let h = p.headers().as_ref();
        assert_eq!(header_str(h, H_DEAD_REASON).as_deref(), Some("http_status"));
        assert_eq!(header_int(h, H_LAST_STATUS), Some(400));
        assert_eq!(header_int(h, H_ATTEMPTS), Some(1));
        assert_eq!(header_int(h, H_FIRST_SEEN), Some(7));
        assert_eq!(header_str(h, H_EXCHANGE).as_deref(), Some("ex"));
        assert_eq!(header_str(h, H_ROUTING_KEY).as_deref(), Some("rk"));
        assert!(p.expiration().is_none());
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("m-9"));
        assert_eq!(*p.delivery_mode(), Some(2));

        // A later timeout drops the earlier status.
        let t = Failure {
            reason: "timeout",
            status: None,
        };
        let p2 = dead_letter_properties(&p, "", "q", &m, 2, t, "attempts_exhausted");
        assert_eq!(header_int(p2.headers().as_ref(), H_LAST_STATUS), None);
        assert_eq!(
            header_str(p2.headers().as_ref(), H_EXCHANGE).as_deref(),
            Some("ex")
        );
    }
}
