//! The crate's layout as `src/lib.rs` describes it: three layers (the detection core, the
//! runtime, the tools), each module using only modules of its own layer or of the layers above,
//! and no import cycle between modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const CORE: &[&str] = &[
    "model",
    "decode",
    "window",
    "baseline",
    "batch",
    "threshold",
    "alert",
    "detect",
    "shadow",
    "drift",
    "feedback",
    "state",
    "offsets",
    "time",
];
const RUNTIME: &[&str] = &[
    "config",
    "log",
    "kafka",
    "ingest",
    "pipeline",
    "changelog",
    "sink",
    "alertmanager",
    "metrics",
    "daemon",
];
const TOOLS: &[&str] = &["replay", "demo", "cli"];

fn layer(module: &str) -> usize {
    [CORE, RUNTIME, TOOLS]
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("src/{module}: in no layer of src/lib.rs's layout"))
}

/// A module's source (with its submodules), without comments and tests.
fn source(src: &Path, module: &str) -> String {
    let mut files = vec![src.join(format!("{module}.rs"))];
    let dir = src.join(module);
    if dir.is_dir() {
        for e in std::fs::read_dir(&dir).unwrap() {
            files.push(e.unwrap().path());
        }
    }
    files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "rs") && f.is_file())
        .map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap().to_string();
            code.lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

/// Which of `modules` a module's code names as `crate::<module>`.
fn uses(code: &str, modules: &BTreeSet<&str>) -> BTreeSet<String> {
    code.match_indices("crate::")
        .map(|(i, _)| {
            code[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|m| modules.contains(m.as_str()))
        .collect()
}

#[test]
fn modules_use_only_their_own_layer_and_those_above_without_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules: BTreeSet<&str> = CORE.iter().chain(RUNTIME).chain(TOOLS).copied().collect();
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let declared: BTreeSet<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert_eq!(
        declared, modules,
        "src/lib.rs's modules and this test's layers"
    );
    let mut deps: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for m in &modules {
        let mut used = uses(&source(&src, m), &modules);
        used.remove(*m);
        for u in &used {
            assert!(
                layer(u) <= layer(m),
                "{m} (layer {}) uses {u} (layer {}), a layer below it",
                layer(m),
                layer(u)
            );
        }
        deps.insert(m, used);
    }
    // A cycle is a module reachable from itself.
    for start in &modules {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&str> = deps[start].iter().map(String::as_str).collect();
        while let Some(m) = todo.pop() {
            assert_ne!(m, *start, "an import cycle goes through {start}: {deps:?}");
            if seen.insert(m) {
                todo.extend(deps[m].iter().map(String::as_str));
            }
        }
    }
}
