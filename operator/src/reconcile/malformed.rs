//! A stored Integration that does not fit the types (written under an older or looser CRD; stored objects
//! are not re-validated): the reconcile's only step for it reports that, with the field, in its conditions
//! and an Event, and applies nothing.

use hookfleet_crds::Integration;
use hookfleet_crds::integration::condition;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Resource;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::error_boundary::InvalidObject;
use tracing::warn;

use crate::context::Context;
use crate::core::status::{self, reason};

/// Where a stored Integration does not fit the types, with the field: `spec.workers.replicas: invalid
/// type: string "three", expected i32`. The guard's own error has no path, so the raw object is read
/// once more (only for malformed objects, once per change) and deserialized with path tracking.
async fn deserialize_error(
    ctx: &Context,
    ns: &str,
    name: &str,
    invalid: &InvalidObject,
) -> (String, serde_json::Value) {
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &ApiResource::erase::<Integration>(&()));
    let raw = match api.get(name).await.map(serde_json::to_value) {
        Ok(Ok(raw)) => raw,
        _ => return (invalid.error.clone(), serde_json::Value::Null),
    };
    let message = match serde_path_to_error::deserialize::<_, Integration>(raw.clone()) {
        Err(e) if e.path().to_string() != "." => format!("{}: {}", e.path(), e.inner()),
        Err(e) => e.inner().to_string(),
        // Changed in between: the next watch event brings the new object.
        Ok(_) => invalid.error.clone(),
    };
    (message, raw)
}

/// What the reconcile of a malformed Integration fails with, once [`malformed`] has reported it: the
/// message of its conditions. The error policy then waits for the object to change: retrying cannot fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

/// A stored Integration that does not deserialize: nothing is applied; Ready=False/Degraded=True with
/// reason `InvalidSpec` quoting the error (the field named) and a Warning Event when that changes.
pub async fn malformed(invalid: &InvalidObject, ctx: &Context, ns: &str, name: &str) -> InvalidSpec {
    let (message, raw) = deserialize_error(ctx, ns, name, invalid).await;
    let message = format!("the Integration does not match hookfleet.io/v1alpha1: {message}; fix the object");
    let generation = invalid.metadata.generation;
    // The old conditions, read leniently: the status may be as wrong as the spec.
    let old: Vec<Condition> = raw
        .pointer("/status/conditions")
        .cloned()
        .and_then(|c| serde_json::from_value(c).ok())
        .unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let cond = |type_: &str| Condition {
        type_: type_.into(),
        status: if type_ == condition::DEGRADED {
            "True"
        } else {
            "False"
        }
        .into(),
        reason: reason::INVALID_SPEC.into(),
        message: message.clone(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    };
    let new = status::merge_conditions(
        &old,
        vec![cond(condition::READY), cond(condition::DEGRADED)],
        &now,
    );
    let unchanged = |t: &str| {
        let find = |cs: &[Condition]| {
            cs.iter()
                .find(|c| c.type_ == t)
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        };
        find(&old) == find(&new)
    };
    let regarding = ObjectReference {
        api_version: Some(Integration::api_version(&()).into()),
        kind: Some(Integration::kind(&()).into()),
        name: Some(name.into()),
        namespace: Some(ns.into()),
        uid: invalid.metadata.uid.clone(),
        resource_version: invalid.metadata.resource_version.clone(),
        ..Default::default()
    };
    ctx.metrics
        .integration_conditions(&crate::memory::key(ns, name), &new);
    if !(unchanged(condition::READY) && unchanged(condition::DEGRADED)) {
        ctx.event(&regarding, true, reason::INVALID_SPEC, message.clone())
            .await;
        // A merge patch, not server-side apply: apply must convert the live object to its schema type, which
        // fails on exactly the fields that are wrong (500 "failed to create typed live object").
        let body = serde_json::json!({
            "status": {"observedGeneration": generation, "conditions": new},
        });
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), ns, &ApiResource::erase::<Integration>(&()));
        let pp = PatchParams {
            field_manager: Some(ctx.config.field_manager.clone()),
            ..Default::default()
        };
        match api.patch_status(name, &pp, &Patch::Merge(&body)).await {
            Ok(_) => ctx.metrics.write("IntegrationStatus"),
            // The Event already says it; a status the API server refuses must not hide the cause.
            Err(e) => warn!(error = %e, "writing the status of a malformed Integration"),
        }
    }
    InvalidSpec(message)
}
