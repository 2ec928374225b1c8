//! Why a connect() was (or, in monitor mode, would have been) denied: the programs'
//! `reason::*` index as a type, so every place that tells reasons apart matches all of them.

use serde::{Deserialize, Serialize};

use rlagent_common::reason;

/// One of the programs' denial reasons. Serialized (and shown, and used as a metrics
/// label) by its name: `cap`, `host_cap`, `rate`, `group`, `group_rate`, `full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The UID's own cap, or the `user:*` default.
    Cap,
    /// The host-wide cap.
    HostCap,
    /// The UID's connection rate.
    Rate,
    /// The cap of the process's group.
    Group,
    /// The connection rate of the process's group.
    GroupRate,
    /// A kernel map had no room to count the connection.
    Full,
}

impl Reason {
    /// Every reason, in the programs' index order.
    pub const ALL: [Reason; reason::COUNT] = [
        Reason::Cap,
        Reason::HostCap,
        Reason::Rate,
        Reason::Group,
        Reason::GroupRate,
        Reason::Full,
    ];

    /// The reason the programs number `index` (`reason::*`); `None` for a number this
    /// build does not know.
    pub fn from_index(index: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(index).ok()?).copied()
    }

    /// The programs' `reason::*` index.
    pub fn index(self) -> usize {
        match self {
            Reason::Cap => reason::CAP,
            Reason::HostCap => reason::HOST_CAP,
            Reason::Rate => reason::RATE,
            Reason::Group => reason::GROUP,
            Reason::GroupRate => reason::GROUP_RATE,
            Reason::Full => reason::FULL,
        }
    }

    pub fn name(self) -> &'static str {
        reason::NAMES[self.index()]
    }

    /// A group's limit, rather than the UID's or the host's.
    pub fn is_group(self) -> bool {
        matches!(self, Reason::Group | Reason::GroupRate)
    }

    /// A token bucket ran empty; the event's limit is the burst.
    pub fn is_rate(self) -> bool {
        matches!(self, Reason::Rate | Reason::GroupRate)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_its_programs_index_and_name() {
        for (i, r) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(Reason::from_index(i as u32), Some(r));
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", reason::NAMES[i]));
            assert_eq!(serde_json::from_str::<Reason>(&json).unwrap(), r);
        }
        assert_eq!(Reason::from_index(reason::COUNT as u32), None);
    }
}
