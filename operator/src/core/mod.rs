//! The pure core: what the operator decides, as functions of the spec, the observations and the clock. No
//! I/O, no shared state: nothing here imports an adapter (`broker`, `secrets`, `memory`, `slim`), the
//! `context`, a reconcile step or the `error` module, so every rule is tested without an API server.
//!
//! - [`desired`]: the children an Integration should have (Deployment, PodDisruptionBudget, Service);
//! - [`status`]: conditions, the status and the Events of its transitions, from observations;
//! - [`nodes`]: which nodes the workers are kept off (a worker there could not meet its fd limit), and when
//!   that is cleared;
//! - [`podtemplate`]: what a platform adds to the worker pods (`workers.podTemplate` over the defaults);
//! - [`replicas`]: how many workers (fixed, or following the backlog);
//! - [`pacing`]: how soon an Integration is looked at again, and when a status write may wait;
//! - [`webhooks`]: a fleet's Webhooks snapshot, the fold of its workers' reports, each Webhook's status;
//! - [`deletion`]: `deletionPolicy: Delete`: the finalizer, which queues are the Integration's own, and
//!   what an attempt to delete them means (done, retry, give up at the timeout).

pub mod deletion;
pub mod desired;
pub mod nodes;
pub mod pacing;
pub mod podtemplate;
pub mod replicas;
pub mod status;
pub mod webhooks;
