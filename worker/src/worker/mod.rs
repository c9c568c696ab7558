//! The delivery loop, by concern, each module importing only those listed after it (`mod.rs` only
//! wires):
//!
//! - [`session`]: one broker connection at a time (connect, declare, consume the work queue),
//!   reconnecting with jittered backoff, draining in-flight deliveries before a connection is
//!   closed; the exit after a 410;
//! - `jetstream`: the same for a NATS JetStream source (a durable pull consumer), settling through
//!   its own [`Settle`](settle::Settle): ack, nak with delay for a retry, dead letter with `PubAck`;
//! - [`consume`]: the consume loop, one for both lanes (the work queue's and the retry lane's);
//! - `fanout`: with Webhooks, one message to every matching Webhook (or a copy to its own), each
//!   copy's fate, and the original settled once every copy is;
//! - [`probe`]: a test delivery (`hookfleet-worker test-delivery`): one message that never came from the
//!   broker, rendered, sent and judged as `delivery` would, with nothing acked or published;
//! - [`delivery`]: one message from received to settled: its [`Outcome`](crate::outcome::Outcome)
//!   (template, circuit breaker, rate limit, the HTTP attempt), then its fate, carried out;
//! - [`fleet`]: this worker's share of a fleet-wide rate limit;
//! - `report`: with Webhooks, the status reports published on the session's publisher;
//! - [`shared`]: the [`Worker`] itself, the state every session and delivery task shares (the single
//!   destination's `Target`, or the live Webhooks snapshot);
//! - [`broker`]: settling on lapin: the ack ledger's channel and the confirm-mode publisher;
//! - [`settlement`]: the one place that carries out a fate (ack; store a copy in a queue, then ack;
//!   hand back), with the message accounting;
//! - `memory`: the broker operations in memory, for the unit tests;
//! - [`settle`]: the few broker operations settling needs ([`Settle`](settle::Settle));
//! - [`fate`]: the pure function that decides every message's fate from its outcome;
//! - [`lanes`]: the concurrency split between fresh messages and due retries;
//! - [`gone`]: the 410 latch and its termination message;
//! - [`topology`]: the queues and their arguments (classic or quorum), and a declaration the broker
//!   refuses because the queue exists with other arguments;
//! - [`error`]: why a session ends, and what stops the worker;
//! - [`acks`]: the acks of one consume channel, coalesced into `multiple` acks where no other
//!   unsettled message is covered.
//!
//! The rule everything here serves: a message is acked only after its fate is settled somewhere
//! durable: the endpoint answered 2xx, or a copy sits in a delay queue or the dead-letter queue
//! and the broker confirmed it. Whatever happens in between (crash, kill -9, broker restart), the
//! broker still holds the original and redelivers it; the receiver may see a duplicate, with the same
//! `webhook-id`.

mod acks;
mod broker;
mod consume;
mod delivery;
mod error;
mod fanout;
mod fate;
mod fleet;
mod gone;
mod jetstream;
mod lanes;
#[cfg(test)]
mod memory;
pub mod probe;
mod pubacks;
mod report;
mod session;
mod settle;
mod settlement;
mod shared;
pub mod topology;

pub use error::{Fatal, SessionError};
pub use gone::Gone;
pub use lanes::{FreshWait, Lanes};
pub use session::reconnect_delay;
pub use shared::Worker;
