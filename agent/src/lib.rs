//! rlagent: host-level resource enforcement (cgroup v2 quotas, per-UID connection caps in
//! eBPF). docs/architecture.md shows the data flow.
//!
//! Layers, each a folder, in the order the data flows:
//!
//! - `model`: vocabulary (quotas and units, targets, durations, alert rules, measured
//!   usage); no I/O, imports no other layer.
//! - `config`: TOML → validated `Config`; imports `model`.
//! - `desired`: `Config` + runtime overrides → `Desired` (cgroup plan, connection limits,
//!   alert rules), and the runtime state file; imports `model`, `config`.
//! - `kernel`: adapters (BPF, cgroups, placement, NSS) that take `Desired` and never see
//!   `Config`; imports `model`, `desired`.
//! - `observe`: the Stats model, tables, /metrics, the alert engine; imports `model`,
//!   `desired`.
//! - `agent`: reconcile and the composition root (`App`); imports everything above.
//! - `control`: the socket protocol, access, transport and handlers; imports `agent`,
//!   `observe` and the layers below them, never `kernel`.
//!
//! Nothing imports a layer that is not listed for it (a unit test below reads every
//! `use crate::` and `crate::` path and checks it).

pub mod agent;
pub mod config;
pub mod control;
pub mod desired;
pub mod kernel;
pub mod manpage;
pub mod model;
pub mod observe;

#[cfg(test)]
mod testing;

#[cfg(test)]
mod layering {
    use std::{collections::BTreeSet, path::Path};

    /// Which layers each layer may import.
    const ALLOWED: &[(&str, &[&str])] = &[
        ("model", &[]),
        ("config", &["model"]),
        ("desired", &["model", "config"]),
        ("kernel", &["model", "desired"]),
        ("observe", &["model", "desired"]),
        (
            "agent",
            &["model", "config", "desired", "kernel", "observe"],
        ),
        (
            "control",
            &["model", "config", "desired", "observe", "agent"],
        ),
    ];

    /// Layers named by `crate::<layer>` paths in `text` (the `use crate::{a::.., b::..}`
    /// form included), outside `#[cfg(test)]` modules.
    fn imports(text: &str) -> BTreeSet<String> {
        let code = match text.find("#[cfg(test)]\nmod tests") {
            Some(i) => &text[..i],
            None => text,
        };
        let mut found = BTreeSet::new();
        let layers: Vec<&str> = ALLOWED.iter().map(|(l, _)| *l).collect();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let mut names = Vec::new();
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a::x, b::{..}, c}`: the first segment of each top-level item.
                let mut depth = 0;
                let mut item = String::new();
                for ch in group.chars() {
                    match ch {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            names.push(std::mem::take(&mut item));
                            continue;
                        }
                        _ => {}
                    }
                    item.push(ch);
                }
                names.push(item);
            } else {
                names.push(rest.to_string());
            }
            for name in names {
                let first: String = name
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if layers.contains(&first.as_str()) {
                    found.insert(first);
                }
            }
        }
        found
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

    #[test]
    fn no_layer_imports_upward_or_sideways() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut violations = Vec::new();
        let mut checked = 0;
        for (layer, allowed) in ALLOWED {
            let mut files = Vec::new();
            rust_files(&src.join(layer), &mut files);
            assert!(!files.is_empty(), "layer {layer} has no files");
            for file in files {
                checked += 1;
                let text = std::fs::read_to_string(&file).unwrap();
                for import in imports(&text) {
                    if import != *layer && !allowed.contains(&import.as_str()) {
                        violations.push(format!("{} imports {import}", file.display()));
                    }
                }
            }
        }
        assert!(
            checked > 20,
            "only {checked} files found under {}",
            src.display()
        );
        assert!(violations.is_empty(), "{violations:#?}");
    }

    #[test]
    fn the_checker_sees_grouped_and_plain_paths() {
        let text = "use crate::{\n    config::Config,\n    model::{a, b},\n};\nfn f() { crate::kernel::x(); }\n#[cfg(test)]\nmod tests { use crate::agent::App; }";
        let found: Vec<String> = imports(text).into_iter().collect();
        assert_eq!(found, ["config", "kernel", "model"]);
    }
}
