//! Quota targets, written as strings everywhere (CLI, config, socket, metrics label):
//! `user:<uid|name>`, `user:*`, `<name>` / `group:<name>`, `cgroup:<path>`.

use std::{fmt, path::PathBuf, str::FromStr};

use super::users::UserDb;

/// Errors of this module; each carries the target string that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("invalid target {target:?}: {reason}")]
    Invalid {
        target: String,
        reason: &'static str,
    },
    #[error("unknown user {name:?} in target {target:?} (no such entry in the user database)")]
    UnknownUser { target: String, name: String },
    #[error("cannot look up user {name:?}: {message}")]
    Lookup { name: String, message: String },
}

/// A user named in a target, by UID or by name (resolved with [`Target::resolve_user`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UserRef {
    Uid(u32),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// `user:<uid|name>`: every process of that UID.
    User(UserRef),
    /// `user:*`: default for every UID at or above UID_MIN without a quota of its own.
    AllUsers,
    /// `<name>` or `group:<name>`: a named workload group.
    Group(String),
    /// `cgroup:<path>`: an existing cgroup, relative to the cgroup2 mount.
    Cgroup(PathBuf),
}

const MAX_NAME_LEN: usize = 64;
/// The longest path the kernel resolves (PATH_MAX) and the longest name of one component.
const MAX_PATH_LEN: usize = 4096;
const MAX_COMPONENT_LEN: usize = 255;
/// The prefixes of cgroup interface files (`cgroup.procs`, `cpu.max`, `pids.max`, ...).
const INTERFACE_PREFIXES: &[&str] = &[
    "cgroup", "cpu", "cpuset", "io", "memory", "pids", "hugetlb", "rdma", "misc", "irq",
];

fn invalid(target: &str, reason: &'static str) -> TargetError {
    TargetError::Invalid {
        target: target.to_string(),
        reason,
    }
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once(':') {
            Some(("user", "*")) => Ok(Self::AllUsers),
            Some(("user", who)) => parse_user(text, who),
            Some(("group", name)) => parse_group(text, name),
            Some(("cgroup", path)) => parse_cgroup(text, path),
            Some(_) => Err(invalid(
                text,
                "unknown kind: expected user:<uid|name>, user:*, group:<name>, <name> or cgroup:<path>",
            )),
            None => parse_group(text, text),
        }
    }
}

fn parse_user(text: &str, who: &str) -> Result<Target, TargetError> {
    if who.is_empty() {
        return Err(invalid(text, "missing user after user:"));
    }
    if who.bytes().all(|b| b.is_ascii_digit()) {
        return match who.parse::<u32>() {
            // (uid_t)-1 means "no change" to setreuid and is never a real user.
            Ok(uid) if uid != u32::MAX => Ok(Target::User(UserRef::Uid(uid))),
            _ => Err(invalid(text, "UID out of range (0 to 4294967294)")),
        };
    }
    let valid_name = who.len() <= MAX_NAME_LEN
        && !who.starts_with('-')
        && who
            .trim_end_matches('$')
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !valid_name {
        return Err(invalid(
            text,
            "user names are letters, digits, '_', '.', '-' (up to 64)",
        ));
    }
    Ok(Target::User(UserRef::Name(who.to_string())))
}

fn parse_group(text: &str, name: &str) -> Result<Target, TargetError> {
    if name.is_empty() {
        return Err(invalid(text, "empty group name"));
    }
    let valid = name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !valid {
        return Err(invalid(
            text,
            "group names are letters, digits, '_', '.', '-' (up to 64, not starting with '.')",
        ));
    }
    // Group cgroups are directories beside the kernel's interface files.
    let prefix = name.split('.').next().unwrap_or_default();
    if name.contains('.') && INTERFACE_PREFIXES.contains(&prefix) {
        return Err(invalid(
            text,
            "group names must not look like cgroup interface files (such as cgroup.kill or pids.max)",
        ));
    }
    // Group cgroups sit beside `user-<uid>` ones under the agent's subtree.
    if name.starts_with("user-") {
        return Err(invalid(
            text,
            "group names must not start with \"user-\" (reserved for users)",
        ));
    }
    Ok(Target::Group(name.to_string()))
}

fn parse_cgroup(text: &str, path: &str) -> Result<Target, TargetError> {
    let relative = path.trim_start_matches('/');
    if relative.is_empty() {
        return Err(invalid(
            text,
            "the root cgroup cannot take quotas; name a child cgroup",
        ));
    }
    if relative.len() > MAX_PATH_LEN || relative.chars().any(char::is_control) {
        return Err(invalid(
            text,
            "cgroup paths are at most 4096 bytes, without control characters",
        ));
    }
    let mut clean = PathBuf::new();
    for part in relative.trim_end_matches('/').split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(invalid(
                text,
                "cgroup paths must not contain empty, '.' or '..' parts",
            ));
        }
        if part.len() > MAX_COMPONENT_LEN {
            return Err(invalid(text, "a cgroup name is at most 255 bytes"));
        }
        clean.push(part);
    }
    Ok(Target::Cgroup(clean))
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(UserRef::Uid(uid)) => write!(f, "user:{uid}"),
            Self::User(UserRef::Name(name)) => write!(f, "user:{name}"),
            Self::AllUsers => f.write_str("user:*"),
            Self::Group(name) => write!(f, "group:{name}"),
            Self::Cgroup(path) => write!(f, "cgroup:{}", path.display()),
        }
    }
}

impl Target {
    /// Replaces a user name by its UID, so that `user:alice` and `user:1001` are one target.
    pub fn resolve_user(self, users: &dyn UserDb) -> Result<Self, TargetError> {
        match self {
            Self::User(UserRef::Name(name)) => match users.uid(&name) {
                Ok(Some(uid)) => Ok(Self::User(UserRef::Uid(uid))),
                Ok(None) => Err(TargetError::UnknownUser {
                    target: format!("user:{name}"),
                    name,
                }),
                Err(e) => Err(TargetError::Lookup {
                    name,
                    message: e.to_string(),
                }),
            },
            other => Ok(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Target, TargetError> {
        s.parse()
    }

    #[test]
    fn every_form_parses_and_prints_canonically() {
        assert_eq!(parse("user:1000"), Ok(Target::User(UserRef::Uid(1000))));
        assert_eq!(
            parse("user:alice"),
            Ok(Target::User(UserRef::Name("alice".into())))
        );
        assert_eq!(parse("user:*"), Ok(Target::AllUsers));
        assert_eq!(parse("agent"), Ok(Target::Group("agent".into())));
        assert_eq!(parse("group:agent"), Ok(Target::Group("agent".into())));
        assert_eq!(
            parse("cgroup:/system.slice/nginx.service/"),
            Ok(Target::Cgroup("system.slice/nginx.service".into()))
        );
        for s in [
            "user:1000",
            "user:*",
            "group:agent",
            "cgroup:a/b",
            "user:bob",
        ] {
            assert_eq!(parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn bad_targets_name_the_target() {
        for bad in [
            "user:",
            "user:4294967295",
            "user:99999999999",
            "user:-x",
            "user:a b",
            "group:",
            "",
            ".hidden",
            "a/b",
            "user-1000",
            "cgroup:",
            "cgroup:/",
            "cgroup:a/../b",
            "cgroup:a//b",
            "pod:x",
            "cgroup.kill",
            "group:pids.max",
            "memory.high",
            "cgroup:a\nb",
            "cgroup:a\0b",
            "agent\nINFO forged",
            "user:bob\n",
        ] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn long_paths_are_refused_and_dotted_names_that_are_not_interface_files_allowed() {
        assert!(parse(&format!("cgroup:{}", "a/".repeat(3000))).is_err());
        assert!(parse(&format!("cgroup:{}", "x".repeat(256))).is_err());
        assert!(parse(&format!("cgroup:a/{}", "x".repeat(255))).is_ok());
        assert_eq!(parse("team.a"), Ok(Target::Group("team.a".into())));
    }

    #[test]
    fn resolves_names_from_the_user_database() {
        let users = crate::testing::Users;
        assert_eq!(
            parse("user:root").unwrap().resolve_user(&users),
            Ok(Target::User(UserRef::Uid(0)))
        );
        let err = parse("user:no-such-user-rlagent")
            .unwrap()
            .resolve_user(&users)
            .unwrap_err();
        assert!(err
            .to_string()
            .contains("unknown user \"no-such-user-rlagent\""));
    }
}
