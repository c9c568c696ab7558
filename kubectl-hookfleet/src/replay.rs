//! `kubectl hookfleet replay`: dead letters back into the fleet.
//!
//! The dead-letter queue is read with `basic.get` (no prefetch window: a queue of any length is walked
//! once, up to the number of messages it held when the replay started, so what dies again during the
//! replay is not replayed twice). A message the filter selects is published to the work queue through
//! the default exchange with its attempt count and failure headers removed (its id, first-seen time,
//! original exchange and routing key, and the Webhook it is for are kept), and acknowledged on the
//! dead-letter queue only once the broker confirmed the copy: an interrupted replay loses nothing (a copy
//! confirmed but not yet acknowledged is delivered twice, with the same `webhook-id`). Messages the filter
//! leaves are not acknowledged and go back to the dead-letter queue when the channel closes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hookfleet_crds::contract::headers::{
    H_ATTEMPTS, H_DEAD_AT, H_DEAD_REASON, H_LAST_ERROR, H_LAST_STATUS, H_NEXT_DELAY,
};
use hookfleet_crds::contract::webhooks::H_WEBHOOK;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};

use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

/// Headers a replayed copy drops: the worker's count and reasons, and the broker's own dead-lettering
/// and redelivery records (a quorum queue's `x-delivery-count` would count towards its delivery limit).
const DROPPED: &[&str] = &[
    H_ATTEMPTS,
    H_DEAD_REASON,
    H_DEAD_AT,
    H_NEXT_DELAY,
    H_LAST_ERROR,
    H_LAST_STATUS,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
];

/// Which dead letters to replay.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// `x-hookfleet-dead-reason` (`attempts_exhausted`, `too_large`, `http_status`, …); a message the broker
    /// dead-lettered on its delivery limit has reason `delivery_limit`.
    pub reason: Option<String>,
    /// The Webhook a fan-out copy is for (`x-hookfleet-webhook`).
    pub webhook: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Options {
    pub filter: Filter,
    /// Messages per second at most.
    pub rate: Option<f64>,
    /// At most this many replayed.
    pub limit: Option<u64>,
    /// Count what would be replayed; move nothing.
    pub dry_run: bool,
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Messages in the dead-letter queue when the replay started.
    pub at_start: u64,
    /// Messages looked at.
    pub examined: u64,
    /// Messages the filter selected.
    pub matched: u64,
    /// Copies confirmed in the work queue and originals acknowledged (0 in a dry run).
    pub replayed: u64,
}

fn header_text(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The reason a dead letter carries (module doc of [`Filter::reason`]).
pub fn reason(headers: Option<&FieldTable>) -> Option<String> {
    header_text(headers, H_DEAD_REASON).or_else(|| {
        headers
            .is_some_and(|h| h.inner().contains_key("x-death"))
            .then(|| "delivery_limit".to_owned())
    })
}

impl Filter {
    pub fn matches(&self, headers: Option<&FieldTable>) -> bool {
        self.reason
            .as_ref()
            .is_none_or(|r| reason(headers).as_ref() == Some(r))
            && self
                .webhook
                .as_ref()
                .is_none_or(|w| header_text(headers, H_WEBHOOK).as_ref() == Some(w))
    }
}

/// The properties of the replayed copy: the original's, without [`DROPPED`].
pub fn replayed_properties(original: &BasicProperties) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in original.headers().iter().flat_map(|h| h.inner()) {
        if !DROPPED.contains(&k.as_str()) {
            headers.insert(k.clone(), v.clone());
        }
    }
    original.clone().with_headers(headers)
}

/// Replays dead letters of `dead_queue` into `work_queue` on the broker at `uri` (module doc).
pub async fn replay(uri: &str, dead_queue: &str, work_queue: &str, options: &Options) -> Result<Report> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let conn = Connection::connect(
        uri,
        ConnectionProperties::default().with_connection_name("kubectl-hookfleet replay".into()),
    )
    .await
    .context("connecting to the broker")?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let dead = ch
        .queue_declare(dead_queue.into(), passive, FieldTable::default())
        .await
        .with_context(|| format!("the dead-letter queue {dead_queue}"))?;
    // The work queue must exist: a copy published to a missing queue would be dropped by the broker.
    let check = conn.create_channel().await?;
    check
        .queue_declare(work_queue.into(), passive, FieldTable::default())
        .await
        .with_context(|| format!("the work queue {work_queue}"))?;
    let mut report = Report {
        at_start: u64::from(dead.message_count()),
        ..Report::default()
    };
    let gap = options
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let mut next = Instant::now();
    while report.examined < report.at_start && options.limit.is_none_or(|l| report.replayed < l) {
        let Some(msg) = ch
            .basic_get(dead_queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        report.examined += 1;
        let d = &msg.delivery;
        if !options.filter.matches(d.properties.headers().as_ref()) {
            continue;
        }
        report.matched += 1;
        if options.dry_run {
            continue;
        }
        if let Some(gap) = gap {
            tokio::time::sleep_until(next.into()).await;
            next = next.max(Instant::now() - gap) + gap;
        }
        let confirm = ch
            .basic_publish(
                "".into(),
                work_queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &d.data,
                replayed_properties(&d.properties),
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => {}
            Confirmation::Ack(Some(_)) => {
                bail!("the broker returned a copy: no route to {work_queue}; stopped, the original stays")
            }
            other => bail!("the broker did not confirm a copy ({other:?}); stopped, the original stays"),
        }
        d.acker.ack(BasicAckOptions::default()).await?;
        report.replayed += 1;
    }
    // Unacknowledged messages (not selected, or all of a dry run) go back to the dead-letter queue.
    ch.close(200, "replay done".into()).await?;
    conn.close(200, "replay done".into()).await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{LongString, ShortString};

    fn headers(pairs: &[(&str, &str)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(
                ShortString::from(*k),
                AMQPValue::LongString(LongString::from(v.as_bytes().to_vec())),
            );
        }
        t
    }

    #[test]
    fn the_filter_reads_reason_and_webhook() {
        let h = headers(&[(H_DEAD_REASON, "attempts_exhausted"), (H_WEBHOOK, "acme")]);
        let f = |reason: Option<&str>, webhook: Option<&str>| Filter {
            reason: reason.map(Into::into),
            webhook: webhook.map(Into::into),
        };
        assert!(f(None, None).matches(Some(&h)));
        assert!(f(Some("attempts_exhausted"), Some("acme")).matches(Some(&h)));
        assert!(!f(Some("too_large"), None).matches(Some(&h)));
        assert!(!f(None, Some("other")).matches(Some(&h)));
        assert!(!f(None, Some("acme")).matches(None));
        // Dead-lettered by the broker on its delivery limit: x-death, no reason of ours.
        let mut broker = FieldTable::default();
        broker.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        assert!(f(Some("delivery_limit"), None).matches(Some(&broker)));
    }

    #[test]
    fn a_replayed_copy_keeps_its_id_and_webhook_and_loses_its_count() {
        let original = BasicProperties::default()
            .with_message_id("m1".into())
            .with_headers(headers(&[
                ("x-hookfleet-id", "m1"),
                (H_WEBHOOK, "acme"),
                (H_ATTEMPTS, "5"),
                (H_DEAD_REASON, "attempts_exhausted"),
                ("x-delivery-count", "3"),
                ("x-custom", "kept"),
            ]));
        let copy = replayed_properties(&original);
        let keys: Vec<String> = copy
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.as_str().to_owned())
            .collect();
        assert_eq!(keys, ["x-custom", "x-hookfleet-id", "x-hookfleet-webhook"]);
        assert_eq!(copy.message_id().as_ref().map(|s| s.as_str()), Some("m1"));
    }
}
