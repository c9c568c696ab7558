//! JetStream's confirmed publish, shared by the NATS source's copies (`jetstream`) and its Webhook
//! reports (`report`): a message counts as stored once its stream's `PubAck` came.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use bytes::Bytes;

use super::settle::PublishError;

/// Publishes to `subject` and waits for JetStream's `PubAck` (a stream stored it) within `timeout`: how
/// every copy and every report is stored on a NATS source.
pub(super) async fn publish_confirmed(
    js: &jetstream::Context,
    subject: String,
    headers: HeaderMap,
    body: &[u8],
    timeout: Duration,
) -> Result<(), PublishError> {
    let payload = Bytes::copy_from_slice(body);
    let stored = async {
        let ack = js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(publish_error)?;
        ack.await.map_err(publish_error)
    };
    match tokio::time::timeout(timeout, stored).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(PublishError::Timeout(timeout)),
    }
}

fn publish_error(e: async_nats::jetstream::context::PublishError) -> PublishError {
    match e.kind() {
        // No stream captures the subject.
        PublishErrorKind::StreamNotFound => PublishError::Returned,
        _ => PublishError::Nats(e.to_string()),
    }
}
