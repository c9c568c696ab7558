//! What the operator remembers between reconciles: one [`Memory`] per Integration, in one map, dropped when
//! the Integration is deleted (however it is deleted, whether or not its reconciles were failing).
//!
//! Memory is a cache of what this leader did and saw, never the truth: after a restart or a leader change
//! it starts empty and every step still works (applies once more, the autoscaler starts from the current
//! replica count, the status is compared with the cached object).
//!
//! A reconcile takes its Integration's [`Entry`] once ([`Memories::entry`]) and hands it to the steps that
//! read or update it; each locks it only for a moment, never across an await, and never while it takes
//! the map's lock (the map's lock is never held while an entry is locked either), so no two locks wait on
//! each other.

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};

use hookfleet_crds::IntegrationStatus;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use prometheus_client::metrics::gauge::Gauge;

use crate::core::replicas::Autoscaler;

/// Everything the operator remembers about one Integration (one uid: a re-created Integration of the
/// same name starts afresh).
#[derive(Debug, Default)]
pub struct Memory {
    /// What was last applied per child kind: (hash of the desired object, fingerprint of the object the
    /// API server returned, when). An apply is skipped while both still match, so a steady state makes no
    /// request.
    pub applied: HashMap<String, (u64, String, std::time::Instant)>,
    pub autoscaler: Autoscaler,
    /// Consecutive failed reconciles (the error policy's backoff).
    pub failures: u32,
    /// The status this leader last wrote. Only the leader writes status, so this is fresher than the watch
    /// cache, which can lag behind our own write when reconciles come in quick succession: comparing
    /// against a stale cached status would publish a transition's Event twice.
    pub written: Option<IntegrationStatus>,
    /// When this leader last wrote the status (`crate::core::pacing::hold_status`).
    pub written_at: Option<std::time::Instant>,
    /// When a `DestinationGone` was last cleared: worker terminations (exit 5) that finished at or before
    /// it are not counted again while their pods go away.
    pub gone_cleared: Option<Timestamp>,
    /// When each node's exclusion was last cleared (`crate::core::nodes::decide`): fd-limit failures there
    /// that finished before it are not counted again while their pods go away.
    pub nodes_cleared: std::collections::BTreeMap<String, Timestamp>,
    /// The referenced Secrets as last read, reused while the Secret watch shows them unchanged
    /// (`crate::secrets::dereference`). Holds the broker URI: in memory only, never logged.
    pub secrets: Option<crate::secrets::Dereferenced>,
    /// Queue deletion under way (`deletionPolicy: Delete`: the reconcile's finalize step).
    pub deletion: crate::core::deletion::Progress,
}

/// What [`Memory::applied`] holds of the object the API server returned: changes with every spec change of
/// the object (generation), or with every change when it has none.
pub fn fingerprint<K: Resource>(obj: &K) -> String {
    match obj.meta().generation {
        Some(g) => format!("g{g}"),
        None => format!("rv{}", obj.meta().resource_version.clone().unwrap_or_default()),
    }
}

/// The memory of one Integration (one uid), as a reconcile or the error policy holds it.
#[derive(Debug)]
pub struct Entry {
    uid: String,
    memory: Mutex<Memory>,
}

impl Entry {
    fn new(uid: &str) -> Arc<Self> {
        Arc::new(Self {
            uid: uid.to_owned(),
            memory: Mutex::default(),
        })
    }

    /// Runs `f` on the memory (locked while `f` runs: keep it short, and await nothing in it).
    pub fn with<R>(&self, f: impl FnOnce(&mut Memory) -> R) -> R {
        f(&mut self.memory.lock().expect("lock"))
    }
}

impl Memory {
    /// The status `intg` had last: as this operator wrote it, else as the cache shows it (the cache may
    /// not show the last write yet).
    pub fn last_status<'a>(&'a self, intg: &'a hookfleet_crds::Integration) -> Option<&'a IntegrationStatus> {
        self.written.as_ref().or(intg.status.as_ref())
    }
}

/// The memories of all Integrations, keyed by `namespace/name`.
pub struct Memories {
    map: Mutex<HashMap<String, Arc<Entry>>>,
    /// `hookfleet_operator_integrations_remembered`.
    gauge: Gauge<i64, AtomicI64>,
}

/// `namespace/name`: the key of an Integration's memory, and its `integration` label in the metrics (the
/// controller forgets the series of the memories it drops by this key).
pub fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

impl Memories {
    pub fn new(gauge: Gauge<i64, AtomicI64>) -> Self {
        Self {
            map: Mutex::default(),
            gauge,
        }
    }

    /// The memory of `ns/name` with `uid`, created (or replaced by a fresh one, for another uid) if needed.
    pub fn entry(&self, ns: &str, name: &str, uid: &str) -> Arc<Entry> {
        let mut map = self.map.lock().expect("lock");
        let e = map.entry(key(ns, name)).or_insert_with(|| Entry::new(uid));
        if e.uid != uid {
            *e = Entry::new(uid);
        }
        let e = e.clone();
        self.gauge.set(map.len() as i64);
        e
    }

    /// Drops the memory of `ns/name`; true when there was one.
    pub fn forget(&self, ns: &str, name: &str) -> bool {
        let mut map = self.map.lock().expect("lock");
        let had = map.remove(&key(ns, name)).is_some();
        self.gauge.set(map.len() as i64);
        had
    }

    /// Keeps only the memories `keep(key, uid)` accepts; returns the keys dropped.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) -> Vec<String> {
        let mut map = self.map.lock().expect("lock");
        let mut dropped = Vec::new();
        map.retain(|k, e| {
            let k_ = keep(k, &e.uid);
            if !k_ {
                dropped.push(k.clone());
            }
            k_
        });
        self.gauge.set(map.len() as i64);
        dropped
    }

    /// Runs `f` on the memory of `ns/name` with `uid` if there is one (none is created).
    pub fn peek<R>(&self, ns: &str, name: &str, uid: &str, f: impl FnOnce(&Memory) -> R) -> Option<R> {
        let entry = self
            .map
            .lock()
            .expect("lock")
            .get(&key(ns, name))
            .filter(|e| e.uid == uid)
            .cloned();
        entry.map(|e| e.with(|m| f(m)))
    }

    pub fn len(&self) -> usize {
        self.map.lock().expect("lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_memory_per_integration_reset_for_a_new_uid() {
        let m = Memories::new(Gauge::default());
        m.entry("a", "x", "u1").with(|m| m.failures = 3);
        m.entry("a", "y", "u2").with(|m| m.failures = 1);
        assert_eq!(m.len(), 2);
        assert_eq!(m.gauge.get(), 2);
        assert_eq!(m.entry("a", "x", "u1").with(|m| m.failures), 3);
        // Deleted and re-created under the same name: a new uid starts afresh.
        assert_eq!(m.entry("a", "x", "u3").with(|m| m.failures), 0);
        assert!(m.forget("a", "x"));
        assert!(!m.forget("a", "x"));
        assert_eq!(m.retain(|k, _| k != "a/y"), vec!["a/y".to_string()]);
        assert!(m.is_empty());
        assert_eq!(m.gauge.get(), 0);
    }
}
