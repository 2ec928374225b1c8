//! The embedded eBPF object against the loader's lists, read with aya-obj (no kernel, no
//! root): a map or program added to `ebpf/` and not to [`MAPS`] or [`PROGRAMS`] would
//! go unpinned or unloaded, and a name in the lists the object lacks fails only at load.

use std::collections::BTreeSet;

use aya_obj::{
    programs::{CgroupSockAddrAttachType, CgroupSockAttachType},
    Object, ProgramSection,
};

use super::{attached_programs, ProgramKind, EBPF_OBJECT, MAPS, PROGRAMS};

fn object() -> Object {
    Object::parse(EBPF_OBJECT).expect("the embedded eBPF object parses")
}

/// The object's maps that hold globals (`.rodata`, `.bss`, `.data`), which aya creates
/// per load and never pins.
fn is_global_section(name: &str) -> bool {
    [".rodata", ".bss", ".data"]
        .iter()
        .any(|s| name == *s || name.starts_with(&format!("{s}.")))
}

#[test]
fn the_object_has_exactly_the_maps_the_loader_pins() {
    let object = object();
    let in_object: BTreeSet<&str> = object
        .maps
        .keys()
        .map(String::as_str)
        .filter(|n| !is_global_section(n))
        .collect();
    let pinned: BTreeSet<&str> = MAPS.into_iter().collect();
    assert_eq!(pinned.len(), MAPS.len(), "MAPS names a map twice: {MAPS:?}");
    assert_eq!(
        in_object, pinned,
        "the eBPF object's maps (left) differ from MAPS in agent/src/kernel/bpf/mod.rs (right)"
    );
}

#[test]
fn the_object_has_exactly_the_programs_the_loader_loads_with_their_kinds() {
    let object = object();
    let in_object: BTreeSet<&str> = object.programs.keys().map(String::as_str).collect();
    let loaded: BTreeSet<&str> = PROGRAMS.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        loaded.len(),
        PROGRAMS.len(),
        "PROGRAMS names a program twice"
    );
    assert_eq!(
        in_object, loaded,
        "the eBPF object's programs (left) differ from PROGRAMS in agent/src/kernel/bpf/mod.rs (right)"
    );
    for (name, kind) in PROGRAMS {
        let section = &object.programs[name].section;
        let fits = match kind {
            ProgramKind::SockAddr => matches!(
                section,
                ProgramSection::CgroupSockAddr {
                    attach_type: CgroupSockAddrAttachType::Connect4
                        | CgroupSockAddrAttachType::Connect6
                }
            ),
            ProgramKind::Sock => matches!(
                section,
                ProgramSection::CgroupSock {
                    attach_type: CgroupSockAttachType::SockRelease
                }
            ),
            ProgramKind::TestRun => matches!(section, ProgramSection::SocketFilter),
        };
        assert!(
            fits,
            "program {name} is listed as {kind:?} but the object has it as {section:?}"
        );
    }
}

#[test]
fn sock_release_is_attached_before_the_connect_programs() {
    let order: Vec<ProgramKind> = attached_programs()
        .map(|name| PROGRAMS.iter().find(|(n, _)| *n == name).unwrap().1)
        .collect();
    let release = order.iter().position(|k| *k == ProgramKind::Sock);
    let first_connect = order.iter().position(|k| *k == ProgramKind::SockAddr);
    assert!(
        matches!((release, first_connect), (Some(r), Some(c)) if r < c),
        "PROGRAMS must list the sock_release program before the connect programs: {PROGRAMS:?}"
    );
}
