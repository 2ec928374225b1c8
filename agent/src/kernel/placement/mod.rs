//! Placement: keeps the processes of each target in its cgroup. It decides where a
//! process belongs ([`decide`]); the cgroup driver's [`Mover`] moves it.
//!
//! A full /proc scan at start and on every reload, then live events from the netlink proc
//! connector: exec (a new program: comm and exe rules), uid and gid changes (setuid into a
//! user target). Fork needs no event: a child inherits its parent's cgroup, which is also
//! what keeps a fork bomb inside its group. The proc connector was chosen over BPF
//! tracepoints because it needs no BTF or extra programs, is in every distribution kernel
//! (CONFIG_PROC_EVENTS), and reports exactly these three events; when the kernel drops
//! events (receive buffer overrun) we rescan /proc, so nothing stays misplaced.

pub mod proc_events;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
};

use crate::{
    desired::cgroups::CgroupPlan,
    kernel::{
        cgroup::{
            mover::{Decision, MoveError, Moved, Mover},
            systemd::SystemdError,
            CgroupError,
        },
        proc::{children, read_proc, ProcInfo, MAX_FOLLOWED},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("placing pid {pid} ({comm}) into {cgroup}")]
    Move {
        pid: u32,
        comm: String,
        cgroup: PathBuf,
        #[source]
        source: CgroupError,
    },
    #[error("placing pid {pid} ({comm}) into group {group} through systemd")]
    Scope {
        pid: u32,
        comm: String,
        group: String,
        #[source]
        source: SystemdError,
    },
    #[error("listening for process events (netlink proc connector): {message}")]
    Events { message: String },
}

impl PlacementError {
    /// `info` could not be moved: the mover's error, with the process named.
    fn moving(info: &ProcInfo, e: MoveError) -> Self {
        let (pid, comm) = (info.pid, info.comm.clone());
        match e {
            MoveError::Cgroup { cgroup, source } => Self::Move {
                pid,
                comm,
                cgroup,
                source,
            },
            MoveError::Scope { group, source } => Self::Scope {
                pid,
                comm,
                group,
                source,
            },
        }
    }
}

/// The placement rules, in order:
/// 1. never: kernel threads, PID 1, the agent itself, processes inside a `cgroup:<path>`
///    target, and processes of a systemd service (a cgroup named `*.service`, which
///    includes every user's `user@<uid>.service` and `DynamicUser=` services): systemd
///    tracks, accounts and stops those by their cgroup, so they stay where it put them;
/// 2. the first `[[group]]` rule that matches: by `uids` or `gids` (any UID, these name
///    users explicitly), or by `comms` glob / `exes` path (only UIDs >= uid_min, so a
///    broad pattern can never sweep up system services);
/// 3. the user's own cgroup, when its UID has cgroup quota fields (own or `user:*`);
/// 4. otherwise, leave it where it is.
pub fn decide(plan: &CgroupPlan, p: &ProcInfo, own_pid: u32) -> Decision {
    if never_moved(p, own_pid) || plan.inside_cgroup_target(&p.cgroup) || in_service(&p.cgroup) {
        return Decision::Leave;
    }
    let system = p.uid < plan.uid_min;
    for rule in &plan.rules {
        let by_id = rule.uids.contains(&p.uid) || p.gids.iter().any(|g| rule.gids.contains(g));
        let by_program = !system
            && (rule.comms.iter().any(|g| glob_match(g, &p.comm))
                || p.exe.as_ref().is_some_and(|e| rule.exes.contains(e)));
        if by_id || by_program {
            return Decision::Group(rule.name.clone());
        }
    }
    if plan.user_quota(p.uid).is_some() {
        return Decision::User(p.uid);
    }
    Decision::Leave
}

/// True for the processes nothing moves, whoever asks: kernel threads, PID 1 and the agent
/// (`own_pid`).
pub fn never_moved(p: &ProcInfo, own_pid: u32) -> bool {
    p.kernel_thread || p.pid == 1 || p.pid == own_pid
}

/// True when `cgroup` lies in a systemd service's cgroup (a component named `*.service`).
pub fn in_service(cgroup: &Path) -> bool {
    cgroup.components().any(|c| {
        c.as_os_str()
            .to_str()
            .is_some_and(|c| c.ends_with(".service"))
    })
}

/// `*` (any run) and `?` (any one character) globs, as for comm names.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Applies [`decide`] to processes.
pub struct Placer {
    plan: CgroupPlan,
    mover: Box<dyn Mover>,
    own_pid: u32,
    /// Processes moved since start (scan and events), shared with the stats reader.
    moves: Arc<AtomicU64>,
}

/// Counts from one full scan.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanReport {
    pub seen: usize,
    pub moved: usize,
    pub failed: usize,
}

impl Placer {
    pub fn new(plan: CgroupPlan, mover: Box<dyn Mover>, moves: Arc<AtomicU64>) -> Self {
        Self {
            plan,
            mover,
            own_pid: std::process::id(),
            moves,
        }
    }

    pub fn set_plan(&mut self, plan: CgroupPlan) {
        self.plan = plan;
    }

    /// Places one process, then the children it had when it moved (see
    /// [`Self::place_children`]); returns the cgroup it was moved to, if it was moved.
    pub fn place(&self, pid: u32) -> Result<Option<PathBuf>, PlacementError> {
        let moved = self.place_one(pid)?;
        if let Some((from, to)) = &moved {
            if !to.with_children {
                self.place_children(pid, from);
            }
            return Ok(Some(to.to.clone()));
        }
        Ok(None)
    }

    /// A process that forked between its event and its move left children behind in its
    /// old cgroup (children inherit the cgroup at fork). After the move, every child it
    /// forks lands in the new cgroup, and every child it already had is listed in
    /// `/proc/<pid>/task/*/children`: so each child still in `from` is placed by its own
    /// rules, and its children after it, until the whole tree has followed. Bounded, so a
    /// fork bomb cannot keep this loop going.
    fn place_children(&self, pid: u32, from: &Path) {
        let mut pending = vec![pid];
        let mut followed = 0;
        while let Some(parent) = pending.pop() {
            for child in children(parent) {
                if followed == MAX_FOLLOWED {
                    tracing::warn!(
                        pid,
                        "stopped following the process tree after {MAX_FOLLOWED} children"
                    );
                    return;
                }
                followed += 1;
                match self.place_one(child) {
                    Ok(Some((child_from, _))) if child_from == from => pending.push(child),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
    }

    /// Places one process; returns where it was and where it went, if it was moved.
    fn place_one(&self, pid: u32) -> Result<Option<(PathBuf, Moved)>, PlacementError> {
        let Some(info) = read_proc(pid) else {
            return Ok(None);
        };
        if !self.mover.eligible(&self.plan, &info.cgroup) {
            return Ok(None);
        }
        let decision = decide(&self.plan, &info, self.own_pid);
        let moved = self
            .mover
            .place(&self.plan, &info, &decision)
            .map_err(|e| PlacementError::moving(&info, e))?;
        Ok(moved.map(|m| {
            self.moves.fetch_add(1, Ordering::Relaxed);
            (info.cgroup, m)
        }))
    }

    /// Places every process in /proc.
    pub fn scan(&self) -> ScanReport {
        let mut report = ScanReport::default();
        let Ok(all) = procfs::process::all_processes() else {
            return report;
        };
        for process in all.flatten() {
            report.seen += 1;
            match self.place(process.pid as u32) {
                Ok(Some(cgroup)) => {
                    report.moved += 1;
                    tracing::debug!(pid = process.pid, cgroup = %cgroup.display(), "placed");
                }
                Ok(None) => {}
                Err(e) => {
                    report.failed += 1;
                    tracing::warn!("{e}");
                }
            }
        }
        report
    }
}

/// Listens for exec/uid/gid events and places each process, until the process exits.
/// Runs on its own thread: receiving from the proc connector blocks.
pub fn watch(placer: Arc<RwLock<Placer>>) -> Result<std::thread::JoinHandle<()>, PlacementError> {
    use proc_events::{ProcEvent, ProcEvents, Received};
    let mut events = ProcEvents::subscribe().map_err(|e| PlacementError::Events {
        message: e.to_string(),
    })?;
    let handle = std::thread::Builder::new()
        .name("placement".into())
        .spawn(move || loop {
            let pid = match events.recv() {
                Ok(Received::Event(
                    ProcEvent::Exec { tgid }
                    | ProcEvent::Uid { tgid, .. }
                    | ProcEvent::Gid { tgid, .. },
                )) => tgid,
                Ok(Received::Event(ProcEvent::Other)) => continue,
                Ok(Received::Overrun) => {
                    let report = placer.read().expect("placer lock").scan();
                    tracing::warn!(
                        moved = report.moved,
                        "process events were dropped; rescanned /proc"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::error!(
                        "process events stopped: {e}; new processes are placed at the next reload"
                    );
                    return;
                }
            };
            if let Err(e) = placer.read().expect("placer lock").place(pid) {
                tracing::warn!("{e}");
            }
        })
        .map_err(|e| PlacementError::Events {
            message: e.to_string(),
        })?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::plan;

    fn proc(pid: u32, uid: u32, comm: &str) -> ProcInfo {
        ProcInfo {
            pid,
            uid,
            gids: vec![uid],
            comm: comm.into(),
            exe: Some(PathBuf::from(format!("/usr/bin/{comm}"))),
            cgroup: PathBuf::from("user.slice"),
            kernel_thread: false,
        }
    }

    const RULES: &str = r#"
[[group]]
name = "batch"
uids = [65534]
comms = ["stress-*"]
[[group]]
name = "builds"
gids = [3000]
exes = ["/usr/bin/make"]
[[quota]]
target = "user:*"
cpu = "100%"
[[quota]]
target = "cgroup:system.slice/db.service"
memory = "1G"
"#;

    #[test]
    fn rules_in_order_then_users() {
        let p = plan(RULES);
        assert_eq!(
            decide(&p, &proc(10, 65534, "sleep"), 1),
            Decision::Group("batch".into())
        );
        assert_eq!(
            decide(&p, &proc(10, 2000, "stress-ng"), 1),
            Decision::Group("batch".into())
        );
        let mut member = proc(10, 2000, "cc");
        member.gids.push(3000);
        assert_eq!(decide(&p, &member, 1), Decision::Group("builds".into()));
        assert_eq!(
            decide(&p, &proc(10, 2000, "make"), 1),
            Decision::Group("builds".into())
        );
        assert_eq!(decide(&p, &proc(10, 2000, "bash"), 1), Decision::User(2000));
    }

    #[test]
    fn system_processes_the_agent_and_cgroup_targets_are_never_moved() {
        let p = plan(RULES);
        assert_eq!(
            decide(&p, &proc(10, 0, "stress-ng"), 1),
            Decision::Leave,
            "comm rules skip system UIDs"
        );
        assert_eq!(
            decide(&p, &proc(10, 999, "bash"), 1),
            Decision::Leave,
            "no default below uid_min"
        );
        assert_eq!(decide(&p, &proc(1, 2000, "init"), 7), Decision::Leave);
        assert_eq!(decide(&p, &proc(7, 2000, "rlagent"), 7), Decision::Leave);
        let mut kthread = proc(50, 2000, "kworker");
        kthread.kernel_thread = true;
        assert_eq!(decide(&p, &kthread, 1), Decision::Leave);
        let mut in_target = proc(60, 2000, "stress-x");
        in_target.cgroup = PathBuf::from("system.slice/db.service");
        assert_eq!(decide(&p, &in_target, 1), Decision::Leave);
        // systemd's own: a user's manager, a DynamicUser service, any service's children.
        for cgroup in [
            "user.slice/user-2000.slice/user@2000.service/app.slice/x.service",
            "user.slice/user-2000.slice/user@2000.service/init.scope",
            "system.slice/run-u7.service",
        ] {
            let mut service = proc(70, 62000, "stress-ng");
            service.cgroup = PathBuf::from(cgroup);
            assert_eq!(decide(&p, &service, 1), Decision::Leave, "{cgroup}");
        }
        // A login session's processes are placed by the rules.
        let mut session = proc(71, 2000, "stress-ng");
        session.cgroup = PathBuf::from("user.slice/user-2000.slice/session-3.scope");
        assert_eq!(decide(&p, &session, 1), Decision::Group("batch".into()));
    }

    #[test]
    fn users_without_cgroup_quota_stay() {
        let p = plan("[[quota]]\ntarget = \"user:*\"\nconns = 5\n");
        assert_eq!(decide(&p, &proc(10, 2000, "bash"), 1), Decision::Leave);
    }

    #[test]
    fn globs() {
        assert!(glob_match("stress-*", "stress-ng"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("*ng*", "stress-ng-cpu"));
        assert!(!glob_match("stress-*", "stres"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("make", "make") && !glob_match("make", "cmake"));
    }
}
