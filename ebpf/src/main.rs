//! rlagent kernel programs: count live connections per UID and per group, take tokens
//! from their rate buckets, and deny the excess at connect().
//!
//! - `cgroup/connect4`, `cgroup/connect6`: charge the calling UID (and its group) for the
//!   socket, or deny when a cap (the UID's own or the `user:*` default, the group's, the
//!   host-wide one) or a rate (the UID's, the group's) would be exceeded; in monitor mode
//!   count a would-deny instead; report each on the event ring buffer.
//! - `cgroup/sock_release`: uncharge the UID and group recorded for the socket's cookie.
//!
//! Correctness notes:
//! - every fetch-add whose result is used is `SeqCst`: LLVM 22 miscompiles `Relaxed` ones
//!   on target-cpu v3 into an add that returns the addend (a privileged test catches it:
//!   the programs would load and never deny);
//! - a socket holds at most one charge: inserting its cookie into `RL_SOCK_OWNER` with
//!   BPF_NOEXIST is the claim, so repeated or concurrent connect() calls on the same
//!   socket (a UDP re-connect, a retry after ECONNREFUSED, a TCP connect after AF_UNSPEC)
//!   are not charged again, but each takes its rate tokens;
//! - root (UID 0) is charged only when it has a policy of its own or is in a group;
//! - a kernel UID in a subordinate range (`RL_SUBUID`, from /etc/subuid) is charged, capped
//!   and reported as the user who owns the range.
// The crate only means something for the BPF target; on the host (a `--workspace` build or
// clippy run) it compiles to an empty program.
#![cfg_attr(target_arch = "bpf", no_std, no_main, feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs;
