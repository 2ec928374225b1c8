//! The kernel features the agent uses, or will, probed once at start: program and map
//! types and helpers by loading a trivial program or map (aya's probes, which follow
//! libbpf's), a kfunc by the kernel's BTF, PSI triggers by registering one. What is
//! probed here is what the programs need to load; a required feature that is missing
//! stops the start with its name instead of a verifier log.

use std::io::Write as _;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};
use aya_obj::btf::BtfKind;

use crate::model::feature::{FeatureState, KernelFeature};

/// How one feature is probed.
enum Probe {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    Kfunc(&'static str),
    PsiTrigger,
}

/// Every feature: name, required, what is off without it, and its probe.
fn catalogue() -> Vec<(&'static str, bool, &'static str, Probe)> {
    use BpfHelper as H;
    use ProgramType as P;
    vec![
        (
            "cgroup_sock_addr",
            true,
            "connection caps and rates (cgroup/connect4 and connect6)",
            Probe::Program(P::CgroupSockAddr),
        ),
        (
            "cgroup_sock",
            true,
            "giving back a closed connection's charge (cgroup/sock_release)",
            Probe::Program(P::CgroupSock),
        ),
        (
            "socket_filter",
            true,
            "retiring idle per-UID counters (rl_retire, run by BPF_PROG_TEST_RUN)",
            Probe::Program(P::SocketFilter),
        ),
        (
            "ringbuf",
            true,
            "denial events (the log, rlctl events and why)",
            Probe::Map(MapType::RingBuf),
        ),
        (
            "sk_storage",
            true,
            "one charge per MPTCP connection (socket-local storage)",
            Probe::Map(MapType::SkStorage),
        ),
        (
            "lpm_trie",
            true,
            "subordinate UID ranges charged to their owner",
            Probe::Map(MapType::LpmTrie),
        ),
        (
            "helper:bpf_set_retval",
            true,
            "a deny_errno other than EPERM",
            Probe::Helper(P::CgroupSockAddr, H::BPF_FUNC_set_retval),
        ),
        (
            "helper:bpf_get_current_ancestor_cgroup_id",
            true,
            "group caps and rates (a caller's group is found among its cgroup's ancestors)",
            Probe::Helper(P::CgroupSockAddr, H::BPF_FUNC_get_current_ancestor_cgroup_id),
        ),
        (
            "helper:bpf_skc_to_mptcp_sock",
            true,
            "telling MPTCP subflows apart (one charge per MPTCP connection)",
            Probe::Helper(P::CgroupSockAddr, H::BPF_FUNC_skc_to_mptcp_sock),
        ),
        (
            "helper:bpf_sk_storage_get",
            true,
            "releasing an MPTCP connection's charge at its close",
            Probe::Helper(P::CgroupSock, H::BPF_FUNC_sk_storage_get),
        ),
        (
            "tracing",
            false,
            "nothing yet: this version loads no tracing program (a socket destructor hook would need one)",
            Probe::Program(P::Tracing),
        ),
        (
            "kfunc:bpf_sock_destroy",
            false,
            "nothing yet: this version closes no connection itself",
            Probe::Kfunc("bpf_sock_destroy"),
        ),
        (
            "psi_triggers",
            false,
            "nothing yet: this version reads pressure only for stats",
            Probe::PsiTrigger,
        ),
    ]
}

/// Probes every feature. Each probe loads at most a two-instruction program or a small
/// map, or registers and drops one PSI trigger: a few milliseconds in all.
pub fn probe() -> Vec<KernelFeature> {
    catalogue()
        .into_iter()
        .map(|(name, required, without, how)| {
            let (state, detail) = match run(&how) {
                Ok(true) => (FeatureState::Available, None),
                Ok(false) => (FeatureState::Missing, None),
                Err(why) => (FeatureState::Unknown, Some(why)),
            };
            KernelFeature {
                name: name.to_string(),
                state,
                required,
                without: without.to_string(),
                detail,
            }
        })
        .collect()
}

fn run(how: &Probe) -> Result<bool, String> {
    let text = |e: &(dyn std::error::Error + 'static)| crate::model::error_chain(e);
    match how {
        Probe::Program(t) => is_program_supported(*t).map_err(|e| text(&e)),
        Probe::Map(t) => is_map_supported(*t).map_err(|e| text(&e)),
        Probe::Helper(t, h) => is_helper_supported(*t, *h).map_err(|e| text(&e)),
        Probe::Kfunc(name) => {
            let btf = aya::Btf::from_sys_fs().map_err(|e| text(&e))?;
            Ok(btf.id_by_type_name_kind(name, BtfKind::Func).is_ok())
        }
        Probe::PsiTrigger => psi_trigger(std::path::Path::new("/proc/pressure/cpu")),
    }
}

/// Registers a trigger on the PSI file at `path` (dropped when the file is closed): the
/// kernel has PSI and takes triggers. `Ok(false)`: no PSI (no file, or PSI disabled).
fn psi_trigger(path: &std::path::Path) -> Result<bool, String> {
    use std::io::ErrorKind;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path);
    let mut file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("opening {}: {e}", path.display())),
    };
    // A window that is a multiple of 2 s: without CAP_SYS_RESOURCE (a sandbox may drop
    // it even for root) the kernel takes no other. It overwrites the last byte written
    // with a NUL: write one.
    match file.write_all(b"some 500000 2000000\0") {
        Ok(()) => Ok(true),
        // PSI compiled in but off (psi=0): the files answer EOPNOTSUPP.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
        Err(e) => Err(format!("a trigger on {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_feature_is_named_once_and_says_what_its_absence_turns_off() {
        let catalogue = catalogue();
        let mut names: Vec<&str> = catalogue.iter().map(|(n, ..)| *n).collect();
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "a feature is listed twice");
        for (name, _, without, _) in &catalogue {
            assert!(!without.is_empty(), "{name} says nothing of its absence");
        }
    }

    #[test]
    fn a_psi_file_that_is_not_there_is_no_psi() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(psi_trigger(&dir.path().join("cpu")), Ok(false));
    }

    #[test]
    fn a_file_that_refuses_the_trigger_is_unknown_not_missing() {
        // A directory opens for reading only: the probe cannot tell, and says why.
        let dir = tempfile::tempdir().unwrap();
        let err = psi_trigger(dir.path()).unwrap_err();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }
}
