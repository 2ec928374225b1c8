//! `[[group]]` placement rules and `[[quota]]` entries.

use std::collections::BTreeMap;

use toml::Spanned;

use super::{
    raw::{RawGroup, RawQuotaEntry},
    ConfigError, GroupRule, Source,
};
use crate::model::{
    quota::{not_supported_yet, unsupported_fields, Quota, RawQuota},
    target::Target,
    users::UserDb,
};

pub(super) fn groups(
    at: &Source,
    raw: &[Spanned<RawGroup>],
) -> Result<Vec<GroupRule>, ConfigError> {
    let mut groups = Vec::new();
    for group in raw {
        let line = at.line(group.span());
        let g = group.get_ref();
        match g.name.parse::<Target>() {
            Ok(Target::Group(name)) => groups.push(GroupRule {
                name,
                uids: g.uids.clone(),
                gids: g.gids.clone(),
                comms: g.comms.clone(),
                exes: g.exes.clone(),
            }),
            Ok(_) => {
                return Err(at.invalid(
                    line,
                    "name",
                    &g.name,
                    "a group name cannot have a kind prefix",
                ))
            }
            Err(source) => {
                return Err(ConfigError::Target {
                    path: at.path.to_path_buf(),
                    line,
                    source,
                })
            }
        }
    }
    Ok(groups)
}

pub(super) fn quotas(
    at: &Source,
    raw: &[Spanned<RawQuotaEntry>],
    users: &dyn UserDb,
) -> Result<BTreeMap<Target, Quota>, ConfigError> {
    let mut quotas = BTreeMap::new();
    for entry in raw {
        let line = at.line(entry.span());
        let e = entry.get_ref();
        let target = e
            .target
            .parse::<Target>()
            .and_then(|t| t.resolve_user(users))
            .map_err(|source| ConfigError::Target {
                path: at.path.to_path_buf(),
                line,
                source,
            })?;
        let raw_quota = RawQuota {
            cpu: e.cpu.clone(),
            memory: e.memory.clone(),
            memory_high: e.memory_high.clone(),
            pids: e.pids.clone(),
            conns: e.conns.clone(),
            conn_rate: e.conn_rate.clone(),
            conn_burst: e.conn_burst.clone(),
            mode: e.mode.clone(),
        };
        let quota = raw_quota.validate().map_err(|source| ConfigError::Quota {
            path: at.path.to_path_buf(),
            line,
            target: e.target.clone(),
            source,
        })?;
        let unsupported = unsupported_fields(&target, &quota);
        if !unsupported.is_empty() {
            return Err(at.invalid(
                line,
                "target",
                &e.target,
                &not_supported_yet(&target, &unsupported),
            ));
        }
        if quotas.insert(target.clone(), quota).is_some() {
            return Err(at.invalid(
                line,
                "target",
                &e.target,
                &format!("{target} already has a quota earlier in this file"),
            ));
        }
    }
    Ok(quotas)
}
