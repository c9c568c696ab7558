//! Step 1, dereference: what the world is for one Integration. The broker URI from its Secret (and that
//! every other referenced Secret key exists), the queue as the broker sees it, and the children and worker
//! pods from the operator's caches. The only step that reads; nothing is written.

use std::sync::Arc;

use hookfleet_crds::Integration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use crate::controller::Context;
use crate::desired::{self, INTEGRATION_LABEL};
use crate::secrets;
use crate::status::{SourceObs, reason};

/// The world as it is, for one Integration.
#[derive(Clone, Debug)]
pub struct World {
    pub source: SourceObs,
    /// Checksum of the referenced Secrets' versions (`None` while one cannot be read).
    pub secrets_checksum: Option<String>,
    pub deployment: Option<Arc<Deployment>>,
    pub pdb: Option<Arc<PodDisruptionBudget>>,
    pub service: Option<Arc<Service>>,
    /// Worker pods of the Integration.
    pub pods: Vec<Arc<Pod>>,
}

impl World {
    /// `spec.replicas` of the worker Deployment, when it exists.
    pub fn current_replicas(&self) -> Option<i32> {
        self.deployment
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.replicas)
    }

    /// Messages waiting, when the broker could be asked (a missing queue has none).
    pub fn backlog(&self) -> Option<i64> {
        match self.source {
            SourceObs::Queue { backlog, .. } => Some(backlog),
            SourceObs::QueueMissing => Some(0),
            SourceObs::Problem { .. } => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DereferenceError {
    #[error("reading Secret {name}: {source}")]
    ReadSecret {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Reads what the Integration refers to and what its children and pods look like.
pub async fn dereference(intg: &Integration, ctx: &Context) -> Result<World, DereferenceError> {
    let ns = intg.namespace().unwrap_or_default();
    let name = intg.name_any();
    let (source, secrets_checksum) = observe_source(intg, ctx, &ns).await?;
    let pods = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns.as_str()) && p.labels().get(INTEGRATION_LABEL) == Some(&name)
        })
        .collect();
    Ok(World {
        source,
        secrets_checksum,
        deployment: ctx.deployments.get(&ObjectRef::new(&name).within(&ns)),
        pdb: ctx.pdbs.get(&ObjectRef::new(&name).within(&ns)),
        service: ctx
            .services
            .get(&ObjectRef::new(&desired::service_name(&name)).within(&ns)),
        pods,
    })
}

/// The referenced Secrets (the broker URI, that every other key exists, the checksum of their versions),
/// then the queue as the broker sees it.
async fn observe_source(
    intg: &Integration,
    ctx: &Context,
    ns: &str,
) -> Result<(SourceObs, Option<String>), DereferenceError> {
    let spec = &intg.spec;
    let secrets = match secrets::dereference(&ctx.client, ns, spec).await? {
        Ok(d) => d,
        Err(problem) => return Ok((problem, None)),
    };
    let Ok(uri) = String::from_utf8(secrets.amqp_uri) else {
        return Ok((
            SourceObs::Problem {
                reason: reason::INVALID_BROKER_URI,
                message: "the broker URI in spec.source.connectionSecretRef is not UTF-8".into(),
            },
            Some(secrets.checksum),
        ));
    };
    Ok((
        ctx.broker.observe(uri.trim(), &spec.source.queue).await,
        Some(secrets.checksum),
    ))
}
