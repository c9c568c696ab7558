//! Why a broker session ends, and the errors that stop the worker instead of a reconnect.

use std::time::Duration;

use hookfleet_crds::contract::exit;

/// How long one connection attempt (TCP, TLS, AMQP handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a broker session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connecting to the broker: {0}")]
    Connect(#[source] lapin::Error),
    #[error("connecting to the broker: no answer within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    /// Every node of a several-URI broker refused or timed out (one round); each error follows its
    /// redacted URI.
    #[error("connecting to the broker: none of its {nodes} nodes answered: {errors}")]
    NoNodeAnswered { nodes: usize, errors: String },
    #[error("opening a channel: {0}")]
    Channel(#[source] lapin::Error),
    #[error("declaring {what}: {source}")]
    Declare {
        what: String,
        #[source]
        source: lapin::Error,
    },
    /// Not retried: the queue will not change by itself (see [`Fatal`]).
    #[error(
        "queue {queue} exists on the broker with other arguments than the {wanted} queue this worker \
         declares (differs at least in {argument}): {detail}; set --queue-type/--delivery-limit \
         (spec.source.queueType/deliveryLimit) to match the queue, drain and delete it so the \
         worker can declare it, or consume it as declared with --topology external \
         (spec.source.topology)"
    )]
    QueueMismatch {
        queue: String,
        /// `classic` or `quorum`: what the worker asked for.
        wanted: &'static str,
        /// The argument the broker named (it names the first difference it finds).
        argument: String,
        detail: String,
    },
    /// `--topology external` and queues the worker uses do not exist. Not retried: someone has to
    /// declare them.
    #[error(
        "{} of the {of} queues this worker uses do not exist, and with --topology external \
         (spec.source.topology) it declares none: {}; declare them as docs/worker.md (\"Queues declared \
         elsewhere\") says, or use topology managed",
        missing.len(),
        missing.join(", ")
    )]
    QueuesMissing { missing: Vec<String>, of: usize },
    #[error("starting the consumer: {0}")]
    Consume(#[source] lapin::Error),
    #[error("consumer failed: {0}")]
    Consumer(#[source] lapin::Error),
    #[error("the broker cancelled the consumer")]
    ConsumerEnded,
    #[error(
        "a retry or dead-letter copy was not stored (refused, returned or unconfirmed); re-declaring the topology"
    )]
    PublishFailed,
    /// The NATS source: connecting, the JetStream API, the pull consumer.
    #[error("NATS: {0}")]
    Nats(String),
    /// The NATS source's stream, consumer or dead-letter stream is missing (the stream always needs
    /// someone else; the consumer and the dead-letter stream with `--topology external`). Not retried.
    #[error(
        "JetStream has no {}; create {} (docs/worker.md, \"A NATS JetStream source\"){}",
        missing.join(", and no "),
        if missing.len() == 1 { "it" } else { "them" },
        if missing.iter().any(|m| !m.starts_with("stream ") || m.contains("dead-letter")) { ", or use topology managed" } else { "" }
    )]
    NatsMissing { missing: Vec<String> },
    /// The NATS source's consumer or subjects cannot work as they are. Not retried.
    #[error("{0}")]
    NatsMismatch(String),
}

/// An error that stops the worker: its exit code and the line for the termination message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal {
    pub code: i32,
    pub message: String,
}

impl SessionError {
    /// Errors a reconnect cannot fix.
    pub(super) fn fatal(&self) -> Option<Fatal> {
        match self {
            SessionError::QueueMismatch { .. } => Some(Fatal {
                code: exit::QUEUE_MISMATCH,
                message: self.to_string(),
            }),
            SessionError::NatsMismatch(_) => Some(Fatal {
                code: exit::QUEUE_MISMATCH,
                message: self.to_string(),
            }),
            SessionError::QueuesMissing { .. } | SessionError::NatsMissing { .. } => Some(Fatal {
                code: exit::QUEUES_MISSING,
                message: self.to_string(),
            }),
            _ => None,
        }
    }
}
