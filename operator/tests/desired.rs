//! Desired objects from YAML fixtures (pure: no API server).

use hookfleet_crds::Integration;
use hookfleet_operator::desired::{self, WorkerSettings};
use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn fixture(name: &str) -> Integration {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn settings() -> WorkerSettings {
    WorkerSettings {
        image: "ghcr.io/hookfleet/worker:test".into(),
        image_pull_policy: None,
        pod_template: None,
    }
}

fn container(intg: &Integration, replicas: i32) -> (Container, k8s_openapi::api::core::v1::PodSpec) {
    let d = desired::deployment(intg, &settings(), replicas).unwrap();
    let pod = d.spec.unwrap().template.spec.unwrap();
    (pod.containers[0].clone(), pod)
}

/// The value following `--flag` (all values when repeated).
fn flag(args: &[String], f: &str) -> Vec<String> {
    args.windows(2)
        .filter(|w| w[0] == format!("--{f}"))
        .map(|w| w[1].clone())
        .collect()
}

#[test]
fn deployment_renders_the_worker_contract() {
    let intg = fixture("full.yaml");
    let d = desired::deployment(&intg, &settings(), 3).unwrap();
    let spec = d.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(3));
    let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.kind, "Integration");
    assert_eq!(owner.name, "orders-to-erp");
    assert_eq!(owner.controller, Some(true));
    assert_eq!(owner.uid, "6f1c0a8e-0000-4000-8000-000000000001");

    let (c, pod) = container(&intg, 3);
    assert_eq!(c.image.as_deref(), Some("ghcr.io/hookfleet/worker:test"));
    let args = c.args.clone().unwrap();
    assert_eq!(flag(&args, "integration"), ["team-a/orders-to-erp"]);
    assert_eq!(flag(&args, "queue"), ["orders.erp"]);
    assert_eq!(flag(&args, "binding"), ["device-events=orders.#"]);
    assert_eq!(flag(&args, "prefetch"), ["64"]);
    assert_eq!(flag(&args, "queue-type"), ["quorum"]);
    assert_eq!(flag(&args, "delivery-limit"), ["20"]);
    assert_eq!(
        flag(&args, "destination-url"),
        ["https://erp.example.com/hooks/orders"]
    );
    assert_eq!(flag(&args, "method"), ["PUT"]);
    assert_eq!(flag(&args, "header"), ["X-Source: hookfleet"]);
    assert_eq!(
        flag(&args, "header-from-env"),
        ["Authorization=HOOKFLEET_HEADER_0"]
    );
    assert_eq!(flag(&args, "timeout"), ["10s"]);
    assert_eq!(flag(&args, "max-attempts"), ["7"]);
    assert_eq!(flag(&args, "backoff-initial"), ["500ms"]);
    assert_eq!(flag(&args, "backoff-max"), ["600s"]);
    assert_eq!(flag(&args, "backoff-multiplier"), ["3"]);
    assert_eq!(flag(&args, "backoff-jitter"), ["equal"]);
    assert_eq!(flag(&args, "concurrency"), ["128"]);
    assert_eq!(flag(&args, "rate-limit"), ["200"]);
    assert_eq!(flag(&args, "rate-limit-burst"), ["200"]);
    assert_eq!(flag(&args, "dead-letter-queue"), ["orders.erp.dead"]);
    assert_eq!(flag(&args, "fd-limit"), ["65536"]);
    assert_eq!(flag(&args, "metrics-addr"), ["0.0.0.0:9090"]);
    assert_eq!(flag(&args, "shutdown-grace"), ["25s"]);
    assert_eq!(flag(&args, "termination-log"), ["/dev/termination-log"]);
    assert_eq!(flag(&args, "log-format"), ["json"]);
    assert!(!args.contains(&"--allow-private-networks".to_string()));

    // Secrets only by reference.
    let env = c.env.clone().unwrap();
    for (var, secret, key) in [
        ("HOOKFLEET_AMQP_URI", "rabbitmq", "uri"),
        ("HOOKFLEET_HEADER_0", "erp-token", "header"),
        ("HOOKFLEET_SIGNING_SECRET", "erp-signing", "secret"),
    ] {
        let e = env
            .iter()
            .find(|e| e.name == var)
            .unwrap_or_else(|| panic!("{var}"));
        assert!(e.value.is_none(), "{var} must not carry a value");
        let r = e.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((r.name.as_str(), r.key.as_str()), (secret, key));
    }
    let yaml = serde_yaml::to_string(&d).unwrap();
    assert!(!yaml.contains("amqp://"));

    // Restricted security context.
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
    let psc = pod.security_context.clone().unwrap();
    assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    assert_eq!(psc.run_as_non_root, Some(true));

    // Probes on the worker's endpoints, termination, spread, resources.
    let port = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let h = p.as_ref().unwrap().http_get.clone().unwrap();
        (h.path.unwrap(), h.port)
    };
    assert_eq!(
        port(&c.liveness_probe),
        ("/healthz".into(), IntOrString::String("metrics".into()))
    );
    assert_eq!(
        port(&c.readiness_probe),
        ("/readyz".into(), IntOrString::String("metrics".into()))
    );
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 9090);
    assert_eq!(
        c.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    assert_eq!(
        pod.termination_grace_period_seconds,
        Some(30),
        "10s timeout + 15s drain + 5s margin"
    );
    let keys: Vec<_> = pod
        .topology_spread_constraints
        .unwrap()
        .iter()
        .map(|t| t.topology_key.clone())
        .collect();
    assert_eq!(keys, ["kubernetes.io/hostname"]);
    // Zones through a preferred anti-affinity: a zone spread constraint on nodes without zone labels would
    // switch the scheduler's spreading off for every node.
    let zones = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| a.preferred_during_scheduling_ignored_during_execution.as_ref())
        .unwrap();
    assert_eq!(
        zones
            .iter()
            .map(|w| (w.weight, w.pod_affinity_term.topology_key.as_str()))
            .collect::<Vec<_>>(),
        [(100, "topology.kubernetes.io/zone")]
    );
    // The user's memory request is kept as written (no limit added).
    let r = c.resources.unwrap();
    let requests = r.requests.unwrap();
    assert_eq!(
        (requests["cpu"].0.as_str(), requests["memory"].0.as_str()),
        ("100m", "64Mi")
    );
    assert_eq!(r.limits, None);
    assert_eq!(pod.automount_service_account_token, Some(false));

    // Scrape annotations and the selector.
    let tmeta = spec.template.metadata.unwrap();
    assert_eq!(tmeta.annotations.unwrap()["prometheus.io/port"], "9090");
    let sel = spec.selector.match_labels.unwrap();
    for (k, v) in &sel {
        assert_eq!(
            tmeta.labels.as_ref().unwrap().get(k),
            Some(v),
            "template carries selector label {k}"
        );
    }
    assert_eq!(
        desired::selector_string("orders-to-erp"),
        "app.kubernetes.io/name=hookfleet-worker,hookfleet.io/integration=orders-to-erp"
    );
}

#[test]
fn defaults_render_and_nothing_optional_is_sent_as_null() {
    let intg = fixture("minimal.yaml");
    let d = desired::deployment(&intg, &settings(), 2).unwrap();
    let json = serde_json::to_string(&d).unwrap();
    assert!(
        !json.contains("null"),
        "server-side apply must not send nulls: {json}"
    );
    assert!(!json.contains("\"status\""));
    let (c, _) = container(&intg, 2);
    let args = c.args.unwrap();
    assert_eq!(flag(&args, "dead-letter-queue"), ["q.dead"]);
    assert_eq!(flag(&args, "fd-limit"), ["1048576"]);
    assert_eq!(flag(&args, "method"), ["POST"]);
    assert!(flag(&args, "rate-limit").is_empty());
    assert_eq!(flag(&args, "circuit-breaker-threshold"), ["20"]);
    assert_eq!(flag(&args, "circuit-breaker-cooldown"), ["10s"]);
    assert!(!args.contains(&"--adaptive-throttle".to_string()));
    assert!(flag(&args, "header-from-env").is_empty());
    assert_eq!(c.env.unwrap().len(), 1, "only the broker URI");
    for obj in [
        serde_json::to_string(&desired::pod_disruption_budget(&intg, 2).unwrap()).unwrap(),
        serde_json::to_string(&desired::metrics_service(&intg).unwrap()).unwrap(),
    ] {
        assert!(!obj.contains("null"), "{obj}");
    }
}

#[test]
fn pdb_min_available_defaults_to_replicas_minus_one_and_never_blocks_a_single_worker_or_an_empty_fleet() {
    let pdb = |f: &str| {
        desired::pod_disruption_budget(&fixture(f), 3)
            .unwrap()
            .spec
            .unwrap()
    };
    let full = pdb("full.yaml");
    assert_eq!(full.min_available, Some(IntOrString::Int(2)), "from spec");
    assert_eq!(full.unhealthy_pod_eviction_policy.as_deref(), Some("AlwaysAllow"));
    assert_eq!(pdb("minimal.yaml").min_available, Some(IntOrString::Int(1)));
    assert_eq!(pdb("single.yaml").min_available, Some(IntOrString::Int(0)));
    let mut auto = fixture("minimal.yaml");
    auto.spec.workers.autoscale = Some(serde_yaml::from_str("{min: 4, max: 9}").unwrap());
    assert_eq!(
        desired::pod_disruption_budget(&auto, 5)
            .unwrap()
            .spec
            .unwrap()
            .min_available,
        Some(IntOrString::Int(3))
    );
    // No worker wanted (suspended, destination gone): the budget asks for none, from the spec or not.
    for f in ["full.yaml", "minimal.yaml"] {
        let zero = desired::pod_disruption_budget(&fixture(f), 0)
            .unwrap()
            .spec
            .unwrap();
        assert_eq!(zero.min_available, Some(IntOrString::Int(0)), "{f}");
    }
}

#[test]
fn grace_period_follows_the_delivery_timeout() {
    let (c, pod) = container(&fixture("single.yaml"), 1);
    assert_eq!(pod.termination_grace_period_seconds, Some(110), "90s + 15s + 5s");
    assert_eq!(flag(&c.args.unwrap(), "shutdown-grace"), ["105s"]);
}

#[test]
fn metrics_service_selects_the_workers_and_is_owned() {
    let intg = fixture("full.yaml");
    let svc = desired::metrics_service(&intg).unwrap();
    assert_eq!(svc.metadata.name.as_deref(), Some("orders-to-erp-metrics"));
    assert_eq!(svc.metadata.owner_references.unwrap()[0].name, "orders-to-erp");
    let spec = svc.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.selector.unwrap(), desired::selector_labels("orders-to-erp"));
    assert_eq!(spec.ports.unwrap()[0].port, 9090);
}

/// Auth, TLS and several signing keys: every credential a `secretKeyRef` or a mounted Secret file,
/// never a literal in the pod spec.
#[test]
fn auth_tls_and_signing_keys_come_from_secrets() {
    let intg = fixture("auth-tls.yaml");
    let (c, pod) = container(&intg, 2);
    let args = c.args.clone().unwrap();
    assert_eq!(
        flag(&args, "signing-secret-env"),
        ["HOOKFLEET_SIGNING_SECRET_0", "HOOKFLEET_SIGNING_SECRET_1"]
    );
    assert_eq!(
        flag(&args, "oauth2-token-url"),
        ["https://login.example.com/token"]
    );
    assert_eq!(flag(&args, "oauth2-scope"), ["hooks.write", "hooks.read"]);
    assert_eq!(flag(&args, "tls-ca-file"), ["/etc/hookfleet/tls/ca/ca.crt"]);
    assert_eq!(
        flag(&args, "tls-client-cert-file"),
        ["/etc/hookfleet/tls/client/tls.crt"]
    );
    assert_eq!(
        flag(&args, "tls-client-key-file"),
        ["/etc/hookfleet/tls/client/tls.key"]
    );

    let env = c.env.clone().unwrap();
    for (var, secret, key) in [
        ("HOOKFLEET_SIGNING_SECRET", "signing-old", "secret"),
        ("HOOKFLEET_SIGNING_SECRET_0", "signing-new", "secret"),
        ("HOOKFLEET_SIGNING_SECRET_1", "signing-next", "secret"),
        ("HOOKFLEET_OAUTH2_CLIENT_ID", "partner-oauth", "id"),
        ("HOOKFLEET_OAUTH2_CLIENT_SECRET", "partner-oauth", "secret"),
    ] {
        let e = env
            .iter()
            .find(|e| e.name == var)
            .unwrap_or_else(|| panic!("{var}"));
        assert!(e.value.is_none(), "{var} must not carry a value");
        let r = e.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((r.name.as_str(), r.key.as_str()), (secret, key));
    }
    assert!(env.iter().all(|e| e.value.is_none()), "no literal env: {env:?}");

    let volumes = pod.volumes.clone().unwrap();
    let secret_of = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.secret.clone())
            .unwrap_or_else(|| panic!("volume {name}"))
    };
    let ca = secret_of("tls-ca");
    assert_eq!(ca.secret_name.as_deref(), Some("partner-ca"));
    let items = ca.items.unwrap();
    assert_eq!(
        (items[0].key.as_str(), items[0].path.as_str()),
        ("bundle.pem", "ca.crt")
    );
    let client = secret_of("tls-client");
    assert_eq!(client.secret_name.as_deref(), Some("partner-client"));
    let keys: Vec<String> = client.items.unwrap().into_iter().map(|i| i.key).collect();
    assert_eq!(keys, ["tls.crt", "tls.key"]);
    let mounts = c.volume_mounts.clone().unwrap();
    for (name, dir) in [
        ("tls-ca", "/etc/hookfleet/tls/ca"),
        ("tls-client", "/etc/hookfleet/tls/client"),
    ] {
        let m = mounts.iter().find(|m| m.name == name).unwrap();
        assert_eq!((m.mount_path.as_str(), m.read_only), (dir, Some(true)));
    }

    // Every referenced Secret is known to the Secret watch.
    let names = hookfleet_operator::secrets::referenced_names(&intg.spec);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "partner-ca",
            "partner-client",
            "partner-oauth",
            "rabbitmq",
            "signing-new",
            "signing-next",
            "signing-old"
        ]
    );
}

#[test]
fn basic_and_bearer_credentials_are_secret_refs() {
    let mut intg = fixture("auth-tls.yaml");
    let auth: hookfleet_crds::integration::AuthSpec = serde_yaml::from_str(
        "basic: {usernameFrom: {name: creds, key: user}, passwordFrom: {name: creds, key: pass}}",
    )
    .unwrap();
    intg.spec.destination.as_mut().unwrap().auth = Some(auth);
    let env = container(&intg, 2).0.env.unwrap();
    let refd = |var: &str| {
        let e = env.iter().find(|e| e.name == var).unwrap();
        assert!(e.value.is_none());
        let r = e.value_from.clone().unwrap().secret_key_ref.unwrap();
        (r.name, r.key)
    };
    assert_eq!(
        refd("HOOKFLEET_BASIC_AUTH_USERNAME"),
        ("creds".into(), "user".into())
    );
    assert_eq!(
        refd("HOOKFLEET_BASIC_AUTH_PASSWORD"),
        ("creds".into(), "pass".into())
    );
    intg.spec.destination.as_mut().unwrap().auth =
        Some(serde_yaml::from_str("bearer: {tokenFrom: {name: tok, key: t}}").unwrap());
    let env = container(&intg, 2).0.env.unwrap();
    let e = env.iter().find(|e| e.name == "HOOKFLEET_BEARER_TOKEN").unwrap();
    assert_eq!(e.value_from.clone().unwrap().secret_key_ref.unwrap().name, "tok");
}

/// Without a memory request or limit, both are rendered from the bound (issue 24): the same function
/// the worker's memory test measures against; other resources the user wrote are kept.
#[test]
fn memory_is_rendered_from_the_bound_unless_the_user_sets_it() {
    use hookfleet_crds::contract::memory;
    let memory_of = |intg: &Integration| {
        let r = container(intg, 2).0.resources.unwrap();
        let get = |m: Option<
            std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
        >| { m.and_then(|m| m.get("memory").map(|q| q.0.clone())) };
        (get(r.requests), get(r.limits))
    };
    // Defaults: 1 MiB messages, 128 MiB in flight, prefetch 64 on both lanes: 64 MiB + 2.5 × 128 MiB.
    let minimal = fixture("minimal.yaml");
    let want = memory::worker_memory_quantity(64, 1 << 20, 128 << 20);
    assert_eq!(want, "384Mi");
    assert_eq!(memory_of(&minimal), (Some(want.clone()), Some(want)));

    // 16 MiB messages: the prefetch is lowered to 4 per lane, the bound is the same 128 MiB.
    let mut large = minimal.clone();
    large.spec.source.max_message_bytes = 16 << 20;
    assert_eq!(memory_of(&large), (Some("384Mi".into()), Some("384Mi".into())));
    // A smaller budget: 32 MiB → 64 MiB + 80 MiB.
    large.spec.workers.in_flight_bytes = 32 << 20;
    assert_eq!(memory_of(&large), (Some("144Mi".into()), Some("144Mi".into())));

    // CPU only: kept, memory added.
    let mut cpu = minimal.clone();
    cpu.spec.workers.resources =
        Some(serde_json::from_value(serde_json::json!({"requests": {"cpu": "250m"}})).unwrap());
    let r = container(&cpu, 2).0.resources.unwrap();
    assert_eq!(r.requests.as_ref().unwrap()["cpu"].0, "250m");
    assert_eq!(r.requests.unwrap()["memory"].0, "384Mi");
    assert_eq!(r.limits.unwrap()["memory"].0, "384Mi");

    // A memory limit of the user's own: as written.
    let mut own = minimal.clone();
    own.spec.workers.resources =
        Some(serde_json::from_value(serde_json::json!({"limits": {"memory": "1Gi"}})).unwrap());
    assert_eq!(memory_of(&own), (None, Some("1Gi".into())));
}
