//! `[[adapt]]` and `[[penalty]]`: rules that tighten quotas while the host or a user is
//! under load. Every error names the file, the line, the field and the form expected.

use std::time::Duration;

use toml::Spanned;

use super::{
    raw::{RawAdaptRule, RawPenaltyRule, RawTier},
    ConfigError, Source,
};
use crate::model::{
    adapt::{
        loosened, parse_host_condition, parse_user_condition, AdaptRule, Condition, ExprError,
        PenaltyRule, Tier, MAX_RULE_DURATION, STEP_FIELDS,
    },
    duration,
    quota::{not_supported_yet, unsupported_fields, Mode, Quota, RawQuota},
    target::Target,
    users::UserDb,
};

/// The longest window a penalty averages over (the agent keeps one sample a second).
const MAX_WINDOW: Duration = Duration::from_secs(600);

/// A rule name: 1 to 64 of `[A-Za-z0-9_.-]` (it becomes a label and part of a source).
fn name_ok(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl Source<'_> {
    fn rule_name(
        &self,
        name: &Spanned<String>,
        taken: &[&str],
        kind: &str,
    ) -> Result<String, ConfigError> {
        let line = self.line(name.span());
        let text = name.get_ref();
        if !name_ok(text) {
            return Err(self.invalid(
                line,
                "name",
                text,
                "expected 1 to 64 letters, digits, '_', '-' or '.'",
            ));
        }
        if taken.contains(&text.as_str()) {
            return Err(self.invalid(
                line,
                "name",
                text,
                &format!("another {kind} rule has this name"),
            ));
        }
        Ok(text.clone())
    }

    fn duration(
        &self,
        value: &Spanned<String>,
        field: &'static str,
        positive: bool,
    ) -> Result<Duration, ConfigError> {
        duration::parse(value.get_ref())
            .filter(|d| (!positive || !d.is_zero()) && *d <= MAX_RULE_DURATION)
            .ok_or_else(|| {
                self.invalid(
                    self.line(value.span()),
                    field,
                    value.get_ref(),
                    if positive {
                        "expected a duration above 0 and at most a year, such as 2s, 5m or 1h"
                    } else {
                        "expected a duration of at most a year, such as 0, 2s, 5m or 1h"
                    },
                )
            })
    }

    fn mode(&self, value: &Option<Spanned<String>>) -> Result<Mode, ConfigError> {
        match value {
            None => Ok(Mode::Enforce),
            Some(v) => Mode::parse("mode", v.get_ref()).map_err(|_| {
                self.invalid(
                    self.line(v.span()),
                    "mode",
                    v.get_ref(),
                    "expected enforce or monitor",
                )
            }),
        }
    }

    /// A rule's `when`, parsed by `parse`.
    fn condition<S>(
        &self,
        value: &Spanned<String>,
        parse: fn(&str) -> Result<Condition<S>, ExprError>,
    ) -> Result<Condition<S>, ConfigError> {
        parse(value.get_ref()).map_err(|e| {
            self.invalid(
                self.line(value.span()),
                "when",
                value.get_ref(),
                &e.to_string(),
            )
        })
    }

    /// The limits of a step or tier: at least one, none `max` (a step only tightens).
    fn step(&self, line: usize, what: &str, raw: RawQuota) -> Result<Quota, ConfigError> {
        let quota = raw.validate().map_err(|source| ConfigError::Quota {
            path: self.path.to_path_buf(),
            line,
            target: what.to_string(),
            source,
        })?;
        for field in STEP_FIELDS {
            if quota.text(field).as_deref() == Some("max") {
                return Err(self.invalid(
                    line,
                    field.name(),
                    "max",
                    "a step only tightens: give a limit, not max",
                ));
            }
        }
        Ok(quota)
    }
}

pub(super) fn adapt_rules(
    at: &Source,
    raw: &[Spanned<RawAdaptRule>],
    users: &dyn UserDb,
) -> Result<Vec<AdaptRule>, ConfigError> {
    let mut rules: Vec<AdaptRule> = Vec::new();
    for entry in raw {
        let line = at.line(entry.span());
        let r = entry.get_ref();
        let taken: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
        let name = at.rule_name(&r.name, &taken, "adapt")?;
        let when = at.condition(&r.when, parse_host_condition)?;
        let hold = at.duration(&r.hold, "for", false)?;
        let release_after = at.duration(&r.release_after, "release_after", true)?;
        if release_after < hold {
            return Err(at.invalid(
                at.line(r.release_after.span()),
                "release_after",
                r.release_after.get_ref(),
                &format!(
                    "must be at least `for` ({}): a step released sooner than it is applied would flap",
                    r.hold.get_ref()
                ),
            ));
        }
        let target_line = at.line(r.target.span());
        let target = r
            .target
            .get_ref()
            .parse::<Target>()
            .and_then(|t| t.resolve_user(users))
            .map_err(|source| ConfigError::Target {
                path: at.path.to_path_buf(),
                line: target_line,
                source,
            })?;
        let step = at.step(line, &format!("adapt rule {name}"), r.limits())?;
        let unsupported = unsupported_fields(&target, &step);
        if !unsupported.is_empty() {
            return Err(at.invalid(
                target_line,
                "target",
                r.target.get_ref(),
                &not_supported_yet(&target, &unsupported),
            ));
        }
        rules.push(AdaptRule {
            name,
            when,
            hold,
            release_after,
            target,
            step,
            mode: at.mode(&r.mode)?,
        });
    }
    Ok(rules)
}

pub(super) fn penalty_rules(
    at: &Source,
    raw: &[Spanned<RawPenaltyRule>],
    users: &dyn UserDb,
) -> Result<Vec<PenaltyRule>, ConfigError> {
    let mut rules: Vec<PenaltyRule> = Vec::new();
    for entry in raw {
        let line = at.line(entry.span());
        let r = entry.get_ref();
        let taken: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
        let name = at.rule_name(&r.name, &taken, "penalty")?;
        let when = at.condition(&r.when, parse_user_condition)?;
        let window = at.duration(&r.window, "window", true)?;
        if window > MAX_WINDOW {
            return Err(at.invalid(
                at.line(r.window.span()),
                "window",
                r.window.get_ref(),
                "expected at most 10m",
            ));
        }
        let (exempt_uids, exempt_gids) = exempt(at, &r.exempt, users)?;
        let forgive_after = r
            .forgive_after
            .as_ref()
            .map(|v| at.duration(v, "forgive_after", false))
            .transpose()?;
        if r.tiers.is_empty() {
            return Err(at.invalid(
                line,
                "tier",
                &name,
                "a penalty needs at least one [[penalty.tier]] with limits and a duration",
            ));
        }
        let mut tiers: Vec<Tier> = Vec::new();
        for (i, tier) in r.tiers.iter().enumerate() {
            let tier_line = at.line(tier.span());
            let t: &RawTier = tier.get_ref();
            let quota = at.step(
                tier_line,
                &format!("penalty {name} tier {}", i + 1),
                t.limits(),
            )?;
            if let Some(previous) = tiers.last() {
                let loose = loosened(&previous.quota, &quota);
                if let Some(field) = loose.first() {
                    return Err(at.invalid(
                        tier_line,
                        field.name(),
                        &quota.text(*field).unwrap_or_else(|| "unset".into()),
                        &format!(
                            "tier {} must be at least as tight as tier {i} ({} {}): tiers only tighten",
                            i + 1,
                            field.name(),
                            previous.quota.text(*field).unwrap_or_default()
                        ),
                    ));
                }
            }
            tiers.push(Tier {
                quota,
                duration: at.duration(&t.duration, "duration", true)?,
            });
        }
        rules.push(PenaltyRule {
            name,
            when,
            window,
            exempt_uids,
            exempt_gids,
            mode: at.mode(&r.mode)?,
            forgive_after,
            tiers,
        });
    }
    Ok(rules)
}

/// `exempt`: user names or UIDs, and `@group` names or GIDs.
fn exempt(
    at: &Source,
    raw: &Spanned<Vec<String>>,
    users: &dyn UserDb,
) -> Result<(Vec<u32>, Vec<u32>), ConfigError> {
    let line = at.line(raw.span());
    let (mut uids, mut gids) = (Vec::new(), Vec::new());
    for entry in raw.get_ref() {
        let unknown = |what: &str| {
            at.invalid(
                line,
                "exempt",
                entry,
                &format!("no such {what} (expected user names or UIDs, and @group names or GIDs)"),
            )
        };
        let lookup_failed = |e: std::io::Error| {
            at.invalid(line, "exempt", entry, &format!("cannot look it up: {e}"))
        };
        if let Some(group) = entry.strip_prefix('@') {
            let gid = match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => users
                    .gid(group)
                    .map_err(lookup_failed)?
                    .ok_or_else(|| unknown("group"))?,
            };
            gids.push(gid);
        } else {
            let uid = match entry.parse::<u32>() {
                Ok(uid) => uid,
                Err(_) => users
                    .uid(entry)
                    .map_err(lookup_failed)?
                    .ok_or_else(|| unknown("user"))?,
            };
            uids.push(uid);
        }
    }
    Ok((uids, gids))
}

#[cfg(test)]
mod tests {
    use crate::{model::error_chain, testing::Users};

    fn parse(text: &str) -> Result<crate::config::Config, String> {
        crate::config::Config::parse(text, std::path::Path::new("t.toml"), &Users)
            .map_err(|e| error_chain(&e))
    }

    const PENALTY: &str = r#"
[[penalty]]
name = "cpu-hog"
when = "cpu > 80%"
window = "5s"
exempt = ["root", "2001", "@rlagent"]
[[penalty.tier]]
cpu = "30%"
duration = "20s"
[[penalty.tier]]
cpu = "10%"
conns = 8
duration = "60s"
"#;

    #[test]
    fn the_issue_shapes_parse() {
        let c = parse(&format!(
            "{PENALTY}\n[[adapt]]\nname = \"busy-host\"\nwhen = \"host.cpu.some_avg10 > 40\"\nfor = \"2s\"\nrelease_after = \"30s\"\ntarget = \"user:*\"\ncpu = \"50%\"\nconn_rate = \"5/s\"\nmode = \"monitor\"\n"
        ))
        .unwrap();
        let p = &c.penalty_rules[0];
        assert_eq!(p.tiers.len(), 2);
        assert_eq!(p.exempt_uids, vec![0, 2001]);
        assert_eq!(p.exempt_gids, vec![990]);
        assert_eq!(p.forgive_after(1), std::time::Duration::from_secs(200));
        let a = &c.adapt_rules[0];
        assert_eq!(a.mode, crate::model::quota::Mode::Monitor);
        assert_eq!(
            a.step.text(crate::model::quota::Field::ConnRate).as_deref(),
            Some("5/s")
        );
    }

    #[test]
    fn bad_rules_name_the_line_the_field_and_the_form() {
        let adapt = |extra: &str, release: &str| {
            format!("[[adapt]]\nname = \"a\"\nwhen = \"host.cpu.some_avg10 > 40\"\nfor = \"10s\"\nrelease_after = \"{release}\"\ntarget = \"user:*\"\n{extra}\n")
        };
        for (text, wanted) in [
            (
                adapt("cpu = \"50%\"", "5s"),
                "line 5: release_after = \"5s\": must be at least `for`",
            ),
            (adapt("", "30s"), "a quota needs at least one field"),
            (adapt("cpu = \"max\"", "30s"), "a step only tightens"),
            (
                adapt("cpu = \"50%\"\nwhen2 = 1", "30s"),
                "unknown field `when2`",
            ),
            (
                adapt("cpu = \"50%\"", "30s")
                    .replace("host.cpu.some_avg10 > 40", "host.cpu.avg > 4"),
                "line 3: when = \"host.cpu.avg > 4\": unknown signal",
            ),
            (
                adapt("conns = 3", "30s").replace("user:*", "cgroup:system.slice"),
                "cannot be set on a cgroup:<path> target",
            ),
            (
                PENALTY.replace("cpu = \"10%\"", "cpu = \"40%\""),
                "line 10: cpu = \"40%\": tier 2 must be at least as tight as tier 1 (cpu 30%)",
            ),
            (
                PENALTY.replace("\"@rlagent\"", "\"@nosuchgroup\""),
                "exempt = \"@nosuchgroup\": no such group",
            ),
            (
                PENALTY.replace("5s", "0"),
                "window = \"0\": expected a duration above 0",
            ),
            (
                PENALTY.replace("20s", "18446744073709551615s"),
                "duration = \"18446744073709551615s\": expected a duration above 0 and at most a year",
            ),
            (
                PENALTY.replace("cpu > 80%", "cpu > 80"),
                "a share of one CPU",
            ),
            (
                PENALTY
                    .split("[[penalty.tier]]")
                    .next()
                    .unwrap()
                    .to_string(),
                "needs at least one [[penalty.tier]]",
            ),
        ] {
            let err = parse(&text).unwrap_err();
            assert!(err.contains(wanted), "{text}\n=> {err}");
            assert!(err.contains("t.toml"), "{err}");
        }
    }
}
