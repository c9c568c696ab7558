//! The worker's configuration: flags with environment fallbacks (the operator renders them into the pod
//! spec; the contract is in `docs/worker.md`), validated into a [`Config`].
//!
//! Every mistake becomes one [`ConfigError`] line naming the flag and its variable, so that the line in
//! the pod's termination message is enough to fix the Integration.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hookfleet_crds::contract;
use hookfleet_crds::integration::{DeliverySpec, HttpMethod, Jitter, QueueType, default_delivery_limit};
use reqwest::Url;
use reqwest::header::{HeaderName, HeaderValue};

use crate::backoff::Backoff;
use crate::ssrf;
use crate::template::BodyTemplate;

/// Flags; each has an environment variable of the same meaning (flag wins).
#[derive(Parser, Debug)]
#[command(
    name = "hookfleet-worker",
    version,
    about = "Consumes one RabbitMQ queue and delivers each message as an HTTP webhook, at least once."
)]
pub struct Args {
    /// NAMESPACE/NAME of the Integration, for logs and metric labels.
    #[arg(long = contract::flag::INTEGRATION, env = contract::env::INTEGRATION, default_value = "")]
    pub integration: String,
    /// Broker URI (amqp:// or amqps://). Prefer --amqp-uri-file or the variable: flags show in `ps`.
    #[arg(long = contract::flag::AMQP_URI, env = contract::env::AMQP_URI, hide_env_values = true)]
    pub amqp_uri: Option<String>,
    /// File holding the broker URI (a mounted Secret key).
    #[arg(long = contract::flag::AMQP_URI_FILE, env = contract::env::AMQP_URI_FILE)]
    pub amqp_uri_file: Option<PathBuf>,
    /// Durable queue to consume (declared with its retry and dead-letter queues).
    #[arg(long = contract::flag::QUEUE, env = contract::env::QUEUE)]
    pub queue: Option<String>,
    /// EXCHANGE=ROUTING_KEY binding of the queue; repeatable (variable: comma-separated).
    #[arg(long = contract::flag::BINDING, env = contract::env::BINDINGS, value_delimiter = ',')]
    pub bindings: Vec<String>,
    /// Unacknowledged messages the broker hands this worker at a time (basic.qos).
    #[arg(long = contract::flag::PREFETCH, env = contract::env::PREFETCH, default_value_t = 64)]
    pub prefetch: u16,
    /// classic or quorum: type of the work, delay and dead-letter queues. Default quorum.
    #[arg(long = contract::flag::QUEUE_TYPE, env = contract::env::QUEUE_TYPE)]
    pub queue_type: Option<String>,
    /// Quorum queues: deliveries of one message before the broker dead-letters it. Default 20.
    #[arg(long = contract::flag::DELIVERY_LIMIT, env = contract::env::DELIVERY_LIMIT)]
    pub delivery_limit: Option<u32>,
    /// Webhook URL (http:// or https://).
    #[arg(long = contract::flag::DESTINATION_URL, env = contract::env::DESTINATION_URL)]
    pub destination_url: Option<String>,
    /// POST, PUT or PATCH.
    #[arg(long = contract::flag::METHOD, env = contract::env::METHOD, default_value = "POST")]
    pub method: String,
    /// "Name: value" request header; repeatable (variable: newline-separated).
    #[arg(long = contract::flag::HEADER, env = contract::env::HEADERS, value_delimiter = '\n')]
    pub headers: Vec<String>,
    /// NAME=ENV_VAR: header NAME gets the value of variable ENV_VAR (from a Secret; never logged).
    /// Repeatable (variable: comma-separated).
    #[arg(
        long = contract::flag::HEADER_FROM_ENV,
        env = contract::env::HEADERS_FROM_ENV,
        value_delimiter = ','
    )]
    pub header_from_env: Vec<String>,
    /// MiniJinja template of the request body, rendered with the message's JSON fields as variables;
    /// the body is forwarded unchanged when absent.
    /// (A value may start with `-`: the operator passes it as the next argument.)
    #[arg(long = contract::flag::BODY_TEMPLATE, env = contract::env::BODY_TEMPLATE, allow_hyphen_values = true)]
    pub body_template: Option<String>,
    /// Time for one request, connect to last byte (Go duration).
    #[arg(long = contract::flag::TIMEOUT, env = contract::env::TIMEOUT, default_value = "10s")]
    pub timeout: String,
    /// Attempts before a message is dead-lettered (the first delivery counts). Default 10.
    #[arg(long = contract::flag::MAX_ATTEMPTS, env = contract::env::MAX_ATTEMPTS)]
    pub max_attempts: Option<u32>,
    /// Delay before the second attempt (Go duration). Default 1s.
    #[arg(long = contract::flag::BACKOFF_INITIAL, env = contract::env::BACKOFF_INITIAL)]
    pub backoff_initial: Option<String>,
    /// Longest delay between attempts, also the cap on Retry-After (Go duration). Default 10m.
    #[arg(long = contract::flag::BACKOFF_MAX, env = contract::env::BACKOFF_MAX)]
    pub backoff_max: Option<String>,
    /// Growth of the delay per attempt. Default 2.
    #[arg(long = contract::flag::BACKOFF_MULTIPLIER, env = contract::env::BACKOFF_MULTIPLIER)]
    pub backoff_multiplier: Option<f64>,
    /// full, equal or none. Default full.
    #[arg(long = contract::flag::BACKOFF_JITTER, env = contract::env::BACKOFF_JITTER)]
    pub backoff_jitter: Option<String>,
    /// Deliveries in flight (and so HTTP connections in use) at most. Default 128.
    #[arg(long = contract::flag::CONCURRENCY, env = contract::env::CONCURRENCY)]
    pub concurrency: Option<u32>,
    /// Requests per second to the destination; unlimited when absent.
    #[arg(long = contract::flag::RATE_LIMIT, env = contract::env::RATE_LIMIT)]
    pub rate_limit: Option<u32>,
    /// Burst of the rate limit; defaults to --rate-limit.
    #[arg(long = contract::flag::RATE_LIMIT_BURST, env = contract::env::RATE_LIMIT_BURST)]
    pub rate_limit_burst: Option<u32>,
    /// Consecutive retryable failures that open the circuit breaker (0 disables it).
    #[arg(long = contract::flag::CIRCUIT_BREAKER_THRESHOLD, env = contract::env::CIRCUIT_BREAKER_THRESHOLD, default_value_t = 20)]
    pub circuit_breaker_threshold: u32,
    /// How long an open breaker defers deliveries before one probe is let through (Go duration).
    #[arg(long = contract::flag::CIRCUIT_BREAKER_COOLDOWN, env = contract::env::CIRCUIT_BREAKER_COOLDOWN, default_value = "10s")]
    pub circuit_breaker_cooldown: String,
    /// Longest wait for the broker's confirm of a retry or dead-letter copy (Go duration); past it the
    /// message is handed back and the session reconnects.
    #[arg(long = contract::flag::CONFIRM_TIMEOUT, env = contract::env::CONFIRM_TIMEOUT, default_value = "30s")]
    pub confirm_timeout: String,
    /// Dead-letter queue; defaults to <queue>.dead.
    #[arg(long = contract::flag::DEAD_LETTER_QUEUE, env = contract::env::DEAD_LETTER_QUEUE)]
    pub dead_letter_queue: Option<String>,
    /// Soft RLIMIT_NOFILE to raise to at start (capped at the hard limit).
    #[arg(long = contract::flag::FD_LIMIT, env = contract::env::FD_LIMIT, default_value_t = 1_048_576)]
    pub fd_limit: u64,
    /// Allow private, loopback and link-local destination addresses (refused by default: SSRF).
    #[arg(long = contract::flag::ALLOW_PRIVATE_NETWORKS, env = contract::env::ALLOW_PRIVATE_NETWORKS)]
    pub allow_private_networks: bool,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long = contract::flag::METRICS_ADDR, env = contract::env::METRICS_ADDR, default_value = contract::DEFAULT_METRICS_ADDR)]
    pub metrics_addr: String,
    /// Time in-flight deliveries get to finish after SIGTERM (Go duration).
    #[arg(long = contract::flag::SHUTDOWN_GRACE, env = contract::env::SHUTDOWN_GRACE, default_value = "25s")]
    pub shutdown_grace: String,
    /// Where a fatal error is written for Kubernetes (terminationMessagePath).
    #[arg(
        long = contract::flag::TERMINATION_LOG,
        env = contract::env::TERMINATION_LOG,
        default_value = contract::TERMINATION_LOG
    )]
    pub termination_log: PathBuf,
    /// json or text.
    #[arg(long = contract::flag::LOG_FORMAT, env = contract::env::LOG_FORMAT, default_value = "json")]
    pub log_format: String,
}

/// Variable holding the Standard Webhooks signing secret(s): `whsec_<base64>` or raw bytes; several,
/// space-separated, sign with each (key rotation).
pub const SIGNING_SECRET_ENV: &str = contract::env::SIGNING_SECRET;

/// A setting that cannot be used, named by its flag and variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {setting}: {message}")]
pub struct ConfigError {
    pub setting: String,
    pub message: String,
}

fn bad(setting: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting: setting.to_owned(),
        message: message.into(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// A validated configuration.
#[derive(Clone)]
pub struct Config {
    pub integration: String,
    /// Carries credentials: never logged (see the `Debug` impl).
    pub amqp_uri: String,
    pub queue: String,
    pub bindings: Vec<(String, String)>,
    pub prefetch: u16,
    pub queue_type: QueueType,
    /// `x-delivery-limit` of a quorum work queue.
    pub delivery_limit: u32,
    pub destination: Url,
    pub method: HttpMethod,
    /// Plain headers and headers from Secrets (the latter marked sensitive).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub signing_secrets: Vec<Vec<u8>>,
    /// Compiled `--body-template`; `None` forwards the body unchanged.
    pub body_template: Option<Arc<BodyTemplate>>,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub concurrency: usize,
    /// (per second, burst).
    pub rate_limit: Option<(u32, u32)>,
    /// (consecutive failures, cooldown); a threshold of 0 disables the breaker.
    pub circuit_breaker: (u32, Duration),
    pub dead_letter_queue: String,
    pub confirm_timeout: Duration,
    pub fd_limit: u64,
    pub allow_private_networks: bool,
    pub metrics_addr: SocketAddr,
    pub shutdown_grace: Duration,
    pub termination_log: PathBuf,
    pub log_format: LogFormat,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("integration", &self.integration)
            .field("amqp_uri", &redact_uri(&self.amqp_uri))
            .field("queue", &self.queue)
            .field("bindings", &self.bindings)
            .field("prefetch", &self.prefetch)
            .field("queue_type", &self.queue_type)
            .field("delivery_limit", &self.delivery_limit)
            .field("destination", &self.destination.as_str())
            .field("method", &self.method)
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            )
            .field("signing_secrets", &self.signing_secrets.len())
            .field("body_template", &self.body_template.is_some())
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("concurrency", &self.concurrency)
            .field("rate_limit", &self.rate_limit)
            .field("circuit_breaker", &self.circuit_breaker)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("fd_limit", &self.fd_limit)
            .field("allow_private_networks", &self.allow_private_networks)
            .field("metrics_addr", &self.metrics_addr)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish_non_exhaustive()
    }
}

/// `amqp://user:***@host:port/vhost`: the URI without its password, for logs.
pub fn redact_uri(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => {
            let userinfo = &uri[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &uri[..s + 3], &uri[at..])
        }
        _ => uri.to_owned(),
    }
}

/// A Go-style duration (`10s`, `1m30s`, `250ms`), as the CRD writes them.
pub fn parse_duration(setting: &str, s: &str) -> Result<Duration, ConfigError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(bad(setting, "empty duration (expected e.g. 10s, 250ms, 1m30s)"));
    }
    let d = kube::core::Duration::from_str(t).map_err(|_| {
        bad(
            setting,
            format!("cannot parse {s:?} as a duration (expected e.g. 10s, 250ms, 1m30s)"),
        )
    })?;
    if d.is_negative() {
        return Err(bad(setting, format!("{s:?} is negative")));
    }
    Ok(d.into())
}

fn check_range(setting: &str, d: Duration, min: Duration, max: Duration) -> Result<Duration, ConfigError> {
    if d < min || d > max {
        return Err(bad(setting, format!("{d:?} is outside [{min:?}, {max:?}]")));
    }
    Ok(d)
}

impl Config {
    /// Validates `args`; `env` looks up variables (the signing secret, --header-from-env targets).
    pub fn from_args(args: Args, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let defaults = DeliverySpec::default();

        let amqp_uri = match (args.amqp_uri, args.amqp_uri_file) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    &format!(
                        "--{}/--{}",
                        contract::flag::AMQP_URI,
                        contract::flag::AMQP_URI_FILE
                    ),
                    format!(
                        "set one of {} and {}, not both",
                        contract::env::AMQP_URI,
                        contract::env::AMQP_URI_FILE
                    ),
                ));
            }
            (Some(uri), None) => uri,
            (None, Some(path)) => std::fs::read_to_string(&path)
                .map_err(|e| {
                    bad(
                        &contract::setting(contract::flag::AMQP_URI_FILE, contract::env::AMQP_URI_FILE),
                        format!("{}: {e}", path.display()),
                    )
                })?
                .trim()
                .to_owned(),
            (None, None) => {
                return Err(bad(
                    &contract::setting(contract::flag::AMQP_URI, contract::env::AMQP_URI),
                    format!(
                        "missing: set {} or {}",
                        contract::env::AMQP_URI,
                        contract::env::AMQP_URI_FILE
                    ),
                ));
            }
        };
        validate_amqp_uri(&amqp_uri)?;

        let queue = match args.queue.map(|q| q.trim().to_owned()) {
            Some(q) if !q.is_empty() => q,
            _ => {
                return Err(bad(
                    &contract::setting(contract::flag::QUEUE, contract::env::QUEUE),
                    "missing: name the queue to consume",
                ));
            }
        };
        if queue.len() > 200 {
            // Retry queues are named `<queue>.retry.<ms>ms` and must stay under AMQP's 255 bytes.
            return Err(bad(
                &contract::setting(contract::flag::QUEUE, contract::env::QUEUE),
                "longer than 200 bytes",
            ));
        }

        let mut bindings = Vec::new();
        for b in args.bindings.iter().map(|b| b.trim()).filter(|b| !b.is_empty()) {
            match b.split_once('=') {
                Some((ex, key)) if !ex.trim().is_empty() => {
                    bindings.push((ex.trim().to_owned(), key.trim().to_owned()))
                }
                _ => {
                    return Err(bad(
                        &contract::setting(contract::flag::BINDING, contract::env::BINDINGS),
                        format!("{b:?} is not EXCHANGE=ROUTING_KEY"),
                    ));
                }
            }
        }

        if args.prefetch == 0 {
            return Err(bad(
                &contract::setting(contract::flag::PREFETCH, contract::env::PREFETCH),
                "must be at least 1",
            ));
        }

        let url_setting = &contract::setting(contract::flag::DESTINATION_URL, contract::env::DESTINATION_URL);
        let destination = match args.destination_url {
            Some(u) if !u.trim().is_empty() => {
                Url::parse(u.trim()).map_err(|e| bad(url_setting, format!("{u:?}: {e}")))?
            }
            _ => return Err(bad(url_setting, "missing: set the webhook URL")),
        };
        if !matches!(destination.scheme(), "http" | "https") || destination.host_str().is_none() {
            return Err(bad(
                url_setting,
                "must be an absolute http:// or https:// URL with a host",
            ));
        }
        if !args.allow_private_networks
            && let Some(ip) = url_ip(&destination)
            && let Some(kind) = ssrf::forbidden(ip)
        {
            return Err(bad(
                url_setting,
                format!(
                    "{ip} is a {kind} address; pass --{} to allow it",
                    contract::flag::ALLOW_PRIVATE_NETWORKS
                ),
            ));
        }

        let method = match args.method.trim().to_ascii_uppercase().as_str() {
            "POST" => HttpMethod::Post,
            "PUT" => HttpMethod::Put,
            "PATCH" => HttpMethod::Patch,
            other => {
                return Err(bad(
                    &contract::setting(contract::flag::METHOD, contract::env::METHOD),
                    format!("{other:?} is not POST, PUT or PATCH"),
                ));
            }
        };

        let mut headers = Vec::new();
        for h in args.headers.iter().map(|h| h.trim()).filter(|h| !h.is_empty()) {
            let setting = &contract::setting(contract::flag::HEADER, contract::env::HEADERS);
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| bad(setting, format!("{h:?} is not \"Name: value\"")))?;
            let name = header_name(setting, name)?;
            let value = HeaderValue::from_str(value.trim())
                .map_err(|_| bad(setting, format!("value of {name} is not a valid header value")))?;
            headers.push((name, value));
        }
        for h in args
            .header_from_env
            .iter()
            .map(|h| h.trim())
            .filter(|h| !h.is_empty())
        {
            let setting =
                &contract::setting(contract::flag::HEADER_FROM_ENV, contract::env::HEADERS_FROM_ENV);
            let (name, var) = h
                .split_once('=')
                .ok_or_else(|| bad(setting, format!("{h:?} is not NAME=ENV_VAR")))?;
            let name = header_name(setting, name)?;
            let raw = env(var.trim()).ok_or_else(|| {
                bad(
                    setting,
                    format!("variable {} for header {name} is not set", var.trim()),
                )
            })?;
            // The value is a secret: the message names the header, never the value.
            let mut value = HeaderValue::from_str(raw.trim())
                .map_err(|_| bad(setting, format!("value of {name} is not a valid header value")))?;
            value.set_sensitive(true);
            headers.push((name, value));
        }

        let signing_secrets = match env(SIGNING_SECRET_ENV) {
            Some(s) if !s.trim().is_empty() => {
                crate::signing::parse_secrets(&s).map_err(|e| bad(SIGNING_SECRET_ENV, e))?
            }
            _ => Vec::new(),
        };

        let body_template = match args.body_template.as_deref() {
            Some(t) if !t.trim().is_empty() => Some(Arc::new(BodyTemplate::compile(t).map_err(|e| {
                bad(
                    &contract::setting(contract::flag::BODY_TEMPLATE, contract::env::BODY_TEMPLATE),
                    e,
                )
            })?)),
            _ => None,
        };

        let timeout = check_range(
            &contract::setting(contract::flag::TIMEOUT, contract::env::TIMEOUT),
            parse_duration(
                &contract::setting(contract::flag::TIMEOUT, contract::env::TIMEOUT),
                &args.timeout,
            )?,
            Duration::from_millis(100),
            Duration::from_secs(600),
        )?;

        let max_attempts = args.max_attempts.unwrap_or(defaults.max_attempts);
        if !(1..=100).contains(&max_attempts) {
            return Err(bad(
                &contract::setting(contract::flag::MAX_ATTEMPTS, contract::env::MAX_ATTEMPTS),
                format!("{max_attempts} is outside [1, 100]"),
            ));
        }
        let day = Duration::from_secs(86_400);
        let tenth = Duration::from_millis(100);
        let initial = match &args.backoff_initial {
            Some(s) => parse_duration(
                &contract::setting(contract::flag::BACKOFF_INITIAL, contract::env::BACKOFF_INITIAL),
                s,
            )?,
            None => defaults.backoff.initial.into(),
        };
        let initial = check_range(
            &contract::setting(contract::flag::BACKOFF_INITIAL, contract::env::BACKOFF_INITIAL),
            initial,
            tenth,
            day,
        )?;
        let max = match &args.backoff_max {
            Some(s) => parse_duration(
                &contract::setting(contract::flag::BACKOFF_MAX, contract::env::BACKOFF_MAX),
                s,
            )?,
            None => defaults.backoff.max.into(),
        };
        let max = check_range(
            &contract::setting(contract::flag::BACKOFF_MAX, contract::env::BACKOFF_MAX),
            max,
            tenth,
            day,
        )?;
        if initial > max {
            return Err(bad(
                &contract::setting(contract::flag::BACKOFF_INITIAL, contract::env::BACKOFF_INITIAL),
                format!("{initial:?} exceeds --{} {max:?}", contract::flag::BACKOFF_MAX),
            ));
        }
        let multiplier = args.backoff_multiplier.unwrap_or(defaults.backoff.multiplier);
        if !(1.0..=10.0).contains(&multiplier) {
            return Err(bad(
                &contract::setting(
                    contract::flag::BACKOFF_MULTIPLIER,
                    contract::env::BACKOFF_MULTIPLIER,
                ),
                format!("{multiplier} is outside [1, 10]"),
            ));
        }
        let jitter = match args.backoff_jitter.as_deref().map(str::trim) {
            None => defaults.backoff.jitter,
            Some("full") => Jitter::Full,
            Some("equal") => Jitter::Equal,
            Some("none") => Jitter::None,
            Some(other) => {
                return Err(bad(
                    &contract::setting(contract::flag::BACKOFF_JITTER, contract::env::BACKOFF_JITTER),
                    format!("{other:?} is not full, equal or none"),
                ));
            }
        };

        let concurrency = args.concurrency.unwrap_or(defaults.concurrency);
        if !(1..=10_000).contains(&concurrency) {
            return Err(bad(
                &contract::setting(contract::flag::CONCURRENCY, contract::env::CONCURRENCY),
                format!("{concurrency} is outside [1, 10000]"),
            ));
        }

        let rate_limit = match (args.rate_limit, args.rate_limit_burst) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(bad(
                    &contract::setting(contract::flag::RATE_LIMIT_BURST, contract::env::RATE_LIMIT_BURST),
                    format!("needs --{}", contract::flag::RATE_LIMIT),
                ));
            }
            (Some(0), _) => {
                return Err(bad(
                    &contract::setting(contract::flag::RATE_LIMIT, contract::env::RATE_LIMIT),
                    "must be at least 1",
                ));
            }
            (Some(_), Some(0)) => {
                return Err(bad(
                    &contract::setting(contract::flag::RATE_LIMIT_BURST, contract::env::RATE_LIMIT_BURST),
                    "must be at least 1",
                ));
            }
            (Some(r), b) => Some((r, b.unwrap_or(r))),
        };

        let cooldown_setting = &contract::setting(
            contract::flag::CIRCUIT_BREAKER_COOLDOWN,
            contract::env::CIRCUIT_BREAKER_COOLDOWN,
        );
        let cooldown = check_range(
            cooldown_setting,
            parse_duration(cooldown_setting, &args.circuit_breaker_cooldown)?,
            tenth,
            Duration::from_secs(3600),
        )?;
        let circuit_breaker = (args.circuit_breaker_threshold, cooldown);

        let queue_type = match args.queue_type.as_deref().map(str::trim) {
            None | Some("") => QueueType::default(),
            Some("classic") => QueueType::Classic,
            Some("quorum") => QueueType::Quorum,
            Some(other) => {
                return Err(bad(
                    &contract::setting(contract::flag::QUEUE_TYPE, contract::env::QUEUE_TYPE),
                    format!("{other:?} is not classic or quorum"),
                ));
            }
        };
        let delivery_limit = args.delivery_limit.unwrap_or_else(default_delivery_limit);
        if !(1..=1000).contains(&delivery_limit) {
            return Err(bad(
                &contract::setting(contract::flag::DELIVERY_LIMIT, contract::env::DELIVERY_LIMIT),
                format!("{delivery_limit} is outside [1, 1000]"),
            ));
        }

        let dead_letter_queue = match args.dead_letter_queue.map(|q| q.trim().to_owned()) {
            Some(q) if !q.is_empty() => q,
            _ => format!("{queue}.dead"),
        };
        if dead_letter_queue == queue {
            return Err(bad(
                &contract::setting(
                    contract::flag::DEAD_LETTER_QUEUE,
                    contract::env::DEAD_LETTER_QUEUE,
                ),
                format!("must differ from --{}", contract::flag::QUEUE),
            ));
        }

        let confirm_setting =
            &contract::setting(contract::flag::CONFIRM_TIMEOUT, contract::env::CONFIRM_TIMEOUT);
        let confirm_timeout = check_range(
            confirm_setting,
            parse_duration(confirm_setting, &args.confirm_timeout)?,
            tenth,
            Duration::from_secs(600),
        )?;

        if args.fd_limit < 64 {
            return Err(bad(
                &contract::setting(contract::flag::FD_LIMIT, contract::env::FD_LIMIT),
                format!("{} is below 64", args.fd_limit),
            ));
        }

        let metrics_addr = args.metrics_addr.trim().parse().map_err(|_| {
            bad(
                &contract::setting(contract::flag::METRICS_ADDR, contract::env::METRICS_ADDR),
                format!("{:?} is not HOST:PORT", args.metrics_addr),
            )
        })?;

        let shutdown_grace = parse_duration(
            &contract::setting(contract::flag::SHUTDOWN_GRACE, contract::env::SHUTDOWN_GRACE),
            &args.shutdown_grace,
        )?;

        let log_format = match args.log_format.trim() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            other => {
                return Err(bad(
                    &contract::setting(contract::flag::LOG_FORMAT, contract::env::LOG_FORMAT),
                    format!("{other:?} is not json or text"),
                ));
            }
        };

        Ok(Self {
            integration: args.integration,
            amqp_uri,
            queue,
            bindings,
            prefetch: args.prefetch,
            queue_type,
            delivery_limit,
            destination,
            method,
            headers,
            signing_secrets,
            body_template,
            timeout,
            max_attempts,
            backoff: Backoff {
                initial,
                max,
                multiplier,
                jitter,
            },
            concurrency: concurrency as usize,
            rate_limit,
            circuit_breaker,
            dead_letter_queue,
            confirm_timeout,
            fd_limit: args.fd_limit,
            allow_private_networks: args.allow_private_networks,
            metrics_addr,
            shutdown_grace,
            termination_log: args.termination_log,
            log_format,
        })
    }
}

fn validate_amqp_uri(uri: &str) -> Result<(), ConfigError> {
    let setting = &contract::setting(contract::flag::AMQP_URI, contract::env::AMQP_URI);
    // Messages name the scheme and the parser's complaint, never the URI (it holds the password).
    if !(uri.starts_with("amqp://") || uri.starts_with("amqps://")) {
        return Err(bad(setting, "must start with amqp:// or amqps://"));
    }
    lapin::uri::AMQPUri::from_str(uri).map_err(|e| bad(setting, format!("not a valid AMQP URI: {e}")))?;
    Ok(())
}

fn header_name(setting: &str, name: &str) -> Result<HeaderName, ConfigError> {
    let name = HeaderName::from_str(name.trim())
        .map_err(|_| bad(setting, format!("{name:?} is not a header name")))?;
    if matches!(
        name.as_str(),
        "webhook-id" | "webhook-timestamp" | "webhook-signature" | "content-length" | "host"
    ) {
        return Err(bad(
            setting,
            format!("{name} is set by the worker and cannot be overridden"),
        ));
    }
    Ok(name)
}

fn url_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        parse_env(extra, &|_| None)
    }

    fn parse_env(extra: &[&str], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut argv = vec![
            "hookfleet-worker",
            "--amqp-uri",
            "amqp://u:p@127.0.0.1:5672/%2f",
            "--queue",
            "orders",
            "--destination-url",
            "https://erp.example.com/hook",
        ];
        argv.extend_from_slice(extra);
        Config::from_args(Args::try_parse_from(argv).expect("flags parse"), env)
    }

    #[test]
    fn defaults_come_from_the_crd_types() {
        let c = parse(&[]).unwrap();
        let d = DeliverySpec::default();
        assert_eq!(c.max_attempts, d.max_attempts);
        assert_eq!(c.concurrency, d.concurrency as usize);
        assert_eq!(c.backoff.initial, Duration::from_secs(1));
        assert_eq!(c.backoff.max, Duration::from_secs(600));
        assert_eq!(c.backoff.jitter, Jitter::Full);
        assert_eq!(c.timeout, Duration::from_secs(10));
        assert_eq!(c.dead_letter_queue, "orders.dead");
        assert_eq!(c.prefetch, 64);
        assert_eq!(c.fd_limit, 1_048_576);
        assert_eq!(c.shutdown_grace, Duration::from_secs(25));
        assert_eq!(c.method, HttpMethod::Post);
        assert_eq!(c.queue_type, QueueType::Quorum);
        assert_eq!(c.delivery_limit, 20);
    }

    #[test]
    fn queue_type_and_delivery_limit() {
        let c = parse(&["--queue-type", "classic", "--delivery-limit", "3"]).unwrap();
        assert_eq!((c.queue_type, c.delivery_limit), (QueueType::Classic, 3));
        let e = parse(&["--queue-type", "stream"]).unwrap_err();
        assert_eq!(e.setting, "--queue-type (HOOKFLEET_QUEUE_TYPE)");
        assert!(e.message.contains("\"stream\" is not classic or quorum"), "{e}");
        let e = parse(&["--delivery-limit", "0"]).unwrap_err();
        assert_eq!(e.setting, "--delivery-limit (HOOKFLEET_DELIVERY_LIMIT)");
    }

    #[test]
    fn flags_are_parsed() {
        let c = parse(&[
            "--binding",
            "events=orders.#",
            "--binding",
            "other=",
            "--header",
            "X-Source: hookfleet",
            "--timeout",
            "1m30s",
            "--backoff-initial",
            "250ms",
            "--backoff-jitter",
            "equal",
            "--rate-limit",
            "200",
            "--method",
            "put",
        ])
        .unwrap();
        assert_eq!(
            c.bindings,
            vec![
                ("events".into(), "orders.#".into()),
                ("other".into(), String::new())
            ]
        );
        assert_eq!(c.headers[0].0.as_str(), "x-source");
        assert_eq!(c.timeout, Duration::from_secs(90));
        assert_eq!(c.backoff.initial, Duration::from_millis(250));
        assert_eq!(c.backoff.jitter, Jitter::Equal);
        assert_eq!(c.rate_limit, Some((200, 200)));
        assert_eq!(c.method, HttpMethod::Put);
    }

    #[test]
    fn each_mistake_names_its_setting() {
        let cases: &[(&[&str], &str)] = &[
            (&["--timeout", "ten seconds"], "--timeout"),
            (&["--timeout", "10"], "--timeout"),
            (
                &["--backoff-initial", "2m", "--backoff-max", "1m"],
                "--backoff-initial",
            ),
            (&["--backoff-jitter", "some"], "--backoff-jitter"),
            (&["--max-attempts", "0"], "--max-attempts"),
            (&["--binding", "no-equals"], "--binding"),
            (&["--header", "NoColon"], "--header"),
            (&["--header", "webhook-id: x"], "--header"),
            (&["--method", "GET"], "--method"),
            (&["--rate-limit-burst", "5"], "--rate-limit-burst"),
            (&["--metrics-addr", "nowhere"], "--metrics-addr"),
            (&["--body-template", "{{ data | tojson }"], "--body-template"),
        ];
        for (extra, setting) in cases {
            let err = parse(extra).expect_err(&format!("{extra:?} should be refused"));
            assert!(err.setting.starts_with(setting), "{extra:?}: {err}");
            assert!(!err.to_string().contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn missing_queue_uri_and_url_are_refused() {
        let args = Args::try_parse_from(["w", "--destination-url", "https://x.example"]).unwrap();
        let err = Config::from_args(args, &|_| None).unwrap_err();
        assert!(err.setting.starts_with("--amqp-uri"), "{err}");
        let args = Args::try_parse_from([
            "w",
            "--amqp-uri",
            "amqp://h/",
            "--destination-url",
            "https://x.example",
        ])
        .unwrap();
        let err = Config::from_args(args, &|_| None).unwrap_err();
        assert!(err.setting.starts_with("--queue"), "{err}");
    }

    #[test]
    fn bad_uri_is_refused_without_echoing_it() {
        let args = Args::try_parse_from([
            "w",
            "--amqp-uri",
            "http://user:s3cret@host",
            "--queue",
            "q",
            "--destination-url",
            "https://x.example",
        ])
        .unwrap();
        let err = Config::from_args(args, &|_| None).unwrap_err();
        assert!(err.setting.starts_with("--amqp-uri"));
        assert!(!err.to_string().contains("s3cret"));
    }

    #[test]
    fn private_destination_needs_the_flag() {
        let argv = |allow: bool| {
            let mut v = vec![
                "w",
                "--amqp-uri",
                "amqp://127.0.0.1/",
                "--queue",
                "q",
                "--destination-url",
                "http://127.0.0.1:8080/hook",
            ];
            if allow {
                v.push("--allow-private-networks");
            }
            Args::try_parse_from(v).unwrap()
        };
        let err = Config::from_args(argv(false), &|_| None).unwrap_err();
        assert!(err.message.contains("loopback"), "{err}");
        assert!(Config::from_args(argv(true), &|_| None).is_ok());
    }

    #[test]
    fn header_from_env_is_sensitive_and_never_in_messages() {
        let env = |k: &str| (k == "ERP_TOKEN").then(|| "Bearer t0ken".to_owned());
        let c = parse_env(&["--header-from-env", "Authorization=ERP_TOKEN"], &env).unwrap();
        assert_eq!(c.headers[0].0.as_str(), "authorization");
        assert!(c.headers[0].1.is_sensitive());
        assert!(!format!("{c:?}").contains("t0ken"));
        let err = parse_env(&["--header-from-env", "Authorization=MISSING"], &env).unwrap_err();
        assert!(err.message.contains("MISSING"));
    }

    #[test]
    fn body_template_is_compiled_once_or_absent() {
        assert!(parse(&[]).unwrap().body_template.is_none());
        assert!(parse(&["--body-template", " "]).unwrap().body_template.is_none());
        let c = parse(&["--body-template", "{\"order\": {{ data | tojson }}}"]).unwrap();
        let t = c.body_template.expect("compiled");
        let extras = crate::template::Extras {
            routing_key: "rk",
            webhook_id: "id",
        };
        assert_eq!(t.render(br#"{"data": [1]}"#, extras).unwrap(), "{\"order\": [1]}");
        let c = parse(&["--body-template", "-{{ n }}"]).unwrap();
        assert_eq!(
            c.body_template.unwrap().render(br#"{"n": 1}"#, extras).unwrap(),
            "-1"
        );
        let err = parse(&["--body-template", "{% if %}"]).unwrap_err();
        assert!(err.to_string().contains("syntax error"), "{err}");
    }

    #[test]
    fn uri_is_redacted() {
        assert_eq!(
            redact_uri("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_uri("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
