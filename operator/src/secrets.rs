//! The Secrets an Integration references: which keys (for the existence check and the Secret watch),
//! reading them, and the checksum that rolls the workers when one changes.
//!
//! The checksum is a SHA-256 of each referenced Secret's name, uid and `resourceVersion`, not of its data:
//! it lands in an annotation anyone who can read Deployments sees, and a hash of a short password is a
//! guessable hash. The price is that a metadata-only edit of a referenced Secret (a label) also rolls the
//! workers; a rollout surges first, so that costs time, not deliveries.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use hookfleet_crds::IntegrationSpec;
use hookfleet_crds::integration::{DestinationSpec, SecretKeyRef};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use sha2::{Digest, Sha256};

use crate::core::status::{SourceObs, reason};

use crate::names::{TLS_CERT_KEY, TLS_KEY_KEY};

/// A referenced Secret the API server did not give (a missing Secret is no error: it is a problem the team
/// fixes, see [`dereference`]).
#[derive(Debug, thiserror::Error)]
#[error("reading Secret {name}: {source}")]
pub struct ReadError {
    pub name: String,
    #[source]
    pub source: kube::Error,
}

/// One referenced Secret key and the spec field that names it (for conditions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRef {
    pub name: String,
    pub key: String,
    pub field: String,
}

fn key_ref(r: &SecretKeyRef, field: impl Into<String>) -> KeyRef {
    KeyRef {
        name: r.name.clone(),
        key: r.key.clone(),
        field: field.into(),
    }
}

const NATS_CREDENTIALS_FIELD: &str = "spec.source.nats.credentialsSecretRef";
const NATS_TOKEN_FIELD: &str = "spec.source.nats.tokenSecretRef";

/// Every Secret key the workers read, the broker URI first.
pub fn referenced_keys(spec: &IntegrationSpec) -> Vec<KeyRef> {
    let mut refs = vec![key_ref(
        &spec.source.connection_secret_ref,
        "spec.source.connectionSecretRef",
    )];
    if let Some(n) = &spec.source.nats {
        if let Some(r) = &n.credentials_secret_ref {
            refs.push(key_ref(r, NATS_CREDENTIALS_FIELD));
        }
        if let Some(r) = &n.token_secret_ref {
            refs.push(key_ref(r, NATS_TOKEN_FIELD));
        }
    }
    if let Some(d) = &spec.destination {
        refs.extend(destination_keys(d, "spec.destination"));
    }
    refs
}

/// Every Secret key a destination references, each with its field under `prefix` (`spec.destination`).
pub fn destination_keys(d: &DestinationSpec, prefix: &str) -> Vec<KeyRef> {
    let mut refs = Vec::new();
    for h in &d.headers_from {
        refs.push(key_ref(
            &h.secret_key_ref,
            format!("{prefix}.headersFrom[{}]", h.name),
        ));
    }
    if let Some(s) = &d.signing {
        if let Some(r) = &s.secret_ref {
            refs.push(key_ref(r, format!("{prefix}.signing.secretRef")));
        }
        for (i, r) in s.secret_refs.iter().enumerate() {
            refs.push(key_ref(r, format!("{prefix}.signing.secretRefs[{i}]")));
        }
    }
    if let Some(a) = &d.auth {
        if let Some(b) = &a.basic {
            refs.push(key_ref(
                &b.username_from,
                format!("{prefix}.auth.basic.usernameFrom"),
            ));
            refs.push(key_ref(
                &b.password_from,
                format!("{prefix}.auth.basic.passwordFrom"),
            ));
        }
        if let Some(b) = &a.bearer {
            refs.push(key_ref(&b.token_from, format!("{prefix}.auth.bearer.tokenFrom")));
        }
        if let Some(o) = &a.oauth2 {
            refs.push(key_ref(
                &o.client_id_from,
                format!("{prefix}.auth.oauth2.clientIdFrom"),
            ));
            refs.push(key_ref(
                &o.client_secret_from,
                format!("{prefix}.auth.oauth2.clientSecretFrom"),
            ));
        }
    }
    if let Some(t) = &d.tls {
        if let Some(r) = &t.ca_from {
            refs.push(key_ref(r, format!("{prefix}.tls.caFrom")));
        }
        if let Some(s) = &t.client_cert_secret {
            for key in [TLS_CERT_KEY, TLS_KEY_KEY] {
                refs.push(KeyRef {
                    name: s.name.clone(),
                    key: key.into(),
                    field: format!("{prefix}.tls.clientCertSecret"),
                });
            }
        }
    }
    refs
}

/// Names of the Secrets an Integration references (the Secret watch maps a change to these).
pub fn referenced_names(spec: &IntegrationSpec) -> BTreeSet<String> {
    referenced_keys(spec).into_iter().map(|k| k.name).collect()
}

/// What dereferencing the Secrets found: the broker URI and the checksum of the Secrets' versions, and
/// what it was found from (the referenced keys and each Secret's uid and `resourceVersion`), so the next
/// reconcile can reuse it while none of those changed ([`dereference`]).
#[derive(Clone)]
pub struct Dereferenced {
    /// The value of `spec.source.connectionSecretRef` (the broker URIs, or the NATS server URLs).
    pub amqp_uri: Vec<u8>,
    /// The value of `spec.source.nats.credentialsSecretRef` (a NATS credentials file).
    pub nats_credentials: Option<Vec<u8>>,
    /// The value of `spec.source.nats.tokenSecretRef`.
    pub nats_token: Option<Vec<u8>>,
    pub checksum: String,
    refs: Vec<KeyRef>,
    versions: BTreeMap<String, (String, String)>,
}

impl std::fmt::Debug for Dereferenced {
    // The URI holds credentials: never in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dereferenced")
            .field("amqp_uri", &"<redacted>")
            .field("checksum", &self.checksum)
            .field("versions", &self.versions)
            .finish_non_exhaustive()
    }
}

/// The Secrets of the watched namespaces as the operator's metadata watch last saw them: names, uids and
/// `resourceVersion`s, never data (see [`slim_meta`]).
pub type Versions = Store<PartialObjectMeta<Secret>>;

/// What the Secret cache keeps of a Secret's metadata: its name, namespace, uid and `resourceVersion`.
pub fn slim_meta(s: &mut PartialObjectMeta<Secret>) {
    let m = std::mem::take(&mut s.metadata);
    s.metadata = ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        ..ObjectMeta::default()
    };
}

/// The referenced Secrets as last read, shared by every Integration that references them (one Secret of
/// broker credentials usually serves a namespace's Integrations): a Secret is read once, not once per
/// Integration, and reused while the Secret watch shows it at the version read. Only Secrets some
/// Integration references are ever read; held in memory, never logged. An entry goes when its Secret is
/// at another version (or gone) the next time anything is read.
#[derive(Default)]
pub struct Reads {
    map: Mutex<HashMap<(String, String), Arc<Secret>>>,
}

impl Reads {
    /// `ns/name` as last read, if the watch (`versions`) shows it at that version.
    fn current(&self, ns: &str, name: &str, versions: &Versions) -> Option<Arc<Secret>> {
        let map = self.map.lock().expect("lock");
        let s = map.get(&(ns.to_owned(), name.to_owned()))?;
        is_current(ns, name, &s.metadata, versions).then(|| s.clone())
    }

    /// Keeps `secret`, read just now, (only what [`dereference`] reads of it), dropping the entries the
    /// watch no longer shows at their version.
    fn keep(&self, ns: &str, secret: Secret, versions: &Versions) -> Arc<Secret> {
        let m = secret.metadata;
        let kept = Arc::new(Secret {
            metadata: ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                uid: m.uid,
                resource_version: m.resource_version,
                ..ObjectMeta::default()
            },
            data: secret.data,
            string_data: secret.string_data,
            ..Secret::default()
        });
        let mut map = self.map.lock().expect("lock");
        map.retain(|(ns, name), s| is_current(ns, name, &s.metadata, versions));
        map.insert((ns.to_owned(), kept.name_any()), kept.clone());
        kept
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().expect("lock").len()
    }
}

/// The watch shows `ns/name` with this uid and `resourceVersion`.
fn is_current(ns: &str, name: &str, meta: &ObjectMeta, versions: &Versions) -> bool {
    versions
        .get(&ObjectRef::new(name).within(ns))
        .is_some_and(|w| version_of(&w.metadata) == version_of(meta))
}

fn version_of(meta: &ObjectMeta) -> (String, String) {
    (
        meta.uid.clone().unwrap_or_default(),
        meta.resource_version.clone().unwrap_or_default(),
    )
}

/// True when `previous` was read from the Secrets `refs` name, at the versions the watch shows now.
fn still_current(previous: &Dereferenced, refs: &[KeyRef], ns: &str, versions: &Versions) -> bool {
    previous.refs == refs
        && previous.versions.iter().all(|(name, v)| {
            versions
                .get(&ObjectRef::new(name).within(ns))
                .is_some_and(|m| version_of(&m.metadata) == *v)
        })
}

/// The checksum of `(name, uid, resourceVersion)` of each Secret, in name order.
pub fn checksum<'a>(secrets: impl IntoIterator<Item = &'a Secret>) -> String {
    let versions: BTreeMap<String, (String, String)> = secrets
        .into_iter()
        .map(|s| {
            (
                s.name_any(),
                (
                    s.metadata.uid.clone().unwrap_or_default(),
                    s.metadata.resource_version.clone().unwrap_or_default(),
                ),
            )
        })
        .collect();
    let mut h = Sha256::new();
    for (name, (uid, rv)) in versions {
        h.update(format!("{name}\0{uid}\0{rv}\n").as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of `key` in `secret` (`data`, else `stringData`).
pub fn value(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.clone().into_bytes())
        })
}

/// Secret `ns/name` (None when it does not exist), from `reads` while the watch (`versions`) shows it at
/// the version read, else from the API server (and kept in `reads`).
pub async fn read(
    client: &Client,
    ns: &str,
    name: &str,
    versions: &Versions,
    reads: &Reads,
) -> Result<Option<Arc<Secret>>, ReadError> {
    if let Some(s) = reads.current(ns, name, versions) {
        return Ok(Some(s));
    }
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    Ok(api
        .get_opt(name)
        .await
        .map_err(|source| ReadError {
            name: name.to_owned(),
            source,
        })?
        .map(|s| reads.keep(ns, s, versions)))
}

/// The `(uid, resourceVersion)` of a Secret as read.
pub fn version(secret: &Secret) -> (String, String) {
    version_of(&secret.metadata)
}

/// Reads every referenced Secret once (or takes it from `reads`, see [`Reads`]); `Ok(Err(problem))` when
/// the team must fix something (a Secret or a key that is missing).
///
/// `previous` (the last result for this Integration) is returned again without a request while the same
/// keys are referenced and the Secret watch (`versions`) shows every Secret at the version it was read at:
/// a Secret's `resourceVersion` changes with every write, and the watch event of a change reconciles the
/// Integrations that reference it. So a reconcile triggered by a child or a pod costs no Secret read.
pub async fn dereference(
    client: &Client,
    ns: &str,
    spec: &IntegrationSpec,
    versions: &Versions,
    previous: Option<&Dereferenced>,
    reads: &Reads,
) -> Result<Result<Dereferenced, SourceObs>, ReadError> {
    let refs = referenced_keys(spec);
    if let Some(p) = previous
        && still_current(p, &refs, ns, versions)
    {
        return Ok(Ok(p.clone()));
    }
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut read: BTreeMap<String, Arc<Secret>> = BTreeMap::new();
    let (mut amqp_uri, mut nats_credentials, mut nats_token) = (None, None, None);
    for r in &refs {
        if !read.contains_key(&r.name) {
            let secret = match reads.current(ns, &r.name, versions) {
                Some(s) => Some(s),
                None => api
                    .get_opt(&r.name)
                    .await
                    .map_err(|source| ReadError {
                        name: r.name.clone(),
                        source,
                    })?
                    .map(|s| reads.keep(ns, s, versions)),
            };
            let Some(secret) = secret else {
                return Ok(Err(SourceObs::Problem {
                    reason: reason::SECRET_NOT_FOUND,
                    message: format!("Secret {:?} ({}) not found in namespace {ns}", r.name, r.field),
                }));
            };
            read.insert(r.name.clone(), secret);
        }
        let Some(v) = value(&read[&r.name], &r.key) else {
            return Ok(Err(SourceObs::Problem {
                reason: reason::SECRET_KEY_NOT_FOUND,
                message: format!("Secret {:?} ({}) has no key {:?}", r.name, r.field, r.key),
            }));
        };
        match r.field.as_str() {
            NATS_CREDENTIALS_FIELD => nats_credentials = Some(v),
            NATS_TOKEN_FIELD => nats_token = Some(v),
            _ => {
                amqp_uri.get_or_insert(v);
            }
        }
    }
    Ok(Ok(Dereferenced {
        amqp_uri: amqp_uri.unwrap_or_default(),
        nats_credentials,
        nats_token,
        checksum: checksum(read.values().map(|s| s.as_ref())),
        versions: read
            .iter()
            .map(|(name, s)| (name.clone(), version_of(&s.metadata)))
            .collect(),
        refs,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str, rv: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        }
    }

    fn watch(secrets: &[(&str, &str)]) -> Versions {
        use kube::runtime::watcher;
        let mut w = kube::runtime::reflector::store::Writer::<PartialObjectMeta<Secret>>::default();
        for (name, rv) in secrets {
            let mut meta = secret(name, rv).metadata;
            meta.namespace = Some("ns".into());
            w.apply_watcher_event(&watcher::Event::Apply(PartialObjectMeta {
                types: None,
                metadata: meta,
                _phantom: Default::default(),
            }));
        }
        w.as_reader()
    }

    #[test]
    fn a_secret_read_is_reused_only_at_the_version_the_watch_shows() {
        let reads = Reads::default();
        let v1 = watch(&[("rabbitmq", "1"), ("other", "5")]);
        assert!(reads.current("ns", "rabbitmq", &v1).is_none());
        let mut read = secret("rabbitmq", "1");
        read.metadata.managed_fields = Some(Vec::new());
        let kept = reads.keep("ns", read, &v1);
        assert!(kept.metadata.managed_fields.is_none(), "kept slim");
        assert!(reads.current("ns", "rabbitmq", &v1).is_some());
        // Another namespace's Secret of the same name is not this one.
        assert!(reads.current("other-ns", "rabbitmq", &v1).is_none());
        // Changed (the watch shows version 2): read again; the stale entry goes at the next keep.
        let v2 = watch(&[("rabbitmq", "2"), ("other", "5")]);
        assert!(reads.current("ns", "rabbitmq", &v2).is_none());
        reads.keep("ns", secret("other", "5"), &v2);
        assert_eq!(reads.len(), 1);
        assert!(reads.current("ns", "other", &v2).is_some());
    }

    #[test]
    fn the_contracts_secret_refs_are_the_operators_destination_keys() {
        // The Secret watch maps a Secret to fleets by `secrets::destination_keys` (cheap); the compile
        // reads what the contract lists. Both must name the same keys.
        let w: hookfleet_crds::Webhook = serde_json::from_value(serde_json::json!({
            "apiVersion": "hookfleet.io/v1alpha1", "kind": "Webhook", "metadata": {"name": "all"},
            "spec": {"integration": "fleet", "events": ["a"], "destination": {
                "url": "https://h.example/",
                "headersFrom": [{"name": "X-Key", "secretKeyRef": {"name": "h", "key": "k"}}],
                "signing": {"secretRef": {"name": "s1", "key": "k"}, "secretRefs": [{"name": "s2", "key": "k"}]},
                "auth": {"oauth2": {"tokenUrl": "https://t.example/token",
                    "clientIdFrom": {"name": "o", "key": "id"}, "clientSecretFrom": {"name": "o", "key": "secret"}}},
                "tls": {"caFrom": {"name": "ca", "key": "ca.crt"}, "clientCertSecret": {"name": "client"}},
            }},
        }))
        .unwrap();
        let key = |n: &str, k: &str| (n.to_owned(), k.to_owned());
        let contract: std::collections::BTreeSet<_> = crate::core::webhooks::secret_refs(&w, false)
            .iter()
            .map(|r| key(&r.name, &r.key))
            .collect();
        let operator: std::collections::BTreeSet<_> =
            destination_keys(&w.spec.destination, "spec.destination")
                .iter()
                .map(|r| key(&r.name, &r.key))
                .collect();
        assert_eq!(contract, operator);
        assert_eq!(contract.len(), 8, "{contract:?}");
    }

    #[test]
    fn checksum_follows_versions_not_order() {
        let (a, b) = (secret("a", "1"), secret("b", "7"));
        let c = checksum([&a, &b]);
        assert_eq!(c.len(), 64);
        assert_eq!(c, checksum([&b, &a]));
        assert_ne!(c, checksum([&a, &secret("b", "8")]));
        assert_ne!(c, checksum([&a]));
    }
}
