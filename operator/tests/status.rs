//! Status from observations (pure): conditions, reasons, transitions, lastTransitionTime.

use hookfleet_crds::integration::condition::{DEGRADED, PAUSED, PROGRESSING, READY, SUSPENDED};
use hookfleet_operator::status::{self, DeploymentObs, Observed, PodProblemKind, SourceObs, reason};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

fn pod(name: &str) -> Pod {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn healthy() -> Observed {
    Observed {
        generation: Some(3),
        paused: false,
        suspend: false,
        queue: "queue orders.erp".into(),
        desired: 3,
        single_replica: false,
        deployment: Some(DeploymentObs {
            spec_replicas: 3,
            replicas: 3,
            ready: 3,
            updated: 3,
            observed: true,
        }),
        pod_problems: vec![],
        source: SourceObs::Queue {
            consumers: 3,
            backlog: 12,
        },
        selector: "a=b".into(),
        destination_gone: None,
        invalid_spec: None,
        webhooks: None,
        webhooks_problem: None,
        excluded_nodes: vec![],
        kept_nodes: vec![],
        poison_limit: None,
    }
}

fn get<'a>(cs: &'a [Condition], t: &str) -> &'a Condition {
    cs.iter()
        .find(|c| c.type_ == t)
        .unwrap_or_else(|| panic!("no {t}"))
}

fn at(secs: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
}

#[test]
fn healthy_fleet_is_ready_not_progressing_not_degraded() {
    let s = status::compute(&healthy());
    assert_eq!(s.observed_generation, Some(3));
    assert_eq!(
        (s.replicas, s.ready_replicas, s.consumers, s.backlog),
        (Some(3), Some(3), Some(3), Some(12))
    );
    let r = get(&s.conditions, READY);
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("True", reason::CONSUMING)
    );
    assert_eq!(get(&s.conditions, PROGRESSING).status, "False");
    assert_eq!(get(&s.conditions, DEGRADED).status, "False");
    assert!(
        s.conditions
            .iter()
            .all(|c| c.type_ != PAUSED && c.type_ != SUSPENDED)
    );
}

#[test]
fn ready_pods_that_do_not_consume_degrade_with_the_counts() {
    let mut o = healthy();
    o.source = SourceObs::Queue {
        consumers: 2,
        backlog: 0,
    };
    let s = status::compute(&o);
    let d = get(&s.conditions, DEGRADED);
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("True", reason::NOT_CONSUMING)
    );
    assert!(
        d.message.contains("3 worker pods are Ready but only 2 consumers"),
        "{}",
        d.message
    );
    assert!(d.message.contains("orders.erp"));
    assert_eq!(get(&s.conditions, READY).status, "False");

    o.source = SourceObs::QueueMissing;
    let d = status::compute(&o);
    assert!(get(&d.conditions, DEGRADED).message.contains("does not exist"));
}

#[test]
fn a_jetstream_consumer_is_judged_by_its_waiting_pulls_when_idle_and_by_its_deliveries_when_busy() {
    let mut o = healthy();
    o.queue = "JetStream consumer hooks of stream ORDERS".into();
    // Idle: each live worker keeps a pull request open; 3 Ready, 3 waiting.
    o.source = SourceObs::Stream {
        pulling: Some(3),
        backlog: 0,
        stalled_secs: None,
    };
    let s = status::compute(&o);
    assert_eq!((s.consumers, s.backlog), (Some(3), Some(0)));
    assert_eq!(get(&s.conditions, DEGRADED).status, "False");
    assert!(
        get(&s.conditions, READY)
            .message
            .contains("3 consumers on JetStream consumer hooks of stream ORDERS"),
        "{}",
        get(&s.conditions, READY).message
    );
    // Idle, and one Ready worker keeps no request open: the 1-of-N failure.
    o.source = SourceObs::Stream {
        pulling: Some(2),
        backlog: 0,
        stalled_secs: None,
    };
    let s = status::compute(&o);
    let d = get(&s.conditions, DEGRADED);
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("True", reason::NOT_CONSUMING)
    );
    assert!(d.message.contains("only 2 pull requests wait"), "{}", d.message);
    assert_eq!(
        s.consumers,
        Some(2),
        "the alert compares this with the Ready workers"
    );
    // Busy and delivering: the count is unknown (absent, not 0), and nothing is wrong.
    o.source = SourceObs::Stream {
        pulling: None,
        backlog: 900,
        stalled_secs: None,
    };
    let s = status::compute(&o);
    assert_eq!((s.consumers, s.backlog), (None, Some(900)));
    assert_eq!(get(&s.conditions, DEGRADED).status, "False");
    assert_eq!(get(&s.conditions, READY).status, "True");
    // A backlog nobody pulls although the workers have room.
    o.source = SourceObs::Stream {
        pulling: Some(0),
        backlog: 900,
        stalled_secs: Some(45),
    };
    let s = status::compute(&o);
    let d = get(&s.conditions, DEGRADED);
    assert_eq!(d.reason, reason::NOT_CONSUMING);
    assert!(
        d.message
            .contains("delivered no message for 45s with 900 pending"),
        "{}",
        d.message
    );
    assert_eq!(s.consumers, Some(0));
}

#[test]
fn fd_limit_and_crash_loops_quote_the_termination_message() {
    let p = status::pod_problem(&pod("pod-fd-limit.yaml")).unwrap();
    assert_eq!(p.kind, PodProblemKind::FdLimit);
    let p2 = status::pod_problem(&pod("pod-crashloop.yaml")).unwrap();
    assert_eq!(p2.kind, PodProblemKind::CrashLoop);
    assert!(
        p2.message.contains("panicked at worker/src/main.rs:10: boom"),
        "{}",
        p2.message
    );
    assert!(p2.message.contains("restarted 5 times"));

    let mut o = healthy();
    o.pod_problems = vec![p2, p];
    let s = status::compute(&o);
    let d = get(&s.conditions, DEGRADED);
    assert_eq!(
        d.reason,
        reason::FD_LIMIT_NOT_MET,
        "fd limit outranks a generic crash loop"
    );
    assert!(
        d.message
            .contains("file-descriptor limit too low: RLIMIT_NOFILE is 4096"),
        "{}",
        d.message
    );
    assert!(d.message.contains("orders-to-erp-5d8f7-abcde"));
}

/// Between two back-offs a crash-looping worker runs for a few seconds, not Ready: still a crash loop
/// (no Recovered flap), until it is Ready again. A worker that never failed, or is Ready again, has no
/// problem.
#[test]
fn a_restarted_worker_not_ready_again_is_still_crash_looping() {
    let mut p = pod("pod-crashloop.yaml");
    let cs = &mut p.status.as_mut().unwrap().container_statuses.as_mut().unwrap()[0];
    cs.restart_count = 1;
    cs.state = Some(
        serde_json::from_value(serde_json::json!({"running": {"startedAt": "2026-12-06T10:00:00Z"}}))
            .unwrap(),
    );
    let problem = status::pod_problem(&p).expect("running between two back-offs, not Ready");
    assert_eq!(problem.kind, PodProblemKind::CrashLoop);
    assert!(
        problem.message.contains("restarted 1 times"),
        "{}",
        problem.message
    );
    let cs = &mut p.status.as_mut().unwrap().container_statuses.as_mut().unwrap()[0];
    cs.ready = true;
    assert_eq!(status::pod_problem(&p), None, "Ready again: recovered");
    let cs = &mut p.status.as_mut().unwrap().container_statuses.as_mut().unwrap()[0];
    cs.ready = false;
    cs.last_state = Some(
        serde_json::from_value(serde_json::json!({"terminated": {"exitCode": 0, "reason": "Completed"}}))
            .unwrap(),
    );
    assert_eq!(status::pod_problem(&p), None, "a clean exit is no crash");
}

#[test]
fn queue_mismatch_is_its_own_reason_naming_queue_and_argument() {
    let p = status::pod_problem(&pod("pod-queue-mismatch.yaml")).unwrap();
    assert_eq!(p.kind, PodProblemKind::QueueMismatch);
    let crash = status::pod_problem(&pod("pod-crashloop.yaml")).unwrap();
    let mut o = healthy();
    o.pod_problems = vec![crash, p];
    let s = status::compute(&o);
    let d = get(&s.conditions, DEGRADED);
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("True", reason::QUEUE_MISMATCH),
        "a queue mismatch outranks a generic crash loop: {}",
        d.message
    );
    for part in ["orders-to-erp-5d8f7-klmno", "queue orders.erp", "x-queue-type"] {
        assert!(d.message.contains(part), "{part} missing: {}", d.message);
    }
    assert_eq!(get(&s.conditions, READY).reason, reason::QUEUE_MISMATCH);
}

#[test]
fn queues_missing_with_external_topology_is_its_own_reason_naming_the_queues() {
    let mut p = pod("pod-queue-mismatch.yaml");
    let cs = &mut p.status.as_mut().unwrap().container_statuses.as_mut().unwrap()[0];
    cs.last_state = Some(
        serde_json::from_value(serde_json::json!({"terminated": {
            "exitCode": hookfleet_crds::contract::exit::QUEUES_MISSING,
            "reason": "Error",
            "message": "2 of the 17 queues this worker uses do not exist, and with --topology external \
                (spec.source.topology) it declares none: orders.erp.dead, orders.erp.retries; declare them as \
                docs/worker.md (\"Queues declared elsewhere\") says, or use topology managed\n"
        }}))
        .unwrap(),
    );
    let missing = status::pod_problem(&p).unwrap();
    assert_eq!(missing.kind, PodProblemKind::QueuesMissing);
    let mut o = healthy();
    o.pod_problems = vec![status::pod_problem(&pod("pod-crashloop.yaml")).unwrap(), missing];
    let s = status::compute(&o);
    let d = get(&s.conditions, DEGRADED);
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("True", reason::QUEUES_MISSING)
    );
    for part in ["orders.erp.dead", "orders.erp.retries", "topology external"] {
        assert!(d.message.contains(part), "{part} missing: {}", d.message);
    }
}

#[test]
fn an_external_topology_says_where_the_poison_message_limit_comes_from() {
    use hookfleet_crds::integration::{QueueType, Topology};
    let mut spec = hookfleet_crds::testing::integrations()
        .into_iter()
        .find(|(p, _)| p.ends_with("existing-queue.yaml"))
        .expect("crds/examples/existing-queue.yaml")
        .1
        .spec
        .source;
    assert_eq!(spec.topology, Topology::External);
    let mut o = healthy();
    o.poison_limit = status::poison_limit_note(&spec);
    let ready = get(&status::compute(&o).conditions, READY).clone();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", reason::CONSUMING)
    );
    assert!(
        ready.message.contains("x-delivery-count (deliveryLimit 10)"),
        "{}",
        ready.message
    );
    spec.queue_type = QueueType::Classic;
    assert!(
        status::poison_limit_note(&spec)
            .unwrap()
            .contains("no poison-message limit")
    );
    spec.topology = Topology::Managed;
    assert_eq!(
        status::poison_limit_note(&spec),
        None,
        "managed: the queue's arguments say it"
    );
}

#[test]
fn a_healthy_pod_is_no_problem() {
    let mut p = pod("pod-crashloop.yaml");
    let cs = &mut p.status.as_mut().unwrap().container_statuses.as_mut().unwrap()[0];
    cs.ready = true;
    cs.restart_count = 1;
    cs.state = None;
    assert_eq!(status::pod_problem(&p), None);
}

#[test]
fn secret_problem_is_ready_false_and_degraded_naming_it() {
    let mut o = healthy();
    o.source = SourceObs::Problem {
        reason: reason::SECRET_NOT_FOUND,
        message: "Secret \"rabbitmq\" (spec.source.connectionSecretRef) not found in namespace team-a".into(),
    };
    let s = status::compute(&o);
    for t in [READY, DEGRADED] {
        let c = get(&s.conditions, t);
        assert_eq!(c.reason, reason::SECRET_NOT_FOUND);
        assert!(c.message.contains("\"rabbitmq\""));
    }
    assert_eq!((s.consumers, s.backlog), (None, None));
}

#[test]
fn rollout_and_unready_workers() {
    let mut o = healthy();
    o.desired = 5;
    let s = status::compute(&o);
    assert_eq!(get(&s.conditions, PROGRESSING).status, "True");
    let r = get(&s.conditions, READY);
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("False", reason::WORKERS_NOT_READY)
    );
    assert!(r.message.contains("3 of 5"));
    assert_eq!(get(&s.conditions, DEGRADED).status, "False");
}

#[test]
fn single_replica_and_paused() {
    let mut o = healthy();
    o.desired = 1;
    o.single_replica = true;
    o.deployment = Some(DeploymentObs {
        spec_replicas: 1,
        replicas: 1,
        ready: 1,
        updated: 1,
        observed: true,
    });
    o.source = SourceObs::Queue {
        consumers: 1,
        backlog: 0,
    };
    let s = status::compute(&o);
    assert_eq!(get(&s.conditions, READY).reason, reason::SINGLE_REPLICA);
    o.paused = true;
    let s = status::compute(&o);
    assert_eq!(get(&s.conditions, PAUSED).status, "True");
    assert_eq!(get(&s.conditions, PROGRESSING).reason, reason::PAUSED);
}

/// The fleet of `healthy()` with `spec.suspend` applied: desired 0, the Deployment at `running` pods.
fn suspended(running: i32, ready: i32, consumers: i32) -> Observed {
    let mut o = healthy();
    o.suspend = true;
    o.desired = 0;
    o.deployment = Some(DeploymentObs {
        spec_replicas: 0,
        replicas: running,
        ready,
        updated: running,
        observed: true,
    });
    o.source = SourceObs::Queue {
        consumers,
        backlog: 4200,
    };
    o
}

#[test]
fn suspended_is_ready_false_suspended_and_never_short_or_not_consuming() {
    // Scaled to 0: Ready False/Suspended naming the queue and the backlog, Suspended True, not Degraded.
    let s = status::compute(&suspended(0, 0, 0));
    assert_eq!(s.replicas, Some(0));
    let r = get(&s.conditions, READY);
    assert_eq!(
        (r.status.as_str(), r.reason.as_str()),
        ("False", reason::SUSPENDED)
    );
    assert!(
        r.message.contains("queue orders.erp") && r.message.contains("4200"),
        "{}",
        r.message
    );
    let c = get(&s.conditions, SUSPENDED);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", reason::SUSPENDED_BY_SPEC)
    );
    assert!(
        c.message
            .contains("messages wait in queue orders.erp (backlog 4200)"),
        "{}",
        c.message
    );
    let d = get(&s.conditions, DEGRADED);
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("False", reason::AS_EXPECTED)
    );
    assert_eq!(get(&s.conditions, PROGRESSING).reason, reason::ROLLOUT_COMPLETE);

    // Scaling down: 3 pods still Ready, their consumers already cancelled. Not NotConsuming, not short.
    let s = status::compute(&suspended(3, 3, 0));
    assert_eq!(get(&s.conditions, DEGRADED).status, "False");
    assert_eq!(get(&s.conditions, READY).reason, reason::SUSPENDED);
    assert_eq!(
        get(&s.conditions, PROGRESSING).status,
        "True",
        "pods still going away"
    );
    // A crash-looping pod on its way out is no problem of a suspended fleet either.
    let mut o = suspended(1, 0, 0);
    o.pod_problems = vec![status::pod_problem(&pod("pod-crashloop.yaml")).unwrap()];
    assert_eq!(get(&status::compute(&o).conditions, DEGRADED).status, "False");

    // What is wrong besides (the broker, the Secret) is still Degraded; Ready keeps the reason Suspended.
    let mut o = suspended(0, 0, 0);
    o.source = SourceObs::Problem {
        reason: reason::BROKER_UNREACHABLE,
        message: "connection refused".into(),
    };
    let s = status::compute(&o);
    assert_eq!(get(&s.conditions, DEGRADED).reason, reason::BROKER_UNREACHABLE);
    assert_eq!(get(&s.conditions, READY).reason, reason::SUSPENDED);
    assert!(get(&s.conditions, READY).message.ends_with("queue orders.erp"));
}

#[test]
fn suspend_not_applied_while_paused_says_so_and_applied_over_an_invalid_spec() {
    let mut o = healthy();
    o.suspend = true;
    o.paused = true;
    let s = status::compute(&o);
    let c = get(&s.conditions, SUSPENDED);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", reason::PAUSED));
    assert!(c.message.contains("keeps its 3 replicas"), "{}", c.message);
    assert_eq!(
        get(&s.conditions, READY).reason,
        reason::CONSUMING,
        "the workers deliver"
    );
    assert!(!status::suspended(&o));

    // An invalid spec is not applied, but its suspend is (the Deployment's scale): Suspended, and Degraded
    // says both.
    let mut o = suspended(0, 0, 0);
    o.invalid_spec = Some("spec.destination.headers: bad".into());
    let s = status::compute(&o);
    let c = get(&s.conditions, SUSPENDED);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", reason::SUSPENDED_BY_SPEC)
    );
    assert_eq!(get(&s.conditions, READY).reason, reason::SUSPENDED);
    let d = get(&s.conditions, DEGRADED);
    assert_eq!(d.reason, reason::INVALID_SPEC);
    assert!(d.message.contains("the workers are scaled to 0"), "{}", d.message);
    assert!(!d.message.contains("keep running"), "{}", d.message);
}

#[test]
fn suspend_and_unsuspend_are_one_normal_event_each_and_no_not_ready_warning() {
    let t = at(1_000);
    let running = status::merge_conditions(&[], status::compute(&healthy()).conditions, &t);
    let stopped = status::merge_conditions(&running, status::compute(&suspended(0, 0, 0)).conditions, &t);
    let ev = status::transitions(&running, &stopped);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(!ev[0].warning);
    assert_eq!(ev[0].reason, "Suspended");
    assert!(ev[0].note.contains("queue orders.erp"), "{}", ev[0].note);
    // Steady while suspended: nothing.
    let still = status::merge_conditions(
        &stopped,
        status::compute(&suspended(0, 0, 0)).conditions,
        &at(2_000),
    );
    assert!(status::transitions(&stopped, &still).is_empty());
    // Unsuspended: the fleet scales back (not Ready yet), one Normal Event.
    let mut back = healthy();
    back.deployment.as_mut().unwrap().ready = 0;
    let starting = status::merge_conditions(&still, status::compute(&back).conditions, &at(3_000));
    assert!(starting.iter().all(|c| c.type_ != SUSPENDED));
    let ev = status::transitions(&still, &starting);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!((ev[0].warning, ev[0].reason.as_str()), (false, "Unsuspended"));
    let ready = status::merge_conditions(&starting, status::compute(&healthy()).conditions, &at(4_000));
    let reasons: Vec<_> = status::transitions(&starting, &ready)
        .into_iter()
        .map(|t| t.reason)
        .collect();
    assert_eq!(reasons, [reason::CONSUMING]);
}

#[test]
fn last_transition_time_moves_only_on_flips_and_events_only_on_transitions() {
    let t0 = at(1_000);
    let t1 = at(2_000);
    let first = status::merge_conditions(&[], status::compute(&healthy()).conditions, &t0);
    assert!(first.iter().all(|c| c.last_transition_time == t0));
    // Unchanged: same times, no events, equal status (so no write).
    let again = status::merge_conditions(&first, status::compute(&healthy()).conditions, &t1);
    assert_eq!(again, first);
    assert!(status::transitions(&first, &again).is_empty());
    // Degraded flips: only Ready and Degraded move.
    let mut o = healthy();
    o.source = SourceObs::Queue {
        consumers: 2,
        backlog: 0,
    };
    let degraded = status::merge_conditions(&first, status::compute(&o).conditions, &t1);
    assert_eq!(get(&degraded, DEGRADED).last_transition_time, t1);
    assert_eq!(get(&degraded, READY).last_transition_time, t1);
    assert_eq!(get(&degraded, PROGRESSING).last_transition_time, t0);
    let ev = status::transitions(&first, &degraded);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(ev[0].warning);
    assert_eq!(ev[0].reason, reason::NOT_CONSUMING);
    // A changed message without a flip keeps the time.
    o.source = SourceObs::Queue {
        consumers: 1,
        backlog: 0,
    };
    let worse = status::merge_conditions(&degraded, status::compute(&o).conditions, &at(3_000));
    assert_eq!(get(&worse, DEGRADED).last_transition_time, t1);
    assert!(status::transitions(&degraded, &worse).is_empty());
    // Recovery: Recovered + Ready events.
    let back = status::merge_conditions(&worse, status::compute(&healthy()).conditions, &at(4_000));
    let reasons: Vec<_> = status::transitions(&worse, &back)
        .into_iter()
        .map(|t| t.reason)
        .collect();
    assert_eq!(reasons, ["Recovered", reason::CONSUMING]);
}

#[test]
fn worker_restarts_count_the_worker_container_of_live_pods() {
    let p = pod("pod-crashloop.yaml");
    assert_eq!(status::worker_restarts(&p), 5);
    let mut deleting = p.clone();
    deleting.metadata.deletion_timestamp = Some(at(10));
    assert_eq!(
        status::worker_restarts(&deleting),
        0,
        "a terminating pod's successor counts"
    );
    let mut other = p;
    other
        .status
        .as_mut()
        .unwrap()
        .container_statuses
        .as_mut()
        .unwrap()[0]
        .name = "sidecar".into();
    assert_eq!(status::worker_restarts(&other), 0);
}

#[test]
fn an_invalid_spec_comes_first_and_says_nothing_is_applied() {
    let mut o = healthy();
    // Even with another problem at the same time, the spec the workers would refuse is named first.
    o.source = SourceObs::QueueMissing;
    o.invalid_spec = Some("spec.destination.body.template: unexpected end of input".into());
    let s = status::compute(&o);
    let degraded = get(&s.conditions, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "InvalidSpec")
    );
    assert!(
        degraded
            .message
            .starts_with("spec.destination.body.template: unexpected end of input.")
    );
    assert!(
        degraded.message.contains("keep running the last valid one"),
        "{}",
        degraded.message
    );
    let ready = get(&s.conditions, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidSpec")
    );
    let progressing = get(&s.conditions, "Progressing");
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("False", "InvalidSpec")
    );
    let events = status::transitions(&status::compute(&healthy()).conditions, &s.conditions);
    assert_eq!(
        events
            .iter()
            .filter(|e| e.reason == "InvalidSpec" && e.warning)
            .count(),
        1,
        "{events:?}"
    );
}

const FD_LINE: &str = "file-descriptor limit too low: RLIMIT_NOFILE is 1024 (hard limit 1024, --fd-limit asked for \
                       4096) but --concurrency 2048 needs 4160 (2048 in flight + 2048 idle pooled + 64 reserve); \
                       lower --concurrency or raise the hard limit";

fn excluded(node: &str) -> hookfleet_crds::integration::ExcludedNode {
    hookfleet_crds::integration::ExcludedNode {
        node: node.into(),
        reason: "FileDescriptorLimitNotMet".into(),
        message: FD_LINE.into(),
        since: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-01-01T00:00:00Z".parse().unwrap()),
        retry_annotation: None,
    }
}

#[test]
fn a_failing_pod_names_its_node_the_limits_and_what_to_do() {
    use hookfleet_operator::status::PodProblem;
    let mut o = healthy();
    o.deployment.as_mut().unwrap().ready = 2;
    o.pod_problems = vec![PodProblem {
        pod: "orders-abc".into(),
        kind: PodProblemKind::FdLimit,
        message: FD_LINE.into(),
        node: Some("n3".into()),
    }];
    o.excluded_nodes = vec![excluded("n3")];
    let st = status::compute(&o);
    let d = get(&st.conditions, "Degraded");
    assert_eq!(d.reason, "FileDescriptorLimitNotMet");
    assert!(
        d.message.starts_with(
            "node n3: RLIMIT_NOFILE hard limit 1024, workers need 4160; workers are kept off n3 — raise \
             containerd's LimitNOFILE on n3 and restart it"
        ),
        "{}",
        d.message
    );
    assert!(
        d.message
            .contains(&format!("worker pod orders-abc: \"{FD_LINE}\"")),
        "{}",
        d.message
    );
    assert_eq!(st.excluded_nodes, o.excluded_nodes);
    // The last usable node is kept, and the message says so.
    o.excluded_nodes = vec![];
    o.kept_nodes = vec!["n3".into()];
    let d = get(&status::compute(&o).conditions, "Degraded").clone();
    assert!(
        d.message
            .contains("workers are not kept off n3: the operator sees no other schedulable node"),
        "{}",
        d.message
    );
}

#[test]
fn an_excluded_node_degrades_but_the_fleet_elsewhere_is_ready() {
    let mut o = healthy();
    o.excluded_nodes = vec![excluded("n1"), excluded("n3")];
    let st = status::compute(&o);
    assert_eq!(get(&st.conditions, "Ready").status, "True");
    let d = get(&st.conditions, "Degraded");
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("True", "FileDescriptorLimitNotMet")
    );
    assert!(
        d.message.starts_with("node n1: RLIMIT_NOFILE hard limit 1024"),
        "{}",
        d.message
    );
    assert!(d.message.ends_with("(and 1 more nodes: n3)"), "{}", d.message);
    // Without exclusions nothing changes (no field written: steady state as before).
    let st = status::compute(&healthy());
    assert!(st.excluded_nodes.is_empty());
    assert!(!serde_json::to_string(&st).unwrap().contains("excludedNodes"));
}
