// Why this file is long: six arms with their namespaces and rules, the paired schedule, the
// statistics (medians and ratios with bootstrap intervals) and the checks of what was measured.
//! `rlagent-bench compare`: what a TCP connect()+close() costs under rlagent and under
//! netfilter's per-UID connection limits, side by side in one run.
//!
//! Every arm runs in a network namespace of its own that the benchmark creates and removes
//! (loopback only: the host's namespace and its rules are never touched), with listeners
//! there and `conn-helper` processes entered into it:
//! - no rules: nothing in the path (the baseline of each block);
//! - rlagent, a cap only; rlagent, the full policy (a cap, a rate, a group cap and a group
//!   rate): the agent's programs on the helper's cgroup;
//! - iptables `owner` + `connlimit`; nft `meta skuid` + `ct count`; nft, a dynamic set
//!   keyed by UID with `ct count`: one rule of each kind on the namespace's output path.
//!
//! Every limit is far above what is reached, so every connect() runs every check and is
//! admitted. Blocks visit the arms in an order rotated by one each block and reversed
//! every other block. A block gives each arm's time per connect()+close() minus the
//! no-rules arm's in the same block; the report gives the median of these differences
//! with a 95% interval (bootstrap over blocks), the ratios to rlagent's arms, and the load
//! average. The same is run with no connection held and with `--live N` connections held
//! open by the UID in each arm (see [`Arm`]). At the end every held connection is closed
//! and the agent must count 0 live for both UIDs.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use nix::{
    sched::{setns, CloneFlags},
    sys::resource::{getrlimit, Resource},
};
use rlagent_tests::{Agent, Helper, Listener, Scratch, TestCgroup};

use super::{assert_all_released, median, policy_sides, BENCH_UID, POLICY_UID};

/// Far above what any arm reaches.
const LIMIT: u32 = 1_000_000;

/// A network namespace made with `ip netns add`, its loopback up; removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: String) -> Self {
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `program args` inside the namespace, with `stdin` as its input.
    fn exec(&self, program: &str, args: &[&str], stdin: &str) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("ip netns exec {program}: {e}"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "{program} {args:?} in {}: {status}\n{stdin}",
            self.name
        );
    }

    /// `make()`, run on a thread that entered the namespace, so the sockets it opens are
    /// the namespace's.
    fn within<T: Send + 'static>(&self, make: impl FnOnce() -> T + Send + 'static) -> T {
        let file = std::fs::File::open(self.path()).expect("opening the namespace");
        std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
            make()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("running ip");
    assert!(status.success(), "ip {args:?}: {status}");
}

/// What an arm puts in the connect path.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    NoRules,
    RlagentCap,
    RlagentFull,
    IptablesConnlimit,
    NftCtCount,
    NftUidSet,
}

impl Kind {
    const ALL: [Self; 6] = [
        Self::NoRules,
        Self::RlagentCap,
        Self::RlagentFull,
        Self::IptablesConnlimit,
        Self::NftCtCount,
        Self::NftUidSet,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::NoRules => "no rules",
            Self::RlagentCap => "rlagent cap only",
            Self::RlagentFull => "rlagent cap+rate+group",
            Self::IptablesConnlimit => "iptables owner+connlimit",
            Self::NftCtCount => "nft skuid ct count",
            Self::NftUidSet => "nft per-UID set",
        }
    }

    fn netfilter(self) -> bool {
        matches!(
            self,
            Self::IptablesConnlimit | Self::NftCtCount | Self::NftUidSet
        )
    }

    /// The netfilter rules of this arm, installed in `ns`, matching `uid`.
    fn install(self, ns: &Netns, uid: u32) {
        match self {
            Self::NoRules | Self::RlagentCap | Self::RlagentFull => {}
            Self::IptablesConnlimit => ns.exec(
                "iptables",
                &[
                    "-A",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "--syn",
                    "-m",
                    "owner",
                    "--uid-owner",
                    &uid.to_string(),
                    "-m",
                    "connlimit",
                    "--connlimit-above",
                    &LIMIT.to_string(),
                    "--connlimit-mask",
                    "0",
                    "-j",
                    "REJECT",
                    "--reject-with",
                    "tcp-reset",
                ],
                "",
            ),
            Self::NftCtCount => ns.exec(
                "nft",
                &["-f", "-"],
                &format!(
                    "table inet rlbench {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n  meta l4proto tcp meta skuid {uid} ct state new ct count over {LIMIT} reject with tcp reset\n }}\n}}\n"
                ),
            ),
            Self::NftUidSet => ns.exec(
                "nft",
                &["-f", "-"],
                &format!(
                    "table inet rlbench {{\n set users {{\n  typeof meta skuid\n  size 65535\n  flags dynamic\n }}\n chain out {{\n  type filter hook output priority 0; policy accept;\n  meta l4proto tcp ct state new add @users {{ meta skuid ct count over {LIMIT} }} reject with tcp reset\n }}\n}}\n"
                ),
            ),
        }
    }
}

/// One arm: its namespace, a listener there that closes what it accepts, a helper that
/// times connect()+close() and one that holds connections open. A held connection is
/// connected and open on the client's side, its peer closed (CLOSE_WAIT): it is live
/// for rlagent and counted by conntrack, and the listeners hold no file for it.
struct Arm {
    kind: Kind,
    timer: Helper,
    holder: Helper,
    // Dropped last: the helpers and the listener leave the namespace before it goes.
    listener: Listener,
    ns: Netns,
}

/// The 95% interval of `stat` over 2,000 resamplings of `blocks` blocks (indices drawn
/// with replacement, with `seed`).
fn bootstrap(blocks: usize, seed: u64, mut stat: impl FnMut(&[usize]) -> f64) -> (f64, f64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut stats: Vec<f64> = (0..2000)
        .map(|_| {
            let picks: Vec<usize> = (0..blocks).map(|_| rng.usize(..blocks)).collect();
            stat(&picks)
        })
        .collect();
    stats.sort_by(f64::total_cmp);
    let at = |p: f64| stats[((stats.len() - 1) as f64 * p).round() as usize];
    (at(0.025), at(0.975))
}

/// The values of `values` at `picks`.
fn picked(values: &[f64], picks: &[usize]) -> Vec<f64> {
    picks.iter().map(|&i| values[i]).collect()
}

/// Median and 95% interval of the median, by resampling the blocks.
fn median_ci(values: &[f64]) -> (f64, f64, f64) {
    let m = median(&mut values.to_vec());
    let (lo, hi) = bootstrap(values.len(), 0x726c_6167, |picks| {
        median(&mut picked(values, picks))
    });
    (m, lo, hi)
}

/// The ratio of the medians of `num` and `den` (per-block values of two arms, the same
/// blocks) and its 95% interval, resampling blocks jointly; infinite where the
/// denominator's median is not above 0.
fn ratio_ci(num: &[f64], den: &[f64]) -> (f64, f64, f64) {
    let ratio = |picks: &[usize]| {
        let d = median(&mut picked(den, picks));
        if d > 0.0 {
            median(&mut picked(num, picks)) / d
        } else {
            f64::INFINITY
        }
    };
    let all: Vec<usize> = (0..num.len()).collect();
    let (lo, hi) = bootstrap(num.len(), 0x726c_6168, ratio);
    (ratio(&all), lo, hi)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Versions of the netfilter tools, as they print them.
fn tool_version(program: &str, flag: &str) -> String {
    Command::new(program)
        .arg(flag)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| format!("{program}: {e}"))
}

pub fn compare(blocks: u32, iters: u32, live: u32) {
    // Each arm's holder keeps `live` sockets open; the listeners close what they accept.
    let (files, _) = getrlimit(Resource::RLIMIT_NOFILE).expect("RLIMIT_NOFILE");
    assert!(
        u64::from(live) + 256 <= files,
        "--live {live} needs more open files than RLIMIT_NOFILE ({files}) allows a helper"
    );
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    let (enforced, plain, group) = policy_sides(&cgroup, &scratch, "", LIMIT, LIMIT);
    let agent = Agent::start(&scratch);

    let mut arms: Vec<Arm> = Kind::ALL
        .iter()
        .enumerate()
        .map(|(i, &kind)| {
            let ns = Netns::new(format!("rlbench-{}-{i}", std::process::id()));
            let (cgroup, uid) = match kind {
                Kind::RlagentCap => (enforced.clone(), BENCH_UID),
                Kind::RlagentFull => (group.clone(), POLICY_UID),
                _ => (plain.clone(), BENCH_UID),
            };
            kind.install(&ns, uid);
            let listener = ns.within(Listener::dropping);
            let nsenter = format!("--net={}", ns.path().display());
            let timer = Helper::spawn_by(&["nsenter", &nsenter], &cgroup, uid);
            let holder = Helper::spawn_by(&["nsenter", &nsenter], &cgroup, uid);
            Arm {
                kind,
                timer,
                holder,
                listener,
                ns,
            }
        })
        .collect();

    println!(
        "TCP connect()+close() on loopback, each arm in a network namespace of its own; {blocks} blocks x {iters} per arm, order rotated and reversed"
    );
    println!(
        "{}; {}",
        tool_version("iptables", "-V"),
        tool_version("nft", "-v")
    );
    let started = Instant::now();
    let phases: &[u32] = if live > 0 { &[0, live] } else { &[0] };
    for &held in phases {
        if held > 0 {
            for arm in &mut arms {
                if arm.kind.netfilter() {
                    // Held connections are in CLOSE_WAIT, which conntrack forgets after
                    // 60 s by default: kept for the whole run in this namespace.
                    arm.ns.exec(
                        "sysctl",
                        &[
                            "-q",
                            "-w",
                            "net.netfilter.nf_conntrack_tcp_timeout_close_wait=86400",
                        ],
                        "",
                    );
                }
                let port = arm.listener.port4;
                let reply = arm.holder.cmd(&format!("hold tcp4 {port} {held}"));
                assert_eq!(reply, format!("ok {held} 0"), "{}", arm.kind.name());
            }
            for uid in [BENCH_UID, POLICY_UID] {
                assert_eq!(
                    scratch.live(uid),
                    u64::from(held),
                    "uid {uid}: the rlagent arm's held connections are charged"
                );
            }
        }
        let load_before = load_average();
        let n = arms.len();
        let mut per_arm: Vec<Vec<f64>> = vec![Vec::new(); n];
        let mut added: Vec<Vec<f64>> = vec![Vec::new(); n];
        let run = |arm: &mut Arm| -> f64 {
            let port = arm.listener.port4;
            let reply = arm.timer.cmd(&format!("bench tcp4 {port} {iters}"));
            let ns: f64 = reply
                .strip_prefix("ok ")
                .unwrap_or_else(|| panic!("{}: {reply}", arm.kind.name()))
                .parse()
                .unwrap();
            ns / f64::from(iters)
        };
        // Warm-up, discarded.
        for arm in &mut arms {
            run(arm);
        }
        for block in 0..blocks as usize {
            // Pairs of blocks: the order rotated by one per pair, reversed in the second of
            // each, so every arm runs in every position.
            let mut order: Vec<usize> = (0..n).map(|k| (block / 2 + k) % n).collect();
            if block % 2 == 1 {
                order.reverse();
            }
            let mut t = vec![0.0; n];
            for i in order {
                t[i] = run(&mut arms[i]);
            }
            for i in 0..n {
                per_arm[i].push(t[i]);
                added[i].push(t[i] - t[0]);
            }
        }
        if held > 0 {
            for arm in arms.iter().filter(|a| a.kind.netfilter()) {
                let count: u64 = arm
                    .ns
                    .within(|| {
                        std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
                    })
                    .expect("nf_conntrack_count")
                    .trim()
                    .parse()
                    .unwrap();
                assert!(
                    count >= u64::from(held),
                    "{}: conntrack counts {count} connections at the end, fewer than the {held} held",
                    arm.kind.name()
                );
            }
        }
        println!(
            "\n{held} connections held open by the UID in each arm; load average {load_before} before, {} after",
            load_average()
        );
        println!(
            "{:<26} {:>10} {:>24} {:>18} {:>18}",
            "arm", "ns/op", "added µs [95% CI]", "x rlagent [CI]", "x rlagent [CI]"
        );
        println!(
            "{:<26} {:>10} {:>24} {:>18} {:>18}",
            "", "", "", "cap only", "full"
        );
        let stats: Vec<(f64, f64, f64)> = added.iter().map(|a| median_ci(a)).collect();
        let ratio = |arm: usize, base: usize| {
            let (r, lo, hi) = ratio_ci(&added[arm], &added[base]);
            let show = |x: f64| {
                if x.is_finite() {
                    format!("{x:.1}")
                } else {
                    "inf".to_string()
                }
            };
            format!("{} [{}, {}]", show(r), show(lo), show(hi))
        };
        for (i, arm) in arms.iter().enumerate() {
            let (m, lo, hi) = stats[i];
            let ns_op = median(&mut per_arm[i].clone());
            if i == 0 {
                println!(
                    "{:<26} {:>10.0} {:>24}",
                    arm.kind.name(),
                    ns_op,
                    "(baseline)"
                );
                continue;
            }
            println!(
                "{:<26} {:>10.0} {:>24} {:>18} {:>18}",
                arm.kind.name(),
                ns_op,
                format!("{:.2} [{:.2}, {:.2}]", m / 1e3, lo / 1e3, hi / 1e3),
                ratio(i, 1),
                ratio(i, 2)
            );
        }
    }
    for arm in &mut arms {
        arm.holder.close_all();
    }
    assert_all_released(&scratch, "compare");
    // Every connect() of the rlagent arms went through the programs: warm-up and blocks of
    // each phase, and the held connections.
    let phase_connects = u64::from(blocks + 1) * u64::from(iters);
    let expected = phase_connects * phases.len() as u64 + u64::from(live);
    for uid in [BENCH_UID, POLICY_UID] {
        let c = scratch
            .stats()
            .per_uid
            .get(&uid)
            .copied()
            .unwrap_or_default();
        assert_eq!(
            c.denied.iter().sum::<u64>(),
            0,
            "uid {uid}: nothing was denied"
        );
        assert_eq!(
            c.admitted, expected,
            "uid {uid}: connects charged by the programs"
        );
        println!("uid {uid}: {} connections charged", c.admitted);
    }
    drop(arms);
    drop(agent);
    println!("{:.1} s", started.elapsed().as_secs_f64());
}
