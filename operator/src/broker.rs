//! Reads a queue's consumer count and backlog from RabbitMQ with a passive `queue.declare` (it creates
//! nothing and needs only `configure`-free read access). Connections are cached per URI and re-opened when
//! the broker dropped them; a channel lives for one question.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use tokio::sync::Mutex;

use crate::status::{SourceObs, reason};

/// Longest the operator waits on the broker during one reconcile.
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Broker {
    // Keyed by the URI itself (it holds credentials: kept in memory only, never logged).
    connections: Mutex<HashMap<String, Arc<Connection>>>,
}

/// Checks that `uri` is an AMQP URI; the message never repeats the URI (it may hold a password).
pub fn parse_uri(uri: &str) -> Result<AMQPUri, String> {
    let uri = uri.trim();
    if !(uri.starts_with("amqp://") || uri.starts_with("amqps://")) {
        return Err("the broker URI must start with amqp:// or amqps://".into());
    }
    uri.parse::<AMQPUri>()
        .map_err(|e| format!("the broker URI does not parse: {}", redact(&e, uri)))
}

/// Removes any occurrence of the URI (and so its password) from an error message.
fn redact(msg: &str, uri: &str) -> String {
    if uri.is_empty() {
        msg.into()
    } else {
        msg.replace(uri, "<uri>")
    }
}

fn classify(e: &lapin::Error, uri: &str) -> (&'static str, String) {
    let text = redact(&e.to_string(), uri);
    let lower = text.to_ascii_lowercase();
    if lower.contains("access_refused")
        || lower.contains("access-refused")
        || lower.contains("auth")
        || lower.contains("login")
    {
        (
            reason::BROKER_AUTH_FAILED,
            format!("the broker refused the login: {text}"),
        )
    } else {
        (
            reason::BROKER_UNREACHABLE,
            format!("cannot reach the broker: {text}"),
        )
    }
}

impl Broker {
    async fn connection(&self, uri: &str) -> Result<Arc<Connection>, (&'static str, String)> {
        let mut conns = self.connections.lock().await;
        if let Some(c) = conns.get(uri)
            && c.status().connected()
        {
            return Ok(c.clone());
        }
        conns.remove(uri);
        let props = ConnectionProperties::default().with_connection_name("hookfleet-operator".into());
        let conn = match tokio::time::timeout(BROKER_TIMEOUT, Connection::connect(uri, props)).await {
            Err(_) => {
                return Err((
                    reason::BROKER_UNREACHABLE,
                    format!("no answer from the broker within {BROKER_TIMEOUT:?}"),
                ));
            }
            Ok(Err(e)) => return Err(classify(&e, uri)),
            Ok(Ok(c)) => Arc::new(c),
        };
        conns.insert(uri.to_string(), conn.clone());
        Ok(conn)
    }

    /// Consumers and ready messages of `queue`, or the problem that prevented reading them.
    pub async fn observe(&self, uri: &str, queue: &str) -> SourceObs {
        if let Err(message) = parse_uri(uri) {
            return SourceObs::Problem {
                reason: reason::INVALID_BROKER_URI,
                message,
            };
        }
        let conn = match self.connection(uri).await {
            Ok(c) => c,
            Err((reason, message)) => return SourceObs::Problem { reason, message },
        };
        let ask = async {
            let ch = conn.create_channel().await?;
            let q = ch
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            // A failed passive declare already closed the channel on the broker's side.
            if q.is_ok() {
                let _ = ch.close(200, "done".into()).await;
            }
            q
        };
        match tokio::time::timeout(BROKER_TIMEOUT, ask).await {
            Err(_) => SourceObs::Problem {
                reason: reason::BROKER_UNREACHABLE,
                message: format!("the broker did not answer within {BROKER_TIMEOUT:?}"),
            },
            Ok(Ok(q)) => SourceObs::Queue {
                consumers: i32::try_from(q.consumer_count()).unwrap_or(i32::MAX),
                backlog: i64::from(q.message_count()),
            },
            Ok(Err(e)) => {
                let text = e.to_string();
                if text.contains("NOT_FOUND") || text.contains("404") {
                    SourceObs::QueueMissing
                } else {
                    let (reason, message) = classify(&e, uri);
                    SourceObs::Problem { reason, message }
                }
            }
        }
    }

    /// Closes every cached connection.
    pub async fn close(&self) {
        for (_, c) in self.connections.lock().await.drain() {
            let _ = c.close(200, "operator stopping".into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_checks_do_not_leak_the_uri() {
        assert!(parse_uri("amqp://u:p@localhost:5672/%2f").is_ok());
        let e = parse_uri("http://u:secret@host").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        let e = parse_uri("amqp://u:secret@host:notaport").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }
}
