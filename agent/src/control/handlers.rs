// Why this file is long: one function per control request (about 25), each with its access check.
//! One function per request, run on the blocking pool against the [`App`]. Each checks
//! what the caller may do, validates, and answers with the request's typed result.

use std::collections::BTreeMap;

use super::{
    access::{Access, Peer},
    protocol::{
        AdaptHolding, AlertsResult, ClearQuotaResult, ErrorCode, EventsResult, FieldValue,
        ListResult, MoveResult, PenaltiesResult, ReleaseResult, ReloadResult, Request, Response,
        SetQuotaResult, TargetQuota, WhyReason, WhyResult,
    },
};
use crate::{
    agent::{App, AppError, Refusal, Snapshot},
    model::{
        error_chain,
        event::DenialEvent,
        quota::{not_supported_yet, unsupported_fields, Field, Quota},
        reason::Reason,
        target::{Target, UserRef},
        units::rate_text,
        usage::{GroupConnStats, RateStats, UidConnStats},
    },
    observe::events::RECENT_EVENTS,
};

/// Events `rlctl events` shows when no limit is given, and `rlctl why` lists.
pub const DEFAULT_EVENTS: usize = 20;
const WHY_EVENTS: usize = 10;

/// Answers `request` from `peer`, and writes the audit line: every change, accepted or
/// refused, at info level with the peer's UID and PID (target `rlagent::audit`); reads at
/// debug level.
pub fn handle(app: &App, peer: &Peer, access: Access, request: Request) -> Response {
    let writes = request.writes();
    let described = format!("{request:?}");
    let response = answer(app, access, request);
    let outcome = match &response.error {
        None => "accepted".to_string(),
        Some(e) => format!("refused ({:?}): {}", e.code, e.message),
    };
    if writes {
        tracing::info!(target: "rlagent::audit", uid = peer.uid, pid = peer.pid.unwrap_or(0), request = %described, "{outcome}");
    } else {
        tracing::debug!(target: "rlagent::audit", uid = peer.uid, pid = peer.pid.unwrap_or(0), request = %described, "{outcome}");
    }
    response
}

fn answer(app: &App, access: Access, request: Request) -> Response {
    if let (true, Access::Reader { uid }) = (request.writes(), access) {
        return denied(format!(
            "permission denied: changing quotas needs root or the control group (you are uid {uid})"
        ));
    }
    let result = match request {
        Request::SetQuota { target, quota } => set_quota(app, access, &target, quota),
        Request::ClearQuota {
            target,
            fields,
            all,
        } => clear_quota(app, access, &target, fields, all),
        Request::List {} => Ok(list(app, access)),
        Request::Stats { target } => stats(app, access, target.as_deref()),
        Request::Status {} => Ok(Response::ok(&app.status(access.reads_all()))),
        Request::Alerts {} => Ok(alerts(app, access)),
        Request::WatchAlerts {} | Request::WatchEvents { .. } => Ok(Response::error(
            ErrorCode::BadRequest,
            "watch requests are served as a stream",
        )),
        Request::Events { uid, limit } => Ok(match events_uid(access, uid) {
            Ok(uid) => Response::ok(&EventsResult {
                events: app
                    .events()
                    .recent(uid, limit.unwrap_or(DEFAULT_EVENTS).min(RECENT_EVENTS)),
            }),
            Err(refusal) => refusal,
        }),
        Request::Why { target } => why(app, access, &target),
        Request::Move { group, pids } => {
            return match app.move_to_group(&group, &pids, access == Access::Root) {
                Ok(cgroup) => Response::ok(&MoveResult {
                    group,
                    cgroup,
                    moved: pids,
                }),
                // A move changes no quota: no word about the quotas in force.
                Err(e) => refused_with(&e, false),
            };
        }
        Request::Reload {} => app
            .reload()
            .map(|()| Response::ok(&ReloadResult { reloaded: true })),
        Request::Penalties {} => Ok(penalties(app, access)),
        Request::Release { target } => release(app, access, &target),
    };
    result.unwrap_or_else(|e| refused(&e))
}

/// The response for a refused request: the error's whole chain, and what is in force.
pub fn refused(e: &AppError) -> Response {
    refused_with(e, true)
}

fn refused_with(e: &AppError, about_quotas: bool) -> Response {
    let message = error_chain(e);
    match (e.refusal(), e) {
        (Refusal::Invalid, AppError::Config(_)) => Response::error(
            ErrorCode::Invalid,
            format!("reload refused, keeping the running config: {message}"),
        ),
        (Refusal::Invalid, _) => Response::error(ErrorCode::Invalid, message),
        (Refusal::NotFound, _) => Response::error(ErrorCode::NotFound, message),
        (Refusal::Failed, _) if about_quotas => Response::error(
            ErrorCode::Failed,
            format!("{message}; the previous quotas are still in force"),
        ),
        (Refusal::Failed, _) => Response::error(ErrorCode::Failed, message),
    }
}

fn invalid(message: impl Into<String>) -> Response {
    Response::error(ErrorCode::Invalid, message)
}

fn denied(message: impl Into<String>) -> Response {
    Response::error(ErrorCode::PermissionDenied, message)
}

/// `target` resolved, if `access` may change it.
fn changeable(
    app: &App,
    access: Access,
    target: &str,
) -> Result<Result<Target, Response>, AppError> {
    let target = app.resolve_target(target)?;
    let config = &app.snapshot().config;
    Ok(access
        .may_change(&target, config, app.protected_cgroups())
        .map(|()| target)
        .map_err(denied))
}

fn set_quota(
    app: &App,
    access: Access,
    target: &str,
    quota: BTreeMap<Field, String>,
) -> Result<Response, AppError> {
    let target = match changeable(app, access, target)? {
        Ok(target) => target,
        Err(refusal) => return Ok(refusal),
    };
    if quota.is_empty() {
        return Ok(invalid("set_quota needs at least one field"));
    }
    // Each value is validated with the field's own parser first, so the message names
    // the field even before the merge.
    let mut probe = Quota::default();
    for (field, value) in &quota {
        if let Err(e) = probe.set(*field, value) {
            return Ok(invalid(e.to_string()));
        }
    }
    let unsupported = unsupported_fields(&target, &probe);
    if !unsupported.is_empty() {
        return Ok(invalid(not_supported_yet(&target, &unsupported)));
    }
    let fields: BTreeMap<Field, Option<String>> =
        quota.iter().map(|(f, v)| (*f, Some(v.clone()))).collect();
    app.change(&target, &fields)?;
    let snapshot = app.snapshot();
    let not_enforced = quota
        .keys()
        .filter_map(|f| {
            let reason = snapshot.not_enforced.get(&(target.clone(), *f))?;
            Some((*f, reason.to_string()))
        })
        .collect();
    Ok(Response::ok(&SetQuotaResult {
        target: target.to_string(),
        set: quota,
        not_enforced,
    }))
}

fn clear_quota(
    app: &App,
    access: Access,
    target: &str,
    fields: Vec<Field>,
    all: bool,
) -> Result<Response, AppError> {
    let target = match changeable(app, access, target)? {
        Ok(target) => target,
        Err(refusal) => return Ok(refusal),
    };
    let fields: Vec<Field> = if all { Field::ALL.to_vec() } else { fields };
    if fields.is_empty() {
        return Ok(invalid("clear_quota needs fields or \"all\": true"));
    }
    let cleared: BTreeMap<Field, Option<String>> = fields.iter().map(|f| (*f, None)).collect();
    app.change(&target, &cleared)?;
    Ok(Response::ok(&ClearQuotaResult {
        target: target.to_string(),
        cleared: fields,
    }))
}

fn list(app: &App, access: Access) -> Response {
    let snapshot = app.snapshot();
    let desired = &snapshot.desired;
    let targets = desired
        .quotas
        .iter()
        .filter(|(target, _)| access.sees(target))
        .map(|(target, quota)| TargetQuota {
            target: target.to_string(),
            fields: Field::ALL
                .iter()
                .filter_map(|f| {
                    let value = quota.text(*f)?;
                    let source = desired.source(target, *f);
                    let not_enforced = snapshot
                        .not_enforced
                        .get(&(target.clone(), *f))
                        .map(ToString::to_string);
                    Some((
                        *f,
                        FieldValue {
                            value,
                            source,
                            not_enforced,
                        },
                    ))
                })
                .collect(),
        })
        .collect();
    Response::ok(&ListResult { targets })
}

fn stats(app: &App, access: Access, target: Option<&str>) -> Result<Response, AppError> {
    let wanted = target.map(|t| app.resolve_target(t)).transpose()?;
    if let Some(t) = &wanted {
        if !access.sees(t) {
            return Ok(denied(format!(
                "permission denied: you may read only your own stats, not {t}"
            )));
        }
    }
    let mut stats = app.stats()?;
    stats.retain(|name| match &wanted {
        Some(t) => name == t.to_string(),
        None => access.sees_name(name),
    });
    if !access.reads_all() {
        // The host's own numbers are for root and operators.
        stats = crate::observe::stats::Stats {
            targets: stats.targets,
            conns: stats.conns,
            ..Default::default()
        };
    }
    Ok(Response::ok(&stats))
}

/// The UID whose events `access` may read: any (or all) for root and operators, only
/// their own for others (their own when they name none).
pub fn events_uid(access: Access, uid: Option<u32>) -> Result<Option<u32>, Response> {
    match (access, uid) {
        (Access::Reader { uid: own }, Some(asked)) if asked != own => Err(denied(format!(
            "permission denied: you (uid {own}) may read your own events only"
        ))),
        (Access::Reader { uid: own }, _) => Ok(Some(own)),
        (_, uid) => Ok(uid),
    }
}

/// `why user:<u>`: the user's denials by reason, each with the limit behind it now.
fn why(app: &App, access: Access, target: &str) -> Result<Response, AppError> {
    let target = app.resolve_target(target)?;
    let Target::User(UserRef::Uid(uid)) = target else {
        return Ok(invalid(format!(
            "why takes a user:<uid|name> target, not {target}"
        )));
    };
    if !access.sees(&target) {
        return Ok(denied(
            "permission denied: you may ask about your own user only",
        ));
    }
    let stats = app.stats()?;
    let counters = stats.conns.iter().find(|c| c.uid == uid).cloned();
    let events = app.events().recent(Some(uid), RECENT_EVENTS);
    let snapshot = app.snapshot();
    let limits = WhyLimits {
        target: &target,
        snapshot: &snapshot,
        counters: counters.as_ref(),
    };
    let mut reasons = Vec::new();
    for reason in Reason::ALL {
        let (denied, would_deny) = counters.as_ref().map_or((0, 0), |c| {
            WhyReason::counts(reason, &c.denied, &c.would_deny)
        });
        let mine: Vec<&DenialEvent> = events.iter().filter(|e| e.reason == reason).collect();
        if denied + would_deny == 0 && mine.is_empty() {
            continue;
        }
        let group = mine
            .last()
            .and_then(|e| e.group.clone())
            .and_then(|g| stats.groups.iter().find(|s| s.group == g).cloned());
        let limit = limits.text(reason, group.as_ref());
        reasons.push(WhyReason {
            reason,
            denied,
            would_deny,
            events: mine.len(),
            last_ms: mine.last().map(|e| e.time_ms),
            limit,
            group,
        });
    }
    let skip = events.len().saturating_sub(WHY_EVENTS);
    let mut penalties = app.penalties();
    penalties.retain(|p| p.target == target.to_string());
    Ok(Response::ok(&WhyResult {
        target: target.to_string(),
        counters,
        reasons,
        events: events.into_iter().skip(skip).collect(),
        penalties,
    }))
}

/// `penalties`: a reader sees only its own.
fn penalties(app: &App, access: Access) -> Response {
    let mut penalties = app.penalties();
    penalties.retain(|p| access.sees_name(&p.target));
    let adapt = if access.reads_all() {
        let snapshot = app.snapshot();
        app.adapt_holding()
            .into_iter()
            .filter_map(|(rule, reason)| {
                let r = snapshot
                    .config
                    .adapt_rules
                    .iter()
                    .find(|r| r.name == rule)?;
                Some(AdaptHolding {
                    target: r.target.to_string(),
                    monitor: r.mode == crate::model::quota::Mode::Monitor,
                    rule,
                    reason,
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    Response::ok(&PenaltiesResult { penalties, adapt })
}

/// `release`: lifts a user's penalties, if the caller may change that user's quotas.
fn release(app: &App, access: Access, target: &str) -> Result<Response, AppError> {
    let target = app.resolve_target(target)?;
    let Target::User(UserRef::Uid(uid)) = target else {
        return Ok(invalid(format!(
            "release takes a user:<uid|name> target (penalties are per user), not {target}"
        )));
    };
    if let Err(why) = access.may_change(&target, &app.snapshot().config, app.protected_cgroups()) {
        return Ok(denied(why));
    }
    let lifted = app.release_penalty(uid)?;
    if lifted.is_empty() {
        return Ok(Response::error(
            ErrorCode::NotFound,
            format!("{target} has no penalty to lift"),
        ));
    }
    Ok(Response::ok(&ReleaseResult {
        target: target.to_string(),
        lifted,
    }))
}

/// What `why` needs to name the limit behind a reason, as it is now.
struct WhyLimits<'a> {
    target: &'a Target,
    snapshot: &'a Snapshot,
    counters: Option<&'a UidConnStats>,
}

impl WhyLimits<'_> {
    /// Where the UID's `field` comes from: its own quota or the `user:*` default.
    fn source(&self, field: Field) -> String {
        let own = self.snapshot.desired.quotas.get(self.target);
        if own.is_some_and(|q| q.text(field).is_some()) {
            format!("{field} of {}", self.target)
        } else {
            format!(
                "{field} of user:* (the default from uid {} up)",
                self.snapshot.desired.conns.uid_min
            )
        }
    }

    /// The limit behind `reason`, with its value now; `group` is the group of the last
    /// event of that reason.
    fn text(&self, reason: Reason, group: Option<&GroupConnStats>) -> String {
        let counters = self.counters;
        match (reason, group) {
            (Reason::Cap, _) => format!(
                "{} = {} ({} live now)",
                self.source(Field::Conns),
                counters
                    .and_then(|c| c.cap)
                    .map_or("none now".to_string(), |c| c.to_string()),
                counters.map_or(0, |c| c.live)
            ),
            (Reason::Rate, _) => format!(
                "{} = {}",
                self.source(Field::ConnRate),
                bucket_text(counters.and_then(|c| c.rate.as_ref()))
            ),
            (Reason::HostCap, _) => format!(
                "[bpf] host_conns = {}",
                crate::agent::cap_text(self.snapshot.desired.conns.host_cap)
            ),
            (Reason::Group, Some(g)) => format!(
                "conns of group:{} = {} ({} live now)",
                g.group,
                g.cap.map_or("none now".to_string(), |c| c.to_string()),
                g.live
            ),
            (Reason::GroupRate, Some(g)) => format!(
                "conn_rate of group:{} = {}",
                g.group,
                bucket_text(g.rate.as_ref())
            ),
            (Reason::Group | Reason::GroupRate, None) => {
                "a group's limit (the group has no limits now)".to_string()
            }
            (Reason::Full, _) => {
                "a kernel map was full ([bpf] on_full = \"deny\"; see rlagent_bpf_map_entries)"
                    .to_string()
            }
        }
    }
}

/// A token bucket in words: `5/s, burst 3, 2 tokens left now`.
fn bucket_text(rate: Option<&RateStats>) -> String {
    match rate {
        None => "none now".to_string(),
        Some(r) => format!(
            "{}, burst {}, {} tokens left now",
            rate_text(r.interval_ns),
            r.burst,
            r.tokens
        ),
    }
}

fn alerts(app: &App, access: Access) -> Response {
    let alerts = app
        .alerts()
        .into_iter()
        .filter(|a| access.sees_name(&a.target))
        .collect();
    Response::ok(&AlertsResult { alerts })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{control::protocol::ErrorBody, testing::FakeAgent};

    const ROOT: Access = Access::Root;
    const OPERATOR: Access = Access::Operator;
    const USER: Access = Access::Reader { uid: 2000 };

    fn error(response: &Response) -> &ErrorBody {
        response.error.as_ref().expect("a refusal")
    }

    fn set(target: &str, field: Field, value: &str) -> Request {
        Request::SetQuota {
            target: target.into(),
            quota: BTreeMap::from([(field, value.to_string())]),
        }
    }

    #[test]
    fn set_quota_applies_and_answers_with_what_was_set() {
        let fake = FakeAgent::new();
        let app = fake.app("");
        let r = answer(&app, ROOT, set("user:alice", Field::Conns, "2"));
        let result: SetQuotaResult = r.result().unwrap();
        assert_eq!(result.target, "user:1001", "names resolve to UIDs");
        assert_eq!(
            fake.kernel.record().conns.last().unwrap().per_uid[&1001].cap,
            2
        );
        let list: ListResult = answer(&app, ROOT, Request::List {}).result().unwrap();
        assert_eq!(list.targets[0].fields[&Field::Conns].value, "2");
        assert_eq!(
            list.targets[0].fields[&Field::Conns].source,
            crate::desired::state::Source::Runtime
        );
    }

    #[test]
    fn refusals_name_the_problem_and_change_nothing() {
        let fake = FakeAgent::new();
        let app = fake.app("[[quota]]\ntarget = \"batch\"\ncpu = \"50%\"\n");
        let writes = fake.kernel.record().conns.len();
        let cases = [
            (
                set("user:1001", Field::Conns, "lots"),
                ErrorCode::Invalid,
                "conns \"lots\"",
            ),
            (
                set("user:nobody-here", Field::Conns, "1"),
                ErrorCode::Invalid,
                "unknown user",
            ),
            (
                set("a/b", Field::Cpu, "5%"),
                ErrorCode::Invalid,
                "invalid target",
            ),
            (
                Request::Move {
                    group: "nope".into(),
                    pids: vec![1],
                },
                ErrorCode::NotFound,
                "no group named \"nope\"",
            ),
            (
                Request::ClearQuota {
                    target: "batch".into(),
                    fields: vec![],
                    all: false,
                },
                ErrorCode::Invalid,
                "needs fields",
            ),
        ];
        for (request, code, text) in cases {
            let r = answer(&app, ROOT, request.clone());
            assert_eq!(error(&r).code, code, "{request:?}: {r:?}");
            assert!(error(&r).message.contains(text), "{request:?}: {r:?}");
        }
        // memory_high above memory: set memory first, then the conflicting high.
        answer(&app, ROOT, set("batch", Field::Memory, "1G"));
        let r = answer(&app, ROOT, set("batch", Field::MemoryHigh, "2G"));
        assert_eq!(error(&r).code, ErrorCode::Invalid);
        assert!(error(&r).message.contains("above memory 1G"), "{r:?}");
        assert_eq!(
            fake.kernel.record().conns.len(),
            writes + 1,
            "only the valid change"
        );
    }

    fn event(uid: u32, reason: Reason) -> DenialEvent {
        DenialEvent {
            seq: 0,
            time_ms: 1,
            uid,
            pid: 7,
            comm: "curl".into(),
            group: None,
            reason,
            monitor: false,
            limit: 2,
            destination: "127.0.0.1:80".into(),
            errno: 1,
        }
    }

    #[test]
    fn users_read_their_own_events_and_why_only() {
        let fake = FakeAgent::new();
        let app = fake.app("[[quota]]\ntarget = \"user:2000\"\nconns = 2\n");
        app.events().record(event(2000, Reason::Cap));
        app.events().record(event(2001, Reason::Rate));
        let events = |access, uid| answer(&app, access, Request::Events { uid, limit: None });
        let all: EventsResult = events(ROOT, None).result().unwrap();
        assert_eq!(all.events.len(), 2);
        let mine: EventsResult = events(USER, None).result().unwrap();
        let seen: Vec<(u64, u32)> = mine.events.iter().map(|e| (e.seq, e.uid)).collect();
        assert_eq!(
            seen,
            vec![(1, 2000)],
            "a user sees their own only, numbered"
        );
        assert_eq!(
            error(&events(USER, Some(2001))).code,
            ErrorCode::PermissionDenied
        );
        let why = |access, target: &str| {
            answer(
                &app,
                access,
                Request::Why {
                    target: target.into(),
                },
            )
        };
        let r: WhyResult = why(USER, "user:2000").result().unwrap();
        assert_eq!(r.reasons.len(), 1);
        assert_eq!(r.reasons[0].reason, Reason::Cap);
        assert_eq!(r.reasons[0].events, 1);
        assert!(
            r.reasons[0].limit.starts_with("conns of user:2000 = "),
            "{:?}",
            r.reasons
        );
        assert_eq!(
            error(&why(USER, "user:2001")).code,
            ErrorCode::PermissionDenied
        );
        assert_eq!(error(&why(ROOT, "batch")).code, ErrorCode::Invalid);
    }

    #[test]
    fn a_failed_apply_says_the_previous_quotas_stay() {
        let fake = FakeAgent::new();
        let app = fake.app("[[quota]]\ntarget = \"batch\"\ncpu = \"50%\"\n");
        fake.kernel.record().fail_cgroups = vec![true];
        let r = answer(&app, ROOT, set("batch", Field::Cpu, "20%"));
        assert_eq!(error(&r).code, ErrorCode::Failed);
        assert!(
            error(&r).message.contains("/fake/cpu.max")
                && error(&r).message.contains("Permission denied")
                && error(&r)
                    .message
                    .ends_with("the previous quotas are still in force"),
            "the whole cause, once: {r:?}"
        );
        assert_eq!(error(&r).message.matches("Permission denied").count(), 1);
    }

    #[test]
    fn readers_may_read_only_their_own() {
        let fake = FakeAgent::new();
        let app = fake.app("[[quota]]\ntarget = \"user:2000\"\nconns = 1\n[[quota]]\ntarget = \"user:3000\"\nconns = 1\n");
        let r = answer(&app, USER, set("user:2000", Field::Conns, "9"));
        assert_eq!(error(&r).code, ErrorCode::PermissionDenied);
        let r = answer(&app, USER, Request::Reload {});
        assert_eq!(error(&r).code, ErrorCode::PermissionDenied);
        let r = answer(
            &app,
            USER,
            Request::Stats {
                target: Some("user:3000".into()),
            },
        );
        assert_eq!(error(&r).code, ErrorCode::PermissionDenied);
        let list: ListResult = answer(&app, USER, Request::List {}).result().unwrap();
        let targets: Vec<&str> = list.targets.iter().map(|t| t.target.as_str()).collect();
        assert_eq!(targets, ["user:2000"]);
        let list: ListResult = answer(&app, ROOT, Request::List {}).result().unwrap();
        assert_eq!(list.targets.len(), 2);
    }

    #[test]
    fn reload_applies_the_file_or_refuses_it_whole() {
        let fake = FakeAgent::new();
        let app = fake.app("");
        fake.write_config("[[quota]]\ntarget = \"user:*\"\nconns = 7\n");
        let r = answer(&app, ROOT, Request::Reload {});
        assert!(r.result::<ReloadResult>().unwrap().reloaded);
        assert_eq!(app.snapshot().desired.conns.default_policy.cap, 7);
        fake.write_config("[[quota]]\ntarget = \"user:*\"\nconns = \"many\"\n");
        let r = answer(&app, ROOT, Request::Reload {});
        assert_eq!(error(&r).code, ErrorCode::Invalid);
        assert!(error(&r)
            .message
            .starts_with("reload refused, keeping the running config"));
        assert_eq!(app.snapshot().desired.conns.default_policy.cap, 7);
    }

    #[test]
    fn status_and_moves_answer_typed() {
        let fake = FakeAgent::new();
        let app = fake.app("[[group]]\nname = \"batch\"\n");
        let status: crate::agent::Status = answer(&app, ROOT, Request::Status {}).result().unwrap();
        assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(status.host.unwrap().cgroup_controllers, ["cpu", "memory"]);
        let theirs: crate::agent::Status = answer(&app, USER, Request::Status {}).result().unwrap();
        assert_eq!(theirs.host, None, "users do not see the host's layout");
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let moved: MoveResult = answer(
            &app,
            ROOT,
            Request::Move {
                group: "batch".into(),
                pids: vec![child.id()],
            },
        )
        .result()
        .unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(moved.cgroup, std::path::Path::new("rlagent.slice/batch"));
        assert_eq!(
            fake.kernel.record().moved,
            [(moved.cgroup.clone(), vec![child.id()])]
        );
        let alerts: AlertsResult = answer(&app, USER, Request::Alerts {}).result().unwrap();
        assert!(alerts.alerts.is_empty());
    }

    #[test]
    fn operators_are_held_to_their_role() {
        let fake = FakeAgent::new();
        let app = fake.app("[[group]]\nname = \"batch\"\n[control]\noperator_cgroups = [\"system.slice/web.service\"]\n");
        let ok = |r: Response| assert!(r.ok, "{r:?}");
        ok(answer(&app, OPERATOR, set("user:2000", Field::Conns, "3")));
        ok(answer(&app, OPERATOR, set("batch", Field::Pids, "100")));
        for (request, why) in [
            (set("user:0", Field::Pids, "1"), "system user"),
            (set("user:root", Field::Cpu, "1%"), "system user"),
            (
                set("cgroup:system.slice/db.service", Field::Memory, "4096"),
                "operator_cgroups",
            ),
            (
                set("cgroup:rlagent.slice/batch", Field::Pids, "1"),
                "agent's subtree",
            ),
        ] {
            let r = answer(&app, OPERATOR, request.clone());
            assert_eq!(error(&r).code, ErrorCode::PermissionDenied, "{request:?}");
            assert!(error(&r).message.contains(why), "{request:?}: {r:?}");
        }
        // The agent's own cgroup and PID 1's are protected whatever the allow-list says:
        // here the agent runs in system.slice/rlagent.service, which the allow-list covers.
        let placed_fake = FakeAgent::new();
        let placed = placed_fake.app_in(
            "[control]\noperator_cgroups = [\"system.slice\", \"init.scope\"]\n",
            &["system.slice/rlagent.service", "init.scope"],
        );
        ok(answer(
            &placed,
            OPERATOR,
            set("cgroup:system.slice/web.service", Field::Pids, "100"),
        ));
        for target in [
            "cgroup:system.slice/rlagent.service",
            "cgroup:system.slice",
            "cgroup:init.scope",
        ] {
            let r = answer(&placed, OPERATOR, set(target, Field::Pids, "1"));
            assert_eq!(
                error(&r).code,
                ErrorCode::PermissionDenied,
                "{target}: {r:?}"
            );
            assert!(
                error(&r).message.contains("which the agent needs"),
                "{target}: {r:?}"
            );
        }
        let move_pids = |access, pids: Vec<u32>| {
            answer(
                &app,
                access,
                Request::Move {
                    group: "batch".into(),
                    pids,
                },
            )
        };
        for pid in [1, std::process::id()] {
            let r = move_pids(ROOT, vec![pid]);
            assert_eq!(error(&r).code, ErrorCode::Invalid, "{r:?}");
            assert!(error(&r).message.contains("stay where they are"), "{r:?}");
        }
        let kthreadd = move_pids(ROOT, vec![2]);
        assert!(
            error(&kthreadd).message.contains("stay where they are"),
            "{kthreadd:?}"
        );
        // A process of a system UID: root may move it, an operator may not.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        if nix::unistd::getuid().as_raw() < 1000 {
            let r = move_pids(OPERATOR, vec![child.id()]);
            assert!(error(&r).message.contains("below uid_min"), "{r:?}");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(fake.kernel.record().moved.is_empty());
    }
}
