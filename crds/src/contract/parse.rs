//! How [`WorkerArgs`](super::WorkerArgs) reads a value: typed parsers whose refusals read like every
//! other configuration error of the worker, `--flag (VARIABLE): reason` ([`refusal`]). Values clap
//! itself refuses (not a number, an unknown flag) keep clap's own line.

use std::error::Error;
use std::ffi::OsStr;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::time::Duration;

use clap::builder::{PossibleValue, TypedValueParser};
use clap::error::{ContextKind, ContextValue};
use clap::{CommandFactory, ValueEnum};

use super::rules::Invalid;
use super::{WorkerArgs, setting};
use crate::limits::{DurationRange, Range};

/// Why the contract refused a value (clap names the flag; [`refusal`] names its variable too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Error for Refused {}

/// The setting (`--flag (VARIABLE)`) and reason of a command line that one of the contract's parsers
/// refused; `None` for clap's own errors (which keep clap's line) and for `--help`/`--version`.
pub fn refusal(e: &clap::Error) -> Option<Invalid> {
    let reason = e.source()?.downcast_ref::<Refused>()?;
    let ContextValue::String(arg) = e.get(ContextKind::InvalidArg)? else {
        return None;
    };
    // `--timeout <TIMEOUT>`
    let long = arg.strip_prefix("--")?.split([' ', '=']).next()?;
    let cmd = WorkerArgs::command();
    let env = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(long))?
        .get_env()?
        .to_str()?;
    Some(Invalid {
        field: setting(long, env),
        reason: reason.0.clone(),
    })
}

/// A Go duration within `range`.
pub(super) fn duration_in(range: DurationRange) -> impl Fn(&str) -> Result<Duration, Refused> + Clone {
    move |s| {
        crate::duration::parse(s)
            .and_then(|d| range.check(d))
            .map_err(Refused)
    }
}

/// A Go duration, unbounded.
pub(super) fn duration(s: &str) -> Result<Duration, Refused> {
    crate::duration::parse(s).map_err(Refused)
}

/// A number within `range` (after clap read it as a number of its type).
pub(super) fn within<T>(range: Range<T>) -> impl Fn(T) -> Result<T, Refused> + Clone
where
    T: PartialOrd + fmt::Display + Copy,
{
    move |n| range.check(n).map_err(Refused)
}

/// A float within `range`; what is not a number keeps the parser's own message.
pub(super) fn float_within(
    range: Range<f64>,
) -> impl Fn(&str) -> Result<f64, Box<dyn Error + Send + Sync>> + Clone {
    move |s| {
        let n: f64 = s.parse()?;
        Ok(range.check(n).map_err(Refused)?)
    }
}

/// A number of at least `min`.
pub(super) fn at_least<T>(min: T) -> impl Fn(T) -> Result<T, Refused> + Clone
where
    T: PartialOrd + fmt::Display + Copy,
{
    move |n| {
        if n < min {
            return Err(Refused(format!("must be at least {min}")));
        }
        Ok(n)
    }
}

/// `HOST:PORT`.
pub(super) fn socket_addr(s: &str) -> Result<SocketAddr, Refused> {
    s.trim()
        .parse()
        .map_err(|_| Refused(format!("{s:?} is not HOST:PORT")))
}

/// One of an enum's names (each variant's [`ValueEnum`] name), after trimming; the refusal lists
/// them: `"x" is not a, b or c`.
#[derive(Clone)]
pub(super) struct Choice<T> {
    /// Compare in upper case (HTTP methods).
    upper: bool,
    /// An empty value means the default.
    blank_is_default: bool,
    _t: PhantomData<fn() -> T>,
}

impl<T> Choice<T> {
    pub(super) fn exact() -> Self {
        Self {
            upper: false,
            blank_is_default: false,
            _t: PhantomData,
        }
    }

    pub(super) fn upper_case() -> Self {
        Self {
            upper: true,
            ..Self::exact()
        }
    }

    pub(super) fn blank_is_default() -> Self {
        Self {
            blank_is_default: true,
            ..Self::exact()
        }
    }
}

impl<T: ValueEnum + Default + Clone + Send + Sync + 'static> Choice<T> {
    fn pick(&self, raw: &str) -> Result<T, Refused> {
        let value = match self.upper {
            true => raw.trim().to_ascii_uppercase(),
            false => raw.trim().to_owned(),
        };
        if value.is_empty() && self.blank_is_default {
            return Ok(T::default());
        }
        let names: Vec<PossibleValue> = T::value_variants()
            .iter()
            .filter_map(ValueEnum::to_possible_value)
            .collect();
        if let Some(i) = names.iter().position(|n| n.get_name() == value) {
            return Ok(T::value_variants()[i].clone());
        }
        let names: Vec<&str> = names.iter().map(PossibleValue::get_name).collect();
        let list = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.join(""),
        };
        Err(Refused(format!("{value:?} is not {list}")))
    }
}

impl<T: ValueEnum + Default + Clone + Send + Sync + 'static> TypedValueParser for Choice<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        // A closure parser: clap then names the argument and keeps the refusal as the error's source.
        let choice = self.clone();
        (move |s: &str| choice.pick(s)).parse_ref(cmd, arg, value)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            T::value_variants()
                .iter()
                .filter_map(ValueEnum::to_possible_value),
        ))
    }
}
