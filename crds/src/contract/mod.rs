//! What the operator and the worker must agree on, in one place:
//!
//! - the worker's arguments as one typed structure, [`WorkerArgs`] (clap's derive: the worker parses its
//!   command line and environment with it), built by the operator from the spec and rendered into the
//!   pod by [`WorkerSetup`] (`from_spec`, `render`): flags, and variables the kubelet fills from
//!   Secrets;
//! - the flag names and their environment variables ([`flag`], [`env`]), the ranges
//!   ([`crate::limits`], shared with the CRD schema), the queue names ([`queues`]);
//! - the metrics port, the exit codes the operator reads from a crashed worker, and the line the
//!   worker writes when the fd limit cannot be met.
//! - the one-shot `hookfleet-worker test-delivery` that `kubectl hookfleet test-delivery` runs in a pod made from
//!   the worker Deployment: its arguments, put in front of the worker's own, its marker header and exit codes
//!   ([`test_delivery`]).
//!
//! Both binaries use these; no flag or variable name is spelled out anywhere else. `crds/tests/contract.rs`
//! renders every example and operator fixture through [`WorkerSetup`] and parses it back with
//! [`WorkerArgs`]; `operator/tests/contract.rs` does the same through the operator's pod builder, and
//! `worker/tests/contract.rs` takes the result through the worker's environment and file stage.

mod args;
pub mod headers;
pub mod memory;
mod parse;
pub mod queues;
mod rules;
mod setup;
pub mod test_delivery;
pub mod webhooks;

pub use args::{LogFormat, WorkerArgs};
pub use parse::{Refused, refusal};
pub use rules::{AUTHORIZATION_TWICE, Checked, Invalid, NatsChecked};
pub use setup::{FromSecret, Pod, WorkerSetup};

/// Port of the worker's `/metrics`, `/healthz` and `/readyz`.
pub const METRICS_PORT: u16 = 9090;

/// The worker's default `--metrics-addr`: every interface, [`METRICS_PORT`] (a test checks they agree).
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9090";

/// Where the worker writes why it stopped (the container's `terminationMessagePath`).
pub const TERMINATION_LOG: &str = "/dev/termination-log";

/// Start of the line the worker writes (termination message, log) when the file-descriptor limit
/// cannot be raised to what its concurrency needs; the operator recognises it with or without exit 3.
pub const FD_LIMIT_MESSAGE: &str = "file-descriptor limit too low";

/// Long names of the worker's flags (without the leading `--`).
pub mod flag {
    pub const INTEGRATION: &str = "integration";
    pub const AMQP_URI: &str = "amqp-uri";
    pub const AMQP_URI_FILE: &str = "amqp-uri-file";
    pub const QUEUE: &str = "queue";
    pub const BINDING: &str = "binding";
    pub const PREFETCH: &str = "prefetch";
    pub const QUEUE_TYPE: &str = "queue-type";
    pub const TOPOLOGY: &str = "topology";
    pub const DELIVERY_LIMIT: &str = "delivery-limit";
    pub const DESTINATION_URL: &str = "destination-url";
    pub const WEBHOOKS_SECRET: &str = "webhooks-secret";
    pub const EVENT_NAME_HEADER: &str = "event-name-header";
    pub const UNMATCHED: &str = "unmatched";
    pub const METHOD: &str = "method";
    pub const HEADER: &str = "header";
    pub const HEADER_FROM_ENV: &str = "header-from-env";
    pub const BODY_TEMPLATE: &str = "body-template";
    pub const TIMEOUT: &str = "timeout";
    pub const MAX_ATTEMPTS: &str = "max-attempts";
    pub const BACKOFF_INITIAL: &str = "backoff-initial";
    pub const BACKOFF_MAX: &str = "backoff-max";
    pub const BACKOFF_MULTIPLIER: &str = "backoff-multiplier";
    pub const BACKOFF_JITTER: &str = "backoff-jitter";
    pub const CONCURRENCY: &str = "concurrency";
    pub const RATE_LIMIT: &str = "rate-limit";
    pub const RATE_LIMIT_BURST: &str = "rate-limit-burst";
    pub const CIRCUIT_BREAKER_THRESHOLD: &str = "circuit-breaker-threshold";
    pub const CIRCUIT_BREAKER_COOLDOWN: &str = "circuit-breaker-cooldown";
    pub const CONFIRM_TIMEOUT: &str = "confirm-timeout";
    pub const DEAD_LETTER_QUEUE: &str = "dead-letter-queue";
    pub const FD_LIMIT: &str = "fd-limit";
    pub const ALLOW_PRIVATE_NETWORKS: &str = "allow-private-networks";
    pub const METRICS_ADDR: &str = "metrics-addr";
    pub const SHUTDOWN_GRACE: &str = "shutdown-grace";
    pub const TERMINATION_LOG: &str = "termination-log";
    pub const LOG_FORMAT: &str = "log-format";
    pub const RATE_LIMIT_SCOPE: &str = "rate-limit-scope";
    pub const ADAPTIVE_THROTTLE: &str = "adaptive-throttle";
    pub const ADAPTIVE_THROTTLE_MIN: &str = "adaptive-throttle-min";
    pub const ADAPTIVE_THROTTLE_WINDOW: &str = "adaptive-throttle-window";
    pub const SIGNING_SECRET_ENV: &str = "signing-secret-env";
    pub const OAUTH2_TOKEN_URL: &str = "oauth2-token-url";
    pub const OAUTH2_SCOPE: &str = "oauth2-scope";
    pub const TLS_CA_FILE: &str = "tls-ca-file";
    pub const TLS_CLIENT_CERT_FILE: &str = "tls-client-cert-file";
    pub const TLS_CLIENT_KEY_FILE: &str = "tls-client-key-file";
    pub const MAX_MESSAGE_BYTES: &str = "max-message-bytes";
    pub const IN_FLIGHT_BYTES: &str = "in-flight-bytes";
    pub const NATS_URL: &str = "nats-url";
    pub const NATS_URL_FILE: &str = "nats-url-file";
    pub const NATS_STREAM: &str = "nats-stream";
    pub const NATS_SUBJECT: &str = "nats-subject";
    pub const NATS_CREDS_FILE: &str = "nats-creds-file";
    pub const NATS_ACK_WAIT: &str = "nats-ack-wait";
}

/// Environment variables of the worker: one per flag (the flag wins), plus those only the environment
/// carries (values from Secrets).
pub mod env {
    pub const INTEGRATION: &str = "HOOKFLEET_INTEGRATION";
    pub const AMQP_URI: &str = "HOOKFLEET_AMQP_URI";
    pub const AMQP_URI_FILE: &str = "HOOKFLEET_AMQP_URI_FILE";
    /// The NATS server URLs (`nats://` or `tls://`, user and password in them if any), comma- or
    /// whitespace-separated: only the environment or a file carries them.
    pub const NATS_URL: &str = "HOOKFLEET_NATS_URL";
    pub const NATS_URL_FILE: &str = "HOOKFLEET_NATS_URL_FILE";
    /// A NATS token (from a Secret): only the environment carries it.
    pub const NATS_TOKEN: &str = "HOOKFLEET_NATS_TOKEN";
    pub const NATS_STREAM: &str = "HOOKFLEET_NATS_STREAM";
    /// Comma-separated.
    pub const NATS_SUBJECTS: &str = "HOOKFLEET_NATS_SUBJECTS";
    pub const NATS_CREDS_FILE: &str = "HOOKFLEET_NATS_CREDS_FILE";
    pub const NATS_ACK_WAIT: &str = "HOOKFLEET_NATS_ACK_WAIT";
    pub const QUEUE: &str = "HOOKFLEET_QUEUE";
    /// Comma-separated.
    pub const BINDINGS: &str = "HOOKFLEET_BINDINGS";
    pub const PREFETCH: &str = "HOOKFLEET_PREFETCH";
    pub const QUEUE_TYPE: &str = "HOOKFLEET_QUEUE_TYPE";
    pub const TOPOLOGY: &str = "HOOKFLEET_TOPOLOGY";
    pub const DELIVERY_LIMIT: &str = "HOOKFLEET_DELIVERY_LIMIT";
    pub const DESTINATION_URL: &str = "HOOKFLEET_DESTINATION_URL";
    pub const WEBHOOKS_SECRET: &str = "HOOKFLEET_WEBHOOKS_SECRET";
    pub const EVENT_NAME_HEADER: &str = "HOOKFLEET_EVENT_NAME_HEADER";
    pub const UNMATCHED: &str = "HOOKFLEET_UNMATCHED";
    pub const METHOD: &str = "HOOKFLEET_METHOD";
    /// Newline-separated.
    pub const HEADERS: &str = "HOOKFLEET_HEADERS";
    /// Comma-separated.
    pub const HEADERS_FROM_ENV: &str = "HOOKFLEET_HEADERS_FROM_ENV";
    pub const BODY_TEMPLATE: &str = "HOOKFLEET_BODY_TEMPLATE";
    pub const TIMEOUT: &str = "HOOKFLEET_TIMEOUT";
    pub const MAX_ATTEMPTS: &str = "HOOKFLEET_MAX_ATTEMPTS";
    pub const BACKOFF_INITIAL: &str = "HOOKFLEET_BACKOFF_INITIAL";
    pub const BACKOFF_MAX: &str = "HOOKFLEET_BACKOFF_MAX";
    pub const BACKOFF_MULTIPLIER: &str = "HOOKFLEET_BACKOFF_MULTIPLIER";
    pub const BACKOFF_JITTER: &str = "HOOKFLEET_BACKOFF_JITTER";
    pub const CONCURRENCY: &str = "HOOKFLEET_CONCURRENCY";
    pub const RATE_LIMIT: &str = "HOOKFLEET_RATE_LIMIT";
    pub const RATE_LIMIT_BURST: &str = "HOOKFLEET_RATE_LIMIT_BURST";
    pub const CIRCUIT_BREAKER_THRESHOLD: &str = "HOOKFLEET_CIRCUIT_BREAKER_THRESHOLD";
    pub const CIRCUIT_BREAKER_COOLDOWN: &str = "HOOKFLEET_CIRCUIT_BREAKER_COOLDOWN";
    pub const CONFIRM_TIMEOUT: &str = "HOOKFLEET_CONFIRM_TIMEOUT";
    pub const DEAD_LETTER_QUEUE: &str = "HOOKFLEET_DEAD_LETTER_QUEUE";
    pub const FD_LIMIT: &str = "HOOKFLEET_FD_LIMIT";
    pub const ALLOW_PRIVATE_NETWORKS: &str = "HOOKFLEET_ALLOW_PRIVATE_NETWORKS";
    pub const METRICS_ADDR: &str = "HOOKFLEET_METRICS_ADDR";
    pub const SHUTDOWN_GRACE: &str = "HOOKFLEET_SHUTDOWN_GRACE";
    pub const TERMINATION_LOG: &str = "HOOKFLEET_TERMINATION_LOG";
    pub const LOG_FORMAT: &str = "HOOKFLEET_LOG_FORMAT";
    pub const RATE_LIMIT_SCOPE: &str = "HOOKFLEET_RATE_LIMIT_SCOPE";
    pub const ADAPTIVE_THROTTLE: &str = "HOOKFLEET_ADAPTIVE_THROTTLE";
    pub const ADAPTIVE_THROTTLE_MIN: &str = "HOOKFLEET_ADAPTIVE_THROTTLE_MIN";
    pub const ADAPTIVE_THROTTLE_WINDOW: &str = "HOOKFLEET_ADAPTIVE_THROTTLE_WINDOW";
    /// Comma-separated names of variables holding more signing secrets.
    pub const SIGNING_SECRET_ENVS: &str = "HOOKFLEET_SIGNING_SECRET_ENVS";
    pub const OAUTH2_TOKEN_URL: &str = "HOOKFLEET_OAUTH2_TOKEN_URL";
    /// Comma-separated.
    pub const OAUTH2_SCOPES: &str = "HOOKFLEET_OAUTH2_SCOPES";
    pub const TLS_CA_FILE: &str = "HOOKFLEET_TLS_CA_FILE";
    pub const TLS_CLIENT_CERT_FILE: &str = "HOOKFLEET_TLS_CLIENT_CERT_FILE";
    pub const TLS_CLIENT_KEY_FILE: &str = "HOOKFLEET_TLS_CLIENT_KEY_FILE";
    pub const MAX_MESSAGE_BYTES: &str = "HOOKFLEET_MAX_MESSAGE_BYTES";
    pub const IN_FLIGHT_BYTES: &str = "HOOKFLEET_IN_FLIGHT_BYTES";
    /// Outgoing auth, only from the environment (Secrets), never flags.
    pub const BASIC_AUTH_USERNAME: &str = "HOOKFLEET_BASIC_AUTH_USERNAME";
    pub const BASIC_AUTH_PASSWORD: &str = "HOOKFLEET_BASIC_AUTH_PASSWORD";
    pub const BEARER_TOKEN: &str = "HOOKFLEET_BEARER_TOKEN";
    pub const OAUTH2_CLIENT_ID: &str = "HOOKFLEET_OAUTH2_CLIENT_ID";
    pub const OAUTH2_CLIENT_SECRET: &str = "HOOKFLEET_OAUTH2_CLIENT_SECRET";
    /// The Standard Webhooks signing secret(s): `whsec_<base64>` or raw bytes; several, space-separated,
    /// sign with each (key rotation). Only from the environment (a Secret), never a flag.
    pub const SIGNING_SECRET: &str = "HOOKFLEET_SIGNING_SECRET";
    /// Prefix of the variables the operator fills from `headersFrom` Secrets (`HOOKFLEET_HEADER_0`, …),
    /// named to the worker by `--header-from-env NAME=VAR`.
    pub const HEADER_PREFIX: &str = "HOOKFLEET_HEADER_";

    /// The variable of the `i`-th `headersFrom` entry.
    pub fn header(i: usize) -> String {
        format!("{HEADER_PREFIX}{i}")
    }

    /// The variable of the `i`-th `signing.secretRefs` entry (`HOOKFLEET_SIGNING_SECRET_0`, …), named to
    /// the worker by `--signing-secret-env`.
    pub fn signing_secret(i: usize) -> String {
        format!("{SIGNING_SECRET}_{i}")
    }
}

/// Keys of a `kubernetes.io/tls` Secret (`destination.tls.clientCertSecret`): the client certificate
/// and its private key, each mounted as a file the worker's TLS flags name.
pub const TLS_SECRET_CERT: &str = "tls.crt";
pub const TLS_SECRET_KEY: &str = "tls.key";

/// `--flag (VARIABLE)`: how the worker names a setting in an error, so the line is enough to fix it.
pub fn setting(flag: &str, env: &str) -> String {
    format!("--{flag} ({env})")
}

/// Exit codes of `hookfleet-worker` (docs/worker.md, "Exit codes and the termination message").
pub mod exit {
    /// Invalid configuration.
    pub const INVALID_CONFIG: i32 = 2;
    /// The file-descriptor limit cannot be raised to what the concurrency needs.
    pub const FD_LIMIT: i32 = 3;
    /// A queue exists on the broker with other arguments than the worker declares (type, delivery
    /// limit, dead-letter settings): the broker refused the declaration with PRECONDITION_FAILED.
    pub const QUEUE_MISMATCH: i32 = 4;
    /// The destination answered HTTP 410 Gone: the worker handed the message back (requeued, nothing
    /// lost), drained, and stopped. The operator reports `DestinationGone` and scales the workers to 0.
    pub const DESTINATION_GONE: i32 = 5;
    /// `--topology external`: a queue the worker uses does not exist (the worker declares none there).
    /// The termination message names every missing queue.
    pub const QUEUES_MISSING: i32 = 6;
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_metrics_addr_uses_the_metrics_port() {
        let addr: std::net::SocketAddr = crate::contract::DEFAULT_METRICS_ADDR.parse().unwrap();
        assert_eq!(addr.port(), crate::contract::METRICS_PORT);
    }
}
