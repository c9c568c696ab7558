//! Deletes an Integration's queues on RabbitMQ (`deletionPolicy: Delete`, see `core::deletion`).
//!
//! A deletion is rare, so it opens a connection of its own instead of borrowing the probes' (`broker`): the
//! first node of the connection Secret that answers. Each queue gets a channel of its own (a 404 or a
//! refusal closes the channel it happens on), and every channel handle is kept until the connection is
//! closed at the end, so lapin never closes a reused channel id by a stale handle (see `broker`).
//!
//! A queue is read first (passive `queue.declare`: it creates nothing) and deleted only when no consumer
//! is attached; the broker's `if-unused` flag would say the same, but quorum queues refuse it. The count
//! `queue.delete-ok` returns is the number of messages deleted with the queue.
//!
//! Needs the `configure` permission on the queues (RabbitMQ checks it for `queue.delete`) for the user of
//! the Integration's connection Secret: the one the workers use, which declares these queues and so has it.

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tracing::info;

use crate::broker::{BROKER_TIMEOUT, Problem, classify, parse_uris};
use crate::core::deletion::QueueFate;
use crate::core::status::reason;

/// Deletes each of `queues` that exists and has no consumer, on the broker of the connection Secret value
/// `value` (one URI or several nodes); each queue's fate, or why the broker could not be asked.
pub async fn delete(value: &str, queues: &[String]) -> Result<Vec<(String, QueueFate)>, Problem> {
    let uris = parse_uris(value).map_err(|m| (reason::INVALID_BROKER_URI, m))?;
    let mut problems = Vec::new();
    for uri in &uris {
        let props = ConnectionProperties::default().with_connection_name("hookfleet-operator-delete".into());
        let conn = match tokio::time::timeout(BROKER_TIMEOUT, Connection::connect(uri, props)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                problems.push(classify(&e, uri));
                continue;
            }
            Err(_) => {
                problems.push((
                    reason::BROKER_UNREACHABLE,
                    format!("no answer from the broker within {BROKER_TIMEOUT:?}"),
                ));
                continue;
            }
        };
        let mut channels = Vec::new();
        let out = delete_on(&conn, uri, queues, &mut channels).await;
        let _ = tokio::time::timeout(BROKER_TIMEOUT, conn.close(200, "queues deleted".into())).await;
        drop(channels);
        return out;
    }
    // Every node failed: a refused login says more (the same credentials serve every node).
    let n = problems.len();
    let reason = if problems.iter().any(|(r, _)| *r == reason::BROKER_AUTH_FAILED) {
        reason::BROKER_AUTH_FAILED
    } else {
        reason::BROKER_UNREACHABLE
    };
    let message = if n == 1 {
        problems.remove(0).1
    } else {
        let each: Vec<String> = problems
            .iter()
            .enumerate()
            .map(|(i, (_, m))| format!("node {}: {m}", i + 1))
            .collect();
        format!("none of the broker's {n} nodes answered: {}", each.join("; "))
    };
    Err((reason, message))
}

fn not_found(e: &lapin::Error) -> bool {
    let text = e.to_string();
    text.contains("NOT_FOUND") || text.contains("404")
}

async fn delete_on(
    conn: &Connection,
    uri: &str,
    queues: &[String],
    channels: &mut Vec<Channel>,
) -> Result<Vec<(String, QueueFate)>, Problem> {
    let mut out = Vec::with_capacity(queues.len());
    let timed_out = || {
        (
            reason::BROKER_UNREACHABLE,
            format!("the broker did not answer within {BROKER_TIMEOUT:?}"),
        )
    };
    for q in queues {
        let ch = match tokio::time::timeout(BROKER_TIMEOUT, conn.create_channel()).await {
            Ok(Ok(ch)) => ch,
            Ok(Err(e)) => return Err(classify(&e, uri)),
            Err(_) => return Err(timed_out()),
        };
        channels.push(ch.clone());
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let read = tokio::time::timeout(
            BROKER_TIMEOUT,
            ch.queue_declare(q.as_str().into(), passive, FieldTable::default()),
        )
        .await
        .map_err(|_| timed_out())?;
        let fate = match read {
            Ok(info) if info.consumer_count() > 0 => QueueFate::InUse {
                consumers: info.consumer_count(),
            },
            Ok(_) => {
                let deleted = tokio::time::timeout(
                    BROKER_TIMEOUT,
                    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
                )
                .await
                .map_err(|_| timed_out())?;
                match deleted {
                    Ok(messages) => {
                        info!(queue = %q, messages, "queue deleted with its messages");
                        QueueFate::Deleted { messages }
                    }
                    Err(e) if not_found(&e) => QueueFate::Absent,
                    Err(e) if conn.status().connected() => QueueFate::Refused(classify(&e, uri).1),
                    Err(e) => return Err(classify(&e, uri)),
                }
            }
            Err(e) if not_found(&e) => QueueFate::Absent,
            Err(e) if conn.status().connected() => QueueFate::Refused(classify(&e, uri).1),
            Err(e) => return Err(classify(&e, uri)),
        };
        out.push((q.clone(), fate));
    }
    Ok(out)
}
