//! The house rules of the module tree, checked on the sources: each layer uses only the layers
//! below it, the commands never use one another, and no two modules import each other, directly
//! or through others. A failure names the file and the import that breaks the rule.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may use its own layer's module, and any module of a
/// lower layer.
const LAYERS: &[&[&str]] = &[
    &["error", "redact"],
    &["config"],
    &["cli", "db", "logging"],
    &["checkpoint", "coordination", "telemetry"],
    &["pipeline"],
    &["commands"],
    &["app"],
];

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|layer| layer.contains(&module))
        .unwrap_or_else(|| panic!("src/{module}: a top-level module missing from LAYERS in tests/layering.rs"))
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a source file: `src/commands/watch/mod.rs` → `commands::watch`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The paths a file of `module` names through `crate::` or `super::` (in `use` lines and inline),
/// each as its absolute segments, braces expanded: `use crate::{db::{self, retry}, config::Config};`
/// gives `db`, `db::retry`, `config::Config`. Unit tests (`mod tests`) are left out: their
/// `super` is the file itself.
fn crate_paths(text: &str, module: &[String]) -> Vec<Vec<String>> {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
    // Comments and string contents do not import anything.
    let code: String = text
        .lines()
        .map(|line| {
            let line = line.split("//").next().unwrap_or_default();
            if line.trim_start().starts_with('"') {
                ""
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut paths = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        expand(rest, Vec::new(), &mut paths);
    }
    let mut rest = code.as_str();
    while let Some(at) = rest.find("super::") {
        // `super::super::x` counts once, from its first `super`.
        let preceded = rest[..at].ends_with("super::");
        let mut after = &rest[at..];
        let mut ups = 0;
        while let Some(more) = after.strip_prefix("super::") {
            after = more;
            ups += 1;
        }
        rest = after;
        if !preceded && ups <= module.len() {
            expand(after, module[..module.len() - ups].to_vec(), &mut paths);
        }
    }
    paths.retain(|p| !p.is_empty());
    paths
}

/// Expands the path starting at `text` (after `prefix::`), braces included.
fn expand(text: &str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let text = text.trim_start();
    if let Some(inner) = text.strip_prefix('{') {
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    expand(&inner[start..i], prefix.clone(), out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&inner[start..i], prefix.clone(), out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let name: String = text.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    if name.is_empty() || name == "self" {
        if !prefix.is_empty() {
            out.push(prefix);
        }
        return;
    }
    let mut path = prefix;
    path.push(name.clone());
    match text[name.len()..].strip_prefix("::") {
        Some(after) => expand(after, path, out),
        None => out.push(path),
    }
}

/// The unit a rule applies to: the top-level module, or for `commands` the command itself.
fn unit(path: &[String]) -> String {
    match path {
        [first, second, ..] if first == "commands" => format!("commands::{second}"),
        [first, ..] => first.clone(),
        [] => String::new(),
    }
}

/// The adapters of the archive's port, under `pipeline::sink`.
const ADAPTERS: &[&str] = &["delta", "mongo"];

/// Whether code of `text` (outside comments and unit tests) names the external crate `name`.
fn mentions_crate(text: &str, name: &str) -> bool {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
    text.lines().map(|line| line.split("//").next().unwrap_or_default()).any(|code| {
        code.match_indices(name).any(|(at, _)| {
            let before = code[..at].chars().next_back();
            let after = &code[at + name.len()..];
            !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') && after.starts_with("::")
        })
    })
}

#[test]
fn layers_are_used_downwards_only_and_no_module_imports_in_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    // The graph of modules (by their full path) for the cycle check.
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let known: BTreeSet<String> = files.iter().map(|f| module_of(&src, f).join("::")).collect();
    for file in &files {
        let module = module_of(&src, file);
        let Some(top) = module.first() else { continue }; // lib.rs, main.rs
        if top == "main" || top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        let from_layer = layer_of(top);
        let in_delta_adapter = module.len() > 2 && module[..3] == ["pipeline", "sink", "delta"];
        if !in_delta_adapter && mentions_crate(&text, "deltalake") {
            violations.push(format!(
                "{}: deltalake (the Delta table's crate used outside its adapter, pipeline::sink::delta)",
                file.strip_prefix(&src).unwrap().display()
            ));
        }
        for path in crate_paths(&text, &module) {
            let target_top = &path[0];
            let to_layer = layer_of(target_top);
            let shown = format!("{}: crate::{}", file.strip_prefix(&src).unwrap().display(), path.join("::"));
            if to_layer > from_layer {
                violations.push(format!("{shown} (an upward import: {top} uses {target_top})"));
            } else if to_layer == from_layer && target_top != top {
                violations.push(format!("{shown} ({top} and {target_top} are in the same layer)"));
            }
            if top == "commands" && target_top == "commands" && unit(&module) != unit(&path) {
                violations.push(format!("{shown} (a command uses another command)"));
            }
            // The command line is turned into each command's own options by the application:
            // a command knows nothing of flags or clap.
            if top == "commands" && target_top == "cli" {
                violations.push(format!("{shown} (a command uses the command-line layer)"));
            }
            // The archive's store is chosen once, behind its port: only the sink knows its
            // adapters (the collection, the Delta table).
            let sink = ["pipeline", "sink"];
            let names_an_adapter = path.len() > 2 && path[..2] == sink && ADAPTERS.contains(&path[2].as_str());
            if names_an_adapter && module[..module.len().min(2)] != sink {
                violations.push(format!("{shown} (an archive store's adapter used outside the sink: use its port)"));
            }
            // The longest known module the path names.
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|candidate| known.contains(candidate))
                .unwrap_or_else(|| path[0].clone());
            let from = module.join("::");
            // A parent module declaring and re-exporting its children is not a dependency.
            if target != from && !target.starts_with(&format!("{from}::")) {
                graph.entry(from).or_default().insert(target);
            }
        }
    }
    // Cycles, by depth-first search.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(at) = stack.iter().position(|n| n == node) {
            cycles.push(format!("{} -> {node}", stack[at..].join(" -> ")));
            return;
        }
        if !done.insert(node.to_owned()) {
            return;
        }
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, stack, done, cycles);
        }
        stack.pop();
    }
    let mut cycles = Vec::new();
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done, &mut cycles);
    }
    violations.extend(cycles.into_iter().map(|c| format!("an import cycle: {c}")));
    assert!(violations.is_empty(), "the module layering is broken:\n  {}", violations.join("\n  "));
}

#[test]
fn the_checker_sees_an_external_crate_named_in_code_only() {
    assert!(mentions_crate("use deltalake::DeltaTable;", "deltalake"));
    assert!(mentions_crate("let t = deltalake::open_table(url);", "deltalake"));
    assert!(!mentions_crate("// deltalake::open_table is called by the adapter", "deltalake"));
    assert!(!mentions_crate("use crate::pipeline::sink::delta;", "deltalake"));
    assert!(!mentions_crate("let my_deltalake::x;", "deltalake"));
}

#[test]
fn the_checker_sees_braced_and_inline_imports() {
    let text = "use crate::{db::{self, retry::RetryPolicy}, config::Config};\n\
                // crate::commands is only a comment\n\
                let x = crate::pipeline::scan::parse_date(v);";
    let module = ["pipeline".to_owned(), "join".to_owned()];
    let paths: Vec<String> = crate_paths(text, &module).iter().map(|p| p.join("::")).collect();
    assert_eq!(paths, ["db", "db::retry::RetryPolicy", "config::Config", "pipeline::scan::parse_date"]);
    let relative = "use super::document::{Parts, Check};\nuse super::super::db;";
    let paths: Vec<String> = crate_paths(relative, &module).iter().map(|p| p.join("::")).collect();
    assert_eq!(paths, ["pipeline::document::Parts", "pipeline::document::Check", "db"]);
}
