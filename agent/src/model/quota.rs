//! Quota values: the one parser for every quota field, shared by the config file, the
//! control socket and rlctl (the README's "Targets and quota units").
//!
//! A field that is not set is `None`; a field set to `max` is `Some(Limit::Max)` (remove
//! the limit); anything else is `Some(Limit::Value(_))`. A [`Quota`] is only built by
//! [`RawQuota::validate`], so holding one means every field was valid.

use std::fmt;

use serde::Deserialize;

use super::{
    target::Target,
    units::{parse_burst, parse_bytes, parse_count, parse_cpu, parse_rate, UnitError},
};
// The values of the quota fields, defined beside their parsers.
pub use super::units::{ConnRate, CpuMax, Limit, CPU_PERIOD_US, PAGE_SIZE};

/// Errors of this module. Each names the field, the value and the form expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error("invalid {field} {value:?}: expected {expected}")]
    Invalid {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A field's value, as the unit parsers judge it.
    #[error(transparent)]
    Unit(#[from] UnitError),
    #[error("conn_burst {burst} is set without conn_rate: a burst only makes sense with a rate")]
    BurstWithoutRate { burst: u64 },
    #[error("memory_high {high} is above memory {max}: memory.high must not exceed memory.max")]
    HighAboveMax { high: String, max: String },
    #[error("a quota needs at least one field (cpu, memory, memory_high, pids, conns, conn_rate)")]
    Empty,
    #[error("mode {mode} is set without conns or conn_rate: the mode says whether connection limits deny or only report, and cpu, memory and pids limits are always enforced")]
    ModeWithoutConnLimit { mode: Mode },
}

/// What a capped UID's connect() gets when a kernel map has no room to count it
/// (`[bpf] on_full`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    /// Refused, and counted (`rlagent_connections_denied_full_total`): a cap never stops
    /// holding.
    #[default]
    Deny,
    /// Let through uncounted (`rlagent_connections_untracked_total`).
    Allow,
}

/// Whether a target's connection limits deny (`enforce`) or only count and report what
/// they would deny (`monitor`), so a policy can be watched before it is enforced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Monitor,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Monitor => "monitor",
        }
    }

    pub fn parse(field: &'static str, value: &str) -> Result<Self, QuotaError> {
        match value {
            "enforce" => Ok(Self::Enforce),
            "monitor" => Ok(Self::Monitor),
            _ => Err(QuotaError::Invalid {
                field,
                value: value.to_string(),
                expected: "enforce or monitor",
            }),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A validated quota: every field that is `Some` was parsed and checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quota {
    pub cpu: Option<Limit<CpuMax>>,
    pub memory: Option<Limit<u64>>,
    pub memory_high: Option<Limit<u64>>,
    pub pids: Option<Limit<u64>>,
    pub conns: Option<Limit<u64>>,
    pub conn_rate: Option<Limit<ConnRate>>,
    pub conn_burst: Option<u64>,
    pub mode: Option<Mode>,
}

/// The name of one quota field, as in the config, the socket and rlctl's flags.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    Cpu,
    Memory,
    MemoryHigh,
    Pids,
    Conns,
    ConnRate,
    ConnBurst,
    Mode,
}

impl Field {
    pub const ALL: [Self; 8] = [
        Self::Cpu,
        Self::Memory,
        Self::MemoryHigh,
        Self::Pids,
        Self::Conns,
        Self::ConnRate,
        Self::ConnBurst,
        Self::Mode,
    ];

    /// The cgroup v2 controller that enforces this field, if a controller does.
    pub fn controller(self) -> Option<&'static str> {
        match self {
            Self::Cpu => Some("cpu"),
            Self::Memory | Self::MemoryHigh => Some("memory"),
            Self::Pids => Some("pids"),
            Self::Conns | Self::ConnRate | Self::ConnBurst | Self::Mode => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Memory => "memory",
            Self::MemoryHigh => "memory_high",
            Self::Pids => "pids",
            Self::Conns => "conns",
            Self::ConnRate => "conn_rate",
            Self::ConnBurst => "conn_burst",
            Self::Mode => "mode",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Quota {
    /// True when `field` holds a limit (set, and not `max`).
    pub fn limits(&self, field: Field) -> bool {
        match field {
            Field::Cpu => matches!(self.cpu, Some(Limit::Value(_))),
            Field::Memory => matches!(self.memory, Some(Limit::Value(_))),
            Field::MemoryHigh => matches!(self.memory_high, Some(Limit::Value(_))),
            Field::Pids => matches!(self.pids, Some(Limit::Value(_))),
            Field::Conns => matches!(self.conns, Some(Limit::Value(_))),
            Field::ConnRate => matches!(self.conn_rate, Some(Limit::Value(_))),
            Field::ConnBurst => self.conn_burst.is_some(),
            // Not a limit: it says how the connection limits act.
            Field::Mode => false,
        }
    }

    /// The connection fields (conns, conn_rate, conn_burst, mode) the quota sets.
    pub fn conn_fields(&self) -> Vec<Field> {
        [Field::Conns, Field::ConnRate, Field::ConnBurst, Field::Mode]
            .into_iter()
            .filter(|f| self.text(*f).is_some())
            .collect()
    }

    /// True when the quota sets a cgroup controller (cpu, memory, pids).
    pub fn has_cgroup_fields(&self) -> bool {
        self.cpu.is_some()
            || self.memory.is_some()
            || self.memory_high.is_some()
            || self.pids.is_some()
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Sets one field from its text form, with that field's parser. Cross-field rules are
    /// checked by [`Quota::check`] once all fields are in.
    /// `other`'s fields over these: each field `other` sets replaces this one's.
    pub fn overlay(&mut self, other: &Quota) {
        macro_rules! over {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        over!(
            cpu,
            memory,
            memory_high,
            pids,
            conns,
            conn_rate,
            conn_burst,
            mode
        );
    }

    pub fn set(&mut self, field: Field, value: &str) -> Result<(), QuotaError> {
        match field {
            Field::Cpu => self.cpu = Some(parse_cpu(value)?),
            Field::Memory => self.memory = Some(parse_bytes("memory", value)?),
            Field::MemoryHigh => self.memory_high = Some(parse_bytes("memory_high", value)?),
            Field::Pids => self.pids = Some(parse_count("pids", value, 1)?),
            Field::Conns => self.conns = Some(parse_count("conns", value, 0)?),
            Field::ConnRate => self.conn_rate = Some(parse_rate(value)?),
            Field::ConnBurst => self.conn_burst = Some(parse_burst(value)?),
            Field::Mode => self.mode = Some(Mode::parse("mode", value)?),
        }
        Ok(())
    }

    /// Removes one field (as if it had never been set: defaults such as `user:*` apply).
    pub fn clear(&mut self, field: Field) {
        match field {
            Field::Cpu => self.cpu = None,
            Field::Memory => self.memory = None,
            Field::MemoryHigh => self.memory_high = None,
            Field::Pids => self.pids = None,
            Field::Conns => self.conns = None,
            Field::ConnRate => self.conn_rate = None,
            Field::ConnBurst => self.conn_burst = None,
            Field::Mode => self.mode = None,
        }
    }

    /// A field in the canonical text form the parsers accept (`None` when unset).
    pub fn text(&self, field: Field) -> Option<String> {
        fn limit<T: Copy>(l: Option<Limit<T>>, f: impl Fn(T) -> String) -> Option<String> {
            l.map(|l| l.value().map_or_else(|| "max".to_string(), &f))
        }
        match field {
            Field::Cpu => limit(self.cpu, |c| {
                let milli = c.quota_us * 100_000 / c.period_us;
                if milli.is_multiple_of(1000) {
                    format!("{}%", milli / 1000)
                } else {
                    format!("{}%", milli as f64 / 1000.0)
                }
            }),
            Field::Memory => limit(self.memory, bytes_text),
            Field::MemoryHigh => limit(self.memory_high, bytes_text),
            Field::Pids => limit(self.pids, |n| n.to_string()),
            Field::Conns => limit(self.conns, |n| n.to_string()),
            Field::ConnRate => limit(self.conn_rate, |r| match r.period_s {
                60 => format!("{}/min", r.count),
                _ => format!("{}/s", r.count),
            }),
            Field::ConnBurst => self.conn_burst.map(|b| b.to_string()),
            Field::Mode => self.mode.map(|m| m.name().to_string()),
        }
    }

    /// Rules between fields: a burst needs a rate; memory.high must not exceed memory.max.
    pub fn check(&self) -> Result<(), QuotaError> {
        if self.is_empty() {
            return Err(QuotaError::Empty);
        }
        if let (Some(burst), None | Some(Limit::Max)) = (self.conn_burst, self.conn_rate) {
            return Err(QuotaError::BurstWithoutRate { burst });
        }
        if let (Some(mode), false) = (self.mode, self.conns.is_some() || self.conn_rate.is_some()) {
            return Err(QuotaError::ModeWithoutConnLimit { mode });
        }
        if let (Some(Limit::Value(high)), Some(Limit::Value(max))) = (self.memory_high, self.memory)
        {
            if high > max {
                return Err(QuotaError::HighAboveMax {
                    high: self.text(Field::MemoryHigh).unwrap_or_default(),
                    max: self.text(Field::Memory).unwrap_or_default(),
                });
            }
        }
        Ok(())
    }
}

/// The fields of `quota` that `target`'s kind cannot carry: connection limits belong to
/// users (`user:<uid>`, `user:*`) and groups; a `cgroup:<path>` target (a cgroup someone
/// else manages) carries cgroup limits only.
pub fn unsupported_fields(target: &Target, quota: &Quota) -> Vec<Field> {
    if !matches!(target, Target::Cgroup(_)) {
        return Vec::new();
    }
    quota.conn_fields()
}

/// The refusal for [`unsupported_fields`].
pub fn not_supported_yet(target: &Target, fields: &[Field]) -> String {
    let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
    format!(
        "{target}: {} cannot be set on a cgroup:<path> target: connection limits apply to users (user:<uid>, user:*) and groups (put the processes in a group to limit their connections together); nothing was applied",
        names.join(", ")
    )
}

/// Bytes with the largest binary unit that divides them exactly.
fn bytes_text(bytes: u64) -> String {
    for (shift, unit) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
        if bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// An integer or a string in the config (`pids = 512` or `pids = "max"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    Str(String),
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(i) => write!(f, "{i}"),
            Self::Str(s) => f.write_str(s),
        }
    }
}

/// A quota as written by a user (config entry, socket request), before validation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    pub cpu: Option<IntOrString>,
    pub memory: Option<IntOrString>,
    pub memory_high: Option<IntOrString>,
    pub pids: Option<IntOrString>,
    pub conns: Option<IntOrString>,
    pub conn_rate: Option<IntOrString>,
    pub conn_burst: Option<IntOrString>,
    pub mode: Option<IntOrString>,
}

impl RawQuota {
    /// Parses every field; the first invalid one is the error and nothing is returned.
    pub fn validate(&self) -> Result<Quota, QuotaError> {
        let mut quota = Quota::default();
        for (field, value) in [
            (Field::Cpu, &self.cpu),
            (Field::Memory, &self.memory),
            (Field::MemoryHigh, &self.memory_high),
            (Field::Pids, &self.pids),
            (Field::Conns, &self.conns),
            (Field::ConnRate, &self.conn_rate),
            (Field::ConnBurst, &self.conn_burst),
            (Field::Mode, &self.mode),
        ] {
            if let Some(value) = value {
                quota.set(field, &value.to_string())?;
            }
        }
        quota.check()?;
        Ok(quota)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_print_in_the_form_the_parser_reads() {
        let mut q = Quota::default();
        for (field, text) in [
            (Field::Cpu, "50%"),
            (Field::Memory, "2G"),
            (Field::MemoryHigh, "1536M"),
            (Field::Pids, "max"),
            (Field::Conns, "0"),
            (Field::ConnRate, "20/s"),
            (Field::ConnBurst, "40"),
        ] {
            q.set(field, text).unwrap();
            assert_eq!(q.text(field).as_deref(), Some(text));
        }
        q.set(Field::Cpu, "12.5%").unwrap();
        assert_eq!(q.text(Field::Cpu).as_deref(), Some("12.5%"));
        q.set(Field::Memory, "4097").unwrap();
        assert_eq!(q.text(Field::Memory).as_deref(), Some("4097"));
        q.clear(Field::Cpu);
        assert_eq!(q.text(Field::Cpu), None);
        assert!(
            matches!(q.check(), Err(QuotaError::HighAboveMax { .. })),
            "1536M high over a 4097-byte max"
        );
    }

    fn raw(f: impl FnOnce(&mut RawQuota)) -> RawQuota {
        let mut q = RawQuota::default();
        f(&mut q);
        q
    }

    #[test]
    fn validate_reports_the_first_bad_field_and_cross_field_rules() {
        let q = raw(|q| {
            q.cpu = Some(IntOrString::Str("50%".into()));
            q.pids = Some(IntOrString::Int(512));
            q.conns = Some(IntOrString::Int(64));
        });
        let quota = q.validate().unwrap();
        assert_eq!(quota.pids, Some(Limit::Value(512)));
        assert_eq!(quota.conns, Some(Limit::Value(64)));
        assert!(quota.has_cgroup_fields());

        let bad = raw(|q| {
            q.conns = Some(IntOrString::Int(4));
            q.memory = Some(IntOrString::Str("2X".into()));
        });
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("memory \"2X\""));

        let high = raw(|q| {
            q.memory = Some(IntOrString::Str("1G".into()));
            q.memory_high = Some(IntOrString::Str("2G".into()));
        });
        assert!(matches!(
            high.validate(),
            Err(QuotaError::HighAboveMax { .. })
        ));

        let burst = raw(|q| q.conn_burst = Some(IntOrString::Int(40)));
        assert_eq!(
            burst.validate(),
            Err(QuotaError::BurstWithoutRate { burst: 40 })
        );

        assert_eq!(RawQuota::default().validate(), Err(QuotaError::Empty));

        let mut q = Quota::default();
        q.set(Field::Memory, "1G").unwrap();
        q.set(Field::MemoryHigh, "1536M").unwrap();
        let err = q.check().unwrap_err().to_string();
        assert!(
            err.contains("memory_high 1536M is above memory 1G"),
            "{err}"
        );
        let negative = raw(|q| q.conns = Some(IntOrString::Int(-1)));
        assert!(negative
            .validate()
            .unwrap_err()
            .to_string()
            .contains("conns \"-1\""));
    }
}
