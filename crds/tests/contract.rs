//! The operator↔worker contract, both sides in one place: every CRD example (crds/examples/*.yaml) and
//! every operator fixture (operator/tests/fixtures/*.yaml) is built into the worker's setup
//! (`WorkerSetup::from_spec`), rendered into a container's args and env, given its values the way the
//! kubelet would, and parsed back with the worker's parser (`WorkerArgs`): what arrives equals what was
//! rendered, and every field of the spec arrives with its value.
//!
//! A spec field that neither the worker receives nor the operator consumes itself fails
//! [`every_spec_field_is_checked`]: walk the spec's JSON, and every leaf must be on one of the two lists.
//! (`operator/tests/contract.rs` checks that the operator's pod carries this setup; `worker/tests/contract.rs`
//! takes it through the worker's environment and file stage.)

use std::collections::BTreeSet;
use std::time::Duration;

use clap::Parser;
use hookfleet_crds::Integration;
use hookfleet_crds::contract::{self, FromSecret, Pod, WorkerArgs, WorkerSetup, env, queues};
use hookfleet_crds::integration::{SecretKeyRef, SourceSpec};
use hookfleet_crds::testing::{self, Started};

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
    "source.topology",
    "source.deliveryLimit",
    "source.nats.stream",
    "source.nats.subjects[]",
    "source.nats.ackWait",
    "source.nats.credentialsSecretRef.name",
    "source.nats.credentialsSecretRef.key",
    "source.nats.tokenSecretRef.name",
    "source.nats.tokenSecretRef.key",
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
    "webhooks.eventNameHeader",
    "webhooks.unmatched",
    "webhooks.allowPrivateNetworks",
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
    "source.maxMessageBytes",
    "workers.inFlightBytes",
];

/// Spec fields the operator consumes itself (the Deployment, its PodDisruptionBudget, the container's
/// resources): prefixes of JSON paths.
const OPERATOR_ONLY: &[&str] = &[
    "paused",
    "suspend",
    // The operator's queue finalizer (`deletionPolicy: Delete`); the worker only declares the queues.
    "source.deletionPolicy",
    "workers.replicas",
    "workers.autoscale.",
    "workers.disruption.",
    "workers.resources.",
];

/// A pod as the operator might describe it (the operator's own values are checked in its test).
fn pod(intg: &Integration) -> Pod {
    Pod {
        integration: testing::integration_name(intg),
        shutdown_grace: testing::shutdown_grace(intg),
        tls_ca_file: "/etc/tls/ca/ca.crt".into(),
        tls_client_cert_file: "/etc/tls/client/tls.crt".into(),
        tls_client_key_file: "/etc/tls/client/tls.key".into(),
        nats_creds_file: "/etc/nats/user.creds".into(),
    }
}

struct RoundTrip {
    pod: Pod,
    setup: WorkerSetup,
    started: Started,
    parsed: WorkerArgs,
}

/// `intg` through the contract: setup, rendered, started by the kubelet, parsed by the worker's parser.
fn round_trip(intg: &Integration) -> RoundTrip {
    let pod = pod(intg);
    let setup = WorkerSetup::from_spec(&intg.spec, &pod);
    let (args, env) = setup.render();
    let started = testing::kubelet(&args, &env, &intg.spec.source);
    let parsed = WorkerArgs::try_parse_from(&started.argv)
        .unwrap_or_else(|e| panic!("the worker's flags: {e}\n{:?}", started.argv));
    RoundTrip {
        pod,
        setup,
        started,
        parsed,
    }
}

/// The variable `var` of the started container is filled from `secret`.
fn from_secret(rt: &RoundTrip, conn: &SourceSpec, var: &str, secret: &SecretKeyRef) {
    assert_eq!(
        rt.started.env.get(var),
        Some(&testing::secret_value(secret, conn)),
        "{var} is filled from {secret:?}"
    );
}

/// Field by field: what the worker parsed equals the spec.
fn check(intg: &Integration, rt: &RoundTrip) {
    let spec = &intg.spec;
    let a = &rt.parsed;
    let checked = a
        .check()
        .unwrap_or_else(|e| panic!("the worker refuses what the operator renders: {e:?}"));
    let conn = &spec.source;
    assert_eq!(a.integration, testing::integration_name(intg));

    // source
    let connection = Some(testing::secret_value(&conn.connection_secret_ref, conn));
    let mut files = Vec::new();
    match &spec.source.nats {
        None => {
            assert_eq!(a.amqp_uri, connection, "connectionSecretRef");
            assert!(checked.nats.is_none());
        }
        Some(n) => {
            assert_eq!(
                (&a.amqp_uri, &a.nats_url),
                (&None, &connection),
                "connectionSecretRef: the NATS URLs"
            );
            let got = checked.nats.as_ref().expect("a NATS source arrives");
            assert_eq!(got.stream, n.stream, "nats.stream");
            assert_eq!(got.subjects, n.subjects, "nats.subjects");
            assert_eq!(a.nats_ack_wait, Duration::from(n.ack_wait), "nats.ackWait");
            if let Some(t) = &n.token_secret_ref {
                from_secret(rt, conn, env::NATS_TOKEN, t);
            }
            assert_eq!(
                a.nats_creds_file.as_ref().map(|p| p.display().to_string()),
                n.credentials_secret_ref
                    .as_ref()
                    .map(|_| rt.pod.nats_creds_file.clone()),
                "nats.credentialsSecretRef"
            );
            if let Some(c) = &n.credentials_secret_ref {
                files.push(FromSecret {
                    name: rt.pod.nats_creds_file.clone(),
                    secret: c.clone(),
                });
            }
        }
    }
    assert_eq!(a.queue.as_deref(), Some(spec.source.queue.as_str()));
    let bindings: Vec<(String, String)> = spec
        .source
        .bindings
        .iter()
        .map(|b| (b.exchange.clone(), b.routing_key.clone()))
        .collect();
    assert_eq!(checked.bindings, bindings, "bindings");
    assert_eq!(u32::from(a.prefetch), spec.source.prefetch);
    assert_eq!(a.queue_type, spec.source.queue_type);
    assert_eq!(a.topology, spec.source.topology);
    assert_eq!(a.delivery_limit, spec.source.delivery_limit);

    // destination
    let Some(dst) = &spec.destination else {
        // Webhooks: the snapshot Secret instead of destination flags, the event name's header, what
        // becomes of an unmatched message, private networks as the Integration says.
        let w = spec.webhooks.as_ref().expect("a destination or webhooks");
        assert_eq!(a.destination_url, None);
        assert_eq!(checked.destination, None);
        let name = a.integration.rsplit('/').next().unwrap();
        assert_eq!(
            checked.webhooks_secret,
            Some(hookfleet_crds::contract::webhooks::snapshot_secret(name))
        );
        assert_eq!(a.event_name_header, w.event_name_header);
        assert_eq!(a.unmatched, w.unmatched);
        assert_eq!(a.allow_private_networks, w.allow_private_networks);
        return;
    };
    assert_eq!(
        checked.destination.as_ref().unwrap().as_str(),
        url::Url::parse(&dst.url).unwrap().as_str()
    );
    assert_eq!(a.method, dst.method);
    let headers: Vec<(String, String)> = dst
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    assert_eq!(checked.headers, headers, "headers");
    assert_eq!(checked.headers_from_env.len(), dst.headers_from.len());
    for ((name, var), h) in checked.headers_from_env.iter().zip(&dst.headers_from) {
        assert_eq!(*name, h.name.to_ascii_lowercase(), "headersFrom name");
        from_secret(rt, conn, var, &h.secret_key_ref);
    }
    let auth = dst.auth.as_ref();
    if let Some(b) = auth.and_then(|a| a.basic.as_ref()) {
        from_secret(rt, conn, env::BASIC_AUTH_USERNAME, &b.username_from);
        from_secret(rt, conn, env::BASIC_AUTH_PASSWORD, &b.password_from);
    }
    if let Some(b) = auth.and_then(|a| a.bearer.as_ref()) {
        from_secret(rt, conn, env::BEARER_TOKEN, &b.token_from);
    }
    match auth.and_then(|a| a.oauth2.as_ref()) {
        None => assert!(checked.oauth2_token_url.is_none(), "oauth2"),
        Some(o) => {
            let got = checked.oauth2_token_url.as_ref().expect("oauth2 arrives");
            assert_eq!(got.as_str(), url::Url::parse(&o.token_url).unwrap().as_str());
            from_secret(rt, conn, env::OAUTH2_CLIENT_ID, &o.client_id_from);
            from_secret(rt, conn, env::OAUTH2_CLIENT_SECRET, &o.client_secret_from);
            assert_eq!(a.oauth2_scopes, o.scopes, "oauth2 scopes");
        }
    }
    let tls = dst.tls.as_ref();
    let ca = tls.and_then(|t| t.ca_from.as_ref());
    assert_eq!(
        a.tls_ca_file.as_ref().map(|p| p.display().to_string()),
        ca.map(|_| rt.pod.tls_ca_file.clone()),
        "tls.caFrom"
    );
    if let Some(ca) = ca {
        files.push(FromSecret {
            name: rt.pod.tls_ca_file.clone(),
            secret: ca.clone(),
        });
    }
    let client = tls.and_then(|t| t.client_cert_secret.as_ref());
    assert_eq!(
        (
            a.tls_client_cert_file.as_ref().map(|p| p.display().to_string()),
            a.tls_client_key_file.as_ref().map(|p| p.display().to_string())
        ),
        (
            client.map(|_| rt.pod.tls_client_cert_file.clone()),
            client.map(|_| rt.pod.tls_client_key_file.clone())
        ),
        "tls.clientCertSecret"
    );
    if let Some(c) = client {
        for (path, key) in [
            (&rt.pod.tls_client_cert_file, contract::TLS_SECRET_CERT),
            (&rt.pod.tls_client_key_file, contract::TLS_SECRET_KEY),
        ] {
            files.push(FromSecret {
                name: path.clone(),
                secret: SecretKeyRef {
                    name: c.name.clone(),
                    key: key.into(),
                },
            });
        }
    }
    assert_eq!(
        rt.setup.secret_files, files,
        "the files the TLS and NATS credentials flags name"
    );
    assert_eq!(a.timeout, Duration::from(dst.timeout), "timeout");
    assert_eq!(
        a.body_template,
        dst.body.as_ref().map(|b| b.template.clone()),
        "body template"
    );
    let signing = dst.signing.as_ref();
    if let Some(r) = signing.and_then(|s| s.secret_ref.as_ref()) {
        from_secret(rt, conn, env::SIGNING_SECRET, r);
    }
    let more: Vec<&SecretKeyRef> = signing
        .map(|s| s.secret_refs.iter().collect())
        .unwrap_or_default();
    assert_eq!(a.signing_secret_env.len(), more.len(), "signing.secretRefs");
    for (var, r) in a.signing_secret_env.iter().zip(more) {
        from_secret(rt, conn, var, r);
    }
    assert_eq!(a.allow_private_networks, dst.allow_private_networks);

    // delivery
    let d = &spec.delivery;
    assert_eq!(a.max_attempts, d.max_attempts);
    assert_eq!(
        a.backoff_initial,
        Duration::from(d.backoff.initial),
        "backoff.initial"
    );
    assert_eq!(a.backoff_max, Duration::from(d.backoff.max), "backoff.max");
    assert_eq!(a.backoff_multiplier, d.backoff.multiplier);
    assert_eq!(a.backoff_jitter, d.backoff.jitter);
    assert_eq!(a.concurrency, d.concurrency);
    let rate_limit = d.rate_limit.as_ref();
    assert_eq!(
        checked.rate_limit,
        rate_limit.map(|r| (r.per_second, r.burst.unwrap_or(r.per_second)))
    );
    assert_eq!(
        a.rate_limit_scope,
        rate_limit.map(|r| r.scope).unwrap_or_default(),
        "rateLimit.scope"
    );
    assert_eq!(
        (a.circuit_breaker_threshold, a.circuit_breaker_cooldown),
        (
            d.circuit_breaker.failure_threshold,
            Duration::from(d.circuit_breaker.cooldown)
        ),
        "circuitBreaker"
    );
    assert_eq!(
        checked.adaptive_throttle,
        d.adaptive_throttle
            .as_ref()
            .map(|t| (t.min_concurrency, Duration::from(t.window))),
        "adaptiveThrottle"
    );
    let dlq = match (&d.dead_letter, &spec.source.nats) {
        (Some(dl), _) => dl.queue.clone(),
        (None, Some(_)) => queues::nats_dead_letter(&spec.source.queue),
        (None, None) => queues::dead_letter(&spec.source.queue),
    };
    assert_eq!(checked.dead_letter_queue, dlq);

    // workers
    assert_eq!(a.fd_limit, spec.workers.file_descriptor_limit as u64);
    assert_eq!(a.in_flight_bytes, spec.workers.in_flight_bytes as u64);
    assert_eq!(a.max_message_bytes, spec.source.max_message_bytes);

    // The rest of the contract: port, termination log, shutdown within the pod's grace period.
    assert_eq!(a.metrics_addr.port(), contract::METRICS_PORT);
    assert_eq!(a.termination_log.to_str(), Some(contract::TERMINATION_LOG));
    assert_eq!(a.shutdown_grace, rt.pod.shutdown_grace);
    assert!(a.shutdown_grace > a.timeout, "a delivery in flight can finish");

    // Every variable the pod carries besides the flags' is one the worker reads.
    let mut read: BTreeSet<&str> = [
        env::SIGNING_SECRET,
        env::BASIC_AUTH_USERNAME,
        env::BASIC_AUTH_PASSWORD,
        env::BEARER_TOKEN,
        env::OAUTH2_CLIENT_ID,
        env::OAUTH2_CLIENT_SECRET,
        env::NATS_TOKEN,
    ]
    .into();
    read.extend(checked.headers_from_env.iter().map(|(_, var)| var.as_str()));
    read.extend(a.signing_secret_env.iter().map(String::as_str));
    let unread: Vec<&String> = rt
        .started
        .env
        .keys()
        .filter(|k| !read.contains(k.as_str()))
        .collect();
    assert!(
        unread.is_empty(),
        "variables in the pod the worker never reads: {unread:?}"
    );
}

#[test]
fn every_example_and_fixture_arrives_at_the_worker() {
    for (path, intg) in testing::integrations() {
        eprintln!("{}", path.display());
        let rt = round_trip(&intg);
        let mut rendered = rt.setup.args.clone();
        // The one value the kubelet fills in from a Secret that is also a flag's variable.
        let source = &intg.spec.source;
        let connection = Some(testing::secret_value(&source.connection_secret_ref, source));
        match source.nats {
            Some(_) => rendered.nats_url = connection,
            None => rendered.amqp_uri = connection,
        }
        assert_eq!(
            rt.parsed,
            rendered,
            "{}: parsed differs from rendered",
            path.display()
        );
        check(&intg, &rt);
        assert_eq!(hookfleet_crds::validate(&intg.spec), Ok(()), "{}", path.display());
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
    for (_, intg) in testing::integrations() {
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
