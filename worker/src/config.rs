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
use hookfleet_crds::integration::{
    AdaptiveThrottleSpec, DeliverySpec, HttpMethod, Jitter, QueueType, RateLimitScope, default_delivery_limit,
};
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
    /// Broker URI (amqp:// or amqps://), or several (the nodes of a cluster), comma- or
    /// whitespace-separated. Prefer --amqp-uri-file or the variable: flags show in `ps`.
    #[arg(long = contract::flag::AMQP_URI, env = contract::env::AMQP_URI, hide_env_values = true)]
    pub amqp_uri: Option<String>,
    /// File holding the broker URI or URIs (a mounted Secret key).
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
    /// Variable holding more signing secrets (from a Secret; never logged): each signs every request
    /// too. Repeatable (variable: comma-separated).
    #[arg(
        long = contract::flag::SIGNING_SECRET_ENV,
        env = contract::env::SIGNING_SECRET_ENVS,
        value_delimiter = ','
    )]
    pub signing_secret_env: Vec<String>,
    /// OAuth2 client credentials: the token endpoint. The client id and secret are read from
    /// HOOKFLEET_OAUTH2_CLIENT_ID and HOOKFLEET_OAUTH2_CLIENT_SECRET.
    #[arg(long = contract::flag::OAUTH2_TOKEN_URL, env = contract::env::OAUTH2_TOKEN_URL)]
    pub oauth2_token_url: Option<String>,
    /// OAuth2 scope to request; repeatable (variable: comma-separated).
    #[arg(long = contract::flag::OAUTH2_SCOPE, env = contract::env::OAUTH2_SCOPES, value_delimiter = ',')]
    pub oauth2_scopes: Vec<String>,
    /// PEM file of CA certificates trusted for the destination besides the system roots.
    #[arg(long = contract::flag::TLS_CA_FILE, env = contract::env::TLS_CA_FILE)]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) presented when the destination asks for one (mTLS).
    #[arg(long = contract::flag::TLS_CLIENT_CERT_FILE, env = contract::env::TLS_CLIENT_CERT_FILE)]
    pub tls_client_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-client-cert-file.
    #[arg(long = contract::flag::TLS_CLIENT_KEY_FILE, env = contract::env::TLS_CLIENT_KEY_FILE)]
    pub tls_client_key_file: Option<PathBuf>,
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
    /// Requests per second to the destination (per worker, or per fleet with --rate-limit-scope
    /// fleet); unlimited when absent.
    #[arg(long = contract::flag::RATE_LIMIT, env = contract::env::RATE_LIMIT)]
    pub rate_limit: Option<u32>,
    /// Burst of the rate limit; defaults to --rate-limit.
    #[arg(long = contract::flag::RATE_LIMIT_BURST, env = contract::env::RATE_LIMIT_BURST)]
    pub rate_limit_burst: Option<u32>,
    /// worker (default: the limit is this worker's) or fleet (the limit is divided by the consumers
    /// attached to the work queue).
    #[arg(long = contract::flag::RATE_LIMIT_SCOPE, env = contract::env::RATE_LIMIT_SCOPE)]
    pub rate_limit_scope: Option<String>,
    /// Consecutive retryable failures that open the circuit breaker (0 disables it). Default 20.
    #[arg(long = contract::flag::CIRCUIT_BREAKER_THRESHOLD, env = contract::env::CIRCUIT_BREAKER_THRESHOLD)]
    pub circuit_breaker_threshold: Option<u32>,
    /// How long an open breaker defers deliveries before one probe is let through (Go duration).
    /// Default 10s.
    #[arg(long = contract::flag::CIRCUIT_BREAKER_COOLDOWN, env = contract::env::CIRCUIT_BREAKER_COOLDOWN)]
    pub circuit_breaker_cooldown: Option<String>,
    /// Halve the deliveries in flight while retryable failures outnumber successes (per window), and
    /// raise them again as the destination recovers.
    #[arg(long = contract::flag::ADAPTIVE_THROTTLE, env = contract::env::ADAPTIVE_THROTTLE)]
    pub adaptive_throttle: bool,
    /// Fewest deliveries in flight the throttle goes down to. Default 1.
    #[arg(long = contract::flag::ADAPTIVE_THROTTLE_MIN, env = contract::env::ADAPTIVE_THROTTLE_MIN)]
    pub adaptive_throttle_min: Option<u32>,
    /// How often the throttle compares failures and successes (Go duration). Default 10s.
    #[arg(long = contract::flag::ADAPTIVE_THROTTLE_WINDOW, env = contract::env::ADAPTIVE_THROTTLE_WINDOW)]
    pub adaptive_throttle_window: Option<String>,
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

/// Variables holding outgoing credentials (filled from Secrets by the kubelet; never logged).
pub const BASIC_AUTH_USERNAME_ENV: &str = contract::env::BASIC_AUTH_USERNAME;
pub const BASIC_AUTH_PASSWORD_ENV: &str = contract::env::BASIC_AUTH_PASSWORD;
pub const BEARER_TOKEN_ENV: &str = contract::env::BEARER_TOKEN;
pub const OAUTH2_CLIENT_ID_ENV: &str = contract::env::OAUTH2_CLIENT_ID;
pub const OAUTH2_CLIENT_SECRET_ENV: &str = contract::env::OAUTH2_CLIENT_SECRET;

/// TLS material for the destination, as PEM (checked when the configuration is read).
#[derive(Clone, Default)]
pub struct TlsFiles {
    /// CA certificates trusted besides the system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate chain and key, concatenated (what `reqwest::Identity::from_pem` reads).
    pub identity_pem: Option<Vec<u8>>,
}

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
    /// The broker's nodes, tried in turn (at least one). Carry credentials: never logged (see the
    /// `Debug` impl and [`redact_uri`]).
    pub amqp_uris: Vec<String>,
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
    /// OAuth2 client credentials (basic and bearer auth are plain sensitive `headers`).
    pub oauth2: Option<crate::auth::OAuth2Config>,
    pub tls: TlsFiles,
    /// Compiled `--body-template`; `None` forwards the body unchanged.
    pub body_template: Option<Arc<BodyTemplate>>,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub concurrency: usize,
    /// (per second, burst).
    pub rate_limit: Option<(u32, u32)>,
    /// What `rate_limit` applies to: this worker, or the fleet (divided among the consumers).
    pub rate_limit_scope: RateLimitScope,
    /// (consecutive failures, cooldown); a threshold of 0 disables the breaker.
    pub circuit_breaker: (u32, Duration),
    /// (minimum in flight, window) of the adaptive throttle; `None` when off.
    pub adaptive_throttle: Option<(u32, Duration)>,
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
            .field(
                "amqp_uris",
                &self.amqp_uris.iter().map(|u| redact_uri(u)).collect::<Vec<_>>(),
            )
            .field("queue", &self.queue)
            .field("bindings", &self.bindings)
            .field("prefetch", &self.prefetch)
            .field("queue_type", &self.queue_type)
            .field("delivery_limit", &self.delivery_limit)
            // Userinfo in the URL is a credential: never logged.
            .field(
                "destination",
                &hookfleet_crds::redact::userinfo(self.destination.as_str()),
            )
            .field("method", &self.method)
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            )
            .field("signing_secrets", &self.signing_secrets.len())
            .field("oauth2", &self.oauth2)
            .field("tls_ca", &self.tls.ca_pem.is_some())
            .field("tls_client_cert", &self.tls.identity_pem.is_some())
            .field("body_template", &self.body_template.is_some())
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("concurrency", &self.concurrency)
            .field("rate_limit", &self.rate_limit)
            .field("rate_limit_scope", &self.rate_limit_scope)
            .field("circuit_breaker", &self.circuit_breaker)
            .field("adaptive_throttle", &self.adaptive_throttle)
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

/// The one of `all` named `value` (`name` gives each its name); the error lists every name:
/// `"x" is not a, b or c`.
fn choice<T: Copy>(
    setting: &str,
    value: &str,
    all: &[T],
    name: fn(T) -> &'static str,
) -> Result<T, ConfigError> {
    if let Some(t) = all.iter().copied().find(|t| name(*t) == value) {
        return Ok(t);
    }
    let names: Vec<&str> = all.iter().map(|t| name(*t)).collect();
    let list = match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    };
    Err(bad(setting, format!("{value:?} is not {list}")))
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

        let (amqp_uri_setting, amqp_uri) = match (args.amqp_uri, args.amqp_uri_file) {
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
            (Some(uri), None) => (
                contract::setting(contract::flag::AMQP_URI, contract::env::AMQP_URI),
                uri,
            ),
            (None, Some(path)) => (
                contract::setting(contract::flag::AMQP_URI_FILE, contract::env::AMQP_URI_FILE),
                std::fs::read_to_string(&path).map_err(|e| {
                    bad(
                        &contract::setting(contract::flag::AMQP_URI_FILE, contract::env::AMQP_URI_FILE),
                        format!("{}: {e}", path.display()),
                    )
                })?,
            ),
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
        let amqp_uris = parse_amqp_uris(&amqp_uri_setting, &amqp_uri)?;

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
            // Delay queues are named `<queue>.delay.<ms>ms` and must stay under AMQP's 255 bytes.
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

        let method = choice(
            &contract::setting(contract::flag::METHOD, contract::env::METHOD),
            &args.method.trim().to_ascii_uppercase(),
            &HttpMethod::ALL,
            HttpMethod::as_str,
        )?;

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

        let mut signing_secrets = match env(SIGNING_SECRET_ENV) {
            Some(s) if !s.trim().is_empty() => {
                crate::signing::parse_secrets(&s).map_err(|e| bad(SIGNING_SECRET_ENV, e))?
            }
            _ => Vec::new(),
        };
        for var in args
            .signing_secret_env
            .iter()
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
        {
            let setting = &contract::setting(
                contract::flag::SIGNING_SECRET_ENV,
                contract::env::SIGNING_SECRET_ENVS,
            );
            let value = env(var)
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| bad(setting, format!("variable {var} is not set or empty")))?;
            signing_secrets.extend(
                crate::signing::parse_secrets(&value)
                    .map_err(|e| bad(setting, format!("variable {var}: {e}")))?,
            );
        }

        let (auth_header, oauth2) = auth_from(&args.oauth2_token_url, &args.oauth2_scopes, env)?;
        if let Some(value) = auth_header {
            headers.push((reqwest::header::AUTHORIZATION, value));
        }
        if headers
            .iter()
            .filter(|(n, _)| *n == reqwest::header::AUTHORIZATION)
            .count()
            + usize::from(oauth2.is_some())
            > 1
        {
            return Err(bad(
                "auth",
                "Authorization is set twice: by a header and by basic, bearer or OAuth2 auth; keep one",
            ));
        }
        let tls = tls_files(
            args.tls_ca_file.as_deref(),
            args.tls_client_cert_file.as_deref(),
            args.tls_client_key_file.as_deref(),
        )?;

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
            Some(v) => choice(
                &contract::setting(contract::flag::BACKOFF_JITTER, contract::env::BACKOFF_JITTER),
                v,
                &Jitter::ALL,
                Jitter::as_str,
            )?,
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

        let rate_limit_scope = match args.rate_limit_scope.as_deref().map(str::trim) {
            None | Some("") => RateLimitScope::default(),
            Some(v) => choice(
                &contract::setting(contract::flag::RATE_LIMIT_SCOPE, contract::env::RATE_LIMIT_SCOPE),
                v,
                &RateLimitScope::ALL,
                RateLimitScope::as_str,
            )?,
        };
        if rate_limit_scope == RateLimitScope::Fleet && rate_limit.is_none() {
            return Err(bad(
                &contract::setting(contract::flag::RATE_LIMIT_SCOPE, contract::env::RATE_LIMIT_SCOPE),
                "fleet needs --rate-limit",
            ));
        }

        let threshold_setting = &contract::setting(
            contract::flag::CIRCUIT_BREAKER_THRESHOLD,
            contract::env::CIRCUIT_BREAKER_THRESHOLD,
        );
        let threshold = args
            .circuit_breaker_threshold
            .unwrap_or(defaults.circuit_breaker.failure_threshold);
        if threshold > 10_000 {
            return Err(bad(
                threshold_setting,
                format!("{threshold} is outside [0, 10000]"),
            ));
        }
        let cooldown_setting = &contract::setting(
            contract::flag::CIRCUIT_BREAKER_COOLDOWN,
            contract::env::CIRCUIT_BREAKER_COOLDOWN,
        );
        let cooldown = match &args.circuit_breaker_cooldown {
            Some(s) => parse_duration(cooldown_setting, s)?,
            None => defaults.circuit_breaker.cooldown.into(),
        };
        let cooldown = check_range(cooldown_setting, cooldown, tenth, Duration::from_secs(3600))?;
        let circuit_breaker = (threshold, cooldown);

        let throttle_defaults = AdaptiveThrottleSpec::default();
        let min_setting = &contract::setting(
            contract::flag::ADAPTIVE_THROTTLE_MIN,
            contract::env::ADAPTIVE_THROTTLE_MIN,
        );
        let window_setting = &contract::setting(
            contract::flag::ADAPTIVE_THROTTLE_WINDOW,
            contract::env::ADAPTIVE_THROTTLE_WINDOW,
        );
        let adaptive_throttle = if args.adaptive_throttle {
            let min = args
                .adaptive_throttle_min
                .unwrap_or(throttle_defaults.min_concurrency);
            if min < 1 || min > concurrency {
                return Err(bad(
                    min_setting,
                    format!("{min} is outside [1, --concurrency {concurrency}]"),
                ));
            }
            let window = match &args.adaptive_throttle_window {
                Some(s) => parse_duration(window_setting, s)?,
                None => throttle_defaults.window.into(),
            };
            let window = check_range(
                window_setting,
                window,
                Duration::from_secs(1),
                Duration::from_secs(600),
            )?;
            Some((min, window))
        } else {
            if args.adaptive_throttle_min.is_some() {
                return Err(bad(min_setting, "needs --adaptive-throttle"));
            }
            if args.adaptive_throttle_window.is_some() {
                return Err(bad(window_setting, "needs --adaptive-throttle"));
            }
            None
        };

        let queue_type = match args.queue_type.as_deref().map(str::trim) {
            None | Some("") => QueueType::default(),
            Some(v) => choice(
                &contract::setting(contract::flag::QUEUE_TYPE, contract::env::QUEUE_TYPE),
                v,
                &QueueType::ALL,
                QueueType::as_str,
            )?,
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
        if dead_letter_queue == crate::worker::topology::retry_ready_queue(&queue) {
            return Err(bad(
                &contract::setting(
                    contract::flag::DEAD_LETTER_QUEUE,
                    contract::env::DEAD_LETTER_QUEUE,
                ),
                format!("{dead_letter_queue} is the retry-ready queue of --queue"),
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

        let log_format = choice(
            &contract::setting(contract::flag::LOG_FORMAT, contract::env::LOG_FORMAT),
            args.log_format.trim(),
            &[LogFormat::Json, LogFormat::Text],
            |f| match f {
                LogFormat::Json => "json",
                LogFormat::Text => "text",
            },
        )?;

        Ok(Self {
            integration: args.integration,
            amqp_uris,
            queue,
            bindings,
            prefetch: args.prefetch,
            queue_type,
            delivery_limit,
            destination,
            method,
            headers,
            signing_secrets,
            oauth2,
            tls,
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
            rate_limit_scope,
            circuit_breaker,
            adaptive_throttle,
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

/// Basic or bearer auth as an `Authorization` value, or OAuth2 client credentials: from the variables
/// the operator fills from Secrets. Messages name variables, never their values.
#[allow(clippy::type_complexity)]
fn auth_from(
    token_url: &Option<String>,
    scopes: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Option<HeaderValue>, Option<crate::auth::OAuth2Config>), ConfigError> {
    let var = |name: &str| env(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    let (user, pass, token) = (
        var(BASIC_AUTH_USERNAME_ENV),
        var(BASIC_AUTH_PASSWORD_ENV),
        var(BEARER_TOKEN_ENV),
    );
    let setting = "auth";
    let basic = match (user, pass) {
        (Some(u), Some(p)) => Some(crate::auth::basic(&u, &p).map_err(|e| bad(setting, e))?),
        (None, None) => None,
        _ => {
            return Err(bad(
                setting,
                format!("basic auth needs both {BASIC_AUTH_USERNAME_ENV} and {BASIC_AUTH_PASSWORD_ENV}"),
            ));
        }
    };
    let bearer = token
        .map(|t| crate::auth::bearer(&t).map_err(|e| bad(setting, format!("{BEARER_TOKEN_ENV}: {e}"))))
        .transpose()?;
    let oauth2 = match token_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
        None => None,
        Some(u) => {
            let url_setting =
                &contract::setting(contract::flag::OAUTH2_TOKEN_URL, contract::env::OAUTH2_TOKEN_URL);
            let token_url = Url::parse(u).map_err(|e| bad(url_setting, format!("{u:?}: {e}")))?;
            if !matches!(token_url.scheme(), "http" | "https") || token_url.host_str().is_none() {
                return Err(bad(
                    url_setting,
                    "must be an absolute http:// or https:// URL with a host",
                ));
            }
            let (Some(client_id), Some(client_secret)) =
                (var(OAUTH2_CLIENT_ID_ENV), var(OAUTH2_CLIENT_SECRET_ENV))
            else {
                return Err(bad(
                    url_setting,
                    format!("needs {OAUTH2_CLIENT_ID_ENV} and {OAUTH2_CLIENT_SECRET_ENV}"),
                ));
            };
            Some(crate::auth::OAuth2Config {
                token_url,
                client_id,
                client_secret,
                scopes: scopes
                    .iter()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect(),
            })
        }
    };
    let methods =
        usize::from(basic.is_some()) + usize::from(bearer.is_some()) + usize::from(oauth2.is_some());
    if methods > 1 {
        return Err(bad(setting, "set one of basic, bearer and OAuth2 auth"));
    }
    Ok((basic.or(bearer), oauth2))
}

/// Reads and checks the TLS files now, so a bad PEM is a start-up error naming its flag rather than a
/// failure on every delivery.
fn tls_files(
    ca: Option<&std::path::Path>,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> Result<TlsFiles, ConfigError> {
    let read = |setting: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| bad(setting, format!("{}: {e}", path.display())))
    };
    let ca_setting = &contract::setting(contract::flag::TLS_CA_FILE, contract::env::TLS_CA_FILE);
    let ca_pem = match ca {
        None => None,
        Some(p) => {
            let pem = read(ca_setting, p)?;
            match reqwest::Certificate::from_pem_bundle(&pem) {
                Ok(certs) if !certs.is_empty() => Some(pem),
                _ => {
                    return Err(bad(
                        ca_setting,
                        format!("{}: no PEM certificate in it", p.display()),
                    ));
                }
            }
        }
    };
    let cert_setting = &contract::setting(
        contract::flag::TLS_CLIENT_CERT_FILE,
        contract::env::TLS_CLIENT_CERT_FILE,
    );
    let key_setting = &contract::setting(
        contract::flag::TLS_CLIENT_KEY_FILE,
        contract::env::TLS_CLIENT_KEY_FILE,
    );
    let identity_pem = match (cert, key) {
        (None, None) => None,
        (Some(c), Some(k)) => {
            let mut pem = read(cert_setting, c)?;
            pem.push(b'\n');
            pem.extend(read(key_setting, k)?);
            // The key's bytes stay out of the message.
            reqwest::Identity::from_pem(&pem).map_err(|_| {
                bad(
                    cert_setting,
                    format!(
                        "{} and {} are not a PEM certificate and its private key",
                        c.display(),
                        k.display()
                    ),
                )
            })?;
            Some(pem)
        }
        _ => return Err(bad(cert_setting, "set both the client certificate and its key")),
    };
    Ok(TlsFiles { ca_pem, identity_pem })
}

/// The broker URIs of `value` (one, or several separated by commas or whitespace), each checked. A
/// message names the setting and the entry, never the URI (it holds the password).
fn parse_amqp_uris(setting: &str, value: &str) -> Result<Vec<String>, ConfigError> {
    let uris = hookfleet_crds::broker::split_uris(value);
    if uris.is_empty() {
        return Err(bad(setting, "empty: set an amqp:// or amqps:// URI"));
    }
    let n = uris.len();
    let entry = |i: usize| {
        if n == 1 {
            String::new()
        } else {
            format!("entry {} of {n}: ", i + 1)
        }
    };
    for (i, uri) in uris.iter().enumerate() {
        if !(uri.starts_with("amqp://") || uri.starts_with("amqps://")) {
            return Err(bad(
                setting,
                format!("{}must start with amqp:// or amqps://", entry(i)),
            ));
        }
        lapin::uri::AMQPUri::from_str(uri).map_err(|e| {
            // The parser may quote its input.
            let e = e.replace(uri, "<uri>");
            bad(setting, format!("{}not a valid AMQP URI: {e}", entry(i)))
        })?;
    }
    Ok(uris.into_iter().map(str::to_owned).collect())
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
        assert_eq!(c.circuit_breaker, (20, Duration::from_secs(10)));
        assert_eq!(c.adaptive_throttle, None);
        assert_eq!(c.rate_limit_scope, RateLimitScope::Worker);
    }

    #[test]
    fn breaker_throttle_and_fleet_rate_limit() {
        let c = parse(&[
            "--circuit-breaker-threshold",
            "5",
            "--circuit-breaker-cooldown",
            "30s",
            "--adaptive-throttle",
            "--adaptive-throttle-min",
            "4",
            "--adaptive-throttle-window",
            "5s",
            "--rate-limit",
            "100",
            "--rate-limit-scope",
            "fleet",
        ])
        .unwrap();
        assert_eq!(c.circuit_breaker, (5, Duration::from_secs(30)));
        assert_eq!(c.adaptive_throttle, Some((4, Duration::from_secs(5))));
        assert_eq!(c.rate_limit_scope, RateLimitScope::Fleet);
        let c = parse(&["--adaptive-throttle"]).unwrap();
        assert_eq!(c.adaptive_throttle, Some((1, Duration::from_secs(10))));
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
            (
                &["--circuit-breaker-cooldown", "1ms"],
                "--circuit-breaker-cooldown",
            ),
            (
                &["--circuit-breaker-threshold", "10001"],
                "--circuit-breaker-threshold",
            ),
            (&["--adaptive-throttle-min", "2"], "--adaptive-throttle-min"),
            (
                &[
                    "--adaptive-throttle",
                    "--adaptive-throttle-min",
                    "500",
                    "--concurrency",
                    "100",
                ],
                "--adaptive-throttle-min",
            ),
            (
                &["--adaptive-throttle", "--adaptive-throttle-window", "100ms"],
                "--adaptive-throttle-window",
            ),
            (&["--rate-limit-scope", "fleet"], "--rate-limit-scope"),
            (
                &["--rate-limit", "5", "--rate-limit-scope", "pod"],
                "--rate-limit-scope",
            ),
            (&["--dead-letter-queue", "orders.retries"], "--dead-letter-queue"),
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
        let args = Args::try_parse_from([
            "w",
            "--amqp-uri",
            "amqp://127.0.0.1/",
            "--queue",
            "q",
            "--destination-url",
            "https://u:pw-s3cret@erp.example.com/hook",
        ])
        .unwrap();
        let c = Config::from_args(args, &|_| None).unwrap();
        assert!(!format!("{c:?}").contains("pw-s3cret"), "{c:?}");
        let err = parse_env(&["--header-from-env", "Authorization=MISSING"], &env).unwrap_err();
        assert!(err.message.contains("MISSING"));
    }

    #[test]
    fn auth_from_variables_is_sensitive_and_exclusive() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let basic = vars(&[
            (BASIC_AUTH_USERNAME_ENV, "svc"),
            (BASIC_AUTH_PASSWORD_ENV, "pa55"),
        ]);
        let c = parse_env(&[], &basic).unwrap();
        let (name, value) = c.headers.last().unwrap();
        assert_eq!(name, reqwest::header::AUTHORIZATION);
        assert!(value.is_sensitive());
        assert_eq!(value.to_str().unwrap(), "Basic c3ZjOnBhNTU=");
        assert!(!format!("{c:?}").contains("c3ZjOnBhNTU"));

        let half = vars(&[(BASIC_AUTH_USERNAME_ENV, "svc")]);
        assert!(parse_env(&[], &half).unwrap_err().message.contains("needs both"));

        let bearer = vars(&[(BEARER_TOKEN_ENV, "t0ken")]);
        let c = parse_env(&[], &bearer).unwrap();
        assert_eq!(c.headers.last().unwrap().1.to_str().unwrap(), "Bearer t0ken");
        let twice = parse_env(&["--header", "Authorization: x"], &bearer).unwrap_err();
        assert!(twice.message.contains("Authorization is set twice"), "{twice}");

        let oauth = vars(&[(OAUTH2_CLIENT_ID_ENV, "id"), (OAUTH2_CLIENT_SECRET_ENV, "sec")]);
        let url = [
            "--oauth2-token-url",
            "https://login.example/token",
            "--oauth2-scope",
            "a",
        ];
        let c = parse_env(&url, &oauth).unwrap();
        let o = c.oauth2.as_ref().unwrap();
        assert_eq!(
            (o.client_id.as_str(), o.scopes.clone()),
            ("id", vec!["a".to_owned()])
        );
        let shown = format!("{c:?}");
        assert!(
            shown.contains("login.example") && !shown.contains("sec\""),
            "{shown}"
        );
        let e = parse_env(&url, &|_| None).unwrap_err();
        assert!(e.message.contains(OAUTH2_CLIENT_ID_ENV), "{e}");
        let both = vars(&[
            (OAUTH2_CLIENT_ID_ENV, "id"),
            (OAUTH2_CLIENT_SECRET_ENV, "sec"),
            (BEARER_TOKEN_ENV, "t"),
        ]);
        assert!(parse_env(&url, &both).is_err());
    }

    #[test]
    fn extra_signing_secrets_add_up() {
        let env = |k: &str| match k {
            SIGNING_SECRET_ENV => Some("one".to_owned()),
            "NEXT" => Some("whsec_dHdv three".to_owned()),
            _ => None,
        };
        let c = parse_env(&["--signing-secret-env", "NEXT"], &env).unwrap();
        assert_eq!(
            c.signing_secrets,
            [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        let e = parse_env(&["--signing-secret-env", "MISSING"], &env).unwrap_err();
        assert!(e.message.contains("MISSING"), "{e}");
    }

    #[test]
    fn tls_files_are_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let junk = junk.display().to_string();
        let e = parse(&["--tls-ca-file", &junk]).unwrap_err();
        assert!(e.setting.starts_with("--tls-ca-file"), "{e}");
        let e = parse(&["--tls-client-cert-file", &junk]).unwrap_err();
        assert!(e.message.contains("both"), "{e}");
        let e = parse(&["--tls-client-cert-file", &junk, "--tls-client-key-file", &junk]).unwrap_err();
        assert!(e.setting.starts_with("--tls-client-cert-file"), "{e}");
        let e = parse(&["--tls-ca-file", "/nonexistent/ca.pem"]).unwrap_err();
        assert!(e.message.contains("/nonexistent/ca.pem"), "{e}");
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
    fn several_broker_uris_each_checked() {
        let argv = |uri: &str| {
            Args::try_parse_from([
                "w",
                "--amqp-uri",
                uri,
                "--queue",
                "q",
                "--destination-url",
                "https://x.example",
            ])
            .unwrap()
        };
        let c = Config::from_args(
            argv("amqp://u:p@a:1/%2f,amqp://u:p@b:2/%2f\n amqps://u:p@c/"),
            &|_| None,
        )
        .unwrap();
        assert_eq!(
            c.amqp_uris,
            ["amqp://u:p@a:1/%2f", "amqp://u:p@b:2/%2f", "amqps://u:p@c/"]
        );
        assert!(!format!("{c:?}").contains(":p@"), "{c:?}");
        let c = Config::from_args(argv(" amqp://h/ "), &|_| None).unwrap();
        assert_eq!(c.amqp_uris, ["amqp://h/"]);

        let err = Config::from_args(argv("amqp://u:s3cret@a/,http://u:s3cret@b/"), &|_| None).unwrap_err();
        assert_eq!(err.setting, "--amqp-uri (HOOKFLEET_AMQP_URI)");
        assert!(
            err.message.starts_with("entry 2 of 2: must start with amqp://"),
            "{err}"
        );
        let err =
            Config::from_args(argv("amqp://a/ amqp://u:s3cret@b:port/ amqp://c/"), &|_| None).unwrap_err();
        assert!(
            err.message.starts_with("entry 2 of 3: not a valid AMQP URI"),
            "{err}"
        );
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let err = Config::from_args(argv(" , "), &|_| None).unwrap_err();
        assert!(err.message.starts_with("empty"), "{err}");
    }

    #[test]
    fn broker_uris_from_a_file_name_the_file_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("uri");
        std::fs::write(&path, "amqp://u:p@a:1/%2f\namqp://u:p@b:2/%2f\n").unwrap();
        let args = |path: &std::path::Path| {
            Args::try_parse_from([
                "w",
                "--amqp-uri-file",
                path.to_str().unwrap(),
                "--queue",
                "q",
                "--destination-url",
                "https://x.example",
            ])
            .unwrap()
        };
        let c = Config::from_args(args(&path), &|_| None).unwrap();
        assert_eq!(c.amqp_uris.len(), 2);
        std::fs::write(&path, "amqp://u:p@a:1/%2f\nrabbit://b\n").unwrap();
        let err = Config::from_args(args(&path), &|_| None).unwrap_err();
        assert_eq!(err.setting, "--amqp-uri-file (HOOKFLEET_AMQP_URI_FILE)");
        assert!(err.message.starts_with("entry 2 of 2"), "{err}");
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
