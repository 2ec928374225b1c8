//! Looking up users and groups by name, as a trait: the vocabulary layers resolve names
//! through it without doing I/O themselves (`kernel::nss` is the system's implementation,
//! tests pass a fixed table).

use std::io;

pub trait UserDb: Send + Sync {
    /// The UID of user `name`, `None` if there is no such user.
    fn uid(&self, name: &str) -> io::Result<Option<u32>>;
    /// The GID of group `name`, `None` if there is no such group.
    fn gid(&self, name: &str) -> io::Result<Option<u32>>;
    /// The groups of user `uid` (primary and supplementary); empty for a UID without an
    /// entry.
    fn groups_of(&self, uid: u32) -> io::Result<Vec<u32>>;
}
