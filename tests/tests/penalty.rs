//! The penalty box against the real agent and kernel programs, in a child cgroup of this
//! host's cgroup2 mount: a user whose connect() calls are refused faster than a rule
//! allows is put in a tier whose connection cap the kernel enforces, listed, explained,
//! exported, released at the tier's end, raised to the next tier on a repeat and lifted by
//! an operator; an exempt user never is. (CPU tiers need the cpu controller, which this
//! hybrid host binds to cgroup v1: the systemd guest covers those.) Needs root (skips
//! otherwise, fails under RLAGENT_REQUIRE_PRIVILEGED=1).

use std::{
    thread,
    time::{Duration, Instant},
};

use rlagent_tests::{http_get, privileged, sample, Agent, Helper, Listener, Scratch, TestCgroup};

const ALICE: u32 = 63101;
const BOB: u32 = 63102;
/// Below uid_min (1000): a system user, never penalised.
const DAEMON: u32 = 501;

const CONFIG: &str = r#"
[[quota]]
target = "user:63101"
conns = 3

[[quota]]
target = "user:63102"
conns = 3

[[quota]]
target = "user:501"
conns = 3

[[penalty]]
name = "flood"
when = "denials_per_min > 60"
window = "2s"
exempt = ["63102"]
[[penalty.tier]]
conns = 1
duration = "4s"
[[penalty.tier]]
conns = 1
conn_rate = "1/s"
duration = "4s"
"#;

/// `rlctl --json penalties`, as JSON.
fn penalties(s: &Scratch) -> Vec<serde_json::Value> {
    let out = s.rlctl_ok(&["--json", "penalties"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("penalties JSON");
    v["penalties"].as_array().cloned().unwrap_or_default()
}

/// Polls until `want` holds of the penalty list (at most `within`); returns the list.
fn wait_penalties(
    s: &Scratch,
    within: Duration,
    what: &str,
    want: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + within;
    loop {
        let list = penalties(s);
        if want(&list) {
            return list;
        }
        assert!(Instant::now() < deadline, "{what}: penalties {list:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The value and source of `user:<uid>`'s `conns` in `rlctl --json list`.
fn conns_field(s: &Scratch, uid: u32) -> (String, String) {
    let out = s.rlctl_ok(&["--json", "list"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("list JSON");
    let target = format!("user:{uid}");
    let t = v["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["target"] == target.as_str()))
        .unwrap_or_else(|| panic!("{target} not listed: {out}"));
    let f = &t["fields"]["conns"];
    (
        f["value"].as_str().unwrap_or_default().to_string(),
        f["source"].as_str().unwrap_or_default().to_string(),
    )
}

/// `user:<uid>`'s cap as the agent reads it from the kernel map (`rlctl stats`).
fn kernel_cap(s: &Scratch, uid: u32) -> Option<u64> {
    let out = s.rlctl_ok(&["--json", "stats", &format!("user:{uid}")]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("stats JSON");
    let conns = v["conns"].as_array().cloned().unwrap_or_default();
    let c = conns
        .iter()
        .find(|c| c["uid"] == uid)
        .unwrap_or_else(|| panic!("no counters of {uid}: {out}"));
    c["cap"].as_u64()
}

/// How many of `n` connections a fresh helper of `uid` may hold (the rest are refused).
fn holdable(at: &std::path::Path, uid: u32, port: u16, n: u32) -> u64 {
    let mut h = Helper::spawn(at, uid);
    let reply = h.cmd(&format!("hold tcp4 {port} {n}"));
    let ok = match reply.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["ok", ok, _] => ok.parse().unwrap(),
        _ => panic!("unexpected helper reply {reply:?}"),
    };
    h.exit();
    ok
}

/// Holds 3 connections and connects for `millis` more: every one of those is refused.
fn flood(at: &std::path::Path, uid: u32, port: u16, millis: u64) -> Helper {
    let mut h = Helper::spawn(at, uid);
    let held = h.cmd(&format!("hold tcp4 {port} 3"));
    assert!(held.starts_with("ok 3 "), "uid {uid} holds 3 first: {held}");
    let reply = h.cmd(&format!("for tcp4 {port} {millis}"));
    assert!(
        reply.starts_with("ok 0 "),
        "every connect over the cap refused: {reply}"
    );
    h
}

#[test]
fn a_user_refused_too_often_is_penalised_the_kernel_enforces_the_tier_and_it_ends() {
    if !privileged("penalty_box") {
        return;
    }
    let cgroup = TestCgroup::new();
    let s = Scratch::new();
    s.write_config(&cgroup, "", CONFIG);
    let _agent = Agent::start(&s);
    let listener = Listener::new();
    let (at, port) = (cgroup.path.as_path(), listener.port4);
    assert!(penalties(&s).is_empty());

    // Bob (exempt), a system user and Alice each flood past their cap for 1.5 s.
    let start = Instant::now();
    let b = flood(at, BOB, port, 1500);
    let d = flood(at, DAEMON, port, 1500);
    let a = flood(at, ALICE, port, 1500);
    let list = wait_penalties(&s, Duration::from_secs(10), "alice in tier 1", |l| {
        l.iter().any(|p| p["target"] == "user:63101")
    });
    println!(
        "alice penalised {:.1} s after the floods began",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(
        list.len(),
        1,
        "only alice: never the exempt bob nor a UID below uid_min: {list:?}"
    );
    let p = &list[0];
    assert_eq!(
        (p["rule"].as_str(), p["tier"].as_u64()),
        (Some("flood"), Some(1))
    );
    assert_eq!(p["monitor"], false);
    let reason = p["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("denials_per_min = ") && reason.contains("threshold > 60"),
        "{reason}"
    );
    assert_eq!(
        p["until"].as_u64().unwrap() - p["since"].as_u64().unwrap(),
        4
    );
    drop((a, b, d));

    // The tier is in the desired state, and in the kernel.
    assert_eq!(conns_field(&s, ALICE), ("1".into(), "penalty:flood".into()));
    assert_eq!(conns_field(&s, BOB), ("3".into(), "config".into()));
    s.wait_live(ALICE, 0);
    s.wait_live(BOB, 0);
    assert_eq!(kernel_cap(&s, ALICE), Some(1));
    assert_eq!(
        holdable(at, ALICE, port, 3),
        1,
        "alice's tier caps her at 1"
    );
    assert_eq!(holdable(at, BOB, port, 3), 3);
    // Explained and exported.
    let why = s.rlctl_ok(&["why", "user:63101"]);
    assert!(
        why.contains("penalties:") && why.contains("flood") && why.contains("denials_per_min"),
        "{why}"
    );
    let table = s.rlctl_ok(&["penalties"]);
    assert!(
        table.contains("user:63101") && table.contains("enforce"),
        "{table}"
    );
    let (_, body) = http_get(s.metrics_port(), "/metrics");
    assert_eq!(
        sample(
            &body,
            "rlagent_penalty_tier{target=\"user:63101\",rule=\"flood\",mode=\"enforce\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "rlagent_penalties_total{rule=\"flood\",tier=\"1\"}"),
        Some(1.0)
    );

    // The tier ends after its 4 s: the config's cap is back.
    wait_penalties(&s, Duration::from_secs(10), "tier 1 released", |l| {
        l.is_empty()
    });
    assert_eq!(conns_field(&s, ALICE), ("3".into(), "config".into()));
    assert_eq!(kernel_cap(&s, ALICE), Some(3));
    assert_eq!(holdable(at, ALICE, port, 3), 3);
    let refused = s.rlctl(&["release", "user:63101"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("has no penalty"),
        "{refused:?}"
    );

    // A repeat soon after: tier 2, which an operator then lifts.
    let a = flood(at, ALICE, port, 1500);
    let list = wait_penalties(&s, Duration::from_secs(10), "alice in tier 2", |l| {
        l.iter().any(|p| p["tier"] == 2)
    });
    assert_eq!(list[0]["target"], "user:63101");
    drop(a);
    let out = s.rlctl_ok(&["release", "user:63101"]);
    assert!(out.contains("penalty:flood tier 2 lifted"), "{out}");
    assert!(penalties(&s).is_empty());
    assert_eq!(conns_field(&s, ALICE), ("3".into(), "config".into()));
    assert_eq!(kernel_cap(&s, ALICE), Some(3));
}
