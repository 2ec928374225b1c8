//! Debian packages xtask needs without installing them on the host: apt with a private
//! source list that adds bookworm-backports, `apt-get download` + `dpkg -x` into
//! ~/.cache/rlagent-vm, and the Prometheus tools the host tests use (promtool, prometheus,
//! Alertmanager).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::run;

pub fn cache() -> PathBuf {
    crate::home().join(".cache/rlagent-vm")
}

/// apt-get/apt-cache options that read the machine's sources plus bookworm-backports
/// from a private list, so the host's apt configuration is left as it is.
pub fn apt_options() -> Result<Vec<String>> {
    let dir = cache().join("apt");
    let parts = dir.join("sources");
    let lists = dir.join("lists");
    std::fs::create_dir_all(lists.join("partial"))?;
    std::fs::create_dir_all(&parts)?;
    let system = Path::new("/etc/apt/sources.list.d/debian.sources");
    let text =
        std::fs::read_to_string(system).with_context(|| format!("reading {}", system.display()))?;
    let uri = debian_mirror()?;
    std::fs::write(parts.join("debian.sources"), &text)?;
    std::fs::write(
        parts.join("backports.sources"),
        format!(
            "Types: deb\nURIs: {uri}\nSuites: bookworm-backports\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
    )?;
    let opts = vec![
        "-o".to_string(),
        "Dir::Etc::SourceList=/dev/null".to_string(),
        "-o".to_string(),
        format!("Dir::Etc::SourceParts={}", parts.display()),
        "-o".to_string(),
        format!("Dir::State::Lists={}", lists.display()),
    ];
    let fresh = std::fs::read_dir(&lists)?.flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .contains("bookworm-backports")
    });
    if !fresh {
        run(Command::new("apt-get").args(&opts).args(["update", "-qq"]))?;
    }
    Ok(opts)
}

/// Downloads `packages` (without installing them) and unpacks each into `dir/root`.
pub fn fetch_debs(dir: &Path, packages: &[&str]) -> Result<()> {
    let opts = apt_options()?;
    std::fs::create_dir_all(dir)?;
    run(Command::new("apt-get")
        .current_dir(dir)
        .args(&opts)
        .arg("download")
        .args(packages))?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            run(Command::new("dpkg")
                .arg("-x")
                .arg(&path)
                .arg(dir.join("root")))?;
        }
    }
    Ok(())
}

pub fn debian_mirror() -> Result<String> {
    let text = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")?;
    text.split("\n\n")
        .find(|stanza| {
            stanza
                .lines()
                .any(|l| l.starts_with("Suites:") && l.split_whitespace().any(|s| s == "bookworm"))
        })
        .and_then(|stanza| stanza.lines().find_map(|l| l.strip_prefix("URIs:")))
        .map(|u| u.trim().to_string())
        .context("no bookworm mirror in debian.sources")
}

/// promtool, unpacked from Debian's `prometheus` package into the cache (not installed:
/// installing would start a Prometheus server through its init script).
pub fn ensure_promtool() -> Result<PathBuf> {
    let dir = cache().join("prometheus");
    let promtool = dir.join("root/usr/bin/promtool");
    if !promtool.exists() {
        fetch_debs(&dir, &["prometheus"])?;
    }
    anyhow::ensure!(
        promtool.exists(),
        "the prometheus package has no usr/bin/promtool"
    );
    Ok(promtool)
}

/// Alertmanager, unpacked from Debian's `prometheus-alertmanager` package. Debian's build
/// reads its default template from /usr/share/prometheus/alertmanager, so the package's
/// data files are copied there; the package itself (and its service) is not installed.
pub fn ensure_alertmanager() -> Result<PathBuf> {
    let dir = cache().join("alertmanager");
    let binary = dir.join("root/usr/bin/prometheus-alertmanager");
    if !binary.exists() {
        fetch_debs(&dir, &["prometheus-alertmanager"])?;
    }
    let templates = Path::new("/usr/share/prometheus/alertmanager");
    if !templates.join("default.tmpl").exists() {
        std::fs::create_dir_all(templates)?;
        for name in ["default.tmpl", "email.tmpl"] {
            std::fs::copy(
                dir.join("root/usr/share/prometheus/alertmanager")
                    .join(name),
                templates.join(name),
            )?;
        }
    }
    anyhow::ensure!(
        binary.exists(),
        "the prometheus-alertmanager package has no usr/bin/prometheus-alertmanager"
    );
    Ok(binary)
}
