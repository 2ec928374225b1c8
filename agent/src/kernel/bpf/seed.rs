//! Connections that are open when the agent first starts: found with sock_diag (the
//! NETLINK_SOCK_DIAG dump `ss` uses), which reports each socket's owner UID, its cookie
//! (the same one the programs key their charges by) and its cgroup.
//!
//! Only sockets that a connect() made and that a sock_release will end are counted:
//! - not accepted sockets (whose local port is a listening port of the same family) nor
//!   listening ones, as for new connections;
//! - not orphans (closed by their process, still in FIN_WAIT or LAST_ACK: inode 0), whose
//!   sock_release has already run;
//! - not MPTCP subflows (TCP sockets with the "mptcp" ULP) nor root's sockets, which
//!   include kernel sockets: kernel sockets never pass sock_release, so their charge
//!   would never be released.
//!
//! sock_diag answers for one network namespace: every namespace a process is in is
//! dumped, each from a thread that enters it.

use std::{
    collections::{BTreeSet, HashSet},
    path::Path,
};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as _, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

/// `INET_DIAG_CGROUP_ID` (linux/inet_diag.h): the socket's cgroup v2 id (Linux >= 5.7).
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `INET_DIAG_ULP_INFO`: nested, `INET_ULP_INFO_NAME` (1) is the ULP's name.
const INET_DIAG_ULP_INFO: u16 = 19;
const INET_ULP_INFO_NAME: u16 = 1;
const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;
const TCP_TIME_WAIT: u8 = 6;
const TCP_SYN_RECV: u8 = 3;
const TCP_CLOSE: u8 = 7;

#[derive(Debug, thiserror::Error)]
#[error("listing open sockets (sock_diag, {what})")]
pub struct SeedError {
    what: String,
    #[source]
    source: std::io::Error,
}

fn seed_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SeedError {
    let what = what.into();
    move |source| SeedError { what, source }
}

/// An open connection: its socket cookie and owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OpenConnection {
    pub cookie: u64,
    pub uid: u32,
}

/// One socket as sock_diag reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DiagSocket {
    family: u8,
    state: u8,
    local_port: u16,
    cookie: u64,
    uid: u32,
    inode: u32,
    cgroup: Option<u64>,
    /// The socket's upper-layer protocol ("mptcp" on an MPTCP subflow).
    ulp: Option<String>,
}

/// The cgroup ids (cgroup2 directory inodes) of `dir` and every cgroup below it.
pub fn cgroup_ids(dir: &Path) -> HashSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut ids = HashSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        if let Ok(meta) = std::fs::metadata(&d) {
            ids.insert(meta.ino());
        }
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(entry.path());
            }
        }
    }
    ids
}

/// Connected TCP sockets (and connected UDP ones with `udp`) whose cgroup is one of
/// `cgroups` (`None`: any), in every network namespace a process is in (sock_diag
/// answers for the namespace its socket was made in: one dump per namespace, from a
/// thread that enters it). A namespace whose processes all exit meanwhile is skipped.
pub fn open_connections(
    udp: bool,
    cgroups: Option<&HashSet<u64>>,
) -> Result<Vec<OpenConnection>, SeedError> {
    let own = net_namespace(Path::new("/proc/self/ns/net"));
    let mut out = select(&dump_namespace(udp)?, cgroups);
    for (id, path) in net_namespaces() {
        if Some(id) == own {
            continue;
        }
        let Ok(ns) = std::fs::File::open(&path) else {
            continue;
        };
        let found = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| seed_error("entering a network namespace")(e.into()))?;
                    dump_namespace(udp)
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(seed_error("a dump thread")(std::io::Error::other(
                        "panicked",
                    )))
                })
        });
        match found {
            // Listening ports (which tell accepted sockets apart) are per namespace.
            Ok(found) => out.extend(select(&found, cgroups)),
            // One namespace that cannot be read (gone meanwhile, or refused) is skipped.
            Err(e) => tracing::warn!(
                namespace = %crate::model::text::escaped_path(&path),
                "open connections not listed there: {}",
                crate::model::error_chain(&e)
            ),
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// TCP and (with `udp`) UDP sockets of both families in the calling thread's network
/// namespace.
fn dump_namespace(udp: bool) -> Result<Vec<(u8, DiagSocket)>, SeedError> {
    let mut all = Vec::new();
    for family in [AF_INET, AF_INET6] {
        all.extend(dump(family, IPPROTO_TCP, IPPROTO_TCP)?);
        if udp {
            all.extend(dump(family, IPPROTO_UDP, IPPROTO_UDP)?);
        }
    }
    Ok(all)
}

/// A network namespace's identity (device and inode of its nsfs file).
fn net_namespace(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Every network namespace some process is in, once each, with a path that opens it.
fn net_namespaces() -> Vec<((u64, u64), std::path::PathBuf)> {
    let mut seen = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join("ns/net");
        if let Some(id) = net_namespace(&path) {
            seen.entry(id).or_insert(path);
        }
    }
    seen.into_iter().collect()
}

/// The sockets a connect() made, from a dump (`protocol` tells TCP from UDP: the same
/// state numbers mean "connected" for both).
fn select(all: &[(u8, DiagSocket)], cgroups: Option<&HashSet<u64>>) -> Vec<OpenConnection> {
    let listening: BTreeSet<(u8, u16)> = all
        .iter()
        .filter(|(p, s)| *p == IPPROTO_TCP && s.state == TCP_LISTEN)
        .map(|(_, s)| (s.family, s.local_port))
        .collect();
    let mut out: Vec<OpenConnection> = all
        .iter()
        .filter(|(protocol, s)| match *protocol {
            IPPROTO_TCP => {
                !matches!(
                    s.state,
                    TCP_LISTEN | TCP_TIME_WAIT | TCP_SYN_RECV | TCP_CLOSE
                ) && !listening.contains(&(s.family, s.local_port))
            }
            _ => s.state == TCP_ESTABLISHED,
        })
        .filter(|(_, s)| s.inode != 0 && s.uid != 0 && s.ulp.as_deref() != Some("mptcp"))
        .filter(|(_, s)| match (cgroups, s.cgroup) {
            (None, _) => true,
            (Some(set), Some(id)) => set.contains(&id),
            (Some(_), None) => false,
        })
        .map(|(_, s)| OpenConnection {
            cookie: s.cookie,
            uid: s.uid,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

fn dump(family: u8, protocol: u8, tag: u8) -> Result<Vec<(u8, DiagSocket)>, SeedError> {
    let socket = send_dump_request(family, protocol)?;
    let mut out = Vec::new();
    let mut receive = vec![0u8; 1 << 16];
    loop {
        let size = socket
            .recv(&mut &mut receive[..], 0)
            .map_err(seed_error("recv"))?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&receive[offset..size])
                .map_err(|e| {
                    seed_error("parse")(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        e.to_string(),
                    ))
                })?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    out.push((tag, diag_socket(&r)));
                }
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    return Err(seed_error("dump")(std::io::Error::from_raw_os_error(
                        e.code.map_or(libc::EIO, |c| -c.get()),
                    )))
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

/// A sock_diag socket that has asked for every socket of `family` and `protocol`.
fn send_dump_request(family: u8, protocol: u8) -> Result<Socket, SeedError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(seed_error("socket"))?;
    socket.bind_auto().map_err(seed_error("bind"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(seed_error("connect"))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            // INFO brings INET_DIAG_ULP_INFO (the ULP name needs no privilege).
            extensions: ExtensionFlags::INFO,
            states: StateFlags::all(),
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).map_err(seed_error("send"))?;
    Ok(socket)
}

/// One socket of a dump: its header, the cgroup id and the ULP name.
fn diag_socket(r: &InetResponse) -> DiagSocket {
    let cgroup = r.nlas.iter().find_map(|nla| match nla {
        Nla::Other(other) if other.kind() == INET_DIAG_CGROUP_ID => {
            let mut value = [0u8; 8];
            (other.value_len() == 8).then(|| {
                other.emit_value(&mut value);
                u64::from_ne_bytes(value)
            })
        }
        _ => None,
    });
    let ulp = r.nlas.iter().find_map(|nla| match nla {
        Nla::Other(other) if other.kind() == INET_DIAG_ULP_INFO => {
            let mut value = vec![0u8; other.value_len()];
            other.emit_value(&mut value);
            ulp_name(&value)
        }
        _ => None,
    });
    DiagSocket {
        family: r.header.family,
        state: r.header.state,
        local_port: r.header.socket_id.source_port,
        // idiag_cookie is two u32 in host order, low word first.
        cookie: u64::from_ne_bytes(r.header.socket_id.cookie),
        uid: r.header.uid,
        inode: r.header.inode,
        cgroup,
        ulp,
    }
}

/// The name in a nested `INET_DIAG_ULP_INFO` payload (netlink attributes: u16 length,
/// u16 type, value, padded to 4 bytes).
fn ulp_name(mut nested: &[u8]) -> Option<String> {
    while nested.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([nested[0], nested[1]]));
        let kind = u16::from_ne_bytes([nested[2], nested[3]]) & 0x3fff;
        if len < 4 || len > nested.len() {
            return None;
        }
        if kind == INET_ULP_INFO_NAME {
            let value = &nested[4..len];
            let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
            return String::from_utf8(value[..end].to_vec()).ok();
        }
        nested = &nested[len.next_multiple_of(4).min(nested.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(family: u8, state: u8, port: u16, cookie: u64, cgroup: Option<u64>) -> DiagSocket {
        DiagSocket {
            family,
            state,
            local_port: port,
            cookie,
            uid: 1000 + cookie as u32,
            inode: 7000 + cookie as u32,
            cgroup,
            ulp: None,
        }
    }

    #[test]
    fn orphans_root_and_mptcp_subflows_are_not_seeded() {
        let orphan = DiagSocket {
            inode: 0,
            ..sock(AF_INET, 4 /* FIN_WAIT1 */, 40000, 1, None)
        };
        let root = DiagSocket {
            uid: 0,
            ..sock(AF_INET, TCP_ESTABLISHED, 40001, 2, None)
        };
        let subflow = DiagSocket {
            ulp: Some("mptcp".into()),
            ..sock(AF_INET, TCP_ESTABLISHED, 40002, 3, None)
        };
        let tls = DiagSocket {
            ulp: Some("tls".into()),
            ..sock(AF_INET, TCP_ESTABLISHED, 40003, 4, None)
        };
        let all = [orphan, root, subflow, tls].map(|s| (IPPROTO_TCP, s));
        let cookies: Vec<u64> = select(&all, None).iter().map(|c| c.cookie).collect();
        assert_eq!(cookies, [4]);
    }

    #[test]
    fn reads_the_ulp_name() {
        // INET_ULP_INFO_NAME "mptcp\0", then another attribute.
        let mut nested = vec![10, 0, 1, 0];
        nested.extend(b"mptcp\0");
        nested.extend([0, 0, 8, 0, 2, 0, 1, 2, 3, 4]);
        assert_eq!(ulp_name(&nested).as_deref(), Some("mptcp"));
        assert_eq!(ulp_name(&[3, 0]), None);
        assert_eq!(ulp_name(&[200, 0, 1, 0, b'x']), None);
    }

    #[test]
    fn connected_sockets_count_and_accepted_listening_and_closing_ones_do_not() {
        let all = [
            (IPPROTO_TCP, sock(AF_INET, TCP_LISTEN, 80, 1, None)),
            // Accepted by the listener on port 80.
            (IPPROTO_TCP, sock(AF_INET, TCP_ESTABLISHED, 80, 2, None)),
            // A client's connection, and one to the same port number over IPv6 (no
            // IPv6 listener there).
            (IPPROTO_TCP, sock(AF_INET, TCP_ESTABLISHED, 40000, 3, None)),
            (IPPROTO_TCP, sock(AF_INET6, 2 /* SYN_SENT */, 80, 4, None)),
            (IPPROTO_TCP, sock(AF_INET, TCP_TIME_WAIT, 40001, 5, None)),
            (IPPROTO_TCP, sock(AF_INET, TCP_SYN_RECV, 80, 6, None)),
            (IPPROTO_UDP, sock(AF_INET, TCP_ESTABLISHED, 5353, 7, None)),
            // An unconnected UDP socket.
            (IPPROTO_UDP, sock(AF_INET, TCP_CLOSE, 5353, 8, None)),
        ];
        let cookies: Vec<u64> = select(&all, None).iter().map(|c| c.cookie).collect();
        assert_eq!(cookies, [3, 4, 7]);
    }

    #[test]
    fn only_sockets_of_the_given_cgroups_count() {
        let all = [
            (
                IPPROTO_TCP,
                sock(AF_INET, TCP_ESTABLISHED, 40000, 1, Some(10)),
            ),
            (
                IPPROTO_TCP,
                sock(AF_INET, TCP_ESTABLISHED, 40001, 2, Some(11)),
            ),
            (IPPROTO_TCP, sock(AF_INET, TCP_ESTABLISHED, 40002, 3, None)),
        ];
        let set = HashSet::from([10]);
        let found = select(&all, Some(&set));
        assert_eq!(
            found,
            [OpenConnection {
                cookie: 1,
                uid: 1001
            }]
        );
    }

    /// SO_COOKIE (nix has no wrapper for it).
    fn cookie_of(socket: &impl std::os::fd::AsRawFd) -> u64 {
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: a valid out-pointer of the advertised size.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_COOKIE");
        cookie
    }

    #[test]
    fn the_dump_reports_cookie_owner_inode_and_ports_as_the_kernel_knows_them() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let all = dump(AF_INET, IPPROTO_TCP, IPPROTO_TCP).unwrap();
        let find = |cookie: u64| {
            all.iter()
                .map(|(_, s)| s)
                .find(|s| s.cookie == cookie)
                .unwrap_or_else(|| panic!("cookie {cookie} not among {} sockets", all.len()))
        };
        let me = nix::unistd::getuid().as_raw();
        let c = find(cookie_of(&client));
        assert_eq!(
            (c.uid, c.state, c.ulp.as_deref()),
            (me, TCP_ESTABLISHED, None)
        );
        assert_ne!(c.inode, 0);
        assert!(c.cgroup.is_some(), "INET_DIAG_CGROUP_ID");
        // The accepted side has the listener's port, so it is never taken for a client.
        assert_eq!(find(cookie_of(&server)).local_port, port);
        assert!(all
            .iter()
            .any(|(_, s)| s.state == TCP_LISTEN && s.local_port == port));
    }
}
