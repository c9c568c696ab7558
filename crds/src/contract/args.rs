//! [`WorkerArgs`]: the worker's command line and environment as one typed structure. The worker parses
//! it (clap's derive); the operator builds it from the spec ([`super::WorkerSetup`]) and writes it as
//! flags with [`WorkerArgs::to_argv`]. Ranges come from [`crate::limits`] (the CRD schema's too);
//! a refused value reads `--flag (VARIABLE): reason` ([`super::refusal`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValue, TypedValueParser};
use clap::{Parser, ValueEnum, value_parser};

use super::parse::{Choice, at_least, duration, duration_in, float_within, socket_addr, within};
use super::{env, flag};
use crate::integration::{
    CircuitBreakerSpec, DeliverySpec, HttpMethod, Jitter, QueueType, RateLimitScope, Topology, Unmatched,
    default_delivery_limit,
};
use crate::limits;

/// Format of the worker's logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

impl LogFormat {
    /// Every variant, in the order error messages list them.
    pub const ALL: [Self; 2] = [LogFormat::Json, LogFormat::Text];

    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        }
    }
}

/// The enums of the contract are named by their `as_str` (the CRD's values) on flags too.
macro_rules! named_by_as_str {
    ($($t:ty),*) => {$(
        impl ValueEnum for $t {
            fn value_variants<'a>() -> &'a [Self] {
                &<$t>::ALL
            }

            fn to_possible_value(&self) -> Option<PossibleValue> {
                Some(PossibleValue::new(self.as_str()))
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}

named_by_as_str!(
    QueueType,
    Topology,
    HttpMethod,
    Jitter,
    RateLimitScope,
    LogFormat,
    Unmatched
);

/// Flags; each has an environment variable of the same meaning (flag wins).
#[derive(Parser, Clone, Debug, PartialEq)]
#[command(
    name = "hookfleet-worker",
    version,
    about = "Consumes one RabbitMQ queue and delivers each message as an HTTP webhook, at least once."
)]
pub struct WorkerArgs {
    /// NAMESPACE/NAME of the Integration, for logs and metric labels.
    #[arg(long = flag::INTEGRATION, env = env::INTEGRATION, default_value = "")]
    pub integration: String,
    /// Broker URI (amqp:// or amqps://), or several (the nodes of a cluster), comma- or
    /// whitespace-separated. Prefer --amqp-uri-file or the variable: flags show in `ps`.
    #[arg(long = flag::AMQP_URI, env = env::AMQP_URI, hide_env_values = true)]
    pub amqp_uri: Option<String>,
    /// File holding the broker URI or URIs (a mounted Secret key).
    #[arg(long = flag::AMQP_URI_FILE, env = env::AMQP_URI_FILE)]
    pub amqp_uri_file: Option<PathBuf>,
    /// Durable queue to consume (declared with its retry and dead-letter queues).
    #[arg(long = flag::QUEUE, env = env::QUEUE)]
    pub queue: Option<String>,
    /// EXCHANGE=ROUTING_KEY binding of the queue; repeatable (variable: comma-separated).
    #[arg(long = flag::BINDING, env = env::BINDINGS, value_delimiter = ',')]
    pub bindings: Vec<String>,
    /// Unacknowledged messages the broker hands this worker at a time (basic.qos).
    #[arg(
        long = flag::PREFETCH,
        env = env::PREFETCH,
        default_value_t = 64,
        value_parser = value_parser!(u16).try_map(at_least(limits::PREFETCH.min as u16))
    )]
    pub prefetch: u16,
    /// Type of the work, delay and dead-letter queues.
    #[arg(
        long = flag::QUEUE_TYPE,
        env = env::QUEUE_TYPE,
        default_value_t,
        value_parser = Choice::<QueueType>::blank_is_default()
    )]
    pub queue_type: QueueType,
    /// managed: declare the queues; external: declare none, check that each exists, and dead-letter a
    /// message redelivered --delivery-limit times (its x-delivery-count) without attempting it.
    #[arg(
        long = flag::TOPOLOGY,
        env = env::TOPOLOGY,
        default_value_t,
        value_parser = Choice::<Topology>::blank_is_default()
    )]
    pub topology: Topology,
    /// Quorum queues: deliveries of one message before the broker dead-letters it.
    #[arg(
        long = flag::DELIVERY_LIMIT,
        env = env::DELIVERY_LIMIT,
        default_value_t = default_delivery_limit(),
        value_parser = value_parser!(u32).try_map(within(limits::DELIVERY_LIMIT))
    )]
    pub delivery_limit: u32,
    /// Webhook URL (http:// or https://).
    #[arg(long = flag::DESTINATION_URL, env = env::DESTINATION_URL)]
    pub destination_url: Option<String>,
    /// Webhooks instead of one destination: the Secret (in the Integration's namespace) holding the
    /// fleet's Webhooks snapshot, which the worker watches through the Kubernetes API.
    #[arg(long = flag::WEBHOOKS_SECRET, env = env::WEBHOOKS_SECRET)]
    pub webhooks_secret: Option<String>,
    /// With --webhooks-secret: the message header holding the event name (the routing key if absent).
    #[arg(long = flag::EVENT_NAME_HEADER, env = env::EVENT_NAME_HEADER)]
    pub event_name_header: Option<String>,
    /// With --webhooks-secret: what becomes of a message no Webhook matches (ack or deadLetter).
    #[arg(
        long = flag::UNMATCHED,
        env = env::UNMATCHED,
        default_value_t,
        value_parser = Choice::<Unmatched>::blank_is_default()
    )]
    pub unmatched: Unmatched,
    /// HTTP method (any case).
    #[arg(
        long = flag::METHOD,
        env = env::METHOD,
        default_value_t,
        value_parser = Choice::<HttpMethod>::upper_case()
    )]
    pub method: HttpMethod,
    /// "Name: value" request header; repeatable (variable: newline-separated).
    #[arg(long = flag::HEADER, env = env::HEADERS, value_delimiter = '\n')]
    pub headers: Vec<String>,
    /// NAME=ENV_VAR: header NAME gets the value of variable ENV_VAR (from a Secret; never logged).
    /// Repeatable (variable: comma-separated).
    #[arg(long = flag::HEADER_FROM_ENV, env = env::HEADERS_FROM_ENV, value_delimiter = ',')]
    pub header_from_env: Vec<String>,
    /// Variable holding more signing secrets (from a Secret; never logged): each signs every request
    /// too. Repeatable (variable: comma-separated).
    #[arg(long = flag::SIGNING_SECRET_ENV, env = env::SIGNING_SECRET_ENVS, value_delimiter = ',')]
    pub signing_secret_env: Vec<String>,
    /// OAuth2 client credentials: the token endpoint. The client id and secret are read from
    /// HOOKFLEET_OAUTH2_CLIENT_ID and HOOKFLEET_OAUTH2_CLIENT_SECRET.
    #[arg(long = flag::OAUTH2_TOKEN_URL, env = env::OAUTH2_TOKEN_URL)]
    pub oauth2_token_url: Option<String>,
    /// OAuth2 scope to request; repeatable (variable: comma-separated).
    #[arg(long = flag::OAUTH2_SCOPE, env = env::OAUTH2_SCOPES, value_delimiter = ',')]
    pub oauth2_scopes: Vec<String>,
    /// PEM file of CA certificates trusted for the destination besides the system roots.
    #[arg(long = flag::TLS_CA_FILE, env = env::TLS_CA_FILE)]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) presented when the destination asks for one (mTLS).
    #[arg(long = flag::TLS_CLIENT_CERT_FILE, env = env::TLS_CLIENT_CERT_FILE)]
    pub tls_client_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-client-cert-file.
    #[arg(long = flag::TLS_CLIENT_KEY_FILE, env = env::TLS_CLIENT_KEY_FILE)]
    pub tls_client_key_file: Option<PathBuf>,
    /// MiniJinja template of the request body, rendered with the message's JSON fields as variables;
    /// the body is forwarded unchanged when absent.
    /// (A value may start with `-`: the operator passes it as the next argument.)
    #[arg(long = flag::BODY_TEMPLATE, env = env::BODY_TEMPLATE, allow_hyphen_values = true)]
    pub body_template: Option<String>,
    /// Time for one request, connect to last byte (Go duration).
    #[arg(
        long = flag::TIMEOUT,
        env = env::TIMEOUT,
        default_value = "10s",
        value_parser = duration_in(limits::TIMEOUT)
    )]
    pub timeout: Duration,
    /// Attempts before a message is dead-lettered (the first delivery counts).
    #[arg(
        long = flag::MAX_ATTEMPTS,
        env = env::MAX_ATTEMPTS,
        default_value_t = DeliverySpec::default().max_attempts,
        value_parser = value_parser!(u32).try_map(within(limits::MAX_ATTEMPTS))
    )]
    pub max_attempts: u32,
    /// Delay before the second attempt (Go duration).
    #[arg(
        long = flag::BACKOFF_INITIAL,
        env = env::BACKOFF_INITIAL,
        default_value = "1s",
        value_parser = duration_in(limits::BACKOFF)
    )]
    pub backoff_initial: Duration,
    /// Longest delay between attempts, also the cap on Retry-After (Go duration).
    #[arg(
        long = flag::BACKOFF_MAX,
        env = env::BACKOFF_MAX,
        default_value = "10m",
        value_parser = duration_in(limits::BACKOFF)
    )]
    pub backoff_max: Duration,
    /// Growth of the delay per attempt.
    #[arg(
        long = flag::BACKOFF_MULTIPLIER,
        env = env::BACKOFF_MULTIPLIER,
        default_value_t = DeliverySpec::default().backoff.multiplier,
        value_parser = float_within(limits::BACKOFF_MULTIPLIER)
    )]
    pub backoff_multiplier: f64,
    /// Jitter of each delay: full (0..d), equal (d/2..d) or none.
    #[arg(
        long = flag::BACKOFF_JITTER,
        env = env::BACKOFF_JITTER,
        default_value_t,
        value_parser = Choice::<Jitter>::exact()
    )]
    pub backoff_jitter: Jitter,
    /// Deliveries in flight (and so HTTP connections in use) at most.
    #[arg(
        long = flag::CONCURRENCY,
        env = env::CONCURRENCY,
        default_value_t = DeliverySpec::default().concurrency,
        value_parser = value_parser!(u32).try_map(within(limits::CONCURRENCY))
    )]
    pub concurrency: u32,
    /// Requests per second to the destination (per worker, or per fleet with --rate-limit-scope
    /// fleet); unlimited when absent.
    #[arg(
        long = flag::RATE_LIMIT,
        env = env::RATE_LIMIT,
        value_parser = value_parser!(u32).try_map(at_least(limits::RATE_LIMIT.min))
    )]
    pub rate_limit: Option<u32>,
    /// Burst of the rate limit; defaults to --rate-limit.
    #[arg(
        long = flag::RATE_LIMIT_BURST,
        env = env::RATE_LIMIT_BURST,
        value_parser = value_parser!(u32).try_map(at_least(limits::RATE_LIMIT.min))
    )]
    pub rate_limit_burst: Option<u32>,
    /// worker (the limit is this worker's) or fleet (the limit is divided by the consumers attached
    /// to the work queue).
    #[arg(
        long = flag::RATE_LIMIT_SCOPE,
        env = env::RATE_LIMIT_SCOPE,
        default_value_t,
        value_parser = Choice::<RateLimitScope>::blank_is_default()
    )]
    pub rate_limit_scope: RateLimitScope,
    /// Consecutive retryable failures that open the circuit breaker (0 disables it).
    #[arg(
        long = flag::CIRCUIT_BREAKER_THRESHOLD,
        env = env::CIRCUIT_BREAKER_THRESHOLD,
        default_value_t = CircuitBreakerSpec::default().failure_threshold,
        value_parser = value_parser!(u32).try_map(within(limits::CIRCUIT_BREAKER_THRESHOLD))
    )]
    pub circuit_breaker_threshold: u32,
    /// How long an open breaker defers deliveries before one probe is let through (Go duration).
    #[arg(
        long = flag::CIRCUIT_BREAKER_COOLDOWN,
        env = env::CIRCUIT_BREAKER_COOLDOWN,
        default_value = "10s",
        value_parser = duration_in(limits::CIRCUIT_BREAKER_COOLDOWN)
    )]
    pub circuit_breaker_cooldown: Duration,
    /// Halve the deliveries in flight while retryable failures outnumber successes (per window), and
    /// raise them again as the destination recovers.
    #[arg(long = flag::ADAPTIVE_THROTTLE, env = env::ADAPTIVE_THROTTLE)]
    pub adaptive_throttle: bool,
    /// Fewest deliveries in flight the throttle goes down to (1 to --concurrency). Default 1.
    #[arg(long = flag::ADAPTIVE_THROTTLE_MIN, env = env::ADAPTIVE_THROTTLE_MIN)]
    pub adaptive_throttle_min: Option<u32>,
    /// How often the throttle compares failures and successes (Go duration). Default 10s.
    #[arg(
        long = flag::ADAPTIVE_THROTTLE_WINDOW,
        env = env::ADAPTIVE_THROTTLE_WINDOW,
        value_parser = duration_in(limits::ADAPTIVE_THROTTLE_WINDOW)
    )]
    pub adaptive_throttle_window: Option<Duration>,
    /// Longest wait for the broker's confirm of a retry or dead-letter copy (Go duration); past it the
    /// message is handed back and the session reconnects.
    #[arg(
        long = flag::CONFIRM_TIMEOUT,
        env = env::CONFIRM_TIMEOUT,
        default_value = "30s",
        value_parser = duration_in(limits::CONFIRM_TIMEOUT)
    )]
    pub confirm_timeout: Duration,
    /// Dead-letter queue; defaults to <queue>.dead.
    #[arg(long = flag::DEAD_LETTER_QUEUE, env = env::DEAD_LETTER_QUEUE)]
    pub dead_letter_queue: Option<String>,
    /// Soft RLIMIT_NOFILE to raise to at start (capped at the hard limit).
    #[arg(
        long = flag::FD_LIMIT,
        env = env::FD_LIMIT,
        default_value_t = 1_048_576,
        value_parser = value_parser!(u64).try_map(fd_limit)
    )]
    pub fd_limit: u64,
    /// Allow private, loopback and link-local destination addresses (refused by default: SSRF).
    #[arg(long = flag::ALLOW_PRIVATE_NETWORKS, env = env::ALLOW_PRIVATE_NETWORKS)]
    pub allow_private_networks: bool,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long = flag::METRICS_ADDR,
        env = env::METRICS_ADDR,
        default_value = super::DEFAULT_METRICS_ADDR,
        value_parser = socket_addr
    )]
    pub metrics_addr: SocketAddr,
    /// Time in-flight deliveries get to finish after SIGTERM (Go duration).
    #[arg(
        long = flag::SHUTDOWN_GRACE,
        env = env::SHUTDOWN_GRACE,
        default_value = "25s",
        value_parser = duration
    )]
    pub shutdown_grace: Duration,
    /// Where a fatal error is written for Kubernetes (terminationMessagePath).
    #[arg(
        long = flag::TERMINATION_LOG,
        env = env::TERMINATION_LOG,
        default_value = super::TERMINATION_LOG
    )]
    pub termination_log: PathBuf,
    /// Log format.
    #[arg(
        long = flag::LOG_FORMAT,
        env = env::LOG_FORMAT,
        default_value_t,
        value_parser = Choice::<LogFormat>::exact()
    )]
    pub log_format: LogFormat,
    /// Largest message body delivered, in bytes; a larger one is dead-lettered (reason `too_large`).
    #[arg(
        long = flag::MAX_MESSAGE_BYTES,
        env = env::MAX_MESSAGE_BYTES,
        default_value_t = crate::integration::default_max_message_bytes(),
        value_parser = value_parser!(u32).try_map(within(limits::MAX_MESSAGE_BYTES))
    )]
    pub max_message_bytes: u32,
    /// Bytes of messages held at a time (both lanes): each lane's prefetch is lowered to
    /// max(1, this / (2 × --max-message-bytes)).
    #[arg(
        long = flag::IN_FLIGHT_BYTES,
        env = env::IN_FLIGHT_BYTES,
        default_value_t = crate::integration::default_in_flight_bytes() as u64,
        value_parser = value_parser!(u64).try_map(at_least(limits::IN_FLIGHT_BYTES.min as u64))
    )]
    pub in_flight_bytes: u64,
    /// NATS server URLs (nats:// or tls://, user:password@ in them if any), comma- or
    /// whitespace-separated: the source is then a JetStream stream, not a RabbitMQ queue, and --queue
    /// names its durable pull consumer. Prefer --nats-url-file or the variable: flags show in `ps`.
    #[arg(long = flag::NATS_URL, env = env::NATS_URL, hide_env_values = true)]
    pub nats_url: Option<String>,
    /// File holding the NATS server URLs (a mounted Secret key).
    #[arg(long = flag::NATS_URL_FILE, env = env::NATS_URL_FILE)]
    pub nats_url_file: Option<PathBuf>,
    /// The JetStream stream the durable consumer reads (with --nats-url).
    #[arg(long = flag::NATS_STREAM, env = env::NATS_STREAM)]
    pub nats_stream: Option<String>,
    /// Subject filter of the durable consumer; repeatable (variable: comma-separated). None: the whole
    /// stream.
    #[arg(long = flag::NATS_SUBJECT, env = env::NATS_SUBJECTS, value_delimiter = ',')]
    pub nats_subjects: Vec<String>,
    /// NATS credentials file (a user JWT and its NKey seed; a mounted Secret key).
    #[arg(long = flag::NATS_CREDS_FILE, env = env::NATS_CREDS_FILE)]
    pub nats_creds_file: Option<PathBuf>,
    /// How long JetStream waits for an ack before redelivering; a send that takes longer is kept
    /// with in-progress acks.
    #[arg(
        long = flag::NATS_ACK_WAIT,
        env = env::NATS_ACK_WAIT,
        default_value = "30s",
        value_parser = duration_in(limits::NATS_ACK_WAIT)
    )]
    pub nats_ack_wait: Duration,
}

/// `--fd-limit`: at least the worker's reserve.
fn fd_limit(n: u64) -> Result<u64, super::Refused> {
    if n < limits::WORKER_FD_LIMIT_MIN {
        return Err(super::Refused(format!(
            "{n} is below {}",
            limits::WORKER_FD_LIMIT_MIN
        )));
    }
    Ok(n)
}

impl WorkerArgs {
    /// The flags that say these arguments, in the order the operator has always written them (a
    /// changed order would roll every fleet). The broker URI is never written: flags show in `ps`, so
    /// it travels in the environment (`WorkerSetup`'s Secret-filled variables).
    pub fn to_argv(&self) -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
        let mut put = |k: &str, v: String| {
            args.push(format!("--{k}"));
            args.push(v);
        };
        let go = crate::duration::render;
        put(flag::INTEGRATION, self.integration.clone());
        if let Some(path) = &self.amqp_uri_file {
            put(flag::AMQP_URI_FILE, path.display().to_string());
        }
        if let Some(q) = &self.queue {
            put(flag::QUEUE, q.clone());
        }
        for b in &self.bindings {
            put(flag::BINDING, b.clone());
        }
        put(flag::PREFETCH, self.prefetch.to_string());
        put(flag::QUEUE_TYPE, self.queue_type.to_string());
        // Only when not the default, so that managed fleets render the arguments they always had.
        if self.topology != Topology::Managed {
            put(flag::TOPOLOGY, self.topology.to_string());
        }
        put(flag::DELIVERY_LIMIT, self.delivery_limit.to_string());
        if let Some(u) = &self.destination_url {
            put(flag::DESTINATION_URL, u.clone());
        }
        if let Some(w) = &self.webhooks_secret {
            put(flag::WEBHOOKS_SECRET, w.clone());
            if let Some(h) = &self.event_name_header {
                put(flag::EVENT_NAME_HEADER, h.clone());
            }
            put(flag::UNMATCHED, self.unmatched.to_string());
        }
        put(flag::METHOD, self.method.to_string());
        for h in &self.headers {
            put(flag::HEADER, h.clone());
        }
        for h in &self.header_from_env {
            put(flag::HEADER_FROM_ENV, h.clone());
        }
        for v in &self.signing_secret_env {
            put(flag::SIGNING_SECRET_ENV, v.clone());
        }
        if let Some(u) = &self.oauth2_token_url {
            put(flag::OAUTH2_TOKEN_URL, u.clone());
        }
        for s in &self.oauth2_scopes {
            put(flag::OAUTH2_SCOPE, s.clone());
        }
        for (f, path) in [
            (flag::TLS_CA_FILE, &self.tls_ca_file),
            (flag::TLS_CLIENT_CERT_FILE, &self.tls_client_cert_file),
            (flag::TLS_CLIENT_KEY_FILE, &self.tls_client_key_file),
        ] {
            if let Some(p) = path {
                put(f, p.display().to_string());
            }
        }
        if let Some(t) = &self.body_template {
            put(flag::BODY_TEMPLATE, t.clone());
        }
        put(flag::TIMEOUT, go(self.timeout));
        put(flag::MAX_ATTEMPTS, self.max_attempts.to_string());
        put(flag::BACKOFF_INITIAL, go(self.backoff_initial));
        put(flag::BACKOFF_MAX, go(self.backoff_max));
        put(flag::BACKOFF_MULTIPLIER, self.backoff_multiplier.to_string());
        put(flag::BACKOFF_JITTER, self.backoff_jitter.to_string());
        put(flag::CONCURRENCY, self.concurrency.to_string());
        if let Some(r) = self.rate_limit {
            put(flag::RATE_LIMIT, r.to_string());
        }
        if let Some(b) = self.rate_limit_burst {
            put(flag::RATE_LIMIT_BURST, b.to_string());
        }
        if self.rate_limit.is_some() {
            put(flag::RATE_LIMIT_SCOPE, self.rate_limit_scope.to_string());
        }
        put(
            flag::CIRCUIT_BREAKER_THRESHOLD,
            self.circuit_breaker_threshold.to_string(),
        );
        put(flag::CIRCUIT_BREAKER_COOLDOWN, go(self.circuit_breaker_cooldown));
        if let Some(m) = self.adaptive_throttle_min {
            put(flag::ADAPTIVE_THROTTLE_MIN, m.to_string());
        }
        if let Some(w) = self.adaptive_throttle_window {
            put(flag::ADAPTIVE_THROTTLE_WINDOW, go(w));
        }
        if self.confirm_timeout != default_confirm_timeout() {
            put(flag::CONFIRM_TIMEOUT, go(self.confirm_timeout));
        }
        if let Some(q) = &self.dead_letter_queue {
            put(flag::DEAD_LETTER_QUEUE, q.clone());
        }
        put(flag::FD_LIMIT, self.fd_limit.to_string());
        put(flag::METRICS_ADDR, self.metrics_addr.to_string());
        put(flag::SHUTDOWN_GRACE, go(self.shutdown_grace));
        put(flag::TERMINATION_LOG, self.termination_log.display().to_string());
        put(flag::LOG_FORMAT, self.log_format.to_string());
        put(flag::MAX_MESSAGE_BYTES, self.max_message_bytes.to_string());
        put(flag::IN_FLIGHT_BYTES, self.in_flight_bytes.to_string());
        // A NATS source only: RabbitMQ fleets render the arguments they always had.
        if let Some(path) = &self.nats_url_file {
            put(flag::NATS_URL_FILE, path.display().to_string());
        }
        if let Some(s) = &self.nats_stream {
            put(flag::NATS_STREAM, s.clone());
            for f in &self.nats_subjects {
                put(flag::NATS_SUBJECT, f.clone());
            }
            if let Some(path) = &self.nats_creds_file {
                put(flag::NATS_CREDS_FILE, path.display().to_string());
            }
            put(flag::NATS_ACK_WAIT, go(self.nats_ack_wait));
        }
        if self.allow_private_networks {
            args.push(format!("--{}", flag::ALLOW_PRIVATE_NETWORKS));
        }
        if self.adaptive_throttle {
            args.push(format!("--{}", flag::ADAPTIVE_THROTTLE));
        }
        args
    }
}

/// `--confirm-timeout` when not set (the operator leaves it so).
pub(super) fn default_confirm_timeout() -> Duration {
    Duration::from_secs(30)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::integration::{BackoffSpec, DestinationSpec};

    fn parse(argv: &[&str]) -> Result<WorkerArgs, clap::Error> {
        WorkerArgs::try_parse_from(std::iter::once("hookfleet-worker").chain(argv.iter().copied()))
    }

    #[test]
    fn the_command_is_well_formed() {
        WorkerArgs::command().debug_assert();
    }

    #[test]
    fn defaults_are_the_crd_defaults() {
        let a = parse(&[]).unwrap();
        let d = DeliverySpec::default();
        let b = BackoffSpec::default();
        let timeout: Duration = serde_json::from_str::<DestinationSpec>(r#"{"url": "https://x"}"#)
            .unwrap()
            .timeout
            .into();
        assert_eq!(a.timeout, timeout);
        assert_eq!(a.max_attempts, d.max_attempts);
        assert_eq!(a.backoff_initial, Duration::from(b.initial));
        assert_eq!(a.backoff_max, Duration::from(b.max));
        assert_eq!(a.backoff_multiplier, b.multiplier);
        assert_eq!(a.backoff_jitter, b.jitter);
        assert_eq!(a.concurrency, d.concurrency);
        assert_eq!(a.circuit_breaker_threshold, d.circuit_breaker.failure_threshold);
        assert_eq!(
            a.circuit_breaker_cooldown,
            Duration::from(d.circuit_breaker.cooldown)
        );
        assert_eq!(a.queue_type, QueueType::default());
        assert_eq!(a.delivery_limit, default_delivery_limit());
        assert_eq!(a.rate_limit_scope, RateLimitScope::default());
        assert_eq!(a.confirm_timeout, default_confirm_timeout());
        let w = crate::integration::WorkersSpec::default();
        assert_eq!(a.fd_limit, w.file_descriptor_limit as u64);
        assert_eq!(a.in_flight_bytes, w.in_flight_bytes as u64);
        assert_eq!(
            a.max_message_bytes,
            crate::integration::default_max_message_bytes()
        );
    }

    #[test]
    fn enums_by_name() {
        let a = parse(&[
            "--method",
            " put ",
            "--queue-type",
            "",
            "--backoff-jitter",
            "none",
        ])
        .unwrap();
        assert_eq!(
            (a.method, a.queue_type, a.backoff_jitter),
            (HttpMethod::Put, QueueType::Quorum, Jitter::None)
        );
        let e = parse(&["--queue-type", "stream"]).unwrap_err();
        let r = crate::contract::refusal(&e).expect("the contract's refusal");
        assert_eq!(r.field, "--queue-type (HOOKFLEET_QUEUE_TYPE)");
        assert_eq!(r.reason, "\"stream\" is not classic or quorum");
        let e = parse(&["--method", "get"]).unwrap_err();
        assert_eq!(
            crate::contract::refusal(&e).unwrap().reason,
            "\"GET\" is not POST, PUT or PATCH"
        );
    }

    #[test]
    fn refusals_name_the_flag_and_variable_clap_errors_stay_clap_s() {
        for (argv, field, reason) in [
            (
                &["--timeout", "ten"][..],
                "--timeout (HOOKFLEET_TIMEOUT)",
                "cannot parse \"ten\" as a duration (expected e.g. 10s, 250ms, 1m30s)",
            ),
            (
                &["--circuit-breaker-cooldown", "1ms"],
                "--circuit-breaker-cooldown (HOOKFLEET_CIRCUIT_BREAKER_COOLDOWN)",
                "1ms is outside [100ms, 3600s]",
            ),
            (
                &["--max-attempts", "0"],
                "--max-attempts (HOOKFLEET_MAX_ATTEMPTS)",
                "0 is outside [1, 100]",
            ),
            (
                &["--prefetch", "0"],
                "--prefetch (HOOKFLEET_PREFETCH)",
                "must be at least 1",
            ),
            (
                &["--fd-limit", "10"],
                "--fd-limit (HOOKFLEET_FD_LIMIT)",
                "10 is below 64",
            ),
            (
                &["--metrics-addr", "nowhere"],
                "--metrics-addr (HOOKFLEET_METRICS_ADDR)",
                "\"nowhere\" is not HOST:PORT",
            ),
        ] {
            let e = parse(argv).unwrap_err();
            let r = crate::contract::refusal(&e).unwrap_or_else(|| panic!("{argv:?}: {e}"));
            assert_eq!((r.field.as_str(), r.reason.as_str()), (field, reason));
        }
        let e = parse(&["--prefetch", "many"]).unwrap_err();
        assert!(crate::contract::refusal(&e).is_none());
        assert!(e.to_string().contains("invalid digit found in string"), "{e}");
    }

    #[test]
    fn argv_reads_back() {
        let a = parse(&[
            "--queue",
            "q",
            "--binding",
            "ex=k",
            "--header",
            "A: b",
            "--body-template",
            "-{{ x }}",
            "--timeout",
            "1500500us",
            "--rate-limit",
            "5",
            "--adaptive-throttle",
            "--adaptive-throttle-window",
            "2s",
            "--confirm-timeout",
            "2s",
            "--allow-private-networks",
            "--amqp-uri-file",
            "/uri",
            "--max-message-bytes",
            "2048",
            "--in-flight-bytes",
            "2000000",
        ])
        .unwrap();
        let argv = a.to_argv();
        let back = WorkerArgs::try_parse_from(std::iter::once("w".to_owned()).chain(argv)).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn a_nats_source_reads_back_and_a_rabbitmq_one_renders_no_nats_flag() {
        let a = parse(&[
            "--queue",
            "hooks",
            "--nats-url-file",
            "/nats",
            "--nats-stream",
            "EVENTS",
            "--nats-subject",
            "orders.>",
            "--nats-subject",
            "invoices.*",
            "--nats-creds-file",
            "/creds",
            "--nats-ack-wait",
            "45s",
        ])
        .unwrap();
        let argv = a.to_argv();
        let back = WorkerArgs::try_parse_from(std::iter::once("w".to_owned()).chain(argv)).unwrap();
        assert_eq!(back, a);
        let amqp = parse(&["--queue", "q", "--amqp-uri-file", "/uri"])
            .unwrap()
            .to_argv();
        assert!(!amqp.iter().any(|f| f.starts_with("--nats")), "{amqp:?}");
    }

    #[test]
    fn a_nats_source_is_checked() {
        let ok = |extra: &[&str]| {
            let mut argv = vec![
                "--queue",
                "hooks",
                "--nats-url",
                "nats://h:4222",
                "--nats-stream",
                "EVENTS",
            ];
            argv.extend_from_slice(extra);
            argv.extend_from_slice(&["--destination-url", "https://x.example.com/h"]);
            parse(&argv).unwrap().check()
        };
        let c = ok(&["--nats-subject", "orders.>"]).unwrap();
        let n = c.nats.expect("a NATS source");
        assert_eq!(
            (n.stream.as_str(), n.subjects.as_slice()),
            ("EVENTS", &["orders.>".to_owned()][..])
        );
        assert_eq!(c.dead_letter_queue, "hookfleet.dead.hooks");
        assert_eq!(
            ok(&["--dead-letter-queue", "dead.hooks"])
                .unwrap()
                .dead_letter_queue,
            "dead.hooks"
        );
        let refused = |extra: &[&str]| -> String {
            let e = ok(extra).unwrap_err();
            format!("{}: {}", e[0].field, e[0].reason)
        };
        for (extra, want) in [
            (&["--amqp-uri", "amqp://h/"][..], "not both"),
            (&["--binding", "ex=k"][..], "no bindings"),
            (
                &["--nats-subject", "orders.>.x"][..],
                "'>' only as the whole last one",
            ),
            (&["--nats-subject", "orders..x"][..], "empty token"),
            (&["--dead-letter-queue", "dead.*"][..], "may not hold wildcards"),
        ] {
            let got = refused(extra);
            assert!(got.contains(want), "{extra:?}: {got}");
        }
        let e = parse(&[
            "--queue",
            "a.b",
            "--nats-url",
            "nats://h",
            "--nats-stream",
            "S",
            "--destination-url",
            "https://x.example.com/h",
        ])
        .unwrap()
        .check()
        .unwrap_err();
        assert!(e[0].reason.contains("JetStream's names"), "{e:?}");
        let e = parse(&[
            "--queue",
            "q",
            "--nats-url",
            "nats://h",
            "--destination-url",
            "https://x.example.com/h",
        ])
        .unwrap()
        .check()
        .unwrap_err();
        assert!(
            e.iter()
                .any(|i| i.field.contains("nats-stream") && i.reason.contains("missing")),
            "{e:?}"
        );
        // Webhooks on a NATS source: their retries are scheduled on JetStream, no RabbitMQ queue.
        let hooks = parse(&[
            "--queue",
            "q",
            "--nats-url",
            "nats://h",
            "--nats-stream",
            "S",
            "--webhooks-secret",
            "w",
        ])
        .unwrap();
        hooks.check().expect("webhooks on a NATS source");
        assert!(hooks.declared_queues().is_empty());
        let nats = parse(&["--queue", "q", "--nats-url", "nats://h", "--nats-stream", "S"]).unwrap();
        assert!(
            nats.declared_queues().is_empty(),
            "a NATS source declares no RabbitMQ queue"
        );
    }
}
