//! The corpus of hostile locations laid out on disk and expanded: one source for the policy's
//! unit tests (`src/server/policy.rs`) and the servers' integration tests
//! (`tests/integration/support.rs`), which include this file.

use std::path::{Path, PathBuf};

/// The locations no client of a server started with `--allow-path` may use, and the
/// statement forms (`@statement`) each is tried in.
pub const HOSTILE: &str = include_str!("hostile_locations.txt");
/// Locations clients may use, in the same layout.
pub const ALLOWED: &str = include_str!("allowed_locations.txt");

/// Lays out under `dir` the directories, files and links the corpus's header describes, and
/// returns `{root}` (holding the secret directory) and `{allowed}` (what `--allow-path` names).
pub fn layout(dir: &Path) -> (PathBuf, PathBuf) {
    let root = std::fs::canonicalize(dir).unwrap();
    let allowed = root.join("allowed");
    std::fs::create_dir_all(allowed.join("sub")).unwrap();
    std::fs::create_dir(root.join("secret")).unwrap();
    std::fs::write(allowed.join("data.csv"), "x\n1\n").unwrap();
    std::fs::write(root.join("secret/s.csv"), "x\n42\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::symlink;
        symlink(root.join("secret"), allowed.join("escape")).unwrap();
        symlink(root.join("secret/made.csv"), allowed.join("dangling")).unwrap();
        symlink(allowed.join("loop"), allowed.join("loop")).unwrap();
    }
    (root, allowed)
}

/// The locations of `corpus` with its placeholders filled in.
pub fn locations(corpus: &str, root: &Path, allowed: &Path) -> Vec<String> {
    let (root, allowed) = (root.display().to_string(), allowed.display().to_string());
    corpus
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with(['#', '@']))
        .map(|l| match l {
            "{empty}" => String::new(),
            _ => l
                .replace("{root}", &root)
                .replace("{allowed}", &allowed)
                .replace("{nul}", "\0")
                .replace("{tab}", "\t")
                .replace("{newline}", "\n")
                .replace("{long}", &"x/".repeat(2100)),
        })
        .collect()
}

/// The corpus's statement forms naming `location`.
pub fn statements(location: &str) -> Vec<String> {
    let quoted = format!("'{}'", location.replace('\'', "''"));
    HOSTILE
        .lines()
        .filter_map(|l| l.strip_prefix("@statement "))
        .map(|s| s.replace("{location}", &quoted))
        .collect()
}
