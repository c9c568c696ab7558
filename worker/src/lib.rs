//! hookfleet-worker: consumes one RabbitMQ queue and delivers each message as an HTTP webhook,
//! acknowledging it only once its fate is settled (delivered, or stored in a delay or dead-letter
//! queue with a publisher confirm). The binary is `main.rs`; the modules are here so the pure parts
//! are unit-tested in isolation. The flag contract is in `docs/worker.md`.

pub mod auth;
pub mod backoff;
pub mod breaker;
pub mod config;
pub mod fdlimit;
pub mod message;
pub mod metrics;
pub mod oneshot;
pub mod outcome;
pub mod ratelimit;
pub mod signing;
pub mod ssrf;
pub mod target;
pub mod template;
pub mod throttle;
pub mod tracecontext;
pub mod webhooks;
pub mod worker;
