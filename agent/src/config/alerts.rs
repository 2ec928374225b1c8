//! `[alerts]` and `[[alert]]`: the engine's rules, interval and Alertmanager.

use std::{collections::BTreeMap, time::Duration};

use toml::Spanned;

use super::{
    raw::{RawAlertRule, RawAlerts},
    ConfigError, Source,
};
use crate::model::{
    alert::{default_rules, AlertmanagerUrl, Rule},
    duration,
};

pub(super) struct Alerts {
    pub rules: Vec<Rule>,
    pub interval: Duration,
    pub alertmanager: Option<AlertmanagerUrl>,
    pub instance: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// Labels every alert carries already; `[alerts] labels` may not replace them.
const RESERVED_LABELS: [&str; 5] = ["alertname", "target", "severity", "source", "instance"];

/// A Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`, and not `__`-prefixed (reserved).
fn label_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

/// A label value or instance name: 1 to 255 bytes, no control characters.
fn label_value_ok(value: &str) -> bool {
    !value.is_empty() && value.len() <= 255 && !value.chars().any(char::is_control)
}

pub(super) fn validate(
    at: &Source,
    raw: &RawAlerts,
    raw_rules: &[Spanned<RawAlertRule>],
) -> Result<Alerts, ConfigError> {
    let interval = &raw.interval;
    let alert_interval = duration::parse(interval.get_ref())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            at.invalid(
                at.line(interval.span()),
                "interval",
                interval.get_ref(),
                "expected a duration such as 15s or 1m",
            )
        })?;
    let alertmanager = match &raw.alertmanager_url {
        None => None,
        Some(url) => Some(AlertmanagerUrl::parse(url.get_ref()).ok_or_else(|| {
            at.invalid(
                at.line(url.span()),
                "alertmanager_url",
                url.get_ref(),
                "expected http://host:port or http://host:port/prefix",
            )
        })?),
    };
    let instance =
        match &raw.instance {
            None => None,
            Some(v) if label_value_ok(v.get_ref()) => Some(v.get_ref().clone()),
            Some(v) => return Err(at.invalid(
                at.line(v.span()),
                "instance",
                v.get_ref(),
                "expected 1 to 255 characters without control characters (default: the host name)",
            )),
        };
    let labels_line = at.line(raw.labels.span());
    for (name, value) in raw.labels.get_ref() {
        if !label_name_ok(name) || RESERVED_LABELS.contains(&name.as_str()) {
            return Err(at.invalid(
                labels_line,
                "labels",
                name,
                &format!(
                    "expected a label name ([a-zA-Z_][a-zA-Z0-9_]*, not __-prefixed) other than {}",
                    RESERVED_LABELS.join(", ")
                ),
            ));
        }
        if !label_value_ok(value) {
            return Err(at.invalid(
                labels_line,
                "labels",
                value,
                "expected a value of 1 to 255 characters without control characters",
            ));
        }
    }
    let mut rules = if raw.defaults {
        default_rules()
    } else {
        Vec::new()
    };
    add_rules(at, raw_rules, &mut rules, false)?;
    Ok(Alerts {
        rules,
        interval: alert_interval,
        alertmanager,
        instance,
        labels: raw.labels.get_ref().clone(),
    })
}

/// Validates `raw_rules` into `rules`. A name already there is refused, unless `replace`
/// (a drop-in may restate a rule of the main file or a default, by name).
pub(super) fn add_rules(
    at: &Source,
    raw_rules: &[Spanned<RawAlertRule>],
    rules: &mut Vec<Rule>,
    replace: bool,
) -> Result<(), ConfigError> {
    // Rules before this index come from earlier files (or the defaults).
    let mut first_own = rules.len();
    for rule in raw_rules {
        let line = at.line(rule.span());
        let r = rule.get_ref();
        let duration = |field: &'static str, text: &Option<String>, default: u64| match text {
            None => Ok(Duration::from_secs(default)),
            Some(t) => duration::parse(t).ok_or_else(|| {
                at.invalid(line, field, t, "expected a duration such as 30s, 5m or 1h")
            }),
        };
        let existing = rules.iter().position(|existing| existing.name == r.name);
        match existing {
            Some(i) if replace && i < first_own => {
                rules.remove(i);
                first_own -= 1;
            }
            Some(_) => {
                return Err(at.invalid(line, "name", &r.name, "another alert rule has this name"))
            }
            None => {}
        }
        rules.push(Rule {
            name: r.name.clone(),
            stat: r.stat,
            op: r.op,
            threshold: r.threshold,
            for_duration: duration("for", &r.for_duration, 0)?,
            window: duration("window", &r.window, 60)?,
            severity: r.severity.clone(),
            summary: r.summary.clone(),
        });
    }
    Ok(())
}
