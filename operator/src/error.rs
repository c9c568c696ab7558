//! One error enum; each variant names the step that failed and gives the metric label. It sits above the
//! reconcile steps (it wraps their errors); no step imports it.

/// Errors of the operator. Problems an application team must fix (a missing Secret, a broker that refuses
/// the login) are not errors: they are conditions (see `status`). These are the operator's own failures,
/// retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Integration is malformed: {0}")]
    InvalidObject(&'static str),
    /// A stored Integration that does not deserialize into the types; waits for a change, no retry.
    #[error(transparent)]
    InvalidSpec(#[from] crate::reconcile::malformed::InvalidSpec),
    /// The reconcile's steps (`crate::reconcile`), each with its own error.
    #[error(transparent)]
    Dereference(#[from] crate::reconcile::dereference::DereferenceError),
    #[error(transparent)]
    Webhooks(#[from] crate::reconcile::webhooks::WebhooksError),
    #[error(transparent)]
    Build(#[from] crate::reconcile::build::BuildError),
    #[error(transparent)]
    Apply(#[from] crate::reconcile::apply::ApplyError),
    #[error(transparent)]
    Status(#[from] crate::reconcile::status::StatusError),
    #[error(transparent)]
    Finalize(#[from] crate::reconcile::finalize::FinalizeError),
    #[error(
        "the Integration CRD (integrations.hookfleet.io) is not installed in this cluster; install it with \
         `kubectl apply -f crds/integrations.hookfleet.io.yaml` (or `helm install hookfleet charts/hookfleet`) \
         and start the operator again"
    )]
    CrdNotInstalled,
    #[error("talking to the API server: {0}")]
    Kube(#[from] kube::Error),
    #[error("leader election: {0}")]
    LeaderElection(String),
    #[error("lost the leader lease; stopping so that only one operator writes")]
    LostLeadership,
    #[error("serving HTTP on {addr}: {source}")]
    Http {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Label of `hookfleet_operator_reconcile_errors_total{reason}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidObject(_) => "invalid_object",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Dereference(_) => "read_secret",
            Error::Webhooks(_) => "webhooks",
            Error::Build(_) => "invalid_object",
            Error::Apply(_) => "apply",
            Error::Status(_) => "write_status",
            Error::Finalize(_) => "finalizer",
            Error::CrdNotInstalled => "crd_not_installed",
            Error::Kube(_) => "kube",
            Error::LeaderElection(_) => "leader_election",
            Error::LostLeadership => "lost_leadership",
            Error::Http { .. } => "http",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
