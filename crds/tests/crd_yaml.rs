//! The committed CRD YAML (in `crds/` and in the Helm chart's `crds/`) must be what the Rust types generate.

use std::path::Path;

fn assert_current(file: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}; run `make crds`", path.display()));
    let generated = hookfleet_crds::crds()
        .into_iter()
        .find_map(|(f, chart, yaml)| (f == file || chart == file).then_some(yaml))
        .expect("a CRD file");
    assert!(
        committed == generated,
        "{} is out of date with crds/src: run `make crds` and commit the result",
        path.display()
    );
}

#[test]
fn committed_crd_matches_the_types() {
    assert_current(hookfleet_crds::CRD_FILE);
}

#[test]
fn chart_crd_matches_the_types() {
    assert_current(hookfleet_crds::CHART_CRD_FILE);
}

#[test]
fn committed_webhook_crd_matches_the_types() {
    assert_current(hookfleet_crds::WEBHOOK_CRD_FILE);
}

#[test]
fn chart_webhook_crd_matches_the_types() {
    assert_current(hookfleet_crds::CHART_WEBHOOK_CRD_FILE);
}
