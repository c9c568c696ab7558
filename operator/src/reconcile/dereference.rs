//! Step 1, dereference: what the world is for one Integration. The broker URI from its Secret (and that
//! every other referenced Secret key exists), the queue as the broker sees it, and the children and worker
//! pods from the operator's caches. The only step that reads; nothing is written.

use std::sync::Arc;

use hookfleet_crds::Integration;
use hookfleet_crds::integration::SecretKeyRef;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};

use crate::controller::Context;
use crate::desired::{self, INTEGRATION_LABEL};
use crate::status::{SourceObs, reason};

/// The world as it is, for one Integration.
#[derive(Clone, Debug)]
pub struct World {
    pub source: SourceObs,
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
    let source = observe_source(intg, ctx, &ns).await?;
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
        deployment: ctx.deployments.get(&ObjectRef::new(&name).within(&ns)),
        pdb: ctx.pdbs.get(&ObjectRef::new(&name).within(&ns)),
        service: ctx
            .services
            .get(&ObjectRef::new(&desired::service_name(&name)).within(&ns)),
        pods,
    })
}

/// Reads one Secret key; `Ok(Err(problem))` when the team must fix something.
async fn secret_value(
    client: &Client,
    ns: &str,
    r: &SecretKeyRef,
    field: &str,
) -> Result<Result<Vec<u8>, SourceObs>, DereferenceError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = api
        .get_opt(&r.name)
        .await
        .map_err(|source| DereferenceError::ReadSecret {
            name: r.name.clone(),
            source,
        })?;
    let Some(secret) = secret else {
        return Ok(Err(SourceObs::Problem {
            reason: reason::SECRET_NOT_FOUND,
            message: format!("Secret {:?} ({field}) not found in namespace {ns}", r.name),
        }));
    };
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(&r.key))
                .map(|s| s.clone().into_bytes())
        });
    Ok(value.ok_or_else(|| SourceObs::Problem {
        reason: reason::SECRET_KEY_NOT_FOUND,
        message: format!("Secret {:?} ({field}) has no key {:?}", r.name, r.key),
    }))
}

/// The broker URI from its Secret (and that every other referenced Secret key exists), then the queue as
/// the broker sees it.
async fn observe_source(intg: &Integration, ctx: &Context, ns: &str) -> Result<SourceObs, DereferenceError> {
    let spec = &intg.spec;
    let uri = match secret_value(
        &ctx.client,
        ns,
        &spec.source.connection_secret_ref,
        "spec.source.connectionSecretRef",
    )
    .await?
    {
        Ok(v) => v,
        Err(problem) => return Ok(problem),
    };
    let mut refs: Vec<(&SecretKeyRef, String)> = spec
        .destination
        .headers_from
        .iter()
        .map(|h| {
            (
                &h.secret_key_ref,
                format!("spec.destination.headersFrom[{}]", h.name),
            )
        })
        .collect();
    if let Some(s) = &spec.destination.signing {
        refs.push((&s.secret_ref, "spec.destination.signing.secretRef".into()));
    }
    for (r, field) in refs {
        if let Err(problem) = secret_value(&ctx.client, ns, r, &field).await? {
            return Ok(problem);
        }
    }
    let Ok(uri) = String::from_utf8(uri) else {
        return Ok(SourceObs::Problem {
            reason: reason::INVALID_BROKER_URI,
            message: "the broker URI in spec.source.connectionSecretRef is not UTF-8".into(),
        });
    };
    Ok(ctx.broker.observe(uri.trim(), &spec.source.queue).await)
}
