//! Tests that only make sense on a pure cgroup v2 kernel: they run inside the qemu guest
//! that `cargo xtask vm-test` boots (never in a host `cargo test`; this target has
//! `test = false`). The guest is throw-away, so here the agent may attach at the root
//! cgroup and place processes host-wide.

use rlagent_tests::{Agent, Connect, Helper, Listener, Scratch};

fn in_guest() {
    assert_eq!(
        std::env::var("RLAGENT_GUEST").as_deref(),
        Ok("1"),
        "guest tests run only inside the qemu guest: use `cargo xtask vm-test`"
    );
}

fn write_config(scratch: &Scratch, text: &str) {
    let full = format!(
        "[bpf]\npin_path = \"{}\"\n{text}",
        scratch.pin_path().display()
    );
    std::fs::write(scratch.config_path(), full).unwrap();
}

#[test]
fn host_wide_connection_cap_at_the_root_cgroup() {
    in_guest();
    let scratch = Scratch::new();
    write_config(
        &scratch,
        "attach_cgroup = \"/\"\n[[quota]]\ntarget = \"user:*\"\nconns = 2\n",
    );
    let _agent = Agent::start(&scratch);
    let listener = Listener::new();
    // The helper stays in its own (root) cgroup: host-wide attach covers every cgroup.
    let root = std::path::Path::new("/sys/fs/cgroup");
    let mut h = Helper::spawn(root, 2000);
    assert!(h.connect("tcp4", listener.port4).is_ok());
    assert!(h.connect("tcp6", listener.port6).is_ok());
    assert!(matches!(
        h.connect("tcp4", listener.port4),
        Connect::Err(libc::EPERM, _)
    ));
    let mut other = Helper::spawn(root, 2001);
    assert!(
        other.connect("tcp4", listener.port4).is_ok(),
        "caps are per UID"
    );
    h.close_all();
    scratch.wait_live(2000, 0);
}
