//! The system's user and group database, through nix (getpwnam_r/getgrnam_r), so NSS
//! sources such as LDAP or sssd resolve as `id` does.

use std::io;

use nix::unistd::{Group, User};

use crate::model::users::UserDb;

/// [`UserDb`] backed by NSS.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemUsers;

impl UserDb for SystemUsers {
    fn uid(&self, name: &str) -> io::Result<Option<u32>> {
        lookup(User::from_name(name)).map(|u| u.map(|u| u.uid.as_raw()))
    }

    fn gid(&self, name: &str) -> io::Result<Option<u32>> {
        lookup(Group::from_name(name)).map(|g| g.map(|g| g.gid.as_raw()))
    }

    fn groups_of(&self, uid: u32) -> io::Result<Vec<u32>> {
        let Some(user) = lookup(User::from_uid(nix::unistd::Uid::from_raw(uid)))? else {
            return Ok(Vec::new());
        };
        let name = std::ffi::CString::new(user.name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let groups = nix::unistd::getgrouplist(&name, user.gid)?;
        Ok(groups.into_iter().map(|g| g.as_raw()).collect())
    }
}

/// Some NSS modules report "not found" as one of these errnos instead of an empty result.
fn lookup<T>(result: nix::Result<Option<T>>) -> io::Result<Option<T>> {
    use nix::errno::Errno;
    match result {
        Ok(found) => Ok(found),
        Err(Errno::ENOENT | Errno::ESRCH | Errno::EBADF | Errno::EPERM) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_resolves_and_unknown_names_are_none() {
        assert_eq!(SystemUsers.uid("root").unwrap(), Some(0));
        assert_eq!(SystemUsers.gid("root").unwrap(), Some(0));
        assert_eq!(SystemUsers.uid("no-such-user-rlagent").unwrap(), None);
        assert_eq!(SystemUsers.gid("no-such-group-rlagent").unwrap(), None);
    }
}
