//! `cargo xtask <task>`: everything a developer or CI runs, in one place.
//!
//! - `setup`: installs what a fresh machine lacks for the eBPF build (nightly's rust-src,
//!   bpf-linker linked against nightly's own libLLVM, cached under ~/.cache/bpf-tools).
//! - `test`: setup, then formatting, clippy (also on the eBPF programs, for their target),
//!   the build and every test (unit and privileged).
//! - `run`: setup, release build, then runs `rlagent` with the given arguments.
//! - `bench connect`: setup, release build, then the paired A/B connect() benchmark.
//! - `vm-test`: the guest tests in a qemu guest with pure cgroup v2 (see vm.rs); with
//!   `--systemd` the service on a systemd login node, with `--deb` the Debian package.
//! - `deb`: the Debian package and the static tarball (see package.rs).
//! - `fuzz`: the cargo-fuzz targets in fuzz/ (see fuzz.rs); `test` runs them briefly.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod debs;
mod fuzz;
mod install;
mod package;
mod vm;

const BPF_LINKER_VERSION: &str = "0.13.0";
/// How long `cargo xtask test` runs each fuzz target (`cargo xtask fuzz` runs longer).
const FUZZ_SECONDS_IN_TEST: u64 = 20;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain pieces (idempotent)
    Setup,
    /// Setup, fmt check, clippy, build, every host test, the guest tests, then the
    /// systemd guest and the package guest
    Test,
    /// The guest tests in a qemu guest (cgroup v2 quotas, host-wide BPF); extra arguments
    /// go to the test harness (e.g. a test name filter)
    VmTest {
        /// Boot a Debian systemd guest instead, install with `xtask install` and check
        /// the service (READY, socket, rlctl, restart, reload)
        #[arg(long)]
        systemd: bool,
        /// Boot the systemd guest and check the Debian package: install, upgrade, remove,
        /// purge
        #[arg(long, conflicts_with = "systemd")]
        deb: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install binaries, systemd unit, sysusers/tmpfiles entries, default config,
    /// completions and man page (as root; --destdir to stage into a directory)
    Install {
        #[arg(long)]
        destdir: Option<PathBuf>,
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
    },
    /// Setup, release build, then run rlagent with these arguments
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The fuzz targets (config, value parsers, protocol) for a while each, from the
    /// committed corpus; a crash fails
    Fuzz {
        /// Seconds per target
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
    /// The Debian package and the static tarball, into target/dist (cargo-deb, from the
    /// musl release binaries)
    Deb {
        /// The package version (default: the crate's, revision 1)
        #[arg(long)]
        deb_version: Option<String>,
        /// "Name <user@host>" in the Maintainer field and the changelog (default:
        /// DEBFULLNAME and DEBEMAIL, else a placeholder in the reserved .invalid domain)
        #[arg(long)]
        maintainer: Option<String>,
    },
    /// Setup, release build, then a benchmark (needs root)
    Bench {
        /// Which benchmark: connect, compare, control, metrics, integrity, events, churn,
        /// idle, contain (the penalty box in the systemd guest)
        name: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    env::set_current_dir(&root)?;
    match cli.task {
        Task::Setup => setup(),
        Task::Test => {
            setup()?;
            run(cargo().args(["fmt", "--all", "--", "--check"]))?;
            run(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            run(&mut ebpf_clippy())?;
            // The privileged tests start the real binaries; build them first.
            run(cargo().args(["build", "--workspace", "--bins"]))?;
            let promtool = debs::ensure_promtool()?;
            let alertmanager = debs::ensure_alertmanager()?;
            let validate = ensure_kubernetes_validate()?;
            run(cargo()
                .args(["test", "--workspace"])
                .env("RLAGENT_PROMETHEUS", promtool.with_file_name("prometheus"))
                .env("RLAGENT_PROMTOOL", promtool)
                .env("RLAGENT_ALERTMANAGER", alertmanager)
                .env("RLAGENT_KUBERNETES_VALIDATE", validate))?;
            fuzz::fuzz(FUZZ_SECONDS_IN_TEST)?;
            vm::vm_test(&[])?;
            vm::vm_test_systemd()?;
            vm::vm_test_deb()
        }
        Task::Deb {
            deb_version,
            maintainer,
        } => {
            let maintainer = package::maintainer(maintainer.as_deref())?;
            setup()?;
            package::build(deb_version.as_deref(), &maintainer).map(|_| ())
        }
        Task::Fuzz { seconds } => {
            setup()?;
            fuzz::fuzz(seconds)
        }
        Task::Install { destdir, prefix } => {
            setup()?;
            install::install(install::Options {
                destdir,
                prefix,
                bin_dir: None,
            })
        }
        Task::VmTest { systemd, deb, args } => {
            setup()?;
            if deb {
                vm::vm_test_deb()
            } else if systemd {
                vm::vm_test_systemd()
            } else {
                vm::vm_test(&args)
            }
        }
        Task::Run { args } => {
            setup()?;
            run(cargo().args(["build", "--release", "--bin", "rlagent"]))?;
            run(Command::new(root.join("target/release/rlagent")).args(args))
        }
        Task::Bench { name, args } => {
            setup()?;
            if name == "contain" {
                // In the systemd guest, not on the host.
                return vm::bench_contain();
            }
            if name == "compare" {
                ensure_netfilter()?;
            }
            run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
            run(Command::new(root.join("target/release/rlagent-bench"))
                .arg(name)
                .args(args))
        }
    }
}

/// iptables and nft for `bench compare` (its netfilter arms), from Debian when missing.
fn ensure_netfilter() -> Result<()> {
    if vm::have("iptables") && vm::have("nft") {
        return Ok(());
    }
    run(Command::new("apt-get")
        .args(debs::apt_options()?)
        .args(["install", "-y", "-q", "iptables", "nftables"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// kubernetes-validate (from PyPI; it carries the Kubernetes schemas, so validation needs
/// no cluster or network) in a venv under the cache.
fn ensure_kubernetes_validate() -> Result<PathBuf> {
    const VERSION: &str = "1.37.0";
    let venv = debs::cache().join(format!("kubernetes-validate-{VERSION}"));
    let bin = venv.join("bin/kubernetes-validate");
    if bin.exists() {
        return Ok(bin);
    }
    let _ = std::fs::remove_dir_all(&venv);
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "-q",
        &format!("kubernetes-validate=={VERSION}"),
    ]))?;
    Ok(bin)
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.env("PATH", path_with(&bpf_tools().join("bin")));
    cmd
}

/// Clippy on the eBPF programs, which compile only for the BPF target (a host clippy run
/// sees an empty crate): on nightly, for that target, with the flags agent/build.rs builds
/// them with, in a target directory of its own so the build's stays fresh. Only the
/// workspace's deny lints fail it (`undocumented_unsafe_blocks`).
fn ebpf_clippy() -> Command {
    let rustflags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
        "-Ctarget-cpu=v3",
    ]
    .join("\x1f");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "clippy", "--release"])
        .args(["-p", "rlagent-ebpf", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core", "--target-dir", "target/bpf-clippy"])
        .env("PATH", path_with(&bpf_tools().join("bin")))
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // As in agent/build.rs: the stable toolchain's settings must not reach nightly.
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
    cmd
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn home() -> PathBuf {
    env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
}

fn bpf_tools() -> PathBuf {
    home().join(".cache/bpf-tools")
}

fn path_with(dir: &Path) -> std::ffi::OsString {
    let mut dirs = vec![dir.to_path_buf()];
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    env::join_paths(dirs).unwrap()
}

/// rust-src for nightly, and bpf-linker built against nightly's own libLLVM (Debian's LLVM
/// is too old to read nightly's bitcode). Rebuilds bpf-linker when nightly's LLVM changes.
fn setup() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context("the machine's nightly toolchain is needed for the eBPF programs")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    let version = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("nightly rustc does not say its LLVM version")?
        .to_string();
    let tools = bpf_tools();
    let stamp = tools.join("stamp");
    let want_stamp = format!("bpf-linker {BPF_LINKER_VERSION}\n{version}");
    let linker = tools.join("bin/bpf-linker");
    let works = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works && std::fs::read_to_string(&stamp).is_ok_and(|s| s == want_stamp) {
        return Ok(());
    }

    // bpf-linker only needs $LLVM_PREFIX/lib/libLLVM.so plus the soname file.
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let llvm_lib = tools.join("llvm/lib");
    std::fs::create_dir_all(&llvm_lib)?;
    let mut found = false;
    for entry in std::fs::read_dir(Path::new(sysroot.trim()).join("lib"))? {
        let path = entry?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("libLLVM.so") || name.starts_with("libLLVM-") {
            for link in [llvm_lib.join(&name), llvm_lib.join("libLLVM.so")] {
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(&path, &link)?;
            }
            found = true;
        }
    }
    if !found {
        bail!("no libLLVM in nightly's sysroot {}", sysroot.trim());
    }
    run(
        Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .arg("--root")
            .arg(&tools)
            .env("LLVM_PREFIX", tools.join("llvm"))
            // Debian's llvm-config (LLVM 14) must not be picked up.
            .env_remove("LLVM_SYS_140_PREFIX"),
    )?;
    std::fs::write(&stamp, want_stamp)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Lines of non-test code (not blank, not a comment) above which a file must say why.
    const LONG: usize = 400;

    /// The lines of code of a file's text: neither blank nor a comment, above its inline
    /// test module (`#[cfg(test)]` then `mod name {`; an out-of-line `mod tests;` is not
    /// its end).
    fn code_lines(text: &str) -> usize {
        let lines: Vec<&str> = text.lines().collect();
        let end = lines
            .windows(2)
            .position(|w| {
                w[0].starts_with("#[cfg(test)]")
                    && w[1].starts_with("mod ")
                    && w[1].trim_end().ends_with('{')
            })
            .unwrap_or(lines.len());
        lines[..end]
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty() && !l.starts_with("//"))
            .count()
    }

    fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The names of the functions marked `#[test]` (and not `#[ignore]`) in `text`.
    fn test_functions(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut attrs: Vec<&str> = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with("#[") {
                attrs.push(line);
                continue;
            }
            if let Some(rest) = line.strip_prefix("fn ") {
                let is_test =
                    attrs.contains(&"#[test]") && !attrs.iter().any(|a| a.starts_with("#[ignore"));
                if is_test {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    out.push(name);
                }
            }
            if !line.starts_with("//") {
                attrs.clear();
            }
        }
        out
    }

    #[test]
    fn every_test_the_readme_capability_table_names_exists() {
        let root = super::workspace_root();
        let mut files = Vec::new();
        for dir in [
            "agent/src",
            "common/src",
            "tests/src",
            "tests/tests",
            "xtask/src",
        ] {
            rust_files(&root.join(dir), &mut files);
        }
        let tests: Vec<String> = files
            .iter()
            .flat_map(|f| test_functions(&std::fs::read_to_string(f).unwrap()))
            .collect();
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        // Guest-script checks are labelled `# check: <name>` in xtask/src/vm.rs.
        let vm_scripts = std::fs::read_to_string(root.join("xtask/src/vm.rs")).unwrap();
        let rows: Vec<&str> = readme
            .lines()
            .skip_while(|l| *l != "| capability | status | tests |")
            .skip(2)
            .take_while(|l| l.starts_with("| "))
            .collect();
        assert!(
            rows.len() >= 20,
            "the capability table has {} rows",
            rows.len()
        );
        let mut wrong = Vec::new();
        for row in &rows {
            let column = row.trim_end_matches(" |").rsplit(" | ").next().unwrap();
            let named: Vec<&str> = column.split('`').skip(1).step_by(2).collect();
            if named.is_empty() {
                wrong.push(format!("a row names no test: {row}"));
            }
            for name in named {
                let script_check = name
                    .strip_prefix("vm-test --systemd: ")
                    .or_else(|| name.strip_prefix("vm-test --deb: "));
                let found = if let Some(rest) = name.strip_prefix("promtool: ") {
                    // A rule test file, and the alert it is named for, if any.
                    let (file, alert) = rest.split_once(' ').unwrap_or((rest, ""));
                    std::fs::read_to_string(root.join("deploy/prometheus").join(file))
                        .is_ok_and(|text| text.contains(alert))
                } else if let Some(target) = name.strip_prefix("fuzz: ") {
                    root.join("fuzz/fuzz_targets")
                        .join(format!("{target}.rs"))
                        .is_file()
                } else if let Some(check) = script_check {
                    // A check of a guest script, labelled where it runs.
                    vm_scripts.lines().any(|l| l == format!("# check: {check}"))
                } else {
                    tests.iter().any(|t| t == name)
                };
                if !found {
                    wrong.push(format!("`{name}` is not a test here"));
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn code_lines_skip_blanks_comments_and_the_inline_test_module_only() {
        let text = "//! doc\nfn a() {}\n\n// note\n#[cfg(test)]\nmod tests;\nfn b() {}\n#[cfg(test)]\nmod tests {\nfn c() {}\n}\n";
        assert_eq!(code_lines(text), 4);
    }

    #[test]
    fn test_functions_are_found_with_their_attributes() {
        let text = "#[test]\nfn a() {}\n#[test]\n#[ignore]\nfn b() {}\nfn c() {}\n#[test]\n// why\n#[should_panic]\nfn d() {}\n";
        assert_eq!(test_functions(text), ["a", "d"]);
    }

    #[test]
    fn every_file_over_400_lines_of_code_says_why_in_its_first_three_lines() {
        let root = super::workspace_root();
        let mut files = Vec::new();
        // tests/tests holds integration tests only: test code.
        for dir in [
            "agent/src",
            "common/src",
            "ebpf/src",
            "xtask/src",
            "tests/src",
        ] {
            rust_files(&root.join(dir), &mut files);
        }
        assert!(files.len() > 50, "{files:?}");
        let mut silent = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            let code = code_lines(&text);
            let says_why = text
                .lines()
                .take(3)
                .any(|l| l.starts_with("// Why this file is long: "));
            if code > LONG && !says_why {
                silent.push(format!("{} ({code} lines)", path.display()));
            }
        }
        assert!(
            silent.is_empty(),
            "over {LONG} lines of code, with no `// Why this file is long: ` in the first three lines:\n{}",
            silent.join("\n")
        );
    }
}
