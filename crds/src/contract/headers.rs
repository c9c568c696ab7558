//! The AMQP headers the worker writes on a message it retries or dead-letters, and reads back: its
//! delivery id, attempt count, first-seen time, why it failed. `kubectl hookfleet replay` reads and resets
//! them; the Webhook a copy is for is [`super::webhooks::H_WEBHOOK`].

/// The delivery id, once derived (kept across retries so every attempt has the same `webhook-id`).
pub const H_ID: &str = "x-hookfleet-id";
/// Attempts made so far (failed ones, when the message sits in a retry or dead-letter queue).
pub const H_ATTEMPTS: &str = "x-hookfleet-attempts";
/// When the worker first saw the message (Unix milliseconds).
pub const H_FIRST_SEEN: &str = "x-hookfleet-first-seen-ms";
/// Delay chosen before the next attempt (milliseconds), on retries.
pub const H_NEXT_DELAY: &str = "x-hookfleet-next-delay-ms";
/// Why the last attempt failed: `http_status`, `timeout`, `connect`, `fd_exhausted`, `redirect`, …
pub const H_LAST_ERROR: &str = "x-hookfleet-last-error";
/// HTTP status of the last attempt (absent when there was no response).
pub const H_LAST_STATUS: &str = "x-hookfleet-last-status";
/// Why the message was dead-lettered: the last error, or `attempts_exhausted`.
pub const H_DEAD_REASON: &str = "x-hookfleet-dead-reason";
/// When it was dead-lettered (Unix milliseconds).
pub const H_DEAD_AT: &str = "x-hookfleet-dead-at-ms";
/// Exchange and routing key the message was first published with (a retry comes back through the
/// default exchange, so they are kept for the dead-letter queue's readers).
pub const H_EXCHANGE: &str = "x-hookfleet-exchange";
pub const H_ROUTING_KEY: &str = "x-hookfleet-routing-key";
