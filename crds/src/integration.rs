//! `Integration` (hookfleet.io/v1alpha1): one RabbitMQ queue delivered by a fleet of workers to one
//! webhook destination, or to the many Webhooks (`webhook.rs`) that name it.
//!
//! Everything the API server can check is in the schema (types, ranges, enums, CEL rules), so a bad
//! manifest is refused at `kubectl apply` time with a message that names the field. What only the
//! operator can check (a missing Secret, an unreachable broker) becomes a status condition.
//!
//! Every `Option` carries `skip_serializing_if`, so server-side apply never sends `null`.

// Several `printcolumn(type_ = …)` entries on one derive read to clippy as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::limits;

/// Desired state of an Integration.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hookfleet.io",
    version = "v1alpha1",
    kind = "Integration",
    namespaced,
    status = "IntegrationStatus",
    derive = "PartialEq",
    shortname = "intg",
    category = "hookfleet",
    doc = "An Integration delivers the messages of one RabbitMQ queue (or NATS JetStream stream) to one HTTP \
           webhook destination, or to the Webhooks that name it, acknowledging each message only after its delivery succeeded.",
    scale(
        spec_replicas_path = ".spec.workers.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Ready-Pods", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Consumers", type_ = "integer", json_path = ".status.consumers"),
    printcolumn(name = "Backlog", type_ = "integer", json_path = ".status.backlog"),
    printcolumn(name = "Suspend", type_ = "boolean", json_path = ".spec.suspend"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
// The worker's fd budget (worker/src/fdlimit.rs `required`): one socket per in-flight delivery, as many idle
// pooled ones, and a reserve of 64 for the broker, the metrics server and the runtime.
#[x_kube(validation = kube::core::Rule::new(
    "self.workers.fileDescriptorLimit >= 2 * self.delivery.concurrency + 64"
).message("workers.fileDescriptorLimit must be at least 2 × delivery.concurrency + 64, or the workers \
           refuse to start")
    .field_path(".workers.fileDescriptorLimit"))]
// The worker dead-letters into its own queues otherwise (`contract::queues`; `validate` says the same).
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.delivery.deadLetter) || (self.delivery.deadLetter.queue != self.source.queue \
     && self.delivery.deadLetter.queue != self.source.queue + '.retries')"
).message("delivery.deadLetter.queue must differ from source.queue and from its retry-ready queue \
           (<queue>.retries)")
    .field_path(".delivery.deadLetter.queue"))]
// hookfleet deletes only queues it declares (`SourceSpec::queues_deleted`). `has(self.source)` first: a
// stored object without it (malformed) must still take its status update, which this rule also checks.
#[x_kube(validation = kube::core::Rule::new(
    "!(has(self.source) && has(self.source.topology) && self.source.topology == 'external' \
     && has(self.source.deletionPolicy) && self.source.deletionPolicy == 'Delete')"
).message("source.deletionPolicy Delete needs source.topology managed: the queues of an external topology \
           are their owner's to delete")
    .field_path(".source.deletionPolicy"))]
// A NATS source: what only RabbitMQ has is refused by the schema, so `kubectl apply` says it at once.
#[x_kube(validation = kube::core::Rule::new(
    "!(has(self.source) && has(self.source.nats) && has(self.source.bindings) && size(self.source.bindings) > 0)"
).message("source.bindings are RabbitMQ's: a NATS stream's subjects say what it holds (source.nats.subjects \
           filter them)")
    .field_path(".source.bindings"))]
#[x_kube(validation = kube::core::Rule::new(
    "!(has(self.source) && has(self.source.nats) && has(self.source.deletionPolicy) \
     && self.source.deletionPolicy == 'Delete')"
).message("source.deletionPolicy Delete deletes RabbitMQ queues: with source.nats the stream and its consumer \
           are kept")
    .field_path(".source.deletionPolicy"))]
#[x_kube(validation = kube::core::Rule::new(
    "!(has(self.source) && has(self.source.nats)) || !(self.source.queue.contains('.') \
     || self.source.queue.contains('*') || self.source.queue.contains('>') || self.source.queue.contains(' '))"
).message("with source.nats, source.queue names the durable consumer: no '.', '*', '>' or whitespace")
    .field_path(".source.queue"))]
#[x_kube(validation = kube::core::Rule::new("has(self.destination) != has(self.webhooks)")
    .message("set exactly one of destination (one endpoint for every message) and webhooks (the fleet \
              delivers the Webhooks that name this Integration)"))]
pub struct IntegrationSpec {
    /// The RabbitMQ queue to consume, or a NATS JetStream stream (`source.nats`).
    pub source: SourceSpec,
    /// The HTTP endpoint each message is delivered to. Exactly one of `destination` and `webhooks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<DestinationSpec>,
    /// The fleet delivers many Webhooks (each a customer endpoint subscribed to event names) instead
    /// of one destination. Exactly one of `destination` and `webhooks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<WebhooksSpec>,
    /// Retries, backoff, concurrency, rate limit and dead letters.
    #[serde(default)]
    pub delivery: DeliverySpec,
    /// The worker fleet: replicas or autoscaling, disruption budget, file-descriptor limit, resources.
    #[serde(default)]
    pub workers: WorkersSpec,
    /// Stops delivery: when true the operator scales the workers to 0 and keeps the queues, so messages
    /// wait in the broker (nothing is lost, nothing is dead-lettered) until `suspend` is false again and
    /// the fleet is scaled back. Condition `Suspended` says so; a suspended Integration pages no one.
    /// Not to be confused with `paused`.
    #[serde(default)]
    pub suspend: bool,
    /// Stops reconciling, not delivery: when true the operator changes nothing it owns (Deployment,
    /// PodDisruptionBudget, Service), so the workers keep running and delivering as they are, and no spec
    /// change (`suspend` included) reaches them until `paused` is false again. Status is still observed and
    /// written. To stop delivery, use `suspend`.
    #[serde(default)]
    pub paused: bool,
}

/// How the fleet of an Integration delivers its Webhooks (`docs/webhooks.md`). What a Webhook may not
/// decide for itself (private networks, the event name's source) is set here, by the platform team.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhooksSpec {
    /// The message header holding the event name Webhooks match on; the routing key when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub event_name_header: Option<String>,
    /// What becomes of a message that no Webhook matches: `ack` (counted, then dropped) or
    /// `deadLetter` (kept in the dead-letter queue with reason `unmatched`).
    #[serde(default)]
    pub unmatched: Unmatched,
    /// Allow private, loopback and link-local addresses for every Webhook of this fleet (refused by
    /// default against SSRF). A Webhook cannot allow them itself.
    #[serde(default)]
    pub allow_private_networks: bool,
    /// Every Webhook's isolation (in-flight cap, rate limit) and auto-pause, as defaults and ceilings: a
    /// Webhook's own `limits` may only be lower.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_webhook: Option<WebhookLimits>,
}

/// What becomes of a message no Webhook matches.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Unmatched {
    /// Acked and counted (`hookfleet_messages_unmatched_total`).
    #[default]
    Ack,
    /// Dead-lettered with reason `unmatched`.
    DeadLetter,
}

impl Unmatched {
    /// Every variant, in the order error messages list them.
    pub const ALL: [Self; 2] = [Unmatched::Ack, Unmatched::DeadLetter];

    pub fn as_str(self) -> &'static str {
        match self {
            Unmatched::Ack => "ack",
            Unmatched::DeadLetter => "deadLetter",
        }
    }
}

/// Where messages come from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    /// Secret key holding the broker URI (amqp:// or amqps://, with credentials), or several separated by
    /// commas or whitespace, one per node of a RabbitMQ cluster (workers try them in turn). Never inline.
    pub connection_secret_ref: SecretKeyRef,
    /// Durable queue to consume; the worker declares it with its retry and dead-letter topology. At most
    /// 200 bytes: its delay queues are named `<queue>.delay.<ms>ms` and must stay under AMQP's 255.
    #[schemars(length(min = 1, max = limits::QUEUE_NAME_MAX))]
    pub queue: String,
    /// Exchange bindings the worker declares for the queue.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub bindings: Vec<Binding>,
    /// Unacknowledged messages the broker hands one worker at a time (`basic.qos`).
    #[serde(default = "default_prefetch")]
    #[schemars(range(min = limits::PREFETCH.min, max = limits::PREFETCH.max))]
    pub prefetch: u32,
    /// Type of the work queue, its delay queues and its dead-letter queue. `quorum` (the default) is
    /// the only type on which nothing is lost at any hop: it is replicated, its `deliveryLimit`
    /// dead-letters a message that crashes workers instead of redelivering it forever, and retries
    /// return from the delay queues by at-least-once dead-lettering (broker-confirmed). `classic`
    /// is for queues that already exist as classic queues (a queue's type cannot change in place);
    /// there a retry's return to the work queue is at-most-once and a poison message is redelivered
    /// until someone removes it. A queue that exists with another type is reported as `QueueMismatch`.
    #[serde(default)]
    pub queue_type: QueueType,
    /// Quorum queues: deliveries of one message (including redeliveries after a worker crash or
    /// shutdown) before the broker dead-letters it with reason `delivery_limit`. Ignored for classic.
    #[serde(default = "default_delivery_limit")]
    #[schemars(range(min = limits::DELIVERY_LIMIT.min, max = limits::DELIVERY_LIMIT.max))]
    pub delivery_limit: u32,
    /// Who declares the queues. `managed` (the default): the workers declare the work queue, its retry
    /// and dead-letter queues with the arguments hookfleet needs (the broker user needs `configure` on
    /// them). `external`: someone else does (the producers, the messaging-topology operator's `Queue`
    /// objects); the workers declare nothing, check at start that every queue they use exists (the
    /// Integration turns `Degraded/QueueMissing` naming the missing ones) and consume the work queue as
    /// it was declared, with read and write permissions only. The poison-message limit is then the
    /// worker's own: a message the broker has redelivered `deliveryLimit` times (its `x-delivery-count`,
    /// which quorum queues keep) is dead-lettered with reason `delivery_limit`; a classic queue counts
    /// nothing, so there is no limit. The queues to declare: docs/worker.md, "Queues declared elsewhere".
    #[serde(default)]
    pub topology: Topology,
    /// Largest message body a worker delivers, in bytes (default 1 MiB, at most 128 MiB). A larger
    /// message is not attempted: it goes to the dead-letter queue with reason `too_large`. With
    /// `workers.inFlightBytes` it bounds the memory a worker needs (docs/worker.md, "Memory").
    #[serde(default = "default_max_message_bytes")]
    #[schemars(range(min = limits::MAX_MESSAGE_BYTES.min, max = limits::MAX_MESSAGE_BYTES.max))]
    pub max_message_bytes: u32,
    /// What happens to the queues the workers declare (the work queue, `<queue>.retries`, the delay
    /// queues `<queue>.delay.<ms>ms`, the dead-letter queue, a Webhooks fleet's reports queue) when the
    /// Integration is deleted. `Retain` (the default) leaves them, and the messages in them, on the broker.
    /// `Delete` stops the workers, then deletes those queues with the messages they hold, through the
    /// finalizer `hookfleet.io/queues`; a queue another Integration also declares is kept. If the broker
    /// cannot be reached, the finalizer is removed after the operator's `--queue-deletion-timeout` (5m by
    /// default) anyway, leaving the queues (a Warning Event names them). docs/operator.md, "Deleting an
    /// Integration: deletionPolicy".
    /// Only with `topology: managed`: the queues of an external topology are their owner's.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Read a NATS JetStream stream instead of a RabbitMQ queue. With it, `connectionSecretRef` holds
    /// the NATS server URLs (`nats://` or `tls://`, `user:password@` in them if any; several separated by
    /// commas or whitespace), `queue` names the durable pull consumer the fleet shares (created by the
    /// workers with `topology: managed`), `delivery.deadLetter.queue` the dead-letter subject (default
    /// `hookfleet.dead.<queue>`), and `delivery.maxAttempts` + 1 is the consumer's `MaxDeliver`;
    /// `bindings`, `queueType` and `deliveryLimit` are RabbitMQ's and do not apply. docs/worker.md,
    /// "A NATS JetStream source".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsSourceSpec>,
}

/// A NATS JetStream source (`spec.source.nats`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!(has(self.credentialsSecretRef) && has(self.tokenSecretRef))")
    .message("set at most one of credentialsSecretRef and tokenSecretRef (a user and password go in the URLs)"))]
pub struct NatsSourceSpec {
    /// The JetStream stream to read; it must exist (the workers do not create it).
    #[schemars(length(min = 1, max = 255))]
    pub stream: String,
    /// Subject filters of the durable consumer (`orders.>`, `orders.*.created`); none: the whole stream.
    /// The subject is the event name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub subjects: Vec<String>,
    /// How long JetStream waits for a worker's ack before it redelivers a message (the consumer's
    /// `AckWait`, Go duration, 1s to 12h). Workers send an in-progress ack every third of it while a
    /// delivery runs, so a long send is not redelivered; a worker that died is redelivered after it.
    #[serde(default = "default_nats_ack_wait")]
    #[x_kube(validation = kube::core::Rule::new(limits::NATS_ACK_WAIT.cel()).message(limits::NATS_ACK_WAIT.message().as_str()))]
    #[schemars(regex(pattern = crate::duration::PATTERN))]
    pub ack_wait: Duration,
    /// Secret key holding a NATS credentials file (a user JWT and its NKey seed), mounted into the worker
    /// pods as a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretKeyRef>,
    /// Secret key holding a NATS token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
}

pub fn default_nats_ack_wait() -> Duration {
    std::time::Duration::from_secs(30).into()
}

impl SourceSpec {
    /// Whether deleting the Integration deletes its queues: `deletionPolicy: Delete` on a managed topology
    /// (the API server refuses `Delete` with `external`; a stored object from before that rule still keeps
    /// its queues).
    pub fn queues_deleted(&self) -> bool {
        self.deletion_policy == DeletionPolicy::Delete
            && self.topology == Topology::Managed
            && self.nats.is_none()
    }

    /// The policy carried out: `Retain` for an external topology, whatever the spec says.
    pub fn effective_deletion_policy(&self) -> DeletionPolicy {
        if self.queues_deleted() {
            DeletionPolicy::Delete
        } else {
            DeletionPolicy::Retain
        }
    }
}

/// What deleting an Integration does to its queues (`spec.source.deletionPolicy`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeletionPolicy {
    /// The queues and their messages stay on the broker.
    #[default]
    Retain,
    /// The queues are deleted with the messages they hold (finalizer `hookfleet.io/queues`).
    Delete,
}

impl DeletionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DeletionPolicy::Retain => "Retain",
            DeletionPolicy::Delete => "Delete",
        }
    }
}

/// 1 MiB: nginx's default `client_max_body_size`, so a larger webhook is refused (413) by many
/// receivers anyway; common webhook senders stay well below it.
pub fn default_max_message_bytes() -> u32 {
    1_048_576
}

fn default_prefetch() -> u32 {
    64
}

/// Generous, because the count also grows when a worker is stopped or crashes with the message
/// prefetched but not yet attempted: a rolling update must not dead-letter innocent messages.
pub fn default_delivery_limit() -> u32 {
    20
}

/// RabbitMQ queue type of the work, delay and dead-letter queues.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    #[default]
    Quorum,
}

impl QueueType {
    /// Every variant, in the order error messages list them.
    pub const ALL: [Self; 2] = [QueueType::Classic, QueueType::Quorum];

    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// Who declares an Integration's queues.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    #[default]
    Managed,
    External,
}

impl Topology {
    /// Every variant, in the order error messages list them.
    pub const ALL: [Self; 2] = [Topology::Managed, Topology::External];

    pub fn as_str(self) -> &'static str {
        match self {
            Topology::Managed => "managed",
            Topology::External => "external",
        }
    }
}

/// A reference to one key of a Secret in the Integration's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// An exchange binding of the work queue.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Binding {
    /// Exchange to bind to; it must exist (the worker does not declare it). No `,` or `=`: the worker
    /// reads bindings as `EXCHANGE=ROUTING_KEY`, comma-separated.
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[^,=]+$"))]
    pub exchange: String,
    /// Routing key pattern, e.g. `orders.#`. No `,`: the worker reads bindings comma-separated.
    #[serde(default)]
    #[schemars(length(max = 255), regex(pattern = r"^[^,]*$"))]
    pub routing_key: String,
}

/// The webhook endpoint: an Integration's single `destination`, or a Webhook's.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.auth) || ((!has(self.headers) || !self.headers.exists(k, k.lowerAscii() == 'authorization')) \
     && (!has(self.headersFrom) || !self.headersFrom.exists(h, h.name.lowerAscii() == 'authorization')))"
).message("auth sets the Authorization header: remove Authorization from headers and headersFrom")
    .field_path(".auth"))]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.headers) ? size(self.headers.filter(k, k.lowerAscii() == 'authorization')) : 0) \
     + (has(self.headersFrom) ? size(self.headersFrom.filter(h, h.name.lowerAscii() == 'authorization')) : 0) <= 1"
).message("Authorization is set more than once in headers and headersFrom: keep one")
    .field_path(".headers"))]
pub struct DestinationSpec {
    /// Absolute http:// or https:// URL.
    #[x_kube(validation = kube::core::Rule::new(
        "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''"
    ).message("must be an absolute http:// or https:// URL with a host"))]
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// HTTP method.
    #[serde(default)]
    pub method: HttpMethod,
    /// Extra request headers. The Standard Webhooks headers are set by the worker and cannot be overridden.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = kube::core::Rule::new(format!("self.all(k, {})", header_name_rule("k")))
        .message(header_name_message().as_str()))]
    pub headers: BTreeMap<String, String>,
    /// Headers whose values come from Secrets (tokens, API keys).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["name".into()]))]
    pub headers_from: Vec<HeaderFromSecret>,
    /// Time allowed for one request, connect to last byte (Go duration, e.g. `10s`).
    #[serde(default = "default_timeout")]
    #[x_kube(validation = kube::core::Rule::new(limits::TIMEOUT.cel()).message(limits::TIMEOUT.message().as_str()))]
    #[schemars(regex(pattern = crate::duration::PATTERN))]
    pub timeout: Duration,
    /// Optional transform of the message into the request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<BodySpec>,
    /// Standard Webhooks signing (`webhook-signature: v1,<HMAC-SHA256>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing: Option<SigningSpec>,
    /// Authentication of each request (basic, bearer or OAuth2 client credentials), with every credential
    /// read from a Secret. Sets the `Authorization` header, so `headers` and `headersFrom` must not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// TLS towards the destination: a CA bundle to trust besides the system roots, and a client
    /// certificate (mTLS), each from a Secret the operator mounts into the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Allow private, loopback and link-local destination addresses (refused by default against SSRF).
    /// Only an Integration's `destination` may set it; a Webhook follows its Integration's
    /// `webhooks.allowPrivateNetworks`.
    #[serde(default)]
    pub allow_private_networks: bool,
}

fn default_timeout() -> Duration {
    std::time::Duration::from_secs(10).into()
}

/// Headers the worker sets itself: a user's header of one of these names is refused (by the schema
/// and by the worker).
pub const RESERVED_HEADERS: [&str; 5] = [
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-length",
    "host",
];

/// The CEL rule for a header name in `var`: an HTTP token, and none of the headers the worker sets.
fn header_name_rule(var: &str) -> String {
    let reserved: Vec<String> = RESERVED_HEADERS.iter().map(|h| format!("'{h}'")).collect();
    format!(
        "{var}.matches('^[A-Za-z0-9!#$%&*+.^_`|~-]+$') && !({var}.lowerAscii() in [{}])",
        reserved.join(", ")
    )
}

/// The message of [`header_name_rule`].
fn header_name_message() -> String {
    let (last, rest) = RESERVED_HEADERS.split_last().expect("headers the worker sets");
    format!(
        "header names must be HTTP tokens and must not be {} or {last}",
        rest.join(", ")
    )
}

/// HTTP method of a delivery.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    #[default]
    Post,
    Put,
    Patch,
}

impl HttpMethod {
    /// Every variant, in the order error messages list them.
    pub const ALL: [Self; 3] = [HttpMethod::Post, HttpMethod::Put, HttpMethod::Patch];

    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
        }
    }
}

/// A request header whose value is read from a Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderFromSecret {
    /// Header name.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = kube::core::Rule::new(header_name_rule("self"))
        .message(header_name_message().as_str()))]
    pub name: String,
    /// Secret key holding the header value.
    pub secret_key_ref: SecretKeyRef,
}

/// Request body transform.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BodySpec {
    /// Template rendered with the message's JSON fields as variables; a message it cannot render is
    /// dead-lettered.
    #[schemars(length(min = 1, max = 65536))]
    pub template: String,
}

/// Standard Webhooks signing. Every secret signs every request (`webhook-signature` carries one
/// `v1,<signature>` per secret, space-separated), so a key is rotated without downtime: add the new
/// secret, let receivers switch, remove the old one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.secretRef) || (has(self.secretRefs) && size(self.secretRefs) > 0)")
    .message("set signing.secretRef or signing.secretRefs"))]
pub struct SigningSpec {
    /// Secret key holding the signing secret (`whsec_<base64>` or raw bytes; several space-separated
    /// secrets in one key sign with each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// More signing secrets, each signing every request too (key rotation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub secret_refs: Vec<SecretKeyRef>,
}

impl SigningSpec {
    /// Every referenced secret key: `secretRef` first, then `secretRefs` in order.
    pub fn refs(&self) -> impl Iterator<Item = &SecretKeyRef> {
        self.secret_ref.iter().chain(self.secret_refs.iter())
    }
}

/// How each request authenticates; exactly one of `basic`, `bearer` and `oauth2`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.basic) ? 1 : 0) + (has(self.bearer) ? 1 : 0) + (has(self.oauth2) ? 1 : 0) == 1"
).message("set exactly one of auth.basic, auth.bearer and auth.oauth2"))]
pub struct AuthSpec {
    /// HTTP Basic authentication (`Authorization: Basic …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic: Option<BasicAuthSpec>,
    /// A static bearer token (`Authorization: Bearer …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer: Option<BearerAuthSpec>,
    /// OAuth2 client credentials: the worker fetches a token from `tokenUrl`, caches it until shortly
    /// before it expires, and sends it as a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2Spec>,
}

/// HTTP Basic credentials.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BasicAuthSpec {
    /// Secret key holding the user name.
    pub username_from: SecretKeyRef,
    /// Secret key holding the password.
    pub password_from: SecretKeyRef,
}

/// A static bearer token.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BearerAuthSpec {
    /// Secret key holding the token (without the `Bearer ` prefix).
    pub token_from: SecretKeyRef,
}

/// OAuth2 client credentials grant (RFC 6749 §4.4).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2Spec {
    /// Token endpoint (absolute http:// or https:// URL). The client authenticates with HTTP Basic
    /// (`client_secret_basic`).
    #[x_kube(validation = kube::core::Rule::new(
        "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''"
    ).message("must be an absolute http:// or https:// URL with a host"))]
    #[schemars(length(min = 1, max = 2048))]
    pub token_url: String,
    /// Secret key holding the client id.
    pub client_id_from: SecretKeyRef,
    /// Secret key holding the client secret.
    pub client_secret_from: SecretKeyRef,
    /// Scopes requested (sent space-separated as `scope`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub scopes: Vec<String>,
}

/// TLS settings towards the destination (and the OAuth2 token endpoint).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Secret key holding PEM CA certificates trusted besides the system roots (a private CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_from: Option<SecretKeyRef>,
    /// A `kubernetes.io/tls` Secret (keys `tls.crt` and `tls.key`, PEM) whose certificate the worker
    /// presents when the destination asks for one (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret: Option<SecretRef>,
}

/// A reference to a whole Secret in the Integration's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// How deliveries are retried, paced and given up on.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.adaptiveThrottle) || self.adaptiveThrottle.minConcurrency <= self.concurrency"
).message("delivery.adaptiveThrottle.minConcurrency must not exceed delivery.concurrency")
    .field_path(".adaptiveThrottle.minConcurrency"))]
pub struct DeliverySpec {
    /// Attempts before a message is dead-lettered (the first delivery counts).
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = limits::MAX_ATTEMPTS.min, max = limits::MAX_ATTEMPTS.max))]
    pub max_attempts: u32,
    /// Delay between attempts.
    #[serde(default)]
    pub backoff: BackoffSpec,
    /// Deliveries in flight per worker. Half of them (rounded down) are reserved for first attempts,
    /// so a backlog of due retries never starves fresh messages; with no retries due, fresh messages
    /// use them all.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = limits::CONCURRENCY.min, max = limits::CONCURRENCY.max))]
    pub concurrency: u32,
    /// Requests per second to the destination; unlimited when absent. Per worker unless
    /// `scope: fleet` (see `scope`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Stops calling a destination that keeps failing: after `failureThreshold` consecutive retryable
    /// failures (timeouts, connection errors, 5xx, 408/425/429) messages are deferred, without
    /// spending an attempt, for `cooldown`; then one probe decides whether to close it again.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerSpec,
    /// Lowers the deliveries in flight while failures outnumber successes, and raises them again as
    /// the destination recovers. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_throttle: Option<AdaptiveThrottleSpec>,
    /// Where messages go that cannot be delivered; defaults to `<queue>.dead`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterSpec>,
}

impl Default for DeliverySpec {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            backoff: BackoffSpec::default(),
            concurrency: default_concurrency(),
            rate_limit: None,
            circuit_breaker: CircuitBreakerSpec::default(),
            adaptive_throttle: None,
            dead_letter: None,
        }
    }
}

/// The destination's circuit breaker (per worker).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    /// Consecutive retryable failures that open the breaker; 0 disables it.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = limits::CIRCUIT_BREAKER_THRESHOLD.min, max = limits::CIRCUIT_BREAKER_THRESHOLD.max))]
    pub failure_threshold: u32,
    /// How long an open breaker defers deliveries before one probe goes through (100ms–1h).
    #[serde(default = "default_breaker_cooldown")]
    #[x_kube(validation = kube::core::Rule::new(limits::CIRCUIT_BREAKER_COOLDOWN.cel()).message(limits::CIRCUIT_BREAKER_COOLDOWN.message().as_str()))]
    #[schemars(regex(pattern = crate::duration::PATTERN))]
    pub cooldown: Duration,
}

impl Default for CircuitBreakerSpec {
    fn default() -> Self {
        Self {
            failure_threshold: default_failure_threshold(),
            cooldown: default_breaker_cooldown(),
        }
    }
}

fn default_failure_threshold() -> u32 {
    20
}

fn default_breaker_cooldown() -> Duration {
    std::time::Duration::from_secs(10).into()
}

/// Adaptive throttling (per worker): at the end of each `window`, if retryable failures outnumbered
/// successes the worker halves the deliveries it lets run at once (not below `minConcurrency`);
/// otherwise it raises them by a tenth of `concurrency`, up to `concurrency`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AdaptiveThrottleSpec {
    /// Fewest deliveries in flight the throttle goes down to.
    #[serde(default = "default_throttle_min")]
    #[schemars(range(min = limits::ADAPTIVE_THROTTLE_MIN.min, max = limits::ADAPTIVE_THROTTLE_MIN.max))]
    pub min_concurrency: u32,
    /// How often successes and failures are compared (1s–10m).
    #[serde(default = "default_throttle_window")]
    #[x_kube(validation = kube::core::Rule::new(limits::ADAPTIVE_THROTTLE_WINDOW.cel()).message(limits::ADAPTIVE_THROTTLE_WINDOW.message().as_str()))]
    #[schemars(regex(pattern = crate::duration::PATTERN))]
    pub window: Duration,
}

impl Default for AdaptiveThrottleSpec {
    fn default() -> Self {
        Self {
            min_concurrency: default_throttle_min(),
            window: default_throttle_window(),
        }
    }
}

fn default_throttle_min() -> u32 {
    1
}

fn default_throttle_window() -> Duration {
    std::time::Duration::from_secs(10).into()
}

fn default_max_attempts() -> u32 {
    10
}

fn default_concurrency() -> u32 {
    128
}

/// Exponential backoff between attempts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("duration(self.initial) <= duration(self.max)")
    .message("backoff.initial must not exceed backoff.max")
    .field_path(".initial"))]
pub struct BackoffSpec {
    /// Delay before the second attempt.
    #[serde(default = "default_backoff_initial")]
    #[x_kube(validation = kube::core::Rule::new(limits::BACKOFF.cel()).message(limits::BACKOFF.message().as_str()))]
    #[schemars(regex(pattern = crate::duration::PATTERN))]
    pub initial: Duration,
    /// Longest delay between two attempts.
    #[serde(default = "default_backoff_max")]
    #[x_kube(validation = kube::core::Rule::new(limits::BACKOFF.cel()).message(limits::BACKOFF.message().as_str()))]
    #[schemars(regex(pattern = crate::duration::PATTERN))]
    pub max: Duration,
    /// Growth factor of the delay per attempt.
    #[serde(default = "default_backoff_multiplier")]
    #[schemars(range(min = limits::BACKOFF_MULTIPLIER.min, max = limits::BACKOFF_MULTIPLIER.max))]
    pub multiplier: f64,
    /// Randomisation of each delay, so recovering endpoints are not hit by a synchronised wave.
    #[serde(default)]
    pub jitter: Jitter,
}

impl Default for BackoffSpec {
    fn default() -> Self {
        Self {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
            multiplier: default_backoff_multiplier(),
            jitter: Jitter::default(),
        }
    }
}

fn default_backoff_initial() -> Duration {
    std::time::Duration::from_secs(1).into()
}

fn default_backoff_max() -> Duration {
    std::time::Duration::from_secs(600).into()
}

fn default_backoff_multiplier() -> f64 {
    2.0
}

/// Jitter applied to a backoff delay `d`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Jitter {
    /// Uniform in `[0, d]`.
    #[default]
    Full,
    /// Uniform in `[d/2, d]`.
    Equal,
    /// Exactly `d`.
    None,
}

impl Jitter {
    /// Every variant, in the order error messages list them.
    pub const ALL: [Self; 3] = [Jitter::Full, Jitter::Equal, Jitter::None];

    /// The name the worker's `--backoff-jitter` takes (the CRD's camelCase value).
    pub fn as_str(self) -> &'static str {
        match self {
            Jitter::Full => "full",
            Jitter::Equal => "equal",
            Jitter::None => "none",
        }
    }
}

/// Request rate towards the destination: a token bucket in each worker.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Sustained requests per second. With `scope: worker` (the default) this is each worker's own
    /// limit: a fleet of N workers sends up to N × perSecond. With `scope: fleet` it is the whole
    /// fleet's limit.
    #[schemars(range(min = limits::RATE_LIMIT.min, max = limits::RATE_LIMIT.max))]
    pub per_second: u32,
    /// Requests allowed in a burst; defaults to `perSecond`. Divided like `perSecond` when
    /// `scope: fleet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = limits::RATE_LIMIT.min, max = limits::RATE_LIMIT.max))]
    pub burst: Option<u32>,
    /// `worker` (default): the limit applies to each worker. `fleet`: the limit applies to the fleet;
    /// each worker takes `perSecond / consumers` (the consumers attached to the work queue, one per
    /// running worker, re-read every 5 s), so scaling the fleet, by hand or by autoscaling, changes
    /// each worker's share without a rollout.
    #[serde(default)]
    pub scope: RateLimitScope,
}

/// What a rate limit applies to.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitScope {
    /// Each worker.
    #[default]
    Worker,
    /// The whole fleet, divided among the workers consuming the queue.
    Fleet,
}

impl RateLimitScope {
    /// Every variant, in the order error messages list them.
    pub const ALL: [Self; 2] = [RateLimitScope::Worker, RateLimitScope::Fleet];

    pub fn as_str(self) -> &'static str {
        match self {
            RateLimitScope::Worker => "worker",
            RateLimitScope::Fleet => "fleet",
        }
    }
}

/// Dead-letter queue.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterSpec {
    /// Durable queue the worker declares and publishes undeliverable messages to.
    #[schemars(length(min = 1, max = 255))]
    pub queue: String,
}

/// The worker fleet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!(has(self.replicas) && has(self.autoscale))")
    .message("set either replicas or autoscale, not both")
    .field_path(".autoscale"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.disruption) || self.disruption.minAvailable < \
     (has(self.replicas) ? self.replicas : (has(self.autoscale) ? self.autoscale.min : 2))"
).message("disruption.minAvailable must be less than replicas (or autoscale.min; 2 when neither is set), \
           or no pod could ever be evicted")
    .field_path(".disruption.minAvailable"))]
pub struct WorkersSpec {
    /// Fixed number of workers; 2 when neither this nor `autoscale` is set. 1 is allowed but warned about:
    /// a single worker is a single point of failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: Option<i32>,
    /// Scale the fleet on queue backlog instead of a fixed count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleSpec>,
    /// PodDisruptionBudget; `minAvailable` defaults to replicas − 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption: Option<DisruptionSpec>,
    /// Soft `RLIMIT_NOFILE` each worker raises itself to at start (capped at the hard limit); a worker
    /// that cannot get enough for its concurrency refuses to start and says why.
    #[serde(default = "default_fd_limit")]
    #[schemars(range(min = limits::FILE_DESCRIPTOR_LIMIT.min, max = limits::FILE_DESCRIPTOR_LIMIT.max))]
    pub file_descriptor_limit: i64,
    /// Compute resources of the worker container. Without a memory request or limit, the operator sets
    /// both to what `inFlightBytes` and `source.maxMessageBytes` bound (docs/worker.md, "Memory").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Bytes of messages one worker holds at a time (both lanes), default 128 MiB: the broker hands it
    /// at most `max(1, inFlightBytes / (2 × source.maxMessageBytes))` messages per lane, never more than
    /// `source.prefetch` (RabbitMQ ignores a prefetch in bytes).
    #[serde(default = "default_in_flight_bytes")]
    #[schemars(range(min = limits::IN_FLIGHT_BYTES.min, max = limits::IN_FLIGHT_BYTES.max))]
    pub in_flight_bytes: i64,
    /// What a platform adds to the worker pods: labels and annotations, scheduling (nodeSelector,
    /// tolerations, affinity, topology spread, priority class) and image pull Secrets. Merged over the
    /// operator-wide defaults (the chart's `worker.podTemplate`); the operator keeps what it must own
    /// (the container, its probes, resources and security context, the selector labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<WorkerPodTemplate>,
}

/// The parts of the worker pods a platform may set (`spec.workers.podTemplate`, and the operator-wide
/// defaults). docs/operator.md, "Worker pod template", says how each merges.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPodTemplate {
    /// Labels and annotations added to every worker pod (the operator's own keys win).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<WorkerPodMetadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<WorkerPodSpec>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(!has(self.labels) || self.labels.all(k, !k.startsWith('hookfleet.io/'))) && \
     (!has(self.annotations) || self.annotations.all(k, !k.startsWith('hookfleet.io/')))"
).message("keys under hookfleet.io/ are the operator's own (selector labels, the Secrets checksum)"))]
pub struct WorkerPodMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Scheduling and pulling of the worker pods; each field as in a PodSpec.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Added to the operator's own (not-ready/unreachable for 30 s); one with the same key and effect
    /// replaces the operator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<k8s_openapi::api::core::v1::Toleration>>,
    /// Replaces the operator's zone anti-affinity part by part (nodeAffinity, podAffinity,
    /// podAntiAffinity); nodes the operator keeps the workers off are added to every required node term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<k8s_openapi::api::core::v1::Affinity>,
    /// Replaces the operator's spread over nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<k8s_openapi::api::core::v1::TopologySpreadConstraint>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<k8s_openapi::api::core::v1::LocalObjectReference>>,
}

impl Default for WorkersSpec {
    fn default() -> Self {
        Self {
            replicas: None,
            autoscale: None,
            disruption: None,
            file_descriptor_limit: default_fd_limit(),
            resources: None,
            in_flight_bytes: default_in_flight_bytes(),
            pod_template: None,
        }
    }
}

/// 128 MiB: with the default 1 MiB `maxMessageBytes`, the default prefetch (64) on both lanes.
pub fn default_in_flight_bytes() -> i64 {
    134_217_728
}

fn default_fd_limit() -> i64 {
    1_048_576
}

/// Replicas that follow the queue backlog.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.min <= self.max")
    .message("autoscale.min must not exceed autoscale.max")
    .field_path(".min"))]
pub struct AutoscaleSpec {
    /// Fewest workers.
    #[serde(default = "default_autoscale_min")]
    #[schemars(range(min = 1, max = 1000))]
    pub min: i32,
    /// Most workers.
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
    /// Ready messages per worker the fleet is sized for.
    #[serde(default = "default_target_backlog")]
    #[schemars(range(min = 1))]
    pub target_backlog_per_replica: i64,
    /// How long the backlog must stay low before the fleet shrinks.
    #[serde(default = "default_scale_down_stabilization")]
    #[x_kube(validation = kube::core::Rule::new(limits::SCALE_DOWN_STABILIZATION.cel()).message(limits::SCALE_DOWN_STABILIZATION.message().as_str()))]
    #[schemars(regex(pattern = crate::duration::PATTERN))]
    pub scale_down_stabilization: Duration,
}

fn default_autoscale_min() -> i32 {
    2
}

fn default_target_backlog() -> i64 {
    1000
}

fn default_scale_down_stabilization() -> Duration {
    std::time::Duration::from_secs(300).into()
}

/// PodDisruptionBudget settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionSpec {
    /// Workers that must stay up during voluntary disruptions (node drains).
    #[schemars(range(min = 0, max = 1000))]
    pub min_available: i32,
}

/// Observed state of an Integration, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IntegrationStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Desired number of workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Workers whose pods are Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Consumers attached to the queue, as the broker reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<i32>,
    /// Messages ready in the queue, as the broker reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<i64>,
    /// Label selector of the worker pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `Ready`, `Progressing`, `Degraded` (and `Paused`, `Suspended`), each with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Set while the destination is gone (a worker got HTTP 410 and exited with code 5): the workers are
    /// scaled to 0 and messages wait in the queue. Cleared when `spec.destination.url` changes or the
    /// annotation `hookfleet.io/retry-destination` is set to a new value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_gone: Option<DestinationGone>,
    /// The Webhooks naming this Integration, by state (only with `spec.webhooks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhooks: Option<WebhookCounts>,
    /// Nodes the workers are kept off (a required node affinity on the pod template, `metadata.name`
    /// NotIn these), sorted by name: a worker on them could not raise its file-descriptor limit (exit 3).
    /// An entry is cleared when the node's `Ready` condition changes after `since` (its kubelet or
    /// container runtime was restarted, as after raising the limit), when the operator's exclusion TTL has
    /// passed (a node still at the low limit fails again and is excluded again), or when the annotation
    /// `hookfleet.io/retry-nodes` is set to a new value. The last schedulable node is never excluded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["node".into()]))]
    pub excluded_nodes: Vec<ExcludedNode>,
}

/// A node the workers are kept off.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExcludedNode {
    /// The node's name (`metadata.name`).
    pub node: String,
    /// Why: `FileDescriptorLimitNotMet`.
    pub reason: String,
    /// What the worker on it wrote to its termination log.
    pub message: String,
    /// When the operator excluded it.
    pub since: Time,
    /// The value of `hookfleet.io/retry-nodes` then; setting another value clears every exclusion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_annotation: Option<String>,
}

/// The Webhooks of an Integration by state.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookCounts {
    /// Every Webhook naming this Integration.
    pub total: i32,
    /// Delivered by the fleet and not failing.
    pub ready: i32,
    /// Paused (`spec.paused`): their messages are kept until they resume.
    pub paused: i32,
    /// Their last delivery failed.
    pub failing: i32,
    /// Refused (`InvalidSpec`): not delivered until fixed.
    pub invalid: i32,
}

/// A destination that answered HTTP 410 Gone.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DestinationGone {
    /// The destination URL that answered 410 (userinfo redacted).
    pub url: String,
    /// When the first worker stopped on it (its container's `finishedAt`).
    pub since: Time,
    /// The value of `hookfleet.io/retry-destination` then; setting another value retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_annotation: Option<String>,
}

/// Annotations a user sets on an Integration.
pub mod annotation {
    /// Set (or change) to any new value to retry a destination the operator stopped on after HTTP 410.
    pub const RETRY_DESTINATION: &str = "hookfleet.io/retry-destination";
    /// Set (or change) to any new value to clear `status.excludedNodes`: the workers may run on those
    /// nodes again (one that still fails is excluded again).
    pub const RETRY_NODES: &str = "hookfleet.io/retry-nodes";
}

/// Finalizers the operator sets on an Integration.
pub mod finalizer {
    /// Set while `spec.source.deletionPolicy` is `Delete`: the operator deletes the Integration's queues
    /// before the Integration goes (or gives up after its `--queue-deletion-timeout`).
    pub const QUEUES: &str = "hookfleet.io/queues";
}

/// Condition types set on an Integration.
pub mod condition {
    /// Workers are delivering: desired replicas ready and consuming.
    pub const READY: &str = "Ready";
    /// A rollout or scale is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// Something is wrong that the fleet does not repair by itself (pods ready but not consuming,
    /// crash-looping workers, an fd limit that could not be met, a destination that is gone).
    pub const DEGRADED: &str = "Degraded";
    /// `spec.paused` is true.
    pub const PAUSED: &str = "Paused";
    /// `spec.suspend` is true: True while the workers are scaled to 0 for it, False while the operator applies
    /// nothing (`spec.paused`).
    pub const SUSPENDED: &str = "Suspended";
    /// Only on an Integration being deleted with `deletionPolicy: Delete`: False while its queues are
    /// not deleted yet, with the reason (workers still stopping, broker unreachable, a queue in use).
    pub const QUEUES_DELETED: &str = "QueuesDeleted";
}

impl Integration {
    /// The condition of type `type_`, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// What one Webhook may take of its fleet, and when it is paused for failing (`docs/webhooks.md`,
/// "Isolation"): on an Integration (`webhooks.perWebhook`) the defaults and ceilings of its Webhooks; on
/// a Webhook (`limits`) its own, lower values.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookLimits {
    /// Requests of this Webhook in flight at once in one worker (never more than half the worker's
    /// `delivery.concurrency`). A copy that finds the Webhook at its cap is set aside on its retry
    /// path without spending an attempt (reason `throttled`), and the worker goes on with the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = limits::CONCURRENCY.min, max = limits::CONCURRENCY.max))]
    pub max_in_flight: Option<u32>,
    /// Requests per second to this Webhook (a token bucket in each worker), per worker or for the whole
    /// fleet (`scope`). A copy that finds no token is set aside without spending an attempt (reason
    /// `rate_limited`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<WebhookRateLimit>,
    /// When the operator pauses a Webhook that keeps failing (`Paused=True`, reason `Failing`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<AutoPauseSpec>,
}

/// A Webhook's request rate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookRateLimit {
    /// Sustained requests per second (per worker, or for the fleet: `scope`).
    #[schemars(range(min = limits::RATE_LIMIT.min, max = limits::RATE_LIMIT.max))]
    pub per_second: u32,
    /// Requests allowed in a burst; defaults to `perSecond`. Divided like `perSecond` when
    /// `scope: fleet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = limits::RATE_LIMIT.min, max = limits::RATE_LIMIT.max))]
    pub burst: Option<u32>,
    /// `worker` (the default, as for `delivery.rateLimit`): each worker sends up to `perSecond` to this
    /// Webhook, a fleet of N workers up to N × perSecond. `fleet`: the whole fleet sends up to
    /// `perSecond`; each worker takes `perSecond / consumers` (the consumers attached to the work
    /// queue, re-read every 5 s). On a Webhook, unset means its Integration's `perWebhook` scope; a
    /// Webhook may not widen a `fleet` scope to `worker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<RateLimitScope>,
}

impl WebhookRateLimit {
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.per_second)
    }

    /// `worker` unless set.
    pub fn scope(&self) -> RateLimitScope {
        self.scope.unwrap_or_default()
    }
}

/// Auto-pause: after `consecutiveFailures` failed attempts in a row (over every worker) whose run spans
/// at least `after`, the Webhook is paused (reason `Failing`); its messages are kept on its retry path
/// and delivered after it resumes (annotation `hookfleet.io/resume`, or `spec.paused` set and cleared).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoPauseSpec {
    #[schemars(range(min = limits::AUTO_PAUSE_FAILURES.min, max = limits::AUTO_PAUSE_FAILURES.max))]
    pub consecutive_failures: u32,
    /// The least time from the run's first failure to its last (Go duration, e.g. `30m`).
    #[x_kube(validation = kube::core::Rule::new(limits::AUTO_PAUSE_AFTER.cel()).message(limits::AUTO_PAUSE_AFTER.message().as_str()))]
    #[schemars(regex(pattern = crate::duration::PATTERN))]
    pub after: kube::core::Duration,
}

impl Default for AutoPauseSpec {
    /// 50 failures in a row over at least 30 minutes.
    fn default() -> Self {
        Self {
            consecutive_failures: 50,
            after: std::time::Duration::from_secs(30 * 60).into(),
        }
    }
}

/// A Webhook's limits as its fleet applies them: its own values where it set them, else its
/// Integration's `perWebhook` (auto-pause: [`AutoPauseSpec::default`] when neither says).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Effective {
    pub max_in_flight: Option<u32>,
    pub rate_limit: Option<WebhookRateLimit>,
    pub auto_pause: AutoPauseSpec,
}

impl WebhookLimits {
    /// The limits of a Webhook with `own` in a fleet with `fleet` (a value above the fleet's is clamped
    /// to it here; `validate_webhook` refuses it first).
    pub fn effective(fleet: Option<&WebhookLimits>, own: Option<&WebhookLimits>) -> Effective {
        let fleet = fleet.cloned().unwrap_or_default();
        let own = own.cloned().unwrap_or_default();
        let min = |a: Option<u32>, b: Option<u32>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let rate_limit = match (fleet.rate_limit, own.rate_limit) {
            (Some(f), Some(o)) => Some(WebhookRateLimit {
                per_second: f.per_second.min(o.per_second),
                burst: Some(f.burst().min(o.burst())),
                // The narrower of the two: a fleet-wide limit is never widened to each worker's.
                scope: Some(if f.scope() == RateLimitScope::Fleet {
                    RateLimitScope::Fleet
                } else {
                    o.scope.unwrap_or(f.scope())
                }),
            }),
            (f, o) => f.or(o).map(|r| WebhookRateLimit {
                scope: Some(r.scope()),
                ..r
            }),
        };
        let fa = fleet.auto_pause.unwrap_or_default();
        let auto_pause = match own.auto_pause {
            Some(o) => AutoPauseSpec {
                consecutive_failures: o.consecutive_failures.min(fa.consecutive_failures),
                after: std::time::Duration::from(o.after)
                    .min(std::time::Duration::from(fa.after))
                    .into(),
            },
            None => fa,
        };
        Effective {
            max_in_flight: min(fleet.max_in_flight, own.max_in_flight),
            rate_limit,
            auto_pause,
        }
    }

    /// `(field, reason)` of each of `own`'s values above `fleet`'s: a Webhook may only lower them.
    pub fn above(fleet: Option<&WebhookLimits>, own: &WebhookLimits) -> Vec<(String, String)> {
        let fleet = fleet.cloned().unwrap_or_default();
        let mut out = Vec::new();
        let mut over = |field: &str, own: String, fleet: String| {
            out.push((
                format!("spec.limits.{field}"),
                format!(
                    "{own} is above the Integration's webhooks.perWebhook.{field} ({fleet}): a Webhook may \
                     only lower its limits"
                ),
            ))
        };
        if let (Some(o), Some(f)) = (own.max_in_flight, fleet.max_in_flight)
            && o > f
        {
            over("maxInFlight", o.to_string(), f.to_string());
        }
        if let (Some(o), Some(f)) = (own.rate_limit, fleet.rate_limit) {
            if o.per_second > f.per_second {
                over(
                    "rateLimit.perSecond",
                    o.per_second.to_string(),
                    f.per_second.to_string(),
                );
            }
            if o.burst() > f.burst() {
                over("rateLimit.burst", o.burst().to_string(), f.burst().to_string());
            }
            if f.scope() == RateLimitScope::Fleet && o.scope == Some(RateLimitScope::Worker) {
                over("rateLimit.scope", "worker".into(), "fleet".into());
            }
        }
        if let Some(o) = &own.auto_pause {
            let f = fleet.auto_pause.unwrap_or_default();
            if o.consecutive_failures > f.consecutive_failures {
                over(
                    "autoPause.consecutiveFailures",
                    o.consecutive_failures.to_string(),
                    f.consecutive_failures.to_string(),
                );
            }
            let (od, fd) = (
                std::time::Duration::from(o.after),
                std::time::Duration::from(f.after),
            );
            if od > fd {
                over(
                    "autoPause.after",
                    crate::duration::render(od),
                    crate::duration::render(fd),
                );
            }
        }
        out
    }
}
