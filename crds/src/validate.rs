//! [`validate`]: what the worker would refuse at start in an Integration's spec, found before anything
//! rolls. The CRD schema already refuses what it can say (types, ranges, CEL rules); these are the
//! rules it cannot: the worker's own checks on its arguments ([`WorkerArgs::check`]) run on what the
//! operator renders for the spec, so the two cannot disagree:
//!
//! - `spec.destination.body.template`: MiniJinja must compile it (syntax, unknown filters and tests);
//! - `spec.destination.url`: the HTTP client must read it as an absolute http(s) URL with a host, and a
//!   literal private, loopback or link-local address needs `allowPrivateNetworks`;
//! - `spec.destination.headers`: names must be HTTP tokens the worker does not set itself, values free
//!   of control characters (CR, LF, …);
//! - `spec.destination.headersFrom`: names as for `headers`;
//! - `spec.destination.headers` (with `headersFrom` and `auth`): `Authorization` set once at most;
//! - `spec.destination.auth.oauth2.tokenUrl`: as the URL;
//! - `spec.delivery.deadLetter.queue`: neither the work queue nor its retry-ready queue (`<queue>.retries`);
//! - `spec.source.queue`, `spec.source.bindings`, `spec.delivery.backoff.initial`: not blank, parsable,
//!   not above `backoff.max` (the schema says these too).
//!
//! What needs a Secret's or a file's content (broker URIs, credentials, PEM files) the worker checks
//! when it starts.
//!
//! [`WorkerArgs::check`]: crate::contract::WorkerArgs::check

use crate::contract::{Invalid, Pod, WorkerSetup};
use crate::integration::IntegrationSpec;
use crate::webhook::WebhookSpec;

/// The spec fields the worker would refuse, each with the worker's reason; `Ok` when it would start.
/// Pure: the operator may call it before it touches the Deployment and report an `InvalidSpec`
/// condition naming the field, leaving the running fleet as it was.
pub fn validate(spec: &IntegrationSpec) -> Result<(), Vec<Invalid>> {
    let refused = WorkerSetup::from_spec(spec, &Pod::any()).args.check_fields();
    if refused.is_empty() { Ok(()) } else { Err(refused) }
}

/// The spec fields of a Webhook the fleet would refuse, each with the reason; `Ok` when it can be
/// delivered. Its destination goes through the same rules as an Integration's (`spec.destination.…`),
/// with private networks as its Integration allows them (`allow_private_networks`, the Integration's
/// `spec.webhooks.allowPrivateNetworks`), never as the Webhook says.
pub fn validate_webhook(
    spec: &WebhookSpec,
    allow_private_networks: bool,
    per_webhook: Option<&crate::webhook::WebhookLimits>,
) -> Result<(), Vec<Invalid>> {
    let mut refused = Vec::new();
    let no = |field: &str, reason: String| Invalid {
        field: field.to_owned(),
        reason,
    };
    if spec.destination.allow_private_networks {
        refused.push(no(
            "spec.destination.allowPrivateNetworks",
            "a Webhook cannot allow private networks: the Integration's webhooks.allowPrivateNetworks decides"
                .into(),
        ));
    }
    if spec.events.is_empty() {
        refused.push(no(
            "spec.events",
            "at least one event prefix (\"\" takes every event)".into(),
        ));
    }
    if let Some(p) = spec.events.iter().find(|p| p.chars().any(char::is_control)) {
        refused.push(no("spec.events", format!("{p:?} has a control character")));
    }
    if let Some(h) = spec
        .match_headers
        .keys()
        .find(|h| h.is_empty() || h.chars().any(|c| c.is_control() || c.is_whitespace()))
    {
        refused.push(no("spec.matchHeaders", format!("{h:?} is not a header name")));
    }
    if let Some(own) = &spec.limits {
        for (field, reason) in crate::webhook::WebhookLimits::above(per_webhook, own) {
            refused.push(no(&field, reason));
        }
    }
    let setup = WorkerSetup::for_webhook(&spec.destination, allow_private_networks);
    refused.extend(setup.args.check_fields());
    if refused.is_empty() { Ok(()) } else { Err(refused) }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::integration::{DeadLetterSpec, HeaderFromSecret, SecretKeyRef};

    fn spec() -> IntegrationSpec {
        serde_yaml::from_str(
            r#"
source:
  connectionSecretRef: {name: rabbitmq, key: uri}
  queue: orders
destination:
  url: https://erp.example.com/hooks
"#,
        )
        .unwrap()
    }

    /// `s` is refused for `field` alone, with `reason`.
    fn refuses(s: &IntegrationSpec, field: &str, reason: &str) {
        assert_eq!(refused(s), (field.to_owned(), reason.to_owned()));
    }

    /// The one field refused in `s`, and the reason.
    fn refused(s: &IntegrationSpec) -> (String, String) {
        let mut e = validate(s).expect_err("refused");
        assert_eq!(e.len(), 1, "{e:?}");
        let e = e.remove(0);
        (e.field, e.reason)
    }

    #[test]
    fn a_plain_spec_and_every_example_pass() {
        assert_eq!(validate(&spec()), Ok(()));
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut webhooks = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            let raw: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
            if raw["kind"].as_str() == Some("Webhook") {
                let w: crate::webhook::Webhook = serde_yaml::from_value(raw).unwrap();
                assert_eq!(validate_webhook(&w.spec, false, None), Ok(()));
                webhooks += 1;
                continue;
            }
            let intg: crate::integration::Integration = serde_yaml::from_value(raw).unwrap();
            assert_eq!(validate(&intg.spec), Ok(()));
        }
        assert!(webhooks >= 2, "Webhook examples: {webhooks}");
    }

    #[test]
    fn a_template_that_does_not_parse() {
        let mut s = spec();
        s.destination.as_mut().unwrap().body = Some(crate::integration::BodySpec {
            template: "{% if %}".into(),
        });
        let (field, reason) = refused(&s);
        assert_eq!(field, "spec.destination.body.template");
        assert!(reason.contains("syntax error"), "{reason}");
    }

    #[test]
    fn a_dead_letter_queue_that_is_the_work_or_retry_queue() {
        let mut s = spec();
        for (dlq, reason) in [
            ("orders", "must differ from --queue"),
            (
                "orders.retries",
                "orders.retries is the retry-ready queue of --queue",
            ),
        ] {
            s.delivery.dead_letter = Some(DeadLetterSpec { queue: dlq.into() });
            refuses(&s, "spec.delivery.deadLetter.queue", reason);
        }
    }

    #[test]
    fn cr_lf_or_another_control_character_in_a_header_value() {
        for value in ["a\r\nX-Injected: 1", "a\nb", "bell\u{7}", "del\u{7f}"] {
            let mut s = spec();
            s.destination
                .as_mut()
                .unwrap()
                .headers
                .insert("X-Source".into(), value.into());
            refuses(
                &s,
                "spec.destination.headers",
                "value of x-source is not a valid header value",
            );
        }
        let mut s = spec();
        s.destination
            .as_mut()
            .unwrap()
            .headers
            .insert("X-Ok".into(), "tab\tand ünïcode".into());
        assert_eq!(validate(&s), Ok(()));
    }

    #[test]
    fn header_names_of_headers_from_secrets() {
        let from = |name: &str| HeaderFromSecret {
            name: name.into(),
            secret_key_ref: SecretKeyRef {
                name: "s".into(),
                key: "k".into(),
            },
        };
        let mut s = spec();
        s.destination.as_mut().unwrap().headers_from = vec![from("Not A Token")];
        refuses(
            &s,
            "spec.destination.headersFrom",
            "\"Not A Token\" is not a header name",
        );
        s.destination.as_mut().unwrap().headers_from = vec![from("Webhook-Signature")];
        assert_eq!(
            refused(&s).1,
            "webhook-signature is set by the worker and cannot be overridden"
        );
    }

    #[test]
    fn authorization_from_two_places() {
        let mut s = spec();
        s.destination
            .as_mut()
            .unwrap()
            .headers
            .insert("Authorization".into(), "a".into());
        s.destination
            .as_mut()
            .unwrap()
            .headers
            .insert("authorization".into(), "b".into());
        refuses(
            &s,
            "spec.destination.headers",
            crate::contract::AUTHORIZATION_TWICE,
        );
    }

    #[test]
    fn a_url_the_http_client_cannot_use() {
        let mut s = spec();
        s.destination.as_mut().unwrap().url = "https://exa mple.com/".into();
        let (field, reason) = refused(&s);
        assert_eq!(field, "spec.destination.url");
        assert!(reason.starts_with("\"https://exa mple.com/\": "), "{reason}");
        s.destination.as_mut().unwrap().url = "mailto:ops@example.com".into();
        assert_eq!(
            refused(&s).1,
            "must be an absolute http:// or https:// URL with a host"
        );
    }

    #[test]
    fn a_private_address_needs_allow_private_networks() {
        let mut s = spec();
        s.destination.as_mut().unwrap().url = "http://169.254.169.254/latest".into();
        refuses(
            &s,
            "spec.destination.url",
            "169.254.169.254 is a link-local address; pass --allow-private-networks to allow it",
        );
        s.destination.as_mut().unwrap().allow_private_networks = true;
        assert_eq!(validate(&s), Ok(()));
    }

    #[test]
    fn an_oauth2_token_url_the_http_client_cannot_use() {
        let mut s = spec();
        s.destination.as_mut().unwrap().auth = Some(
            serde_yaml::from_str(
                "oauth2: {tokenUrl: 'ftp://login', clientIdFrom: {name: o, key: i}, \
                 clientSecretFrom: {name: o, key: s}}",
            )
            .unwrap(),
        );
        refuses(
            &s,
            "spec.destination.auth.oauth2.tokenUrl",
            "must be an absolute http:// or https:// URL with a host",
        );
    }

    #[test]
    fn external_topology_refuses_bindings() {
        let mut s = spec();
        s.source.topology = crate::integration::Topology::External;
        assert!(validate(&s).is_ok());
        s.source.bindings = vec![crate::integration::Binding {
            exchange: "events".into(),
            routing_key: "orders.#".into(),
        }];
        let (field, reason) = refused(&s);
        assert_eq!(field, "spec.source.bindings");
        assert!(reason.contains("external declares nothing"), "{reason}");
    }

    #[test]
    fn rules_the_schema_also_says() {
        let mut s = spec();
        s.source.queue = "  ".into();
        assert_eq!(refused(&s).0, "spec.source.queue");
        let mut s = spec();
        s.source.bindings = vec![crate::integration::Binding {
            exchange: " ".into(),
            routing_key: "k".into(),
        }];
        assert_eq!(refused(&s).0, "spec.source.bindings");
        let mut s = spec();
        s.delivery.backoff.initial = Duration::from_secs(120).into();
        s.delivery.backoff.max = Duration::from_secs(60).into();
        refuses(
            &s,
            "spec.delivery.backoff.initial",
            "120s exceeds --backoff-max 60s",
        );
    }

    #[test]
    fn every_refusal_is_reported() {
        let mut s = spec();
        s.destination.as_mut().unwrap().url = "http://127.0.0.1/".into();
        s.delivery.dead_letter = Some(DeadLetterSpec {
            queue: "orders".into(),
        });
        let fields: Vec<String> = validate(&s).unwrap_err().into_iter().map(|i| i.field).collect();
        assert_eq!(fields, ["spec.destination.url", "spec.delivery.deadLetter.queue"]);
    }

    #[test]
    fn a_webhook_is_checked_as_a_destination_with_its_integration_s_private_networks() {
        let w: WebhookSpec = serde_yaml::from_str(
            "integration: f\nevents: [temp]\ndestination: {url: \"http://10.1.2.3/h\"}\n",
        )
        .unwrap();
        let e = validate_webhook(&w, false, None).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].field, "spec.destination.url");
        assert!(
            e[0].reason.contains("10.1.2.3 is a private address"),
            "{}",
            e[0].reason
        );
        assert_eq!(
            validate_webhook(&w, true, None),
            Ok(()),
            "the Integration allows it"
        );

        let mut own = w.clone();
        own.destination.allow_private_networks = true;
        let e = validate_webhook(&own, false, None).unwrap_err();
        assert!(
            e.iter()
                .any(|i| i.field == "spec.destination.allowPrivateNetworks"),
            "a Webhook's own allowance is refused: {e:?}"
        );
        // And it does not count: the URL is still refused.
        assert!(e.iter().any(|i| i.field == "spec.destination.url"), "{e:?}");

        let mut bad = w.clone();
        bad.destination.url = "https://ok.example/h".into();
        bad.destination.headers.insert("X-Bad".into(), "a\r\nb: 1".into());
        bad.events.push("line\nbreak".into());
        let fields: Vec<String> = validate_webhook(&bad, false, None)
            .unwrap_err()
            .into_iter()
            .map(|i| i.field)
            .collect();
        assert_eq!(fields, ["spec.events", "spec.destination.headers"]);
    }
}
