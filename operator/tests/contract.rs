//! The operator's side of the operator↔worker contract, checked without a cluster: every CRD example
//! (crds/examples/*.yaml) and every Integration fixture (operator/tests/fixtures/*.yaml) is rendered
//! through the operator's pod builder, and the container's args and env are parsed by the worker's
//! parser (`hookfleet_crds::contract::WorkerArgs`). The container carries exactly the contract's setup
//! for the spec (`WorkerSetup::from_spec`); every file a flag names is mounted from the Secret key the
//! contract says; the port, the termination message path and the shutdown grace agree with the pod.
//!
//! That each spec field arrives with its value, and that no spec field goes unchecked, is
//! `crds/tests/contract.rs`; what the worker makes of its environment and files, `worker/tests/contract.rs`.
//! The same container with `kubectl hookfleet test-delivery`'s arguments in front parses to the same worker
//! arguments.

use std::path::Path;
use std::time::Duration;

use clap::Parser;
use hookfleet_crds::Integration;
use hookfleet_crds::contract::test_delivery::{self, TestDeliveryArgs};
use hookfleet_crds::contract::{self, Pod, WorkerArgs, WorkerSetup};
use hookfleet_crds::testing;
use hookfleet_operator::desired::{self, WorkerSettings};
use k8s_openapi::api::core::v1::{Container, Volume};

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

fn path(p: &Option<impl AsRef<Path>>) -> String {
    p.as_ref()
        .map(|p| p.as_ref().display().to_string())
        .unwrap_or_default()
}

/// Renders `intg` through the operator's pod builder and checks the container against the contract.
fn check(intg: &Integration) {
    let settings = WorkerSettings {
        image: "ghcr.io/hookfleet/worker:test".into(),
        image_pull_policy: None,
        pod_template: None,
    };
    let d = desired::deployment(intg, &settings, 2).expect("pod builder");
    let pod = d.spec.unwrap().template.spec.unwrap();
    let container = pod.containers[0].clone();
    let volumes = pod.volumes.clone().unwrap_or_default();
    let (args, env) = (
        container.args.clone().unwrap_or_default(),
        container.env.clone().unwrap_or_default(),
    );
    let source = &intg.spec.source;
    let started = testing::kubelet(&args, &env, source);
    let parsed = WorkerArgs::try_parse_from(&started.argv)
        .unwrap_or_else(|e| panic!("the worker's flags: {e}\n{:?}", started.argv));

    // The pod carries the contract's setup for this spec in this pod (where the pod mounts the TLS
    // files is the operator's choice: checked below against the volumes).
    let grace = Duration::from_secs(desired::shutdown_grace_seconds(intg) as u64);
    let want = WorkerSetup::from_spec(
        &intg.spec,
        &Pod {
            integration: testing::integration_name(intg),
            shutdown_grace: grace,
            tls_ca_file: path(&parsed.tls_ca_file),
            tls_client_cert_file: path(&parsed.tls_client_cert_file),
            tls_client_key_file: path(&parsed.tls_client_key_file),
            nats_creds_file: path(&parsed.nats_creds_file),
        },
    );
    assert_eq!(
        (args, env),
        want.render(),
        "the container is the contract's rendering"
    );
    let mut rendered = want.args.clone();
    let connection = Some(testing::secret_value(&source.connection_secret_ref, source));
    match source.nats {
        Some(_) => rendered.nats_url = connection,
        None => rendered.amqp_uri = connection,
    }
    assert_eq!(parsed, rendered, "the worker parses what was rendered");

    // `kubectl hookfleet test-delivery` runs this container with the one-shot's arguments in front: the
    // worker's part still parses to what was rendered.
    let test = TestDeliveryArgs {
        event: Some("orders.created".into()),
        body: Some(r#"{"data": {"n": 1}}"#.into()),
        ..TestDeliveryArgs::default()
    };
    let one_shot = testing::kubelet(
        &test.to_argv(container.args.as_deref().unwrap_or_default()),
        container.env.as_deref().unwrap_or_default(),
        source,
    );
    let (mine, theirs) = test_delivery::split(&one_shot.argv[1..]).expect("the subcommand first");
    let mine = TestDeliveryArgs::try_parse_from(std::iter::once("t".to_owned()).chain(mine));
    assert_eq!(mine.expect("the one-shot's flags"), test);
    let theirs = WorkerArgs::try_parse_from(std::iter::once("hookfleet-worker".to_owned()).chain(theirs));
    assert_eq!(
        theirs.expect("the worker's flags"),
        rendered,
        "the one-shot reads the worker's configuration"
    );

    // Each file the TLS flags name is mounted from the Secret key the contract says.
    for f in &want.secret_files {
        assert_eq!(
            mounted_from(&container, &volumes, &f.name),
            (f.secret.name.clone(), f.secret.key.clone()),
            "{}",
            f.name
        );
    }

    // The rest of the contract: port, termination log, shutdown within the pod's grace period.
    assert_eq!(parsed.metrics_addr.port(), contract::METRICS_PORT);
    let ports = container.ports.clone().unwrap();
    assert_eq!(ports[0].container_port, i32::from(contract::METRICS_PORT));
    assert_eq!(
        container.termination_message_path.as_deref(),
        Some(parsed.termination_log.to_str().unwrap())
    );
    assert_eq!(parsed.shutdown_grace, grace);
    assert!(
        parsed.shutdown_grace > parsed.timeout,
        "a delivery in flight can finish"
    );
}

#[test]
fn every_example_and_fixture_arrives_at_the_worker() {
    for (path, intg) in testing::integrations() {
        eprintln!("{}", path.display());
        check(&intg);
    }
}
