//! cgroup work that is safe and meaningful on this hybrid host (cgroup2 without the cpu,
//! memory and pids controllers): placement, which needs no controller, and the report of
//! controllers that are missing. Quota enforcement itself is tested in the qemu guest
//! (tests/guest.rs). Every cgroup here lives under a fresh `rlagent-test-*` child and the
//! rules name only test UIDs, so no other process on the host can be moved.

use std::{
    os::{
        fd::{AsRawFd, BorrowedFd},
        unix::process::CommandExt,
    },
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use rlagent::{
    config::Config,
    desired::{state::RuntimeState, Desired},
    kernel::{
        cgroup::{
            cgroupfs::{CgroupfsDriver, CgroupfsMover},
            mount, CgroupFs,
        },
        nss::SystemUsers,
        placement::Placer,
    },
};
use rlagent_tests::{cgroup_of, privileged, target_bin, wait_placed, Agent, Scratch, TestCgroup};

const PLACED_UID: u32 = 61060;
/// Its own UID: another test's agent places PLACED_UID's processes host-wide.
const TREE_UID: u32 = 61062;

fn config(scratch: &Scratch, cgroup: &TestCgroup, rest: &str) {
    let text = format!(
        "cgroup_root = \"{}/slice\"\n{}[bpf]\nattach_cgroup = \"{}\"\npin_path = \"{}\"\n{rest}",
        cgroup.relative,
        scratch.private_paths(),
        cgroup.relative,
        scratch.pin_path().display()
    );
    std::fs::write(scratch.config_path(), text).unwrap();
}

/// True (and says the test skips) when cgroup2 here has any of `controllers`: these tests
/// are about the hybrid host (this one, and CI's), where it has none of them. On a pure
/// cgroup v2 host they cannot run, so there `RLAGENT_REQUIRE_PRIVILEGED=1` fails them rather
/// than letting them pass untested; the qemu guest tests the same agent with the
/// controllers present (tests/guest.rs).
fn has_any_controller(cgroup: &TestCgroup, controllers: &[&str], test: &str) -> bool {
    let available = std::fs::read_to_string(cgroup.path.join("cgroup.controllers")).unwrap();
    let found = available
        .split_whitespace()
        .any(|c| controllers.contains(&c));
    if found {
        rlagent_tests::skip(
            test,
            &format!("cgroup2 here has one of {controllers:?}: this test needs them missing"),
        );
    }
    found
}

#[test]
fn a_new_process_of_a_rule_uid_is_placed_within_milliseconds() {
    if !privileged("placement_on_host") {
        return;
    }
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    config(
        &scratch,
        &cgroup,
        &format!("[[group]]\nname = \"batch\"\nuids = [{PLACED_UID}]\n"),
    );
    let _agent = Agent::start(&scratch);
    let want = format!("{}/slice/batch", cgroup.relative);
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let mut child = Command::new(target_bin("conn-helper"))
            .arg(&cgroup.path) // joins the test cgroup first, like any process started elsewhere
            .arg(PLACED_UID.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // conn-helper setuid()s after joining: the uid event places it.
        latencies.push(wait_placed(child.id(), &want));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    latencies.sort();
    println!(
        "placement latency, 20 processes: median {:?}, max {:?}",
        latencies[10], latencies[19]
    );
    // About 1 ms here (spawn, join, setuid, event, move): 50 ms would be a regression.
    assert!(
        latencies[10] < Duration::from_millis(50),
        "median placement latency {:?}",
        latencies[10]
    );
    // A process started as a UID nobody names is left alone.
    let mut other = Command::new("sleep").arg("5").uid(61061).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_ne!(cgroup_of(other.id()), want);
    other.kill().unwrap();
    other.wait().unwrap();
}

#[test]
fn missing_controllers_are_reported_and_the_agent_keeps_running() {
    if !privileged("missing_controllers_reported") {
        return;
    }
    let cgroup = TestCgroup::new();
    if has_any_controller(&cgroup, &["cpu"], "missing_controllers_reported") {
        return;
    }
    let scratch = Scratch::new();
    config(
        &scratch,
        &cgroup,
        "[[quota]]\ntarget = \"batch\"\ncpu = \"50%\"\n",
    );
    let agent = Agent::start(&scratch);
    let log = agent.log_text();
    assert!(log.contains("controller cpu is not available"), "{log}");
    assert!(log.contains("bound to cgroup v1"), "{log}");
    assert!(
        log.contains("limit not set") && log.contains("cpu.max"),
        "{log}"
    );
    assert!(
        cgroup.path.join("slice/batch").is_dir(),
        "the group exists for placement"
    );
}

/// The children a process forked before it was moved (between its exec or setuid event and
/// the move) follow it, each by its own rules, however deep.
#[test]
fn children_forked_before_the_move_follow_their_parent() {
    if !privileged("children_follow_their_parent") {
        return;
    }
    let cgroup = TestCgroup::new();
    let scratch = Scratch::new();
    config(
        &scratch,
        &cgroup,
        &format!("[[group]]\nname = \"batch\"\nuids = [{TREE_UID}]\n"),
    );
    let config = Config::load(Some(&scratch.config_path()), &SystemUsers).unwrap();
    let desired = Desired::build(&config, &RuntimeState::default(), &SystemUsers).unwrap();
    let fs = CgroupFs::new(mount::find().unwrap());
    let batch = desired.cgroups.group_cgroup("batch");
    std::fs::create_dir_all(fs.path(&batch)).unwrap();
    // A parent with a child and a grandchild, all of the rule's UID, in the test cgroup.
    // cgroup.procs is opened before the fork: between fork and exec only write(2) of a
    // constant ("0": the writer itself) and the credential calls run, nothing allocates.
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.path.join("cgroup.procs"))
        .unwrap();
    let procs_fd = procs.as_raw_fd();
    let mut parent = Command::new("sh");
    parent
        .args(["-c", "(sleep 30 & sleep 30) & sleep 30"])
        .stdout(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec (nix's wrappers of
    // write, setgid and setuid do not allocate); `procs` outlives spawn(), so `procs_fd`
    // is open while the closure runs.
    unsafe {
        parent.pre_exec(move || {
            let procs = BorrowedFd::borrow_raw(procs_fd);
            if nix::unistd::write(procs, b"0")? != 1 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            nix::unistd::setgid(nix::unistd::Gid::from_raw(TREE_UID))?;
            nix::unistd::setuid(nix::unistd::Uid::from_raw(TREE_UID))?;
            Ok(())
        });
    }
    let mut parent = parent.spawn().unwrap();
    drop(procs);
    let deadline = Instant::now() + Duration::from_secs(5);
    let tree = |root: u32| -> Vec<u32> {
        let mut all = vec![root];
        let mut i = 0;
        while i < all.len() {
            let children =
                std::fs::read_to_string(format!("/proc/{}/task/{}/children", all[i], all[i]))
                    .unwrap_or_default();
            all.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
            i += 1;
        }
        all
    };
    while tree(parent.id()).len() < 3 {
        assert!(Instant::now() < deadline, "the process tree did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let placer = Placer::new(
        desired.cgroups.clone(),
        Box::new(CgroupfsMover {
            driver: CgroupfsDriver::new(fs.clone()),
        }),
        Default::default(),
    );
    placer.place(parent.id()).unwrap();
    let want = batch.display().to_string();
    for pid in tree(parent.id()) {
        assert_eq!(cgroup_of(pid), want, "pid {pid} stayed behind");
    }
    for pid in tree(parent.id()).into_iter().rev() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    parent.wait().unwrap();
}

/// On this host cgroup2 has no cpu, memory or pids controller: a change of those is saved
/// but not enforced, and rlctl says so with exit code 3; fields no code enforces are
/// refused.
#[test]
fn a_change_that_cannot_be_enforced_says_so() {
    if !privileged("a_change_that_cannot_be_enforced") {
        return;
    }
    let cgroup = TestCgroup::new();
    if has_any_controller(
        &cgroup,
        &["cpu", "pids"],
        "a_change_that_cannot_be_enforced",
    ) {
        return;
    }
    let scratch = Scratch::new();
    config(&scratch, &cgroup, "[[group]]\nname = \"batch\"\n");
    let _agent = Agent::start(&scratch);
    let out = scratch.rlctl(&["set-quota", "batch", "--cpu", "50%", "--pids", "10"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains("warning: group:batch cpu is not enforced")
            && text.contains("cpu controller is not available"),
        "{text}"
    );
    // Part of a change in force: exit 0, with the warning.
    let out = scratch.rlctl(&["set-quota", "user:61070", "--conns", "2", "--cpu", "20%"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cpu is not enforced"));
    let out = scratch.rlctl(&["list"]);
    assert!(out.status.success(), "rlctl list: {out:?}");
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        list.lines().any(|l| l.contains("group:batch")
            && l.contains("cpu")
            && l.contains("no: the cpu controller")),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.contains("user:61070") && l.contains("conns") && l.ends_with("yes")),
        "{list}"
    );
    let out = scratch.rlctl(&["stats", "group:batch"]);
    assert!(out.status.success(), "rlctl stats group:batch: {out:?}");
    let stats = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stats.contains("group:batch"),
        "the stats show the group: {stats}"
    );
    assert!(
        !stats.contains(" max "),
        "a limit not in force is not shown as max: {stats}"
    );
    // Connection limits on groups and users are the programs' and hold here...
    for args in [
        vec!["set-quota", "batch", "--conns", "3"],
        vec!["set-quota", "user:61070", "--conn-rate", "20/s"],
    ] {
        let out = scratch.rlctl(&args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // ...and a cgroup:<path> target carries none: refused, nothing applied.
    cgroup.child("svc");
    let target = format!("cgroup:{}/svc", cgroup.relative);
    let out = scratch.rlctl(&["set-quota", &target, "--conns", "3"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("conns cannot be set on a cgroup:<path> target"),
        "{err}"
    );
}
