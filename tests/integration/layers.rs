//! The layers of `src/`: each top-level module uses only the modules below it, as the
//! `## Layers` section of `src/lib.rs` draws them. The test reads `src/` and fails on a
//! `crate::…` path (outside comments and `#[cfg(test)]` items) that points up or sideways, and
//! on a module the drawing does not place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The layers as `src/lib.rs` draws them, lowest first: each a list of peers.
fn drawn_layers(lib: &str) -> Vec<Vec<String>> {
    let section = lib
        .split("//! ## Layers")
        .nth(1)
        .expect("src/lib.rs has a `## Layers` section");
    let drawing = section
        .lines()
        .map(|l| l.trim_start_matches("//!").trim())
        .skip_while(|l| *l != "```text")
        .nth(1)
        .expect("the `## Layers` section draws the layers in a ```text block");
    let mut layers: Vec<Vec<String>> = drawing
        .split('→')
        .map(|layer| layer.split('|').map(|m| m.trim().to_string()).collect())
        .collect();
    layers.reverse();
    layers
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The lines of `text` that are not test code: each item under `#[cfg(test)]` is left out,
/// up to the brace that closes it.
fn non_test_lines(text: &str) -> Vec<&str> {
    let (mut kept, mut depth, mut pending, mut skip_to) = (Vec::new(), 0i64, false, None);
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("#[cfg(test)]") {
            pending = true;
            continue;
        }
        let opens = trimmed.matches('{').count() as i64;
        let closes = trimmed.matches('}').count() as i64;
        if pending && opens == 0 && trimmed.ends_with(';') {
            pending = false; // an item without a body: `mod tests;`
            continue;
        }
        if pending && opens > 0 {
            skip_to = Some(depth);
            pending = false;
        }
        depth += opens - closes;
        match skip_to {
            Some(d) if depth <= d => skip_to = None,
            Some(_) => {}
            None if !pending => kept.push(line),
            None => {}
        }
    }
    kept
}

/// The top-level modules `text` names with `crate::`, outside comments and test code.
fn used_modules(text: &str) -> Vec<String> {
    let mut used = Vec::new();
    for line in non_test_lines(text) {
        let line = line.split("//").next().unwrap_or_default();
        for (i, _) in line.match_indices("crate::") {
            if i > 0 && line[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                continue; // e.g. `icepie_crate::`
            }
            let name: String = line[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                .collect();
            if !name.is_empty() {
                used.push(name);
            }
        }
    }
    used
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).expect("read src/lib.rs");
    let layers = drawn_layers(&lib);
    let layer_of: BTreeMap<&str, usize> = layers
        .iter()
        .enumerate()
        .flat_map(|(i, peers)| peers.iter().map(move |m| (m.as_str(), i)))
        .collect();

    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut misplaced = Vec::new();
    let mut unplaced = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(root.join("src")).expect("under src");
        let first = relative.components().next().expect("a component");
        let module = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if module == "lib" || module == "bin" {
            continue; // the crate root and the binary, which uses the crate's public API
        }
        let Some(&own) = layer_of.get(module.as_str()) else {
            unplaced.push(module);
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read a source file");
        for used in used_modules(&text) {
            if used == module {
                continue;
            }
            match layer_of.get(used.as_str()) {
                Some(&theirs) if theirs < own => {}
                _ => misplaced.push(format!(
                    "{} uses crate::{used}, which is not below {module}",
                    relative.display()
                )),
            }
        }
    }
    unplaced.sort();
    unplaced.dedup();
    assert!(
        unplaced.is_empty(),
        "modules the layers in src/lib.rs do not place: {unplaced:?}"
    );
    misplaced.sort();
    misplaced.dedup();
    assert!(
        misplaced.is_empty(),
        "uses that point up or sideways in the layers of src/lib.rs:\n{}",
        misplaced.join("\n")
    );
}

#[test]
fn the_check_sees_a_use_that_points_up() {
    let layers = drawn_layers(
        "//! ## Layers\n//!\n//! ```text\n//! engine → slice | core → storage\n//! ```\n",
    );
    assert_eq!(
        layers,
        vec![
            vec!["storage".to_string()],
            vec!["slice".to_string(), "core".to_string()],
            vec!["engine".to_string()]
        ]
    );
    let used = used_modules(
        "use crate::engine::IcePie;\n// crate::server in a comment\nfn f() { crate::storage::x(); }\n\
         #[cfg(test)]\nmod tests {\n    use crate::server::X;\n}\nfn g() { crate::sql::y(); }\n",
    );
    assert_eq!(
        used,
        vec![
            "engine".to_string(),
            "storage".to_string(),
            "sql".to_string()
        ]
    );
}

/// The README's code map names every module of `src/` in its top-level module's row.
#[test]
fn the_readme_code_map_names_every_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("read README.md");
    let map = readme
        .split("## Code map")
        .nth(1)
        .expect("README.md has a `## Code map` section");
    let map = map.split("\n## ").next().unwrap_or_default();
    // Row of each top-level module: its first cell names it (`storage/`, or `text`, `error`, …).
    let mut rows: BTreeMap<String, String> = BTreeMap::new();
    for line in map.lines().filter(|l| l.starts_with("| `")) {
        let mut cells = line.split('|').skip(1);
        let (Some(first), Some(rest)) = (cells.next(), cells.next()) else {
            continue;
        };
        for name in first.split('`').skip(1).step_by(2) {
            rows.insert(name.trim_end_matches('/').to_string(), rest.to_string());
        }
    }
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut missing = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(root.join("src")).expect("under src");
        let parts: Vec<String> = relative
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        if parts == ["lib"] {
            continue;
        }
        let Some(row) = rows.get(&parts[0]) else {
            missing.push(format!(
                "{} (no row for `{}`)",
                relative.display(),
                parts[0]
            ));
            continue;
        };
        // The file's own name, or its folder's for a `mod.rs` below the top level.
        let name = match parts.as_slice() {
            [_] => continue,
            [.., folder, last] if last == "mod" => folder.clone(),
            [.., last] => last.clone(),
            [] => continue,
        };
        if parts.len() == 2 && name == parts[0] {
            continue;
        }
        if !names_word(row, &name) {
            missing.push(format!(
                "{} (`{name}` not in the row of `{}`)",
                relative.display(),
                parts[0]
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "the README's code map does not name:\n{}",
        missing.join("\n")
    );
}

/// True when `text` holds `word` as a whole word (not inside a longer name).
fn names_word(text: &str, word: &str) -> bool {
    let is_name = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(word)
        .any(|(i, _)| !text[..i].ends_with(is_name) && !text[i + word.len()..].starts_with(is_name))
}
