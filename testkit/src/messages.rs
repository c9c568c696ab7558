//! Messages in and out of the system under test: publishing with publisher confirms, the per-id account
//! (published = delivered + dead-lettered, none missing, duplicates counted) and Standard Webhooks signature
//! checks of what the sink received.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::future::try_join_all;
use hmac::{Hmac, Mac};
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use sha2::Sha256;

use crate::sink::Hit;

/// Ids `prefix-0 … prefix-(n-1)`.
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// A small JSON body naming its id, as a device event would.
pub fn body(id: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","device_id":"dev-{}","data":{{"n":1}}}}"#,
        id.len()
    )
    .into_bytes()
}

/// Publishes one persistent message per id (body from [`body`], `message_id` = the id) to `queue`, which must
/// exist (the workers declare it, with their queue type; checked first), with publisher confirms, `per_second`
/// at most when given; returns once the broker confirmed every message.
pub async fn publish(uri: &str, queue: &str, ids: &[String], per_second: Option<u32>) -> Result<()> {
    let messages: Vec<(String, Vec<(String, String)>)> =
        ids.iter().map(|id| (id.clone(), Vec::new())).collect();
    publish_with_headers(uri, queue, &messages, per_second).await
}

/// As [`publish`], each message with its headers (as strings: an event name, a device id).
pub async fn publish_with_headers(
    uri: &str,
    queue: &str,
    messages: &[(String, Vec<(String, String)>)],
    per_second: Option<u32>,
) -> Result<()> {
    let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .with_context(|| format!("queue {queue} (the workers declare it)"))?;
    // Paced publishing goes in batches of a tenth of a second's worth.
    let batch = per_second.map_or(500, |r| (r as usize / 10).max(1));
    let mut tick = per_second.map(|_| tokio::time::interval(Duration::from_millis(100)));
    for chunk in messages.chunks(batch) {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let bodies: Vec<Vec<u8>> = chunk.iter().map(|(id, _)| body(id)).collect();
        let sends = chunk
            .iter()
            .zip(&bodies)
            .map(|((id, headers), body)| (properties(id, headers), body.as_slice()))
            .collect();
        send_confirmed(&ch, queue, sends).await?;
    }
    let _ = conn.close(200, "published".into()).await;
    Ok(())
}

/// Publishes `(id, body)` pairs to `queue` on `ch` (in confirm mode) as persistent JSON messages with
/// `message_id` = the id, all at once, and returns once the broker confirmed every one.
pub async fn publish_batch(
    ch: &Channel,
    queue: &str,
    batch: &[(impl AsRef<str>, impl AsRef<[u8]>)],
) -> Result<()> {
    let sends = batch
        .iter()
        .map(|(id, body)| (properties(id.as_ref(), &[]), body.as_ref()))
        .collect();
    send_confirmed(ch, queue, sends).await
}

/// A persistent JSON message's properties: `message_id` = `id`, `headers` as strings.
fn properties(id: &str, headers: &[(String, String)]) -> BasicProperties {
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(id.into())
        .with_content_type("application/json".into());
    if headers.is_empty() {
        return props;
    }
    let mut h = FieldTable::default();
    for (k, v) in headers {
        h.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
    }
    props.with_headers(h)
}

/// Publishes each `(properties, body)` to `queue` through the default exchange, all at once, and returns once
/// the broker confirmed every one.
pub async fn send_confirmed(ch: &Channel, queue: &str, sends: Vec<(BasicProperties, &[u8])>) -> Result<()> {
    let mut pending = Vec::with_capacity(sends.len());
    for (props, body) in sends {
        pending.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await?,
        );
    }
    for c in try_join_all(pending).await? {
        // Ack(Some(_)) is a message the broker returned (unroutable): not published.
        anyhow::ensure!(
            matches!(c, Confirmation::Ack(None)),
            "publish not confirmed: {c:?}"
        );
    }
    Ok(())
}

/// Drains `queue` with basic.get (no ack needed), returning the `message_id` of each message.
pub async fn drain_ids(uri: &str, queue: &str) -> Result<HashSet<String>> {
    let conn = Connection::connect(uri, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut out = HashSet::new();
    loop {
        match ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await {
            Ok(Some(m)) => {
                if let Some(id) = m.delivery.properties.message_id() {
                    out.insert(id.as_str().to_owned());
                }
            }
            Ok(None) => break,
            // A dead-letter queue nobody declared yet holds nothing.
            Err(e) if e.to_string().contains("NOT_FOUND") => break,
            Err(e) => return Err(e.into()),
        }
    }
    let _ = conn.close(200, "drained".into()).await;
    Ok(out)
}

/// What became of the published messages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Account {
    pub published: usize,
    pub delivered: usize,
    pub dead_lettered: usize,
    /// Deliveries beyond the first of an id (same `webhook-id`).
    pub duplicates: usize,
    pub lost: usize,
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "published {}, delivered {}, dead-lettered {}, duplicates {}, lost {}",
            self.published, self.delivered, self.dead_lettered, self.duplicates, self.lost
        )
    }
}

/// Every published id reached the sink (2xx) at least once or sits in `dead`; counts the rest. An id the sink
/// saw that was never published is an error (someone else's traffic, or a corrupted id).
pub fn account(
    published: &[String],
    delivered: &HashMap<String, usize>,
    dead: &HashSet<String>,
) -> Result<Account> {
    let published_set: HashSet<&String> = published.iter().collect();
    let unknown: Vec<&String> = delivered
        .keys()
        .filter(|id| !published_set.contains(id))
        .collect();
    anyhow::ensure!(
        unknown.is_empty(),
        "the sink saw ids never published: {:?}",
        &unknown[..unknown.len().min(5)]
    );
    let mut a = Account {
        published: published.len(),
        ..Account::default()
    };
    for id in published {
        match delivered.get(id) {
            Some(n) => {
                a.delivered += 1;
                a.duplicates += n - 1;
            }
            None if dead.contains(id) => a.dead_lettered += 1,
            None => a.lost += 1,
        }
    }
    Ok(a)
}

/// Checks a hit's Standard Webhooks headers against `secret` (`whsec_<base64>` or raw): `webhook-signature`
/// holds a `v1,<base64 HMAC-SHA256 of id.timestamp.body>` made with it.
pub fn verify_signature(hit: &Hit, secret: &str) -> Result<()> {
    let key = match secret.strip_prefix("whsec_") {
        Some(b) => B64.decode(b).context("the whsec_ secret is not base64")?,
        None => secret.as_bytes().to_vec(),
    };
    let h = |name: &str| hit.headers.get(name).with_context(|| format!("no {name} header"));
    let (id, ts, sigs) = (h("webhook-id")?, h("webhook-timestamp")?, h("webhook-signature")?);
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&hit.body);
    let want = format!("v1,{}", B64.encode(mac.finalize().into_bytes()));
    anyhow::ensure!(
        sigs.split(' ').any(|s| s == want),
        "no valid signature for {id}: {sigs}"
    );
    Ok(())
}

/// Which of `secrets` (`whsec_<base64>` or raw) a hit's `webhook-signature` verifies with: the index of the
/// first one any of its space-separated signatures matches (a receiver rotating keys accepts any), or `None`
/// when it is unsigned or none matches.
pub fn verify_with_any(hit: &Hit, secrets: &[&str]) -> Option<usize> {
    secrets
        .iter()
        .position(|secret| verify_signature(hit, secret).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_counts_each_fate() {
        let published = ids("m", 4);
        let delivered = HashMap::from([("m-0".to_string(), 1), ("m-1".to_string(), 3)]);
        let dead = HashSet::from(["m-2".to_string()]);
        let a = account(&published, &delivered, &dead).unwrap();
        assert_eq!(
            a,
            Account {
                published: 4,
                delivered: 2,
                dead_lettered: 1,
                duplicates: 2,
                lost: 1
            }
        );
        let stranger = HashMap::from([("x".to_string(), 1)]);
        assert!(account(&published, &stranger, &dead).is_err());
    }

    #[test]
    fn signature_matches_the_standard_webhooks_vector() {
        // The example of the Standard Webhooks specification.
        let hit = Hit {
            id: Some("msg_p5jXN8AQM9LWM0D4loKWxJek".into()),
            at: std::time::Instant::now(),
            status: 200,
            method: "POST".into(),
            path: "/hook".into(),
            headers: [
                ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
                ("webhook-timestamp", "1614265330"),
                (
                    "webhook-signature",
                    "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            body: br#"{"test": 2432232314}"#.to_vec(),
        };
        verify_signature(&hit, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert!(verify_signature(&hit, "whsec_c2Vjb25k").is_err());
        let keys = ["whsec_c2Vjb25k", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"];
        assert_eq!(verify_with_any(&hit, &keys), Some(1));
        assert_eq!(verify_with_any(&hit, &keys[..1]), None);
        // Several signatures, one per key: any one that verifies will do.
        let mut two = hit.clone();
        two.headers.insert(
            "webhook-signature".into(),
            format!("v1,AAAA {}", hit.headers["webhook-signature"]),
        );
        assert_eq!(verify_with_any(&two, &keys), Some(1));
        two.headers.remove("webhook-signature");
        assert_eq!(verify_with_any(&two, &keys), None);
    }
}
