//! cpu controller: `cpu.max` and `cpu.stat`.

use std::path::Path;

use super::{flat_keyed, read, write, CgroupError};
use crate::model::{
    quota::{CpuMax, Limit, CPU_PERIOD_US},
    usage::CpuStats,
};

/// Writes `cpu.max`: `"<quota> <period>"`, or `"max <period>"` to remove the limit.
pub fn apply(cgroup: &Path, limit: Limit<CpuMax>) -> Result<(), CgroupError> {
    let value = match limit {
        Limit::Value(CpuMax {
            quota_us,
            period_us,
        }) => format!("{quota_us} {period_us}"),
        Limit::Max => format!("max {CPU_PERIOD_US}"),
    };
    write(&cgroup.join("cpu.max"), &value)
}

/// The current `cpu.max` (`None` = no limit).
pub fn current(cgroup: &Path) -> Result<Option<CpuMax>, CgroupError> {
    let path = cgroup.join("cpu.max");
    let text = read(&path)?;
    let mut words = text.split_whitespace();
    let parse_err = || CgroupError::Parse {
        path: path.clone(),
        line: text.trim().to_string(),
    };
    let quota = words.next().ok_or_else(parse_err)?;
    let period_us: u64 = words
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(parse_err)?;
    if quota == "max" {
        return Ok(None);
    }
    let quota_us = quota.parse().map_err(|_| parse_err())?;
    Ok(Some(CpuMax {
        quota_us,
        period_us,
    }))
}

pub fn stats(cgroup: &Path) -> Result<CpuStats, CgroupError> {
    let path = cgroup.join("cpu.stat");
    let mut s = CpuStats::default();
    for (key, value) in flat_keyed(&path, &read(&path)?)? {
        match key.as_str() {
            "usage_usec" => s.usage_usec = value,
            "user_usec" => s.user_usec = value,
            "system_usec" => s.system_usec = value,
            "nr_periods" => s.nr_periods = value,
            "nr_throttled" => s.nr_throttled = value,
            "throttled_usec" => s.throttled_usec = value,
            _ => {}
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_and_reads_cpu_max() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = tmp.path();
        apply(
            cg,
            Limit::Value(CpuMax {
                quota_us: 50_000,
                period_us: 100_000,
            }),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(cg.join("cpu.max")).unwrap(),
            "50000 100000"
        );
        assert_eq!(
            current(cg).unwrap(),
            Some(CpuMax {
                quota_us: 50_000,
                period_us: 100_000
            })
        );
        apply(cg, Limit::Max).unwrap();
        assert_eq!(
            std::fs::read_to_string(cg.join("cpu.max")).unwrap(),
            "max 100000"
        );
        assert_eq!(current(cg).unwrap(), None);
    }

    #[test]
    fn reads_throttling_from_cpu_stat() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("cpu.stat"),
            "usage_usec 1500000\nuser_usec 1400000\nsystem_usec 100000\ncore_sched.force_idle_usec 0\n\
             nr_periods 31\nnr_throttled 30\nthrottled_usec 1470000\nnr_bursts 0\nburst_usec 0\n",
        )
        .unwrap();
        let s = stats(tmp.path()).unwrap();
        assert_eq!(
            (s.usage_usec, s.nr_periods, s.nr_throttled, s.throttled_usec),
            (1_500_000, 31, 30, 1_470_000)
        );
    }

    #[test]
    fn missing_files_and_bad_content_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let err = stats(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("cpu.stat"), "{err}");
        std::fs::write(tmp.path().join("cpu.max"), "lots\n").unwrap();
        let err = current(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("cpu.max") && err.contains("lots"), "{err}");
    }
}
