//! The control protocol: one JSON object per line each way, each with `"version": 1`.
//!
//! Request:  `{"version":1,"request":"set_quota","target":"agent","quota":{"cpu":"50%"}}`
//! Response: `{"version":1,"ok":true,"result":{...}}` or
//!           `{"version":1,"ok":false,"error":{"code":"invalid","message":"..."}}`
//!
//! Requests and each request's result are typed here, and rlctl decodes the same types
//! the agent encodes.

use std::{collections::BTreeMap, path::PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub use crate::{agent::Status, observe::stats::Stats};
use crate::{
    desired::state::Source,
    model::{
        alert::Alert,
        event::DenialEvent,
        quota::Field,
        reason::Reason,
        usage::{ByReason, GroupConnStats, UidConnStats},
    },
    observe::adapt::{Decision, Penalty},
};

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line accepted; a longer one is refused and the connection closed.
pub const MAX_LINE: usize = 64 * 1024;

/// Variants without fields are written `List {}`: serde checks unknown fields only on
/// struct variants of an internally tagged enum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Sets fields of a target's quota (values in the config's forms).
    SetQuota {
        target: String,
        quota: BTreeMap<Field, String>,
    },
    /// Clears fields of a target's quota (`all` clears every field).
    ClearQuota {
        target: String,
        #[serde(default)]
        fields: Vec<Field>,
        #[serde(default)]
        all: bool,
    },
    /// Every target's quota, field by field, with where each value comes from.
    List {},
    /// Usage and limits, of all targets or one.
    Stats {
        #[serde(default)]
        target: Option<String>,
    },
    Status {},
    /// Alerts of the agent's engine that are pending or firing.
    Alerts {},
    /// The current alerts, then one line per transition until the client disconnects.
    WatchAlerts {},
    /// The last `limit` denial events (of one UID, when `uid` is given), oldest first.
    Events {
        #[serde(default)]
        uid: Option<u32>,
        #[serde(default)]
        limit: Option<usize>,
    },
    /// The last events, then one line per event until the client disconnects.
    WatchEvents {
        #[serde(default)]
        uid: Option<u32>,
    },
    /// Why a user's connections were refused: the last denials by reason, with the limit
    /// that caused them and its value now.
    Why {
        target: String,
    },
    /// Moves processes into a group's cgroup (`rlctl run` moves itself, then execs).
    Move {
        group: String,
        pids: Vec<u32>,
    },
    /// Re-reads the config file (as SIGHUP does).
    Reload {},
    /// The penalised users (a reader: only itself) and the adaptive rules holding.
    Penalties {},
    /// Lifts every penalty of a user (root, or an operator for users from `uid_min` up).
    Release {
        target: String,
    },
}

impl Request {
    /// True for requests that change state (they need root or the control group).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Self::SetQuota { .. }
                | Self::ClearQuota { .. }
                | Self::Move { .. }
                | Self::Reload {}
                | Self::Release { .. }
        )
    }
}

/// Error codes, stable for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, unknown request or field, wrong version.
    BadRequest,
    /// Line over [`MAX_LINE`].
    TooLarge,
    /// A value or target that does not validate.
    Invalid,
    PermissionDenied,
    /// A target or group that does not exist.
    NotFound,
    /// Valid, but applying it failed; the previous state is kept.
    Failed,
    /// The agent is at its client limit, or a watcher fell behind the events.
    Busy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// `set_quota`: the fields set, as given, and those of them that are not in force, with
/// the reason (a missing controller, a cgroup without it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetQuotaResult {
    pub target: String,
    pub set: BTreeMap<Field, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub not_enforced: BTreeMap<Field, String>,
}

/// `clear_quota`: the fields cleared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClearQuotaResult {
    pub target: String,
    pub cleared: Vec<Field>,
}

/// `list`: every target's effective quota, field by field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResult {
    pub targets: Vec<TargetQuota>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetQuota {
    pub target: String,
    pub fields: BTreeMap<Field, FieldValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldValue {
    pub value: String,
    pub source: Source,
    /// Why this limit is not in force, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_enforced: Option<String>,
}

/// `alerts`, and the first line of `watch_alerts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertsResult {
    pub alerts: Vec<Alert>,
}

/// `events`, and the first line of `watch_events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsResult {
    pub events: Vec<DenialEvent>,
}

/// Each later line of `watch_events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLine {
    pub event: DenialEvent,
}

/// `why`: a user's recent denials, reason by reason, with the limits behind them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WhyResult {
    pub target: String,
    /// The UID's limits and counters now (`None`: it never connected since the programs
    /// were first loaded).
    pub counters: Option<UidConnStats>,
    pub reasons: Vec<WhyReason>,
    /// The last events of the UID, oldest first.
    pub events: Vec<DenialEvent>,
    /// The UID's penalties in force (or, in monitor mode, that would be).
    #[serde(default)]
    pub penalties: Vec<Penalty>,
}

/// `penalties`: the penalised users, and the adaptive rules whose condition holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PenaltiesResult {
    pub penalties: Vec<Penalty>,
    /// Empty for a reader.
    #[serde(default)]
    pub adapt: Vec<AdaptHolding>,
}

/// An `[[adapt]]` rule whose step holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdaptHolding {
    pub rule: String,
    pub target: String,
    pub reason: String,
    pub monitor: bool,
}

/// `release`: what was lifted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseResult {
    pub target: String,
    pub lifted: Vec<Decision>,
}

/// One reason a user's connect() calls were refused (or would be, in monitor mode).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WhyReason {
    /// `cap`, `host_cap`, `rate`, `group`, `group_rate` or `full`.
    pub reason: Reason,
    /// Refused (or would-deny) connect() calls by this reason, from the kernel counters.
    pub denied: u64,
    pub would_deny: u64,
    /// Of them, events kept by the agent, and the time of the last (ms since the epoch).
    pub events: usize,
    pub last_ms: Option<u64>,
    /// The limit, where it comes from, and its value now.
    pub limit: String,
    /// The group, for `group` and `group_rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupConnStats>,
}

impl WhyReason {
    /// The counts of `reason` in `denied` and `would`.
    pub fn counts(reason: Reason, denied: &ByReason, would: &ByReason) -> (u64, u64) {
        (denied.get(reason), would.get(reason))
    }
}

/// Each later line of `watch_alerts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    pub event: Alert,
}

/// `move`: where the processes went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveResult {
    pub group: String,
    pub cgroup: PathBuf,
    pub moved: Vec<u32>,
}

/// `reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadResult {
    pub reloaded: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Response {
    pub fn ok(result: &impl Serialize) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            ok: true,
            result: Some(serde_json::to_value(result).expect("results serialize")),
            error: None,
        }
    }

    /// The result of a successful response, as the type the request answers with.
    pub fn result<T: DeserializeOwned>(&self) -> Result<T, String> {
        let value = self.result.clone().unwrap_or_default();
        serde_json::from_value(value).map_err(|e| format!("the agent's answer is not valid: {e}"))
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            ok: false,
            result: None,
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
        }
    }

    /// One line of JSON, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("responses serialize");
        line.push('\n');
        line
    }
}

/// A request as one line of JSON, newline included.
pub fn request_line(request: &Request) -> String {
    let mut value = serde_json::to_value(request).expect("requests serialize");
    value
        .as_object_mut()
        .expect("requests are objects")
        .insert("version".into(), PROTOCOL_VERSION.into());
    let mut line = value.to_string();
    line.push('\n');
    line
}

/// Parses one request line; the error is the response to send.
pub fn parse_request(line: &str) -> Result<Request, Response> {
    let bad = |message: String| Response::error(ErrorCode::BadRequest, message);
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(bad("a request is a JSON object".into()));
    };
    match object.remove("version") {
        Some(v) if v == PROTOCOL_VERSION => {}
        Some(v) => {
            return Err(bad(format!(
                "protocol version {v} is not supported (this agent speaks {PROTOCOL_VERSION})"
            )))
        }
        None => {
            return Err(bad(format!(
                "missing \"version\" (this agent speaks {PROTOCOL_VERSION})"
            )))
        }
    }
    serde_json::from_value(serde_json::Value::Object(object)).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let requests = [
            Request::SetQuota {
                target: "agent".into(),
                quota: BTreeMap::from([
                    (Field::Cpu, "50%".into()),
                    (Field::ConnRate, "20/s".into()),
                ]),
            },
            Request::ClearQuota {
                target: "user:1000".into(),
                fields: vec![Field::Memory],
                all: false,
            },
            Request::List {},
            Request::Stats { target: None },
            Request::Status {},
            Request::Alerts {},
            Request::WatchAlerts {},
            Request::Move {
                group: "batch".into(),
                pids: vec![1, 2],
            },
            Request::Reload {},
        ];
        for r in requests {
            let line = request_line(&r);
            assert!(
                line.ends_with('\n') && line.contains("\"version\":1"),
                "{line}"
            );
            assert_eq!(parse_request(line.trim_end()).unwrap(), r);
        }
        let line = Response::error(ErrorCode::Invalid, "x").to_line();
        let back: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(back.error.unwrap().code, ErrorCode::Invalid);
    }

    #[test]
    fn typed_results_round_trip_through_a_line() {
        let list = ListResult {
            targets: vec![TargetQuota {
                target: "user:1000".into(),
                fields: BTreeMap::from([(
                    Field::Conns,
                    FieldValue {
                        value: "2".into(),
                        source: Source::Runtime,
                        not_enforced: None,
                    },
                )]),
            }],
        };
        let line = Response::ok(&list).to_line();
        assert!(
            line.contains(r#""conns":{"source":"runtime","value":"2"}"#),
            "{line}"
        );
        let back: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(back.result::<ListResult>().unwrap(), list);
        assert!(back.result::<MoveResult>().is_err());
    }

    fn refused(line: &str) -> String {
        let response = parse_request(line).unwrap_err();
        let error = response.error.unwrap();
        assert_eq!(error.code, ErrorCode::BadRequest);
        error.message
    }

    #[test]
    fn malformed_requests_say_what_is_wrong() {
        assert!(refused("{not json").contains("not JSON"));
        assert!(refused("[1,2]").contains("JSON object"));
        assert!(refused(r#"{"request":"list"}"#).contains("missing \"version\""));
        assert!(refused(r#"{"version":2,"request":"list"}"#).contains("version 2 is not supported"));
        assert!(refused(r#"{"version":1,"request":"explode"}"#).contains("explode"));
        assert!(refused(r#"{"version":1,"request":"list","extra":1}"#).contains("extra"));
        assert!(refused(
            r#"{"version":1,"request":"set_quota","target":"a","quota":{"cpus":"5%"}}"#
        )
        .contains("cpus"));
        assert!(
            refused(r#"{"version":1,"request":"move","group":"a","pids":[-1]}"#).contains("-1")
        );
    }
}
