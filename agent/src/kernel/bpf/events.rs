//! The programs' denial events: a reader of the pinned `RL_EVENTS` ring buffer.

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    path::Path,
};

use aya::maps::{Map, MapData, RingBuf};
use rlagent_common::{names, DenyEvent};

use super::{map_error, pins::PinLayout, BpfError};

/// Reads `RL_EVENTS`. Its fd becomes readable when events are waiting (for epoll, as
/// tokio's `AsyncFd` uses it).
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    /// Opens the ring buffer pinned under `pin_path` (there is one reader: the agent).
    pub fn open(pin_path: &Path) -> Result<Self, BpfError> {
        let pin = PinLayout::new(pin_path).map(names::EVENTS);
        let data = MapData::from_pin(pin).map_err(map_error(names::EVENTS))?;
        let map = Map::from_map_data(data).map_err(map_error(names::EVENTS))?;
        Ok(Self {
            ring: RingBuf::try_from(map).map_err(map_error(names::EVENTS))?,
        })
    }

    /// The next waiting event, if any. A record of another size (another layout, which
    /// the versioned pin path rules out) is skipped.
    pub fn next_event(&mut self) -> Option<DenyEvent> {
        loop {
            let item = self.ring.next()?;
            if item.len() == size_of::<DenyEvent>() {
                // SAFETY: DenyEvent is plain data of exactly this size, any bit pattern
                // valid; the read copes with the ring's 8-byte alignment or less.
                return Some(unsafe { item.as_ptr().cast::<DenyEvent>().read_unaligned() });
            }
        }
    }
}

impl AsFd for EventReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for EventReader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}
