//! Step 2, build: the desired children from the spec and the world. Pure (the clock and the autoscaler's
//! memory are parameters), so it is tested without an API server; its one wait is for the backlog an
//! autoscaled Integration follows ([`backlog`]).

use std::time::Instant;

use hookfleet_crds::Integration;
use hookfleet_crds::integration::{DestinationGone, annotation};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;

use super::dereference::World;
use crate::config::Config;
use crate::core::desired;
use crate::core::nodes;
use crate::core::replicas;
use crate::core::status::{SourceObs, destination_gone_at};
use crate::memory::Memory;

/// The children to apply (none while the Integration is paused).
#[derive(Clone, Debug)]
pub struct Children {
    pub deployment: Deployment,
    pub pdb: PodDisruptionBudget,
    pub service: Service,
}

/// What the Integration should look like now.
#[derive(Clone, Debug)]
pub struct Desired {
    /// Workers wanted now (fixed or autoscaled).
    pub replicas: i32,
    /// The spec's fixed replica count (None when autoscaled).
    pub fixed: Option<i32>,
    pub children: Option<Children>,
    /// Set while the destination is gone: `replicas` is then 0.
    pub destination_gone: Option<DestinationGone>,
    /// What the worker would refuse in the spec (`hookfleet_crds::validate`), as `field: reason; …`:
    /// nothing is applied, so the running fleet stays as it was (unless `stop`).
    pub invalid: Option<String>,
    /// Suspended while the spec is invalid: no children are built from it, but the running Deployment is
    /// scaled to 0 through its scale subresource, so a suspend stops delivery whatever else is wrong.
    pub stop: bool,
    /// The nodes the workers are kept off (`core::nodes`), and those that failed but stay usable.
    pub nodes: nodes::Decision,
}

/// The build step fails only where the desired objects cannot be built: a malformed object.
pub type BuildError = desired::Error;

/// Whether the destination is gone now. `previous` is what the status says; a worker that stopped with
/// exit 5 after the last clear (`cleared`, in memory) makes it gone; a changed destination URL or a new
/// value of the retry annotation clears it (and moves `cleared` past every exit 5 seen so far, so the
/// terminated pods that linger while the fleet scales back up do not count again).
pub fn destination_gone(
    intg: &Integration,
    previous: Option<&DestinationGone>,
    world: &World,
    cleared: &mut Option<k8s_openapi::jiff::Timestamp>,
) -> Option<DestinationGone> {
    // Webhooks: a 410 concerns one Webhook, never the fleet.
    let url = hookfleet_crds::redact::userinfo(&intg.spec.destination.as_ref()?.url);
    let retry = intg
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotation::RETRY_DESTINATION))
        .cloned();
    let latest_exit = world
        .pods
        .iter()
        .filter_map(|p| destination_gone_at(p))
        .max_by_key(|t| t.0);
    if let Some(p) = previous {
        if p.url == url && p.retry_annotation == retry {
            return Some(p.clone());
        }
        *cleared = [Some(p.since.0), latest_exit.map(|t| t.0), *cleared]
            .into_iter()
            .flatten()
            .max();
        return None;
    }
    match latest_exit {
        Some(at) if cleared.is_none_or(|c| at.0 > c) => Some(DestinationGone {
            url,
            since: at,
            retry_annotation: retry,
        }),
        _ => None,
    }
}

/// The nodes the workers are kept off now (`core::nodes::decide`): from the exclusions last written, the
/// fd-limit failures of the worker pods, the Nodes and the annotation `hookfleet.io/retry-nodes`.
pub fn excluded_nodes(
    intg: &Integration,
    previous: &[hookfleet_crds::integration::ExcludedNode],
    world: &World,
    ttl: std::time::Duration,
    now: k8s_openapi::jiff::Timestamp,
    cleared: &mut std::collections::BTreeMap<String, k8s_openapi::jiff::Timestamp>,
) -> nodes::Decision {
    if !nodes::involved(previous, &world.pods) {
        return nodes::Decision::default();
    }
    let failures: Vec<nodes::FdFailure> = world.pods.iter().filter_map(|p| nodes::fd_failure(p)).collect();
    let retry = intg
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotation::RETRY_NODES))
        .map(String::as_str);
    nodes::decide(
        &nodes::Inputs {
            previous,
            failures: &failures,
            nodes: world.nodes.as_deref(),
            retry,
            now,
            ttl,
        },
        cleared,
    )
}

/// The backlog the autoscaler follows, asked of the broker only for an Integration that autoscales (None
/// otherwise, and when the broker cannot be asked; a missing queue has none). Otherwise only the status
/// step reads the broker's answer, so the probe runs while the children are applied instead of before: a
/// first reconcile waits for one round trip fewer.
pub async fn backlog(intg: &Integration, world: &World) -> Option<i64> {
    if intg.spec.workers.autoscale.is_none() || intg.spec.paused || intg.spec.suspend {
        return None;
    }
    match world.source.answer().await {
        SourceObs::Queue { backlog, .. } | SourceObs::Stream { backlog, .. } => Some(backlog),
        SourceObs::QueueMissing => Some(0),
        SourceObs::Problem { .. } => None,
    }
}

/// The desired replica count and children. `backlog` is [`backlog`]'s answer; `now` is the clock as the
/// autoscaler reads it, `wall` as the node exclusions are dated.
pub fn build(
    intg: &Integration,
    world: &World,
    backlog: Option<i64>,
    config: &Config,
    memory: &mut Memory,
    now: Instant,
    wall: k8s_openapi::jiff::Timestamp,
) -> Result<Desired, BuildError> {
    let spec = &intg.spec;
    let current = world.current_replicas();
    let fixed = replicas::fixed(&spec.workers);
    // The status last written (fresher than the cache) says whether the destination is gone.
    let previous = memory.last_status(intg);
    let previous_gone = previous.and_then(|s| s.destination_gone.clone());
    let previous_excluded = previous.map(|s| s.excluded_nodes.clone()).unwrap_or_default();
    let gone = destination_gone(intg, previous_gone.as_ref(), world, &mut memory.gone_cleared);
    let node_decision = excluded_nodes(
        intg,
        &previous_excluded,
        world,
        config.node_exclusion_ttl,
        wall,
        &mut memory.nodes_cleared,
    );
    // Paused: nothing is applied, so a suspend would not be either (status says so).
    let suspended = spec.suspend && !spec.paused;
    if suspended || gone.is_some() {
        // Resumed (or the destination back), the fleet starts again from 0 and steps up, not at once to
        // what the backlog asked for before.
        memory.autoscaler = replicas::Autoscaler::default();
    }
    let replicas = match (&spec.workers.autoscale, fixed) {
        // Nothing is lost at 0 (messages wait in the queue), and no worker hammers a gone endpoint.
        _ if gone.is_some() => 0,
        // Stopped on purpose: the messages wait in the queue.
        _ if suspended => 0,
        (_, Some(n)) => n,
        (Some(auto), None) if !spec.paused => {
            memory
                .autoscaler
                .next(auto, current, backlog, now, config.scale_up_period)
                .replicas
        }
        (Some(auto), None) => current.unwrap_or(auto.min),
        (None, None) => replicas::DEFAULT_REPLICAS,
    };
    let invalid = hookfleet_crds::validate(spec).err().map(|refused| {
        refused
            .iter()
            .map(|i| format!("{}: {}", i.field, i.reason))
            .collect::<Vec<_>>()
            .join("; ")
    });
    let children = if spec.paused || invalid.is_some() {
        None
    } else {
        let mut deployment = desired::deployment(intg, &config.worker, replicas)?;
        // A Secret that cannot be read keeps the checksum the pods run with: no roll into pods that
        // would not start.
        let checksum = world
            .secrets_checksum
            .clone()
            .or_else(|| world.deployment.as_deref().and_then(desired::secrets_checksum));
        if let Some(c) = checksum {
            desired::set_secrets_checksum(&mut deployment, c);
        }
        desired::set_excluded_nodes(&mut deployment, &node_decision.names());
        Some(Children {
            deployment,
            pdb: desired::pod_disruption_budget(intg, replicas)?,
            service: desired::metrics_service(intg)?,
        })
    };
    Ok(Desired {
        replicas,
        fixed,
        stop: suspended && children.is_none(),
        children,
        destination_gone: gone,
        invalid,
        nodes: node_decision,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::reconcile::dereference::Probe;

    fn intg(url: &str, retry: Option<&str>) -> Integration {
        let mut v = serde_json::json!({
            "apiVersion": "hookfleet.io/v1alpha1", "kind": "Integration",
            "metadata": {"name": "orders", "namespace": "a", "uid": "u1"},
            "spec": {
                "source": {"connectionSecretRef": {"name": "r", "key": "uri"}, "queue": "orders"},
                "destination": {"url": url}
            }
        });
        if let Some(r) = retry {
            v["metadata"]["annotations"] = serde_json::json!({ annotation::RETRY_DESTINATION: r });
        }
        serde_json::from_value(v).unwrap()
    }

    /// A worker pod whose container last stopped with `exit` at `finished`.
    fn world(exits: &[(i32, &str)]) -> World {
        let pods = exits
            .iter()
            .enumerate()
            .map(|(i, (exit, finished))| {
                Arc::new(
                    serde_json::from_value::<Pod>(serde_json::json!({
                        "metadata": {"name": format!("orders-{i}")},
                        "status": {"containerStatuses": [{
                            "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 1,
                            "lastState": {"terminated": {"exitCode": exit, "finishedAt": finished}}
                        }]}
                    }))
                    .unwrap(),
                )
            })
            .collect();
        World {
            source: Probe::known(SourceObs::QueueMissing),
            secrets_checksum: None,
            deployment: None,
            pdb: None,
            service: None,
            pods,
            nodes: None,
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn exit_5_makes_it_gone_until_the_url_or_the_annotation_changes() {
        let i = intg("https://u:p@erp.example.com/h", Some("1"));
        let mut cleared = None;
        // Other exit codes are not a gone destination.
        assert_eq!(
            destination_gone(&i, None, &world(&[(3, "2026-01-01T00:00:00Z")]), &mut cleared),
            None
        );

        let w = world(&[
            (5, "2026-01-01T00:00:00Z"),
            (5, "2026-01-01T00:00:07Z"),
            (0, "2026-01-01T00:01:00Z"),
        ]);
        let gone = destination_gone(&i, None, &w, &mut cleared).expect("gone");
        assert_eq!(gone.url, "https://***@erp.example.com/h");
        assert_eq!(gone.since.0, ts("2026-01-01T00:00:07Z"), "the latest exit 5");
        assert_eq!(gone.retry_annotation.as_deref(), Some("1"));
        // Kept while nothing changes, pods gone or not.
        assert_eq!(
            destination_gone(&i, Some(&gone), &world(&[]), &mut cleared),
            Some(gone.clone())
        );

        // A new annotation value clears it; the exits already seen do not count again.
        let retried = intg("https://u:p@erp.example.com/h", Some("2"));
        assert_eq!(destination_gone(&retried, Some(&gone), &w, &mut cleared), None);
        assert_eq!(cleared, Some(ts("2026-01-01T00:00:07Z")));
        assert_eq!(destination_gone(&retried, None, &w, &mut cleared), None);
        // A later exit 5 makes it gone again.
        let later = world(&[(5, "2026-01-01T00:05:00Z")]);
        let again = destination_gone(&retried, None, &later, &mut cleared).expect("gone again");
        assert_eq!(again.retry_annotation.as_deref(), Some("2"));

        // A new URL clears it too; the password alone is not compared (it is redacted).
        let moved = intg("https://u:p@erp.example.com/v2", Some("2"));
        assert_eq!(destination_gone(&moved, Some(&again), &later, &mut cleared), None);
        assert_eq!(cleared, Some(ts("2026-01-01T00:05:00Z")));
    }

    #[test]
    fn gone_scales_to_zero() {
        let i = intg("https://erp.example.com/h", None);
        let mut m = Memory::default();
        let config = Config::new("w");
        let w = world(&[(5, "2026-01-01T00:00:00Z")]);
        let d = build(&i, &w, None, &config, &mut m, Instant::now(), Timestamp::now()).unwrap();
        assert_eq!(d.replicas, 0);
        assert!(d.destination_gone.is_some());
        let spec = d.children.unwrap().deployment.spec.unwrap();
        assert_eq!(spec.replicas, Some(0));
        let fine = world(&[(0, "2026-01-01T00:00:00Z")]);
        let d = build(&i, &fine, None, &config, &mut m, Instant::now(), Timestamp::now()).unwrap();
        assert_eq!(d.replicas, 2);
    }

    #[test]
    fn suspend_scales_to_zero_fixed_or_autoscaled_and_back() {
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let (config, t0) = (Config::new("w"), Instant::now());
        let mut m = Memory::default();
        let mut i = intg("https://erp.example.com/h", None);
        let mut w = world(&[]);
        let build_at = |i: &Integration, w: &World, m: &mut Memory, backlog, t| {
            build(i, w, backlog, &config, m, t, Timestamp::now()).unwrap()
        };
        i.spec.suspend = true;
        let d = build_at(&i, &w, &mut m, None, t0);
        assert_eq!(d.replicas, 0);
        let c = d.children.expect("applied: the Deployment goes to 0");
        let at_zero = c.deployment.clone();
        assert_eq!(c.deployment.spec.unwrap().replicas, Some(0));
        assert_eq!(c.pdb.spec.unwrap().min_available, Some(IntOrString::Int(0)));
        i.spec.suspend = false;
        assert_eq!(build_at(&i, &w, &mut m, None, t0).replicas, 2);

        // Autoscaled on a backlog of 50 per 10: suspend wins over the backlog, and the fleet comes back from
        // the spec's min (at most doubling per period), not from its size before (4).
        i.spec.workers.autoscale = Some(
            serde_json::from_value(serde_json::json!({
                "min": 2, "max": 8, "targetBacklogPerReplica": 10, "scaleDownStabilization": "60s"
            }))
            .unwrap(),
        );
        assert_eq!(build_at(&i, &w, &mut m, Some(50), t0).replicas, 4);
        i.spec.suspend = true;
        assert_eq!(build_at(&i, &w, &mut m, Some(50), t0).replicas, 0);
        w.deployment = Some(Arc::new(at_zero));
        i.spec.suspend = false;
        let back = build_at(&i, &w, &mut m, Some(50), t0).replicas;
        assert_eq!(back, 2, "from the spec's min");

        // Paused: nothing applied, so no suspend either; the count reported is the spec's.
        i.spec.workers.autoscale = None;
        i.spec.suspend = true;
        i.spec.paused = true;
        let d = build_at(&i, &w, &mut m, None, t0);
        assert!(d.children.is_none() && !d.stop);
        assert_eq!(d.replicas, 2);

        // Invalid: nothing rendered from the spec, but the running Deployment is to be stopped.
        i.spec.paused = false;
        i.spec
            .destination
            .as_mut()
            .unwrap()
            .headers
            .insert("X-Bad".into(), "a\r\nInjected: 1".into());
        let d = build_at(&i, &w, &mut m, None, t0);
        assert!(d.children.is_none() && d.invalid.is_some());
        assert!(d.stop);
        assert_eq!(d.replicas, 0);
        i.spec.suspend = false;
        assert!(!build_at(&i, &w, &mut m, None, t0).stop);
    }

    #[test]
    fn an_fd_failure_keeps_the_workers_off_its_node_and_the_next_build_is_the_same() {
        use crate::core::nodes::NodeObs;
        let i = intg("https://erp.example.com/h", None);
        let (mut m, config) = (Memory::default(), Config::new("w"));
        let mut w = world(&[(3, "2026-01-01T00:00:00Z")]);
        let mut pod = (*w.pods[0]).clone();
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: Some("n3".into()),
            ..Default::default()
        });
        w.pods = vec![Arc::new(pod)];
        w.nodes = Some(
            ["n1", "n2", "n3"]
                .map(|n| NodeObs {
                    name: n.into(),
                    schedulable: true,
                    ready_changed: Some(ts("2025-12-31T00:00:00Z")),
                })
                .to_vec(),
        );
        let now = ts("2026-01-01T00:00:05Z");
        let d = build(&i, &w, None, &config, &mut m, Instant::now(), now).unwrap();
        assert_eq!(d.nodes.names(), ["n3"]);
        let dep = d.children.unwrap().deployment;
        assert_eq!(desired::excluded_nodes(&dep), ["n3"]);
        // The status written carries it to the next build: the same template, the same exclusion.
        m.written = Some(hookfleet_crds::IntegrationStatus {
            excluded_nodes: d.nodes.excluded.clone(),
            ..Default::default()
        });
        let later = ts("2026-01-01T00:10:00Z");
        let again = build(&i, &w, None, &config, &mut m, Instant::now(), later).unwrap();
        assert_eq!(again.nodes, d.nodes);
        assert_eq!(again.children.unwrap().deployment, dep);
        // Without Nodes seen, nothing is excluded.
        let mut blind = w.clone();
        blind.nodes = None;
        let d = build(
            &i,
            &blind,
            None,
            &config,
            &mut Memory::default(),
            Instant::now(),
            now,
        )
        .unwrap();
        assert!(d.nodes.excluded.is_empty());
        assert_eq!(d.nodes.kept, ["n3"]);
    }

    #[test]
    fn a_spec_the_worker_would_refuse_builds_no_children() {
        let mut i = intg("https://erp.example.com/h", None);
        i.spec
            .destination
            .as_mut()
            .unwrap()
            .headers
            .insert("X-Bad".into(), "a\r\nInjected: 1".into());
        let (mut m, config) = (Memory::default(), Config::new("w"));
        let d = build(
            &i,
            &world(&[]),
            None,
            &config,
            &mut m,
            Instant::now(),
            Timestamp::now(),
        )
        .unwrap();
        assert!(d.children.is_none(), "nothing to apply");
        let invalid = d.invalid.expect("invalid");
        assert!(invalid.starts_with("spec.destination.headers"), "{invalid}");
        assert_eq!(
            d.replicas, 2,
            "the replica count is still decided (status reports it)"
        );
        let fine = intg("https://erp.example.com/h", None);
        let d = build(
            &fine,
            &world(&[]),
            None,
            &config,
            &mut m,
            Instant::now(),
            Timestamp::now(),
        )
        .unwrap();
        assert!(d.invalid.is_none() && d.children.is_some());
    }
}
