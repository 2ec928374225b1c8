//! rlagent kernel programs: count live connections per UID and deny the excess at connect().
//!
//! - `cgroup/connect4`, `cgroup/connect6`: charge the calling UID for the socket, or deny
//!   when its live count would exceed its cap (own cap, else the `user:*` default) or the
//!   host-wide cap would be exceeded.
//! - `cgroup/sock_release`: uncharge the UID recorded in the socket's storage.
//!
//! Correctness notes (see shared/notes/ebpf-toolchain.md):
//! - every fetch-add whose result is used is `SeqCst`: LLVM 22 miscompiles `Relaxed` ones
//!   on target-cpu v3 into an add that returns the addend;
//! - a socket is charged at most once: its storage holds a `claimed` word that one
//!   connect() wins with an atomic add, so repeated or concurrent connect() calls on the
//!   same socket (UDP re-connect, a retry after ECONNREFUSED) are not new connections.
// The crate only means something for the BPF target; on the host (a `--workspace` build or
// clippy run) it compiles to an empty program.
#![cfg_attr(target_arch = "bpf", no_std, no_main, feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs;
