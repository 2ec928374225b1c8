//! `cargo xtask fuzz`: the libFuzzer targets in `fuzz/` (config parser, value parsers,
//! protocol decoder) through cargo-fuzz on the machine's nightly. cargo-fuzz is installed
//! from the crate registry into ~/.cache/cargo-fuzz when missing. Each target runs on a
//! corpus kept across runs in ~/.cache/rlagent-fuzz/corpus/<target>: the committed seeds
//! (`fuzz/corpus/<target>`) are copied into it before every run, and what a run grows stays
//! there for the next one, so coverage accumulates instead of starting over from the seeds.
//! A run never changes the repository; a crash leaves its input under `fuzz/artifacts/` and
//! fails.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::run;

const CARGO_FUZZ_VERSION: &str = "0.13.2";
pub const TARGETS: [&str; 3] = ["config", "units", "protocol"];

fn cargo_fuzz() -> Result<PathBuf> {
    let root = crate::home().join(".cache/cargo-fuzz");
    let bin = root.join("bin/cargo-fuzz");
    let works = Command::new(&bin)
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !works {
        run(crate::cargo()
            .args([
                "install",
                "--locked",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--root",
            ])
            .arg(&root))?;
    }
    Ok(bin)
}

/// Runs every target for `seconds`; prints each one's executions and new coverage.
pub fn fuzz(seconds: u64) -> Result<()> {
    let cargo_fuzz = cargo_fuzz()?;
    let dir = crate::workspace_root().join("fuzz");
    let kept = crate::home().join(".cache/rlagent-fuzz/corpus");
    for target in TARGETS {
        let corpus = kept.join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let before = std::fs::read_dir(&corpus)?.count();
        // The seeds have names, libFuzzer's inputs are named by their hash: copying the
        // seeds again refreshes them and leaves what earlier runs grew.
        for seed in std::fs::read_dir(dir.join("corpus").join(target))
            .with_context(|| format!("the committed corpus of {target}"))?
        {
            let seed = seed?.path();
            std::fs::copy(&seed, corpus.join(seed.file_name().unwrap()))?;
        }
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "nightly"])
            .arg(&cargo_fuzz)
            .args(["fuzz", "run", "--sanitizer", "none", target])
            .arg(&corpus)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-print_final_stats=1",
            ])
            .current_dir(&dir);
        eprintln!("xtask: {cmd:?}");
        let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
            bail!(
                "fuzz target {target} failed: {} (its input is under fuzz/artifacts/{target})",
                out.status
            );
        }
        let runs = text
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        let corpus_size = std::fs::read_dir(&corpus)?.count();
        println!(
            "fuzz {target}: {seconds} s, {runs} executions, no crash; corpus {corpus_size} inputs \
             ({before} before this run, kept in {})",
            corpus.display()
        );
    }
    Ok(())
}
