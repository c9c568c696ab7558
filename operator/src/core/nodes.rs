//! Nodes the workers are kept off: a worker that cannot raise its file-descriptor limit (exit 3,
//! `status::PodProblemKind::FdLimit`) names its node as excluded; the pod template then carries a required
//! node affinity (`desired::set_excluded_nodes`) and the Deployment rolls the crashing pod onto another node.
//!
//! The API does not show a node's nofile limit, so "the node is fixed" is read from what fixing it does:
//! raising containerd's (or the kubelet's) `LimitNOFILE` means restarting it, and a restarted runtime or
//! kubelet flips the node's `Ready` condition. An exclusion is cleared when
//!
//! - the node's `Ready` condition changed (`lastTransitionTime`) after the exclusion's `since`;
//! - the exclusion is older than the TTL (a node still at the low limit fails again and is excluded
//!   again: one pod's crash, then a roll);
//! - the annotation `hookfleet.io/retry-nodes` is set to another value than the exclusion recorded.
//!
//! The workers are never kept off every node they could use: a node is excluded only while another
//! schedulable node (Ready, not cordoned) stays outside the list; otherwise it is *kept* and the condition
//! says so. While the operator cannot see the Nodes (no RBAC, or its cache not synced yet) nothing new is
//! excluded.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hookfleet_crds::integration::ExcludedNode;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::status::{PodProblemKind, pod_problem, reason, worker_stopped_at};

/// What the exclusion rules read of a Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeObs {
    pub name: String,
    /// Ready and not cordoned: the scheduler may put a worker on it.
    pub schedulable: bool,
    /// When its `Ready` condition last changed.
    pub ready_changed: Option<Timestamp>,
}

impl NodeObs {
    pub fn from_node(n: &Node) -> Self {
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
        let cordoned = n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
        Self {
            name: n.metadata.name.clone().unwrap_or_default(),
            schedulable: !cordoned && ready.is_some_and(|c| c.status == "True"),
            ready_changed: ready.and_then(|c| c.last_transition_time.as_ref()).map(|t| t.0),
        }
    }
}

/// A worker that could not meet its fd limit, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FdFailure {
    pub node: String,
    pub pod: String,
    /// The worker's termination message.
    pub message: String,
    /// When that container stopped.
    pub finished: Option<Timestamp>,
}

/// The fd-limit failure of `pod`, when it has one and was scheduled.
pub fn fd_failure(pod: &Pod) -> Option<FdFailure> {
    let problem = pod_problem(pod)?;
    if problem.kind != PodProblemKind::FdLimit {
        return None;
    }
    Some(FdFailure {
        node: problem.node?,
        pod: problem.pod,
        message: problem.message,
        finished: worker_stopped_at(pod, None).map(|t| t.0),
    })
}

/// Whether the rules have anything to decide for an Integration: exclusions to keep or clear
/// (`previous`), or a worker among `pods` that failed the fd limit. When not, nothing is excluded and the
/// Nodes need not be read.
pub fn involved(previous: &[ExcludedNode], pods: &[std::sync::Arc<Pod>]) -> bool {
    !previous.is_empty() || pods.iter().any(|p| fd_failure(p).is_some())
}

/// What the rules decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// The exclusions now, sorted by node.
    pub excluded: Vec<ExcludedNode>,
    /// Nodes that failed but stay usable: excluding them would leave no schedulable node.
    pub kept: Vec<String>,
    /// Nodes cleared in this pass, with why.
    pub cleared: Vec<(String, &'static str)>,
}

impl Decision {
    /// The node names of the affinity, sorted.
    pub fn names(&self) -> Vec<String> {
        self.excluded.iter().map(|e| e.node.clone()).collect()
    }
}

/// The inputs of [`decide`].
pub struct Inputs<'a> {
    /// `status.excludedNodes` as last written.
    pub previous: &'a [ExcludedNode],
    pub failures: &'a [FdFailure],
    /// The Nodes, None while they cannot be seen.
    pub nodes: Option<&'a [NodeObs]>,
    /// The value of `hookfleet.io/retry-nodes` now.
    pub retry: Option<&'a str>,
    pub now: Timestamp,
    pub ttl: Duration,
}

/// The exclusions from the last ones, the failures seen and the Nodes. `cleared` (the operator's memory)
/// holds when each node was last cleared: a failure that finished before it does not count again.
pub fn decide(i: &Inputs<'_>, cleared: &mut BTreeMap<String, Timestamp>) -> Decision {
    let mut d = Decision::default();
    let node = |name: &str| i.nodes.and_then(|ns| ns.iter().find(|n| n.name == name));
    let mut excluded: BTreeMap<String, ExcludedNode> = BTreeMap::new();
    for e in i.previous {
        let why = if e.retry_annotation.as_deref() != i.retry {
            Some("the annotation hookfleet.io/retry-nodes changed")
        } else if node(&e.node)
            .and_then(|n| n.ready_changed)
            .is_some_and(|t| t > e.since.0)
        {
            Some("its Ready condition changed (kubelet or runtime restarted)")
        } else if i
            .now
            .duration_since(e.since.0)
            .try_into()
            .is_ok_and(|age: Duration| age >= i.ttl)
        {
            Some("the exclusion TTL passed")
        } else {
            None
        };
        match why {
            Some(why) => {
                cleared.insert(e.node.clone(), i.now);
                d.cleared.push((e.node.clone(), why));
            }
            None => {
                excluded.insert(e.node.clone(), e.clone());
            }
        }
    }
    let schedulable: BTreeSet<&str> = i
        .nodes
        .unwrap_or_default()
        .iter()
        .filter(|n| n.schedulable)
        .map(|n| n.name.as_str())
        .collect();
    let leaves_one = |excluded: &BTreeMap<String, ExcludedNode>, extra: &str| {
        schedulable
            .iter()
            .any(|s| *s != extra && !excluded.contains_key(*s))
    };
    // Never every node: when the schedulable nodes shrank under the exclusions, the newest one goes.
    while !schedulable.is_empty() && !leaves_one(&excluded, "") {
        let Some(newest) = excluded
            .values()
            .filter(|e| schedulable.contains(e.node.as_str()))
            .max_by_key(|e| (e.since.0, e.node.clone()))
            .map(|e| e.node.clone())
        else {
            break;
        };
        excluded.remove(&newest);
        d.kept.push(newest);
    }
    let mut failures: Vec<&FdFailure> = i
        .failures
        .iter()
        .filter(|f| !excluded.contains_key(&f.node))
        .filter(|f| match (cleared.get(&f.node), f.finished) {
            (None, _) => true,
            (Some(c), Some(at)) => at > *c,
            (Some(_), None) => false,
        })
        .collect();
    failures.sort_by(|a, b| (&a.node, &a.pod).cmp(&(&b.node, &b.pod)));
    for f in failures {
        if excluded.contains_key(&f.node) || d.kept.contains(&f.node) {
            continue;
        }
        if i.nodes.is_some() && leaves_one(&excluded, &f.node) {
            excluded.insert(
                f.node.clone(),
                ExcludedNode {
                    node: f.node.clone(),
                    reason: reason::FD_LIMIT_NOT_MET.into(),
                    message: f.message.clone(),
                    since: Time(i.now),
                    retry_annotation: i.retry.map(str::to_owned),
                },
            );
        } else {
            d.kept.push(f.node.clone());
        }
    }
    d.kept.sort();
    d.kept.dedup();
    d.excluded = excluded.into_values().collect();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "file-descriptor limit too low: RLIMIT_NOFILE is 1024 (hard limit 1024, --fd-limit asked \
                        for 4096) but --concurrency 2048 needs 4160 (2048 in flight + 2048 idle pooled + 64 \
                        reserve); lower --concurrency or raise the hard limit";

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn node(name: &str, ready_changed: &str) -> NodeObs {
        NodeObs {
            name: name.into(),
            schedulable: true,
            ready_changed: Some(ts(ready_changed)),
        }
    }

    fn failure(node: &str, finished: &str) -> FdFailure {
        FdFailure {
            node: node.into(),
            pod: format!("orders-{node}"),
            message: LINE.into(),
            finished: Some(ts(finished)),
        }
    }

    fn inputs<'a>(
        previous: &'a [ExcludedNode],
        failures: &'a [FdFailure],
        nodes: Option<&'a [NodeObs]>,
        now: &str,
    ) -> Inputs<'a> {
        Inputs {
            previous,
            failures,
            nodes,
            retry: None,
            now: ts(now),
            ttl: Duration::from_secs(3600),
        }
    }

    #[test]
    fn a_failing_node_is_excluded_and_kept_excluded_unchanged() {
        let nodes = [
            node("n1", "2026-01-01T00:00:00Z"),
            node("n2", "2026-01-01T00:00:00Z"),
            node("n3", "2026-01-01T00:00:00Z"),
        ];
        let mut cleared = BTreeMap::new();
        let f = [failure("n3", "2026-01-01T01:00:00Z")];
        let d = decide(
            &inputs(&[], &f, Some(&nodes), "2026-01-01T01:00:05Z"),
            &mut cleared,
        );
        assert_eq!(d.names(), ["n3"]);
        assert_eq!(d.excluded[0].since.0, ts("2026-01-01T01:00:05Z"));
        assert_eq!(d.excluded[0].reason, "FileDescriptorLimitNotMet");
        assert!(d.kept.is_empty() && d.cleared.is_empty());
        // The next passes carry it over as it is (same status, same template: no write, no roll), with
        // the pod still failing or gone.
        for failures in [&f[..], &[]] {
            let again = decide(
                &inputs(&d.excluded, failures, Some(&nodes), "2026-01-01T01:10:00Z"),
                &mut cleared,
            );
            assert_eq!(again, d);
        }
    }

    #[test]
    fn order_is_by_node_name_whatever_the_order_seen() {
        let nodes = [
            node("a", "2026-01-01T00:00:00Z"),
            node("b", "2026-01-01T00:00:00Z"),
            node("c", "2026-01-01T00:00:00Z"),
            node("d", "2026-01-01T00:00:00Z"),
        ];
        let f1 = [
            failure("c", "2026-01-01T01:00:00Z"),
            failure("a", "2026-01-01T01:00:00Z"),
        ];
        let f2 = [f1[1].clone(), f1[0].clone(), f1[0].clone()];
        let now = "2026-01-01T01:00:05Z";
        let d1 = decide(&inputs(&[], &f1, Some(&nodes), now), &mut BTreeMap::new());
        let d2 = decide(&inputs(&[], &f2, Some(&nodes), now), &mut BTreeMap::new());
        assert_eq!(d1.names(), ["a", "c"]);
        assert_eq!(d1, d2);
    }

    #[test]
    fn the_last_schedulable_node_is_never_excluded() {
        let mut nodes = vec![
            node("n1", "2026-01-01T00:00:00Z"),
            node("n2", "2026-01-01T00:00:00Z"),
        ];
        nodes.push(NodeObs {
            schedulable: false,
            ..node("cordoned", "2026-01-01T00:00:00Z")
        });
        let f = [
            failure("n1", "2026-01-01T01:00:00Z"),
            failure("n2", "2026-01-01T01:00:00Z"),
        ];
        let now = "2026-01-01T01:00:05Z";
        let d = decide(&inputs(&[], &f, Some(&nodes), now), &mut BTreeMap::new());
        assert_eq!(d.names(), ["n1"], "n2 stays: the cordoned node does not count");
        assert_eq!(d.kept, ["n2"]);
        // Steady: n1 stays excluded, n2 kept.
        let again = decide(&inputs(&d.excluded, &f, Some(&nodes), now), &mut BTreeMap::new());
        assert_eq!(again, d);
        // One node only (or none seen): nothing excluded.
        let one = [node("n1", "2026-01-01T00:00:00Z")];
        let d = decide(&inputs(&[], &f[..1], Some(&one), now), &mut BTreeMap::new());
        assert!(d.excluded.is_empty());
        assert_eq!(d.kept, ["n1"]);
        let d = decide(&inputs(&[], &f[..1], None, now), &mut BTreeMap::new());
        assert!(d.excluded.is_empty());
        assert_eq!(d.kept, ["n1"]);
    }

    #[test]
    fn when_the_good_nodes_go_the_newest_exclusion_is_released() {
        let nodes = [
            node("n1", "2026-01-01T00:00:00Z"),
            node("n2", "2026-01-01T00:00:00Z"),
            NodeObs {
                schedulable: false,
                ..node("n3", "2026-01-01T00:00:00Z")
            },
        ];
        let ex = |n: &str, since: &str| ExcludedNode {
            node: n.into(),
            reason: "FileDescriptorLimitNotMet".into(),
            message: LINE.into(),
            since: Time(ts(since)),
            retry_annotation: None,
        };
        let previous = [ex("n1", "2026-01-01T01:00:00Z"), ex("n2", "2026-01-01T01:05:00Z")];
        let d = decide(
            &inputs(&previous, &[], Some(&nodes), "2026-01-01T01:10:00Z"),
            &mut BTreeMap::new(),
        );
        assert_eq!(d.names(), ["n1"]);
        assert_eq!(d.kept, ["n2"]);
    }

    #[test]
    fn cleared_by_ready_transition_ttl_or_annotation_and_old_failures_do_not_count_again() {
        let nodes = [
            node("n1", "2026-01-01T00:00:00Z"),
            node("n2", "2026-01-01T00:00:00Z"),
            node("n3", "2026-01-01T00:00:00Z"),
        ];
        let mut cleared = BTreeMap::new();
        let f = [failure("n3", "2026-01-01T01:00:00Z")];
        let d = decide(
            &inputs(&[], &f, Some(&nodes), "2026-01-01T01:00:05Z"),
            &mut cleared,
        );
        assert_eq!(d.names(), ["n3"]);

        // n3's Ready condition changes after the exclusion: cleared, and the failure seen before does not
        // exclude it again.
        let fixed = [
            nodes[0].clone(),
            nodes[1].clone(),
            node("n3", "2026-01-01T01:20:00Z"),
        ];
        let c = decide(
            &inputs(&d.excluded, &f, Some(&fixed), "2026-01-01T01:21:00Z"),
            &mut cleared,
        );
        assert!(c.excluded.is_empty(), "{c:?}");
        assert_eq!(c.cleared.len(), 1);
        assert!(c.cleared[0].1.contains("Ready"), "{c:?}");
        let c = decide(
            &inputs(&[], &f, Some(&fixed), "2026-01-01T01:22:00Z"),
            &mut cleared,
        );
        assert!(c.excluded.is_empty());
        // A new failure there excludes it again.
        let again = [failure("n3", "2026-01-01T01:30:00Z")];
        let c = decide(
            &inputs(&[], &again, Some(&fixed), "2026-01-01T01:30:05Z"),
            &mut cleared,
        );
        assert_eq!(c.names(), ["n3"]);

        // A Ready change before the exclusion does not clear it.
        let d2 = decide(
            &inputs(&c.excluded, &[], Some(&fixed), "2026-01-01T01:40:00Z"),
            &mut cleared,
        );
        assert_eq!(d2.excluded, c.excluded);
        // The TTL (1 h here) does.
        let t = decide(
            &inputs(&c.excluded, &[], Some(&fixed), "2026-01-01T02:30:05Z"),
            &mut cleared,
        );
        assert!(t.excluded.is_empty());
        assert!(t.cleared[0].1.contains("TTL"));

        // So does a new value of the annotation.
        let mut i = inputs(&c.excluded, &[], Some(&fixed), "2026-01-01T01:40:00Z");
        i.retry = Some("1");
        let a = decide(&i, &mut cleared);
        assert!(a.excluded.is_empty());
        assert!(a.cleared[0].1.contains("annotation"));
        // An exclusion made under that value keeps it.
        let f2 = [failure("n2", "2026-01-01T01:50:00Z")];
        let mut i = inputs(&[], &f2, Some(&fixed), "2026-01-01T01:50:01Z");
        i.retry = Some("1");
        let e = decide(&i, &mut cleared);
        assert_eq!(e.excluded[0].retry_annotation.as_deref(), Some("1"));
        i.previous = &e.excluded;
        assert_eq!(decide(&i, &mut cleared).excluded, e.excluded);
    }

    #[test]
    fn the_summary_reads_the_limits_from_the_worker_line() {
        use crate::core::status::limit_summary;
        assert_eq!(
            limit_summary(LINE),
            "RLIMIT_NOFILE hard limit 1024, workers need 4160"
        );
        assert_eq!(limit_summary("exit code 3"), "\"exit code 3\"");
    }
}
