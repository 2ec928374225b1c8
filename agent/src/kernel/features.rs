//! Kernel features probed once at start: program and map types and helpers by loading a
//! trivial program or map (aya's probes, which follow libbpf's), a kfunc by the kernel's
//! BTF, PSI triggers by registering one. The required ones are those the programs use
//! that the kernels we support may lack or withhold, so that a start that cannot load
//! them says which one; what no probe here covers (the sock_release attach type,
//! helpers every supported kernel has, BPF atomics) the load itself still checks.

use std::io::Write as _;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};
use aya_obj::btf::BtfKind;

use crate::model::feature::{FeatureState, KernelFeature};

/// A probe that could not tell (the feature is then `unknown`).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("loading a probe program")]
    Program(#[source] aya::programs::ProgramError),
    #[error("creating a probe map")]
    Map(#[source] aya::sys::SyscallError),
    #[error("reading the kernel's BTF")]
    Btf(#[source] aya::BtfError),
    #[error("a PSI trigger on {path}")]
    Psi {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

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
            "the programs do not load; it runs connection caps and rates (cgroup/connect4, connect6)",
            Probe::Program(P::CgroupSockAddr),
        ),
        (
            "cgroup_sock",
            true,
            "the programs do not load; it gives back a closed connection's charge (cgroup/sock_release)",
            Probe::Program(P::CgroupSock),
        ),
        (
            "socket_filter",
            true,
            "the programs do not load; it retires idle per-UID counters (rl_retire, run by BPF_PROG_TEST_RUN)",
            Probe::Program(P::SocketFilter),
        ),
        (
            "ringbuf",
            true,
            "the programs do not load; it carries denial events (the log, rlctl events and why)",
            Probe::Map(MapType::RingBuf),
        ),
        (
            "sk_storage",
            true,
            "the programs do not load; it keeps one charge per MPTCP connection",
            Probe::Map(MapType::SkStorage),
        ),
        (
            "lpm_trie",
            true,
            "the programs do not load; it charges subordinate UID ranges to their owner",
            Probe::Map(MapType::LpmTrie),
        ),
        (
            "helper:bpf_set_retval",
            true,
            "the programs do not load; the deny path calls it (deny_errno)",
            Probe::Helper(P::CgroupSockAddr, H::BPF_FUNC_set_retval),
        ),
        (
            "helper:bpf_get_current_ancestor_cgroup_id",
            true,
            "the programs do not load; it finds a caller's group among its cgroup's ancestors",
            Probe::Helper(P::CgroupSockAddr, H::BPF_FUNC_get_current_ancestor_cgroup_id),
        ),
        (
            "helper:bpf_skc_to_mptcp_sock",
            true,
            "the programs do not load; it tells MPTCP subflows apart",
            Probe::Helper(P::CgroupSockAddr, H::BPF_FUNC_skc_to_mptcp_sock),
        ),
        (
            "helper:bpf_sk_storage_get (release)",
            true,
            "the programs do not load; it releases an MPTCP connection's charge at its close",
            Probe::Helper(P::CgroupSock, H::BPF_FUNC_sk_storage_get),
        ),
        (
            "helper:bpf_sk_storage_get (connect)",
            true,
            "the programs do not load; connect() keeps an MPTCP connection's charged subflow with it",
            Probe::Helper(P::CgroupSockAddr, H::BPF_FUNC_sk_storage_get),
        ),
        (
            "helper:bpf_get_current_comm",
            true,
            "the programs do not load; denial events name the process with it",
            Probe::Helper(P::CgroupSockAddr, H::BPF_FUNC_get_current_comm),
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

/// Probes every feature. Each probe loads a two-instruction program or creates a small
/// map (the tracing probe also attaches it to the kernel's `bpf_fentry_test1`, a
/// function kept for tests), reads the kernel's BTF (the kfunc, and aya's tracing
/// probe), or registers and drops one PSI trigger. The BTF reads take most of the time.
pub fn probe() -> Vec<KernelFeature> {
    catalogue()
        .into_iter()
        .map(|(name, required, without, how)| {
            let (state, detail) = match run(&how) {
                Ok(true) => (FeatureState::Available, None),
                Ok(false) => (FeatureState::Missing, None),
                Err(e) => (FeatureState::Unknown, Some(crate::model::error_chain(&e))),
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

fn run(how: &Probe) -> Result<bool, ProbeError> {
    match how {
        Probe::Program(t) => is_program_supported(*t).map_err(ProbeError::Program),
        Probe::Map(t) => is_map_supported(*t).map_err(ProbeError::Map),
        Probe::Helper(t, h) => is_helper_supported(*t, *h).map_err(ProbeError::Program),
        Probe::Kfunc(name) => {
            let btf = aya::Btf::from_sys_fs().map_err(ProbeError::Btf)?;
            Ok(btf.id_by_type_name_kind(name, BtfKind::Func).is_ok())
        }
        Probe::PsiTrigger => psi_trigger(std::path::Path::new("/proc/pressure/cpu")),
    }
}

/// Registers a trigger on the PSI file at `path` (dropped when the file is closed): the
/// kernel has PSI and takes triggers. `Ok(false)`: no PSI (no file, or PSI disabled).
fn psi_trigger(path: &std::path::Path) -> Result<bool, ProbeError> {
    use std::io::ErrorKind;
    let failed = |source| ProbeError::Psi {
        path: path.to_path_buf(),
        source,
    };
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path);
    let mut file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(failed(e)),
    };
    // A window that is a multiple of 2 s: since Linux 6.5 a writer without
    // CAP_SYS_RESOURCE (a sandbox may drop it even for root) may set no other (before,
    // it could not open the file for writing). The kernel overwrites the last byte
    // written with a NUL: write one.
    match file.write_all(b"some 500000 2000000\0") {
        Ok(()) => Ok(true),
        // PSI compiled in but off (psi=0): the files answer EOPNOTSUPP.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
        Err(e) => Err(failed(e)),
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
        assert!(matches!(psi_trigger(&dir.path().join("cpu")), Ok(false)));
    }

    #[test]
    fn a_psi_file_that_cannot_be_opened_for_writing_is_unknown_not_missing() {
        // A directory cannot be opened for writing (EISDIR): the probe cannot tell, and
        // the error names the file.
        let dir = tempfile::tempdir().unwrap();
        let err = psi_trigger(dir.path()).unwrap_err();
        let text = crate::model::error_chain(&err);
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
    }
}
