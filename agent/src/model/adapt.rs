//! Adaptive rules (`[[adapt]]`) and the penalty box (`[[penalty]]`): the conditions they
//! test, their steps and tiers. Plain data and parsers, no I/O; the state machines that
//! run them are in `observe::adapt`.
//!
//! A condition is written as `<signal> <op> <number>` joined by `and` and `or` (`and`
//! binds tighter, as in PromQL and most shells): `host.cpu.some_avg10 > 40 and
//! host.memory.full_avg60 > 5`. Host signals are the kernel's pressure stall averages
//! (percent); a penalty's signals are one user's own usage over the rule's window.

use std::{fmt, time::Duration};

use super::{
    alert::Op,
    quota::{Field, Limit, Mode, Quota},
    target::Target,
    units::{parse_bytes, parse_count},
    usage::Pressure,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExprError {
    #[error("empty condition: expected <signal> <op> <number>, joined by and/or")]
    Empty,
    #[error("{term:?}: expected <signal> <op> <number> (op one of >, >=, <, <=)")]
    Form { term: String },
    #[error("unknown signal {signal:?}: expected {expected}")]
    Signal {
        signal: String,
        expected: &'static str,
    },
    #[error("threshold {value:?} of {signal}: expected {expected}")]
    Threshold {
        signal: String,
        value: String,
        expected: &'static str,
    },
}

/// A resource the kernel reports pressure for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Cpu,
    Memory,
    Io,
}

impl Resource {
    pub const ALL: [Self; 3] = [Self::Cpu, Self::Memory, Self::Io];

    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Memory => "memory",
            Self::Io => "io",
        }
    }
}

/// A host signal: `host.<resource>.<some|full>_avg<10|60|300>`, percent of time stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSignal {
    pub resource: Resource,
    /// `full` (every non-idle task stalled) rather than `some`.
    pub full: bool,
    /// 10, 60 or 300 seconds.
    pub window: u16,
}

/// A user's own usage, averaged over a penalty rule's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserSignal {
    /// Share of one CPU, percent (`cpu > 80%`).
    Cpu,
    /// `memory.current`, bytes (`memory > 2G`).
    Memory,
    /// `pids.current`.
    Pids,
    /// Connections the programs refused the user, per minute.
    DenialsPerMin,
}

impl UserSignal {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Memory => "memory",
            Self::Pids => "pids",
            Self::DenialsPerMin => "denials_per_min",
        }
    }

    /// A value as the rule's text writes it (`93%`, `2.5G`, `12`).
    pub fn show(self, value: f64) -> String {
        match self {
            Self::Cpu => format!("{value:.0}%"),
            Self::Memory => format!("{:.1}M", value / f64::from(1u32 << 20)),
            Self::Pids | Self::DenialsPerMin => format!("{value:.0}"),
        }
    }
}

/// One comparison of a signal `S` with a threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison<S> {
    pub signal: S,
    pub cmp: Op,
    pub threshold: f64,
    /// As written, for messages.
    pub text: String,
}

/// `or` of `and`s of comparisons.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition<S> {
    pub any: Vec<Vec<Comparison<S>>>,
    pub text: String,
}

impl<S: Copy> Condition<S> {
    /// Whether the condition holds, given each signal's value (`None`: not measured, and a
    /// comparison of an unmeasured signal does not hold). Also returns the first
    /// comparison that held in the branch that held, to say why.
    pub fn eval(&self, value: impl Fn(S) -> Option<f64>) -> Option<(&Comparison<S>, f64)> {
        self.any.iter().find_map(|all| {
            let mut first = None;
            for c in all {
                let v = value(c.signal)?;
                if !c.cmp.holds(v, c.threshold) {
                    return None;
                }
                first.get_or_insert((c, v));
            }
            first
        })
    }

    /// The signals the condition reads.
    pub fn signals(&self) -> impl Iterator<Item = S> + '_ {
        self.any.iter().flatten().map(|c| c.signal)
    }
}

impl<S> fmt::Display for Condition<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Parses a condition, each comparison with `term`.
fn parse_condition<S>(
    text: &str,
    term: impl Fn(&str, Op, &str) -> Result<Comparison<S>, ExprError>,
) -> Result<Condition<S>, ExprError> {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.is_empty() {
        return Err(ExprError::Empty);
    }
    let mut any = Vec::new();
    for branch in words.split(|w| *w == "or") {
        let mut all = Vec::new();
        for part in branch.split(|w| *w == "and") {
            let form = || ExprError::Form {
                term: part.join(" "),
            };
            let [signal, op, value] = part else {
                return Err(form());
            };
            let cmp = Op::parse(op).ok_or_else(form)?;
            let mut c = term(signal, cmp, value)?;
            c.text = part.join(" ");
            all.push(c);
        }
        any.push(all);
    }
    Ok(Condition {
        any,
        text: words.join(" "),
    })
}

const HOST_SIGNALS: &str =
    "host.<cpu|memory|io>.<some|full>_avg<10|60|300> (percent of time stalled)";

/// Parses an `[[adapt]]` rule's `when`.
pub fn parse_host_condition(text: &str) -> Result<Condition<HostSignal>, ExprError> {
    parse_condition(text, |signal, cmp, value| {
        let unknown = || ExprError::Signal {
            signal: signal.to_string(),
            expected: HOST_SIGNALS,
        };
        let mut parts = signal.split('.');
        let (Some("host"), Some(resource), Some(avg), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(unknown());
        };
        let resource = Resource::ALL
            .into_iter()
            .find(|r| r.name() == resource)
            .ok_or_else(unknown)?;
        let (full, window) = if let Some(w) = avg.strip_prefix("some_avg") {
            (false, w)
        } else if let Some(w) = avg.strip_prefix("full_avg") {
            (true, w)
        } else {
            return Err(unknown());
        };
        let window = match window {
            "10" => 10,
            "60" => 60,
            "300" => 300,
            _ => return Err(unknown()),
        };
        let threshold = value
            .strip_suffix('%')
            .unwrap_or(value)
            .parse::<f64>()
            .ok()
            .filter(|t| (0.0..=100.0).contains(t))
            .ok_or_else(|| ExprError::Threshold {
                signal: signal.to_string(),
                value: value.to_string(),
                expected: "a percentage from 0 to 100",
            })?;
        Ok(Comparison {
            signal: HostSignal {
                resource,
                full,
                window,
            },
            cmp,
            threshold,
            text: String::new(),
        })
    })
}

/// Parses a `[[penalty]]` rule's `when`.
pub fn parse_user_condition(text: &str) -> Result<Condition<UserSignal>, ExprError> {
    parse_condition(text, |signal, cmp, value| {
        let bad = |expected| ExprError::Threshold {
            signal: signal.to_string(),
            value: value.to_string(),
            expected,
        };
        let (signal_kind, threshold) = match signal {
            "cpu" => {
                let pct = value
                    .strip_suffix('%')
                    .and_then(|n| n.parse::<f64>().ok())
                    .filter(|n| *n > 0.0 && *n <= 100_000.0)
                    .ok_or_else(|| bad("a share of one CPU such as 80% (above 0)"))?;
                (UserSignal::Cpu, pct)
            }
            "memory" => match parse_bytes("memory", value) {
                Ok(Limit::Value(bytes)) => (UserSignal::Memory, bytes as f64),
                _ => return Err(bad("a size such as 2G or 512M")),
            },
            "pids" | "denials_per_min" => {
                let kind = if signal == "pids" {
                    UserSignal::Pids
                } else {
                    UserSignal::DenialsPerMin
                };
                match parse_count(kind.name(), value, 0) {
                    Ok(Limit::Value(n)) => (kind, n as f64),
                    _ => return Err(bad("a whole number")),
                }
            }
            _ => {
                return Err(ExprError::Signal {
                    signal: signal.to_string(),
                    expected: "cpu, memory, pids or denials_per_min (the user's own usage)",
                })
            }
        };
        Ok(Comparison {
            signal: signal_kind,
            cmp,
            threshold,
            text: String::new(),
        })
    })
}

/// An `[[adapt]]` rule: while `when` has held for `hold`, `step` tightens `target`'s
/// quota; once it has been false for `release_after`, the step is removed.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptRule {
    pub name: String,
    pub when: Condition<HostSignal>,
    pub hold: Duration,
    pub release_after: Duration,
    pub target: Target,
    pub step: Quota,
    pub mode: Mode,
}

/// `/proc/pressure/*`; `None` where the kernel has no PSI for the resource.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostPressure {
    pub cpu: Option<Pressure>,
    pub memory: Option<Pressure>,
    pub io: Option<Pressure>,
}

impl HostPressure {
    pub fn value(&self, s: HostSignal) -> Option<f64> {
        let r = match s.resource {
            Resource::Cpu => self.cpu,
            Resource::Memory => self.memory,
            Resource::Io => self.io,
        }?;
        let avgs = if s.full {
            r.full_avg?
        } else {
            [r.some_avg10, r.some_avg60, r.some_avg300]
        };
        Some(match s.window {
            10 => avgs[0],
            60 => avgs[1],
            _ => avgs[2],
        })
    }
}

/// One user's counters and gauges at one moment; `None` where not measured (no cgroup
/// of the user's, or no connection counters).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UserSample {
    /// `cpu.stat` usage_usec of the user's cgroup.
    pub cpu_usec: Option<u64>,
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    /// Connections refused to the user so far (every reason).
    pub denied: Option<u64>,
}

/// A step in force: `quota` tightens `target` while it holds (never loosens it: see
/// `desired::Desired::build_with_steps`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub target: Target,
    /// `adapt:<rule>` or `penalty:<rule>`.
    pub source: String,
    pub quota: Quota,
}

/// One tier of a penalty: the quota a penalised user gets, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    pub quota: Quota,
    pub duration: Duration,
}

/// A `[[penalty]]` rule: a user whose own usage over `window` crosses `when` enters a
/// tier; crossing again within `forgive_after` of the last tier's end moves them up one.
#[derive(Debug, Clone, PartialEq)]
pub struct PenaltyRule {
    pub name: String,
    pub when: Condition<UserSignal>,
    pub window: Duration,
    pub exempt_uids: Vec<u32>,
    pub exempt_gids: Vec<u32>,
    pub mode: Mode,
    /// `None`: 10 x the duration of the tier the user was last in.
    pub forgive_after: Option<Duration>,
    pub tiers: Vec<Tier>,
}

impl PenaltyRule {
    /// How long after tier `tier` (1-based) ends a new crossing still moves the user up.
    pub fn forgive_after(&self, tier: usize) -> Duration {
        self.forgive_after.unwrap_or_else(|| {
            let i = tier.clamp(1, self.tiers.len().max(1)) - 1;
            self.tiers
                .get(i)
                .map_or(Duration::ZERO, |t| t.duration.saturating_mul(10))
        })
    }
}

/// How often the agent evaluates the adaptive rules and penalties.
pub const ROUND_INTERVAL: Duration = Duration::from_secs(1);

/// The longest duration a rule takes (tiers, windows, holds, expiries): a year.
pub const MAX_RULE_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The quota fields a step or tier may set: limits only (`mode` comes from the rule).
pub const STEP_FIELDS: [Field; 7] = [
    Field::Cpu,
    Field::Memory,
    Field::MemoryHigh,
    Field::Pids,
    Field::Conns,
    Field::ConnRate,
    Field::ConnBurst,
];

/// How tight one field's limit is, comparable within the field (smaller is tighter);
/// `None` for no limit (`max`, or unset).
pub fn tightness(quota: &Quota, field: Field) -> Option<f64> {
    fn v<T: Copy>(l: Option<Limit<T>>, f: impl Fn(T) -> f64) -> Option<f64> {
        l.and_then(Limit::value).map(f)
    }
    match field {
        Field::Cpu => v(quota.cpu, |c| c.quota_us as f64 / c.period_us as f64),
        Field::Memory => v(quota.memory, |b| b as f64),
        Field::MemoryHigh => v(quota.memory_high, |b| b as f64),
        Field::Pids => v(quota.pids, |n| n as f64),
        Field::Conns => v(quota.conns, |n| n as f64),
        Field::ConnRate => v(quota.conn_rate, |r| r.count as f64 / r.period_s as f64),
        // An unset burst is the rate's count (the programs' default), not no limit.
        Field::ConnBurst => quota
            .conn_burst
            .or_else(|| quota.conn_rate.and_then(Limit::value).map(|r| r.count))
            .map(|b| b as f64),
        Field::Mode => None,
    }
}

/// The fields of `next` that are looser than `previous`'s (or that `previous` sets and
/// `next` does not): a tier must tighten what the tier before it set.
pub fn loosened(previous: &Quota, next: &Quota) -> Vec<Field> {
    STEP_FIELDS
        .into_iter()
        .filter(|f| match (tightness(previous, *f), tightness(next, *f)) {
            (Some(_), None) => true,
            (Some(p), Some(n)) => n > p,
            _ => false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_conditions_parse_with_and_binding_tighter_than_or() {
        let c = parse_host_condition(
            "host.cpu.some_avg10 > 40 and host.io.full_avg60 >= 5 or host.memory.some_avg300 > 1",
        )
        .unwrap();
        assert_eq!(c.any.len(), 2);
        assert_eq!(c.any[0].len(), 2);
        assert_eq!(
            c.any[0][1].signal,
            HostSignal {
                resource: Resource::Io,
                full: true,
                window: 60
            }
        );
        let value = |cpu: f64, io: f64, mem: f64| {
            move |s: HostSignal| {
                Some(match s.resource {
                    Resource::Cpu => cpu,
                    Resource::Io => io,
                    Resource::Memory => mem,
                })
            }
        };
        assert!(c.eval(value(50.0, 5.0, 0.0)).is_some());
        assert!(c.eval(value(50.0, 4.0, 0.0)).is_none());
        let (why, v) = c.eval(value(0.0, 0.0, 2.0)).unwrap();
        assert_eq!((why.text.as_str(), v), ("host.memory.some_avg300 > 1", 2.0));
        // An unmeasured signal makes its comparison false.
        assert!(c.eval(|_| None).is_none());
    }

    #[test]
    fn bad_conditions_say_what_was_expected() {
        for (text, wanted) in [
            ("", "empty condition"),
            ("host.cpu.some_avg10 >", "expected <signal> <op> <number>"),
            (
                "host.cpu.some_avg10 => 4",
                "expected <signal> <op> <number>",
            ),
            (
                "host.gpu.some_avg10 > 4",
                "unknown signal \"host.gpu.some_avg10\"",
            ),
            ("host.cpu.some_avg15 > 4", "unknown signal"),
            ("host.cpu.some_avg10 > 140", "a percentage from 0 to 100"),
            (
                "host.cpu.some_avg10 > 4 and",
                "expected <signal> <op> <number>",
            ),
        ] {
            let err = parse_host_condition(text).unwrap_err().to_string();
            assert!(err.contains(wanted), "{text:?}: {err}");
        }
        for (text, wanted) in [
            ("cpu > 80", "a share of one CPU"),
            ("memory > lots", "a size such as 2G"),
            ("pids > -1", "a whole number"),
            ("load > 3", "cpu, memory, pids or denials_per_min"),
        ] {
            let err = parse_user_condition(text).unwrap_err().to_string();
            assert!(err.contains(wanted), "{text:?}: {err}");
        }
        let c = parse_user_condition("cpu > 80% or denials_per_min >= 100").unwrap();
        assert_eq!(c.any[0][0].threshold, 80.0);
        assert_eq!(c.any[1][0].signal, UserSignal::DenialsPerMin);
    }

    #[test]
    fn a_tier_that_loosens_or_drops_a_limit_is_found() {
        let q = |pairs: &[(Field, &str)]| {
            let mut q = Quota::default();
            for (f, v) in pairs {
                q.set(*f, v).unwrap();
            }
            q
        };
        let first = q(&[(Field::Cpu, "30%"), (Field::Conns, "8")]);
        assert!(loosened(&first, &q(&[(Field::Cpu, "10%"), (Field::Conns, "8")])).is_empty());
        assert_eq!(
            loosened(&first, &q(&[(Field::Cpu, "40%"), (Field::Conns, "8")])),
            vec![Field::Cpu]
        );
        assert_eq!(
            loosened(&first, &q(&[(Field::Cpu, "10%")])),
            vec![Field::Conns]
        );
    }
}
