//! The worker's configuration: its arguments ([`WorkerArgs`], the contract the operator renders into the
//! pod spec; clap parses them and checks each value's type and range) checked with the contract's rules
//! (`WorkerArgs::check`, the same the operator can run on a spec), and completed with what only the
//! environment and files hold: broker URIs, signing secrets, credentials, TLS PEM. The result is a
//! [`Config`]; the contract is in `docs/worker.md`.
//!
//! Every mistake becomes one [`ConfigError`] line naming the flag and its variable, so that the line in
//! the pod's termination message is enough to fix the Integration.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hookfleet_crds::contract::{self, Checked, Invalid, WorkerArgs, setting};
use hookfleet_crds::integration::{HttpMethod, QueueType, RateLimitScope, Topology, Unmatched};
use reqwest::Url;
use reqwest::header::{HeaderName, HeaderValue};

pub use hookfleet_crds::contract::LogFormat;

use crate::backoff::Backoff;
use crate::template::BodyTemplate;

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

impl From<Invalid> for ConfigError {
    fn from(i: Invalid) -> Self {
        bad(&i.field, i.reason)
    }
}

impl ConfigError {
    /// The line for a command line clap refused: the contract's refusal (`--flag (VARIABLE): reason`),
    /// or clap's own first line (an unknown flag, a value that is not a number).
    pub fn from_clap(e: &clap::Error) -> Result<Self, String> {
        if let Some(i) = contract::refusal(e) {
            return Ok(i.into());
        }
        let rendered = e.render().to_string();
        let line = rendered
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("invalid arguments");
        Err(format!(
            "invalid configuration: {}",
            line.trim_start_matches("error: ")
        ))
    }
}

fn bad(setting: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting: setting.to_owned(),
        message: message.into(),
    }
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
    /// Managed: the worker declares the queues; external: it checks that they exist, and enforces
    /// `delivery_limit` itself from `x-delivery-count`.
    pub topology: Topology,
    /// `x-delivery-limit` of a quorum work queue (managed), or the redeliveries after which the worker
    /// dead-letters a message unattempted (external).
    pub delivery_limit: u32,
    /// The one destination (`--destination-url`); `None` with `--webhooks-secret`, where each
    /// Webhook of the snapshot has its own, built by the same [`Destination::build`].
    pub destination: Option<Destination>,
    /// `--webhooks-secret` and its companions; `None` with a single destination.
    pub webhooks: Option<WebhooksMode>,
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
    /// Largest body delivered; a larger message is dead-lettered (`too_large`).
    pub max_message_bytes: usize,
    /// Bytes of messages held at a time (both lanes): lowers each lane's prefetch
    /// (`contract::memory::effective_prefetch`).
    pub in_flight_bytes: u64,
    /// A NATS JetStream source instead of RabbitMQ (`amqp_uris` is then empty, `queue` names the
    /// durable consumer and `dead_letter_queue` the dead-letter subject).
    pub nats: Option<NatsSource>,
}

/// A NATS JetStream source: where, as whom, which stream and consumer.
#[derive(Clone)]
pub struct NatsSource {
    /// The servers (carry credentials: never logged, see [`redact_uri`]).
    pub urls: Vec<String>,
    pub stream: String,
    /// The durable consumer's subject filters (none: the whole stream).
    pub subjects: Vec<String>,
    /// A credentials file (user JWT and NKey seed).
    pub creds_file: Option<PathBuf>,
    /// A token (`HOOKFLEET_NATS_TOKEN`).
    pub token: Option<String>,
    pub ack_wait: Duration,
}

impl fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSource")
            .field(
                "urls",
                &self.urls.iter().map(|u| redact_uri(u)).collect::<Vec<_>>(),
            )
            .field("stream", &self.stream)
            .field("subjects", &self.subjects)
            .field("creds_file", &self.creds_file)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("ack_wait", &self.ack_wait)
            .finish()
    }
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
            .field("topology", &self.topology)
            .field("delivery_limit", &self.delivery_limit)
            .field("destination", &self.destination)
            .field("webhooks", &self.webhooks)
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
            .field("max_message_bytes", &self.max_message_bytes)
            .field("in_flight_bytes", &self.in_flight_bytes)
            .field("nats", &self.nats)
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

/// What `--webhooks-secret` brings: where the fleet's Webhooks snapshot is, and how messages are
/// matched to Webhooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhooksMode {
    /// The Secret holding the snapshot (`<integration>-webhooks`).
    pub secret: String,
    /// Its namespace: the Integration's (`--integration NAMESPACE/NAME`).
    pub namespace: String,
    /// `--event-name-header`: the header holding the event name (else the original routing key).
    pub event_name_header: Option<String>,
    /// `--unmatched`: what becomes of a message no Webhook matches.
    pub unmatched: Unmatched,
}

/// One destination, ready to be sent to: the single `--destination-url` of an Integration, or one
/// Webhook of a snapshot. Both are built by [`Destination::build`] from the same flags.
#[derive(Clone)]
pub struct Destination {
    pub url: Url,
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
    /// Every secret value the destination was built from (variables and files), so that what is
    /// reported about it (a response excerpt) can be scrubbed of them. Never logged.
    pub secrets: Vec<String>,
}

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Destination")
            // Userinfo in the URL is a credential: never logged.
            .field("url", &hookfleet_crds::redact::userinfo(self.url.as_str()))
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
            .finish_non_exhaustive()
    }
}

/// Reads a file a TLS flag names: its bytes, or why not (the message names the file).
pub type FileReader<'a> = &'a dyn Fn(&Path) -> Result<Vec<u8>, String>;

/// Files from disk (the single destination: the kubelet mounted them).
pub fn disk(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

impl Destination {
    /// The destination `args` (checked into `checked`) describe, completed from `env` (headers from
    /// Secrets, signing secrets, credentials) and `files` (TLS PEM). The body template is taken out
    /// of `checked`. Messages name flags and variables, never values.
    pub fn build(
        args: &WorkerArgs,
        checked: &mut Checked,
        env: &dyn Fn(&str) -> Option<String>,
        files: FileReader<'_>,
    ) -> Result<Self, ConfigError> {
        use contract::{env as var, flag};
        // Every value read from a variable or a file is a secret (the operator fills them from Secrets).
        let secrets = std::cell::RefCell::new(Vec::new());
        let env = |k: &str| {
            let v = env(k);
            if let Some(v) = &v {
                secrets.borrow_mut().push(v.trim().to_owned());
            }
            v
        };
        let url = checked.destination.clone().ok_or_else(|| {
            bad(
                &setting(flag::DESTINATION_URL, var::DESTINATION_URL),
                "missing: set the destination URL",
            )
        })?;
        let mut headers = Vec::new();
        let header_setting = &setting(flag::HEADER, var::HEADERS);
        for (name, value) in &checked.headers {
            headers.push(header(header_setting, name, value)?);
        }
        let from_env_setting = &setting(flag::HEADER_FROM_ENV, var::HEADERS_FROM_ENV);
        for (name, variable) in &checked.headers_from_env {
            let raw = env(variable).ok_or_else(|| {
                bad(
                    from_env_setting,
                    format!("variable {variable} for header {name} is not set"),
                )
            })?;
            // The value is a secret: the message names the header, never the value.
            let (name, mut value) = header(from_env_setting, name, raw.trim())?;
            value.set_sensitive(true);
            headers.push((name, value));
        }

        let mut signing_secrets = match env(SIGNING_SECRET_ENV) {
            Some(s) if !s.trim().is_empty() => {
                crate::signing::parse_secrets(&s).map_err(|e| bad(SIGNING_SECRET_ENV, e))?
            }
            _ => Vec::new(),
        };
        let signing_setting = &setting(flag::SIGNING_SECRET_ENV, var::SIGNING_SECRET_ENVS);
        for variable in args
            .signing_secret_env
            .iter()
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
        {
            let value = env(variable).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
                bad(
                    signing_setting,
                    format!("variable {variable} is not set or empty"),
                )
            })?;
            signing_secrets.extend(
                crate::signing::parse_secrets(&value)
                    .map_err(|e| bad(signing_setting, format!("variable {variable}: {e}")))?,
            );
        }

        let (auth_header, oauth2) = auth_from(checked.oauth2_token_url.clone(), &args.oauth2_scopes, &env)?;
        if checked.authorization_sources() + usize::from(auth_header.is_some()) > 1 {
            return Err(bad("auth", contract::AUTHORIZATION_TWICE));
        }
        if let Some(value) = auth_header {
            headers.push((reqwest::header::AUTHORIZATION, value));
        }
        let tls = tls_files(
            args.tls_ca_file.as_deref(),
            args.tls_client_cert_file.as_deref(),
            args.tls_client_key_file.as_deref(),
            files,
        )?;

        let body_template = match checked.body_template.take() {
            Some(env) => {
                Some(Arc::new(BodyTemplate::from_environment(env).map_err(|e| {
                    bad(&setting(flag::BODY_TEMPLATE, var::BODY_TEMPLATE), e)
                })?))
            }
            None => None,
        };
        let mut secrets = secrets.into_inner();
        secrets.retain(|s| !s.is_empty());
        if let Some(o) = &oauth2 {
            secrets.push(o.client_secret.clone());
        }
        Ok(Self {
            url,
            method: args.method,
            headers,
            signing_secrets,
            oauth2,
            tls,
            body_template,
            timeout: args.timeout,
            secrets,
        })
    }
}

#[cfg(test)]
impl Config {
    /// The unit tests' worker: queue `orders`, 3 attempts, backoff 1 s × 2 without jitter, no breaker,
    /// concurrency 4, private networks allowed; `destination` or `webhooks`.
    pub(crate) fn for_tests(destination: Option<Destination>, webhooks: Option<WebhooksMode>) -> Self {
        use hookfleet_crds::integration::{Jitter, RateLimitScope};
        Self {
            integration: String::new(),
            amqp_uris: vec!["amqp://127.0.0.1:1/%2f".into()],
            queue: "orders".into(),
            bindings: Vec::new(),
            prefetch: 64,
            queue_type: QueueType::Quorum,
            topology: Topology::Managed,
            delivery_limit: 20,
            destination,
            webhooks,
            max_attempts: 3,
            backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(60),
                multiplier: 2.0,
                jitter: Jitter::None,
            },
            concurrency: 4,
            rate_limit: None,
            rate_limit_scope: RateLimitScope::Worker,
            circuit_breaker: (0, Duration::from_secs(10)),
            adaptive_throttle: None,
            dead_letter_queue: "orders.dead".into(),
            confirm_timeout: Duration::from_secs(5),
            fd_limit: 1024,
            allow_private_networks: true,
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
            shutdown_grace: Duration::from_secs(1),
            termination_log: "/dev/null".into(),
            log_format: LogFormat::Text,
            max_message_bytes: 1 << 20,
            in_flight_bytes: 128 << 20,
            nats: None,
        }
    }
}

impl Config {
    /// Checks `args` and completes them from the environment (`env` looks up variables: the broker
    /// URI, the signing secrets, credentials, --header-from-env targets) and files.
    pub fn from_args(args: WorkerArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        use contract::{env as var, flag};
        // The broker first, as it always was: a worker with nothing set names the URI.
        let amqp_uris = if args.is_nats() {
            Vec::new()
        } else {
            amqp_uris(&args)?
        };
        let mut checked: Checked = args.check().map_err(|mut e| ConfigError::from(e.remove(0)))?;
        let nats = match checked.nats.take() {
            None => None,
            Some(n) => Some(nats_source(&args, n, env)?),
        };
        let (destination, webhooks) = match checked.webhooks_secret.clone() {
            None => (Some(Destination::build(&args, &mut checked, env, &disk)?), None),
            Some(secret) => {
                let namespace = match args.integration.split_once('/') {
                    Some((ns, _)) if !ns.trim().is_empty() => ns.trim().to_owned(),
                    _ => {
                        return Err(bad(
                            &setting(flag::INTEGRATION, var::INTEGRATION),
                            "with --webhooks-secret, set NAMESPACE/NAME (the snapshot Secret's namespace)",
                        ));
                    }
                };
                let event_name_header = args
                    .event_name_header
                    .as_deref()
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(str::to_owned);
                let mode = WebhooksMode {
                    secret,
                    namespace,
                    event_name_header,
                    unmatched: args.unmatched,
                };
                (None, Some(mode))
            }
        };

        Ok(Self {
            integration: args.integration,
            amqp_uris,
            queue: checked.queue,
            bindings: checked.bindings,
            prefetch: args.prefetch,
            queue_type: args.queue_type,
            topology: args.topology,
            delivery_limit: args.delivery_limit,
            destination,
            webhooks,
            max_attempts: args.max_attempts,
            backoff: Backoff {
                initial: args.backoff_initial,
                max: args.backoff_max,
                multiplier: args.backoff_multiplier,
                jitter: args.backoff_jitter,
            },
            concurrency: args.concurrency as usize,
            rate_limit: checked.rate_limit,
            rate_limit_scope: args.rate_limit_scope,
            circuit_breaker: (args.circuit_breaker_threshold, args.circuit_breaker_cooldown),
            adaptive_throttle: checked.adaptive_throttle,
            dead_letter_queue: checked.dead_letter_queue,
            confirm_timeout: args.confirm_timeout,
            fd_limit: args.fd_limit,
            allow_private_networks: args.allow_private_networks,
            metrics_addr: args.metrics_addr,
            shutdown_grace: args.shutdown_grace,
            termination_log: args.termination_log,
            log_format: args.log_format,
            max_message_bytes: args.max_message_bytes as usize,
            in_flight_bytes: args.in_flight_bytes,
            nats,
        })
    }

    /// The redeliveries after which the worker dead-letters a message without attempting it
    /// (`delivery_limit` reason), when the worker keeps that limit itself: with an external RabbitMQ
    /// topology, `--delivery-limit` (from `x-delivery-count`); with NATS, `--max-attempts`, since
    /// JetStream counts every delivery, retries included (its `MaxDeliver` is one more, see
    /// `worker::jetstream`). `None`: the broker keeps it (a managed quorum queue).
    pub fn worker_delivery_limit(&self) -> Option<u32> {
        match (&self.nats, self.topology) {
            (Some(_), _) => Some(self.max_attempts),
            (None, Topology::External) => Some(self.delivery_limit),
            (None, Topology::Managed) => None,
        }
    }

    /// Each lane's prefetch: `prefetch` lowered so that both lanes hold at most `in_flight_bytes` of
    /// messages of `max_message_bytes` (`contract::memory`).
    pub fn lane_prefetch(&self) -> u16 {
        hookfleet_crds::contract::memory::effective_prefetch(
            self.prefetch,
            u32::try_from(self.max_message_bytes).unwrap_or(u32::MAX),
            self.in_flight_bytes,
        )
    }

    /// The single destination. Panics with `--webhooks-secret` (tests and single-destination paths).
    pub fn dest(&self) -> &Destination {
        self.destination
            .as_ref()
            .expect("a single-destination configuration")
    }
}

/// The broker URIs, from `--amqp-uri` or the file `--amqp-uri-file` names (exactly one of them).
fn amqp_uris(args: &WorkerArgs) -> Result<Vec<String>, ConfigError> {
    use contract::{env as var, flag};
    let (setting, value) = value_or_file(
        args.amqp_uri.as_ref(),
        args.amqp_uri_file.as_ref(),
        (flag::AMQP_URI, var::AMQP_URI),
        (flag::AMQP_URI_FILE, var::AMQP_URI_FILE),
    )?;
    parse_amqp_uris(&setting, &value)
}

/// A value given either inline (`value`, the setting `inline`) or in a file (`file`, the setting
/// `in_file`), exactly one of them: the setting it came from (for messages) and the value.
fn value_or_file(
    value: Option<&String>,
    file: Option<&PathBuf>,
    inline: (&str, &str),
    in_file: (&str, &str),
) -> Result<(String, String), ConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(bad(
            &format!("--{}/--{}", inline.0, in_file.0),
            format!("set one of {} and {}, not both", inline.1, in_file.1),
        )),
        (Some(v), None) => Ok((setting(inline.0, inline.1), v.clone())),
        (None, Some(path)) => {
            let from = setting(in_file.0, in_file.1);
            let value =
                std::fs::read_to_string(path).map_err(|e| bad(&from, format!("{}: {e}", path.display())))?;
            Ok((from, value))
        }
        (None, None) => Err(bad(
            &setting(inline.0, inline.1),
            format!("missing: set {} or {}", inline.1, in_file.1),
        )),
    }
}

/// The NATS source: the server URLs from `--nats-url` or the file `--nats-url-file` names (exactly
/// one), each `nats://` or `tls://`; the token from the environment; the stream and filters `checked`.
fn nats_source(
    args: &WorkerArgs,
    checked: contract::NatsChecked,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<NatsSource, ConfigError> {
    use contract::{env as var, flag};
    let (url_setting, value) = value_or_file(
        args.nats_url.as_ref(),
        args.nats_url_file.as_ref(),
        (flag::NATS_URL, var::NATS_URL),
        (flag::NATS_URL_FILE, var::NATS_URL_FILE),
    )?;
    let urls: Vec<String> = hookfleet_crds::broker::nats_urls(&value)
        .map_err(|e| bad(&url_setting, e))?
        .into_iter()
        .map(str::to_owned)
        .collect();
    if let Some(path) = &args.nats_creds_file
        && let Err(e) = std::fs::metadata(path)
    {
        return Err(bad(
            &setting(flag::NATS_CREDS_FILE, var::NATS_CREDS_FILE),
            format!("{}: {e}", path.display()),
        ));
    }
    Ok(NatsSource {
        urls,
        stream: checked.stream,
        subjects: checked.subjects,
        creds_file: args.nats_creds_file.clone(),
        token: env(var::NATS_TOKEN).filter(|t| !t.trim().is_empty()),
        ack_wait: args.nats_ack_wait,
    })
}

/// A header as the HTTP client holds it (the contract checked both already).
fn header(setting: &str, name: &str, value: &str) -> Result<(HeaderName, HeaderValue), ConfigError> {
    let name =
        HeaderName::from_str(name).map_err(|_| bad(setting, format!("{name:?} is not a header name")))?;
    let value = HeaderValue::from_str(value)
        .map_err(|_| bad(setting, format!("value of {name} is not a valid header value")))?;
    Ok((name, value))
}

/// Basic or bearer auth as an `Authorization` value, or OAuth2 client credentials: from the variables
/// the operator fills from Secrets. Messages name variables, never their values.
#[allow(clippy::type_complexity)]
fn auth_from(
    token_url: Option<Url>,
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
    let oauth2 = match token_url {
        None => None,
        Some(token_url) => {
            let url_setting =
                &contract::setting(contract::flag::OAUTH2_TOKEN_URL, contract::env::OAUTH2_TOKEN_URL);
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
    files: FileReader<'_>,
) -> Result<TlsFiles, ConfigError> {
    let read = |setting: &str, path: &std::path::Path| files(path).map_err(|e| bad(setting, e));
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

#[cfg(test)]
pub(crate) mod tests {
    use clap::Parser;
    use hookfleet_crds::integration::{DeliverySpec, Jitter};

    use super::*;

    type Args = WorkerArgs;

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        parse_env(extra, &|_| None)
    }

    /// The arguments every test configuration starts from, then `extra`.
    pub(crate) fn argv<'a>(extra: &[&'a str]) -> Vec<&'a str> {
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
        argv
    }

    fn parse_env(extra: &[&str], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let argv = argv(extra);
        // A value the contract's parser refuses is a configuration error like the others.
        let args = Args::try_parse_from(argv)
            .map_err(|e| ConfigError::from_clap(&e).unwrap_or_else(|line| panic!("flags parse: {line}")))?;
        Config::from_args(args, env)
    }

    /// A NATS source: `extra` after the queue, stream and destination.
    fn parse_nats(extra: &[&str], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut argv = vec![
            "hookfleet-worker",
            "--queue",
            "hooks",
            "--nats-stream",
            "EVENTS",
            "--destination-url",
            "https://erp.example.com/hook",
        ];
        argv.extend_from_slice(extra);
        Config::from_args(Args::try_parse_from(argv).expect("flags parse"), env)
    }

    #[test]
    fn a_nats_source_takes_its_urls_and_token_and_never_shows_them() {
        let token = |k: &str| (k == "HOOKFLEET_NATS_TOKEN").then(|| "s3cret-token".to_owned());
        let c = parse_nats(&["--nats-url", "nats://u:pw@n1:4222, tls://u:pw@n2:4222"], &token).unwrap();
        let n = c.nats.as_ref().expect("a NATS source");
        assert_eq!(n.urls, ["nats://u:pw@n1:4222", "tls://u:pw@n2:4222"]);
        assert_eq!(n.token.as_deref(), Some("s3cret-token"));
        assert!(c.amqp_uris.is_empty());
        assert_eq!(c.dead_letter_queue, "hookfleet.dead.hooks");
        assert_eq!(
            c.worker_delivery_limit(),
            Some(c.max_attempts),
            "every delivery is an attempt"
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("pw@") && !shown.contains("s3cret"), "{shown}");
        let e = parse_nats(&["--nats-url", "http://n1:4222"], &|_| None).unwrap_err();
        assert!(e.to_string().contains("must start with nats://"), "{e}");
        let e = parse_nats(&[], &|_| None).unwrap_err();
        assert!(e.to_string().contains("HOOKFLEET_NATS_URL"), "{e}");
        let e = parse_nats(
            &[
                "--nats-url",
                "nats://n1",
                "--nats-creds-file",
                "/nonexistent/creds",
            ],
            &|_| None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("--nats-creds-file"), "{e}");
        // RabbitMQ keeps its own limit only with an external topology.
        assert_eq!(parse(&[]).unwrap().worker_delivery_limit(), None);
        assert_eq!(
            parse(&["--topology", "external"])
                .unwrap()
                .worker_delivery_limit(),
            Some(20)
        );
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
        assert_eq!(c.dest().timeout, Duration::from_secs(10));
        assert_eq!(c.dead_letter_queue, "orders.dead");
        assert_eq!(c.prefetch, 64);
        assert_eq!(c.fd_limit, 1_048_576);
        assert_eq!(c.shutdown_grace, Duration::from_secs(25));
        assert_eq!(c.dest().method, HttpMethod::Post);
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
        assert_eq!(c.dest().headers[0].0.as_str(), "x-source");
        assert_eq!(c.dest().timeout, Duration::from_secs(90));
        assert_eq!(c.backoff.initial, Duration::from_millis(250));
        assert_eq!(c.backoff.jitter, Jitter::Equal);
        assert_eq!(c.rate_limit, Some((200, 200)));
        assert_eq!(c.dest().method, HttpMethod::Put);
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
        assert_eq!(c.dest().headers[0].0.as_str(), "authorization");
        assert!(c.dest().headers[0].1.is_sensitive());
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
        let (name, value) = c.dest().headers.last().unwrap();
        assert_eq!(name, reqwest::header::AUTHORIZATION);
        assert!(value.is_sensitive());
        assert_eq!(value.to_str().unwrap(), "Basic c3ZjOnBhNTU=");
        assert!(!format!("{c:?}").contains("c3ZjOnBhNTU"));

        let half = vars(&[(BASIC_AUTH_USERNAME_ENV, "svc")]);
        assert!(parse_env(&[], &half).unwrap_err().message.contains("needs both"));

        let bearer = vars(&[(BEARER_TOKEN_ENV, "t0ken")]);
        let c = parse_env(&[], &bearer).unwrap();
        assert_eq!(
            c.dest().headers.last().unwrap().1.to_str().unwrap(),
            "Bearer t0ken"
        );
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
        let o = c.dest().oauth2.as_ref().unwrap();
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
            c.dest().signing_secrets,
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
        assert!(parse(&[]).unwrap().dest().body_template.is_none());
        assert!(
            parse(&["--body-template", " "])
                .unwrap()
                .dest()
                .body_template
                .is_none()
        );
        let c = parse(&["--body-template", "{\"order\": {{ data | tojson }}}"]).unwrap();
        let t = c.dest().body_template.clone().expect("compiled");
        let extras = crate::template::Extras {
            routing_key: "rk",
            webhook_id: "id",
        };
        assert_eq!(t.render(br#"{"data": [1]}"#, extras).unwrap(), "{\"order\": [1]}");
        let c = parse(&["--body-template", "-{{ n }}"]).unwrap();
        assert_eq!(
            c.dest()
                .body_template
                .clone()
                .unwrap()
                .render(br#"{"n": 1}"#, extras)
                .unwrap(),
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
    fn webhooks_mode_has_no_destination_and_names_its_secret_and_namespace() {
        let argv = |integration: &str| {
            Args::try_parse_from([
                "w",
                "--amqp-uri",
                "amqp://127.0.0.1/",
                "--queue",
                "q",
                "--webhooks-secret",
                " fleet-webhooks ",
                "--integration",
                integration,
                "--event-name-header",
                "x-event",
                "--unmatched",
                "deadLetter",
            ])
            .unwrap()
        };
        let c = Config::from_args(argv("team-a/fleet"), &|_| None).unwrap();
        assert!(c.destination.is_none());
        assert_eq!(
            c.webhooks,
            Some(WebhooksMode {
                secret: "fleet-webhooks".into(),
                namespace: "team-a".into(),
                event_name_header: Some("x-event".into()),
                unmatched: Unmatched::DeadLetter,
            })
        );
        let e = Config::from_args(argv("fleet"), &|_| None).unwrap_err();
        assert!(e.setting.starts_with("--integration"), "{e}");
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
