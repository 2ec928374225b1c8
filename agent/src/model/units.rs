//! Quota values and their parsers, one per unit: CPU percentages, byte sizes, counts,
//! connection rates. Each error names the field, the value and the form expected.
//! `quota.rs` builds whole quotas from these (and re-exports the value types).

/// Errors of this module. Each names the field, the value and the form expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("invalid {field} {value:?}: expected {expected}")]
    Invalid {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("invalid {field} {value:?}: {reason}")]
    OutOfRange {
        field: &'static str,
        value: String,
        reason: String,
    },
}

/// A limit or its explicit removal (`max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit<T> {
    Max,
    Value(T),
}

impl<T: Copy> Limit<T> {
    pub fn value(self) -> Option<T> {
        match self {
            Self::Max => None,
            Self::Value(v) => Some(v),
        }
    }
}

/// CPU bandwidth as written to `cpu.max`: `quota_us` per `period_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuMax {
    pub quota_us: u64,
    pub period_us: u64,
}

/// The period we write with every CPU quota, the kernel's default (100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;
/// memory.max accepts any byte count, but a limit below one page cannot hold a process.
pub const PAGE_SIZE: u64 = 4096;

/// New connections per second or per minute, with the bucket size (`conn_burst`, default
/// = the count: a second's or a minute's worth at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRate {
    pub count: u64,
    /// 1 (`/s`) or 60 (`/min`).
    pub period_s: u64,
}

impl ConnRate {
    /// Nanoseconds per token, rounded up, so the rate enforced is never above the rate set.
    pub fn interval_ns(self) -> u64 {
        (self.period_s * 1_000_000_000).div_ceil(self.count)
    }
}

/// cpu.max refuses quotas below 1 ms.
const CPU_MIN_QUOTA_US: u64 = 1_000;
/// 100 000% = 1000 CPUs: far above any host, low enough to catch a typo like `5000000%`.
const CPU_MAX_PERCENT_X1000: u64 = 100_000 * 1000;

const CPU_EXPECTED: &str = "a percentage of one CPU such as 50% or 250% (at least 1%), or max";
const BYTES_EXPECTED: &str =
    "a size with a binary unit K, M, G or T such as 512M or 2G, a byte count of at least 4096, or max";
const RATE_EXPECTED: &str =
    "connections per second or per minute such as 20/s or 30/min (from 1 to 1000000), or max";
/// Highest count in a rate, and highest burst: far above any sane policy, low enough that
/// `burst * interval` stays well inside 64 bits of nanoseconds.
pub const MAX_RATE_COUNT: u64 = 1_000_000;

/// `50%` = half of one CPU (`cpu.max 50000 100000`), `250%` = 2.5 CPUs, `max` = none.
/// Up to three decimals are accepted (`12.5%`), as systemd's `CPUQuota=` does.
pub fn parse_cpu(value: &str) -> Result<Limit<CpuMax>, UnitError> {
    let invalid = || UnitError::Invalid {
        field: "cpu",
        value: value.to_string(),
        expected: CPU_EXPECTED,
    };
    if value == "max" {
        return Ok(Limit::Max);
    }
    let number = value.strip_suffix('%').ok_or_else(invalid)?;
    let milli_percent = parse_decimal_milli(number).ok_or_else(invalid)?;
    if milli_percent > CPU_MAX_PERCENT_X1000 {
        return Err(UnitError::OutOfRange {
            field: "cpu",
            value: value.to_string(),
            reason: "more than 100000% (1000 CPUs)".to_string(),
        });
    }
    // quota_us = period * percent / 100, computed in milli-percent to keep decimals exact.
    let quota_us = CPU_PERIOD_US * milli_percent / 100_000;
    if quota_us < CPU_MIN_QUOTA_US {
        return Err(UnitError::OutOfRange {
            field: "cpu",
            value: value.to_string(),
            reason: "below 1% (cpu.max needs at least 1 ms per 100 ms period)".to_string(),
        });
    }
    Ok(Limit::Value(CpuMax {
        quota_us,
        period_us: CPU_PERIOD_US,
    }))
}

/// A decimal with at most three fractional digits, in thousandths.
fn parse_decimal_milli(text: &str) -> Option<u64> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) || text.ends_with('.') {
        return None;
    }
    let int: u64 = int.parse().ok()?;
    let frac_milli: u64 = format!("{frac:0<3}").parse().ok()?;
    int.checked_mul(1000)?.checked_add(frac_milli)
}

/// `2G`, `1536M`, `512K`, `1T` (binary units), a bare byte count of at least one page, or
/// `max`.
pub fn parse_bytes(field: &'static str, value: &str) -> Result<Limit<u64>, UnitError> {
    let invalid = || UnitError::Invalid {
        field,
        value: value.to_string(),
        expected: BYTES_EXPECTED,
    };
    if value == "max" {
        return Ok(Limit::Max);
    }
    let (digits, shift) = match value.as_bytes().last() {
        Some(b'K') => (&value[..value.len() - 1], 10),
        Some(b'M') => (&value[..value.len() - 1], 20),
        Some(b'G') => (&value[..value.len() - 1], 30),
        Some(b'T') => (&value[..value.len() - 1], 40),
        _ => (value, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let number: u64 = digits.parse().map_err(|_| invalid())?;
    let bytes = number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| UnitError::OutOfRange {
            field,
            value: value.to_string(),
            reason: "does not fit in 64 bits".to_string(),
        })?;
    if bytes < PAGE_SIZE {
        return Err(UnitError::OutOfRange {
            field,
            value: value.to_string(),
            reason: format!("below one page ({PAGE_SIZE} bytes)"),
        });
    }
    Ok(Limit::Value(bytes))
}

/// A whole number of at least `min`, or `max`.
pub fn parse_count(field: &'static str, value: &str, min: u64) -> Result<Limit<u64>, UnitError> {
    if value == "max" {
        return Ok(Limit::Max);
    }
    let number = parse_whole(value).ok_or_else(|| UnitError::Invalid {
        field,
        value: value.to_string(),
        expected: if min == 0 {
            "a whole number (0 or more), or max"
        } else {
            "a whole number (1 or more), or max"
        },
    })?;
    if number < min {
        return Err(UnitError::OutOfRange {
            field,
            value: value.to_string(),
            reason: format!("must be at least {min}"),
        });
    }
    Ok(Limit::Value(number))
}

fn parse_whole(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// `20/s`, or `max`.
pub fn parse_rate(value: &str) -> Result<Limit<ConnRate>, UnitError> {
    if value == "max" {
        return Ok(Limit::Max);
    }
    let (count, period_s) = if let Some(n) = value.strip_suffix("/s") {
        (n, 1)
    } else if let Some(n) = value.strip_suffix("/min") {
        (n, 60)
    } else {
        ("", 0)
    };
    let count = parse_whole(count)
        .filter(|n| (1..=MAX_RATE_COUNT).contains(n))
        .ok_or_else(|| UnitError::Invalid {
            field: "conn_rate",
            value: value.to_string(),
            expected: RATE_EXPECTED,
        })?;
    Ok(Limit::Value(ConnRate { count, period_s }))
}

/// A token bucket's rate, from its interval between tokens, in the config's form: `20/s`
/// when it is a whole number per second, else per minute (`90/min`).
pub fn rate_text(interval_ns: u64) -> String {
    let per_sec = 1e9 / interval_ns.max(1) as f64;
    if per_sec >= 1.0 && (per_sec - per_sec.round()).abs() < 1e-6 * per_sec {
        format!("{}/s", per_sec.round())
    } else {
        format!("{}/min", (per_sec * 60.0).round())
    }
}

/// Bucket size for `conn_rate`: a whole number of at least 1.
pub fn parse_burst(value: &str) -> Result<u64, UnitError> {
    parse_whole(value)
        .filter(|n| (1..=MAX_RATE_COUNT).contains(n))
        .ok_or_else(|| UnitError::Invalid {
            field: "conn_burst",
            value: value.to_string(),
            expected: "a whole number of connections from 1 to 1000000",
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(quota_us: u64) -> Limit<CpuMax> {
        Limit::Value(CpuMax {
            quota_us,
            period_us: CPU_PERIOD_US,
        })
    }

    #[test]
    fn cpu_percentages_map_to_cpu_max() {
        assert_eq!(parse_cpu("50%"), Ok(cpu(50_000)));
        assert_eq!(parse_cpu("250%"), Ok(cpu(250_000)));
        assert_eq!(parse_cpu("12.5%"), Ok(cpu(12_500)));
        assert_eq!(parse_cpu("1%"), Ok(cpu(1_000)));
        assert_eq!(parse_cpu("max"), Ok(Limit::Max));
    }

    #[test]
    fn cpu_rejects_other_forms_naming_field_and_value() {
        for bad in [
            "50",
            "50 %",
            "%",
            "-5%",
            "0.5%",
            "1.2345%",
            "abc",
            "",
            "5.%",
            "100000.001%",
        ] {
            let err = parse_cpu(bad).unwrap_err().to_string();
            assert!(
                err.contains("cpu") && err.contains(&format!("{bad:?}")),
                "{bad}: {err}"
            );
        }
        assert!(parse_cpu("0%")
            .unwrap_err()
            .to_string()
            .contains("below 1%"));
        assert!(parse_cpu("100001%")
            .unwrap_err()
            .to_string()
            .contains("1000 CPUs"));
    }

    #[test]
    fn bytes_use_binary_units() {
        assert_eq!(parse_bytes("memory", "2G"), Ok(Limit::Value(2 << 30)));
        assert_eq!(parse_bytes("memory", "1536M"), Ok(Limit::Value(1536 << 20)));
        assert_eq!(parse_bytes("memory", "8K"), Ok(Limit::Value(8192)));
        assert_eq!(parse_bytes("memory", "1T"), Ok(Limit::Value(1 << 40)));
        assert_eq!(parse_bytes("memory", "4096"), Ok(Limit::Value(4096)));
        assert_eq!(parse_bytes("memory", "max"), Ok(Limit::Max));
    }

    #[test]
    fn bytes_reject_bad_units_small_values_and_overflow() {
        for bad in ["2g", "2GB", "2 G", "G", "1.5G", "-1G", "", "lots"] {
            let err = parse_bytes("memory_high", bad).unwrap_err().to_string();
            assert!(
                err.contains("memory_high") && err.contains("binary unit"),
                "{bad}: {err}"
            );
        }
        assert!(parse_bytes("memory", "100")
            .unwrap_err()
            .to_string()
            .contains("one page"));
        assert!(parse_bytes("memory", "2K")
            .unwrap_err()
            .to_string()
            .contains("one page"));
        assert!(parse_bytes("memory", "99999999999T")
            .unwrap_err()
            .to_string()
            .contains("64 bits"));
    }

    #[test]
    fn counts_and_rates() {
        assert_eq!(parse_count("pids", "512", 1), Ok(Limit::Value(512)));
        assert_eq!(parse_count("conns", "0", 0), Ok(Limit::Value(0)));
        assert!(parse_count("pids", "0", 1)
            .unwrap_err()
            .to_string()
            .contains("at least 1"));
        assert!(parse_count("pids", "-3", 1).is_err());
        assert!(parse_count("conns", "12x", 0)
            .unwrap_err()
            .to_string()
            .contains("whole number"));
        assert_eq!(
            parse_rate("20/s"),
            Ok(Limit::Value(ConnRate {
                count: 20,
                period_s: 1
            }))
        );
        assert_eq!(
            parse_rate("30/min"),
            Ok(Limit::Value(ConnRate {
                count: 30,
                period_s: 60
            }))
        );
        for bad in ["20", "20/m", "0/s", "/s", "x/s", "1000001/s", "0/min"] {
            assert!(
                parse_rate(bad)
                    .unwrap_err()
                    .to_string()
                    .contains("conn_rate"),
                "{bad}"
            );
        }
        assert_eq!(parse_burst("40"), Ok(40));
        assert!(parse_burst("0").is_err());
    }

    #[test]
    fn rates_print_in_the_form_they_were_written() {
        for text in ["20/s", "3/s", "1/s", "90/min", "7/min", "1/min"] {
            let Ok(Limit::Value(rate)) = parse_rate(text) else {
                panic!("{text}")
            };
            assert_eq!(rate_text(rate.interval_ns()), text);
        }
    }
}
