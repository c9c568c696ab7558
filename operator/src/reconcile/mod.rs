//! The steps of one Integration's reconcile, each a function in its own file with its own error, handed
//! the parts of the context it needs and this Integration's memory (taken once by the pipeline, which
//! runs them; the pipeline and the operator's error enum, which wraps these steps' errors, sit above
//! this module and are not named from here):
//!
//! 1. [`dereference`]: what the world is (Secrets, the broker's view of the queue, children, worker pods);
//!    then, for a Webhooks fleet, [`webhooks`]: its snapshot Secret, its workers' access, its report
//!    consumer, its Webhooks counted by state;
//! 2. [`build`]: the desired children (pure);
//! 3. [`apply`]: server-side apply of what changed;
//! 4. [`status`]: conditions, written only when they changed, and the Events of their transitions.
//!
//! Steps 3 and 4 run at the same time, so a first reconcile waits for one round trip, not two: the status
//! reads what step 1 observed and step 2 decided, not what the apply returns. An Integration the types
//! cannot read gets [`malformed`] instead.
//!
//! Before step 1, [`finalize::ensure`] keeps the queue finalizer as `deletionPolicy` says; an Integration
//! being deleted that holds it gets [`finalize::finalize`] instead of the steps (stop the workers, delete
//! its queues, remove the finalizer).

pub mod apply;
pub mod build;
pub mod dereference;
pub mod finalize;
pub mod malformed;
pub mod status;
pub mod webhook_status;
pub mod webhooks;

// Not a step: [`webhook_status`] writes each Webhook's status from its fleet's last compile and its
// workers' reports, on its own cadence (the controller runs it beside the reconciles).
