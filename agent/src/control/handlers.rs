//! One function per request, run on the blocking pool against the [`App`]. Each checks
//! what the caller may do, validates, and answers with the request's typed result.

use std::collections::BTreeMap;

use super::{
    access::Access,
    protocol::{
        AlertsResult, ClearQuotaResult, ErrorCode, FieldValue, ListResult, MoveResult,
        ReloadResult, Request, Response, SetQuotaResult, TargetQuota,
    },
};
use crate::{
    agent::{App, AppError, Refusal},
    model::{
        error_chain,
        quota::{Field, Quota},
        target::{Target, UserRef},
    },
};

pub fn handle(app: &App, access: Access, request: Request) -> Response {
    if let (true, Access::Reader { uid }) = (request.writes(), access) {
        return Response::error(
            ErrorCode::PermissionDenied,
            format!("permission denied: changing quotas needs root or the admin group (you are uid {uid})"),
        );
    }
    let result = match request {
        Request::SetQuota { target, quota } => set_quota(app, &target, quota),
        Request::ClearQuota {
            target,
            fields,
            all,
        } => clear_quota(app, &target, fields, all),
        Request::List {} => Ok(list(app, access)),
        Request::Stats { target } => stats(app, access, target.as_deref()),
        Request::Status {} => Ok(Response::ok(&app.status())),
        Request::Alerts {} => Ok(alerts(app, access)),
        Request::WatchAlerts {} => Ok(Response::error(
            ErrorCode::BadRequest,
            "watch_alerts is served as a stream",
        )),
        Request::Move { group, pids } => app.move_to_group(&group, &pids).map(|cgroup| {
            Response::ok(&MoveResult {
                group,
                cgroup,
                moved: pids,
            })
        }),
        Request::Reload {} => app
            .reload()
            .map(|()| Response::ok(&ReloadResult { reloaded: true })),
    };
    result.unwrap_or_else(|e| refused(&e))
}

/// The response for a refused request: the error's whole chain, and what is in force.
pub fn refused(e: &AppError) -> Response {
    let message = error_chain(e);
    match (e.refusal(), e) {
        (Refusal::Invalid, AppError::Config(_)) => Response::error(
            ErrorCode::Invalid,
            format!("reload refused, keeping the running config: {message}"),
        ),
        (Refusal::Invalid, _) => Response::error(ErrorCode::Invalid, message),
        (Refusal::NotFound, _) => Response::error(ErrorCode::NotFound, message),
        (Refusal::Failed, _) => Response::error(
            ErrorCode::Failed,
            format!("{message}; the previous quotas are still in force"),
        ),
    }
}

fn invalid(message: impl Into<String>) -> Response {
    Response::error(ErrorCode::Invalid, message)
}

fn set_quota(
    app: &App,
    target: &str,
    quota: BTreeMap<Field, String>,
) -> Result<Response, AppError> {
    let target = app.resolve_target(target)?;
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
    let fields: BTreeMap<Field, Option<String>> =
        quota.iter().map(|(f, v)| (*f, Some(v.clone()))).collect();
    app.change(&target, &fields)?;
    Ok(Response::ok(&SetQuotaResult {
        target: target.to_string(),
        set: quota,
    }))
}

fn clear_quota(
    app: &App,
    target: &str,
    fields: Vec<Field>,
    all: bool,
) -> Result<Response, AppError> {
    let target = app.resolve_target(target)?;
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
        .filter(|(target, _)| visible(access, target))
        .map(|(target, quota)| TargetQuota {
            target: target.to_string(),
            fields: Field::ALL
                .iter()
                .filter_map(|f| {
                    let value = quota.text(*f)?;
                    let source = desired.source(target, *f);
                    Some((*f, FieldValue { value, source }))
                })
                .collect(),
        })
        .collect();
    Response::ok(&ListResult { targets })
}

fn stats(app: &App, access: Access, target: Option<&str>) -> Result<Response, AppError> {
    let wanted = target.map(|t| app.resolve_target(t)).transpose()?;
    if let Some(t) = &wanted {
        if !visible(access, t) {
            return Ok(Response::error(
                ErrorCode::PermissionDenied,
                format!("permission denied: you may read only your own stats, not {t}"),
            ));
        }
    }
    let mut stats = app.stats()?;
    stats.retain(|name| match (&wanted, access) {
        (Some(t), _) => name == t.to_string(),
        (None, Access::Admin) => true,
        (None, Access::Reader { uid }) => name == format!("user:{uid}"),
    });
    Ok(Response::ok(&stats))
}

fn alerts(app: &App, access: Access) -> Response {
    let alerts = app
        .alerts()
        .into_iter()
        .filter(|a| match access {
            Access::Admin => true,
            Access::Reader { uid } => a.target == format!("user:{uid}"),
        })
        .collect();
    Response::ok(&AlertsResult { alerts })
}

/// A reader sees only its own user target.
fn visible(access: Access, target: &Target) -> bool {
    match access {
        Access::Admin => true,
        Access::Reader { uid } => *target == Target::User(UserRef::Uid(uid)),
    }
}
