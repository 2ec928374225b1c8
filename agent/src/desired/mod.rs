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
        adapt::{tightness, Step, STEP_FIELDS},
        alert::Rule,
        quota::{Field, Limit, Quota},
        target::{Target, UserRef},
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
        Self::build_with_steps(config, runtime, &[], users)
    }

    /// [`Self::build`] with the steps of adaptive rules and penalties in force laid over
    /// the merged quotas (see [`tighten`]).
    pub fn build_with_steps(
        config: &Config,
        runtime: &RuntimeState,
        steps: &[Step],
        users: &dyn UserDb,
    ) -> Result<Self, DesiredError> {
        let mut merged = runtime.merge(config, users)?;
        for step in steps {
            tighten(
                &mut merged.quotas,
                &mut merged.sources,
                step,
                config.bpf.uid_min,
            );
        }
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
            .cloned()
            .unwrap_or(Source::Config)
    }

    /// Quota fields no code enforces yet, per target (only a state file from an older
    /// agent can hold them: the config and rlctl refuse them).
    pub fn unenforced(&self) -> Vec<(Target, Vec<Field>)> {
        conns::unenforced_fields(&self.quotas)
    }
}

/// Lays `step` over `quotas`: each field it sets replaces the target's effective value
/// only where it is tighter (a step never loosens a limit), and then says where it came
/// from. A `user:<uid>`'s effective value is its own field, else the `user:*` default's
/// from `uid_min` up, as the kernel plans resolve it. The burst is compared as the
/// programs resolve it ([`effective_burst`]), and a step's rate never raises it. A memory
/// limit lowered below the target's memory.high takes memory.high down with it.
pub fn tighten(
    quotas: &mut BTreeMap<Target, Quota>,
    sources: &mut Sources,
    step: &Step,
    uid_min: u32,
) {
    let default = match &step.target {
        Target::User(UserRef::Uid(uid)) if *uid >= uid_min => {
            quotas.get(&Target::AllUsers).cloned()
        }
        _ => None,
    };
    let quota = quotas.entry(step.target.clone()).or_default();
    let burst_before = effective_burst(quota, default.as_ref());
    let effective = |quota: &Quota, field: Field| {
        tightness(quota, field).or_else(|| {
            if quota.text(field).is_some() {
                None
            } else {
                default.as_ref().and_then(|d| tightness(d, field))
            }
        })
    };
    for field in STEP_FIELDS.into_iter().filter(|f| *f != Field::ConnBurst) {
        let Some(value) = step.quota.text(field) else {
            continue;
        };
        let wanted = tightness(&step.quota, field);
        let tighter = match (wanted, effective(quota, field)) {
            (Some(w), Some(e)) => w < e,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if tighter && quota.set(field, &value).is_ok() {
            sources.insert(
                (step.target.clone(), field),
                Source::Step(step.source.clone()),
            );
        }
    }
    // The burst after the step is at most the one before and the step's own.
    let cap = match (burst_before, step.quota.conn_burst) {
        (Some(before), Some(wanted)) => Some(before.min(wanted)),
        (before, wanted) => before.or(wanted),
    };
    if let (Some(cap), Some(after)) = (cap, effective_burst(quota, default.as_ref())) {
        if after > cap {
            quota.conn_burst = Some(cap);
            sources.insert(
                (step.target.clone(), Field::ConnBurst),
                Source::Step(step.source.clone()),
            );
        }
    }
    // Only when this step set memory: a conflict it did not make is not its to settle.
    let memory_stepped = sources.get(&(step.target.clone(), Field::Memory))
        == Some(&Source::Step(step.source.clone()));
    if let (true, Some(Limit::Value(high)), Some(Limit::Value(max))) = (
        memory_stepped,
        quota
            .memory_high
            .or_else(|| default.as_ref().and_then(|d| d.memory_high)),
        quota.memory,
    ) {
        if high > max {
            quota.memory_high = Some(Limit::Value(max));
            sources.insert(
                (step.target.clone(), Field::MemoryHigh),
                Source::Step(step.source.clone()),
            );
        }
    }
}

/// The burst the programs give `own` (with `default`, the `user:*` quota, field by field
/// as `conns::policy` resolves it): its burst, else the default's, else the rate's count;
/// `None` without a rate.
fn effective_burst(own: &Quota, default: Option<&Quota>) -> Option<u64> {
    let rate = own
        .conn_rate
        .or_else(|| default.and_then(|d| d.conn_rate))
        .and_then(Limit::value)?;
    Some(
        own.conn_burst
            .or_else(|| default.and_then(|d| d.conn_burst))
            .unwrap_or(rate.count),
    )
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
    fn a_step_only_tightens_falls_back_to_the_user_default_and_says_its_source() {
        let c = config("[bpf]\nuid_min = 1000\n[[quota]]\ntarget = \"user:*\"\ncpu = \"20%\"\nconns = 8\nmemory_high = \"1G\"\n");
        let step = |text: &[(Field, &str)]| {
            let mut quota = Quota::default();
            for (f, v) in text {
                quota.set(*f, v).unwrap();
            }
            Step {
                target: Target::User(UserRef::Uid(2000)),
                source: "penalty:hog".into(),
                quota,
            }
        };
        let steps = [step(&[
            (Field::Cpu, "30%"),
            (Field::Conns, "2"),
            (Field::Memory, "512M"),
        ])];
        let d = Desired::build_with_steps(&c, &RuntimeState::default(), &steps, &Users).unwrap();
        let user = Target::User(UserRef::Uid(2000));
        let q = &d.quotas[&user];
        assert_eq!(
            q.cpu, None,
            "30% is looser than the default's 20%: not applied"
        );
        assert_eq!(q.text(Field::Conns).as_deref(), Some("2"));
        assert_eq!(q.text(Field::MemoryHigh).as_deref(), Some("512M"));
        assert_eq!(
            d.source(&user, Field::Conns),
            Source::Step("penalty:hog".into())
        );
        assert_eq!(d.conns.per_uid[&2000].cap, 2);
        // The default's cpu still applies to the user, field by field.
        assert!(d
            .cgroups
            .user_quota(2000)
            .is_some_and(|q| matches!(q.cpu, Limit::Value(_))));
        // A burst never loosens: an unset one is the rate's count.
        let burst = Step {
            quota: {
                let mut q = Quota::default();
                q.set(Field::ConnRate, "50/s").unwrap();
                q.set(Field::ConnBurst, "500").unwrap();
                q
            },
            ..steps[0].clone()
        };
        let runtime = RuntimeState::default().with(
            &user,
            &BTreeMap::from([(Field::ConnRate, Some("100/s".to_string()))]),
        );
        let d =
            Desired::build_with_steps(&c, &runtime, std::slice::from_ref(&burst), &Users).unwrap();
        let q = &d.quotas[&user];
        assert_eq!(q.text(Field::ConnRate).as_deref(), Some("50/s"));
        assert_eq!(
            q.conn_burst, None,
            "500 is looser than the 50 the rate implies"
        );
        // A rate-only step does not raise the burst its looser count would imply.
        let mut slower = burst.clone();
        slower.quota.clear(Field::ConnBurst);
        slower.quota.set(Field::ConnRate, "200/min").unwrap();
        let d = Desired::build_with_steps(&c, &runtime, &[slower], &Users).unwrap();
        let q = &d.quotas[&user];
        assert_eq!(
            (q.text(Field::ConnRate).as_deref(), q.conn_burst),
            (Some("200/min"), Some(100)),
            "the burst stays at the 100 the old rate implied"
        );
        assert_eq!(d.conns.per_uid[&2000].burst, 100);
        // Against the default's explicit burst, not the user's own rate count.
        let c2 = config("[bpf]\nuid_min = 1000\n[[quota]]\ntarget = \"user:*\"\nconn_rate = \"100/s\"\nconn_burst = 20\n");
        let mut wider = burst.clone();
        wider.quota = Quota::default();
        wider.quota.set(Field::ConnRate, "100/s").unwrap();
        wider.quota.set(Field::ConnBurst, "30").unwrap();
        let d = Desired::build_with_steps(&c2, &runtime, &[wider], &Users).unwrap();
        assert_eq!(
            d.conns.per_uid[&2000].burst, 20,
            "30 is looser than the default's 20"
        );
        // memory_high is left alone by a step that does not set memory.
        let c3 = config("[[quota]]\ntarget = \"user:2000\"\nmemory = \"512M\"\n[[quota]]\ntarget = \"user:*\"\nmemory_high = \"1G\"\n");
        let cpu_only = Step {
            quota: {
                let mut q = Quota::default();
                q.set(Field::Cpu, "10%").unwrap();
                q
            },
            ..steps[0].clone()
        };
        let d =
            Desired::build_with_steps(&c3, &RuntimeState::default(), &[cpu_only], &Users).unwrap();
        assert_eq!(d.source(&user, Field::MemoryHigh), Source::Config);
        // The same step on a system user has no default to compare with: it applies.
        let mut low = steps[0].clone();
        low.target = Target::User(UserRef::Uid(5));
        let d = Desired::build_with_steps(&c, &RuntimeState::default(), &[low], &Users).unwrap();
        assert_eq!(
            d.quotas[&Target::User(UserRef::Uid(5))]
                .text(Field::Cpu)
                .as_deref(),
            Some("30%")
        );
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
