//! Connections that are open when the agent first starts: found with sock_diag (the
//! NETLINK_SOCK_DIAG dump `ss` uses), which reports each socket's owner UID, its cookie
//! (the same one the programs key their charges by) and its cgroup.
//!
//! Only sockets that a connect() made are counted: accepted sockets (whose local port is
//! a listening port of the same family) and listening sockets are not, as for new ones.
//! sock_diag sees the agent's own network namespace only.

use std::collections::{BTreeSet, HashSet};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as _, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

/// `INET_DIAG_CGROUP_ID` (linux/inet_diag.h): the socket's cgroup v2 id (Linux >= 5.7).
const INET_DIAG_CGROUP_ID: u16 = 21;
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
    cgroup: Option<u64>,
}

/// Connected TCP sockets (and connected UDP ones with `udp`) whose cgroup is one of
/// `cgroups` (`None`: any).
pub fn open_connections(
    udp: bool,
    cgroups: Option<&HashSet<u64>>,
) -> Result<Vec<OpenConnection>, SeedError> {
    let mut all = Vec::new();
    for family in [AF_INET, AF_INET6] {
        all.extend(dump(family, IPPROTO_TCP, IPPROTO_TCP)?);
        if udp {
            all.extend(dump(family, IPPROTO_UDP, IPPROTO_UDP)?);
        }
    }
    Ok(select(&all, cgroups))
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
            extensions: ExtensionFlags::empty(),
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
                    out.push((
                        tag,
                        DiagSocket {
                            family: r.header.family,
                            state: r.header.state,
                            local_port: r.header.socket_id.source_port,
                            // idiag_cookie is two u32 in host order, low word first.
                            cookie: u64::from_ne_bytes(r.header.socket_id.cookie),
                            uid: r.header.uid,
                            cgroup,
                        },
                    ));
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
            cgroup,
        }
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
    fn finds_a_connection_of_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let cookie = cookie_of(&client);
        let found = open_connections(false, None).unwrap();
        let me = nix::unistd::getuid().as_raw();
        assert!(
            found.contains(&OpenConnection { cookie, uid: me }),
            "cookie {cookie} not among {} connections",
            found.len()
        );
        // The accepted side is not a connection of ours.
        let (server, _) = listener.accept().unwrap();
        let server_cookie = cookie_of(&server);
        let found = open_connections(false, None).unwrap();
        assert!(!found.iter().any(|c| c.cookie == server_cookie));
    }
}
