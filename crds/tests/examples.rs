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
    assert_eq!(i.spec.destination.method, HttpMethod::Post);
    assert_eq!(i.spec.destination.timeout, std::time::Duration::from_secs(10));
    assert!(!i.spec.destination.allow_private_networks);
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
    assert_eq!(i.spec.destination.headers_from[0].name, "Authorization");
    let json = serde_json::to_string(&i).unwrap();
    assert!(
        !json.contains("null"),
        "serialized Integration contains null: {json}"
    );
    let back: Integration = serde_json::from_str(&json).unwrap();
    assert_eq!(back.spec, i.spec);
}
