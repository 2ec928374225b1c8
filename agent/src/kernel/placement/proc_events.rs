//! The netlink proc connector (CONFIG_PROC_EVENTS): a datagram per exec, uid change,
//! gid change. Written on nix rather than with the proc-connector crate, which does not
//! build for musl (it constructs `msghdr` literally); the static guest test binaries are
//! musl.
//!
//! We do not wait for the kernel's subscription ACK (a listener in a foreign pid or user
//! namespace would wait forever); the first datagram is the ACK and is ignored.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use nix::{
    errno::Errno,
    sys::socket::{bind, recv, send, setsockopt, sockopt, MsgFlags, NetlinkAddr},
};

const NETLINK_CONNECTOR: i32 = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;

const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const PROC_EVENT_UID: u32 = 0x0000_0004;
const PROC_EVENT_GID: u32 = 0x0000_0040;

/// The events placement acts on (all carry the thread-group id, i.e. the process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    Exec {
        tgid: u32,
    },
    Uid {
        tgid: u32,
        ruid: u32,
    },
    Gid {
        tgid: u32,
        rgid: u32,
    },
    /// Anything else (fork, exit, the subscription ACK, ...).
    Other,
}

/// What a receive produced.
#[derive(Debug)]
pub enum Received {
    Event(ProcEvent),
    /// The kernel dropped events (socket buffer overrun): rescan /proc.
    Overrun,
}

pub struct ProcEvents {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl ProcEvents {
    /// Opens, binds and subscribes (needs CAP_NET_ADMIN).
    pub fn subscribe() -> io::Result<Self> {
        // Raw socket(2): nix's SockProtocol has no NETLINK_CONNECTOR. Everything after it
        // goes through nix.
        // SAFETY: a plain syscall; the return value is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_CONNECTOR,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // A big receive buffer, so bursts (a build's thousands of execs) are not dropped;
        // the forced variant goes past rmem_max and needs CAP_NET_ADMIN.
        let size = 8 << 20;
        if setsockopt(&fd, sockopt::RcvBufForce, &size).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &size);
        }
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, CN_IDX_PROC))?;
        let mut msg = Vec::with_capacity(NLMSG_HDRLEN + CN_MSG_LEN + 4);
        let total = (NLMSG_HDRLEN + CN_MSG_LEN + 4) as u32;
        msg.extend_from_slice(&total.to_ne_bytes()); // nlmsg_len
        msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes()); // nlmsg_type
        msg.extend_from_slice(&0u16.to_ne_bytes()); // nlmsg_flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_seq
        msg.extend_from_slice(&std::process::id().to_ne_bytes()); // nlmsg_pid
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes()); // cb_id.idx
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes()); // cb_id.val
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
        send(fd.as_raw_fd(), &msg, MsgFlags::empty())?;
        Ok(Self {
            fd,
            buf: vec![0; 8192],
        })
    }

    /// Blocks for the next datagram.
    pub fn recv(&mut self) -> io::Result<Received> {
        loop {
            match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
                Ok(n) => return Ok(Received::Event(parse(&self.buf[..n]))),
                Err(Errno::EINTR) => continue,
                Err(Errno::ENOBUFS) => return Ok(Received::Overrun),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Parses one datagram: nlmsghdr, cn_msg, then `struct proc_event` (what, cpu,
/// timestamp_ns, then the per-event union at offset 16).
pub fn parse(datagram: &[u8]) -> ProcEvent {
    let event = match datagram.get(NLMSG_HDRLEN + CN_MSG_LEN..) {
        Some(e) if e.len() >= 32 => e,
        _ => return ProcEvent::Other,
    };
    let u32_at = |o: usize| u32::from_ne_bytes(event[o..o + 4].try_into().unwrap());
    match u32_at(0) {
        PROC_EVENT_EXEC => ProcEvent::Exec { tgid: u32_at(20) },
        PROC_EVENT_UID => ProcEvent::Uid {
            tgid: u32_at(20),
            ruid: u32_at(24),
        },
        PROC_EVENT_GID => ProcEvent::Gid {
            tgid: u32_at(20),
            rgid: u32_at(24),
        },
        _ => ProcEvent::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(what: u32, fields: &[u32]) -> Vec<u8> {
        let mut d = vec![0u8; NLMSG_HDRLEN + CN_MSG_LEN];
        d.extend_from_slice(&what.to_ne_bytes());
        d.extend_from_slice(&0u32.to_ne_bytes()); // cpu
        d.extend_from_slice(&0u64.to_ne_bytes()); // timestamp
        for f in fields {
            d.extend_from_slice(&f.to_ne_bytes());
        }
        d.resize(NLMSG_HDRLEN + CN_MSG_LEN + 40, 0);
        d
    }

    #[test]
    fn parses_the_events_placement_uses() {
        assert_eq!(
            parse(&datagram(PROC_EVENT_EXEC, &[41, 40])),
            ProcEvent::Exec { tgid: 40 }
        );
        assert_eq!(
            parse(&datagram(PROC_EVENT_UID, &[41, 40, 2000, 2000])),
            ProcEvent::Uid {
                tgid: 40,
                ruid: 2000
            }
        );
        assert_eq!(
            parse(&datagram(PROC_EVENT_GID, &[41, 40, 30, 30])),
            ProcEvent::Gid { tgid: 40, rgid: 30 }
        );
        assert_eq!(parse(&datagram(1, &[1, 1, 2, 2])), ProcEvent::Other, "fork");
        assert_eq!(parse(&[0u8; 10]), ProcEvent::Other, "short datagram");
    }

    #[test]
    fn sees_our_own_exec_when_root() {
        if !crate::testing::privileged("sees_our_own_exec_when_root") {
            return;
        }
        let mut events = ProcEvents::subscribe().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Received::Event(ProcEvent::Exec { tgid }) = events.recv().unwrap() {
                if tgid == pid {
                    return;
                }
            }
        }
        panic!("no exec event for pid {pid}");
    }
}
