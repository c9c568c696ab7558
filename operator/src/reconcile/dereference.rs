//! Step 1, dereference: what the world is for one Integration. The broker URI from its Secret (and that
//! every other referenced Secret key exists), the queue as the broker sees it, and the children and worker
//! pods from the operator's caches. The only step that reads; nothing is written.

use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt, Shared};
use hookfleet_crds::Integration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};

use crate::broker::Broker;
use crate::context::Caches;
use crate::core::desired;
use crate::core::nodes::{self, NodeObs};
use crate::core::status::{SourceObs, reason};
use crate::memory::Entry;
use crate::names::INTEGRATION_LABEL;
use crate::nats::{Nats, Question};
use crate::secrets;

/// The world as it is, for one Integration.
#[derive(Clone, Debug)]
pub struct World {
    /// The queue as the broker sees it, or why it cannot be asked.
    pub source: Probe,
    /// Checksum of the referenced Secrets' versions (`None` while one cannot be read).
    pub secrets_checksum: Option<String>,
    pub deployment: Option<Arc<Deployment>>,
    pub pdb: Option<Arc<PodDisruptionBudget>>,
    pub service: Option<Arc<Service>>,
    /// Worker pods of the Integration.
    pub pods: Vec<Arc<Pod>>,
    /// The Nodes, None while the operator cannot see them (no RBAC, or its cache not synced yet), and
    /// for an Integration with no exclusion to keep or clear and no fd-limit failure (`core::nodes::involved`).
    pub nodes: Option<Vec<NodeObs>>,
}

impl World {
    /// `spec.replicas` of the worker Deployment, when it exists.
    pub fn current_replicas(&self) -> Option<i32> {
        self.deployment
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.replicas)
    }
}

/// What the broker says about the queue. Dereferencing prepares the question; it is asked once, when a
/// step first awaits [`Probe::answer`] (the build step of an autoscaled Integration, or else the status
/// step while the children are applied: see `crate::reconcile`), and every later `answer` is that one.
/// Known at once when the Secrets already tell a problem.
#[derive(Clone)]
pub struct Probe(Shared<BoxFuture<'static, SourceObs>>);

impl Probe {
    pub fn known(obs: SourceObs) -> Self {
        Probe(futures::future::ready(obs).boxed().shared())
    }

    /// The question `ask`, asked once when a step first awaits the answer.
    fn ask(ask: impl Future<Output = SourceObs> + Send + 'static) -> Self {
        Probe(ask.boxed().shared())
    }

    /// The broker's answer (asked now, unless a step asked already).
    pub async fn answer(&self) -> SourceObs {
        self.0.clone().await
    }
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.peek() {
            Some(obs) => obs.fmt(f),
            None => f.write_str("Probe(not asked yet)"),
        }
    }
}

/// The dereference step fails only where a referenced Secret cannot be read (a missing one is a
/// condition, not an error).
pub type DereferenceError = secrets::ReadError;

/// Reads what the Integration refers to and what its children and pods look like, from the API server
/// (`client`, for the Secrets the caches do not hold at their current version), the operator's `caches`,
/// and the Secrets this Integration's `memory` holds; the broker (RabbitMQ's `broker`, or `nats` for a NATS
/// JetStream source) is asked through the returned [`World::source`].
pub async fn dereference(
    intg: &Integration,
    client: &Client,
    caches: &Caches,
    broker: &Arc<Broker>,
    nats: &Arc<Nats>,
    memory: &Entry,
) -> Result<World, DereferenceError> {
    let ns = intg.namespace().unwrap_or_default();
    let name = intg.name_any();
    let (source, secrets_checksum) = observe_secrets(intg, client, caches, broker, nats, memory).await?;
    let pods: Vec<Arc<Pod>> = caches
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns.as_str()) && p.labels().get(INTEGRATION_LABEL) == Some(&name)
        })
        .collect();
    // The Nodes only for an Integration the exclusion rules concern (most have nothing to decide): not
    // every Node copied on every reconcile of every Integration.
    let involved = memory.with(|m| {
        let previous = m
            .last_status(intg)
            .map_or(&[][..], |s| s.excluded_nodes.as_slice());
        nodes::involved(previous, &pods)
    });
    let nodes = (involved && caches.nodes_synced.load(std::sync::atomic::Ordering::Relaxed)).then(|| {
        caches
            .nodes
            .state()
            .iter()
            .map(|n| NodeObs::from_node(n))
            .collect()
    });
    Ok(World {
        source,
        secrets_checksum,
        deployment: caches.deployments.get(&ObjectRef::new(&name).within(&ns)),
        pdb: caches.pdbs.get(&ObjectRef::new(&name).within(&ns)),
        service: caches
            .services
            .get(&ObjectRef::new(&desired::service_name(&name)).within(&ns)),
        pods,
        nodes,
    })
}

/// The referenced Secrets (the broker URI, that every other key exists, the checksum of their versions):
/// the question for the broker when they are fine, else the problem they tell.
async fn observe_secrets(
    intg: &Integration,
    client: &Client,
    caches: &Caches,
    broker: &Arc<Broker>,
    nats: &Arc<Nats>,
    memory: &Entry,
) -> Result<(Probe, Option<String>), DereferenceError> {
    let spec = &intg.spec;
    let ns = intg.namespace().unwrap_or_default();
    let previous = memory.with(|m| m.secrets.clone());
    let found = secrets::dereference(
        client,
        &ns,
        spec,
        &caches.secrets,
        previous.as_ref(),
        &caches.secret_reads,
    )
    .await?;
    memory.with(|m| m.secrets = found.as_ref().ok().cloned());
    let secrets = match found {
        Ok(d) => d,
        Err(problem) => return Ok((Probe::known(problem), None)),
    };
    let checksum = Some(secrets.checksum);
    let not_utf8 = |field: &str| {
        Ok((
            Probe::known(SourceObs::Problem {
                reason: reason::INVALID_BROKER_URI,
                message: format!("the value of {field} is not UTF-8"),
            }),
            checksum.clone(),
        ))
    };
    let Ok(uri) = String::from_utf8(secrets.amqp_uri) else {
        return not_utf8("spec.source.connectionSecretRef");
    };
    let Some(jetstream) = &spec.source.nats else {
        let (broker, queue) = (broker.clone(), spec.source.queue.clone());
        let probe = Probe::ask(async move { broker.observe(uri.trim(), &queue).await });
        return Ok((probe, checksum));
    };
    let Ok(credentials) = secrets.nats_credentials.map(String::from_utf8).transpose() else {
        return not_utf8("spec.source.nats.credentialsSecretRef");
    };
    let Ok(token) = secrets.nats_token.map(String::from_utf8).transpose() else {
        return not_utf8("spec.source.nats.tokenSecretRef");
    };
    let question = Question {
        urls: uri,
        credentials,
        token,
        stream: jetstream.stream.clone(),
        consumer: spec.source.queue.clone(),
        // A worker pulls batches of its effective prefetch (the in-flight bytes budget lowers it) and stops
        // pulling once its deliveries fill `concurrency`: below the smaller of the two it always pulls.
        worker_holds: u32::from(hookfleet_crds::contract::memory::effective_prefetch(
            // The CRD bounds both to what fits (`limits::PREFETCH`, `limits::IN_FLIGHT_BYTES`).
            u16::try_from(spec.source.prefetch).unwrap_or(u16::MAX),
            spec.source.max_message_bytes,
            u64::try_from(spec.workers.in_flight_bytes).unwrap_or_default(),
        ))
        .min(spec.delivery.concurrency)
        .max(1),
    };
    let nats = nats.clone();
    let probe = Probe::ask(async move { nats.observe(&question).await });
    Ok((probe, checksum))
}
