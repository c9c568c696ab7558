//! The broker address a connection Secret holds: one AMQP URI, or several (the nodes of a RabbitMQ
//! cluster), separated by commas and/or whitespace. The worker and the operator split it the same way;
//! each then checks every entry with its AMQP parser.

/// The URIs in a connection Secret's value, in order, empty entries skipped
/// (`"amqp://a, amqp://b\namqp://c"` → three). A URI itself never holds a comma or a space (they would
/// be percent-encoded), so neither separator can cut one in two.
pub fn split_uris(value: &str) -> Vec<&str> {
    value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
