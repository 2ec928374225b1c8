//! Pressure stall information (`cpu.pressure`, `memory.pressure`), where the kernel has it
//! (PSI can be compiled out or disabled with psi=0; the files are then absent or refuse to
//! be read).

use std::path::Path;

use super::{read_optional, CgroupError};
use crate::model::usage::Pressure;

/// Reads `<cgroup>/<resource>.pressure`; `None` when PSI is not available.
pub fn read(cgroup: &Path, resource: &str) -> Result<Option<Pressure>, CgroupError> {
    read_file(&cgroup.join(format!("{resource}.pressure")))
}

/// Reads a pressure file (a cgroup's, or `/proc/pressure/<resource>`); `None` when PSI
/// is not available.
pub fn read_file(path: &Path) -> Result<Option<Pressure>, CgroupError> {
    let path = path.to_path_buf();
    let Some(text) = read_optional(&path)? else {
        return Ok(None);
    };
    let mut p = Pressure::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        let kind = words.next();
        let mut fields = std::collections::BTreeMap::new();
        for word in words {
            let (k, v) = word.split_once('=').ok_or_else(|| CgroupError::Parse {
                path: path.clone(),
                line: line.to_string(),
            })?;
            fields.insert(k, v);
        }
        let num = |k: &str| -> Result<f64, CgroupError> {
            fields
                .get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| CgroupError::Parse {
                    path: path.clone(),
                    line: line.to_string(),
                })
        };
        match kind {
            Some("some") => {
                p.some_avg10 = num("avg10")?;
                p.some_avg60 = num("avg60")?;
                p.some_avg300 = num("avg300")?;
                p.some_total_usec = num("total")? as u64;
            }
            Some("full") => {
                p.full_total_usec = Some(num("total")? as u64);
                p.full_avg = Some([num("avg10")?, num("avg60")?, num("avg300")?]);
            }
            _ => {
                return Err(CgroupError::Parse {
                    path: path.clone(),
                    line: line.to_string(),
                })
            }
        }
    }
    Ok(Some(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_some_and_full() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("memory.pressure"),
            "some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=678\n",
        )
        .unwrap();
        let p = read(tmp.path(), "memory").unwrap().unwrap();
        assert_eq!(
            (p.some_avg10, p.some_total_usec, p.full_total_usec),
            (1.5, 12345, Some(678))
        );
    }

    #[test]
    fn absent_psi_is_none_and_garbage_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(read(tmp.path(), "cpu").unwrap(), None);
        std::fs::write(tmp.path().join("cpu.pressure"), "some avg10\n").unwrap();
        assert!(read(tmp.path(), "cpu")
            .unwrap_err()
            .to_string()
            .contains("cpu.pressure"));
    }
}
