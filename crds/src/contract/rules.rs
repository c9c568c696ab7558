//! What the worker refuses in its arguments beyond one value's type and range: a missing queue or URL,
//! a body template that does not parse, a header the HTTP client would refuse, a dead-letter queue that
//! is one of the work queue's own, settings that need each other. [`WorkerArgs::check`] runs every rule
//! and names each refusal by its flag and variable (the worker's messages); the crate's `validate` runs
//! the same rules on what the operator would render and names the spec field instead.

use std::net::IpAddr;
use std::time::Duration;

use minijinja::Environment;
use url::Url;

use super::{WorkerArgs, env, flag, queues, setting};
use crate::integration::{AdaptiveThrottleSpec, RESERVED_HEADERS};
use crate::limits;

/// A setting that cannot be used, and why: `field` is a spec field (`spec.destination.url`) from
/// the crate's `validate`, or the worker's flag and variable (`--queue (HOOKFLEET_QUEUE)`) from
/// [`WorkerArgs::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

/// A checked setting: how the worker names it, and the spec field it comes from.
#[derive(Clone, Copy, Debug)]
struct Setting {
    flag: &'static str,
    env: &'static str,
    field: &'static str,
}

const QUEUE: Setting = Setting {
    flag: flag::QUEUE,
    env: env::QUEUE,
    field: "spec.source.queue",
};
const BINDING: Setting = Setting {
    flag: flag::BINDING,
    env: env::BINDINGS,
    field: "spec.source.bindings",
};
const DESTINATION_URL: Setting = Setting {
    flag: flag::DESTINATION_URL,
    env: env::DESTINATION_URL,
    field: "spec.destination.url",
};
const HEADER: Setting = Setting {
    flag: flag::HEADER,
    env: env::HEADERS,
    field: "spec.destination.headers",
};
const HEADER_FROM_ENV: Setting = Setting {
    flag: flag::HEADER_FROM_ENV,
    env: env::HEADERS_FROM_ENV,
    field: "spec.destination.headersFrom",
};
/// Who sets `Authorization`: headers, headersFrom and `auth` together (the worker names it `auth`).
const AUTH: Setting = Setting {
    flag: "",
    env: "",
    field: "spec.destination.headers",
};
const OAUTH2_TOKEN_URL: Setting = Setting {
    flag: flag::OAUTH2_TOKEN_URL,
    env: env::OAUTH2_TOKEN_URL,
    field: "spec.destination.auth.oauth2.tokenUrl",
};
const BODY_TEMPLATE: Setting = Setting {
    flag: flag::BODY_TEMPLATE,
    env: env::BODY_TEMPLATE,
    field: "spec.destination.body.template",
};
const BACKOFF_INITIAL: Setting = Setting {
    flag: flag::BACKOFF_INITIAL,
    env: env::BACKOFF_INITIAL,
    field: "spec.delivery.backoff.initial",
};
const RATE_LIMIT_BURST: Setting = Setting {
    flag: flag::RATE_LIMIT_BURST,
    env: env::RATE_LIMIT_BURST,
    field: "spec.delivery.rateLimit.burst",
};
const RATE_LIMIT_SCOPE: Setting = Setting {
    flag: flag::RATE_LIMIT_SCOPE,
    env: env::RATE_LIMIT_SCOPE,
    field: "spec.delivery.rateLimit.scope",
};
const ADAPTIVE_THROTTLE_MIN: Setting = Setting {
    flag: flag::ADAPTIVE_THROTTLE_MIN,
    env: env::ADAPTIVE_THROTTLE_MIN,
    field: "spec.delivery.adaptiveThrottle.minConcurrency",
};
const ADAPTIVE_THROTTLE_WINDOW: Setting = Setting {
    flag: flag::ADAPTIVE_THROTTLE_WINDOW,
    env: env::ADAPTIVE_THROTTLE_WINDOW,
    field: "spec.delivery.adaptiveThrottle.window",
};
const NATS_STREAM: Setting = Setting {
    flag: flag::NATS_STREAM,
    env: env::NATS_STREAM,
    field: "spec.source.nats.stream",
};
const NATS_SUBJECT: Setting = Setting {
    flag: flag::NATS_SUBJECT,
    env: env::NATS_SUBJECTS,
    field: "spec.source.nats.subjects",
};
const DEAD_LETTER_QUEUE: Setting = Setting {
    flag: flag::DEAD_LETTER_QUEUE,
    env: env::DEAD_LETTER_QUEUE,
    field: "spec.delivery.deadLetter.queue",
};

/// The message when more than one source sets `Authorization`.
pub const AUTHORIZATION_TWICE: &str =
    "Authorization is set twice: by a header and by basic, bearer or OAuth2 auth; keep one";

/// What [`WorkerArgs::check`] read out of the arguments, for the worker to build its configuration from.
#[derive(Clone, Debug)]
pub struct Checked {
    /// The work queue (trimmed).
    pub queue: String,
    /// (exchange, routing key).
    pub bindings: Vec<(String, String)>,
    /// `--destination-url`; `None` with `--webhooks-secret` (the Webhooks snapshot names the
    /// destinations).
    pub destination: Option<Url>,
    /// `--webhooks-secret` (trimmed).
    pub webhooks_secret: Option<String>,
    /// `--header` (name, value), trimmed, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// `--header-from-env` (name lower-cased, variable).
    pub headers_from_env: Vec<(String, String)>,
    pub oauth2_token_url: Option<Url>,
    /// `--body-template` unless blank, compiled ([`crate::template::environment`]: the worker renders
    /// with this environment rather than compiling the template a second time).
    pub body_template: Option<Environment<'static>>,
    /// `--dead-letter-queue`, or `<queue>.dead`.
    pub dead_letter_queue: String,
    /// (per second, burst) of `--rate-limit` and `--rate-limit-burst` (default: the rate).
    pub rate_limit: Option<(u32, u32)>,
    /// (minimum in flight, window) when `--adaptive-throttle` (defaults: the CRD's).
    pub adaptive_throttle: Option<(u32, Duration)>,
    /// With a NATS source (`--nats-url`, `--nats-url-file` or `--nats-stream`): the stream and the
    /// consumer's subject filters. `queue` is then the durable consumer's name and
    /// `dead_letter_queue` the subject dead letters are published to.
    pub nats: Option<NatsChecked>,
}

/// The NATS source's stream and subject filters, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsChecked {
    pub stream: String,
    pub subjects: Vec<String>,
}

impl Checked {
    /// How many of the arguments set `Authorization`: headers, headers from variables, OAuth2 (the
    /// worker adds basic and bearer auth, which only the environment carries).
    pub fn authorization_sources(&self) -> usize {
        authorization_sources(
            &self.headers,
            &self.headers_from_env,
            self.oauth2_token_url.is_some(),
        )
    }
}

fn authorization_sources(headers: &[(String, String)], from_env: &[(String, String)], oauth2: bool) -> usize {
    headers
        .iter()
        .chain(from_env)
        .filter(|(name, _)| name == "authorization")
        .count()
        + usize::from(oauth2)
}

/// Refusals, named by [`Setting`]; turned into [`Invalid`]s by the caller's naming.
#[derive(Default)]
pub(crate) struct Refusals(Vec<(Setting, String)>);

impl Refusals {
    fn push(&mut self, s: Setting, reason: impl Into<String>) {
        self.0.push((s, reason.into()));
    }

    /// `r`'s value, or `None` with its reason noted against `s`.
    fn take<T>(&mut self, s: Setting, r: Result<T, String>) -> Option<T> {
        r.map_err(|e| self.push(s, e)).ok()
    }

    /// Named as the worker names them: `--flag (VARIABLE)`.
    fn by_flag(self) -> Vec<Invalid> {
        self.0
            .into_iter()
            .map(|(s, reason)| Invalid {
                field: match s.flag {
                    "" => "auth".to_owned(),
                    f => setting(f, s.env),
                },
                reason,
            })
            .collect()
    }

    /// Named by the spec field.
    pub(crate) fn by_field(self) -> Vec<Invalid> {
        self.0
            .into_iter()
            .map(|(s, reason)| Invalid {
                field: s.field.to_owned(),
                reason,
            })
            .collect()
    }
}

impl WorkerArgs {
    /// Every rule on the arguments alone (what needs the environment or files, the worker checks
    /// itself). All refusals, in the order the worker has always reported them; the worker shows the
    /// first.
    pub fn check(&self) -> Result<Checked, Vec<Invalid>> {
        let mut no = Refusals::default();
        let checked = self.rules(&mut no);
        match checked {
            Some(c) if no.0.is_empty() => Ok(c),
            _ => Err(no.by_flag()),
        }
    }

    /// Every queue a worker started with these arguments declares, in the order it declares them: the
    /// work queue, the dead-letter queue, the retry-ready queue, the delay queues of the `--backoff-max`
    /// ladder ([`queues::delay_ttls`]) and, with `--webhooks-secret`, the reports queue. Empty when the
    /// worker would not start for want of a queue; without the dead-letter queue when it would refuse
    /// that one (the worker declares nothing then). The operator deletes these for
    /// `deletionPolicy: Delete`; `worker/src/worker/topology.rs` declares them.
    pub fn declared_queues(&self) -> Vec<String> {
        if self.is_nats() {
            // A NATS source declares no RabbitMQ queue.
            return Vec::new();
        }
        let Ok(queue) = queue(self.queue.as_deref()) else {
            return Vec::new();
        };
        let mut out = vec![queue.clone()];
        if let Ok(dlq) = dead_letter_queue(&queue, self.dead_letter_queue.as_deref()) {
            out.push(dlq);
        }
        out.push(queues::retry_ready(&queue));
        for ttl in queues::delay_ttls(self.backoff_max) {
            out.push(queues::delay(&queue, ttl));
        }
        if self
            .webhooks_secret
            .as_deref()
            .is_some_and(|w| !w.trim().is_empty())
        {
            out.push(super::webhooks::reports_queue(&queue));
        }
        out
    }

    /// Like [`WorkerArgs::check`], with the refusals named by the spec field they come from.
    pub(crate) fn check_fields(&self) -> Vec<Invalid> {
        let mut no = Refusals::default();
        self.rules(&mut no);
        no.by_field()
    }

    fn rules(&self, no: &mut Refusals) -> Option<Checked> {
        let queue = no.take(QUEUE, queue(self.queue.as_deref()));
        let bindings = no.take(BINDING, bindings(&self.bindings));
        if self.topology == crate::integration::Topology::External && !self.bindings.is_empty() {
            no.push(
                BINDING,
                format!(
                    "--{} external declares nothing, bindings included: they are the queue owner's",
                    flag::TOPOLOGY
                ),
            );
        }
        let webhooks_secret = self
            .webhooks_secret
            .as_deref()
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .map(str::to_owned);
        let destination = match (&webhooks_secret, self.destination_url.as_deref()) {
            (Some(_), None) => Some(None),
            (Some(_), Some(_)) => {
                no.push(
                    DESTINATION_URL,
                    format!("set either it or --{}, not both", flag::WEBHOOKS_SECRET),
                );
                None
            }
            (None, url) => no
                .take(DESTINATION_URL, destination(url, self.allow_private_networks))
                .map(Some),
        };
        let headers = no.take(HEADER, headers(&self.headers));
        let headers_from_env = no.take(HEADER_FROM_ENV, headers_from_env(&self.header_from_env));
        let oauth2_token_url = no.take(
            OAUTH2_TOKEN_URL,
            match self.oauth2_token_url.as_deref().map(str::trim) {
                None | Some("") => Ok(None),
                Some(u) => http_url(u).map(Some),
            },
        );
        if let (Some(h), Some(f)) = (&headers, &headers_from_env)
            && authorization_sources(h, f, matches!(oauth2_token_url, Some(Some(_)))) > 1
        {
            no.push(AUTH, AUTHORIZATION_TWICE);
        }
        let body_template = match self.body_template.as_deref() {
            Some(t) if !t.trim().is_empty() => {
                no.take(BODY_TEMPLATE, crate::template::environment(t).map(Some))
            }
            _ => Some(None),
        };
        if self.backoff_initial > self.backoff_max {
            no.push(
                BACKOFF_INITIAL,
                format!(
                    "{:?} exceeds --{} {:?}",
                    self.backoff_initial,
                    flag::BACKOFF_MAX,
                    self.backoff_max
                ),
            );
        }
        if self.rate_limit.is_none() {
            if self.rate_limit_burst.is_some() {
                no.push(RATE_LIMIT_BURST, format!("needs --{}", flag::RATE_LIMIT));
            }
            if self.rate_limit_scope == crate::integration::RateLimitScope::Fleet {
                no.push(RATE_LIMIT_SCOPE, "fleet needs --rate-limit");
            }
        }
        let adaptive_throttle = self.adaptive_throttle();
        if let Err((s, reason)) = &adaptive_throttle {
            no.push(*s, reason.clone());
        }
        let nats = self.is_nats().then(|| self.nats_rules(no, queue.as_deref()));
        let dead_letter_queue = queue.as_deref().and_then(|q| {
            no.take(
                DEAD_LETTER_QUEUE,
                match &nats {
                    Some(_) => nats_dead_letter_subject(q, self.dead_letter_queue.as_deref()),
                    None => dead_letter_queue(q, self.dead_letter_queue.as_deref()),
                },
            )
        });
        Some(Checked {
            queue: queue?,
            bindings: bindings?,
            destination: destination?,
            webhooks_secret,
            headers: headers?,
            headers_from_env: headers_from_env?,
            oauth2_token_url: oauth2_token_url?,
            body_template: body_template?,
            dead_letter_queue: dead_letter_queue?,
            rate_limit: self.rate_limit.map(|r| (r, self.rate_limit_burst.unwrap_or(r))),
            adaptive_throttle: adaptive_throttle.ok()?,
            nats: match nats {
                Some(n) => Some(n?),
                None => None,
            },
        })
    }

    /// Whether the source is a NATS JetStream stream rather than a RabbitMQ queue.
    pub fn is_nats(&self) -> bool {
        self.nats_url.is_some() || self.nats_url_file.is_some() || self.nats_stream.is_some()
    }

    /// The rules of a NATS source: a stream, NATS names for the stream and the consumer (`--queue`),
    /// valid subject filters, and none of what only RabbitMQ has.
    fn nats_rules(&self, no: &mut Refusals, consumer: Option<&str>) -> Option<NatsChecked> {
        if self.amqp_uri.is_some() || self.amqp_uri_file.is_some() {
            no.push(
                NATS_STREAM,
                format!(
                    "a source is either RabbitMQ (--{}) or NATS (--{}), not both",
                    flag::AMQP_URI,
                    flag::NATS_URL
                ),
            );
        }
        if let Some(c) = consumer
            && let Err(e) = nats_name(c)
        {
            no.push(QUEUE, format!("the durable consumer's name {c:?} {e}"));
        }
        if !self.bindings.is_empty() {
            no.push(
                BINDING,
                "a NATS stream has no bindings: its subjects say what it holds",
            );
        }
        let stream = match self.nats_stream.as_deref().map(str::trim) {
            None | Some("") => {
                no.push(NATS_STREAM, "missing: name the JetStream stream to consume");
                None
            }
            Some(s) => no.take(NATS_STREAM, nats_name(s).map(|()| s.to_owned())),
        };
        let mut subjects = Vec::new();
        for f in self
            .nats_subjects
            .iter()
            .map(|f| f.trim())
            .filter(|f| !f.is_empty())
        {
            match nats_subject(f, true) {
                Ok(()) => subjects.push(f.to_owned()),
                Err(e) => no.push(NATS_SUBJECT, format!("{f:?} {e}")),
            }
        }
        Some(NatsChecked {
            stream: stream?,
            subjects,
        })
    }

    /// The throttle's floor and window when it is on; its settings refused when it is off.
    fn adaptive_throttle(&self) -> Result<Option<(u32, Duration)>, (Setting, String)> {
        if !self.adaptive_throttle {
            if self.adaptive_throttle_min.is_some() {
                return Err((ADAPTIVE_THROTTLE_MIN, "needs --adaptive-throttle".into()));
            }
            if self.adaptive_throttle_window.is_some() {
                return Err((ADAPTIVE_THROTTLE_WINDOW, "needs --adaptive-throttle".into()));
            }
            return Ok(None);
        }
        let min = self
            .adaptive_throttle_min
            .unwrap_or(limits::ADAPTIVE_THROTTLE_MIN.min);
        if min < limits::ADAPTIVE_THROTTLE_MIN.min || min > self.concurrency {
            return Err((
                ADAPTIVE_THROTTLE_MIN,
                format!(
                    "{min} is outside [{}, --concurrency {}]",
                    limits::ADAPTIVE_THROTTLE_MIN.min,
                    self.concurrency
                ),
            ));
        }
        let window = self
            .adaptive_throttle_window
            .unwrap_or_else(|| AdaptiveThrottleSpec::default().window.into());
        Ok(Some((min, window)))
    }
}

/// A stream's or consumer's name as JetStream takes it: no whitespace, `.`, `*`, `>`, `/` or `\\`.
fn nats_name(n: &str) -> Result<(), String> {
    if n.chars()
        .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err("may not hold whitespace, '.', '*', '>', '/' or '\\' (JetStream's names)".into());
    }
    Ok(())
}

/// A NATS subject: tokens separated by `.`, none empty; with `wildcards`, `*` as a whole token and `>`
/// as the whole last one.
fn nats_subject(s: &str, wildcards: bool) -> Result<(), String> {
    if s.chars().any(char::is_whitespace) {
        return Err("may not hold whitespace".into());
    }
    let tokens: Vec<&str> = s.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return Err("has an empty token".into());
        }
        let wild = t.contains('*') || t.contains('>');
        if wild && !wildcards {
            return Err("may not hold wildcards ('*', '>')".into());
        }
        if wild && !(*t == "*" || (*t == ">" && i == tokens.len() - 1)) {
            return Err("uses '*' only as a whole token and '>' only as the whole last one".into());
        }
    }
    Ok(())
}

/// The subject dead letters of a NATS source are published to: `--dead-letter-queue`, or
/// `hookfleet.dead.<consumer>` (a subject no work stream is likely to capture: a dead letter the work
/// stream captured would come back to the consumer).
fn nats_dead_letter_subject(consumer: &str, dlq: Option<&str>) -> Result<String, String> {
    match dlq.map(str::trim).filter(|d| !d.is_empty()) {
        None => Ok(super::queues::nats_dead_letter(consumer)),
        Some(d) => nats_subject(d, false).map(|()| d.to_owned()),
    }
}

fn queue(q: Option<&str>) -> Result<String, String> {
    let q = q.map(str::trim).unwrap_or_default();
    if q.is_empty() {
        return Err("missing: name the queue to consume".into());
    }
    if q.len() > limits::QUEUE_NAME_MAX as usize {
        // Delay queues are named `<queue>.delay.<ms>ms` and must stay under AMQP's 255 bytes.
        return Err(format!("longer than {} bytes", limits::QUEUE_NAME_MAX));
    }
    Ok(q.to_owned())
}

/// Entries of a list flag, trimmed, blank ones skipped (a variable may end in its separator).
fn entries(list: &[String]) -> impl Iterator<Item = &str> {
    list.iter().map(|e| e.trim()).filter(|e| !e.is_empty())
}

fn bindings(list: &[String]) -> Result<Vec<(String, String)>, String> {
    entries(list)
        .map(|b| match b.split_once('=') {
            Some((ex, key)) if !ex.trim().is_empty() => Ok((ex.trim().to_owned(), key.trim().to_owned())),
            _ => Err(format!("{b:?} is not EXCHANGE=ROUTING_KEY")),
        })
        .collect()
}

/// An absolute http(s) URL with a host, as the worker's HTTP client reads it.
fn http_url(u: &str) -> Result<Url, String> {
    let url = Url::parse(u.trim()).map_err(|e| format!("{u:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("must be an absolute http:// or https:// URL with a host".into());
    }
    Ok(url)
}

fn destination(u: Option<&str>, allow_private_networks: bool) -> Result<Url, String> {
    let url = match u {
        Some(u) if !u.trim().is_empty() => http_url(u)?,
        _ => {
            return Err(format!(
                "missing: set the webhook URL (or --{} for Webhooks)",
                flag::WEBHOOKS_SECRET
            ));
        }
    };
    // A name is checked at every connection (the worker's resolver); a literal address only here.
    let ip = url.host_str().and_then(|h| {
        h.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
    });
    if !allow_private_networks
        && let Some(ip) = ip
        && let Some(kind) = crate::address::forbidden(ip)
    {
        return Err(format!(
            "{ip} is a {kind} address; pass --{} to allow it",
            flag::ALLOW_PRIVATE_NETWORKS
        ));
    }
    Ok(url)
}

/// A header name the HTTP client takes (an RFC 9110 token, up to 64 KiB) that the worker does not set
/// itself; lower-cased.
fn header_name(name: &str) -> Result<String, String> {
    let t = name.trim();
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if t.is_empty() || t.len() > usize::from(u16::MAX) || !t.bytes().all(token) {
        return Err(format!("{name:?} is not a header name"));
    }
    let lower = t.to_ascii_lowercase();
    if RESERVED_HEADERS.contains(&lower.as_str()) {
        return Err(format!("{lower} is set by the worker and cannot be overridden"));
    }
    Ok(lower)
}

/// A header value the HTTP client takes: no control character but tab (so no CR or LF).
fn header_value(name: &str, value: &str) -> Result<String, String> {
    let v = value.trim();
    if !v.bytes().all(|b| (b >= 32 && b != 127) || b == b'\t') {
        return Err(format!("value of {name} is not a valid header value"));
    }
    Ok(v.to_owned())
}

/// Each entry of `list`, split at its first `sep` into a header name and the rest (which `rest` reads);
/// `form` is the shape a refusal expects.
fn header_entries(
    list: &[String],
    sep: char,
    form: &str,
    rest: impl Fn(&str, &str) -> Result<String, String>,
) -> Result<Vec<(String, String)>, String> {
    entries(list)
        .map(|h| {
            let (name, after) = h.split_once(sep).ok_or_else(|| format!("{h:?} is not {form}"))?;
            let name = header_name(name)?;
            let after = rest(&name, after)?;
            Ok((name, after))
        })
        .collect()
}

fn headers(list: &[String]) -> Result<Vec<(String, String)>, String> {
    header_entries(list, ':', "\"Name: value\"", header_value)
}

fn headers_from_env(list: &[String]) -> Result<Vec<(String, String)>, String> {
    header_entries(list, '=', "NAME=ENV_VAR", |_, var| Ok(var.trim().to_owned()))
}

fn dead_letter_queue(queue: &str, given: Option<&str>) -> Result<String, String> {
    let dlq = match given.map(str::trim) {
        Some(q) if !q.is_empty() => q.to_owned(),
        _ => queues::dead_letter(queue),
    };
    if dlq == queue {
        return Err(format!("must differ from --{}", flag::QUEUE));
    }
    if dlq == queues::retry_ready(queue) {
        return Err(format!("{dlq} is the retry-ready queue of --{}", flag::QUEUE));
    }
    Ok(dlq)
}
