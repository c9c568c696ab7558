//! The queues the worker declares at every connect, their arguments, and what a refused declaration
//! means.
//!
//! Two lanes: fresh messages arrive in the work queue; retries wait in delay queues
//! (`<queue>.delay.<ms>ms`, one TTL each) and then dead-letter into the *retry-ready* queue
//! (`<queue>.retries`), which the worker consumes on a channel of its own with its own share of the
//! concurrency (see `lanes`), so a backlog of due retries never sits in front of fresh traffic.
//! Earlier versions named the delay queues `<queue>.retry.<ms>ms` and dead-lettered them into the
//! work queue; those are no longer declared (their arguments cannot change in place), but whatever
//! they hold still returns to the work queue when its TTL expires, so an upgrade loses nothing and
//! meets no `PRECONDITION_FAILED`. Delete them once empty.
//!
//! Classic (`--queue-type classic`): the work queue, the retry-ready queue and the dead-letter queue
//! have no arguments (as every earlier version declared the work queue, so existing queues keep
//! matching); delay queues carry a TTL and dead-letter to the retry-ready queue, which RabbitMQ does
//! without confirms for classic queues: that hop is at-most-once.
//!
//! External (`--topology external`): the queues belong to someone else. The worker declares nothing
//! ([`check`] only asks, passively, that each queue it uses exists) and consumes the work queue with
//! whatever arguments it was declared with; `run` enforces the delivery limit itself.
//!
//! Quorum (the default): every queue is a quorum queue (replicated, fsynced before the confirm).
//! The work queue and the retry-ready queue get the broker's delivery limit, dead-lettering to the
//! dead-letter queue; delay queues and the consumed queues dead-letter with
//! `x-dead-letter-strategy: at-least-once`, which makes the broker hold a message in the source queue
//! until the target confirmed it (RabbitMQ ≥ 3.10; it requires `x-overflow: reject-publish` on the
//! source queue). Quorum queues need RabbitMQ ≥ 3.8; TTLs on quorum queues ≥ 3.10.

use std::time::Duration;

use hookfleet_crds::integration::QueueType;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ErrorKind};
use tracing::debug;

use super::error::SessionError;
use crate::config::Config;

/// AMQP reply code of `PRECONDITION_FAILED`: a queue exists with other arguments.
const PRECONDITION_FAILED: u16 = 406;
/// AMQP reply code of `NOT_FOUND`: a passive declaration of a queue that does not exist.
const NOT_FOUND: u16 = 404;

/// Name of the delay queue of `ttl`, and of the retry-ready queue (where retries land when their delay
/// is over, consumed in the retry lane): the contract's names, which the operator shares.
pub use hookfleet_crds::contract::queues::{delay as delay_queue, retry_ready as retry_ready_queue};

fn text(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()))
}

/// Arguments every quorum queue of ours carries.
fn quorum(args: &mut FieldTable) {
    args.insert("x-queue-type".into(), text("quorum"));
}

/// Dead-lettering to `queue` through the default exchange; at-least-once on quorum queues.
fn dead_letter_to(args: &mut FieldTable, queue: &str, queue_type: QueueType) {
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert("x-dead-letter-routing-key".into(), text(queue));
    if queue_type == QueueType::Quorum {
        args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        args.insert("x-overflow".into(), text("reject-publish"));
    }
}

/// Arguments of the work queue. Public so tests (and anyone pre-declaring the queue) declare it
/// exactly as the worker does.
pub fn work_queue_args(queue_type: QueueType, dead_letter_queue: &str, delivery_limit: u32) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        quorum(&mut args);
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(delivery_limit.into()),
        );
        dead_letter_to(&mut args, dead_letter_queue, queue_type);
    }
    args
}

/// Arguments of the dead-letter queue.
pub fn dead_letter_queue_args(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        quorum(&mut args);
    }
    args
}

/// Arguments of the retry-ready queue: those of the work queue (a retry that crashes every worker
/// meets the same delivery limit as a fresh message).
pub fn retry_ready_queue_args(
    queue_type: QueueType,
    dead_letter_queue: &str,
    delivery_limit: u32,
) -> FieldTable {
    work_queue_args(queue_type, dead_letter_queue, delivery_limit)
}

/// Arguments of the delay queue of `ttl`: no consumer; each message waits the TTL, then the broker
/// dead-letters it through the default exchange to `target` (the retry-ready queue).
pub fn delay_queue_args(queue_type: QueueType, target: &str, ttl: Duration) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == QueueType::Quorum {
        quorum(&mut args);
    }
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(ttl.as_millis() as i64),
    );
    dead_letter_to(&mut args, target, queue_type);
    args
}

/// Arguments of the Webhooks reports queue (the operator declares it alike): bounded in length and
/// age, so reports nobody reads do not pile up.
pub fn reports_queue_args() -> FieldTable {
    use hookfleet_crds::contract::webhooks::{REPORTS_MAX_LENGTH, REPORTS_TTL_MS};
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(REPORTS_MAX_LENGTH));
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(REPORTS_TTL_MS));
    args
}

/// The broker's explanation when `err` is a refused declaration of a queue that exists with other
/// arguments (`PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue …`), and the argument.
pub fn mismatch(err: &lapin::Error) -> Option<(String, String)> {
    let ErrorKind::ProtocolError(e) = err.kind() else {
        return None;
    };
    if e.get_id() != PRECONDITION_FAILED {
        return None;
    }
    let msg = e.get_message().as_str();
    let detail = msg
        .strip_prefix("PRECONDITION_FAILED - ")
        .unwrap_or(msg)
        .to_owned();
    let argument = detail
        .split_once("inequivalent arg '")
        .and_then(|(_, rest)| rest.split_once('\''))
        .map(|(arg, _)| arg.to_owned())
        .unwrap_or_else(|| "unknown argument".into());
    Some((argument, detail))
}

async fn declare_queue(ch: &Channel, name: &str, t: QueueType, args: FieldTable) -> Result<(), SessionError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(name.into(), durable, args)
        .await
        .map(|_| ())
        .map_err(|source| match mismatch(&source) {
            Some((argument, detail)) => SessionError::QueueMismatch {
                queue: name.to_owned(),
                wanted: t.as_str(),
                argument,
                detail,
            },
            None => SessionError::Declare {
                what: format!("queue {name}"),
                source,
            },
        })
}

/// Declares the work queue and its bindings, the dead-letter queue, the retry-ready queue and the
/// delay queues of `ladder`.
pub async fn declare(ch: &Channel, cfg: &Config, ladder: &[Duration]) -> Result<(), SessionError> {
    let t = cfg.queue_type;
    // The work queue first: it is the one most likely to exist already, and a mismatch there must not
    // leave queues of the wrong type behind (the dead-letter target need not exist yet).
    declare_queue(
        ch,
        &cfg.queue,
        t,
        work_queue_args(t, &cfg.dead_letter_queue, cfg.delivery_limit),
    )
    .await?;
    for (exchange, key) in &cfg.bindings {
        ch.queue_bind(
            cfg.queue.as_str().into(),
            exchange.as_str().into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| SessionError::Declare {
            what: format!("binding {exchange}={key}"),
            source,
        })?;
    }
    declare_queue(ch, &cfg.dead_letter_queue, t, dead_letter_queue_args(t)).await?;
    let ready = retry_ready_queue(&cfg.queue);
    declare_queue(
        ch,
        &ready,
        t,
        retry_ready_queue_args(t, &cfg.dead_letter_queue, cfg.delivery_limit),
    )
    .await?;
    for ttl in ladder {
        let name = delay_queue(&cfg.queue, *ttl);
        declare_queue(ch, &name, t, delay_queue_args(t, &ready, *ttl)).await?;
    }
    if cfg.webhooks.is_some() {
        // Classic whatever the work queue's type: reports are bounded, short-lived and lossy by design.
        let name = hookfleet_crds::contract::webhooks::reports_queue(&cfg.queue);
        declare_queue(ch, &name, QueueType::Classic, reports_queue_args()).await?;
    }
    debug!(
        delay_queues = ladder.len(),
        queue_type = t.as_str(),
        "topology declared"
    );
    Ok(())
}

/// Every queue the worker uses, in the order [`declare`] declares them: the work queue, the
/// dead-letter queue, the retry-ready queue, the delay queues of `ladder`, and with Webhooks the
/// reports queue; the contract's `WorkerArgs::declared_queues` for the same arguments (a test says so).
pub fn queues(cfg: &Config, ladder: &[Duration]) -> Vec<String> {
    let mut out = vec![
        cfg.queue.clone(),
        cfg.dead_letter_queue.clone(),
        retry_ready_queue(&cfg.queue),
    ];
    out.extend(ladder.iter().map(|ttl| delay_queue(&cfg.queue, *ttl)));
    if cfg.webhooks.is_some() {
        out.push(hookfleet_crds::contract::webhooks::reports_queue(&cfg.queue));
    }
    out
}

/// `--topology external`: asks the broker, with a passive declaration on a channel of its own, whether
/// each queue of [`queues`] exists, and declares nothing. Fails with every missing queue named.
pub async fn check(conn: &Connection, cfg: &Config, ladder: &[Duration]) -> Result<(), SessionError> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let open = || async { conn.create_channel().await.map_err(SessionError::Channel) };
    let mut ch = open().await?;
    let mut missing = Vec::new();
    let wanted = queues(cfg, ladder);
    for name in &wanted {
        match ch
            .queue_declare(name.as_str().into(), passive, FieldTable::default())
            .await
        {
            Ok(_) => {}
            Err(e) if reply_code(&e) == Some(NOT_FOUND) => {
                missing.push(name.clone());
                // The broker closed that channel.
                ch = open().await?;
            }
            Err(source) => {
                return Err(SessionError::Declare {
                    what: format!("queue {name} (passive: checking that it exists)"),
                    source,
                });
            }
        }
    }
    let _ = ch.close(200, "topology checked".into()).await;
    if !missing.is_empty() {
        return Err(SessionError::QueuesMissing {
            missing,
            of: wanted.len(),
        });
    }
    debug!(queues = wanted.len(), "external topology: every queue exists");
    Ok(())
}

fn reply_code(err: &lapin::Error) -> Option<u16> {
    match err.kind() {
        ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(t: &FieldTable) -> Vec<&str> {
        t.inner().keys().map(|k| k.as_str()).collect()
    }

    #[test]
    fn the_queues_checked_with_external_topology_are_the_contracts() {
        use clap::Parser;
        use hookfleet_crds::contract::WorkerArgs;
        for extra in [
            &["--backoff-max", "3s"][..],
            &["--dead-letter-queue", "parked", "--topology", "external"][..],
            &["--max-attempts", "1"][..],
        ] {
            let args = WorkerArgs::try_parse_from(crate::config::tests::argv(extra)).unwrap();
            let contract = args.declared_queues();
            let cfg = Config::from_args(args, &|_| None).unwrap();
            assert_eq!(queues(&cfg, &cfg.backoff.ladder()), contract, "{extra:?}");
        }
    }

    #[test]
    fn classic_queues_keep_their_old_arguments() {
        assert!(
            work_queue_args(QueueType::Classic, "q.dead", 20)
                .inner()
                .is_empty()
        );
        assert!(dead_letter_queue_args(QueueType::Classic).inner().is_empty());
        let d = delay_queue_args(QueueType::Classic, "q", Duration::from_millis(800));
        assert_eq!(
            keys(&d),
            [
                "x-dead-letter-exchange",
                "x-dead-letter-routing-key",
                "x-message-ttl"
            ]
        );
    }

    #[test]
    fn quorum_queues_have_a_delivery_limit_and_at_least_once_dead_lettering() {
        let w = work_queue_args(QueueType::Quorum, "q.dead", 7);
        let w = w.inner();
        assert_eq!(w.get("x-queue-type"), Some(&text("quorum")));
        assert_eq!(w.get("x-delivery-limit"), Some(&AMQPValue::LongLongInt(7)));
        assert_eq!(w.get("x-dead-letter-routing-key"), Some(&text("q.dead")));
        assert_eq!(w.get("x-dead-letter-strategy"), Some(&text("at-least-once")));
        assert_eq!(w.get("x-overflow"), Some(&text("reject-publish")));
        let d = delay_queue_args(QueueType::Quorum, "q.retries", Duration::from_secs(2));
        let d = d.inner();
        assert_eq!(d.get("x-message-ttl"), Some(&AMQPValue::LongLongInt(2000)));
        assert_eq!(d.get("x-dead-letter-routing-key"), Some(&text("q.retries")));
        assert_eq!(d.get("x-dead-letter-strategy"), Some(&text("at-least-once")));
        assert_eq!(
            retry_ready_queue_args(QueueType::Quorum, "q.dead", 7),
            work_queue_args(QueueType::Quorum, "q.dead", 7)
        );
        assert_eq!(
            dead_letter_queue_args(QueueType::Quorum)
                .inner()
                .get("x-queue-type"),
            Some(&text("quorum"))
        );
    }
}
