//! Body templates (`--body-template`): the request body rendered from the message with MiniJinja.
//!
//! The template is compiled once at start (a syntax error is bad configuration). For each message the
//! body is parsed as a JSON object whose top-level fields are the template's variables; besides them
//! the template sees `message` (the whole object), `routing_key` and `webhook_id`, each unless the
//! message has a field of that name (the message's fields are the contract, so they are never
//! hidden). Undefined variables are errors (strict mode), not empty strings: a message that is not a
//! JSON object or that the template cannot render is refused with a [`RenderError`], which the worker
//! dead-letters at once (retrying cannot change the outcome).
//!
//! Most webhook templates are literal text around `{{ name.attr }}` and `{{ name.attr | tojson }}`
//! blocks. A template of exactly that shape (recognised once, at [`BodyTemplate::compile`]) is
//! rendered straight from the parsed JSON, without MiniJinja, producing the same bytes MiniJinja
//! would; a message it cannot render that way (a missing field, a map or list printed without
//! `tojson`, a name that is not a field or one of the three extras) goes through MiniJinja, so its
//! output or error is MiniJinja's.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, OnceLock};

use hookfleet_crds::template::{NAME, one_line};
use minijinja::Environment;
use minijinja::value::{Enumerator, Object, Value};

type JsonMap = serde_json::Map<String, serde_json::Value>;

/// A compiled body template.
pub struct BodyTemplate {
    env: Environment<'static>,
    /// Top-level names the template reads, to say which ones a message lacks.
    variables: Vec<String>,
    /// The template as literal text and variable blocks, if it has the fast shape ([`fast_shape`]).
    fast: Option<Fast>,
}

impl std::fmt::Debug for BodyTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyTemplate")
            .field("variables", &self.variables)
            .field("fast", &self.fast.is_some())
            .finish_non_exhaustive()
    }
}

/// What a render needs besides the body.
#[derive(Debug, Clone, Copy)]
pub struct Extras<'a> {
    pub routing_key: &'a str,
    pub webhook_id: &'a str,
}

/// Why a message cannot be rendered: one line, for the dead letter's reason header and the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(String);

impl BodyTemplate {
    /// Compiles `source`; the error is the parser's, on one line.
    pub fn compile(source: &str) -> Result<Self, String> {
        Self::from_environment(hookfleet_crds::template::environment(source)?)
    }

    /// The template of an environment [`hookfleet_crds::template::environment`] compiled (as
    /// `WorkerArgs::check` does at start).
    pub fn from_environment(env: Environment<'static>) -> Result<Self, String> {
        let tmpl = env.get_template(NAME).map_err(|e| one_line(&e.to_string()))?;
        let source = tmpl.source();
        let mut variables: Vec<String> = tmpl.undeclared_variables(false).into_iter().collect();
        variables.sort();
        // The scanner's reading must agree with MiniJinja's on the variables read (a cheap check
        // that both see the same blocks); when they differ, MiniJinja renders every message.
        let fast = fast_shape(source)
            .filter(|pieces| {
                let paths: HashSet<String> = pieces
                    .iter()
                    .filter_map(|p| match p {
                        Piece::Var { path, .. } => Some(path.join(".")),
                        Piece::Text(_) => None,
                    })
                    .collect();
                paths == tmpl.undeclared_variables(true)
            })
            .map(|pieces| Fast {
                literal_len: pieces
                    .iter()
                    .map(|p| match p {
                        Piece::Text(text) => text.len(),
                        Piece::Var { .. } => 0,
                    })
                    .sum(),
                pieces,
            });
        Ok(Self { env, variables, fast })
    }

    /// Renders the request body from a message body.
    ///
    /// A template of the fast shape (literal text and `{{ path }}` / `{{ path | tojson }}` blocks,
    /// see the module docs) is rendered straight from the parsed message; when a message needs
    /// something that path does not reproduce (a missing variable or attribute, a map or list
    /// printed without `tojson`), and for every other template, MiniJinja renders it. Its context
    /// is a view over the message ([`Context`]): a top-level field is converted to a MiniJinja
    /// value when the template first reads it, and the whole message only if the template reads
    /// `message`. (Parsing straight into MiniJinja values through its `serde` feature was tried:
    /// 0.5–0.7× the time for 200-byte bodies, but 1.1–1.4× for 8 KiB.)
    pub fn render(&self, body: &[u8], extras: Extras<'_>) -> Result<String, RenderError> {
        let fields = parse(body)?;
        if let Some(fast) = &self.fast
            && let Some(out) = render_fast(fast, &fields, extras, body.len())
        {
            return Ok(out);
        }
        self.render_minijinja(fields, extras)
    }

    /// Renders with MiniJinja (the path for any template and any message).
    fn render_minijinja(&self, fields: JsonMap, extras: Extras<'_>) -> Result<String, RenderError> {
        let ctx = Value::from_object(Context::new(fields, extras));
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| RenderError(one_line(&e.to_string())))?;
        tmpl.render(ctx.clone()).map_err(|e| {
            let mut msg = e.to_string();
            if e.kind() == minijinja::ErrorKind::UndefinedError
                && let Some(ctx) = ctx.downcast_object_ref::<Context>()
            {
                let missing: Vec<&str> = self
                    .variables
                    .iter()
                    .filter(|v| !EXTRAS.contains(&v.as_str()) && ctx.index(v).is_none() && !is_global(v))
                    .map(String::as_str)
                    .collect();
                if !missing.is_empty() {
                    msg.push_str(&format!("; the message has no {}", missing.join(", ")));
                }
            }
            RenderError(one_line(&msg))
        })
    }
}

/// The message's top-level fields, or why it has none.
fn parse(body: &[u8]) -> Result<JsonMap, RenderError> {
    let parsed: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| RenderError(one_line(&format!("the message is not JSON: {e}"))))?;
    match parsed {
        serde_json::Value::Object(fields) => Ok(fields),
        other => Err(RenderError(format!(
            "the message is a JSON {}, not an object",
            kind(&other)
        ))),
    }
}

/// The names the template sees besides the message's own fields.
const EXTRAS: [&str; 3] = ["message", "routing_key", "webhook_id"];

/// A render's variables: the message's top-level fields, then `message`, `routing_key` and
/// `webhook_id` where the message has no field of that name.
///
/// A field is converted to a MiniJinja value when first read, once; `message` is built from the
/// same converted values (so `message.data` and `data` are one value, as with a converted map).
#[derive(Debug)]
struct Context {
    /// The message's fields, sorted by name (a `serde_json::Map` is a `BTreeMap`).
    fields: Vec<(String, serde_json::Value)>,
    /// `fields[i]` converted, once read.
    converted: Vec<OnceLock<Value>>,
    /// The whole message as a map, once read.
    message: OnceLock<Value>,
    routing_key: Value,
    webhook_id: Value,
}

impl Context {
    fn new(fields: JsonMap, extras: Extras<'_>) -> Self {
        let fields: Vec<(String, serde_json::Value)> = fields.into_iter().collect();
        Self {
            converted: fields.iter().map(|_| OnceLock::new()).collect(),
            fields,
            message: OnceLock::new(),
            routing_key: Value::from(extras.routing_key),
            webhook_id: Value::from(extras.webhook_id),
        }
    }

    /// Where the field `name` is in `fields`.
    fn index(&self, name: &str) -> Option<usize> {
        self.fields.binary_search_by(|(k, _)| k.as_str().cmp(name)).ok()
    }

    fn field(&self, i: usize) -> Value {
        self.converted[i]
            .get_or_init(|| to_value(&self.fields[i].1))
            .clone()
    }

    fn message(&self) -> Value {
        self.message
            .get_or_init(|| {
                Value::from(
                    self.fields
                        .iter()
                        .enumerate()
                        .map(|(i, (k, _))| (k.clone(), self.field(i)))
                        .collect::<BTreeMap<String, Value>>(),
                )
            })
            .clone()
    }
}

impl Object for Context {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        match self.index(key) {
            Some(i) => Some(self.field(i)),
            None => match key {
                "message" => Some(self.message()),
                "routing_key" => Some(self.routing_key.clone()),
                "webhook_id" => Some(self.webhook_id.clone()),
                _ => None,
            },
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let mut keys: BTreeSet<Value> = self.fields.iter().map(|(k, _)| Value::from(k.as_str())).collect();
        keys.extend(EXTRAS.map(Value::from));
        Enumerator::Iter(Box::new(keys.into_iter()))
    }
}

/// Names MiniJinja provides itself (functions such as `range`), which a message need not have.
fn is_global(name: &str) -> bool {
    thread_local! {
        static GLOBALS: HashSet<String> = {
            let env = Environment::new();
            env.globals().map(|(k, _)| k.to_owned()).collect()
        };
    }
    GLOBALS.with(|g| g.contains(name))
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

fn to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => Value::from_iter(a.iter().map(to_value)),
        serde_json::Value::Object(o) => Value::from(
            o.iter()
                .map(|(k, v)| (k.clone(), to_value(v)))
                .collect::<BTreeMap<String, Value>>(),
        ),
    }
}

/// A fast-shape template.
#[derive(Debug)]
struct Fast {
    pieces: Vec<Piece>,
    /// The length of the literal text, to size the output.
    literal_len: usize,
}

/// A part of a fast-shape template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Literal text, output as is.
    Text(String),
    /// `{{ path }}`, or `{{ path | tojson }}` if `json`.
    Var { path: Vec<String>, json: bool },
}

/// Names the parser reads as constants or special variables, and keywords: never a fast path segment.
const RESERVED: [&str; 19] = [
    "true", "True", "false", "False", "none", "None", "loop", "self", "super", "caller", "varargs", "kwargs",
    "and", "or", "not", "in", "is", "if", "else",
];

/// The template as pieces if it is made only of literal text and `{{ expr }}` blocks where `expr` is
/// a dotted variable path optionally followed by `| tojson` (no arguments), with MiniJinja's default
/// syntax and whitespace rules. Conservative: anything else (`{%`, `{#`, whitespace control, other
/// filters, subscripts, operators, literals, reserved names…) is `None`.
fn fast_shape(source: &str) -> Option<Vec<Piece>> {
    // Like MiniJinja (without `keep_trailing_newline`): one trailing "\n", then one "\r", are dropped.
    let mut rest = source.strip_suffix('\n').unwrap_or(source);
    rest = rest.strip_suffix('\r').unwrap_or(rest);
    let mut pieces = Vec::new();
    loop {
        // MiniJinja's start markers: `{` followed by `{`, `%` or `#`.
        let start = rest
            .as_bytes()
            .windows(2)
            .position(|w| w[0] == b'{' && matches!(w[1], b'{' | b'%' | b'#'));
        let Some(start) = start else {
            if !rest.is_empty() {
                pieces.push(Piece::Text(rest.to_owned()));
            }
            return Some(pieces);
        };
        if start > 0 {
            pieces.push(Piece::Text(rest[..start].to_owned()));
        }
        if rest.as_bytes()[start + 1] != b'{' {
            return None;
        }
        let block = &rest[start + 2..];
        let end = block.find("}}")?;
        pieces.push(fast_var(&block[..end])?);
        rest = &block[end + 2..];
    }
}

/// The inside of a `{{ … }}` block in the fast shape.
fn fast_var(expr: &str) -> Option<Piece> {
    let is_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r');
    let (path, json) = match expr.split_once('|') {
        Some((path, filter)) if filter.trim_matches(is_space) == "tojson" => (path, true),
        Some(_) => return None,
        None => (expr, false),
    };
    let path: Vec<String> = path
        .trim_matches(is_space)
        .split('.')
        .map(|segment| {
            let mut bytes = segment.bytes();
            let first = bytes.next()?;
            let ident = (first == b'_' || first.is_ascii_alphabetic())
                && bytes.all(|c| c == b'_' || c.is_ascii_alphanumeric());
            (ident && !RESERVED.contains(&segment)).then(|| segment.to_owned())
        })
        .collect::<Option<_>>()?;
    Some(Piece::Var { path, json })
}

/// What a path leads to in a fast render.
#[derive(Clone, Copy)]
enum Node<'a> {
    Json(&'a serde_json::Value),
    /// The whole message (`message` when the message has no such field).
    Map(&'a JsonMap),
    Str(&'a str),
}

/// Renders a fast-shape template from the message's fields, byte for byte as MiniJinja would, or
/// `None` where that is not sure: a name that is neither a field nor an extra (MiniJinja would say
/// undefined, or print a global), a missing attribute, an attribute of a non-map, a map or list
/// printed without `tojson`.
///
/// The output is sized for the literal text and `body_len` (about what `tojson` of every field
/// takes).
fn render_fast(fast: &Fast, fields: &JsonMap, extras: Extras<'_>, body_len: usize) -> Option<String> {
    let mut out = String::with_capacity(fast.literal_len + body_len);
    for piece in &fast.pieces {
        let (path, json) = match piece {
            Piece::Text(text) => {
                out.push_str(text);
                continue;
            }
            Piece::Var { path, json } => (path, *json),
        };
        let (root, attrs) = path.split_first()?;
        let mut node = match fields.get(root) {
            Some(v) => Node::Json(v),
            None => match root.as_str() {
                "message" => Node::Map(fields),
                "routing_key" => Node::Str(extras.routing_key),
                "webhook_id" => Node::Str(extras.webhook_id),
                _ => return None,
            },
        };
        for attr in attrs {
            node = match node {
                Node::Json(serde_json::Value::Object(map)) | Node::Map(map) => Node::Json(map.get(attr)?),
                _ => return None,
            };
        }
        if json {
            match node {
                Node::Json(v) => write_json(&mut out, v),
                Node::Map(map) => write_json_map(&mut out, map),
                Node::Str(s) => write_json_str(&mut out, s),
            }
        } else {
            match node {
                Node::Str(s) => out.push_str(s),
                Node::Json(serde_json::Value::String(s)) => out.push_str(s),
                Node::Json(serde_json::Value::Number(n)) => write_number(&mut out, n),
                Node::Json(serde_json::Value::Bool(b)) => out.push_str(if *b { "True" } else { "False" }),
                Node::Json(serde_json::Value::Null) => out.push_str("None"),
                Node::Json(serde_json::Value::Array(_) | serde_json::Value::Object(_)) | Node::Map(_) => {
                    return None;
                }
            }
        }
    }
    Some(out)
}

/// A number as MiniJinja prints it (`{{ n }}`), converted as [`to_value`] does: integers as they
/// are, a float with Rust's shortest round-trip text (never an exponent) and `.0` if it has no `.`.
fn write_number(out: &mut String, n: &serde_json::Number) {
    use std::fmt::Write;
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else {
        let f = n.as_f64().unwrap_or(f64::NAN);
        let start = out.len();
        let _ = write!(out, "{f}");
        if !out[start..].contains('.') {
            out.push_str(".0");
        }
    }
}

/// A value as MiniJinja's `tojson` writes it: `, ` and `: ` separators, map keys in order (a
/// `serde_json::Map` is sorted like MiniJinja's maps), strings escaped with [`write_json_str`],
/// numbers with `serde_json`'s formatting (integers in decimal, floats with `zmij`'s shortest text,
/// which MiniJinja reproduces).
fn write_json(out: &mut String, v: &serde_json::Value) {
    use std::fmt::Write;
    match v {
        serde_json::Value::Null => out.push_str("null"),
        serde_json::Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        serde_json::Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        serde_json::Value::String(s) => write_json_str(out, s),
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_json(out, item);
            }
            out.push(']');
        }
        serde_json::Value::Object(map) => write_json_map(out, map),
    }
}

fn write_json_map(out: &mut String, map: &JsonMap) {
    out.push('{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_json_str(out, k);
        out.push_str(": ");
        write_json(out, v);
    }
    out.push('}');
}

/// A JSON string as `tojson` writes it (HTML-safe): `"` and `\` escaped, `\b \f \n \r \t` by
/// name, other control characters and `<`, `>`, `&`, `'` as `\u00xx`; the rest (DEL, non-ASCII)
/// as is.
fn write_json_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(s.len() + 2);
    out.push('"');
    let mut start = 0;
    let mut next = find_escape(bytes, 0);
    while next < bytes.len() {
        out.push_str(&s[start..next]);
        let b = bytes[next];
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\x08' => out.push_str("\\b"),
            b'\x0c' => out.push_str("\\f"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            _ => {
                out.push_str("\\u00");
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 0xf) as usize] as char);
            }
        }
        start = next + 1;
        next = find_escape(bytes, start);
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn needs_escape(b: u8) -> bool {
    // `|`, not `||`: no branches, so that the compiler can check many bytes at once.
    (b < 0x20) | (b == b'"') | (b == b'\\') | (b == b'<') | (b == b'>') | (b == b'&') | (b == b'\'')
}

/// The index of the first byte at or after `pos` that [`write_json_str`] escapes, or the length.
/// Bytes are checked 32 at a time (a loop the compiler vectorises), then one at a time in the
/// block that has one.
fn find_escape(input: &[u8], mut pos: usize) -> usize {
    const BLOCK: usize = 32;
    while let Some(block) = input.get(pos..pos + BLOCK) {
        if block.iter().fold(0u8, |acc, &b| acc | u8::from(needs_escape(b))) != 0 {
            break;
        }
        pos += BLOCK;
    }
    while pos < input.len() && !needs_escape(input[pos]) {
        pos += 1;
    }
    pos
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::seq::IndexedRandom;
    use rand::{Rng, SeedableRng};

    use super::*;

    const EXTRAS: Extras<'static> = Extras {
        routing_key: "orders.created",
        webhook_id: "m-1",
    };

    fn render(tmpl: &str, body: &str) -> Result<String, RenderError> {
        BodyTemplate::compile(tmpl)
            .expect("compiles")
            .render(body.as_bytes(), EXTRAS)
    }

    /// The fast path writes a map's keys in `serde_json::Map` order and the lazy context looks fields
    /// up by binary search: both need the map sorted by key, as MiniJinja sorts its maps. That holds
    /// while no crate in the build turns on serde_json's `preserve_order` (insertion order).
    #[test]
    fn serde_json_maps_iterate_sorted() {
        let map: JsonMap = serde_json::from_str(r#"{"b": 1, "a": 2, "c": 3}"#).unwrap();
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        assert_eq!(keys, ["a", "b", "c"], "serde_json's preserve_order is on");
    }

    #[test]
    fn renders_fields_and_extras() {
        let out = render(
            "{{ device_id }}/{{ data.n + 1 }}/{{ routing_key }}/{{ webhook_id }}/{{ message.device_id }}",
            r#"{"device_id": "d-7", "data": {"n": 41}}"#,
        )
        .unwrap();
        assert_eq!(out, "d-7/42/orders.created/m-1/d-7");
    }

    #[test]
    fn the_crd_example_renders_valid_json() {
        let out = render(
            r#"{"order": {{ data | tojson }}, "device": "{{ device_id }}"}"#,
            r#"{"device_id": "d-7", "data": {"id": 12, "items": ["a", "b\"c"], "total": 9.5, "paid": true, "note": null}}"#,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
        assert_eq!(
            v,
            serde_json::json!({
                "order": {"id": 12, "items": ["a", "b\"c"], "total": 9.5, "paid": true, "note": null},
                "device": "d-7"
            })
        );
    }

    #[test]
    fn message_fields_win_over_extras() {
        assert_eq!(
            render("{{ message }}|{{ routing_key }}", r#"{"message": "hi"}"#).unwrap(),
            "hi|orders.created"
        );
    }

    #[test]
    fn a_missing_variable_is_an_error_naming_it() {
        let err = render(r#"{"device": "{{ device_id }}"}"#, r#"{"data": 1}"#).unwrap_err();
        assert!(err.0.contains("undefined"), "{err}");
        assert!(err.0.contains("the message has no device_id"), "{err}");
        // A missing attribute of a present field is an error too.
        let err = render("{{ data.missing }}", r#"{"data": {}}"#).unwrap_err();
        assert!(err.0.contains("undefined"), "{err}");
        // `is defined` and `default` still work for optional fields.
        assert_eq!(
            render("{{ x | default('none') }}{% if y is defined %}y{% endif %}", "{}").unwrap(),
            "none"
        );
    }

    #[test]
    fn a_body_that_is_not_an_object_is_refused() {
        for (body, what) in [
            ("[1, 2]", "array"),
            ("\"s\"", "string"),
            ("3", "number"),
            ("null", "null"),
        ] {
            let err = render("{{ message }}", body).unwrap_err();
            assert!(err.0.contains(what), "{body}: {err}");
        }
        let err = render("{{ message }}", "not json\n{").unwrap_err();
        assert!(err.0.starts_with("the message is not JSON"), "{err}");
        assert!(!err.0.contains('\n'));
    }

    #[test]
    fn filter_errors_are_render_errors() {
        let err = render("{{ data | tojson(indent='x') }}", r#"{"data": 1}"#).unwrap_err();
        assert!(!err.0.is_empty());
        let err = render("{{ n / 0 }}", r#"{"n": 1}"#).unwrap_err();
        assert!(!err.0.contains('\n'), "{err}");
    }

    #[test]
    fn syntax_errors_fail_to_compile_on_one_line() {
        let err = BodyTemplate::compile("{\"a\": {{ data | tojson }").unwrap_err();
        assert!(err.contains("syntax error"), "{err}");
        assert!(!err.contains('\n'));
        let err = BodyTemplate::compile("{{ x | no_such_filter }}").unwrap_err();
        assert!(err.contains("unknown filter"), "{err}");
        let err = BodyTemplate::compile("{% if x is no_such_test %}{% endif %}").unwrap_err();
        assert!(err.contains("unknown test"), "{err}");
    }

    #[test]
    fn output_is_not_html_escaped() {
        assert_eq!(render("{{ s }}", r#"{"s": "<a&b>"}"#).unwrap(), "<a&b>");
    }

    /// The render before the fast path and the lazy context: every field converted up front.
    fn render_reference(t: &BodyTemplate, body: &[u8], extras: Extras<'_>) -> Result<String, RenderError> {
        #[derive(Debug)]
        struct Eager {
            message: Value,
            routing_key: Value,
            webhook_id: Value,
        }
        impl Object for Eager {
            fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
                match self.message.get_item(key) {
                    Ok(v) if !v.is_undefined() => Some(v),
                    _ => match key.as_str()? {
                        "message" => Some(self.message.clone()),
                        "routing_key" => Some(self.routing_key.clone()),
                        "webhook_id" => Some(self.webhook_id.clone()),
                        _ => None,
                    },
                }
            }
            fn enumerate(self: &Arc<Self>) -> Enumerator {
                let mut keys: BTreeSet<Value> =
                    self.message.try_iter().map(|i| i.collect()).unwrap_or_default();
                keys.extend(crate::template::EXTRAS.map(Value::from));
                Enumerator::Iter(Box::new(keys.into_iter()))
            }
        }
        let parsed = serde_json::Value::Object(parse(body)?);
        let message = to_value(&parsed);
        let ctx = Value::from_object(Eager {
            message: message.clone(),
            routing_key: Value::from(extras.routing_key),
            webhook_id: Value::from(extras.webhook_id),
        });
        t.env.get_template(NAME).unwrap().render(ctx).map_err(|e| {
            let mut msg = e.to_string();
            if e.kind() == minijinja::ErrorKind::UndefinedError {
                let missing: Vec<&str> = t
                    .variables
                    .iter()
                    .filter(|v| {
                        !crate::template::EXTRAS.contains(&v.as_str())
                            && message.get_attr(v).is_ok_and(|x| x.is_undefined())
                            && !is_global(v)
                    })
                    .map(String::as_str)
                    .collect();
                if !missing.is_empty() {
                    msg.push_str(&format!("; the message has no {}", missing.join(", ")));
                }
            }
            RenderError(one_line(&msg))
        })
    }

    /// Templates of the fast shape; each must be recognised as such.
    const FAST_TEMPLATES: &[&str] = &[
        r#"{"id":{{ id|tojson }},"data":{{ pad|tojson }}}"#,
        "{{ id }}",
        "{{ id | tojson }}",
        "{{id|tojson}}",
        "{{\tdata.a\n|\r\ntojson }}",
        "{{ data.a.b }}/{{ data.a.b | tojson }}",
        "{{ message | tojson }}",
        "{{ message }}",
        "{{ message.id }}-{{ message.data.a | tojson }}",
        "{{ routing_key }} {{ routing_key | tojson }} {{ webhook_id }} {{ webhook_id|tojson }}",
        "{{ routing_key.x }}{{ nope }}",
        "{{ message.routing_key }}",
        "{{ data }}",
        "{{ x }}{{ _x9 }}",
        "{{ id }}{{ nope }}",
        "{{ range }}",
        "{{ data.items | tojson }}{{ data.x }}",
        "}} {{ id }} }}} { {x} %} #}",
        "{{ id }}\n",
        "{{ id }}\r\n",
        "{{ id }}\n\n",
        "{{ id }}\n\r",
        "a\r",
        "",
        "literal only <&>",
        "{ \"a\": {{ a|tojson }}, \"b\": {{ b|tojson }}, \"é😀\": {{ pad }} }",
    ];

    /// Random JSON text for a value, nested up to `depth`.
    fn random_json(rng: &mut StdRng, depth: u32) -> String {
        let kinds = if depth == 0 { 5 } else { 7 };
        match rng.random_range(0..kinds) {
            0 => random_string(rng),
            1 => random_number(rng),
            2 => ["true", "false"][rng.random_range(0..2)].to_owned(),
            3 => "null".to_owned(),
            4 => random_string(rng),
            5 => {
                let n = rng.random_range(0..4);
                let items: Vec<String> = (0..n).map(|_| random_json(rng, depth - 1)).collect();
                format!("[{}]", items.join(","))
            }
            _ => random_object(rng, depth - 1),
        }
    }

    /// A random object; the top level (`depth` 3) has more fields, to have most templates' names.
    fn random_object(rng: &mut StdRng, depth: u32) -> String {
        const KEYS: &[&str] = &[
            "id",
            "pad",
            "data",
            "a",
            "b",
            "x",
            "_x9",
            "message",
            "routing_key",
            "webhook_id",
            "range",
            "items",
            "é😀",
            "<&'>",
            "A",
            "",
        ];
        let n = rng.random_range(0..if depth == 3 { 14 } else { 6 });
        let mut items: Vec<String> = (0..n)
            .map(|_| {
                let key = KEYS.choose(rng).unwrap();
                format!(
                    "{}:{}",
                    serde_json::to_string(key).unwrap(),
                    random_json(rng, depth)
                )
            })
            .collect();
        if depth == 3 && rng.random_bool(0.5) {
            // A nested path the templates read (a repeated name: the last one counts).
            let (b, x) = (random_json(rng, 1), random_json(rng, 0));
            let more = if rng.random_bool(0.5) {
                r#","items":[]"#
            } else {
                ""
            };
            items.push(format!(r#""data":{{"a":{{"b":{b}}},"x":{x}{more}}}"#));
        }
        format!("{{{}}}", items.join(","))
    }

    fn random_string(rng: &mut StdRng) -> String {
        const CHARS: &[&str] = &[
            "a", "x", "<", ">", "&", "'", "\"", "\\", "/", "\u{0}", "\u{1}", "\u{8}", "\u{c}", "\n", "\r",
            "\t", "\u{1f}", "\u{7f}", "\u{80}", "é", "€", "😀", "\u{2028}", " ",
        ];
        let len = rng.random_range(0..40);
        let s: String = (0..len)
            .map(|_| {
                if rng.random_bool(0.6) {
                    "x"
                } else {
                    CHARS.choose(rng).unwrap()
                }
            })
            .collect();
        serde_json::to_string(&s).unwrap()
    }

    fn random_number(rng: &mut StdRng) -> String {
        const FIXED: &[&str] = &[
            "0",
            "-0",
            "1",
            "-1",
            "0.5",
            "1.0",
            "-0.0",
            "0.0",
            "1e300",
            "-1e300",
            "1E5",
            "1e-7",
            "1.5e16",
            "1e15",
            "1e16",
            "123.456",
            "9007199254740993",
            "2.2250738585072014e-308",
            "5e-324",
            "1.7976931348623157e308",
            "9223372036854775807",
            "-9223372036854775808",
            "9223372036854775808",
            "-9223372036854775809",
            "18446744073709551615",
            "18446744073709551616",
            "123456789012345678901234567890",
            "0.1",
            "100",
            "1e2",
            "0.000015",
            "1e-5",
        ];
        match rng.random_range(0..4) {
            0 => FIXED.choose(rng).unwrap().to_string(),
            1 => rng.random::<i64>().to_string(),
            2 => {
                let f = f64::from_bits(rng.random::<u64>());
                if f.is_finite() {
                    format!("{f:e}")
                } else {
                    "2.5".to_owned()
                }
            }
            _ => {
                let f = rng.random_range(0..100_000_000u64) as f64 / 10f64.powi(rng.random_range(-15..25));
                format!("{f}")
            }
        }
    }

    #[test]
    fn the_fast_path_renders_like_minijinja() {
        let mut rng = StdRng::seed_from_u64(0x7e57);
        let extras = Extras {
            routing_key: "k.<&'\"\\\n>.é😀",
            webhook_id: "w-1",
        };
        for source in FAST_TEMPLATES {
            let t = BodyTemplate::compile(source).expect(source);
            assert!(t.fast.is_some(), "not recognised: {source:?}");
            let mut fast = 0;
            for _ in 0..300 {
                let body = random_object(&mut rng, 3);
                let fields = parse(body.as_bytes()).expect(&body);
                let expected = render_reference(&t, body.as_bytes(), extras);
                if let Some(out) = render_fast(t.fast.as_ref().unwrap(), &fields, extras, 0) {
                    fast += 1;
                    assert_eq!(Ok(&out), expected.as_ref(), "{source:?} over {body}");
                }
                assert_eq!(
                    t.render(body.as_bytes(), extras),
                    expected,
                    "{source:?} over {body}"
                );
                assert_eq!(
                    t.render_minijinja(fields, extras),
                    expected,
                    "{source:?} over {body}"
                );
            }
            // The comparison is not vacuous: the fast path renders some messages (never one that
            // lacks a name the template reads).
            assert_eq!(
                fast == 0,
                source.contains("nope"),
                "{source:?}: {fast} of 300 fast"
            );
        }
    }

    #[test]
    fn numbers_print_like_minijinja() {
        let mut rng = StdRng::seed_from_u64(0xf10a7);
        let t = BodyTemplate::compile("{{ n }} {{ n | tojson }} {{ m | tojson }}").unwrap();
        for _ in 0..5000 {
            let body = format!(
                r#"{{"n":{},"m":[{},{{"k":{}}}]}}"#,
                random_number(&mut rng),
                random_number(&mut rng),
                random_number(&mut rng)
            );
            let fields = parse(body.as_bytes()).expect(&body);
            let out = render_fast(t.fast.as_ref().unwrap(), &fields, EXTRAS, 0).expect("fast");
            assert_eq!(Ok(out), render_reference(&t, body.as_bytes(), EXTRAS), "{body}");
        }
    }

    #[test]
    fn the_lazy_context_renders_like_the_converted_message() {
        let mut rng = StdRng::seed_from_u64(0x1a27);
        for source in [
            "{{ data.a + 1 }}",
            "{{ id ~ '-' ~ routing_key }}",
            "{% for k, v in message | items %}{{ k }}={{ v }};{% endfor %}",
            "{% for k in message %}{{ k }},{% endfor %}{{ message | length }}",
            "{{ message | dictsort }}",
            "{{ message.data is sameas data }}{{ message == message }}",
            "{{ x | default('d') }}{% if y is defined %}{{ y }}{% endif %}",
            "{{ message | pprint }}",
            "{{ data | tojson(indent=2) }}",
            "{{ data['a'] }}",
            "{{ range(2) | list }}{{ message.range }}",
            "{{- id -}}",
        ] {
            let t = BodyTemplate::compile(source).expect(source);
            assert!(t.fast.is_none(), "{source:?}");
            for _ in 0..200 {
                let body = random_object(&mut rng, 3);
                assert_eq!(
                    t.render(body.as_bytes(), EXTRAS),
                    render_reference(&t, body.as_bytes(), EXTRAS),
                    "{source:?} over {body}"
                );
            }
        }
    }

    #[test]
    fn other_shapes_are_not_fast() {
        for source in [
            "{% if a %}x{% endif %}",
            "{# c #}{{ a }}",
            "{{- a }}",
            "{{ a -}}",
            "{{+ a }}",
            "{{ a +}}",
            "{{ a | upper }}",
            "{{ a | tojson(indent=2) }}",
            "{{ a | tojson() }}",
            "{{ a | tojson | safe }}",
            "{{ a | safe | tojson }}",
            "{{ a || tojson }}",
            "{{ a['b'] }}",
            "{{ a[0] }}",
            "{{ a.0 }}",
            "{{ a + 1 }}",
            "{{ -a }}",
            "{{ \"s\" }}",
            "{{ 'a' ~ b }}",
            "{{ 1 }}",
            "{% raw %}{{ a }}{% endraw %}",
            "{{ true }}",
            "{{ None }}",
            "{{ loop }}",
            "{{ self }}",
            "{{ a.not }}",
            "{{ a() }}",
            "{{ a.b() }}",
            "{{ a . b }}",
            "{{ a. b }}",
            "{{ a is defined }}",
            "{{ a if b }}",
            "{{ a or b }}",
            "{{ not a }}",
            "{{ (a) }}",
            "{{ [a] }}",
            "{{ a }}{% set b = 1 %}",
        ] {
            assert_eq!(fast_shape(source), None, "{source:?}");
            if let Ok(t) = BodyTemplate::compile(source) {
                assert!(t.fast.is_none(), "{source:?}");
            }
        }
        assert_eq!(
            fast_shape("a{{ b.c | tojson }}}\n"),
            Some(vec![
                Piece::Text("a".into()),
                Piece::Var {
                    path: vec!["b".into(), "c".into()],
                    json: true
                },
                Piece::Text("}".into()),
            ])
        );
    }

    #[test]
    fn find_escape_finds_the_first_escaped_byte() {
        let mut rng = StdRng::seed_from_u64(0xe5c);
        let alphabet = b"a\"\\\x00\x1f\x20\x7f\x80\xff\xe3<>&'/";
        for len in 0..100 {
            for _ in 0..100 {
                let input: Vec<u8> = (0..len)
                    .map(|_| {
                        if rng.random_bool(0.9) {
                            b'x'
                        } else {
                            *alphabet.choose(&mut rng).unwrap()
                        }
                    })
                    .collect();
                for pos in 0..=len {
                    let naive = (pos..len).find(|&i| needs_escape(input[i])).unwrap_or(len);
                    assert_eq!(find_escape(&input, pos), naive, "{input:?} from {pos}");
                }
            }
        }
    }
}
