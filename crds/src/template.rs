//! Body templates (`spec.destination.body.template`, the worker's `--body-template`): the MiniJinja
//! environment a template is compiled into. The worker renders with it (`worker/src/template.rs`);
//! the crate's `validate` compiles the spec's template with it, so a template the worker would refuse
//! at start is refused before any pod rolls.

use std::collections::BTreeMap;

use minijinja::value::Value;
use minijinja::{Environment, UndefinedBehavior};

/// Name of the one template in the environment.
pub const NAME: &str = "body";
/// Longest error text kept (it ends up in a dead letter's header and in a termination message).
const MAX_ERROR_LEN: usize = 512;

/// `source` compiled into its environment: strict about undefined variables, nothing escaped. The
/// error is the parser's (or an unknown filter's or test's), on one line.
pub fn environment(source: &str) -> Result<Environment<'static>, String> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // The body is not HTML: nothing is escaped (use `tojson` to quote a value for JSON).
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.add_template_owned(NAME, source.to_owned())
        .map_err(|e| one_line(&e.to_string()))?;
    // MiniJinja resolves filters and tests when it renders: a dry run with every variable
    // undefined-but-usable catches a misspelt one on the paths it takes, instead of
    // dead-lettering every message.
    let mut probe = env.clone();
    probe.set_undefined_behavior(UndefinedBehavior::Chainable);
    if let Ok(t) = probe.get_template(NAME)
        && let Err(e) = t.render(Value::from(BTreeMap::<String, Value>::new()))
        && matches!(
            e.kind(),
            minijinja::ErrorKind::UnknownFilter | minijinja::ErrorKind::UnknownTest
        )
    {
        return Err(one_line(&e.to_string()));
    }
    Ok(env)
}

/// `s` on one line (whitespace runs become one space), at most [`MAX_ERROR_LEN`] bytes.
pub fn one_line(s: &str) -> String {
    let mut out: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if out.len() > MAX_ERROR_LEN {
        let mut cut = MAX_ERROR_LEN;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_and_unknown_filters_are_refused_on_one_line() {
        assert!(environment("{\"order\": {{ data | tojson }}}").is_ok());
        let e = environment("{% if %}\n").unwrap_err();
        assert!(e.contains("syntax error") && !e.contains('\n'), "{e}");
        let e = environment("{{ data | nosuchfilter }}").unwrap_err();
        assert!(e.contains("nosuchfilter"), "{e}");
    }

    #[test]
    fn long_errors_are_cut() {
        let s = "é".repeat(400);
        let cut = one_line(&s);
        assert!(cut.len() <= MAX_ERROR_LEN + '…'.len_utf8() && cut.ends_with('…'));
    }
}
