//! The operator↔worker contract, checked end to end without a cluster: every CRD example
//! (crds/examples/*.yaml) and every Integration fixture (operator/tests/fixtures/*.yaml) is rendered
//! through the operator's pod builder, and the container's args and env are parsed by the worker's own
//! parser (`hookfleet_worker::config`). Every field of the spec must arrive with its value; Secret
//! references are resolved to test values the way the kubelet would.
//!
//! A spec field that neither the worker receives nor the operator consumes itself fails
//! [`every_spec_field_is_checked`]: walk the spec's JSON, and every leaf must be on one of the two lists.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use hookfleet_crds::Integration;
use hookfleet_crds::contract;
use hookfleet_crds::integration::SecretKeyRef;
use hookfleet_operator::desired::{self, WorkerSettings};
use hookfleet_testkit::pki::TestCa;
use hookfleet_worker::auth;
use hookfleet_worker::config::{Args, Config};
use hookfleet_worker::template::{BodyTemplate, Extras};
use k8s_openapi::api::core::v1::{Container, Volume};

/// Spec fields (JSON paths, `[]` for any index, `{}` for any map key) the worker receives, each checked
/// in [`check`].
const TO_WORKER: &[&str] = &[
    "source.connectionSecretRef.name",
    "source.connectionSecretRef.key",
    "source.queue",
    "source.bindings[].exchange",
    "source.bindings[].routingKey",
    "source.prefetch",
    "source.queueType",
    "source.deliveryLimit",
    "destination.url",
    "destination.method",
    "destination.headers.{}",
    "destination.headersFrom[].name",
    "destination.headersFrom[].secretKeyRef.name",
    "destination.headersFrom[].secretKeyRef.key",
    "destination.timeout",
    "destination.body.template",
    "destination.signing.secretRef.name",
    "destination.signing.secretRef.key",
    "destination.signing.secretRefs[].name",
    "destination.signing.secretRefs[].key",
    "destination.auth.basic.usernameFrom.name",
    "destination.auth.basic.usernameFrom.key",
    "destination.auth.basic.passwordFrom.name",
    "destination.auth.basic.passwordFrom.key",
    "destination.auth.bearer.tokenFrom.name",
    "destination.auth.bearer.tokenFrom.key",
    "destination.auth.oauth2.tokenUrl",
    "destination.auth.oauth2.clientIdFrom.name",
    "destination.auth.oauth2.clientIdFrom.key",
    "destination.auth.oauth2.clientSecretFrom.name",
    "destination.auth.oauth2.clientSecretFrom.key",
    "destination.auth.oauth2.scopes[]",
    "destination.tls.caFrom.name",
    "destination.tls.caFrom.key",
    "destination.tls.clientCertSecret.name",
    "destination.allowPrivateNetworks",
    "delivery.maxAttempts",
    "delivery.backoff.initial",
    "delivery.backoff.max",
    "delivery.backoff.multiplier",
    "delivery.backoff.jitter",
    "delivery.concurrency",
    "delivery.rateLimit.perSecond",
    "delivery.rateLimit.burst",
    "delivery.rateLimit.scope",
    "delivery.circuitBreaker.failureThreshold",
    "delivery.circuitBreaker.cooldown",
    "delivery.adaptiveThrottle.minConcurrency",
    "delivery.adaptiveThrottle.window",
    "delivery.deadLetter.queue",
    "workers.fileDescriptorLimit",
];

/// Spec fields the operator consumes itself (the Deployment, its PodDisruptionBudget, the container's
/// resources): prefixes of JSON paths.
const OPERATOR_ONLY: &[&str] = &[
    "paused",
    "workers.replicas",
    "workers.autoscale.",
    "workers.disruption.",
    "workers.resources.",
];

fn integrations() -> Vec<(PathBuf, Integration)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in [root.join("../crds/examples"), root.join("tests/fixtures")] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension() == Some(OsStr::new("yaml")))
            .collect();
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            let raw: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
            if raw["kind"].as_str() != Some("Integration") {
                continue;
            }
            let mut intg: Integration =
                serde_yaml::from_value(raw).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Examples are written for `kubectl apply`: the API server would fill these in.
            intg.metadata.namespace.get_or_insert_with(|| "default".into());
            intg.metadata
                .uid
                .get_or_insert_with(|| "6f1c0a8e-0000-4000-8000-0000000000ff".into());
            out.push((path, intg));
        }
    }
    assert!(out.len() >= 5, "examples and fixtures found: {}", out.len());
    out
}

/// What the kubelet would put in a variable filled from `r`: distinct per reference.
fn secret_value(r: &SecretKeyRef, connection: &SecretKeyRef) -> String {
    if r == connection {
        format!("amqp://user:pw@rabbitmq-{}.example:5672/%2f", r.key)
    } else {
        format!("value-of-{}-{}", r.name, r.key)
    }
}

struct Parsed {
    container: Container,
    config: Config,
    /// Variables the worker's parser did not read, neither through clap nor its env lookup.
    unread: BTreeSet<String>,
    /// What the kubelet would mount from a Secret, by (Secret, key): the files the TLS flags name.
    files: BTreeMap<(String, String), Vec<u8>>,
    _dir: tempfile::TempDir,
}

/// The (Secret, key) a file path of the container comes from: its directory is a Secret volume's
/// mount, and its file name one of that volume's items.
fn mounted_from(container: &Container, volumes: &[Volume], path: &str) -> (String, String) {
    let (dir, file) = path.rsplit_once('/').expect("an absolute path");
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .unwrap_or_else(|| panic!("{path}: no volume is mounted at {dir}"));
    let volume = volumes
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("{path}: volume {} is not in the pod", mount.name));
    let secret = volume
        .secret
        .as_ref()
        .unwrap_or_else(|| panic!("{path}: volume {} is not a Secret", volume.name));
    let item = secret
        .items
        .iter()
        .flatten()
        .find(|i| i.path == file)
        .unwrap_or_else(|| panic!("{path}: no item of Secret volume {} is {file}", volume.name));
    (secret.secret_name.clone().unwrap(), item.key.clone())
}

/// Renders `intg` through the operator's pod builder and parses the container with the worker's parser.
fn render_and_parse(intg: &Integration) -> Parsed {
    let settings = WorkerSettings {
        image: "ghcr.io/hookfleet/worker:test".into(),
        image_pull_policy: None,
    };
    let d = desired::deployment(intg, &settings, 2).expect("pod builder");
    let pod = d.spec.unwrap().template.spec.unwrap();
    let container = pod.containers[0].clone();
    let volumes = pod.volumes.clone().unwrap_or_default();
    let cmd = Args::command();
    let mut argv = vec!["hookfleet-worker".to_string()];
    argv.extend(container.args.clone().unwrap_or_default());
    // The TLS flags name files in mounted Secrets: write what the kubelet would (PEM from a test CA) and
    // point the flags at them.
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("contract-ca").unwrap();
    let (cert, key) = ca.client("contract-client").unwrap();
    let mut files = BTreeMap::new();
    for (flag, pem) in [
        (contract::flag::TLS_CA_FILE, ca.ca_pem.clone()),
        (contract::flag::TLS_CLIENT_CERT_FILE, cert),
        (contract::flag::TLS_CLIENT_KEY_FILE, key),
    ] {
        let Some(i) = argv.iter().position(|a| *a == format!("--{flag}")) else {
            continue;
        };
        let from = mounted_from(&container, &volumes, &argv[i + 1]);
        let local = dir.path().join(flag);
        std::fs::write(&local, &pem).unwrap();
        argv[i + 1] = local.to_str().unwrap().to_owned();
        files.insert(from, pem.into_bytes());
    }
    // Variables clap reads become their flags (the test process's own environment stays out of it);
    // the rest go to the parser's env lookup, as in the pod.
    let mut rest = BTreeMap::new();
    let conn = &intg.spec.source.connection_secret_ref;
    for e in container.env.clone().unwrap_or_default() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(src)) => {
                let s = src
                    .secret_key_ref
                    .as_ref()
                    .unwrap_or_else(|| panic!("{}: only secretKeyRef sources are rendered", e.name));
                secret_value(
                    &SecretKeyRef {
                        name: s.name.clone(),
                        key: s.key.clone(),
                    },
                    conn,
                )
            }
            other => panic!("{}: value and valueFrom {other:?}", e.name),
        };
        match cmd
            .get_arguments()
            .find(|a| a.get_env() == Some(OsStr::new(&e.name)))
        {
            Some(arg) => {
                let long = arg.get_long().expect("every worker setting has a long flag");
                assert!(
                    !argv.contains(&format!("--{long}")),
                    "{} is rendered both as --{long} and as its variable",
                    e.name
                );
                argv.push(format!("--{long}"));
                argv.push(value);
            }
            None => {
                assert!(rest.insert(e.name.clone(), value).is_none(), "{} twice", e.name);
            }
        }
    }
    let read = RefCell::new(BTreeSet::new());
    let lookup = |k: &str| {
        read.borrow_mut().insert(k.to_owned());
        rest.get(k).cloned()
    };
    let args = Args::try_parse_from(&argv).unwrap_or_else(|e| panic!("the worker's flags: {e}\n{argv:?}"));
    let config = Config::from_args(args, &lookup).unwrap_or_else(|e| panic!("{e}\n{argv:?}"));
    let unread = rest
        .keys()
        .filter(|k| !read.borrow().contains(*k))
        .cloned()
        .collect();
    Parsed {
        container,
        config,
        unread,
        files,
        _dir: dir,
    }
}

fn go(d: &kube::core::Duration) -> Duration {
    (*d).into()
}

/// Parses `s` into the type of `_like` (reqwest's `Url` without naming the crate).
fn parse_like<T: FromStr>(_like: &T, s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().unwrap()
}

/// Field by field: what the worker parsed equals the spec.
fn check(intg: &Integration, p: &Parsed) {
    let spec = &intg.spec;
    let c = &p.config;
    let conn = &spec.source.connection_secret_ref;
    let ns = intg.metadata.namespace.as_deref().unwrap();
    let name = intg.metadata.name.as_deref().unwrap();
    assert_eq!(c.integration, format!("{ns}/{name}"));

    // source
    assert_eq!(c.amqp_uris, [secret_value(conn, conn)], "connectionSecretRef");
    assert_eq!(c.queue, spec.source.queue);
    let bindings: Vec<(String, String)> = spec
        .source
        .bindings
        .iter()
        .map(|b| (b.exchange.clone(), b.routing_key.clone()))
        .collect();
    assert_eq!(c.bindings, bindings, "bindings");
    assert_eq!(u32::from(c.prefetch), spec.source.prefetch);
    assert_eq!(c.queue_type, spec.source.queue_type);
    assert_eq!(c.delivery_limit, spec.source.delivery_limit);

    // destination
    let dst = &spec.destination;
    assert_eq!(c.destination, parse_like(&c.destination, &dst.url));
    assert_eq!(c.method, dst.method);
    let mut want: Vec<(String, String, bool)> = dst
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone(), false))
        .collect();
    want.extend(dst.headers_from.iter().map(|h| {
        (
            h.name.to_ascii_lowercase(),
            secret_value(&h.secret_key_ref, conn),
            true,
        )
    }));
    if let Some(auth) = &dst.auth {
        let value = |r: &SecretKeyRef| secret_value(r, conn);
        let header = match (&auth.basic, &auth.bearer) {
            (Some(b), _) => Some(auth::basic(&value(&b.username_from), &value(&b.password_from)).unwrap()),
            (None, Some(b)) => Some(auth::bearer(&value(&b.token_from)).unwrap()),
            (None, None) => None,
        };
        if let Some(h) = header {
            want.push(("authorization".into(), h.to_str().unwrap().to_owned(), true));
        }
        match &auth.oauth2 {
            None => assert!(c.oauth2.is_none(), "oauth2"),
            Some(o) => {
                let got = c.oauth2.as_ref().expect("oauth2 arrives");
                assert_eq!(
                    got.token_url.as_str(),
                    parse_like(&got.token_url, &o.token_url).as_str()
                );
                assert_eq!(got.client_id, value(&o.client_id_from), "oauth2 client id");
                assert_eq!(
                    got.client_secret,
                    value(&o.client_secret_from),
                    "oauth2 client secret"
                );
                assert_eq!(got.scopes, o.scopes, "oauth2 scopes");
            }
        }
    } else {
        assert!(c.oauth2.is_none(), "oauth2");
    }
    let file = |name: &str, key: &str| {
        p.files
            .get(&(name.to_owned(), key.to_owned()))
            .unwrap_or_else(|| panic!("Secret {name} key {key} is not mounted for the worker"))
            .clone()
    };
    assert_eq!(
        c.tls.ca_pem,
        dst.tls
            .as_ref()
            .and_then(|t| t.ca_from.as_ref())
            .map(|r| file(&r.name, &r.key)),
        "tls.caFrom"
    );
    assert_eq!(
        c.tls.identity_pem,
        dst.tls
            .as_ref()
            .and_then(|t| t.client_cert_secret.as_ref())
            .map(|s| {
                let mut pem = file(&s.name, "tls.crt");
                pem.push(b'\n');
                pem.extend(file(&s.name, "tls.key"));
                pem
            }),
        "tls.clientCertSecret"
    );
    let got: Vec<(String, String, bool)> = c
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                v.to_str().unwrap().to_owned(),
                v.is_sensitive(),
            )
        })
        .collect();
    assert_eq!(got, want, "headers (name, value, from a Secret)");
    assert_eq!(c.timeout, go(&dst.timeout), "timeout");
    match &dst.body {
        None => assert!(c.body_template.is_none()),
        Some(b) => {
            let ours = c.body_template.as_ref().expect("body template arrives");
            let theirs = BodyTemplate::compile(&b.template).unwrap();
            for body in [&br#"{"data": {"id": 7}, "device_id": "d-1"}"#[..], br#"{"a": 1}"#] {
                let x = Extras {
                    routing_key: "orders.created",
                    webhook_id: "msg_1",
                };
                assert_eq!(
                    format!("{:?}", ours.render(body, x)),
                    format!("{:?}", theirs.render(body, x)),
                    "the worker's template renders like spec.destination.body.template"
                );
            }
        }
    }
    let signing: Vec<Vec<u8>> = dst
        .signing
        .iter()
        .flat_map(|s| s.refs())
        .map(|r| secret_value(r, conn).into_bytes())
        .collect();
    assert_eq!(c.signing_secrets, signing, "signing secret");
    assert_eq!(c.allow_private_networks, dst.allow_private_networks);

    // delivery
    let d = &spec.delivery;
    assert_eq!(c.max_attempts, d.max_attempts);
    assert_eq!(c.backoff.initial, go(&d.backoff.initial), "backoff.initial");
    assert_eq!(c.backoff.max, go(&d.backoff.max), "backoff.max");
    assert_eq!(c.backoff.multiplier, d.backoff.multiplier);
    assert_eq!(c.backoff.jitter, d.backoff.jitter);
    assert_eq!(c.concurrency, d.concurrency as usize);
    assert_eq!(
        c.rate_limit,
        d.rate_limit
            .as_ref()
            .map(|r| (r.per_second, r.burst.unwrap_or(r.per_second)))
    );
    assert_eq!(
        c.rate_limit_scope,
        d.rate_limit.as_ref().map(|r| r.scope).unwrap_or_default(),
        "rateLimit.scope"
    );
    assert_eq!(
        c.circuit_breaker,
        (
            d.circuit_breaker.failure_threshold,
            go(&d.circuit_breaker.cooldown)
        ),
        "circuitBreaker"
    );
    assert_eq!(
        c.adaptive_throttle,
        d.adaptive_throttle
            .as_ref()
            .map(|t| (t.min_concurrency, go(&t.window))),
        "adaptiveThrottle"
    );
    let dlq = d
        .dead_letter
        .as_ref()
        .map(|dl| dl.queue.clone())
        .unwrap_or_else(|| format!("{}.dead", spec.source.queue));
    assert_eq!(c.dead_letter_queue, dlq);

    // workers
    assert_eq!(c.fd_limit, spec.workers.file_descriptor_limit as u64);

    // The rest of the contract: port, termination log, shutdown within the pod's grace period.
    assert_eq!(c.metrics_addr.port(), contract::METRICS_PORT);
    let ports = p.container.ports.clone().unwrap();
    assert_eq!(ports[0].container_port, i32::from(contract::METRICS_PORT));
    assert_eq!(
        p.container.termination_message_path.as_deref(),
        Some(c.termination_log.to_str().unwrap())
    );
    assert_eq!(
        c.shutdown_grace,
        Duration::from_secs(desired::shutdown_grace_seconds(intg) as u64)
    );
    assert!(c.shutdown_grace > c.timeout, "a delivery in flight can finish");
    assert!(
        p.unread.is_empty(),
        "variables in the pod the worker never reads: {:?}",
        p.unread
    );
}

#[test]
fn every_example_and_fixture_arrives_at_the_worker() {
    for (path, intg) in integrations() {
        eprintln!("{}", path.display());
        let parsed = render_and_parse(&intg);
        check(&intg, &parsed);
    }
}

/// Leaf paths of a JSON value: `[]` for array indices; map keys of `destination.headers` as `{}`.
fn leaves(v: &serde_json::Value, path: &str, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if path == "destination.headers" { "{}" } else { k };
                let p = if path.is_empty() {
                    key.to_string()
                } else {
                    format!("{path}.{key}")
                };
                leaves(v, &p, out);
            }
        }
        serde_json::Value::Array(a) => {
            for v in a {
                leaves(v, &format!("{path}[]"), out);
            }
        }
        _ => {
            out.insert(path.to_string());
        }
    }
}

#[test]
fn every_spec_field_is_checked() {
    let mut seen = BTreeSet::new();
    for (_, intg) in integrations() {
        leaves(&serde_json::to_value(&intg.spec).unwrap(), "", &mut seen);
    }
    let unchecked: Vec<&String> = seen
        .iter()
        .filter(|p| {
            !TO_WORKER.contains(&p.as_str())
                && !OPERATOR_ONLY.iter().any(|o| p.as_str() == *o || p.starts_with(o))
        })
        .collect();
    assert!(
        unchecked.is_empty(),
        "spec fields neither checked to arrive at the worker (TO_WORKER + check()) nor consumed by the \
         operator (OPERATOR_ONLY): {unchecked:?}"
    );
    // And the lists name no field the fixtures never set (so every check runs at least once).
    let never: Vec<&&str> = TO_WORKER.iter().filter(|f| !seen.contains(**f)).collect();
    assert!(
        never.is_empty(),
        "no example or fixture sets {never:?}: add one to operator/tests/fixtures/contract-edges.yaml"
    );
}
