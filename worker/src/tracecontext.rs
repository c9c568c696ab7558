//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>) from a message to its webhook request: a
//! publisher that traces puts `traceparent` (and `tracestate`) in the message's AMQP headers, and the worker
//! sends them on as HTTP headers of the same names, so the receiver's spans join the publisher's trace.
//!
//! Only well-formed values pass: a `traceparent` of version `00` is exactly `00-<32 hex>-<16 hex>-<2 hex>`
//! (lowercase, neither id all zeros); a later version (not `ff`) starts the same way and may go on after a
//! `-`, as the spec asks a parser to accept. A `tracestate` goes only with a valid `traceparent` (the spec:
//! without one it is ignored) and only when it is at most [`TRACESTATE_MAX`] bytes of at most 32 `key=value`
//! members in the spec's grammar. Anything else is dropped with a debug log, never failing the delivery.
//! The values travel as they came: the worker exports no traces, so it is not a hop that adds a span.

use lapin::types::{AMQPValue, FieldTable};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tracing::debug;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// Longest `tracestate` forwarded, in bytes: what the spec asks every vendor to propagate at least.
pub const TRACESTATE_MAX: usize = 512;
/// Longest `traceparent` of a later version forwarded (version `00` is 55 bytes).
const TRACEPARENT_MAX: usize = 256;
const TRACESTATE_MEMBERS: usize = 32;

/// The HTTP headers for a message whose AMQP headers are `amqp`: `traceparent` and `tracestate` when
/// valid, nothing otherwise.
pub fn headers(amqp: Option<&FieldTable>) -> HeaderMap {
    let mut out = HeaderMap::new();
    let Some(raw) = amqp.and_then(|h| h.inner().get(TRACEPARENT)) else {
        return out;
    };
    let Some(parent) = text(raw).filter(|v| traceparent_ok(v)) else {
        debug!("the message's traceparent is not W3C Trace Context: not sent, nor its tracestate");
        return out;
    };
    insert(&mut out, TRACEPARENT, parent);
    if let Some(raw) = amqp.and_then(|h| h.inner().get(TRACESTATE)) {
        match text(raw).filter(|v| tracestate_ok(v)) {
            Some(state) => insert(&mut out, TRACESTATE, state),
            None => debug!("the message's tracestate is not W3C Trace Context: not sent"),
        }
    }
    out
}

fn insert(out: &mut HeaderMap, name: &'static str, value: &str) {
    // Both checks admit visible ASCII and spaces only, which every header value may hold.
    if let Ok(v) = HeaderValue::from_str(value) {
        out.insert(HeaderName::from_static(name), v);
    }
}

/// A header value as text: an AMQP string (long or short) or byte array holding UTF-8.
fn text(v: &AMQPValue) -> Option<&str> {
    match v {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        AMQPValue::ByteArray(b) => std::str::from_utf8(b.as_slice()).ok(),
        _ => None,
    }
}

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `version-traceid-parentid-flags` as the spec defines it (see the module's doc).
pub fn traceparent_ok(v: &str) -> bool {
    if v.len() < 55 || v.len() > TRACEPARENT_MAX || !v.is_ascii() {
        return false;
    }
    let (version, trace_id, parent_id, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
    let dashes = [2, 35, 52].iter().all(|&i| v.as_bytes()[i] == b'-');
    let fields = lower_hex(version, 2)
        && version != "ff"
        && lower_hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && lower_hex(parent_id, 16)
        && parent_id.bytes().any(|b| b != b'0')
        && lower_hex(flags, 2);
    // Version 00 is exactly 55 bytes; a later one may carry more fields after a dash.
    let rest = match &v[55..] {
        "" => true,
        more => version != "00" && more.starts_with('-') && more.bytes().all(|b| (0x21..=0x7e).contains(&b)),
    };
    dashes && fields && rest
}

/// A comma-separated list of 1 to 32 `key=value` members (empty members allowed, spaces and tabs around
/// them too), at most [`TRACESTATE_MAX`] bytes.
pub fn tracestate_ok(v: &str) -> bool {
    if v.len() > TRACESTATE_MAX {
        return false;
    }
    let members: Vec<&str> = v
        .split(',')
        .map(|m| m.trim_matches([' ', '\t']))
        .filter(|m| !m.is_empty())
        .collect();
    (1..=TRACESTATE_MEMBERS).contains(&members.len())
        && members.iter().all(|m| {
            m.split_once('=')
                .is_some_and(|(k, val)| tracestate_key_ok(k) && tracestate_value_ok(val))
        })
}

/// `simple-key` or `tenant-id@system-id` of the spec.
fn tracestate_key_ok(k: &str) -> bool {
    let part = |s: &str, max: usize, first_digit: bool| {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= max
            && (b[0].is_ascii_lowercase() || (first_digit && b[0].is_ascii_digit()))
            && b[1..].iter().all(|&c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'*' | b'/')
            })
    };
    match k.split_once('@') {
        None => part(k, 256, false),
        Some((tenant, system)) => part(tenant, 241, true) && part(system, 14, false),
    }
}

/// Up to 256 printable ASCII characters but `,` and `=`, not ending in a space.
fn tracestate_value_ok(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 256
        && !v.ends_with(' ')
        && v.bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
}

#[cfg(test)]
mod tests {
    use lapin::types::{ByteArray, LongString, ShortString};

    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
    }

    fn sent(t: &FieldTable) -> Vec<(String, String)> {
        headers(Some(t))
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn traceparent_per_the_spec() {
        assert!(traceparent_ok(TP));
        assert!(traceparent_ok(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nx: y",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba9é2b7-01",
        ] {
            assert!(!traceparent_ok(bad), "{bad:?}");
        }
        // A later version: the same start, more fields after a dash.
        assert!(traceparent_ok(&format!("01{}-what-comes-next", &TP[2..])));
        assert!(traceparent_ok(&format!("cc{}", &TP[2..])));
        assert!(!traceparent_ok(&format!("01{}what", &TP[2..])));
        assert!(!traceparent_ok(&format!("01{}-{}", &TP[2..], "x".repeat(300))));
    }

    #[test]
    fn tracestate_per_the_spec_and_bounded() {
        for ok in [
            "congo=t61rcWkgMzE",
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
            " rojo=1 ,\tcongo=2 ,, ",
            "fw529a3039@dt=abc",
            "1a-2f@t_x=y z",
            "congo=1 ",
        ] {
            assert!(tracestate_ok(ok), "{ok:?}");
        }
        for bad in [
            "",
            " , ",
            "congo",
            "Congo=1",
            "1congo=1",
            "congo=",
            "congo=a,b",
            "congo=1 \t=",
            "a=b=c",
            "t@sys.x=v",
            "t@1sys=v",
            "k=v\u{7f}",
            "k=ü",
        ] {
            assert!(!tracestate_ok(bad), "{bad:?}");
        }
        let members = |n: usize| (0..n).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        assert!(tracestate_ok(&members(32)));
        assert!(!tracestate_ok(&members(33)));
        assert!(tracestate_ok(&format!("k={}", "v".repeat(256))));
        assert!(!tracestate_ok(&format!("k={}", "v".repeat(257))));
        let long_list = (0..3)
            .map(|i| format!("k{i}={}", "v".repeat(200)))
            .collect::<Vec<_>>()
            .join(",");
        assert!(long_list.len() > TRACESTATE_MAX && !tracestate_ok(&long_list));
    }

    #[test]
    fn headers_from_strings_or_bytes_and_nothing_else() {
        let state = "rojo=00f067aa0ba902b7";
        let both = |v: AMQPValue| table(&[(TRACEPARENT, v), (TRACESTATE, long(state))]);
        let want = vec![
            (TRACEPARENT.to_owned(), TP.to_owned()),
            (TRACESTATE.to_owned(), state.to_owned()),
        ];
        assert_eq!(sent(&both(long(TP))), want);
        assert_eq!(sent(&both(AMQPValue::ShortString(TP.into()))), want);
        assert_eq!(
            sent(&both(AMQPValue::ByteArray(ByteArray::from(
                TP.as_bytes().to_vec()
            )))),
            want
        );
        // Not a string: nothing, and no tracestate without its traceparent.
        assert!(sent(&both(AMQPValue::LongLongInt(7))).is_empty());
        assert!(
            sent(&both(long(
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
            )))
            .is_empty()
        );
        assert!(sent(&table(&[(TRACESTATE, long(state))])).is_empty());
        // A bad tracestate alone is dropped; the traceparent still goes.
        let bad_state = table(&[(TRACEPARENT, long(TP)), (TRACESTATE, long("Bad=1"))]);
        assert_eq!(sent(&bad_state), vec![(TRACEPARENT.to_owned(), TP.to_owned())]);
        assert!(headers(None).is_empty());
        assert!(sent(&FieldTable::default()).is_empty());
    }
}
