//! `/metrics`: the same [`Stats`] model the control socket serves, rendered as Prometheus
//! text with the prometheus crate (metric families built per scrape from the model, so
//! counters are the kernel's own values, not re-counted here).
//!
//! Names are `rlagent_*` in base units (`_seconds_total`, `_bytes`), label `target` on
//! cgroup series and `uid` on connection series. Per-UID series exist for UIDs the
//! connection maps know (a UID with a cap or a connection since the maps were created),
//! so their number is bounded by the map size (65 536).

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{body::Bytes, Request, Response, StatusCode};
use prometheus::{
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
    Encoder, TextEncoder,
};

use crate::stats::Stats;

/// Metric families in the order they were first added.
#[derive(Default)]
struct Exposition {
    families: Vec<MetricFamily>,
    index: HashMap<&'static str, usize>,
}

impl Exposition {
    fn add(
        &mut self,
        name: &'static str,
        help: &str,
        kind: MetricType,
        labels: &[(&str, String)],
        value: f64,
    ) {
        let i = *self.index.entry(name).or_insert_with(|| {
            let mut family = MetricFamily::default();
            family.set_name(name.to_string());
            family.set_help(help.to_string());
            family.set_field_type(kind);
            self.families.push(family);
            self.families.len() - 1
        });
        let mut metric = Metric::default();
        metric.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut pair = LabelPair::default();
                    pair.set_name((*k).to_string());
                    pair.set_value(v.clone());
                    pair
                })
                .collect(),
        );
        match kind {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(value);
                metric.set_counter(c);
            }
            _ => {
                let mut g = Gauge::default();
                g.set_value(value);
                metric.set_gauge(g);
            }
        }
        self.families[i].mut_metric().push(metric);
    }

    fn gauge(&mut self, name: &'static str, help: &str, labels: &[(&str, String)], value: f64) {
        self.add(name, help, MetricType::GAUGE, labels, value);
    }

    fn counter(&mut self, name: &'static str, help: &str, labels: &[(&str, String)], value: f64) {
        self.add(name, help, MetricType::COUNTER, labels, value);
    }
}

/// Prometheus text for `stats`.
pub fn render(stats: &Stats) -> String {
    let mut e = Exposition::default();
    e.gauge(
        "rlagent_build_info",
        "rlagent's version (value is always 1).",
        &[("version", env!("CARGO_PKG_VERSION").to_string())],
        1.0,
    );
    for t in &stats.targets {
        let l = [("target", t.target.clone())];
        let c = &t.cgroup;
        e.gauge(
            "rlagent_processes",
            "Processes in the target's cgroup.",
            &l,
            c.procs as f64,
        );
        if let Some(cpu) = c.cpu {
            e.counter(
                "rlagent_cpu_usage_seconds_total",
                "CPU time used by the target.",
                &l,
                cpu.usage_usec as f64 / 1e6,
            );
            e.counter(
                "rlagent_cpu_periods_total",
                "CPU bandwidth periods with runnable tasks.",
                &l,
                cpu.nr_periods as f64,
            );
            e.counter(
                "rlagent_cpu_throttled_periods_total",
                "CPU bandwidth periods in which the target was throttled.",
                &l,
                cpu.nr_throttled as f64,
            );
            e.counter(
                "rlagent_cpu_throttled_seconds_total",
                "Time the target was throttled by its CPU quota.",
                &l,
                cpu.throttled_usec as f64 / 1e6,
            );
        }
        if let Some((quota, period)) = c.cpu_max {
            e.gauge(
                "rlagent_cpu_quota_cores",
                "CPU quota in CPUs (cpu.max quota / period).",
                &l,
                quota as f64 / period as f64,
            );
        }
        if let Some(m) = c.memory {
            e.gauge(
                "rlagent_memory_current_bytes",
                "Memory charged to the target.",
                &l,
                m.current as f64,
            );
            if let Some(peak) = m.peak {
                e.gauge(
                    "rlagent_memory_peak_bytes",
                    "Highest memory charged to the target.",
                    &l,
                    peak as f64,
                );
            }
            if let Some(max) = m.max {
                e.gauge(
                    "rlagent_memory_max_bytes",
                    "memory.max of the target.",
                    &l,
                    max as f64,
                );
            }
            if let Some(high) = m.high {
                e.gauge(
                    "rlagent_memory_high_bytes",
                    "memory.high of the target.",
                    &l,
                    high as f64,
                );
            }
            e.counter(
                "rlagent_memory_oom_kills_total",
                "Processes of the target killed by the OOM killer.",
                &l,
                m.events_oom_kill as f64,
            );
            e.counter(
                "rlagent_memory_high_events_total",
                "Times the target was throttled for going over memory.high.",
                &l,
                m.events_high as f64,
            );
        }
        if let Some(p) = c.pids {
            e.gauge(
                "rlagent_pids_current",
                "Tasks in the target.",
                &l,
                p.current as f64,
            );
            if let Some(max) = p.max {
                e.gauge(
                    "rlagent_pids_max",
                    "pids.max of the target.",
                    &l,
                    max as f64,
                );
            }
            e.counter(
                "rlagent_pids_denied_total",
                "fork/clone calls refused by pids.max.",
                &l,
                p.events_max as f64,
            );
        }
        for (resource, pressure) in [("cpu", c.cpu_pressure), ("memory", c.memory_pressure)] {
            let Some(p) = pressure else { continue };
            let mut labels = vec![
                ("target", t.target.clone()),
                ("resource", resource.to_string()),
                ("kind", "some".to_string()),
            ];
            e.counter(
                "rlagent_pressure_stall_seconds_total",
                "Time tasks of the target stalled on the resource (PSI).",
                &labels,
                p.some_total_usec as f64 / 1e6,
            );
            if let Some(full) = p.full_total_usec {
                labels[2].1 = "full".to_string();
                e.counter(
                    "rlagent_pressure_stall_seconds_total",
                    "Time tasks of the target stalled on the resource (PSI).",
                    &labels,
                    full as f64 / 1e6,
                );
            }
        }
    }
    for c in &stats.conns {
        let l = [("uid", c.uid.to_string())];
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
        for (reason, value) in [("cap", c.denied_cap), ("host_cap", c.denied_host)] {
            e.counter(
                "rlagent_connections_denied_total",
                "connect() calls denied, by reason.",
                &[("uid", c.uid.to_string()), ("reason", reason.to_string())],
                value as f64,
            );
        }
    }
    if let Some(host) = &stats.host {
        e.gauge(
            "rlagent_host_connections_live",
            "Live connections of all UIDs.",
            &[],
            host.live as f64,
        );
        e.counter(
            "rlagent_connections_untracked_total",
            "connect() calls let through uncounted because a map was full.",
            &[],
            host.untracked as f64,
        );
    }
    e.counter(
        "rlagent_placement_moves_total",
        "Processes the agent moved into their target's cgroup.",
        &[],
        stats.placement_moves as f64,
    );
    e.gauge(
        "rlagent_alerts_firing",
        "Alerts of the agent's own engine that are firing.",
        &[],
        stats.alerts_firing as f64,
    );
    for p in &stats.programs {
        let l = [("program", p.program.clone())];
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
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&e.families, &mut out)
        .expect("text encoding into a Vec");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// Keeps per-UID series to UIDs that matter: those with a cap, with live connections, or
/// whose counters moved within [`UID_ACTIVITY_WINDOW`]. Idle UIDs drop out, so the
/// number of series follows activity, not history.
#[derive(Default)]
pub struct UidActivity {
    last: HashMap<u32, (u64, std::time::Instant)>,
}

pub const UID_ACTIVITY_WINDOW: Duration = Duration::from_secs(300);

impl UidActivity {
    pub fn retain(&mut self, stats: &mut Stats, now: std::time::Instant) {
        stats.conns.retain(|c| {
            let total = c.admitted + c.denied_cap + c.denied_host;
            let changed_at = match self.last.get(&c.uid) {
                Some((seen, at)) if *seen == total => *at,
                _ => now,
            };
            self.last.insert(c.uid, (total, changed_at));
            c.cap.is_some() || c.live > 0 || now.duration_since(changed_at) < UID_ACTIVITY_WINDOW
        });
    }
}

/// Serves `/metrics` over HTTP/1.1; `collect` builds the stats for each scrape.
pub async fn serve<F>(listener: tokio::net::TcpListener, collect: Arc<F>)
where
    F: Fn() -> Result<Stats, String> + Send + Sync + 'static,
{
    let activity = Arc::new(std::sync::Mutex::new(UidActivity::default()));
    loop {
        let (stream, _peer): (_, SocketAddr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let collect = collect.clone();
        let activity = activity.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let collect = collect.clone();
                let activity = activity.clone();
                async move { Ok::<_, Infallible>(respond(req, collect, activity).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

async fn respond<F>(
    req: Request<hyper::body::Incoming>,
    collect: Arc<F>,
    activity: Arc<std::sync::Mutex<UidActivity>>,
) -> Response<Full<Bytes>>
where
    F: Fn() -> Result<Stats, String> + Send + Sync + 'static,
{
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts")
    };
    match req.uri().path() {
        "/metrics" => match tokio::task::spawn_blocking(move || {
            let mut stats = collect()?;
            activity
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(&mut stats, std::time::Instant::now());
            Ok::<_, String>(stats)
        })
        .await
        {
            Ok(Ok(stats)) => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                render(&stats),
            ),
            Ok(Err(e)) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("collecting stats: {e}\n"),
            ),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        "/" => reply(
            StatusCode::OK,
            "text/plain",
            "rlagent: metrics at /metrics\n".to_string(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; metrics are at /metrics\n".to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cgroup::{cpu::CpuStats, driver::CgroupStats, memory::MemoryStats},
        stats::{HostConnStats, TargetStats, UidConnStats},
    };

    #[test]
    fn renders_the_model_with_types_units_and_labels() {
        let stats = Stats {
            targets: vec![TargetStats {
                target: "group:batch".into(),
                cgroup: CgroupStats {
                    cgroup: "rlagent.slice/batch".into(),
                    procs: 2,
                    cpu: Some(CpuStats {
                        usage_usec: 1_500_000,
                        nr_periods: 31,
                        nr_throttled: 30,
                        throttled_usec: 250_000,
                        ..CpuStats::default()
                    }),
                    cpu_max: Some((50_000, 100_000)),
                    memory: Some(MemoryStats {
                        current: 1 << 20,
                        max: Some(64 << 20),
                        events_oom_kill: 1,
                        ..MemoryStats::default()
                    }),
                    pids: None,
                    cpu_pressure: None,
                    memory_pressure: None,
                },
            }],
            conns: vec![UidConnStats {
                uid: 1000,
                live: 3,
                cap: Some(3),
                admitted: 10,
                denied_cap: 2,
                denied_host: 0,
            }],
            host: Some(HostConnStats {
                live: 3,
                untracked: 0,
            }),
            placement_moves: 4,
            alerts_firing: 1,
            programs: vec![],
        };
        let text = render(&stats);
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
            "rlagent_build_info{version=\"0.1.0\"} 1",
            "rlagent_placement_moves_total 4",
            "rlagent_alerts_firing 1",
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

    fn uid(uid: u32, live: u64, cap: Option<u64>, admitted: u64) -> UidConnStats {
        UidConnStats {
            uid,
            live,
            cap,
            admitted,
            denied_cap: 0,
            denied_host: 0,
        }
    }

    #[test]
    fn idle_uids_drop_out_of_the_per_uid_series() {
        let mut activity = UidActivity::default();
        let start = std::time::Instant::now();
        let scrape =
            |activity: &mut UidActivity, at: std::time::Instant, conns: Vec<UidConnStats>| {
                let mut stats = Stats {
                    targets: vec![],
                    conns,
                    host: None,
                    placement_moves: 0,
                    alerts_firing: 0,
                    programs: vec![],
                };
                activity.retain(&mut stats, at);
                stats.conns.iter().map(|c| c.uid).collect::<Vec<_>>()
            };
        let all = || {
            vec![
                uid(1, 0, None, 5),
                uid(2, 0, Some(4), 5),
                uid(3, 2, None, 5),
            ]
        };
        assert_eq!(
            scrape(&mut activity, start, all()),
            vec![1, 2, 3],
            "new activity is shown"
        );
        let later = start + UID_ACTIVITY_WINDOW + Duration::from_secs(1);
        assert_eq!(
            scrape(&mut activity, later, all()),
            vec![2, 3],
            "idle UID 1 drops out; caps and live stay"
        );
        let mut busy = all();
        busy[0].admitted = 6;
        assert_eq!(
            scrape(&mut activity, later, busy),
            vec![1, 2, 3],
            "it comes back when it connects"
        );
    }
}
