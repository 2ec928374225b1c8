// Why this file is long: one function per family group (target, uid, group, host, agent, program),
// most of it the help text every series carries.
//! Prometheus text for the Stats model: metric families built per scrape from the model,
//! so counters are the kernel's own values, not re-counted here.
//!
//! The text is written directly ([`Exposition`]), the way the prometheus crate's
//! `TextEncoder` writes it (a unit test renders the same samples through both and compares
//! them). Building the crate's protobuf objects first (a `Metric` and its `LabelPair`s per
//! sample, then the encoder's copies) was measured with `perf` at over 40% of a scrape's
//! time in malloc, free and memmove, with 10,000 UIDs.

use std::{collections::HashMap, fmt::Write as _};

use hyper::body::Bytes;

use crate::{
    model::{
        reason::Reason,
        usage::{
            ByReason, CgroupStats, GroupConnStats, HostConnStats, ProgramStats, RateStats,
            UidConnStats,
        },
    },
    observe::stats::{Stats, TargetStats},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// A label: name and value (escaped when written).
type Label<'a> = (&'static str, &'a str);

/// The first sample chunk's size, and the largest: a family's text is kept in chunks that
/// grow to [`MAX_CHUNK`], then follow one another, so a large family is never copied to
/// grow and the response sends the chunks as they are.
const FIRST_CHUNK: usize = 1024;
const MAX_CHUNK: usize = 64 << 10;
/// Room a chunk must have left to take another sample without growing (longer lines,
/// with long label values, make it grow once).
const LINE_ROOM: usize = 256;

/// One metric family: its header and its samples' lines, as they are added.
struct Family {
    name: &'static str,
    help: String,
    kind: Kind,
    samples: Vec<String>,
}

impl Family {
    /// The chunk to write the next sample into.
    fn chunk(&mut self) -> &mut String {
        let full = self
            .samples
            .last()
            .is_none_or(|c| c.capacity() - c.len() < LINE_ROOM);
        if full {
            let written: usize = self.samples.iter().map(String::len).sum();
            let size = written.clamp(FIRST_CHUNK, MAX_CHUNK);
            self.samples.push(String::with_capacity(size));
        }
        self.samples.last_mut().expect("a chunk was just added")
    }
}

/// Metric families in the order they were first added, written as Prometheus text.
#[derive(Default)]
struct Exposition {
    families: Vec<Family>,
    index: HashMap<&'static str, usize>,
}

impl Exposition {
    fn add(&mut self, name: &'static str, help: &str, kind: Kind, labels: &[Label], value: f64) {
        let i = *self.index.entry(name).or_insert_with(|| {
            self.families.push(Family {
                name,
                help: help.to_string(),
                kind,
                samples: Vec::new(),
            });
            self.families.len() - 1
        });
        let out = self.families[i].chunk();
        out.push_str(name);
        for (n, (label, v)) in labels.iter().enumerate() {
            out.push(if n == 0 { '{' } else { ',' });
            out.push_str(label);
            out.push_str("=\"");
            escape_into(out, v, true);
            out.push('"');
        }
        if !labels.is_empty() {
            out.push('}');
        }
        out.push(' ');
        write_value(out, value);
        out.push('\n');
    }

    fn gauge(&mut self, name: &'static str, help: &str, labels: &[Label], value: f64) {
        self.add(name, help, Kind::Gauge, labels, value);
    }

    fn counter(&mut self, name: &'static str, help: &str, labels: &[Label], value: f64) {
        self.add(name, help, Kind::Counter, labels, value);
    }

    /// The text in pieces, in order: each family's `# HELP` and `# TYPE` lines, then its
    /// sample chunks, each handed over as it is (no copy).
    fn into_chunks(self) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(self.families.iter().map(|f| 1 + f.samples.len()).sum());
        for f in self.families {
            let mut header = String::with_capacity(f.help.len() + 2 * f.name.len() + 24);
            if !f.help.is_empty() {
                header.push_str("# HELP ");
                header.push_str(f.name);
                header.push(' ');
                escape_into(&mut header, &f.help, false);
                header.push('\n');
            }
            header.push_str("# TYPE ");
            header.push_str(f.name);
            header.push_str(match f.kind {
                Kind::Counter => " counter\n",
                Kind::Gauge => " gauge\n",
            });
            out.push(Bytes::from(header));
            out.extend(f.samples.into_iter().map(Bytes::from));
        }
        out
    }
}

/// `value` as the prometheus crate writes it (f64's `Display`), with integers (most
/// samples are counts) written without going through float formatting: for an integral
/// value below 2^53 `Display` writes exactly the integer's digits.
fn write_value(out: &mut String, value: f64) {
    const EXACT: f64 = (1u64 << 53) as f64;
    if value.fract() == 0.0 && value.abs() < EXACT && !(value == 0.0 && value.is_sign_negative()) {
        let _ = write!(out, "{}", value as i64);
    } else {
        let _ = write!(out, "{value}");
    }
}

/// `v` escaped as the text format wants: `\` and newline always, `"` in label values.
fn escape_into(out: &mut String, v: &str, quote: bool) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// Prometheus text for `stats`, in pieces to send one after another.
pub fn render(stats: &Stats) -> Vec<Bytes> {
    let mut e = Exposition::default();
    e.gauge(
        "rlagent_build_info",
        "rlagent's version (value is always 1).",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    for t in &stats.targets {
        target_series(&mut e, t);
    }
    let scope = ReasonScope::of(stats);
    for c in &stats.conns {
        uid_series(&mut e, c, &scope);
    }
    for g in &stats.groups {
        group_series(&mut e, g, &scope);
    }
    for ((uid, reason, monitor), count) in &stats.events_received {
        let uid = uid.to_string();
        e.counter(
            "rlagent_connection_events_total",
            "Denial events the agent received from the programs, by UID, reason and mode (each counted; logged one line per UID, reason and mode a second, the rest summed up; the latest kept for rlctl events).",
            &[
                ("uid", &uid),
                ("reason", reason.name()),
                ("mode", if *monitor { "monitor" } else { "enforce" }),
            ],
            *count as f64,
        );
    }
    if let Some(host) = &stats.host {
        host_series(&mut e, host);
    }
    agent_series(&mut e, stats);
    for p in &stats.programs {
        program_series(&mut e, p);
    }
    e.into_chunks()
}

/// A target's cgroup: CPU, memory, pids and pressure.
fn target_series(e: &mut Exposition, t: &TargetStats) {
    let l = [("target", t.target.as_str())];
    let c = &t.cgroup;
    e.gauge(
        "rlagent_processes",
        "Processes in the target's cgroup.",
        &l,
        c.procs as f64,
    );
    cpu_series(e, &l, c);
    memory_series(e, &l, c);
    pids_series(e, &l, c);
    pressure_series(e, &t.target, c);
}

fn cpu_series(e: &mut Exposition, l: &[Label], c: &CgroupStats) {
    if let Some(cpu) = c.cpu {
        e.counter(
            "rlagent_cpu_usage_seconds_total",
            "CPU time used by the target.",
            l,
            cpu.usage_usec as f64 / 1e6,
        );
        e.counter(
            "rlagent_cpu_periods_total",
            "CPU bandwidth periods with runnable tasks.",
            l,
            cpu.nr_periods as f64,
        );
        e.counter(
            "rlagent_cpu_throttled_periods_total",
            "CPU bandwidth periods in which the target was throttled.",
            l,
            cpu.nr_throttled as f64,
        );
        e.counter(
            "rlagent_cpu_throttled_seconds_total",
            "Time the target was throttled by its CPU quota.",
            l,
            cpu.throttled_usec as f64 / 1e6,
        );
    }
    if let Some((quota, period)) = c.cpu_max {
        e.gauge(
            "rlagent_cpu_quota_cores",
            "CPU quota in CPUs (cpu.max quota / period).",
            l,
            quota as f64 / period as f64,
        );
    }
}

fn memory_series(e: &mut Exposition, l: &[Label], c: &CgroupStats) {
    if let Some(m) = c.memory {
        e.gauge(
            "rlagent_memory_current_bytes",
            "Memory charged to the target.",
            l,
            m.current as f64,
        );
        if let Some(peak) = m.peak {
            e.gauge(
                "rlagent_memory_peak_bytes",
                "Highest memory charged to the target.",
                l,
                peak as f64,
            );
        }
        if let Some(max) = m.max {
            e.gauge(
                "rlagent_memory_max_bytes",
                "memory.max of the target.",
                l,
                max as f64,
            );
        }
        if let Some(high) = m.high {
            e.gauge(
                "rlagent_memory_high_bytes",
                "memory.high of the target.",
                l,
                high as f64,
            );
        }
        e.counter(
            "rlagent_memory_oom_kills_total",
            "Processes of the target killed by the OOM killer.",
            l,
            m.events_oom_kill as f64,
        );
        e.counter(
            "rlagent_memory_high_events_total",
            "Times the target was throttled for going over memory.high.",
            l,
            m.events_high as f64,
        );
    }
}

fn pids_series(e: &mut Exposition, l: &[Label], c: &CgroupStats) {
    if let Some(p) = c.pids {
        e.gauge(
            "rlagent_pids_current",
            "Tasks in the target.",
            l,
            p.current as f64,
        );
        if let Some(max) = p.max {
            e.gauge("rlagent_pids_max", "pids.max of the target.", l, max as f64);
        }
        e.counter(
            "rlagent_pids_denied_total",
            "fork/clone calls refused by pids.max.",
            l,
            p.events_max as f64,
        );
    }
}

/// PSI: stall time by resource, `some` and (where the kernel has it) `full`.
fn pressure_series(e: &mut Exposition, target: &str, c: &CgroupStats) {
    for (resource, pressure) in [("cpu", c.cpu_pressure), ("memory", c.memory_pressure)] {
        let Some(p) = pressure else { continue };
        let mut labels = [("target", target), ("resource", resource), ("kind", "some")];
        e.counter(
            "rlagent_pressure_stall_seconds_total",
            "Time tasks of the target stalled on the resource (PSI).",
            &labels,
            p.some_total_usec as f64 / 1e6,
        );
        if let Some(full) = p.full_total_usec {
            labels[2].1 = "full";
            e.counter(
                "rlagent_pressure_stall_seconds_total",
                "Time tasks of the target stalled on the resource (PSI).",
                &labels,
                full as f64 / 1e6,
            );
        }
    }
}

/// A UID's connections: live, cap, rate and the counters by reason.
fn uid_series(e: &mut Exposition, c: &UidConnStats, scope: &ReasonScope) {
    let uid = c.uid.to_string();
    let l = [("uid", uid.as_str())];
    e.gauge(
        "rlagent_connections_live",
        "Live connections of the UID.",
        &l,
        c.live as f64,
    );
    if let Some(cap) = c.cap {
        e.gauge(
            "rlagent_connections_cap",
            "Connection cap of the UID (own or user:* default).",
            &l,
            cap as f64,
        );
    }
    e.counter(
        "rlagent_connections_admitted_total",
        "connect() calls admitted and charged.",
        &l,
        c.admitted as f64,
    );
    if let Some(rate) = c.rate {
        rate_gauges(e, &l, &rate);
    }
    let applies = |reason| scope.applies_to_uid(reason, c);
    reason_counters(
        e,
        &UID_REASONS,
        l[0],
        (&c.denied, &c.would_deny),
        applies,
        scope.monitor,
    );
    e.counter(
        "rlagent_connection_events_dropped_total",
        "Denials (and would-denies) of the UID whose event was not sent: over the per-UID event rate, or the ring buffer was full.",
        &l,
        c.events_dropped as f64,
    );
}

/// A group's connections, as [`uid_series`] for a UID.
fn group_series(e: &mut Exposition, g: &GroupConnStats, scope: &ReasonScope) {
    let l = [("group", g.group.as_str())];
    e.gauge(
        "rlagent_group_connections_live",
        "Live connections of the group's processes together.",
        &l,
        g.live as f64,
    );
    if let Some(cap) = g.cap {
        e.gauge(
            "rlagent_group_connections_cap",
            "Connection cap of the group.",
            &l,
            cap as f64,
        );
    }
    if let Some(rate) = g.rate {
        rate_gauges(e, &l, &rate);
    }
    e.counter(
        "rlagent_group_connections_admitted_total",
        "connect() calls of the group's processes admitted.",
        &l,
        g.admitted as f64,
    );
    let applies = |reason| match reason {
        Reason::Group => g.cap.is_some(),
        Reason::GroupRate => g.rate.is_some(),
        _ => false,
    };
    reason_counters(
        e,
        &GROUP_REASONS,
        l[0],
        (&g.denied, &g.would_deny),
        applies,
        scope.monitor,
    );
}

/// Which per-reason counter series a UID or a group gets. The series of a reason is there
/// when the reason can apply under the current limits, or its count is not 0: so, for a
/// UID or group the agent already lists, it exists at 0 before its first increase, which
/// `increase()` and `rate()` need to see it, without a dozen zero series for every UID.
/// Would-deny series are there while some UID, group or the host cap is in monitor mode,
/// and wherever one has counted.
struct ReasonScope {
    /// Some group has connection limits: the group reasons can apply to any UID.
    groups: bool,
    /// There is a host cap: `host_cap` can apply to any UID.
    host_cap: bool,
    monitor: bool,
}

impl ReasonScope {
    fn of(stats: &Stats) -> Self {
        let host = stats.host.as_ref();
        Self {
            groups: host.is_some_and(|h| h.group_limits)
                || stats
                    .groups
                    .iter()
                    .any(|g| g.cap.is_some() || g.rate.is_some()),
            host_cap: host.is_some_and(|h| h.cap.is_some()),
            monitor: host.is_some_and(|h| h.monitor)
                || stats.conns.iter().any(|c| c.monitor)
                || stats.groups.iter().any(|g| g.monitor),
        }
    }

    /// True when `reason` can deny a connect() of `c`'s UID now.
    fn applies_to_uid(&self, reason: Reason, c: &UidConnStats) -> bool {
        match reason {
            Reason::Cap => c.cap.is_some(),
            Reason::Rate => c.rate.is_some(),
            Reason::Group | Reason::GroupRate => self.groups,
            Reason::HostCap => self.host_cap,
            Reason::Full => true,
        }
    }
}

/// The host's connections and the kernel maps.
fn host_series(e: &mut Exposition, host: &HostConnStats) {
    e.gauge(
        "rlagent_host_connections_live",
        "Live connections of all UIDs.",
        &[],
        host.live as f64,
    );
    e.counter(
        "rlagent_connections_untracked_total",
        "connect() calls let through uncounted (a UID without a cap over its share of the maps, or on_full = allow).",
        &[],
        host.untracked as f64,
    );
    e.counter(
        "rlagent_connection_events_lost_total",
        "Denial events lost because the kernel's ring buffer was full (the agent fell behind).",
        &[],
        host.events_lost as f64,
    );
    e.counter(
        "rlagent_bpf_map_errors_total",
        "Map inserts and deletes the kernel refused to the programs even when tried again (a connect() refused as if a map were full, a void socket record left in the map, or retiring counters left for the next round).",
        &[],
        host.map_errors as f64,
    );
    e.counter(
        "rlagent_connections_denied_full_total",
        "connect() calls of capped UIDs denied because a kernel map was full (on_full = deny).",
        &[],
        host.denied_full as f64,
    );
    for m in &host.maps {
        e.gauge(
            "rlagent_bpf_map_entries",
            "Entries in a kernel map.",
            &[("map", &m.map)],
            m.entries as f64,
        );
        e.gauge(
            "rlagent_bpf_map_capacity",
            "Capacity of a kernel map.",
            &[("map", &m.map)],
            m.capacity as f64,
        );
    }
}

/// The agent's own state: placement, pins, budgets, skipped targets, alerts.
fn agent_series(e: &mut Exposition, stats: &Stats) {
    e.counter(
        "rlagent_placement_moves_total",
        "Processes the agent moved into their target's cgroup.",
        &[],
        stats.placement_moves as f64,
    );
    if let Some(missing) = stats.pins_missing {
        e.gauge(
            "rlagent_pins_missing",
            "Pinned programs and maps of the agent that are gone (a link's pin gone: its program is detached).",
            &[],
            missing as f64,
        );
    }
    for (budget, refused) in &stats.budget_exhausted {
        e.counter(
            "rlagent_budget_exhausted_total",
            "Connections refused because a budget (clients, connections) was exhausted.",
            &[("budget", budget)],
            *refused as f64,
        );
    }
    e.gauge(
        "rlagent_targets_skipped",
        "Quota targets set at runtime whose cgroup is gone, skipped until cleared.",
        &[],
        stats.skipped_targets as f64,
    );
    e.gauge(
        "rlagent_alerts_firing",
        "Alerts of the agent's own engine that are firing.",
        &[],
        stats.alerts_firing as f64,
    );
    for p in &stats.penalties {
        e.gauge(
            "rlagent_penalty_tier",
            "The penalty tier a user is in (mode monitor: would be in; absent: none).",
            &[
                ("target", &p.target),
                ("rule", &p.rule),
                ("mode", if p.monitor { "monitor" } else { "enforce" }),
            ],
            p.tier as f64,
        );
    }
    for c in &stats.penalties_entered {
        let tier = c.tier.to_string();
        e.counter(
            "rlagent_penalties_total",
            "Penalty tiers entered since the agent started (monitor-mode rules included).",
            &[("rule", &c.rule), ("tier", &tier)],
            c.count as f64,
        );
    }
    for (reason, refused) in &stats.webhook_refused {
        e.counter(
            "rlagent_penalty_webhook_refused_total",
            "Requests to the penalty webhook refused, by reason (token, size, json, version, labels, unknown_rule, unknown_tier, target, exempt, apply, method, busy, disabled).",
            &[("reason", reason)],
            *refused as f64,
        );
    }
    for a in &stats.adapt {
        e.gauge(
            "rlagent_adapt_step_active",
            "1 while an adaptive rule's step holds (mode monitor: would hold).",
            &[
                ("rule", &a.rule),
                ("mode", if a.monitor { "monitor" } else { "enforce" }),
            ],
            if a.holding { 1.0 } else { 0.0 },
        );
    }
}

/// One kernel program's run count and time.
fn program_series(e: &mut Exposition, p: &ProgramStats) {
    let l = [("program", p.program.as_str())];
    e.counter(
        "rlagent_bpf_program_runs_total",
        "Runs of the kernel program (with kernel.bpf_stats_enabled).",
        &l,
        p.runs as f64,
    );
    e.counter(
        "rlagent_bpf_program_run_seconds_total",
        "Time spent in the kernel program.",
        &l,
        p.run_seconds,
    );
}

/// The token bucket of a UID or group (labels `l`).
fn rate_gauges(e: &mut Exposition, l: &[Label], rate: &RateStats) {
    e.gauge(
        "rlagent_connection_rate_per_second",
        "Connection rate limit: new connections per second (one token per interval).",
        l,
        1e9 / rate.interval_ns as f64,
    );
    e.gauge(
        "rlagent_connection_rate_burst",
        "Connection rate limit: the bucket size.",
        l,
        rate.burst as f64,
    );
    e.gauge(
        "rlagent_connection_rate_tokens",
        "Connection rate limit: tokens in the bucket now.",
        l,
        rate.tokens as f64,
    );
}

/// The per-reason counter series of a UID or of a group, and the reasons it counts.
struct ReasonSeries {
    denied: &'static str,
    would_deny: &'static str,
    /// The reasons it has a series for.
    counts: fn(Reason) -> bool,
}

const UID_REASONS: ReasonSeries = ReasonSeries {
    denied: "rlagent_connections_denied_total",
    would_deny: "rlagent_connections_would_deny_total",
    counts: |_| true,
};

/// A group counts only its own reasons.
const GROUP_REASONS: ReasonSeries = ReasonSeries {
    denied: "rlagent_group_connections_denied_total",
    would_deny: "rlagent_group_connections_would_deny_total",
    counts: Reason::is_group,
};

/// Denials and would-denies (label `l`, and `reason`), a series per reason `series` counts, where
/// `applies` says the reason can apply or the count is not 0 (see [`ReasonScope`]).
fn reason_counters(
    e: &mut Exposition,
    series: &ReasonSeries,
    l: Label,
    (denied, would): (&ByReason, &ByReason),
    applies: impl Fn(Reason) -> bool,
    monitor: bool,
) {
    for ((reason, d), (_, w)) in denied.iter().into_iter().zip(would.iter()) {
        if !(series.counts)(reason) {
            continue;
        }
        let applies = applies(reason);
        let labels = [l, ("reason", reason.name())];
        if applies || d != 0 {
            e.counter(
                series.denied,
                "connect() calls denied, by reason.",
                &labels,
                d as f64,
            );
        }
        if applies && monitor || w != 0 {
            e.counter(
                series.would_deny,
                "connect() calls a monitor-mode limit let through that enforce mode would deny, by reason.",
                &labels,
                w as f64,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::usage::{CpuStats, HostConnStats, MemoryStats},
        testing::{group_stats, uid_stats},
    };

    /// The pieces as one text.
    fn joined(chunks: Vec<Bytes>) -> String {
        String::from_utf8(chunks.concat()).expect("the text is UTF-8")
    }

    /// A sample as [`Exposition::add`] takes it: name, help, kind, labels, value.
    type Sample<'a> = (
        &'static str,
        &'a str,
        Kind,
        Vec<(&'static str, String)>,
        f64,
    );

    /// The samples through the prometheus crate's objects and `TextEncoder`.
    fn crate_text(samples: &[Sample]) -> String {
        use prometheus::{
            proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
            Encoder, TextEncoder,
        };
        let mut families: Vec<MetricFamily> = Vec::new();
        for (name, help, kind, labels, value) in samples {
            let i = match families.iter().position(|f| f.name() == *name) {
                Some(i) => i,
                None => {
                    let mut family = MetricFamily::default();
                    family.set_name(name.to_string());
                    family.set_help(help.to_string());
                    family.set_field_type(match kind {
                        Kind::Counter => MetricType::COUNTER,
                        Kind::Gauge => MetricType::GAUGE,
                    });
                    families.push(family);
                    families.len() - 1
                }
            };
            let mut metric = Metric::default();
            metric.set_label(
                labels
                    .iter()
                    .map(|(k, v)| {
                        let mut pair = LabelPair::default();
                        pair.set_name(k.to_string());
                        pair.set_value(v.clone());
                        pair
                    })
                    .collect(),
            );
            match kind {
                Kind::Counter => {
                    let mut c = Counter::default();
                    c.set_value(*value);
                    metric.set_counter(c);
                }
                Kind::Gauge => {
                    let mut g = Gauge::default();
                    g.set_value(*value);
                    metric.set_gauge(g);
                }
            }
            families[i].mut_metric().push(metric);
        }
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_text_is_what_the_prometheus_crate_writes_for_the_same_samples() {
        let hostile = "a\\b\"c\nd\re \u{1b}[2J é".to_string();
        let mut samples: Vec<Sample> = vec![
            (
                "rlagent_build_info",
                "Version (value is always 1).",
                Kind::Gauge,
                vec![("version", "0.1.0".into())],
                1.0,
            ),
            (
                "rlagent_x_total",
                "Help with a \\ and a\nnewline and \"quotes\".",
                Kind::Counter,
                vec![("target", hostile.clone()), ("reason", "cap".into())],
                12345678901.0,
            ),
            ("rlagent_y", "", Kind::Gauge, vec![], 0.5),
            (
                "rlagent_x_total",
                "ignored: the first help stays",
                Kind::Counter,
                vec![("target", "".into())],
                0.0,
            ),
            ("rlagent_y", "", Kind::Gauge, vec![], 1e21),
        ];
        // One series per odd value, UIDs 1000, 1001, ...: fractions, infinities, -0,
        // small exponents, negative integers and integers at and past 2^53 (where the
        // integer fast path must stop), NaN.
        let odd = [
            1.0 / 3.0,
            f64::INFINITY,
            -0.0,
            4.5e-7,
            -3.0,
            ((1u64 << 53) - 1) as f64,
            (1u64 << 53) as f64,
            ((1u64 << 53) + 2) as f64,
            u64::MAX as f64,
            -(((1u64 << 53) - 1) as f64),
            f64::NAN,
        ];
        samples.extend(odd.into_iter().enumerate().map(|(i, value)| {
            let uid = (1000 + i).to_string();
            (
                "rlagent_z",
                "Odd values.",
                Kind::Gauge,
                vec![("uid", uid)],
                value,
            )
        }));
        let mut e = Exposition::default();
        for (name, help, kind, labels, value) in &samples {
            let labels: Vec<Label> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            e.add(name, help, *kind, &labels, *value);
        }
        assert_eq!(joined(e.into_chunks()), crate_text(&samples));
    }

    #[test]
    fn renders_the_model_with_types_units_and_labels() {
        let cpu = CpuStats {
            usage_usec: 1_500_000,
            nr_periods: 31,
            nr_throttled: 30,
            throttled_usec: 250_000,
            ..CpuStats::default()
        };
        let memory = MemoryStats {
            current: 1 << 20,
            max: Some(64 << 20),
            events_oom_kill: 1,
            ..MemoryStats::default()
        };
        let mut batch = group_stats("batch", 2, cpu, memory);
        batch.cgroup.cpu_max = Some((50_000, 100_000));
        let stats = Stats {
            targets: vec![batch],
            conns: vec![uid_stats(1000, 3, Some(3), 10, 2)],
            groups: vec![],
            events_received: [((1000, Reason::Cap, false), 2)].into(),
            host: Some(HostConnStats {
                live: 3,
                cap: None,
                untracked: 0,
                denied_full: 0,
                events_lost: 0,
                map_errors: 0,
                maps: vec![],
                monitor: false,
                group_limits: false,
            }),
            placement_moves: 4,
            alerts_firing: 1,
            skipped_targets: 0,
            pins_missing: Some(0),
            budget_exhausted: [("metrics_connections".to_string(), 5)].into(),
            programs: vec![],
            penalties: vec![crate::observe::adapt::Penalty {
                target: "user:1000".into(),
                rule: "cpu-hog".into(),
                tier: 2,
                since: 1,
                until: 2,
                reason: "cpu = 190%".into(),
                monitor: false,
            }],
            penalties_entered: vec![crate::observe::stats::PenaltyCount {
                rule: "cpu-hog".into(),
                tier: 2,
                count: 3,
            }],
            adapt: vec![crate::observe::stats::AdaptState {
                rule: "busy-host".into(),
                holding: true,
                monitor: false,
            }],
            webhook_refused: [("token".to_string(), 2)].into(),
        };
        let build_info = format!(
            "rlagent_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        let text = joined(render(&stats));
        for line in [
            "# TYPE rlagent_cpu_usage_seconds_total counter",
            "rlagent_cpu_usage_seconds_total{target=\"group:batch\"} 1.5",
            "rlagent_cpu_quota_cores{target=\"group:batch\"} 0.5",
            "rlagent_cpu_throttled_periods_total{target=\"group:batch\"} 30",
            "rlagent_memory_max_bytes{target=\"group:batch\"} 67108864",
            "rlagent_memory_oom_kills_total{target=\"group:batch\"} 1",
            "rlagent_connections_live{uid=\"1000\"} 3",
            "rlagent_connections_cap{uid=\"1000\"} 3",
            "rlagent_connections_denied_total{uid=\"1000\",reason=\"cap\"} 2",
            "# TYPE rlagent_host_connections_live gauge",
            &build_info,
            "rlagent_placement_moves_total 4",
            "rlagent_alerts_firing 1",
            "rlagent_penalty_tier{target=\"user:1000\",rule=\"cpu-hog\",mode=\"enforce\"} 2",
            "rlagent_penalties_total{rule=\"cpu-hog\",tier=\"2\"} 3",
            "rlagent_adapt_step_active{rule=\"busy-host\",mode=\"enforce\"} 1",
            "rlagent_penalty_webhook_refused_total{reason=\"token\"} 2",
            "rlagent_pins_missing 0",
            "rlagent_budget_exhausted_total{budget=\"metrics_connections\"} 5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Each family's samples are together, under one TYPE line.
        assert_eq!(
            text.matches("# TYPE rlagent_connections_denied_total")
                .count(),
            1
        );
    }

    fn reason_lines(stats: &Stats, family: &str, uid: u32) -> Vec<String> {
        let prefix = format!("{family}{{uid=\"{uid}\",reason=\"");
        joined(render(stats))
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|l| l.replace("\"} ", " "))
            .collect()
    }

    #[test]
    fn a_reason_has_a_series_where_it_can_apply_or_has_counted() {
        let capped = uid_stats(1000, 1, Some(3), 5, 0);
        let mut uncapped = uid_stats(1001, 1, None, 5, 0);
        // Counted before its cap went: the series stays.
        uncapped.denied.cap = 4;
        let mut stats = Stats {
            conns: vec![capped, uncapped],
            ..Stats::default()
        };
        let denied = "rlagent_connections_denied_total";
        let would = "rlagent_connections_would_deny_total";
        assert_eq!(reason_lines(&stats, denied, 1000), ["cap 0", "full 0"]);
        assert_eq!(reason_lines(&stats, denied, 1001), ["cap 4", "full 0"]);
        assert!(reason_lines(&stats, would, 1000).is_empty());

        // A host cap, a rate, a group with a cap and one with a rate, and a UID in monitor
        // mode: the host cap, rate and group reasons apply, and every UID gets its
        // would-deny series.
        stats.host = Some(HostConnStats {
            live: 2,
            cap: Some(100),
            untracked: 0,
            denied_full: 0,
            events_lost: 0,
            map_errors: 0,
            maps: vec![],
            monitor: false,
            group_limits: false,
        });
        stats.conns[0].rate = Some(RateStats {
            interval_ns: 1_000_000,
            burst: 5,
            tokens: 5,
        });
        stats.conns[1].monitor = true;
        stats.groups = vec![GroupConnStats {
            group: "batch".to_string(),
            live: 0,
            cap: Some(2),
            rate: None,
            monitor: false,
            admitted: 0,
            denied: ByReason::default(),
            would_deny: ByReason::default(),
        }];
        for family in [denied, would] {
            assert_eq!(
                reason_lines(&stats, family, 1000),
                [
                    "cap 0",
                    "host_cap 0",
                    "rate 0",
                    "group 0",
                    "group_rate 0",
                    "full 0"
                ],
                "{family}"
            );
        }
        let text = joined(render(&stats));
        assert!(
            text.lines().any(|l| l
                == "rlagent_group_connections_denied_total{group=\"batch\",reason=\"group\"} 0"),
            "{text}"
        );
        assert!(
            !text.contains("group=\"batch\",reason=\"group_rate\""),
            "{text}"
        );
    }
}
