//! `rlagent-bench idle [--seconds N]`: what the agent costs while nothing happens. Three
//! agents one after the other, each watched for `seconds` (60) after a settling pause:
//! - no targets;
//! - 1,000 groups, each with a connection cap (a cgroup and a kernel policy each);
//! - 10,000 UIDs under a `user:*` cap, each holding a connection.
//!
//! For each it prints the agent's resident memory at the start and the end of the watch
//! and its peak, and the CPU it used over the watch as a share of one CPU. Nothing is
//! scraped or asked of the agent meanwhile: its own loops (alert rules, group refresh,
//! counter retirement, the event reader) are all that runs.

use std::time::{Duration, Instant};

use rlagent_tests::{Agent, Helper, Scratch, TestCgroup};

use super::{assert_all_released, cpu_seconds};

/// [`memory_mib`] once the RSS stopped changing: the agent gives freed memory back after
/// a scrape's connection is done, and at most once a second (then once more a second
/// later), so the RSS must hold still for 1.5 s; or the last reading of 6 s.
pub(crate) fn settled_memory_mib(pid: i32) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut last = memory_mib(pid);
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = memory_mib(pid);
        if now.0 != last.0 {
            since = Instant::now();
        }
        last = now;
        if since.elapsed() >= Duration::from_millis(1500) || Instant::now() > deadline {
            return last;
        }
    }
}

/// `VmRSS` and `VmHWM` of process `pid`, in MiB.
pub(crate) fn memory_mib(pid: i32) -> (f64, f64) {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

/// Watches the agent of `scratch` for `seconds` after a settling pause; prints a row.
fn watch(what: &str, agent: &Agent, seconds: u32) {
    std::thread::sleep(Duration::from_secs(2));
    let pid = agent.pid();
    let (rss0, _) = memory_mib(pid);
    let cpu0 = cpu_seconds(pid);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(u64::from(seconds)));
    let cpu = cpu_seconds(pid) - cpu0;
    let elapsed = start.elapsed().as_secs_f64();
    let (rss1, peak) = memory_mib(pid);
    println!(
        "{what:<40} {rss0:>10.1} {rss1:>10.1} {peak:>10.1} {:>11.2}%",
        100.0 * cpu / elapsed
    );
}

pub fn idle(seconds: u32) {
    println!("the agent idle: {seconds} s watched per case, nothing asked of it meanwhile");
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>12}",
        "case", "RSS MiB", "at end", "peak", "CPU"
    );

    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(&cgroup, "", "");
    let agent = Agent::start(&scratch);
    watch("no targets", &agent, seconds);
    assert_all_released(&scratch, "idle, no targets");
    drop(agent);

    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    let groups: String = (0..1000)
        .map(|i| {
            format!("[[group]]\nname = \"g{i:04}\"\n[[quota]]\ntarget = \"g{i:04}\"\nconns = 100\n")
        })
        .collect();
    scratch.write_config_with_groups(&cgroup, "", &groups);
    let agent = Agent::start(&scratch);
    watch("1,000 groups with a connection cap", &agent, seconds);
    assert_all_released(&scratch, "idle, 1,000 groups");
    drop(agent);

    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    scratch.write_config(
        &cgroup,
        "count_udp = true\n",
        "[[quota]]\ntarget = \"user:*\"\nconns = 100\n",
    );
    let agent = Agent::start(&scratch);
    let mut holder = Helper::spawn(&cgroup.path, 0);
    let uids = 10_000;
    assert_eq!(
        holder.cmd(&format!("multi-uid 100000 {uids} 9")),
        format!("ok {uids}"),
        "every UID holds a connection"
    );
    watch("10,000 UIDs holding a connection each", &agent, seconds);
    drop(holder);
    assert_all_released(&scratch, "idle, 10,000 UIDs");
    drop(agent);
}
