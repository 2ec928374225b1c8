// Why this file is long: it is test code only (lib.rs declares it under #[cfg(test)]): the
// layer table, a small path resolver and the checks, each test saying what it forbids.
//! The layering of lib.rs, checked against the source: every path a file names through
//! `crate::`, `super::` or `self::` (`use` trees included) is resolved to the module it
//! reaches, and
//!
//! - no layer reaches a layer it may not import ([`ALLOWED`]);
//! - every top-level entry of `src/` is in [`ALLOWED`] or exempt with a reason ([`EXEMPT`]);
//! - no two modules of one layer (`kernel::placement`, `kernel::systemd`: the first path
//!   component below the layer) import each other, directly or around a circle.
//!
//! Test code (`#[cfg(test)]` items and the files of `#[cfg(test)] mod x;`) is left out: tests
//! may use the fakes of any layer. Comments and string literals are skipped. Not seen: an
//! item reached through a re-export (`crate::kernel::ConnLimiter` is an item of `kernel`,
//! not of `kernel::bpf`), and macros that build paths.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Which layers (and other top-level modules) each may import.
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
    // The binaries' man pages: clap definitions to roff; imports no layer, no layer
    // imports it.
    ("manpage", &[]),
];

/// Entries of `src/` that are not modules of [`ALLOWED`], and why.
const EXEMPT: &[(&str, &str)] = &[
    ("lib.rs", "the crate root: it declares the modules"),
    (
        "bin",
        "the binaries: crates of their own, using the library's public API",
    ),
    (
        "testing.rs",
        "unit-test fixtures (cfg(test) only), with fakes of several layers",
    ),
    ("layering.rs", "this test (cfg(test) only)"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

/// The tokens of Rust source, without comments, string, byte-string and char literals,
/// and lifetimes.
fn tokenize(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    let mut tokens = Vec::new();
    let mut i = 0;
    // Skips a quoted literal whose opening quote is at `i`, escapes included.
    let skip_quoted = |mut i: usize, quote: char| {
        i += 1;
        while i < chars.len() && chars[i] != quote {
            i += if chars[i] == '\\' { 2 } else { 1 };
        }
        i + 1
    };
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_quoted(i, '"');
        } else if c == '\'' {
            if at(i + 1) == '\\' {
                i = skip_quoted(i, '\'');
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                // A lifetime or label.
                i += 1;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
            }
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let ident_char = |c: char| c.is_alphanumeric() || c == '_';
            match (word.as_str(), at(i)) {
                ("r", '#') if ident_char(at(i + 1)) => {
                    // A raw identifier: r#name.
                    i += 1;
                    let start = i;
                    while ident_char(at(i)) {
                        i += 1;
                    }
                    tokens.push(Token::Ident(chars[start..i].iter().collect()));
                }
                ("r" | "br", '"' | '#') => {
                    // A raw string: r"..", r#".."#, br"..".
                    let mut hashes = 0;
                    while at(i) == '#' {
                        hashes += 1;
                        i += 1;
                    }
                    i += 1;
                    while i < chars.len() {
                        if chars[i] == '"' && (1..=hashes).all(|h| at(i + h) == '#') {
                            i += 1 + hashes;
                            break;
                        }
                        i += 1;
                    }
                }
                ("b", '"') => i = skip_quoted(i, '"'),
                ("b", '\'') => i = skip_quoted(i, '\''),
                _ => tokens.push(Token::Ident(word)),
            }
        } else if c == ':' && at(i + 1) == ':' {
            tokens.push(Token::PathSep);
            i += 2;
        } else {
            tokens.push(Token::Punct(c));
            i += 1;
        }
    }
    tokens
}

fn is_ident(token: Option<&Token>, name: &str) -> bool {
    matches!(token, Some(Token::Ident(n)) if n == name)
}

/// Parses the path or `use` tree starting at `tokens[i]`, adds every path it names (each
/// after `prefix`) to `out`, and returns the index after it.
fn use_tree(
    tokens: &[Token],
    mut i: usize,
    prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    let mut path = prefix;
    loop {
        match tokens.get(i) {
            Some(Token::Ident(name)) => {
                path.push(name.clone());
                i += 1;
            }
            Some(Token::Punct('*')) => {
                path.push("*".to_string());
                i += 1;
            }
            Some(Token::Punct('{')) => {
                i += 1;
                loop {
                    if matches!(tokens.get(i), Some(Token::Punct('}'))) {
                        return i + 1;
                    }
                    i = use_tree(tokens, i, path.clone(), out);
                    match tokens.get(i) {
                        Some(Token::Punct(',')) => i += 1,
                        Some(Token::Punct('}')) => return i + 1,
                        _ => return i,
                    }
                }
            }
            _ => {}
        }
        if tokens.get(i) == Some(&Token::PathSep) {
            i += 1;
            continue;
        }
        if is_ident(tokens.get(i), "as") {
            i += 2;
        }
        out.push(path);
        return i;
    }
}

/// The absolute module path (below the crate root) that `path`, written in `module`,
/// names; None when it climbs above the crate root.
fn resolve(module: &[String], path: &[String]) -> Option<Vec<String>> {
    let mut segments: Vec<&String> = path.iter().filter(|s| *s != "self").collect();
    if segments.first().is_some_and(|s| *s == "crate") {
        return Some(segments.drain(1..).cloned().collect());
    }
    let up = segments.iter().take_while(|s| **s == "super").count();
    let base = module.len().checked_sub(up)?;
    Some(
        module[..base]
            .iter()
            .chain(segments.into_iter().skip(up))
            .cloned()
            .collect(),
    )
}

/// What one file's code (outside test code) names: absolute paths, and the modules it
/// declares as test-only (`#[cfg(test)] mod x;`), both as module paths below the crate
/// root. `module` is the file's own module path.
#[derive(Debug, Default)]
struct FileRefs {
    paths: Vec<Vec<String>>,
    test_modules: Vec<Vec<String>>,
}

fn file_refs(module: &[String], text: &str) -> FileRefs {
    let tokens = tokenize(text);
    let mut refs = FileRefs::default();
    let mut depth = 0usize;
    // Inline modules open around the current token: name and the depth inside them.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let current = |inline: &[(String, usize)]| -> Vec<String> {
        module
            .iter()
            .cloned()
            .chain(inline.iter().map(|(n, _)| n.clone()))
            .collect()
    };
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Punct('#') if tokens.get(i + 1) == Some(&Token::Punct('[')) => {
                let end = matching(&tokens, i + 1, '[', ']');
                let cfg_test = tokens[i + 2..end]
                    == [
                        Token::Ident("cfg".into()),
                        Token::Punct('('),
                        Token::Ident("test".into()),
                        Token::Punct(')'),
                    ];
                i = end + 1;
                if cfg_test {
                    if let Some(name) = external_module(&tokens, i) {
                        let mut path = current(&inline);
                        path.push(name);
                        refs.test_modules.push(path);
                    }
                    i = item_end(&tokens, i);
                }
                continue;
            }
            Token::Ident(kw) if kw == "mod" => {
                if let (Some(Token::Ident(name)), Some(Token::Punct('{'))) =
                    (tokens.get(i + 1), tokens.get(i + 2))
                {
                    depth += 1;
                    inline.push((name.clone(), depth));
                    i += 3;
                    continue;
                }
            }
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Token::Ident(start)
                if ["crate", "super", "self"].contains(&start.as_str())
                    && tokens.get(i + 1) == Some(&Token::PathSep)
                    && (i == 0 || tokens[i - 1] != Token::PathSep) =>
            {
                let mut paths = Vec::new();
                i = use_tree(&tokens, i, Vec::new(), &mut paths);
                let here = current(&inline);
                refs.paths
                    .extend(paths.iter().filter_map(|p| resolve(&here, p)));
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    refs
}

/// The index of the bracket that closes the one at `open`.
fn matching(tokens: &[Token], open: usize, left: char, right: char) -> usize {
    let mut depth = 0;
    for (i, token) in tokens.iter().enumerate().skip(open) {
        if *token == Token::Punct(left) {
            depth += 1;
        } else if *token == Token::Punct(right) {
            depth -= 1;
            if depth == 0 {
                return i;
            }
        }
    }
    tokens.len()
}

/// The index after the item starting at `start` (attributes included): after its `;` or
/// its closing brace, whichever comes first.
fn item_end(tokens: &[Token], start: usize) -> usize {
    let mut depth = 0;
    for (i, token) in tokens.iter().enumerate().skip(start) {
        match token {
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            Token::Punct(';') if depth == 0 => return i + 1,
            _ => {}
        }
    }
    tokens.len()
}

/// `x` when the item at `start` is `mod x;` (after other attributes and a visibility).
fn external_module(tokens: &[Token], mut i: usize) -> Option<String> {
    loop {
        match tokens.get(i)? {
            Token::Punct('#') => i = matching(tokens, i + 1, '[', ']') + 1,
            Token::Ident(v) if v == "pub" => {
                i += 1;
                if tokens.get(i) == Some(&Token::Punct('(')) {
                    i = matching(tokens, i, '(', ')') + 1;
                }
            }
            Token::Ident(m) if m == "mod" => {
                return match (tokens.get(i + 1), tokens.get(i + 2)) {
                    (Some(Token::Ident(name)), Some(Token::Punct(';'))) => Some(name.clone()),
                    _ => None,
                };
            }
            _ => return None,
        }
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The module path of a file below `src/` (`kernel/bpf/mod.rs` is `kernel::bpf`).
fn module_of(file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src()).unwrap().with_extension("");
    let mut module: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if module.last().is_some_and(|m| m == "mod") {
        module.pop();
    }
    module
}

/// Every non-test file of the top-level modules of [`ALLOWED`], with what it names.
fn sources() -> Vec<(PathBuf, Vec<String>, FileRefs)> {
    let mut files = Vec::new();
    for (name, _) in ALLOWED {
        let dir = src().join(name);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        } else {
            files.push(src().join(format!("{name}.rs")));
        }
    }
    let scanned: Vec<_> = files
        .into_iter()
        .map(|file| {
            let module = module_of(&file);
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let refs = file_refs(&module, &text);
            (file, module, refs)
        })
        .collect();
    let tests: Vec<Vec<String>> = scanned
        .iter()
        .flat_map(|(_, _, refs)| refs.test_modules.clone())
        .collect();
    scanned
        .into_iter()
        .filter(|(_, module, _)| !tests.iter().any(|t| module.starts_with(t)))
        .collect()
}

fn display(file: &Path) -> String {
    file.strip_prefix(src())
        .unwrap_or(file)
        .display()
        .to_string()
}

#[test]
fn no_layer_imports_upward_or_sideways() {
    let mut violations = Vec::new();
    let files = sources();
    assert!(files.len() > 20, "only {} files found", files.len());
    for (file, module, refs) in &files {
        let layer = &module[0];
        let allowed = ALLOWED.iter().find(|(l, _)| l == layer).unwrap().1;
        for path in &refs.paths {
            let Some(target) = path.first() else { continue };
            if target == layer || allowed.contains(&target.as_str()) {
                continue;
            }
            let why = if ALLOWED.iter().any(|(l, _)| l == target) {
                "a layer it may not import"
            } else {
                "not a module of the layer table (a crate-root item or re-export hides its layer)"
            };
            violations.push(format!(
                "{} ({layer}) names {}: {why}",
                display(file),
                path.join("::")
            ));
        }
    }
    assert!(violations.is_empty(), "{violations:#?}");
}

#[test]
fn every_entry_of_src_is_a_layer_or_exempt() {
    let mut unlisted = Vec::new();
    let mut seen = BTreeSet::new();
    for entry in std::fs::read_dir(src()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let module = if entry.path().is_dir() {
            Some(name.clone())
        } else {
            name.strip_suffix(".rs").map(str::to_string)
        };
        let listed = module
            .as_deref()
            .is_some_and(|m| ALLOWED.iter().any(|(l, _)| *l == m));
        let exempt = EXEMPT.iter().any(|(e, _)| *e == name);
        if listed || exempt {
            seen.insert(if listed { module.unwrap() } else { name });
        } else {
            unlisted.push(name);
        }
    }
    assert!(
        unlisted.is_empty(),
        "entries of {} in neither ALLOWED nor EXEMPT (agent/src/layering.rs): {unlisted:?}",
        src().display()
    );
    let missing: Vec<&str> = ALLOWED
        .iter()
        .map(|(l, _)| *l)
        .chain(EXEMPT.iter().map(|(e, _)| *e))
        .filter(|n| !seen.contains(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "listed in layering.rs but not in src/: {missing:?}"
    );
}

/// The sets of nodes that reach each other (strongly connected components of more than
/// one node) in the graph of `edges`.
fn cycles(edges: &BTreeMap<(String, String), BTreeSet<String>>) -> BTreeSet<BTreeSet<String>> {
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(node) = todo.pop() {
            for (a, b) in edges.keys() {
                if *a == node && seen.insert(b.clone()) {
                    todo.push(b.clone());
                }
            }
        }
        seen
    };
    let nodes: BTreeSet<&String> = edges.keys().map(|(a, _)| a).collect();
    let reached: BTreeMap<&String, BTreeSet<String>> =
        nodes.iter().map(|n| (*n, reach(n))).collect();
    nodes
        .iter()
        .map(|a| {
            reached[a]
                .iter()
                .filter(|b| reached.get(b).is_some_and(|r| r.contains(*a)))
                .cloned()
                .collect::<BTreeSet<String>>()
        })
        .filter(|scc| scc.len() > 1)
        .collect()
}

#[test]
fn no_modules_of_one_layer_import_each_other_in_a_circle() {
    // (layer, from module, to module) -> the files that import.
    let mut edges: BTreeMap<String, BTreeMap<(String, String), BTreeSet<String>>> = BTreeMap::new();
    for (file, module, refs) in sources() {
        let (layer, Some(from)) = (&module[0], module.get(1)) else {
            continue;
        };
        for path in &refs.paths {
            let (Some(target), Some(to)) = (path.first(), path.get(1)) else {
                continue;
            };
            let dir = src().join(layer);
            let is_module = dir.join(to).is_dir() || dir.join(format!("{to}.rs")).is_file();
            if target == layer && to != from && is_module {
                edges
                    .entry(layer.clone())
                    .or_default()
                    .entry((from.clone(), to.clone()))
                    .or_default()
                    .insert(display(&file));
            }
        }
    }
    let mut circles = Vec::new();
    for (layer, edges) in &edges {
        for cycle in cycles(edges) {
            let imports: Vec<String> = edges
                .iter()
                .filter(|((a, b), _)| cycle.contains(a) && cycle.contains(b))
                .map(|((a, b), files)| format!("{a} -> {b} in {files:?}"))
                .collect();
            circles.push(format!("{layer}: {cycle:?}: {}", imports.join("; ")));
        }
    }
    assert!(
        circles.is_empty(),
        "modules of one layer that import each other (around a circle):\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_checker_sees_grouped_plain_and_relative_paths() {
    let text = r#"
use crate::{
    config::Config,
    model::{a, b},
};
use super::super::observe::Stats;
use super::{self as parent, sibling::{x, y}};
// crate::agent::App in a comment
fn f() -> &'static str { crate::kernel::x(); "crate::control" }
#[cfg(test)]
fn only_in_tests() { crate::control::y(); }
mod inner {
    fn g() { super::super::nss::n(); }
}
#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod tests { use crate::agent::App; }
"#;
    let module: Vec<String> = ["kernel", "bpf", "pins"].map(String::from).to_vec();
    let refs = file_refs(&module, text);
    let found: BTreeSet<String> = refs.paths.iter().map(|p| p.join("::")).collect();
    let expected: BTreeSet<String> = [
        "config::Config",
        "model::a",
        "model::b",
        "kernel::observe::Stats",
        "kernel::bpf",
        "kernel::bpf::sibling::x",
        "kernel::bpf::sibling::y",
        "kernel::x",
        "kernel::bpf::nss::n",
    ]
    .map(String::from)
    .into();
    assert_eq!(found, expected);
    assert_eq!(
        refs.test_modules,
        [["kernel", "bpf", "pins", "fixtures"]
            .map(String::from)
            .to_vec()]
    );
}

#[test]
fn super_paths_that_climb_out_of_the_layer_are_resolved() {
    let module: Vec<String> = ["kernel", "bpf", "pins"].map(String::from).to_vec();
    let refs = file_refs(&module, "use super::super::super::observe::{stats::Stats};");
    assert_eq!(
        refs.paths,
        [["observe", "stats", "Stats"].map(String::from).to_vec()]
    );
    let refs = file_refs(&module, "fn f() { super::super::super::super::x(); }");
    assert!(refs.paths.is_empty(), "{:?}", refs.paths);
}

#[test]
fn cycles_are_found_around_a_circle_and_not_along_a_line() {
    let edges = |pairs: &[(&str, &str)]| -> BTreeMap<(String, String), BTreeSet<String>> {
        pairs
            .iter()
            .map(|(a, b)| ((a.to_string(), b.to_string()), BTreeSet::new()))
            .collect()
    };
    let line = edges(&[("a", "b"), ("b", "c"), ("a", "c")]);
    assert!(cycles(&line).is_empty());
    let circle = edges(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]);
    let expected: BTreeSet<BTreeSet<String>> = [["a", "b", "c"].map(String::from).into()].into();
    assert_eq!(cycles(&circle), expected);
}
