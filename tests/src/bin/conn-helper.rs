// Why this file is long: one command per connect vector the tenant tests use (TFO, MPTCP,
// io_uring, SCM_RIGHTS, AF_UNSPEC reconnects, UDP, ...).
//! Test and benchmark worker: joins a cgroup, becomes a UID, then opens and closes sockets
//! on command (one command per stdin line, one reply per stdout line).
//!
//! Usage: `conn-helper <cgroup dir> <uid>` then commands:
//!   `connect <tcp4|tcp6|udp4|udp6|mptcp4|mptcp6> <port>`
//!                                          → `ok <id>` | `err <errno> <id>` (socket kept)
//!   `reconnect <id> <port>`                → `ok` | `err <errno>` (same socket again)
//!   `disconnect <id>`                      → `ok` | `err <errno>`: connect(AF_UNSPEC)
//!   `unspec-for <kind> <port> <millis>`    → `ok <admitted> <attempts>`: one socket,
//!                                            connect and disconnect (AF_UNSPEC) in a loop
//!   `burst <kind> <port> <n>`              → `ok <admitted>` (failed sockets closed)
//!   `hold <kind> <port> <n>`               → `ok <succeeded> <failed>` (all sockets kept)
//!   `cycles <kind> <port> <n>`             → `ok <admitted> <last errno>`: socket, connect,
//!                                            close, n times
//!   `for <kind> <port> <millis>`           → `ok <admitted> <attempts>`: socket, connect,
//!                                            close, as fast as it can for that long
//!   `close <id>` / `close-all`             → `ok`
//!   `bench <kind> <port> <iterations>`     → `ok <total ns>` (connect+close loop)
//!   `multi-uid <first> <count> <port>`     → `ok <n>`: one UDP socket per UID (as root)
//!   `multi-uid-once <first> <count> <port>` → `ok <n>`: the same, each closed at once
//!   `vector <name> <port>`                 → `ok <id>` | `err <errno> <id>` (socket kept):
//!       a TCP connection to 127.0.0.1 made another way: `tfo-sendto` (sendto with
//!       MSG_FASTOPEN), `tfo-connect` (TCP_FASTOPEN_CONNECT), `io-uring` (IORING_OP_CONNECT),
//!       `v4-mapped` (an IPv6 socket to ::ffff:127.0.0.1), `nonblock` (EINPROGRESS is ok)
//!   `comm <hex>`                           → `ok`: names the process (PR_SET_NAME) with
//!                                            these bytes (at most 15), any bytes at all
//!   `exit`                                 → exits with its sockets still open
//!
//! The socket's cgroup is fixed when it is created, so the process joins the cgroup first.
use std::{
    collections::BTreeMap,
    ffi::CString,
    io::{self, BufRead, Write},
    mem,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Instant,
};

use nix::{
    errno::Errno,
    sys::{
        resource::{setrlimit, Resource},
        socket::{
            self, getsockname, setsockopt, sockopt, AddressFamily, MsgFlags, SockFlag, SockType,
            SockaddrIn, SockaddrIn6, SockaddrLike, SockaddrStorage,
        },
    },
    unistd::{setgid, setgroups, setresuid, setuid, Gid, Uid},
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: conn-helper <cgroup dir> <uid>");
        std::process::exit(2);
    }
    let uid: u32 = args[2].parse().expect("uid");
    std::fs::write(
        format!("{}/cgroup.procs", args[1]),
        std::process::id().to_string(),
    )
    .expect("joining the cgroup");
    // UID 0 stays root (multi-uid).
    if uid != 0 {
        setgroups(&[]).expect("setgroups");
        setgid(Gid::from_raw(uid)).expect("setgid");
        setuid(Uid::from_raw(uid)).expect("setuid");
    }
    let mut sockets: BTreeMap<u64, OwnedFd> = BTreeMap::new();
    let mut next_id = 0u64;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    for line in io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["connect", kind, port] => {
                let fd = new_socket(kind);
                let result = connect(&fd, kind, port.parse().unwrap());
                next_id += 1;
                sockets.insert(next_id, fd);
                match result {
                    Ok(()) => format!("ok {next_id}"),
                    Err(errno) => format!("err {errno} {next_id}"),
                }
            }
            ["reconnect", id, port] => {
                let fd = &sockets[&id.parse::<u64>().unwrap()];
                let kind = socket_kind(fd);
                match connect(fd, kind, port.parse().unwrap()) {
                    Ok(()) => "ok".to_string(),
                    Err(errno) => format!("err {errno}"),
                }
            }
            ["burst", kind, port, n] => {
                let mut admitted = 0;
                for _ in 0..n.parse::<u32>().unwrap() {
                    let fd = new_socket(kind);
                    if connect(&fd, kind, port.parse().unwrap()).is_ok() {
                        admitted += 1;
                        next_id += 1;
                        sockets.insert(next_id, fd);
                    }
                }
                format!("ok {admitted}")
            }
            ["hold", kind, port, n] => {
                let (mut ok, mut failed) = (0, 0);
                for _ in 0..n.parse::<u32>().unwrap() {
                    let fd = new_socket(kind);
                    match connect(&fd, kind, port.parse().unwrap()) {
                        Ok(()) => ok += 1,
                        Err(_) => failed += 1,
                    }
                    next_id += 1;
                    sockets.insert(next_id, fd);
                }
                format!("ok {ok} {failed}")
            }
            ["cycles", kind, port, n] => {
                let (mut admitted, mut last) = (0, 0);
                for _ in 0..n.parse::<u32>().unwrap() {
                    let fd = new_socket(kind);
                    match connect(&fd, kind, port.parse().unwrap()) {
                        Ok(()) => admitted += 1,
                        Err(errno) => last = errno,
                    }
                    drop(fd);
                }
                format!("ok {admitted} {last}")
            }
            ["for", kind, port, millis] => {
                let until =
                    Instant::now() + std::time::Duration::from_millis(millis.parse().unwrap());
                let (mut admitted, mut attempts) = (0u64, 0u64);
                while Instant::now() < until {
                    let fd = new_socket(kind);
                    if connect(&fd, kind, port.parse().unwrap()).is_ok() {
                        admitted += 1;
                    }
                    attempts += 1;
                    drop(fd);
                }
                format!("ok {admitted} {attempts}")
            }
            ["unspec-for", kind, port, millis] => {
                // One socket, connected, disconnected (AF_UNSPEC) and connected again.
                let until =
                    Instant::now() + std::time::Duration::from_millis(millis.parse().unwrap());
                let (mut admitted, mut attempts) = (0u64, 0u64);
                let fd = new_socket(kind);
                abort_on_close(&fd);
                while Instant::now() < until {
                    if connect(&fd, kind, port.parse().unwrap()).is_ok() {
                        admitted += 1;
                    }
                    attempts += 1;
                    disconnect(&fd).expect("connect(AF_UNSPEC)");
                }
                drop(fd);
                format!("ok {admitted} {attempts}")
            }
            ["disconnect", id] => match disconnect(&sockets[&id.parse::<u64>().unwrap()]) {
                Ok(()) => "ok".to_string(),
                Err(errno) => format!("err {errno}"),
            },
            ["close", id] => {
                // Dropping the socket closes it.
                sockets.remove(&id.parse::<u64>().unwrap());
                "ok".to_string()
            }
            ["close-all"] => {
                sockets.clear();
                "ok".to_string()
            }
            ["bench", kind, port, n] => {
                let port: u16 = port.parse().unwrap();
                let start = Instant::now();
                for _ in 0..n.parse::<u32>().unwrap() {
                    let fd = new_socket(kind);
                    connect(&fd, kind, port).expect("bench connect");
                    if kind.starts_with("tcp") {
                        abort_on_close(&fd);
                    }
                    drop(fd);
                }
                format!("ok {}", start.elapsed().as_nanos())
            }
            ["multi-uid-once", first, count, port] => {
                let (first, count): (u32, u32) = (first.parse().unwrap(), count.parse().unwrap());
                let mut admitted = 0;
                for uid in first..first + count {
                    let fd = new_socket("udp4");
                    become_uid(uid);
                    if connect(&fd, "udp4", port.parse().unwrap()).is_ok() {
                        admitted += 1;
                    }
                    become_uid(0);
                    drop(fd);
                }
                format!("ok {admitted}")
            }
            ["multi-uid", first, count, port] => {
                // Root only: one connected UDP socket per UID, charged to that UID by
                // switching the real and effective UID (the saved UID stays 0, so the
                // process can switch back).
                let (first, count): (u32, u32) = (first.parse().unwrap(), count.parse().unwrap());
                let limit = u64::from(count) + 1024;
                setrlimit(Resource::RLIMIT_NOFILE, limit, limit).expect("setrlimit");
                let mut admitted = 0;
                for uid in first..first + count {
                    let fd = new_socket("udp4");
                    // From a source address per 20,000 UIDs (127.0.0.2 to .251): an address
                    // has only the ephemeral range's ports (28,232 by default), and several
                    // helpers together may hold more sockets than that.
                    let source = Ipv4Addr::new(127, 0, 0, 2 + (uid / 20_000 % 250) as u8);
                    socket::bind(
                        fd.as_raw_fd(),
                        &SockaddrIn::from(SocketAddrV4::new(source, 0)),
                    )
                    .unwrap_or_else(|e| panic!("bind({source}): {e}"));
                    become_uid(uid);
                    let ok = connect(&fd, "udp4", port.parse().unwrap()).is_ok();
                    become_uid(0);
                    if ok {
                        admitted += 1;
                        next_id += 1;
                        sockets.insert(next_id, fd);
                    }
                }
                format!("ok {admitted}")
            }
            ["vector", name, port] => {
                let (fd, result) = vector(name, port.parse().unwrap());
                next_id += 1;
                sockets.insert(next_id, fd);
                match result {
                    Ok(()) => format!("ok {next_id}"),
                    Err(errno) => format!("err {errno} {next_id}"),
                }
            }
            ["comm", hex] => set_comm(hex),
            ["exit"] => std::process::exit(0),
            _ => format!("bad command {line:?}"),
        };
        writeln!(out, "{reply}").unwrap();
        out.flush().unwrap();
    }
}

/// Switches the real and effective UID to `uid`, keeping the saved UID 0 so the process
/// can switch back.
fn become_uid(uid: u32) {
    let saved = Uid::from_raw(0);
    setresuid(Uid::from_raw(uid), Uid::from_raw(uid), saved)
        .unwrap_or_else(|e| panic!("setresuid({uid}): {e}"));
}

/// Names this process with the bytes `hex` spells (the kernel keeps the first 15).
fn set_comm(hex: &str) -> String {
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    let Some(name) = bytes.and_then(|b| CString::new(b).ok()) else {
        return format!("err bad hex {hex:?}");
    };
    match nix::sys::prctl::set_name(&name) {
        Ok(()) => "ok".to_string(),
        Err(errno) => format!("err {}", errno as i32),
    }
}

/// IPPROTO_MPTCP (linux/in.h).
const IPPROTO_MPTCP: i32 = 262;

fn new_socket(kind: &str) -> OwnedFd {
    let (family, ty, mptcp) = match kind {
        "tcp4" => (AddressFamily::Inet, SockType::Stream, false),
        "tcp6" => (AddressFamily::Inet6, SockType::Stream, false),
        "udp4" => (AddressFamily::Inet, SockType::Datagram, false),
        "udp6" => (AddressFamily::Inet6, SockType::Datagram, false),
        "mptcp4" => (AddressFamily::Inet, SockType::Stream, true),
        "mptcp6" => (AddressFamily::Inet6, SockType::Stream, true),
        other => panic!("unknown socket kind {other}"),
    };
    if mptcp {
        return mptcp_socket(family);
    }
    socket::socket(family, ty, SockFlag::SOCK_CLOEXEC, None)
        .unwrap_or_else(|e| panic!("socket(): {e}"))
}

/// A raw socket(2): nix's SockProtocol has no IPPROTO_MPTCP.
fn mptcp_socket(family: AddressFamily) -> OwnedFd {
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            family as i32,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            IPPROTO_MPTCP,
        )
    };
    assert!(fd >= 0, "socket(): {}", io::Error::last_os_error());
    // SAFETY: `fd` is a new socket that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn socket_kind(fd: &OwnedFd) -> &'static str {
    // The family from the socket's own address (nix has no SO_DOMAIN option).
    let family = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|a| a.family());
    let ty = socket::getsockopt(fd, sockopt::SockType).ok();
    match (family, ty) {
        (Some(AddressFamily::Inet), Some(SockType::Stream)) => "tcp4",
        (Some(AddressFamily::Inet6), Some(SockType::Stream)) => "tcp6",
        (Some(AddressFamily::Inet), _) => "udp4",
        _ => "udp6",
    }
}

fn connect(fd: &OwnedFd, kind: &str, port: u16) -> Result<(), i32> {
    if kind.ends_with('4') {
        connect_to(fd, &sockaddr_v4(port))
    } else {
        connect_to(fd, &sockaddr_v6(port, Ipv6Addr::LOCALHOST))
    }
}

/// connect() to `sa`: done, or the errno.
fn connect_to(fd: &OwnedFd, sa: &dyn SockaddrLike) -> Result<(), i32> {
    socket::connect(fd.as_raw_fd(), sa).map_err(|errno| errno as i32)
}

/// connect() to an `AF_UNSPEC` address: dissolves the socket's association (for TCP the
/// kernel's tcp_disconnect), after which it can be connected again.
fn disconnect(fd: &OwnedFd) -> Result<(), i32> {
    let unspec = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: `unspec` is a whole `sockaddr` of the length given.
    let sa = unsafe {
        SockaddrStorage::from_raw(&unspec, Some(mem::size_of_val(&unspec) as libc::socklen_t))
    }
    .expect("an AF_UNSPEC address");
    connect_to(fd, &sa)
}

/// 127.0.0.1:`port`.
fn sockaddr_v4(port: u16) -> SockaddrIn {
    SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

/// `[addr]:port`.
fn sockaddr_v6(port: u16, addr: Ipv6Addr) -> SockaddrIn6 {
    SockaddrIn6::from(SocketAddrV6::new(addr, port, 0, 0))
}

/// Opens a TCP connection to 127.0.0.1:`port` by the vector `name`; returns the socket.
fn vector(name: &str, port: u16) -> (OwnedFd, Result<(), i32>) {
    let sa = sockaddr_v4(port);
    match name {
        "tfo-sendto" => {
            let fd = new_socket("tcp4");
            // nix's MsgFlags has no MSG_FASTOPEN.
            let flags = MsgFlags::from_bits_retain(libc::MSG_FASTOPEN);
            let result = socket::sendto(fd.as_raw_fd(), b"x", &sa, flags);
            (fd, result.map(|_| ()).map_err(|errno| errno as i32))
        }
        "tfo-connect" => {
            let fd = new_socket("tcp4");
            // Without the option this would be a plain connect(): fail the vector.
            setsockopt(&fd, sockopt::TcpFastOpenConnect, &true)
                .unwrap_or_else(|e| panic!("setsockopt(TCP_FASTOPEN_CONNECT): {e}"));
            let result = connect_to(&fd, &sa);
            (fd, result)
        }
        "io-uring" => {
            let fd = new_socket("tcp4");
            let mut ring = io_uring::IoUring::new(2).expect("io_uring_setup");
            let entry = io_uring::opcode::Connect::new(
                io_uring::types::Fd(fd.as_raw_fd()),
                sa.as_ptr(),
                sa.len(),
            )
            .build();
            // SAFETY: the entry points at `sa` and `fd`, which outlive the wait for its
            // completion below.
            unsafe { ring.submission().push(&entry) }.expect("submission queue");
            ring.submit_and_wait(1).expect("io_uring_enter");
            let res = ring.completion().next().expect("a completion").result();
            (fd, if res == 0 { Ok(()) } else { Err(-res) })
        }
        "v4-mapped" => {
            let fd = new_socket("tcp6");
            let mapped = sockaddr_v6(port, Ipv4Addr::LOCALHOST.to_ipv6_mapped());
            let result = connect_to(&fd, &mapped);
            (fd, result)
        }
        "nonblock" => {
            let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
            let fd = socket::socket(AddressFamily::Inet, SockType::Stream, flags, None)
                .unwrap_or_else(|e| panic!("socket(): {e}"));
            let result = match connect_to(&fd, &sa) {
                Err(errno) if errno == Errno::EINPROGRESS as i32 => Ok(()),
                other => other,
            };
            (fd, result)
        }
        other => panic!("unknown vector {other}"),
    }
}

/// SO_LINGER 0: close() sends RST and leaves no TIME_WAIT, so long benchmark loops do not
/// run out of ephemeral ports. Both sides of an A/B run do the same.
fn abort_on_close(fd: &OwnedFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = setsockopt(fd, sockopt::Linger, &linger);
}
