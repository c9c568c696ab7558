//! The names the operator's modules share: the labels and annotation it puts on what it owns, the worker
//! container's name, and the keys it reads from a TLS Secret. The bottom layer beside `config`: it imports
//! nothing of the crate, so every module may import it.

/// Label carrying the owning Integration's name; selects its pods.
pub const INTEGRATION_LABEL: &str = "hookfleet.io/integration";
/// `app.kubernetes.io/managed-by` value: the operator's caches watch only objects carrying it.
pub const MANAGED_BY: &str = "hookfleet-operator";
/// Name of the worker container (status reads its container statuses by this name).
pub const CONTAINER: &str = "worker";
/// Pod-template annotation holding the checksum of the referenced Secrets (`secrets::checksum`): when it
/// changes, the Deployment rolls.
pub const CHECKSUM_ANNOTATION: &str = "hookfleet.io/secrets-checksum";
/// Key of the client certificate in a `kubernetes.io/tls` Secret.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Key of the client key in a `kubernetes.io/tls` Secret.
pub const TLS_KEY_KEY: &str = "tls.key";
/// Annotation on a fleet's Webhooks snapshot Secret: a SHA-256 of what it was compiled from (the
/// Webhooks' specs and generations, and the referenced Secrets' uids and versions, never their values).
pub const SNAPSHOT_HASH_ANNOTATION: &str = "hookfleet.io/snapshot-hash";

/// The ServiceAccount, Role and RoleBinding of a Webhooks fleet's workers: `<integration>-worker`. The Role
/// lets them read the fleet's snapshot Secret, by name, and nothing else.
pub fn worker_access(integration: &str) -> String {
    format!("{integration}-worker")
}
