//! What the agent must enforce, built once per apply from the config and the runtime
//! overrides: [`Desired`] with its cgroup plan, connection limits and alert rules. Every
//! source of a quota (config file, saved state, rlctl) reaches the kernel through
//! [`Desired::build`], so they share one validation.

pub mod cgroups;
pub mod conns;
pub mod state;

use std::collections::BTreeMap;

use crate::{
    config::Config,
    model::{
        alert::Rule,
        quota::{Field, Quota},
        target::Target,
        users::UserDb,
    },
};
use cgroups::CgroupPlan;
use conns::ConnLimits;
use state::{RuntimeState, Source, Sources, StateError};

#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{count} UIDs have their own connection cap; the kernel map holds at most {max}")]
    TooManyUidCaps { count: usize, max: u32 },
    #[error("{count} groups with connection limits: the kernel map holds {max}")]
    TooManyGroups { count: usize, max: u32 },
}

/// One desired state: everything an apply writes, derived in one place.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// The effective quota of each target (config with runtime overrides merged).
    pub quotas: BTreeMap<Target, Quota>,
    /// Where each field of `quotas` comes from.
    pub sources: Sources,
    pub cgroups: CgroupPlan,
    pub conns: ConnLimits,
    pub alert_rules: Vec<Rule>,
}

impl Desired {
    /// Merges `runtime` over `config` and derives the plan, limits and rules; refuses what
    /// the kernel maps could not hold, before anything is written.
    pub fn build(
        config: &Config,
        runtime: &RuntimeState,
        users: &dyn UserDb,
    ) -> Result<Self, DesiredError> {
        let merged = runtime.merge(config, users)?;
        let conns = ConnLimits::new(&config.bpf, &config.layout(), &merged.quotas);
        check_capacity(&conns)?;
        Ok(Self {
            cgroups: CgroupPlan::new(config, &merged.quotas),
            conns,
            alert_rules: config.alert_rules.clone(),
            quotas: merged.quotas,
            sources: merged.sources,
        })
    }

    /// Where `field` of `target` comes from (config when not overridden).
    pub fn source(&self, target: &Target, field: Field) -> Source {
        self.sources
            .get(&(target.clone(), field))
            .copied()
            .unwrap_or(Source::Config)
    }

    /// Quota fields no code enforces yet, per target (only a state file from an older
    /// agent can hold them: the config and rlctl refuse them).
    pub fn unenforced(&self) -> Vec<(Target, Vec<Field>)> {
        conns::unenforced_fields(&self.quotas)
    }
}

/// Refuses limits the kernel maps could not hold.
fn check_capacity(conns: &ConnLimits) -> Result<(), DesiredError> {
    if conns.per_uid.len() > rlagent_common::MAX_UID_CAPS as usize {
        return Err(DesiredError::TooManyUidCaps {
            count: conns.per_uid.len(),
            max: rlagent_common::MAX_UID_CAPS,
        });
    }
    if conns.groups.len() > rlagent_common::MAX_GROUPS as usize {
        return Err(DesiredError::TooManyGroups {
            count: conns.groups.len(),
            max: rlagent_common::MAX_GROUPS,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{config, desired, Users};

    #[test]
    fn one_build_gives_plan_limits_rules_and_sources() {
        let c = config("[[quota]]\ntarget = \"batch\"\ncpu = \"50%\"\n[[quota]]\ntarget = \"user:2000\"\nconns = 3\n");
        let runtime = RuntimeState::default().with(
            &Target::Group("batch".into()),
            &BTreeMap::from([(Field::Pids, Some("10".to_string()))]),
        );
        let d = Desired::build(&c, &runtime, &Users).unwrap();
        assert!(d.cgroups.groups.contains_key("batch"));
        assert_eq!(d.conns.per_uid.get(&2000).map(|p| p.cap), Some(3));
        assert_eq!(d.alert_rules, c.alert_rules);
        let batch = Target::Group("batch".into());
        assert_eq!(d.source(&batch, Field::Cpu), Source::Config);
        assert_eq!(d.source(&batch, Field::Pids), Source::Runtime);
        assert!(d.cgroups.wants_cgroups());
    }

    #[test]
    fn more_uid_caps_than_the_map_holds_are_refused() {
        let mut conns = desired("").conns;
        conns.per_uid = (0..rlagent_common::MAX_UID_CAPS)
            .map(|uid| (uid, rlagent_common::Policy::NONE))
            .collect();
        assert!(check_capacity(&conns).is_ok());
        conns
            .per_uid
            .insert(rlagent_common::MAX_UID_CAPS, rlagent_common::Policy::NONE);
        let err = check_capacity(&conns).unwrap_err();
        assert!(matches!(err, DesiredError::TooManyUidCaps { .. }), "{err}");
    }
}
