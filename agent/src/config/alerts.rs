//! `[alerts]` and `[[alert]]`: the engine's rules, interval and Alertmanager.

use std::time::Duration;

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
    let mut rules = if raw.defaults {
        default_rules()
    } else {
        Vec::new()
    };
    for rule in raw_rules {
        let line = at.line(rule.span());
        let r = rule.get_ref();
        let duration = |field: &'static str, text: &Option<String>, default: u64| match text {
            None => Ok(Duration::from_secs(default)),
            Some(t) => duration::parse(t).ok_or_else(|| {
                at.invalid(line, field, t, "expected a duration such as 30s, 5m or 1h")
            }),
        };
        if rules.iter().any(|existing| existing.name == r.name) {
            return Err(at.invalid(line, "name", &r.name, "another alert rule has this name"));
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
    Ok(Alerts {
        rules,
        interval: alert_interval,
        alertmanager,
    })
}
