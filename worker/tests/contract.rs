//! The worker's side of the operator↔worker contract: every CRD example and operator fixture is built
//! and rendered by the contract (`WorkerSetup`), started the way the kubelet would start it (values of
//! the Secret-filled variables, the TLS files written where the flags point), and read by the worker's
//! configuration stage (`Config::from_args`). What only the environment and files carry (broker URIs,
//! headers from Secrets, credentials, signing secrets, PEM) arrives with the spec's values, and every
//! variable in the pod is one the worker reads. (That each flag carries its spec field is
//! `crds/tests/contract.rs`; that the operator's pod carries the setup is `operator/tests/contract.rs`.)

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use clap::Parser;
use hookfleet_crds::Integration;
use hookfleet_crds::contract::{self, Pod, WorkerArgs, WorkerSetup};
use hookfleet_crds::integration::SecretKeyRef;
use hookfleet_crds::testing;
use hookfleet_testkit::pki::TestCa;
use hookfleet_worker::auth;
use hookfleet_worker::config::Config;
use hookfleet_worker::template::{BodyTemplate, Extras};

struct Parsed {
    setup: WorkerSetup,
    config: Config,
    /// Variables the worker's parser did not read, neither through clap nor its env lookup.
    unread: BTreeSet<String>,
    /// What the kubelet mounted from a Secret, by (Secret, key).
    files: BTreeMap<(String, String), Vec<u8>>,
    _dir: tempfile::TempDir,
}

/// `intg` through the contract and the kubelet into the worker's configuration.
fn start(intg: &Integration) -> Parsed {
    let dir = tempfile::tempdir().unwrap();
    let at = |f: &str| dir.path().join(f).to_str().unwrap().to_owned();
    let pod = Pod {
        integration: testing::integration_name(intg),
        shutdown_grace: testing::shutdown_grace(intg),
        tls_ca_file: at("ca.crt"),
        tls_client_cert_file: at("tls.crt"),
        tls_client_key_file: at("tls.key"),
        nats_creds_file: at("user.creds"),
    };
    let setup = WorkerSetup::from_spec(&intg.spec, &pod);
    // What the kubelet mounts: PEM from a test CA, at the paths the TLS flags name.
    let ca = TestCa::new("contract-ca").unwrap();
    let (cert, key) = ca.client("contract-client").unwrap();
    let mut files = BTreeMap::new();
    for f in &setup.secret_files {
        let pem = match f.name.as_str() {
            p if p == pod.tls_ca_file => ca.ca_pem.clone(),
            p if p == pod.tls_client_cert_file => cert.clone(),
            p if p == pod.tls_client_key_file => key.clone(),
            // Its content is read when the worker connects (worker/tests/nats.rs), not at start.
            p if p == pod.nats_creds_file => "-----BEGIN NATS USER JWT-----\n".to_owned(),
            other => panic!("{other}: a file the pod does not mount"),
        };
        std::fs::write(&f.name, &pem).unwrap();
        files.insert((f.secret.name.clone(), f.secret.key.clone()), pem.into_bytes());
    }
    let (args, env) = setup.render();
    let started = testing::kubelet(&args, &env, &intg.spec.source);
    let read = RefCell::new(BTreeSet::new());
    let lookup = |k: &str| {
        read.borrow_mut().insert(k.to_owned());
        started.env.get(k).cloned()
    };
    let args = WorkerArgs::try_parse_from(&started.argv)
        .unwrap_or_else(|e| panic!("the worker's flags: {e}\n{:?}", started.argv));
    let config = Config::from_args(args, &lookup).unwrap_or_else(|e| panic!("{e}\n{:?}", started.argv));
    let unread = started
        .env
        .keys()
        .filter(|k| !read.borrow().contains(*k))
        .cloned()
        .collect();
    Parsed {
        setup,
        config,
        unread,
        files,
        _dir: dir,
    }
}

/// What the worker made of the environment and files equals the spec; the rest equals the flags.
fn check(intg: &Integration, p: &Parsed) {
    let spec = &intg.spec;
    let c = &p.config;
    let conn = &spec.source.connection_secret_ref;
    let value = |r: &SecretKeyRef| testing::secret_value(r, &spec.source);
    match (&spec.source.nats, &c.nats) {
        (None, None) => assert_eq!(c.amqp_uris, [value(conn)], "connectionSecretRef"),
        (Some(n), Some(got)) => {
            assert!(c.amqp_uris.is_empty(), "a NATS source has no broker URI");
            assert_eq!(got.urls, [value(conn)], "connectionSecretRef: the NATS URLs");
            assert_eq!(got.stream, n.stream, "nats.stream");
            assert_eq!(got.subjects, n.subjects, "nats.subjects");
            assert_eq!(
                got.ack_wait,
                std::time::Duration::from(n.ack_wait),
                "nats.ackWait"
            );
            assert_eq!(
                got.token,
                n.token_secret_ref.as_ref().map(value),
                "nats.tokenSecretRef"
            );
            let creds = n.credentials_secret_ref.as_ref().map(|r| {
                let file = got.creds_file.as_ref().expect("the credentials file arrives");
                (
                    std::fs::read(file).unwrap(),
                    p.files[&(r.name.clone(), r.key.clone())].clone(),
                )
            });
            if let Some((read, mounted)) = creds {
                assert_eq!(read, mounted, "nats.credentialsSecretRef: the mounted file");
            } else {
                assert!(got.creds_file.is_none());
            }
        }
        (want, got) => panic!("source.nats {want:?}, the worker's {got:?}"),
    }

    // Webhooks: no destination here; the snapshot's Secret, how events are named and matched, and
    // private networks for all of them (each Webhook's destination is built from the snapshot, by
    // the same builder: tests/webhooks.rs and the worker's unit tests).
    let Some(dst) = &spec.destination else {
        let w = spec.webhooks.as_ref().expect("a destination or webhooks");
        let mode = c.webhooks.as_ref().expect("webhook mode");
        assert!(c.destination.is_none(), "no single destination");
        let (namespace, name) = p.setup.args.integration.split_once('/').unwrap();
        assert_eq!(mode.secret, contract::webhooks::snapshot_secret(name));
        assert_eq!(mode.namespace, namespace);
        assert_eq!(mode.event_name_header, w.event_name_header);
        assert_eq!(mode.unmatched, w.unmatched);
        assert_eq!(c.allow_private_networks, w.allow_private_networks);
        assert_eq!(Some(c.queue.as_str()), p.setup.args.queue.as_deref());
        assert!(
            p.unread.is_empty(),
            "variables in the pod the worker never reads: {:?}",
            p.unread
        );
        return;
    };
    let d = c.dest();
    let mut want: Vec<(String, String, bool)> = dst
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone(), false))
        .collect();
    want.extend(
        dst.headers_from
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), value(&h.secret_key_ref), true)),
    );
    if let Some(auth) = &dst.auth {
        let header = match (&auth.basic, &auth.bearer) {
            (Some(b), _) => Some(auth::basic(&value(&b.username_from), &value(&b.password_from)).unwrap()),
            (None, Some(b)) => Some(auth::bearer(&value(&b.token_from)).unwrap()),
            (None, None) => None,
        };
        if let Some(h) = header {
            want.push(("authorization".into(), h.to_str().unwrap().to_owned(), true));
        }
    }
    let got: Vec<(String, String, bool)> = d
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
    match dst.auth.as_ref().and_then(|a| a.oauth2.as_ref()) {
        None => assert!(d.oauth2.is_none(), "oauth2"),
        Some(o) => {
            let got = d.oauth2.as_ref().expect("oauth2 arrives");
            assert_eq!(
                got.token_url.as_str(),
                o.token_url.parse::<reqwest::Url>().unwrap().as_str()
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
    let file = |name: &str, key: &str| {
        p.files
            .get(&(name.to_owned(), key.to_owned()))
            .unwrap_or_else(|| panic!("Secret {name} key {key} is not mounted for the worker"))
            .clone()
    };
    let tls = dst.tls.as_ref();
    assert_eq!(
        d.tls.ca_pem,
        tls.and_then(|t| t.ca_from.as_ref())
            .map(|r| file(&r.name, &r.key)),
        "tls.caFrom"
    );
    assert_eq!(
        d.tls.identity_pem,
        tls.and_then(|t| t.client_cert_secret.as_ref()).map(|s| {
            let mut pem = file(&s.name, contract::TLS_SECRET_CERT);
            pem.push(b'\n');
            pem.extend(file(&s.name, contract::TLS_SECRET_KEY));
            pem
        }),
        "tls.clientCertSecret"
    );
    match &dst.body {
        None => assert!(d.body_template.is_none()),
        Some(b) => {
            let ours = d.body_template.as_ref().expect("body template arrives");
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
        .map(|r| value(r).into_bytes())
        .collect();
    assert_eq!(d.signing_secrets, signing, "signing secret");

    // The flags' settings arrive as parsed (their values are crds/tests/contract.rs's).
    let a = &p.setup.args;
    assert_eq!(c.integration, a.integration);
    assert_eq!(Some(c.queue.as_str()), a.queue.as_deref());
    assert_eq!(d.url.as_str(), dst.url.parse::<reqwest::Url>().unwrap().as_str());
    assert_eq!(
        (c.prefetch, c.queue_type, c.delivery_limit, d.method),
        (a.prefetch, a.queue_type, a.delivery_limit, a.method)
    );
    assert_eq!(
        (d.timeout, c.max_attempts, c.concurrency),
        (a.timeout, a.max_attempts, a.concurrency as usize)
    );
    assert_eq!(
        (
            c.backoff.initial,
            c.backoff.max,
            c.backoff.multiplier,
            c.backoff.jitter
        ),
        (
            a.backoff_initial,
            a.backoff_max,
            a.backoff_multiplier,
            a.backoff_jitter
        )
    );
    assert_eq!(c.rate_limit_scope, a.rate_limit_scope);
    assert_eq!(
        c.circuit_breaker,
        (a.circuit_breaker_threshold, a.circuit_breaker_cooldown)
    );
    assert_eq!(Some(&c.dead_letter_queue), a.dead_letter_queue.as_ref());
    assert_eq!(
        (c.fd_limit, c.allow_private_networks),
        (a.fd_limit, a.allow_private_networks)
    );
    assert_eq!(
        (c.max_message_bytes, c.in_flight_bytes),
        (a.max_message_bytes as usize, a.in_flight_bytes)
    );
    assert_eq!(c.metrics_addr.port(), contract::METRICS_PORT);
    assert_eq!(c.termination_log.to_str(), Some(contract::TERMINATION_LOG));
    assert_eq!(c.shutdown_grace, a.shutdown_grace);
    assert!(c.shutdown_grace > d.timeout, "a delivery in flight can finish");
    assert!(
        p.unread.is_empty(),
        "variables in the pod the worker never reads: {:?}",
        p.unread
    );
}

#[test]
fn every_example_and_fixture_configures_the_worker() {
    for (path, intg) in testing::integrations() {
        eprintln!("{}", path.display());
        check(&intg, &start(&intg));
    }
}
