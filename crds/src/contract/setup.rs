//! [`WorkerSetup`]: what the operator hands one worker for an Integration, built from the spec
//! ([`WorkerSetup::from_spec`], pure) and written into the pod in one place ([`WorkerSetup::render`]).

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};

use super::{
    DEFAULT_METRICS_ADDR, LogFormat, TERMINATION_LOG, TLS_SECRET_CERT, TLS_SECRET_KEY, WorkerArgs, env,
};
use crate::integration::{DestinationSpec, IntegrationSpec, SecretKeyRef};

/// The destination of an Integration with Webhooks: none, only the defaults its settings fall back to.
fn no_destination() -> DestinationSpec {
    serde_json::from_value(serde_json::json!({"url": ""})).expect("a destination with defaults")
}

/// What the operator decides about the pod besides the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// `NAMESPACE/NAME` of the Integration.
    pub integration: String,
    /// Time in-flight deliveries get after SIGTERM (below the pod's termination grace period).
    pub shutdown_grace: Duration,
    /// Where the pod mounts `destination.tls.caFrom`.
    pub tls_ca_file: String,
    /// Where the pod mounts the certificate and the key of `destination.tls.clientCertSecret`.
    pub tls_client_cert_file: String,
    pub tls_client_key_file: String,
    /// Where the pod mounts `source.nats.credentialsSecretRef`.
    pub nats_creds_file: String,
}

impl Pod {
    /// No pod in particular: what the worker's arguments for a spec are, whatever pod runs them (the
    /// pod's settings never make a spec invalid and name no queue).
    pub fn any() -> Self {
        Pod {
            integration: String::new(),
            shutdown_grace: Duration::ZERO,
            tls_ca_file: String::new(),
            tls_client_cert_file: String::new(),
            tls_client_key_file: String::new(),
            nats_creds_file: String::new(),
        }
    }
}

/// A variable or a file whose content the kubelet takes from a Secret key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FromSecret {
    /// The variable's name, or the file's path.
    pub name: String,
    pub secret: SecretKeyRef,
}

/// The worker's arguments, and what the kubelet fills in from Secrets (credentials never travel as
/// flags or literal values).
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerSetup {
    pub args: WorkerArgs,
    /// Variables filled from Secret keys, in the order they are rendered.
    pub secret_env: Vec<FromSecret>,
    /// Files the TLS flags name, mounted from Secret keys.
    pub secret_files: Vec<FromSecret>,
}

impl WorkerSetup {
    /// The worker's setup for `spec` in a pod described by `pod`.
    pub fn from_spec(spec: &IntegrationSpec, pod: &Pod) -> Self {
        let secret = |name: String, secret: &SecretKeyRef| FromSecret {
            name,
            secret: secret.clone(),
        };
        // With Webhooks there is no destination here: each Webhook's comes in the snapshot, through
        // [`WorkerSetup::for_webhook`].
        let none = no_destination();
        let (source, dst, d) = (
            &spec.source,
            spec.destination.as_ref().unwrap_or(&none),
            &spec.delivery,
        );
        // The connection Secret holds the broker URIs, or with `source.nats` the NATS server URLs.
        let nats = source.nats.as_ref();
        let url_var = if nats.is_some() {
            env::NATS_URL
        } else {
            env::AMQP_URI
        };
        let mut secret_env = vec![secret(url_var.into(), &source.connection_secret_ref)];
        if let Some(token) = nats.and_then(|n| n.token_secret_ref.as_ref()) {
            secret_env.push(secret(env::NATS_TOKEN.into(), token));
        }
        let mut header_from_env = Vec::new();
        for (i, h) in dst.headers_from.iter().enumerate() {
            let var = env::header(i);
            header_from_env.push(format!("{}={var}", h.name));
            secret_env.push(secret(var, &h.secret_key_ref));
        }
        let mut signing_secret_env = Vec::new();
        if let Some(signing) = &dst.signing {
            if let Some(r) = &signing.secret_ref {
                secret_env.push(secret(env::SIGNING_SECRET.into(), r));
            }
            for (i, r) in signing.secret_refs.iter().enumerate() {
                let var = env::signing_secret(i);
                signing_secret_env.push(var.clone());
                secret_env.push(secret(var, r));
            }
        }
        let auth = dst.auth.as_ref();
        if let Some(b) = auth.and_then(|a| a.basic.as_ref()) {
            secret_env.push(secret(env::BASIC_AUTH_USERNAME.into(), &b.username_from));
            secret_env.push(secret(env::BASIC_AUTH_PASSWORD.into(), &b.password_from));
        }
        if let Some(b) = auth.and_then(|a| a.bearer.as_ref()) {
            secret_env.push(secret(env::BEARER_TOKEN.into(), &b.token_from));
        }
        let oauth2 = auth.and_then(|a| a.oauth2.as_ref());
        if let Some(o) = oauth2 {
            secret_env.push(secret(env::OAUTH2_CLIENT_ID.into(), &o.client_id_from));
            secret_env.push(secret(env::OAUTH2_CLIENT_SECRET.into(), &o.client_secret_from));
        }
        let mut secret_files = Vec::new();
        let nats_creds_file = nats.and_then(|n| n.credentials_secret_ref.as_ref()).map(|c| {
            secret_files.push(secret(pod.nats_creds_file.clone(), c));
            PathBuf::from(&pod.nats_creds_file)
        });
        let tls = dst.tls.as_ref();
        let tls_ca_file = tls.and_then(|t| t.ca_from.as_ref()).map(|ca| {
            secret_files.push(secret(pod.tls_ca_file.clone(), ca));
            PathBuf::from(&pod.tls_ca_file)
        });
        let client = tls.and_then(|t| t.client_cert_secret.as_ref());
        let (tls_client_cert_file, tls_client_key_file) = match client {
            None => (None, None),
            Some(c) => {
                for (path, key) in [
                    (&pod.tls_client_cert_file, TLS_SECRET_CERT),
                    (&pod.tls_client_key_file, TLS_SECRET_KEY),
                ] {
                    let r = SecretKeyRef {
                        name: c.name.clone(),
                        key: key.into(),
                    };
                    secret_files.push(secret(path.clone(), &r));
                }
                (
                    Some(PathBuf::from(&pod.tls_client_cert_file)),
                    Some(PathBuf::from(&pod.tls_client_key_file)),
                )
            }
        };
        let rate_limit = d.rate_limit.as_ref();
        let throttle = d.adaptive_throttle.as_ref();
        let args = WorkerArgs {
            integration: pod.integration.clone(),
            amqp_uri: None,
            amqp_uri_file: None,
            queue: Some(source.queue.clone()),
            bindings: source
                .bindings
                .iter()
                .map(|b| format!("{}={}", b.exchange, b.routing_key))
                .collect(),
            // The CRD bounds it to `limits::PREFETCH`, which fits (a test says so).
            prefetch: u16::try_from(source.prefetch).unwrap_or(u16::MAX),
            queue_type: source.queue_type,
            topology: source.topology,
            delivery_limit: source.delivery_limit,
            destination_url: spec.destination.as_ref().map(|d| d.url.clone()),
            webhooks_secret: spec.webhooks.as_ref().map(|_| {
                let name = pod.integration.rsplit('/').next().unwrap_or_default();
                super::webhooks::snapshot_secret(name)
            }),
            event_name_header: spec.webhooks.as_ref().and_then(|w| w.event_name_header.clone()),
            unmatched: spec.webhooks.as_ref().map(|w| w.unmatched).unwrap_or_default(),
            method: dst.method,
            headers: dst.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect(),
            header_from_env,
            signing_secret_env,
            oauth2_token_url: oauth2.map(|o| o.token_url.clone()),
            oauth2_scopes: oauth2.map(|o| o.scopes.clone()).unwrap_or_default(),
            tls_ca_file,
            tls_client_cert_file,
            tls_client_key_file,
            body_template: dst.body.as_ref().map(|b| b.template.clone()),
            timeout: dst.timeout.into(),
            max_attempts: d.max_attempts,
            backoff_initial: d.backoff.initial.into(),
            backoff_max: d.backoff.max.into(),
            backoff_multiplier: d.backoff.multiplier,
            backoff_jitter: d.backoff.jitter,
            concurrency: d.concurrency,
            rate_limit: rate_limit.map(|r| r.per_second),
            rate_limit_burst: rate_limit.map(|r| r.burst.unwrap_or(r.per_second)),
            rate_limit_scope: rate_limit.map(|r| r.scope).unwrap_or_default(),
            circuit_breaker_threshold: d.circuit_breaker.failure_threshold,
            circuit_breaker_cooldown: d.circuit_breaker.cooldown.into(),
            adaptive_throttle: throttle.is_some(),
            adaptive_throttle_min: throttle.map(|t| t.min_concurrency),
            adaptive_throttle_window: throttle.map(|t| t.window.into()),
            confirm_timeout: super::args::default_confirm_timeout(),
            dead_letter_queue: Some(match (&d.dead_letter, nats) {
                (Some(dl), _) => dl.queue.clone(),
                (None, Some(_)) => super::queues::nats_dead_letter(&source.queue),
                (None, None) => super::queues::dead_letter(&source.queue),
            }),
            // The CRD bounds it to `limits::FILE_DESCRIPTOR_LIMIT`: never negative.
            fd_limit: u64::try_from(spec.workers.file_descriptor_limit).unwrap_or_default(),
            allow_private_networks: match &spec.webhooks {
                Some(w) => w.allow_private_networks,
                None => dst.allow_private_networks,
            },
            metrics_addr: DEFAULT_METRICS_ADDR.parse().expect("a socket address (tested)"),
            shutdown_grace: pod.shutdown_grace,
            termination_log: TERMINATION_LOG.into(),
            log_format: LogFormat::Json,
            max_message_bytes: source.max_message_bytes,
            // The CRD bounds it to `limits::IN_FLIGHT_BYTES`: never negative.
            in_flight_bytes: u64::try_from(spec.workers.in_flight_bytes).unwrap_or_default(),
            // The URLs come from the connection Secret, in the environment (`secret_env`).
            nats_url: None,
            nats_url_file: None,
            nats_stream: nats.map(|n| n.stream.clone()),
            nats_subjects: nats.map(|n| n.subjects.clone()).unwrap_or_default(),
            nats_creds_file,
            nats_ack_wait: nats
                .map(|n| n.ack_wait)
                .unwrap_or_else(crate::integration::default_nats_ack_wait)
                .into(),
        };
        Self {
            args,
            secret_env,
            secret_files,
        }
    }

    /// The setup of one Webhook's destination, as the worker builds it from the snapshot: the
    /// destination's flags are those of an Integration with that `destination` (so a Webhook is checked
    /// and built by the same code as a single destination), private networks as its Integration says;
    /// the Secret-filled variables and files are looked up in the snapshot entry
    /// ([`super::webhooks::Entry::secrets`]), the files under the [`super::webhooks::TLS_CA_FILE`] paths.
    pub fn for_webhook(dst: &DestinationSpec, allow_private_networks: bool) -> Self {
        let mut dst = dst.clone();
        dst.allow_private_networks = allow_private_networks;
        let mut spec: IntegrationSpec = serde_json::from_value(serde_json::json!({
            "source": {"connectionSecretRef": {"name": "-", "key": "-"}, "queue": "webhook"},
        }))
        .expect("a minimal spec");
        spec.destination = Some(dst);
        let pod = Pod {
            integration: String::new(),
            shutdown_grace: Duration::ZERO,
            tls_ca_file: super::webhooks::TLS_CA_FILE.into(),
            tls_client_cert_file: super::webhooks::TLS_CLIENT_CERT_FILE.into(),
            tls_client_key_file: super::webhooks::TLS_CLIENT_KEY_FILE.into(),
            nats_creds_file: String::new(),
        };
        let mut setup = Self::from_spec(&spec, &pod);
        setup.secret_env.retain(|e| e.name != env::AMQP_URI);
        setup
    }

    /// Every Secret key the setup reads (variables and files).
    pub fn secret_refs(&self) -> impl Iterator<Item = &SecretKeyRef> {
        self.secret_env
            .iter()
            .chain(&self.secret_files)
            .map(|f| &f.secret)
    }

    /// The container's arguments and environment: the flags of [`WorkerArgs::to_argv`], and each
    /// Secret-filled variable as a `secretKeyRef` (no secret value appears here).
    pub fn render(&self) -> (Vec<String>, Vec<EnvVar>) {
        let env = self
            .secret_env
            .iter()
            .map(|e| EnvVar {
                name: e.name.clone(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: e.secret.name.clone(),
                        key: e.secret.key.clone(),
                        optional: None,
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            })
            .collect();
        (self.args.to_argv(), env)
    }
}
