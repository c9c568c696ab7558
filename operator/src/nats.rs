//! Reads a NATS JetStream consumer's state for an Integration with `source.nats`: the consumer's info
//! (`$JS.API.CONSUMER.INFO`), which needs no permission beyond reading the stream's API.
//!
//! JetStream does not count the clients attached to a pull consumer: there is no "consumers" number as
//! RabbitMQ gives for a queue. What stands in ([`SourceObs::Stream`]):
//! - **Idle** (nothing pending, and fewer messages awaiting acks than one worker holds): every live worker
//!   keeps exactly one pull request open (it re-issues it the moment the last one expires), so the requests
//!   waiting on the consumer (`num_waiting`) count the workers pulling. Two reads 50 ms apart, the larger
//!   kept: a request that expired an instant before the read is re-issued by then.
//! - **Busy, delivering** (messages pending or workers full): requests are filled as they arrive, so
//!   `num_waiting` says nothing; the count is unknown (absent from status and metrics, never 0).
//! - **Stalled**: messages pending, room in the workers, and no delivery for [`STALLED_AFTER`] (JetStream's
//!   `delivered.last_active`): nobody pulls, reported as 0.
//!
//! One client per server list and credentials (kept in memory only, never logged), connected by one probe at
//! a time; a failed connect answers for [`FAILURE_HOLD`] so a burst of reconciles shares one attempt. The
//! client reconnects by itself; a probe while it is away times out after [`PROBE_TIMEOUT`]. A client no
//! probe used for [`IDLE_DROP`] is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::consumer::Info;
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use tokio::sync::Mutex;

use crate::core::status::{SourceObs, reason};

/// Longest the operator waits for a connect, and for one request.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed connect answers before the next probe tries again.
const FAILURE_HOLD: Duration = Duration::from_secs(2);
/// A consumer with messages pending and room in its workers that delivered nothing for this long has no
/// worker pulling. Well above a pull request's 5 s expiry and a worker's reconnect.
pub const STALLED_AFTER: Duration = Duration::from_secs(30);
/// A client no probe used for this long is dropped (its connection closed): the Integration went, or its
/// Secret changed.
const IDLE_DROP: Duration = Duration::from_secs(600);
/// The second read of an idle consumer's waiting requests.
const REREAD_AFTER: Duration = Duration::from_millis(50);

/// What a probe asks about: where, as whom, which consumer, and how many messages one worker may hold
/// before it stops pulling (its effective prefetch, at most `delivery.concurrency`).
#[derive(Clone)]
pub struct Question {
    /// The connection Secret's value: server URLs separated by commas or whitespace.
    pub urls: String,
    /// A NATS credentials file's content.
    pub credentials: Option<String>,
    pub token: Option<String>,
    pub stream: String,
    pub consumer: String,
    pub worker_holds: u32,
}

impl Question {
    /// The cache key: everything that decides the connection (credentials included, in memory only).
    fn key(&self) -> String {
        format!(
            "{}\0{}\0{}",
            self.urls,
            self.credentials.as_deref().unwrap_or_default(),
            self.token.as_deref().unwrap_or_default()
        )
    }
}

pub struct Nats {
    endpoints: SyncMutex<HashMap<String, Arc<Mutex<Endpoint>>>>,
    stalled_after: Duration,
}

impl Default for Nats {
    fn default() -> Self {
        Self::with_stalled_after(STALLED_AFTER)
    }
}

struct Endpoint {
    client: Option<async_nats::Client>,
    failed: Option<(Instant, &'static str, String)>,
    /// When a probe last asked for this endpoint.
    used: Instant,
}

impl Nats {
    /// A prober that calls a consumer stalled after `stalled_after` without a delivery ([`STALLED_AFTER`]
    /// by default; tests shorten it).
    pub fn with_stalled_after(stalled_after: Duration) -> Self {
        Nats {
            endpoints: SyncMutex::default(),
            stalled_after,
        }
    }

    /// The consumer's state, or why it cannot be read.
    pub async fn observe(&self, q: &Question) -> SourceObs {
        let client = match self.client(q).await {
            Ok(c) => c,
            Err((reason, message)) => return SourceObs::Problem { reason, message },
        };
        let mut js = jetstream::new(client);
        js.set_timeout(PROBE_TIMEOUT);
        let info = match read(&js, q).await {
            Ok(i) => i,
            Err(obs) => return obs,
        };
        let idle = info.num_pending == 0 && info.num_ack_pending < q.worker_holds as usize;
        let pulling = if idle {
            tokio::time::sleep(REREAD_AFTER).await;
            let again = match read(&js, q).await {
                Ok(i) => i,
                Err(obs) => return obs,
            };
            let still_idle = again.num_pending == 0 && again.num_ack_pending < q.worker_holds as usize;
            still_idle.then(|| info.num_waiting.max(again.num_waiting))
        } else {
            None
        };
        let stalled_secs = stalled(
            &info,
            q.worker_holds,
            self.stalled_after,
            time::OffsetDateTime::now_utc(),
        );
        SourceObs::Stream {
            pulling: match (pulling, stalled_secs) {
                (_, Some(_)) => Some(0),
                (Some(n), None) => Some(i32::try_from(n).unwrap_or(i32::MAX)),
                (None, None) => None,
            },
            backlog: i64::try_from(info.num_pending).unwrap_or(i64::MAX),
            stalled_secs,
        }
    }

    /// The client for `q`'s servers and credentials: the one kept, or a new one (one connect at a time).
    async fn client(&self, q: &Question) -> Result<async_nats::Client, (&'static str, String)> {
        let endpoint = {
            let mut map = self.endpoints.lock().expect("endpoints");
            // Drop the clients no probe asked for lately (one a probe holds now is kept; a probe that took
            // an entry just before the sweep dropped it still uses its client, and the next connects anew).
            map.retain(|_, e| e.try_lock().map_or(true, |e| e.used.elapsed() < IDLE_DROP));
            map.entry(q.key())
                .or_insert_with(|| {
                    Arc::new(Mutex::new(Endpoint {
                        client: None,
                        failed: None,
                        used: Instant::now(),
                    }))
                })
                .clone()
        };
        let mut e = endpoint.lock().await;
        e.used = Instant::now();
        if let Some(c) = &e.client {
            return Ok(c.clone());
        }
        if let Some((at, reason, message)) = &e.failed
            && at.elapsed() < FAILURE_HOLD
        {
            return Err((reason, message.clone()));
        }
        match connect(q).await {
            Ok(c) => {
                e.failed = None;
                e.client = Some(c.clone());
                Ok(c)
            }
            Err((reason, message)) => {
                e.failed = Some((Instant::now(), reason, message.clone()));
                Err((reason, message))
            }
        }
    }
}

/// Seconds since the consumer last delivered, when messages are pending, the workers have room (fewer
/// messages await acks than one worker holds) and that is `after` or longer. A consumer that never
/// delivered counts from its creation.
fn stalled(info: &Info, worker_holds: u32, after: Duration, now: time::OffsetDateTime) -> Option<u64> {
    if info.num_pending == 0 || info.num_ack_pending >= worker_holds as usize {
        return None;
    }
    let last = info.delivered.last_active.unwrap_or(info.created);
    let secs = u64::try_from((now - last).whole_seconds()).unwrap_or(0);
    (secs >= after.as_secs()).then_some(secs)
}

async fn read(js: &jetstream::Context, q: &Question) -> Result<Info, SourceObs> {
    let unreachable = |what: String| SourceObs::Problem {
        reason: reason::BROKER_UNREACHABLE,
        message: what,
    };
    let stream = match js.get_stream_no_info(&q.stream).await {
        Ok(s) => s,
        Err(e) => return Err(unreachable(format!("reading stream {}: {e}", q.stream))),
    };
    match stream.consumer_info(&q.consumer).await {
        Ok(i) => Ok(i),
        Err(e) => match e.kind() {
            ConsumerInfoErrorKind::NotFound => Err(SourceObs::QueueMissing),
            ConsumerInfoErrorKind::StreamNotFound => Err(SourceObs::Problem {
                reason: reason::QUEUES_MISSING,
                message: format!(
                    "stream {} does not exist on the NATS servers: create it (the workers read it, they \
                         do not create it)",
                    q.stream
                ),
            }),
            _ => Err(unreachable(format!(
                "reading consumer {} of stream {}: {e}",
                q.consumer, q.stream
            ))),
        },
    }
}

async fn connect(q: &Question) -> Result<async_nats::Client, (&'static str, String)> {
    connect_to(
        &q.urls,
        q.credentials.as_deref(),
        q.token.as_deref(),
        "hookfleet-operator",
    )
    .await
}

/// A client of the NATS servers of `urls` (a connection Secret's value), logged in with `credentials` (a
/// credentials file's content) or `token` when given, under connection name `name`: what the probe and the
/// Webhook reports consumer (`fleets`) both connect with. The error is a status reason and a
/// message that never shows a URL (it may hold a password) nor the credentials.
pub(crate) async fn connect_to(
    urls: &str,
    credentials: Option<&str>,
    token: Option<&str>,
    name: &str,
) -> Result<async_nats::Client, (&'static str, String)> {
    let invalid = |m: String| (reason::INVALID_BROKER_URI, format!("the NATS server URLs: {m}"));
    // Checked as the worker checks them; the messages name the entry, never the URL.
    let urls = hookfleet_crds::broker::nats_urls(urls).map_err(invalid)?;
    let mut addrs = Vec::with_capacity(urls.len());
    for (i, u) in urls.iter().enumerate() {
        let addr: async_nats::ServerAddr = u
            .parse()
            .map_err(|_| invalid(format!("entry {} does not parse", i + 1)))?;
        addrs.push(addr);
    }
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(PROBE_TIMEOUT);
    if let Some(creds) = credentials {
        opts = opts.credentials(creds).map_err(|e| {
            (
                reason::BROKER_AUTH_FAILED,
                format!("spec.source.nats.credentialsSecretRef is not a NATS credentials file: {e}"),
            )
        })?;
    }
    if let Some(token) = token {
        opts = opts.token(token.trim().to_owned());
    }
    match tokio::time::timeout(PROBE_TIMEOUT, opts.connect(addrs)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => {
            let text = urls
                .iter()
                .fold(e.to_string(), |m, u| hookfleet_crds::broker::redact(&m, u));
            let auth = matches!(
                e.kind(),
                async_nats::ConnectErrorKind::AuthorizationViolation
                    | async_nats::ConnectErrorKind::Authentication
            );
            Err(if auth {
                (
                    reason::BROKER_AUTH_FAILED,
                    format!("the NATS server refused the login: {text}"),
                )
            } else {
                (
                    reason::BROKER_UNREACHABLE,
                    format!("cannot reach the NATS servers: {text}"),
                )
            })
        }
        Err(_) => Err((
            reason::BROKER_UNREACHABLE,
            format!("no answer from the NATS servers within {PROBE_TIMEOUT:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pending: u64, ack_pending: usize, last: Option<time::OffsetDateTime>) -> Info {
        serde_json::from_value(serde_json::json!({
            "stream_name": "S",
            "name": "c",
            "created": "1970-01-01T00:16:40Z",
            "config": {"deliver_policy": "all", "ack_policy": "explicit", "replay_policy": "instant"},
            "delivered": {"consumer_seq": 5, "stream_seq": 5,
                          "last_active": last.map(|t| t.format(&time::format_description::well_known::Rfc3339).unwrap())},
            "ack_floor": {"consumer_seq": 5, "stream_seq": 5},
            "num_ack_pending": ack_pending,
            "num_redelivered": 0,
            "num_waiting": 0,
            "num_pending": pending,
            "cluster": null,
            "push_bound": false,
        }))
        .expect("a consumer info")
    }

    fn stalled_at_default(info: &Info, holds: u32, now: time::OffsetDateTime) -> Option<u64> {
        stalled(info, holds, STALLED_AFTER, now)
    }

    #[test]
    fn a_consumer_is_stalled_only_with_messages_pending_room_in_the_workers_and_no_delivery_for_a_while() {
        let t0 = time::OffsetDateTime::from_unix_timestamp(2_000).unwrap();
        let now = t0 + time::Duration::seconds(40);
        assert_eq!(stalled_at_default(&info(10, 0, Some(t0)), 8, now), Some(40));
        // Nothing pending: idle, not stalled.
        assert_eq!(stalled_at_default(&info(0, 0, Some(t0)), 8, now), None);
        // The workers may all be full (slow sends): they are not asked to pull.
        assert_eq!(stalled_at_default(&info(10, 8, Some(t0)), 8, now), None);
        // Delivered 10 s ago: under STALLED_AFTER.
        assert_eq!(
            stalled_at_default(&info(10, 0, Some(now - time::Duration::seconds(10))), 8, now),
            None
        );
        // Never delivered: counted from the consumer's creation (t = 1000 s).
        assert_eq!(stalled_at_default(&info(10, 0, None), 8, now), Some(1_040));
    }
}
