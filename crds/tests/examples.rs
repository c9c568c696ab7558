//! The shipped examples parse into the types, and serializing never sends `null` (server-side apply
//! would read a `null` as "remove this field").

use std::path::Path;

use hookfleet_crds::Integration;
use hookfleet_crds::integration::{HttpMethod, Jitter, RateLimitScope};

fn example(name: &str) -> Integration {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name);
    serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn minimal_example_takes_the_documented_defaults() {
    let i = example("minimal.yaml");
    assert_eq!(i.spec.source.prefetch, 64);
    assert!(i.spec.source.bindings.is_empty());
    assert_eq!(i.spec.destination.as_ref().unwrap().method, HttpMethod::Post);
    assert_eq!(
        i.spec.destination.as_ref().unwrap().timeout,
        std::time::Duration::from_secs(10)
    );
    assert!(!i.spec.destination.as_ref().unwrap().allow_private_networks);
    assert_eq!(i.spec.delivery.max_attempts, 10);
    assert_eq!(i.spec.delivery.concurrency, 128);
    assert_eq!(i.spec.delivery.backoff.initial, std::time::Duration::from_secs(1));
    assert_eq!(i.spec.delivery.backoff.max, std::time::Duration::from_secs(600));
    assert_eq!(i.spec.delivery.backoff.jitter, Jitter::Full);
    assert_eq!(i.spec.delivery.circuit_breaker.failure_threshold, 20);
    assert_eq!(
        i.spec.delivery.circuit_breaker.cooldown,
        std::time::Duration::from_secs(10)
    );
    assert_eq!(i.spec.delivery.adaptive_throttle, None);
    assert_eq!(i.spec.workers.replicas, None);
    assert_eq!(i.spec.workers.file_descriptor_limit, 1_048_576);
    assert!(!i.spec.paused);
}

#[test]
fn full_example_round_trips_without_nulls() {
    let i = example("orders-to-erp.yaml");
    assert_eq!(i.spec.workers.replicas, Some(3));
    assert_eq!(
        i.spec.delivery.rate_limit.as_ref().map(|r| r.per_second),
        Some(200)
    );
    assert_eq!(
        i.spec.destination.as_ref().unwrap().headers_from[0].name,
        "X-Api-Key"
    );
    let signing = i.spec.destination.as_ref().unwrap().signing.as_ref().unwrap();
    let keys: Vec<&str> = signing.refs().map(|r| r.name.as_str()).collect();
    assert_eq!(keys, ["erp-signing", "erp-signing-next"]);
    let oauth2 = i
        .spec
        .destination
        .as_ref()
        .unwrap()
        .auth
        .as_ref()
        .unwrap()
        .oauth2
        .as_ref()
        .unwrap();
    assert_eq!(oauth2.token_url, "https://login.example.com/oauth2/token");
    assert_eq!(oauth2.scopes, ["orders.write"]);
    let tls = i.spec.destination.as_ref().unwrap().tls.as_ref().unwrap();
    assert_eq!(tls.ca_from.as_ref().unwrap().key, "ca.crt");
    assert_eq!(tls.client_cert_secret.as_ref().unwrap().name, "erp-client-cert");
    assert_eq!(
        i.spec.delivery.rate_limit.as_ref().map(|r| r.scope),
        Some(RateLimitScope::Fleet)
    );
    let throttle = i
        .spec
        .delivery
        .adaptive_throttle
        .as_ref()
        .expect("adaptiveThrottle");
    assert_eq!(throttle.min_concurrency, 4);
    let json = serde_json::to_string(&i).unwrap();
    assert!(
        !json.contains("null"),
        "serialized Integration contains null: {json}"
    );
    let back: Integration = serde_json::from_str(&json).unwrap();
    assert_eq!(back.spec, i.spec);
}

#[test]
fn auth_examples_set_one_method_each() {
    let basic = example("auth-basic.yaml").spec.destination.unwrap().auth.unwrap();
    let b = basic.basic.unwrap();
    assert_eq!(
        (b.username_from.key.as_str(), b.password_from.key.as_str()),
        ("username", "password")
    );
    assert!(basic.bearer.is_none() && basic.oauth2.is_none());
    let bearer = example("auth-bearer.yaml")
        .spec
        .destination
        .unwrap()
        .auth
        .unwrap();
    assert_eq!(bearer.bearer.unwrap().token_from.name, "partner-token");
}
