use std::sync::Mutex;

use super::*;
use crate::testing::plan;

/// Records the calls; `owners` answers `unit_of_cgroup`, `current` `get_properties`
/// (infinity for any property not there).
#[derive(Default)]
struct FakeBus {
    calls: Mutex<Vec<String>>,
    owners: BTreeMap<String, String>,
    current: BTreeMap<(String, String), u64>,
}

impl FakeBus {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl Bus for FakeBus {
    fn set_properties(&self, unit: &str, properties: &[Property]) -> Result<(), SystemdError> {
        let props: Vec<String> = properties
            .iter()
            .map(|p| match p.value() {
                INFINITY => format!("{}=infinity", p.name()),
                v => format!("{}={v}", p.name()),
            })
            .collect();
        self.calls
            .lock()
            .unwrap()
            .push(format!("set {unit} {}", props.join(" ")));
        Ok(())
    }

    fn get_properties(&self, unit: &str, names: &[&str]) -> Result<Vec<u64>, SystemdError> {
        Ok(names
            .iter()
            .map(|n| {
                self.current
                    .get(&(unit.to_string(), n.to_string()))
                    .copied()
                    .unwrap_or(INFINITY)
            })
            .collect())
    }

    fn start_unit(&self, unit: &str) -> Result<(), SystemdError> {
        self.calls.lock().unwrap().push(format!("start {unit}"));
        Ok(())
    }

    fn unit_of_cgroup(&self, cgroup: &str) -> Result<Option<String>, SystemdError> {
        Ok(self.owners.get(cgroup).cloned())
    }

    fn start_scope(
        &self,
        name: &str,
        slice: &str,
        _description: &str,
        pids: &[u32],
    ) -> Result<(), SystemdError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("scope {name} in {slice} {pids:?}"));
        Ok(())
    }
}

const SYSTEMD: &str = "cgroup_driver = \"systemd\"\n";

fn sd_plan(text: &str) -> CgroupPlan {
    plan(&format!("{SYSTEMD}{text}"))
}

/// A fake unified mount with cpu/memory/pids and the given user slices.
fn mount(users: &[u32]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
    for uid in users {
        std::fs::create_dir_all(tmp.path().join(format!("user.slice/user-{uid}.slice"))).unwrap();
    }
    tmp
}

fn driver(bus: &Arc<FakeBus>, mount: &Path, record: Option<PathBuf>) -> SystemdDriver {
    SystemdDriver::new(bus.clone() as Arc<dyn Bus>, mount, record)
}

#[test]
fn a_user_quota_sets_only_its_own_fields_on_the_users_slice() {
    let tmp = mount(&[1001]);
    let bus = Arc::new(FakeBus::default());
    let d = driver(&bus, tmp.path(), None);
    d.apply(
        &sd_plan("[[quota]]\ntarget = \"user:1001\"\ncpu = \"40%\"\n"),
        Before::Nothing,
    )
    .unwrap();
    assert_eq!(
        bus.take(),
        ["set user-1001.slice CPUQuotaPerSecUSec=400000 CPUQuotaPeriodUSec=100000"],
        "an operator's own MemoryMax on the slice is not overwritten"
    );
}

#[test]
fn dropped_fields_and_targets_are_reset_also_after_a_restart() {
    let tmp = mount(&[1001]);
    let record = tmp.path().join("record");
    let bus = Arc::new(FakeBus::default());
    let d = driver(&bus, tmp.path(), Some(record.clone()));
    d.apply(
        &sd_plan("[[quota]]\ntarget = \"user:1001\"\ncpu = \"40%\"\npids = 50\n"),
        Before::Nothing,
    )
    .unwrap();
    bus.take();
    d.apply(
        &sd_plan("[[quota]]\ntarget = \"user:1001\"\npids = 50\n"),
        Before::Nothing,
    )
    .unwrap();
    assert_eq!(
        bus.take(),
        ["set user-1001.slice CPUQuotaPerSecUSec=infinity CPUQuotaPeriodUSec=infinity TasksMax=50"]
    );
    // A new agent (a restart) with a config that no longer names the user.
    let restarted = driver(&bus, tmp.path(), Some(record.clone()));
    restarted.apply(&sd_plan(""), Before::Nothing).unwrap();
    assert_eq!(bus.take(), ["set user-1001.slice TasksMax=infinity"]);
    assert_eq!(std::fs::read_to_string(&record).unwrap(), "");
    // Nothing left to reset: the next apply writes nothing.
    restarted.apply(&sd_plan(""), Before::Nothing).unwrap();
    assert!(bus.take().is_empty());
}

#[test]
fn unchanged_units_are_not_written_again() {
    let tmp = mount(&[]);
    let bus = Arc::new(FakeBus::default());
    let d = driver(&bus, tmp.path(), None);
    let p = sd_plan("[[quota]]\ntarget = \"batch\"\nmemory = \"1G\"\n");
    d.apply(&p, Before::Nothing).unwrap();
    assert_eq!(
        bus.take(),
        [
            "set rlagent-batch.slice MemoryMax=1073741824",
            "start rlagent-batch.slice"
        ]
    );
    d.apply(&p, Before::Nothing).unwrap();
    assert_eq!(bus.take(), ["start rlagent-batch.slice"]);
    // After a complete write of the same groups: not even the slices are started again.
    d.apply(&p, Before::Complete(&p)).unwrap();
    assert_eq!(bus.take(), Vec::<String>::new());
    let more =
        sd_plan("[[quota]]\ntarget = \"batch\"\nmemory = \"1G\"\n[[group]]\nname = \"web\"\n");
    d.apply(&more, Before::Complete(&p)).unwrap();
    assert_eq!(
        bus.take(),
        ["start rlagent-web.slice"],
        "only the new group's slice"
    );
}

#[test]
fn the_user_default_reaches_present_and_new_users_at_or_above_uid_min() {
    let tmp = mount(&[5, 1001, 1002]);
    let bus = Arc::new(FakeBus::default());
    let d = driver(&bus, tmp.path(), None);
    d.apply(&sd_plan(
        "[[quota]]\ntarget = \"user:*\"\npids = 100\n[[quota]]\ntarget = \"user:1002\"\npids = 7\n",
    ), Before::Nothing)
    .unwrap();
    assert_eq!(
        bus.take(),
        [
            "set user-1001.slice TasksMax=100",
            "set user-1002.slice TasksMax=7"
        ],
        "uid 5 is below uid_min"
    );
    d.user_appeared(1003);
    d.user_appeared(6);
    assert_eq!(bus.take(), ["set user-1003.slice TasksMax=100"]);
    // The default removed: every slice it reached is reset, the logged-in and the new.
    d.apply(
        &sd_plan("[[quota]]\ntarget = \"user:1002\"\npids = 7\n"),
        Before::Nothing,
    )
    .unwrap();
    assert_eq!(
        bus.take(),
        [
            "set user-1001.slice TasksMax=infinity",
            "set user-1003.slice TasksMax=infinity"
        ]
    );
}

#[test]
fn a_cgroup_target_maps_to_the_unit_that_owns_exactly_that_cgroup() {
    let tmp = mount(&[]);
    let mut fake = FakeBus::default();
    fake.owners
        .insert("/system.slice/db.service".into(), "db.service".into());
    fake.owners.insert(
        "/system.slice/db.service/worker".into(),
        "db.service".into(),
    );
    let bus = Arc::new(fake);
    let d = driver(&bus, tmp.path(), None);
    d.apply(
        &sd_plan("[[quota]]\ntarget = \"cgroup:system.slice/db.service\"\nmemory = \"2G\"\n"),
        Before::Nothing,
    )
    .unwrap();
    assert_eq!(bus.take(), ["set db.service MemoryMax=2147483648"]);

    for (path, owner) in [
        ("system.slice/db.service/worker", "db.service"),
        ("machine.slice/stray", ""),
    ] {
        let err = d
            .apply(
                &sd_plan(&format!(
                    "[[quota]]\ntarget = \"cgroup:{path}\"\nmemory = \"2G\"\n"
                )),
                Before::Nothing,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("no systemd unit owns this cgroup"), "{err}");
        assert!(err.contains(owner), "{err}");
        assert!(bus.take().is_empty(), "refused before any write");
    }
}

#[test]
fn controllers_missing_at_the_root_are_reported_and_cgroup_targets_skipped() {
    let tmp = mount(&[]);
    std::fs::write(tmp.path().join("cgroup.controllers"), "cpu memory").unwrap();
    let mut fake = FakeBus::default();
    fake.owners
        .insert("/system.slice/db.service".into(), "db.service".into());
    let bus = Arc::new(fake);
    let d = driver(&bus, tmp.path(), None);
    let report = d
        .apply(
            &sd_plan(
                "[[quota]]\ntarget = \"cgroup:system.slice/db.service\"\npids = 5\ncpu = \"10%\"\n",
            ),
            Before::Nothing,
        )
        .unwrap();
    assert_eq!(report.subtree_missing, BTreeSet::from([Controller::Pids]));
    assert_eq!(report.skipped.len(), 1, "{report:?}");
    assert_eq!(report.skipped[0].field, Field::Pids);
    assert!(report.unavailable[0].contains("pids"), "{report:?}");
}

#[test]
fn properties_carry_quota_and_period() {
    let q = sd_plan("[[quota]]\ntarget = \"batch\"\ncpu = \"150%\"\n").groups["batch"];
    assert_eq!(
        properties(Field::Cpu, &q),
        [
            Property::CpuQuotaPerSec(1_500_000),
            Property::CpuQuotaPeriod(100_000)
        ]
    );
    assert_eq!(
        properties(Field::Memory, &q),
        [Property::MemoryMax(INFINITY)]
    );
}

#[test]
fn the_record_round_trips() {
    let mut r = Record::default();
    r.0.insert(
        "user-1001.slice".into(),
        BTreeMap::from([
            (Field::Cpu, vec![INFINITY, INFINITY]),
            (Field::MemoryHigh, vec![1 << 30]),
        ]),
    );
    r.0.insert(
        "rlagent-a\\x2db.slice".into(),
        BTreeMap::from([(Field::Pids, vec![10813])]),
    );
    assert_eq!(Record::parse(&r.render()), r);
    assert_eq!(
        Record::parse("garbage\nx\tnot-a-field=1\ny\tcpu=1\n"),
        Record::default(),
        "unknown fields and a cpu value without its period are skipped"
    );
}

#[test]
fn a_reset_restores_what_the_unit_had_before() {
    let tmp = mount(&[1001]);
    let mut fake = FakeBus::default();
    // Debian's user-.slice.d/10-defaults.conf: TasksMax=33%, read back as a number.
    fake.current
        .insert(("user-1001.slice".into(), "TasksMax".into()), 10813);
    let bus = Arc::new(fake);
    let d = driver(&bus, tmp.path(), None);
    d.apply(
        &sd_plan("[[quota]]\ntarget = \"user:*\"\npids = 100\n"),
        Before::Nothing,
    )
    .unwrap();
    assert_eq!(bus.take(), ["set user-1001.slice TasksMax=100"]);
    d.apply(&sd_plan(""), Before::Nothing).unwrap();
    assert_eq!(
        bus.take(),
        ["set user-1001.slice TasksMax=10813"],
        "the distribution's limit comes back, not infinity"
    );
}

#[test]
fn every_cgroup_field_has_properties_and_no_other_has() {
    for field in Field::ALL {
        let names = property_names(field);
        assert_eq!(
            names.is_empty(),
            field.controller().is_none(),
            "{field}: properties {names:?}, controller {:?}",
            field.controller()
        );
    }
    assert_eq!(
        cgroup_fields().collect::<Vec<_>>(),
        [Field::Cpu, Field::Memory, Field::MemoryHigh, Field::Pids]
    );
}
