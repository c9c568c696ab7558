//! Step 4, status: conditions from what was observed and decided, written only when they changed, and
//! every Event derived from the transition between the status last written and the new one.

use hookfleet_crds::Integration;
use hookfleet_crds::integration::condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use tracing::{debug, info};

use super::build::Desired;
use super::dereference::World;
use crate::context::Context;
use crate::core::desired;
use crate::core::pacing;
use crate::core::status::{self, DeploymentObs, Observed};
use crate::memory::Entry;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("writing the Integration status: {0}")]
    Write(#[source] kube::Error),
}

/// What the status step reports back to the reconcile.
pub struct Reported {
    /// Degraded=True: requeue sooner.
    pub has_problem: bool,
    /// A changed status held back (`pacing::hold_status`): reconcile again after this, to write it.
    pub held: Option<std::time::Duration>,
}

/// Computes the status, publishes the Events of its transitions and writes it when it changed. It takes
/// the whole context: it writes (client, field manager, recorder, metrics) and asks whether the other
/// Integrations wait for a first status (`Context::catching_up`); what it remembers is in `memory`.
pub async fn status(
    ctx: &Context,
    memory: &Entry,
    intg: &Integration,
    world: &World,
    desired: &Desired,
    fleet: Option<&super::webhooks::Outcome>,
) -> Result<Reported, StatusError> {
    let spec = &intg.spec;
    let ns = intg.namespace().unwrap_or_default();
    let name = intg.name_any();
    let uid = intg.metadata.uid.clone().unwrap_or_default();
    let pod_problems = world.pods.iter().filter_map(|p| status::pod_problem(p)).collect();
    let restarts = world.pods.iter().map(|p| status::worker_restarts(p)).sum::<i64>();
    let observed = Observed {
        generation: intg.metadata.generation,
        paused: spec.paused,
        suspend: spec.suspend,
        queue: status::source_name(&spec.source),
        desired: desired.replicas,
        single_replica: desired.fixed == Some(1),
        deployment: world.deployment.as_deref().map(DeploymentObs::from_deployment),
        pod_problems,
        source: world.source.answer().await,
        selector: desired::selector_string(&name),
        destination_gone: desired.destination_gone.clone(),
        invalid_spec: desired.invalid.clone(),
        webhooks: fleet.map(|f| f.counts.clone()),
        webhooks_problem: fleet.and_then(|f| f.problem.clone()),
        excluded_nodes: desired.nodes.excluded.clone(),
        kept_nodes: desired.nodes.kept.clone(),
        poison_limit: status::poison_limit_note(&spec.source),
    };
    let cached_status = intg.status.clone().unwrap_or_default();
    let (written, since_last_write) = memory.with(|m| (m.written.clone(), m.written_at.map(|t| t.elapsed())));
    let old = written.unwrap_or_else(|| cached_status.clone());
    let mut new = status::compute(&observed);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    new.conditions = status::merge_conditions(&old.conditions, new.conditions, &now);
    // Metrics mirror the status on every pass (in memory: the steady state still writes nothing).
    ctx.metrics
        .integration_status(&crate::memory::key(&ns, &name), &new, restarts);
    let has_problem = new
        .conditions
        .iter()
        .any(|c| c.type_ == condition::DEGRADED && c.status == "True");
    // Write when either our last write or the cached object differs (someone may have edited the status);
    // in a steady state all three agree and nothing is written.
    if new != old || new != cached_status {
        let answers_generation = new.observed_generation != old.observed_generation;
        if let Some(held) =
            pacing::hold_status(answers_generation, since_last_write, || ctx.catching_up(&uid))
        {
            ctx.metrics.status_held.inc();
            debug!(
                ready = new.ready_replicas,
                retry_in = ?held,
                "status change held back while other Integrations wait for their first status"
            );
            return Ok(Reported {
                has_problem,
                held: Some(held),
            });
        }
        let autoscale_target = spec
            .workers
            .autoscale
            .as_ref()
            .map(|a| a.target_backlog_per_replica);
        let transitions = status::events(&old, &new, observed.single_replica, autoscale_target);
        let regarding = intg.object_ref(&());
        // The Events (in order) while the status is written: neither waits for the other.
        let publish = async {
            for t in transitions {
                ctx.event(&regarding, t.warning, &t.reason, t.note).await;
            }
        };
        let body = serde_json::json!({
            "apiVersion": Integration::api_version(&()),
            "kind": Integration::kind(&()),
            "status": new,
        });
        let api: Api<Integration> = Api::namespaced(ctx.client.clone(), &ns);
        let pp = PatchParams::apply(&ctx.config.field_manager).force();
        let patch = Patch::Apply(&body);
        let write = api.patch_status(&name, &pp, &patch);
        let ((), written) = futures::join!(publish, write);
        let written = written.map_err(StatusError::Write)?;
        // Remember the status as the API server stored it (timestamps at its precision), so it compares
        // equal to what the watch cache later shows.
        let stored = written.status.unwrap_or_else(|| new.clone());
        memory.with(|m| {
            m.written = Some(stored);
            m.written_at = Some(std::time::Instant::now());
        });
        ctx.metrics.write("IntegrationStatus");
        info!(
            ready = new.ready_replicas,
            consumers = new.consumers,
            backlog = new.backlog,
            "status updated"
        );
    }
    Ok(Reported {
        has_problem,
        held: None,
    })
}
