//! Builds the eBPF programs (`ebpf/`) for `bpfel-unknown-none` with the nightly toolchain
//! and bpf-linker, so that a plain `cargo build` of the agent embeds them.
//!
//! Not aya-build: it hard-codes the eBPF RUSTFLAGS, and we need `-C target-cpu=v3`
//! (with the default v1 CPU, a fetch-add whose result is used fails to link).
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const EBPF_PACKAGE: &str = "rlagent-ebpf";
const EBPF_TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    for dir in [
        "ebpf/src",
        "ebpf/Cargo.toml",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=RLAGENT_BPF_LINKER_DIR");

    let target_dir = workspace.join("target").join("bpf");
    let rustflags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
        "-Ctarget-cpu=v3",
    ]
    .join("\x1f");

    let mut cmd = Command::new("rustup");
    cmd.current_dir(&workspace)
        .args(["run", "nightly", "cargo", "build", "--release", "--bins"])
        .args([
            "-p",
            EBPF_PACKAGE,
            "--target",
            EBPF_TARGET,
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env("PATH", path_with_bpf_linker());
    // The outer cargo (or clippy) sets these for the stable toolchain; the nested nightly
    // build must not inherit them.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let inherited_cargo =
            key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_ENCODED_RUSTFLAGS";
        if inherited_cargo
            || key.starts_with("RUSTC")
            || key == "RUSTUP_TOOLCHAIN"
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "rlagent build: cannot run `rustup run nightly cargo` to build the eBPF programs: {e}"
        )
    });
    if !status.success() {
        panic!(
            "rlagent build: building the eBPF programs failed ({status}). They need the nightly \
             toolchain with rust-src and bpf-linker: run `cargo xtask setup` (or .ci/run) once."
        );
    }
    let object = target_dir
        .join(EBPF_TARGET)
        .join("release")
        .join(EBPF_PACKAGE);
    std::fs::copy(&object, out_dir.join("rlagent-ebpf.o"))
        .unwrap_or_else(|e| panic!("rlagent build: copying {} failed: {e}", object.display()));
}

/// PATH with the cached bpf-linker (installed by `cargo xtask setup`) in front.
fn path_with_bpf_linker() -> std::ffi::OsString {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = env::var_os("RLAGENT_BPF_LINKER_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cache/bpf-tools/bin"));
    }
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    env::join_paths(dirs).expect("PATH entries are valid")
}
