//! pids controller: `pids.max`, `pids.current`, `pids.events`.

use std::path::Path;

use super::{flat_keyed, parse_max, read, write, CgroupError};
use crate::model::{quota::Limit, usage::PidsStats};

pub fn apply(cgroup: &Path, limit: Limit<u64>) -> Result<(), CgroupError> {
    let value = match limit {
        Limit::Value(n) => n.to_string(),
        Limit::Max => "max".to_string(),
    };
    write(&cgroup.join("pids.max"), &value)
}

pub fn stats(cgroup: &Path) -> Result<PidsStats, CgroupError> {
    let current_path = cgroup.join("pids.current");
    let current = parse_max(&current_path, &read(&current_path)?)?.unwrap_or(0);
    let max_path = cgroup.join("pids.max");
    let max = parse_max(&max_path, &read(&max_path)?)?;
    let events = cgroup.join("pids.events");
    let events_max = flat_keyed(&events, &read(&events)?)?
        .into_iter()
        .find(|(k, _)| k == "max")
        .map_or(0, |(_, v)| v);
    Ok(PidsStats {
        current,
        max,
        events_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_and_reads() {
        let tmp = tempfile::tempdir().unwrap();
        apply(tmp.path(), Limit::Value(10)).unwrap();
        std::fs::write(tmp.path().join("pids.current"), "10\n").unwrap();
        std::fs::write(tmp.path().join("pids.events"), "max 3\n").unwrap();
        let s = stats(tmp.path()).unwrap();
        assert_eq!(
            s,
            PidsStats {
                current: 10,
                max: Some(10),
                events_max: 3
            }
        );
        apply(tmp.path(), Limit::Max).unwrap();
        assert_eq!(stats(tmp.path()).unwrap().max, None);
    }

    #[test]
    fn missing_controller_files_name_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let err = stats(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("pids.current"), "{err}");
    }
}
