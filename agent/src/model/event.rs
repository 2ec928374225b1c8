//! A denial (or, in monitor mode, a would-deny) as the agent reports it: the log line,
//! `rlctl events` and `rlctl why` all show this one type.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use rlagent_common::DenyEvent;

use super::reason::Reason;

/// One connect() a limit refused or, in monitor mode, would have refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DenialEvent {
    /// The agent's number for it, rising by one per event it received since it started
    /// (0 until the event log numbers it).
    #[serde(default)]
    pub seq: u64,
    /// When, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub uid: u32,
    pub pid: u32,
    /// The process's name (at most 15 bytes, as the kernel keeps it).
    pub comm: String,
    /// The group the process was in, when a group's limits applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub reason: Reason,
    /// True: monitor mode, the connect() went through.
    pub monitor: bool,
    /// The cap, or for a rate the burst, in force at the time.
    pub limit: u64,
    /// The address and port connect() was called with.
    pub destination: String,
    /// The errno connect() failed with (0 when it did not fail).
    pub errno: u32,
}

/// AF_INET6 of the kernel (the programs copy the family from the socket address).
const AF_INET6: u16 = 10;

impl DenialEvent {
    /// From a program's record: `wall_ms_at` turns its monotonic time into wall-clock
    /// milliseconds; `group` names the group of its cgroup id. `None` for a reason number
    /// this build does not know (programs of another layout, which the pins' version
    /// directory keeps apart).
    pub fn from_kernel(
        raw: &DenyEvent,
        wall_ms_at: impl Fn(u64) -> u64,
        group: impl Fn(u64) -> Option<String>,
    ) -> Option<Self> {
        let reason = Reason::from_index(raw.reason)?;
        let mut bytes = [0u8; 16];
        for (i, word) in raw.addr.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        let ip = if raw.family == AF_INET6 {
            IpAddr::V6(Ipv6Addr::from(bytes))
        } else {
            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
        };
        let destination = match ip {
            IpAddr::V6(v6) => format!("[{v6}]:{}", raw.port),
            IpAddr::V4(v4) => format!("{v4}:{}", raw.port),
        };
        let comm_len = raw
            .comm
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(raw.comm.len());
        Some(Self {
            seq: 0,
            time_ms: wall_ms_at(raw.time_ns),
            uid: raw.uid,
            pid: raw.pid,
            comm: String::from_utf8_lossy(&raw.comm[..comm_len]).into_owned(),
            group: (raw.group != 0).then(|| group(raw.group)).flatten(),
            reason,
            monitor: raw.monitor != 0,
            limit: raw.limit,
            destination,
            errno: raw.errno,
        })
    }

    /// What the limit was, in words: "cap 5", "rate (burst 5)", ...
    pub fn limit_text(&self) -> String {
        match self.reason {
            Reason::Rate | Reason::GroupRate => format!("{} (burst {})", self.reason, self.limit),
            Reason::Full => "a full kernel map".to_string(),
            Reason::Cap | Reason::HostCap | Reason::Group => {
                format!("{} {}", self.reason, self.limit)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as the programs write it: the address in network-order words.
    fn raw(family: u16, bytes: [u8; 16]) -> DenyEvent {
        let mut addr = [0u32; 4];
        for (i, word) in addr.iter_mut().enumerate() {
            *word = u32::from_ne_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
        }
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        DenyEvent {
            time_ns: 5_000_000,
            group: 42,
            limit: 3,
            uid: 1001,
            pid: 77,
            errno: 1,
            port: 8080,
            family,
            reason: rlagent_common::reason::GROUP as u32,
            monitor: 0,
            comm,
            addr,
        }
    }

    #[test]
    fn a_kernel_record_reads_as_an_event() {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[127, 0, 0, 1]);
        let e = DenialEvent::from_kernel(
            &raw(2, v4),
            |ns| 1_000 + ns / 1_000_000,
            |id| (id == 42).then(|| "batch".to_string()),
        )
        .unwrap();
        assert_eq!(e.time_ms, 1_005);
        assert_eq!(e.comm, "curl");
        assert_eq!(e.group.as_deref(), Some("batch"));
        assert_eq!(e.reason, Reason::Group);
        assert_eq!(e.destination, "127.0.0.1:8080");
        assert_eq!(e.limit_text(), "group 3");
        let v6 = DenialEvent::from_kernel(&raw(10, Ipv6Addr::LOCALHOST.octets()), |_| 0, |_| None)
            .unwrap();
        assert_eq!(v6.destination, "[::1]:8080");
        assert_eq!(v6.group, None);
        let mut unknown = raw(2, v4);
        unknown.reason = rlagent_common::reason::COUNT as u32;
        assert_eq!(DenialEvent::from_kernel(&unknown, |_| 0, |_| None), None);
    }

    #[test]
    fn a_hostile_comm_survives_json_as_it_is_and_shows_escaped() {
        let mut record = raw(2, [0u8; 16]);
        let name = b"\x1b[2J\r\n<0>FAKE";
        record.comm = [0; 16];
        record.comm[..name.len()].copy_from_slice(name);
        let e = DenialEvent::from_kernel(&record, |_| 0, |_| None).unwrap();
        assert_eq!(e.comm, "\x1b[2J\r\n<0>FAKE");
        let line = serde_json::to_string(&e).unwrap();
        assert!(!line.bytes().any(|b| b.is_ascii_control()), "{line}");
        assert!(line.contains(r#""comm":"\u001b[2J\r\n<0>FAKE""#), "{line}");
        let back: DenialEvent = serde_json::from_str(&line).unwrap();
        assert_eq!(back, e);
        assert_eq!(
            crate::model::text::escaped(&back.comm).to_string(),
            r"\x1b[2J\x0d\x0a<0>FAKE"
        );
    }
}
