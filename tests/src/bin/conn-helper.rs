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
    io::{self, BufRead, Write},
    mem,
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
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
    // SAFETY: plain credential syscalls; failure is checked. UID 0 stays root (multi-uid).
    if uid != 0 {
        unsafe {
            assert_eq!(libc::setgroups(0, std::ptr::null()), 0, "setgroups");
            assert_eq!(libc::setgid(uid), 0, "setgid");
            assert_eq!(libc::setuid(uid), 0, "setuid");
        }
    }
    let mut sockets: BTreeMap<u64, i32> = BTreeMap::new();
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
                next_id += 1;
                sockets.insert(next_id, fd);
                match connect(fd, kind, port.parse().unwrap()) {
                    Ok(()) => format!("ok {next_id}"),
                    Err(errno) => format!("err {errno} {next_id}"),
                }
            }
            ["reconnect", id, port] => {
                let fd = sockets[&id.parse::<u64>().unwrap()];
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
                    if connect(fd, kind, port.parse().unwrap()).is_ok() {
                        admitted += 1;
                        next_id += 1;
                        sockets.insert(next_id, fd);
                    } else {
                        close(fd);
                    }
                }
                format!("ok {admitted}")
            }
            ["hold", kind, port, n] => {
                let (mut ok, mut failed) = (0, 0);
                for _ in 0..n.parse::<u32>().unwrap() {
                    let fd = new_socket(kind);
                    next_id += 1;
                    sockets.insert(next_id, fd);
                    match connect(fd, kind, port.parse().unwrap()) {
                        Ok(()) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                format!("ok {ok} {failed}")
            }
            ["cycles", kind, port, n] => {
                let (mut admitted, mut last) = (0, 0);
                for _ in 0..n.parse::<u32>().unwrap() {
                    let fd = new_socket(kind);
                    match connect(fd, kind, port.parse().unwrap()) {
                        Ok(()) => admitted += 1,
                        Err(errno) => last = errno,
                    }
                    close(fd);
                }
                format!("ok {admitted} {last}")
            }
            ["for", kind, port, millis] => {
                let until =
                    Instant::now() + std::time::Duration::from_millis(millis.parse().unwrap());
                let (mut admitted, mut attempts) = (0u64, 0u64);
                while Instant::now() < until {
                    let fd = new_socket(kind);
                    if connect(fd, kind, port.parse().unwrap()).is_ok() {
                        admitted += 1;
                    }
                    attempts += 1;
                    close(fd);
                }
                format!("ok {admitted} {attempts}")
            }
            ["unspec-for", kind, port, millis] => {
                // One socket, connected, disconnected (AF_UNSPEC) and connected again.
                let until =
                    Instant::now() + std::time::Duration::from_millis(millis.parse().unwrap());
                let (mut admitted, mut attempts) = (0u64, 0u64);
                let fd = new_socket(kind);
                abort_on_close(fd);
                while Instant::now() < until {
                    if connect(fd, kind, port.parse().unwrap()).is_ok() {
                        admitted += 1;
                    }
                    attempts += 1;
                    disconnect(fd).expect("connect(AF_UNSPEC)");
                }
                close(fd);
                format!("ok {admitted} {attempts}")
            }
            ["disconnect", id] => match disconnect(sockets[&id.parse::<u64>().unwrap()]) {
                Ok(()) => "ok".to_string(),
                Err(errno) => format!("err {errno}"),
            },
            ["close", id] => {
                if let Some(fd) = sockets.remove(&id.parse::<u64>().unwrap()) {
                    close(fd);
                }
                "ok".to_string()
            }
            ["close-all"] => {
                for (_, fd) in mem::take(&mut sockets) {
                    close(fd);
                }
                "ok".to_string()
            }
            ["bench", kind, port, n] => {
                let port: u16 = port.parse().unwrap();
                let start = Instant::now();
                for _ in 0..n.parse::<u32>().unwrap() {
                    let fd = new_socket(kind);
                    connect(fd, kind, port).expect("bench connect");
                    if kind.starts_with("tcp") {
                        abort_on_close(fd);
                    }
                    close(fd);
                }
                format!("ok {}", start.elapsed().as_nanos())
            }
            ["multi-uid-once", first, count, port] => {
                let (first, count): (u32, u32) = (first.parse().unwrap(), count.parse().unwrap());
                let mut admitted = 0;
                for uid in first..first + count {
                    let fd = new_socket("udp4");
                    // SAFETY: plain credential syscalls; the saved UID 0 allows switching
                    // back.
                    unsafe { assert_eq!(libc::setresuid(uid, uid, 0), 0, "setresuid") };
                    if connect(fd, "udp4", port.parse().unwrap()).is_ok() {
                        admitted += 1;
                    }
                    // SAFETY: as above.
                    unsafe { assert_eq!(libc::setresuid(0, 0, 0), 0, "setresuid back") };
                    close(fd);
                }
                format!("ok {admitted}")
            }
            ["multi-uid", first, count, port] => {
                // Root only: one connected UDP socket per UID, charged to that UID by
                // switching the real and effective UID (the saved UID stays 0, so the
                // process can switch back).
                let (first, count): (u32, u32) = (first.parse().unwrap(), count.parse().unwrap());
                let limit = libc::rlimit {
                    rlim_cur: u64::from(count) + 1024,
                    rlim_max: u64::from(count) + 1024,
                };
                // SAFETY: plain syscalls on our own process; results checked.
                unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0, "setrlimit") };
                let mut admitted = 0;
                for uid in first..first + count {
                    let fd = new_socket("udp4");
                    // SAFETY: as above.
                    unsafe { assert_eq!(libc::setresuid(uid, uid, 0), 0, "setresuid") };
                    let ok = connect(fd, "udp4", port.parse().unwrap()).is_ok();
                    // SAFETY: as above; the saved UID 0 allows this.
                    unsafe { assert_eq!(libc::setresuid(0, 0, 0), 0, "setresuid back") };
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

/// Names this process with the bytes `hex` spells (the kernel keeps the first 15).
fn set_comm(hex: &str) -> String {
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    let Some(mut name) = bytes.filter(|b| !b.contains(&0)) else {
        return format!("err bad hex {hex:?}");
    };
    name.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from the
    // pointer; `name` is NUL-terminated and outlives the call.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) };
    if rc == 0 {
        "ok".to_string()
    } else {
        format!(
            "err {}",
            io::Error::last_os_error().raw_os_error().unwrap_or(0)
        )
    }
}

/// IPPROTO_MPTCP (linux/in.h).
const IPPROTO_MPTCP: i32 = 262;

fn new_socket(kind: &str) -> i32 {
    let (domain, ty, protocol) = match kind {
        "tcp4" => (libc::AF_INET, libc::SOCK_STREAM, 0),
        "tcp6" => (libc::AF_INET6, libc::SOCK_STREAM, 0),
        "udp4" => (libc::AF_INET, libc::SOCK_DGRAM, 0),
        "udp6" => (libc::AF_INET6, libc::SOCK_DGRAM, 0),
        "mptcp4" => (libc::AF_INET, libc::SOCK_STREAM, IPPROTO_MPTCP),
        "mptcp6" => (libc::AF_INET6, libc::SOCK_STREAM, IPPROTO_MPTCP),
        other => panic!("unknown socket kind {other}"),
    };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) };
    assert!(fd >= 0, "socket(): {}", io::Error::last_os_error());
    fd
}

fn socket_kind(fd: i32) -> &'static str {
    let mut domain: libc::c_int = 0;
    let mut ty: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the advertised size.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut i32).cast(),
            &mut len,
        );
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut i32).cast(),
            &mut len,
        );
    }
    match (domain, ty) {
        (libc::AF_INET, libc::SOCK_STREAM) => "tcp4",
        (libc::AF_INET6, libc::SOCK_STREAM) => "tcp6",
        (libc::AF_INET, _) => "udp4",
        _ => "udp6",
    }
}

fn connect(fd: i32, kind: &str, port: u16) -> Result<(), i32> {
    if kind.ends_with('4') {
        connect_to(fd, &sockaddr_v4(port))
    } else {
        connect_to(fd, &sockaddr_v6(port, Ipv6Addr::LOCALHOST))
    }
}

/// connect() to a `sockaddr_in` or `sockaddr_in6`: done, or the errno.
fn connect_to<T>(fd: i32, sa: &T) -> Result<(), i32> {
    // SAFETY: `sa` is a fully initialised socket address of its type's size.
    let rc = unsafe { libc::connect(fd, (sa as *const T).cast(), mem::size_of::<T>() as u32) };
    if rc == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// connect() to an `AF_UNSPEC` address: dissolves the socket's association (for TCP the
/// kernel's tcp_disconnect), after which it can be connected again.
fn disconnect(fd: i32) -> Result<(), i32> {
    // SAFETY: all-zero is a valid sockaddr; only its family is read.
    let mut sa: libc::sockaddr = unsafe { mem::zeroed() };
    sa.sa_family = libc::AF_UNSPEC as u16;
    connect_to(fd, &sa)
}

/// 127.0.0.1:`port`.
fn sockaddr_v4(port: u16) -> libc::sockaddr_in {
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    sa.sin_family = libc::AF_INET as u16;
    sa.sin_port = port.to_be();
    sa.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
    sa
}

/// `[addr]:port`.
fn sockaddr_v6(port: u16, addr: Ipv6Addr) -> libc::sockaddr_in6 {
    // SAFETY: all-zero is a valid sockaddr_in6.
    let mut sa: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as u16;
    sa.sin6_port = port.to_be();
    sa.sin6_addr.s6_addr = addr.octets();
    sa
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

/// Opens a TCP connection to 127.0.0.1:`port` by the vector `name`; returns the socket.
fn vector(name: &str, port: u16) -> (i32, Result<(), i32>) {
    let sa = sockaddr_v4(port);
    let sa_ptr = (&sa as *const libc::sockaddr_in).cast::<libc::sockaddr>();
    let sa_len = mem::size_of_val(&sa) as u32;
    // SAFETY: plain syscalls on sockets this process owns; every pointer is valid and
    // sized correctly.
    unsafe {
        match name {
            "tfo-sendto" => {
                let fd = new_socket("tcp4");
                let rc = libc::sendto(
                    fd,
                    b"x".as_ptr().cast(),
                    1,
                    libc::MSG_FASTOPEN,
                    sa_ptr,
                    sa_len,
                );
                (fd, if rc >= 0 { Ok(()) } else { Err(errno()) })
            }
            "tfo-connect" => {
                let fd = new_socket("tcp4");
                let on: libc::c_int = 1;
                // Without the option this would be a plain connect(): fail the vector.
                let rc = libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_FASTOPEN_CONNECT,
                    (&on as *const libc::c_int).cast(),
                    mem::size_of::<libc::c_int>() as u32,
                );
                assert_eq!(
                    rc,
                    0,
                    "setsockopt(TCP_FASTOPEN_CONNECT): {}",
                    io::Error::last_os_error()
                );
                (fd, connect_to(fd, &sa))
            }
            "io-uring" => {
                let fd = new_socket("tcp4");
                let mut ring = io_uring::IoUring::new(2).expect("io_uring_setup");
                let entry =
                    io_uring::opcode::Connect::new(io_uring::types::Fd(fd), sa_ptr, sa_len).build();
                ring.submission().push(&entry).expect("submission queue");
                ring.submit_and_wait(1).expect("io_uring_enter");
                let res = ring.completion().next().expect("a completion").result();
                (fd, if res == 0 { Ok(()) } else { Err(-res) })
            }
            "v4-mapped" => {
                let fd = new_socket("tcp6");
                let mapped = sockaddr_v6(port, Ipv4Addr::LOCALHOST.to_ipv6_mapped());
                (fd, connect_to(fd, &mapped))
            }
            "nonblock" => {
                let fd = libc::socket(
                    libc::AF_INET,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                );
                assert!(fd >= 0, "socket(): {}", io::Error::last_os_error());
                let result = match connect_to(fd, &sa) {
                    Err(libc::EINPROGRESS) => Ok(()),
                    other => other,
                };
                (fd, result)
            }
            other => panic!("unknown vector {other}"),
        }
    }
}

/// SO_LINGER 0: close() sends RST and leaves no TIME_WAIT, so long benchmark loops do not
/// run out of ephemeral ports. Both sides of an A/B run do the same.
fn abort_on_close(fd: i32) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid option pointer and length.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            mem::size_of::<libc::linger>() as u32,
        )
    };
}

fn close(fd: i32) {
    // SAFETY: `fd` is a socket this process owns and closes once.
    unsafe { libc::close(fd) };
}
