//! memory controller: `memory.max`, `memory.high`, usage and events.

use std::path::Path;

use super::{flat_keyed, parse_max, read, read_optional, write, CgroupError};
use crate::model::{quota::Limit, usage::MemoryStats};

fn limit_text(limit: Limit<u64>) -> String {
    match limit {
        Limit::Value(bytes) => bytes.to_string(),
        Limit::Max => "max".to_string(),
    }
}

/// Writes `memory.max` (the hard limit: the OOM killer acts above it).
pub fn apply_max(cgroup: &Path, limit: Limit<u64>) -> Result<(), CgroupError> {
    write(&cgroup.join("memory.max"), &limit_text(limit))
}

/// Writes `memory.high` (the throttle point: reclaim and slow-down above it).
pub fn apply_high(cgroup: &Path, limit: Limit<u64>) -> Result<(), CgroupError> {
    write(&cgroup.join("memory.high"), &limit_text(limit))
}

pub fn stats(cgroup: &Path) -> Result<MemoryStats, CgroupError> {
    let file = |name: &str| cgroup.join(name);
    let number = |name: &str| -> Result<u64, CgroupError> {
        let path = file(name);
        parse_max(&path, &read(&path)?)?.ok_or(CgroupError::Parse {
            path,
            line: "max".to_string(),
        })
    };
    let mut s = MemoryStats {
        current: number("memory.current")?,
        ..MemoryStats::default()
    };
    if let Some(text) = read_optional(&file("memory.peak"))? {
        s.peak = parse_max(&file("memory.peak"), &text)?;
    }
    s.max = parse_max(&file("memory.max"), &read(&file("memory.max"))?)?;
    s.high = parse_max(&file("memory.high"), &read(&file("memory.high"))?)?;
    let events = file("memory.events");
    for (key, value) in flat_keyed(&events, &read(&events)?)? {
        match key.as_str() {
            "high" => s.events_high = value,
            "max" => s.events_max = value,
            "oom" => s.events_oom = value,
            "oom_kill" => s.events_oom_kill = value,
            _ => {}
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(dir: &Path, peak: bool) {
        for (f, v) in [
            ("memory.current", "1048576\n"),
            ("memory.max", "67108864\n"),
            ("memory.high", "max\n"),
            (
                "memory.events",
                "low 0\nhigh 2\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n",
            ),
        ] {
            std::fs::write(dir.join(f), v).unwrap();
        }
        if peak {
            std::fs::write(dir.join("memory.peak"), "67108864\n").unwrap();
        }
    }

    #[test]
    fn applies_limits() {
        let tmp = tempfile::tempdir().unwrap();
        apply_max(tmp.path(), Limit::Value(64 << 20)).unwrap();
        apply_high(tmp.path(), Limit::Max).unwrap();
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("memory.max")).unwrap(),
            "67108864"
        );
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("memory.high")).unwrap(),
            "max"
        );
    }

    #[test]
    fn reads_usage_limits_and_events() {
        let tmp = tempfile::tempdir().unwrap();
        fake(tmp.path(), true);
        let s = stats(tmp.path()).unwrap();
        assert_eq!(s.current, 1 << 20);
        assert_eq!(s.peak, Some(64 << 20));
        assert_eq!((s.max, s.high), (Some(64 << 20), None));
        assert_eq!(
            (s.events_high, s.events_max, s.events_oom, s.events_oom_kill),
            (2, 7, 1, 1)
        );
    }

    #[test]
    fn peak_is_optional_but_a_bad_events_file_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        fake(tmp.path(), false);
        assert_eq!(stats(tmp.path()).unwrap().peak, None);
        std::fs::write(tmp.path().join("memory.events"), "oom_kill one\n").unwrap();
        let err = stats(tmp.path()).unwrap_err().to_string();
        assert!(
            err.contains("memory.events") && err.contains("oom_kill one"),
            "{err}"
        );
    }
}
