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

use crate::context::Context;
use crate::core::desired;
use crate::core::status::{SourceObs, reason};
use crate::names::INTEGRATION_LABEL;
use crate::secrets;

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
    #[error(transparent)]
    ReadSecret(#[from] secrets::ReadError),
}

/// The reason `World::source` carries between [`dereference`] and the broker's answer; never in a status
/// (the reconcile asks before its status step).
const NOT_ASKED: &str = "BrokerNotAsked";

/// The broker question of one reconcile: asked by [`Question::ask`], which the reconcile may overlap
/// with the apply (see `crate::reconcile`).
pub struct Question {
    uri: String,
    queue: String,
}

impl Question {
    /// What the broker says about the queue.
    pub async fn ask(&self, ctx: &Context) -> SourceObs {
        ctx.broker.observe(self.uri.trim(), &self.queue).await
    }
}

/// Reads what the Integration refers to and what its children and pods look like. The queue as the broker
/// sees it is the [`Question`] returned beside: until it is asked, `World::source` says so (reason
/// `BrokerNotAsked`); when the Secrets already tell a problem, there is no question and `source` is that
/// problem.
pub async fn dereference(
    intg: &Integration,
    ctx: &Context,
) -> Result<(World, Option<Question>), DereferenceError> {
    let ns = intg.namespace().unwrap_or_default();
    let name = intg.name_any();
    let (source, question, secrets_checksum) = observe_secrets(intg, ctx, &ns).await?;
    let pods = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns.as_str()) && p.labels().get(INTEGRATION_LABEL) == Some(&name)
        })
        .collect();
    let world = World {
        source,
        secrets_checksum,
        deployment: ctx.deployments.get(&ObjectRef::new(&name).within(&ns)),
        pdb: ctx.pdbs.get(&ObjectRef::new(&name).within(&ns)),
        service: ctx
            .services
            .get(&ObjectRef::new(&desired::service_name(&name)).within(&ns)),
        pods,
    };
    Ok((world, question))
}

/// The referenced Secrets (the broker URI, that every other key exists, the checksum of their versions),
/// and the question for the broker when they are fine.
async fn observe_secrets(
    intg: &Integration,
    ctx: &Context,
    ns: &str,
) -> Result<(SourceObs, Option<Question>, Option<String>), DereferenceError> {
    let spec = &intg.spec;
    let (name, uid) = (intg.name_any(), intg.metadata.uid.clone().unwrap_or_default());
    let previous = ctx.memory.with(ns, &name, &uid, |m| m.secrets.clone());
    let found = secrets::dereference(
        &ctx.client,
        ns,
        spec,
        &ctx.secrets,
        previous.as_ref(),
        &ctx.secret_reads,
    )
    .await?;
    let secrets = match found {
        Ok(d) => d,
        Err(problem) => {
            ctx.memory.with(ns, &name, &uid, |m| m.secrets = None);
            return Ok((problem, None, None));
        }
    };
    let checksum = Some(secrets.checksum.clone());
    let uri = String::from_utf8(secrets.amqp_uri.clone());
    ctx.memory.with(ns, &name, &uid, |m| m.secrets = Some(secrets));
    let Ok(uri) = uri else {
        return Ok((
            SourceObs::Problem {
                reason: reason::INVALID_BROKER_URI,
                message: "the broker URI in spec.source.connectionSecretRef is not UTF-8".into(),
            },
            None,
            checksum,
        ));
    };
    let not_asked = SourceObs::Problem {
        reason: NOT_ASKED,
        message: "the broker has not been asked yet".into(),
    };
    let question = Question {
        uri,
        queue: spec.source.queue.clone(),
    };
    Ok((not_asked, Some(question), checksum))
}
