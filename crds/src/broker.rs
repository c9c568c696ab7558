//! The broker address a connection Secret holds: one AMQP URI, or several (the nodes of a RabbitMQ
//! cluster), separated by commas and/or whitespace. The worker and the operator split it the same way;
//! each then checks every entry with its AMQP parser. With `source.nats` the same value holds NATS server
//! URLs, split and checked by [`nats_urls`] for both.

/// The URIs in a connection Secret's value, in order, empty entries skipped
/// (`"amqp://a, amqp://b\namqp://c"` → three). A URI itself never holds a comma or a space (they would
/// be percent-encoded), so neither separator can cut one in two.
pub fn split_uris(value: &str) -> Vec<&str> {
    value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The NATS server URLs in a connection Secret's value ([`split_uris`]), each `nats://` or `tls://` and a
/// valid URL. The error names the entry (`entry 2 of 3: …`), never the URL (it may hold a password).
pub fn nats_urls(value: &str) -> Result<Vec<&str>, String> {
    let urls = split_uris(value);
    if urls.is_empty() {
        return Err("empty: set a nats:// or tls:// URL".into());
    }
    let n = urls.len();
    for (i, u) in urls.iter().enumerate() {
        let entry = if n == 1 {
            String::new()
        } else {
            format!("entry {} of {n}: ", i + 1)
        };
        if !["nats://", "tls://"].iter().any(|p| u.starts_with(p)) {
            return Err(format!("{entry}must start with nats:// or tls://"));
        }
        if let Err(e) = url::Url::parse(u) {
            return Err(format!("{entry}not a valid URL: {e}"));
        }
    }
    Ok(urls)
}

/// Removes any occurrence of the URI (and so its password) from an error message.
pub fn redact(msg: &str, uri: &str) -> String {
    if uri.is_empty() {
        msg.into()
    } else {
        msg.replace(uri, "<uri>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_urls_are_nats_or_tls_and_errors_name_the_entry_not_the_url() {
        assert_eq!(
            nats_urls("nats://u:pw@a:4222, tls://b:4222"),
            Ok(vec!["nats://u:pw@a:4222", "tls://b:4222"])
        );
        assert_eq!(nats_urls(" \n"), Err("empty: set a nats:// or tls:// URL".into()));
        let e = nats_urls("nats://a:4222,amqp://u:s3cret@b").unwrap_err();
        assert_eq!(e, "entry 2 of 2: must start with nats:// or tls://");
        assert!(
            nats_urls("nats://a:99999")
                .unwrap_err()
                .starts_with("not a valid URL")
        );
    }

    #[test]
    fn one_or_several_uris() {
        assert_eq!(split_uris("amqp://h/"), ["amqp://h/"]);
        assert_eq!(split_uris("  amqp://h/\n"), ["amqp://h/"]);
        assert_eq!(
            split_uris("amqp://a:1/%2f,amqp://b:2/%2f , amqp://c:3/%2f\n\tamqps://d/"),
            ["amqp://a:1/%2f", "amqp://b:2/%2f", "amqp://c:3/%2f", "amqps://d/"]
        );
        assert_eq!(split_uris("amqp://a,,amqp://b,"), ["amqp://a", "amqp://b"]);
        assert!(split_uris(" ,\n ").is_empty());
    }
}
