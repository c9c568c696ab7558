//! Reads a queue's consumer count and backlog from RabbitMQ with a passive `queue.declare` (it creates
//! nothing and needs only `configure`-free read access).
//!
//! Probes are per broker and never wait on another broker: each broker URI has its own connection, connected
//! by one probe at a time (single flight; a failed connect is remembered for [`FAILURE_HOLD`] so a burst of
//! reconciles shares one attempt instead of queueing one timeout each), and at most [`LANES`] probes at once,
//! each on a channel of its own that is kept open between probes.
//!
//! A probe of a queue that does not exist makes the broker close that probe's channel (404). lapin frees
//! such a channel id asynchronously and, when the last handle of a channel is dropped, closes the channel
//! *by id*, which can hit a newer channel that reused the id (a present queue then reads as missing, or the
//! connection fails). So a channel handle is never dropped while its connection serves probes: closed
//! channels are parked on their connection, and a connection is retired — closed, its parked handles with
//! it — once it has opened half of its negotiated `channel_max`, before lapin's sequential ids could wrap.
//! Whatever lapin leaked on a connection leaves with it.
//!
//! A connection Secret may name several nodes of one broker (a RabbitMQ cluster: URIs separated by commas or
//! whitespace, as the worker reads them). A probe asks the first node that answers, starting with the one that
//! answered last for that Secret value, so a node that is down costs one connect attempt per [`FAILURE_HOLD`]
//! at most, and only while the node before it in the list is down too. Each node is an endpoint of its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::{Duration, Instant};

use hookfleet_crds::broker::redact;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::{Mutex, Semaphore};

use crate::core::status::{SourceObs, reason};

/// Longest the operator waits on the broker for a connect, and for one probe.
pub(crate) const BROKER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed connect answers for a broker before the next probe tries again.
const FAILURE_HOLD: Duration = Duration::from_secs(2);
/// Probes of one broker at the same time (each on its own channel).
const LANES: usize = 4;
/// Channels a connection opens before it is retired when the broker set no `channel_max`.
const RETIRE_DEFAULT: u32 = 1024;

#[derive(Default)]
pub struct Broker {
    // Keyed by the URI itself (it holds credentials: kept in memory only, never logged). The lock is held only
    // to look an entry up, never across I/O.
    endpoints: SyncMutex<HashMap<String, Arc<Endpoint>>>,
    /// For a Secret value with several URIs: the index of the node that answered last.
    preferred: SyncMutex<HashMap<String, usize>>,
    generations: AtomicU64,
}

/// One broker URI: its current connection and its probe lanes.
struct Endpoint {
    conn: Mutex<ConnState>,
    lanes: Semaphore,
    idle: SyncMutex<Vec<Lane>>,
}

#[derive(Default)]
struct ConnState {
    current: Option<Arc<Generation>>,
    failed: Option<(Instant, &'static str, String)>,
}

/// One connection, from its connect until it is retired.
struct Generation {
    id: u64,
    conn: Option<Connection>,
    opened: AtomicU32,
    retire_at: u32,
    /// Handles of channels the broker closed (or that stopped answering), kept until the connection closes.
    parked: SyncMutex<Vec<Channel>>,
}

/// A probe channel and the connection it belongs to.
#[derive(Default)]
struct Lane {
    open: Option<(Arc<Generation>, Channel)>,
}

pub(crate) type Problem = (&'static str, String);

/// Checks that `uri` is an AMQP URI; the message never repeats the URI (it may hold a password).
pub fn parse_uri(uri: &str) -> Result<AMQPUri, String> {
    let uri = uri.trim();
    if !(uri.starts_with("amqp://") || uri.starts_with("amqps://")) {
        return Err("the broker URI must start with amqp:// or amqps://".into());
    }
    uri.parse::<AMQPUri>()
        .map_err(|e| format!("the broker URI does not parse: {}", redact(&e, uri)))
}

/// Splits a connection Secret's value into its broker URIs (one, or several separated by commas or whitespace)
/// and checks each; a message names the entry, never the URI.
pub fn parse_uris(value: &str) -> Result<Vec<&str>, String> {
    let uris = hookfleet_crds::broker::split_uris(value);
    if uris.is_empty() {
        return Err("the broker URI is empty".into());
    }
    let n = uris.len();
    for (i, uri) in uris.iter().enumerate() {
        parse_uri(uri).map_err(|e| {
            if n == 1 {
                e
            } else {
                format!("entry {} of {n}: {e}", i + 1)
            }
        })?;
    }
    Ok(uris)
}

pub(crate) fn classify(e: &lapin::Error, uri: &str) -> Problem {
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

impl Generation {
    fn connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.status().connected())
    }

    fn exhausted(&self) -> bool {
        self.opened.load(Ordering::Relaxed) >= self.retire_at
    }

    fn park(&self, ch: Channel) {
        self.parked.lock().expect("parked channels").push(ch);
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let (Some(conn), parked) = (
            self.conn.take(),
            std::mem::take(&mut *self.parked.lock().expect("parked")),
        ) else {
            return;
        };
        // Close the connection first: once it is closed, dropping the parked handles sends nothing.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = tokio::time::timeout(BROKER_TIMEOUT, conn.close(200, "retired".into())).await;
                drop(parked);
            });
        }
    }
}

impl Endpoint {
    fn new() -> Self {
        Endpoint {
            conn: Mutex::default(),
            lanes: Semaphore::new(LANES),
            idle: SyncMutex::default(),
        }
    }

    /// The connection to probe on: the current one, or a new one (one connect at a time for this broker).
    async fn generation(&self, uri: &str, ids: &AtomicU64) -> Result<Arc<Generation>, Problem> {
        let mut state = self.conn.lock().await;
        if let Some(g) = &state.current {
            if g.connected() && !g.exhausted() {
                return Ok(g.clone());
            }
            state.current = None;
        }
        if let Some((at, reason, message)) = &state.failed
            && at.elapsed() < FAILURE_HOLD
        {
            return Err((reason, message.clone()));
        }
        let props = ConnectionProperties::default().with_connection_name("hookfleet-operator".into());
        let conn = match tokio::time::timeout(BROKER_TIMEOUT, Connection::connect(uri, props)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let (reason, message) = classify(&e, uri);
                state.failed = Some((Instant::now(), reason, message.clone()));
                return Err((reason, message));
            }
            Err(_) => {
                let message = format!("no answer from the broker within {BROKER_TIMEOUT:?}");
                state.failed = Some((Instant::now(), reason::BROKER_UNREACHABLE, message.clone()));
                return Err((reason::BROKER_UNREACHABLE, message));
            }
        };
        let max = u32::from(conn.configuration().channel_max());
        let g = Arc::new(Generation {
            id: ids.fetch_add(1, Ordering::Relaxed),
            conn: Some(conn),
            opened: AtomicU32::new(0),
            retire_at: if max == 0 {
                RETIRE_DEFAULT
            } else {
                (max / 2).max(1)
            },
            parked: SyncMutex::default(),
        });
        state.failed = None;
        state.current = Some(g.clone());
        Ok(g)
    }

    /// Retires `g` if it is still the current connection: the next probe connects anew.
    async fn retire(&self, g: &Generation) {
        let mut state = self.conn.lock().await;
        if state.current.as_ref().is_some_and(|c| c.id == g.id) {
            state.current = None;
        }
    }

    /// A channel on `g`: the lane's own if it is still open on `g`, else a new one.
    async fn channel(&self, lane: &mut Lane, g: &Arc<Generation>) -> Result<Channel, lapin::Error> {
        match lane.open.take() {
            Some((lg, ch)) if lg.id == g.id && ch.status().connected() => return Ok(ch),
            Some((lg, ch)) => lg.park(ch),
            None => {}
        }
        if g.opened.fetch_add(1, Ordering::Relaxed) + 1 >= g.retire_at {
            // This is the last channel this connection opens; probes after this one connect anew.
            self.retire(g).await;
        }
        let conn = g
            .conn
            .as_ref()
            .expect("a generation holds its connection until dropped");
        conn.create_channel().await
    }

    async fn probe(&self, uri: &str, queue: &str, ids: &AtomicU64) -> SourceObs {
        let _permit = self
            .lanes
            .acquire()
            .await
            .expect("the lanes semaphore is never closed");
        let mut lane = self.idle.lock().expect("idle lanes").pop().unwrap_or_default();
        let obs = self.probe_on(&mut lane, uri, queue, ids).await;
        self.idle.lock().expect("idle lanes").push(lane);
        obs
    }

    async fn probe_on(&self, lane: &mut Lane, uri: &str, queue: &str, ids: &AtomicU64) -> SourceObs {
        // A channel or connection that failed under us is the connection's fault, not the queue's: try once more
        // on a fresh connection before calling the broker unreachable.
        let mut last = None;
        for _ in 0..2 {
            let g = match self.generation(uri, ids).await {
                Ok(g) => g,
                Err((reason, message)) => return SourceObs::Problem { reason, message },
            };
            let ask = async {
                let ch = self.channel(lane, &g).await?;
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
                Ok::<_, lapin::Error>((ch, q))
            };
            match tokio::time::timeout(BROKER_TIMEOUT, ask).await {
                Ok(Ok((ch, Ok(q)))) => {
                    lane.open = Some((g, ch));
                    return SourceObs::Queue {
                        consumers: i32::try_from(q.consumer_count()).unwrap_or(i32::MAX),
                        backlog: i64::from(q.message_count()),
                    };
                }
                Ok(Ok((ch, Err(e)))) => {
                    // The broker closed this channel: park its handle on its connection.
                    g.park(ch);
                    let text = e.to_string();
                    if text.contains("NOT_FOUND") || text.contains("404") {
                        return SourceObs::QueueMissing;
                    }
                    if g.connected() {
                        // A channel-level refusal about this queue (e.g. no permission on it).
                        let (reason, message) = classify(&e, uri);
                        return SourceObs::Problem { reason, message };
                    }
                    self.retire(&g).await;
                    last = Some(classify(&e, uri));
                }
                Ok(Err(e)) => {
                    self.retire(&g).await;
                    last = Some(classify(&e, uri));
                }
                Err(_) => {
                    // A channel that did not answer may still answer later: its connection is not trusted again.
                    self.retire(&g).await;
                    last = Some((
                        reason::BROKER_UNREACHABLE,
                        format!("the broker did not answer within {BROKER_TIMEOUT:?}"),
                    ));
                }
            }
        }
        let (reason, message) = last.expect("the loop ran at least once");
        SourceObs::Problem { reason, message }
    }

    async fn close(&self) {
        let current = self.conn.lock().await.current.take();
        self.idle.lock().expect("idle lanes").clear();
        if let Some(conn) = current.as_ref().and_then(|g| g.conn.as_ref()) {
            let _ = tokio::time::timeout(BROKER_TIMEOUT, conn.close(200, "operator stopping".into())).await;
        }
    }
}

impl Broker {
    fn endpoint(&self, uri: &str) -> Arc<Endpoint> {
        let mut endpoints = self.endpoints.lock().expect("broker endpoints");
        endpoints
            .entry(uri.to_string())
            .or_insert_with(|| Arc::new(Endpoint::new()))
            .clone()
    }

    /// Consumers and ready messages of `queue`, or the problem that prevented reading them. `value` is the
    /// connection Secret's value: one broker URI or several nodes of one broker (see [`parse_uris`]).
    pub async fn observe(&self, value: &str, queue: &str) -> SourceObs {
        let uris = match parse_uris(value) {
            Ok(uris) => uris,
            Err(message) => {
                return SourceObs::Problem {
                    reason: reason::INVALID_BROKER_URI,
                    message,
                };
            }
        };
        let n = uris.len();
        if n == 1 {
            return self
                .endpoint(uris[0])
                .probe(uris[0], queue, &self.generations)
                .await;
        }
        // The node that answered last first, then the others in their order.
        let first = self
            .preferred
            .lock()
            .expect("preferred nodes")
            .get(value)
            .copied()
            .unwrap_or(0)
            % n;
        let order = std::iter::once(first).chain((0..n).filter(|&i| i != first));
        let mut problems: Vec<(usize, Problem)> = Vec::new();
        for i in order {
            match self
                .endpoint(uris[i])
                .probe(uris[i], queue, &self.generations)
                .await
            {
                SourceObs::Problem { reason, message } => problems.push((i, (reason, message))),
                obs => {
                    if i != first {
                        self.preferred
                            .lock()
                            .expect("preferred nodes")
                            .insert(value.to_owned(), i);
                    }
                    return obs;
                }
            }
        }
        // Every node failed: a login refusal is the more useful reason (the same credentials serve every node).
        problems.sort_by_key(|(i, _)| *i);
        let reason = if problems
            .iter()
            .any(|(_, (r, _))| *r == reason::BROKER_AUTH_FAILED)
        {
            reason::BROKER_AUTH_FAILED
        } else {
            reason::BROKER_UNREACHABLE
        };
        let detail: Vec<String> = problems
            .iter()
            .map(|(i, (_, m))| format!("node {}: {m}", i + 1))
            .collect();
        SourceObs::Problem {
            reason,
            message: format!("none of the broker's {n} nodes answered: {}", detail.join("; ")),
        }
    }

    /// Closes every connection (each closes as its last probe lets go of it).
    pub async fn close(&self) {
        let endpoints: Vec<_> = self
            .endpoints
            .lock()
            .expect("broker endpoints")
            .drain()
            .map(|(_, e)| e)
            .collect();
        for e in endpoints {
            e.close().await;
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

    #[test]
    fn several_uris_are_split_and_each_checked() {
        assert_eq!(
            parse_uris("amqp://u:p@a:1/%2f, amqp://u:p@b:2/%2f\namqps://u:p@c/").unwrap(),
            ["amqp://u:p@a:1/%2f", "amqp://u:p@b:2/%2f", "amqps://u:p@c/"]
        );
        assert_eq!(parse_uris(" amqp://h/ ").unwrap(), ["amqp://h/"]);
        let e = parse_uris("amqp://u:secret@a/,http://u:secret@b/").unwrap_err();
        assert!(e.starts_with("entry 2 of 2: "), "{e}");
        assert!(!e.contains("secret"), "{e}");
        let e = parse_uris("amqp://a/ amqp://b/ amqp://u:secret@c:port/").unwrap_err();
        assert!(e.starts_with("entry 3 of 3: "), "{e}");
        assert!(!e.contains("secret"), "{e}");
        assert!(parse_uris(" , ").is_err());
    }
}
