//! Tidy: the docs of the repository's `.rs` files stay where the code moves. Every file
//! opens with a `//!` module doc, and every actor file's doc has the three sections
//! STYLE.md asks for — `Messages`, `Supervision` (its parent and its children) and
//! `Restart policy` (its kind and failure classes).
//!
//! An actor file is one whose code defines a ractor `Actor` impl or a `pub const KIND`.
//! Test code does not count: files under `tests/` or `benches/`, `tests.rs` modules, and
//! what follows a file's `#[cfg(test)]`; their actors are fixtures.

use std::path::{Path, PathBuf};

/// The sections of every actor file's module doc, as Markdown headings.
const ACTOR_SECTIONS: [&str; 3] = ["Messages", "Supervision", "Restart policy"];

/// Build output, relative to the repository: never walked.
const SKIPPED: [&str; 2] = ["target", "fuzz/target"];

/// The `.rs` files below `root`, sorted, outside hidden directories and [`SKIPPED`].
fn rust_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if path.is_dir() {
                let skipped = SKIPPED.iter().any(|s| path == root.join(s));
                if !name.starts_with('.') && !skipped {
                    dirs.push(path);
                }
            } else if name.ends_with(".rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The text of the module doc: the `//!` lines the file opens with (after blank lines).
fn module_doc(text: &str) -> Vec<&str> {
    text.lines()
        .skip_while(|l| l.trim().is_empty())
        .map_while(|l| l.trim_start().strip_prefix("//!"))
        .collect()
}

/// Whether `relative` (a path below the repository, `/`-separated) is test code.
fn is_test_code(relative: &str) -> bool {
    let mut parts: Vec<&str> = relative.split('/').collect();
    let file = parts.pop().unwrap_or_default();
    file == "tests.rs" || parts.iter().any(|d| *d == "tests" || *d == "benches")
}

/// Whether the code of `text` (up to its `#[cfg(test)]`) defines an actor.
fn defines_an_actor(text: &str) -> bool {
    text.lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .map(str::trim_start)
        .any(|l| {
            let actor_impl = l.starts_with("impl")
                && (l.contains(" Actor for ") || l.contains(" ractor::Actor for "));
            actor_impl || l.starts_with("pub const KIND:")
        })
}

/// What is wrong with the docs of the file at `relative` whose text is `text`.
fn problems(relative: &str, text: &str) -> Vec<String> {
    let doc = module_doc(text);
    if doc.is_empty() {
        return vec![format!(
            "{relative}: no `//!` module doc at the top of the file"
        )];
    }
    if is_test_code(relative) || !defines_an_actor(text) {
        return Vec::new();
    }
    let headings: Vec<&str> = doc
        .iter()
        .filter_map(|l| l.trim().strip_prefix('#'))
        .map(|h| h.trim_start_matches('#').trim())
        .collect();
    let missing: Vec<&str> = ACTOR_SECTIONS
        .into_iter()
        .filter(|s| !headings.contains(s))
        .collect();
    if missing.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "{relative}: an actor file whose `//!` doc has no section {}",
        missing
            .iter()
            .map(|s| format!("`## {s}`"))
            .collect::<Vec<_>>()
            .join(", ")
    )]
}

#[test]
fn every_rs_file_has_a_module_doc_and_every_actor_file_its_three_sections() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = rust_files(root);
    assert!(
        files.len() > 50 && files.iter().any(|f| f.ends_with("tests/it/tidy.rs")),
        "the walk found {} files: {files:?}",
        files.len()
    );
    let mut actors = 0;
    let mut wrong = Vec::new();
    for file in &files {
        let relative = file
            .strip_prefix(root)
            .expect("below the repository")
            .to_str()
            .expect("a UTF-8 path");
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{relative}: {e}"));
        if !is_test_code(relative) && defines_an_actor(&text) {
            actors += 1;
        }
        wrong.extend(problems(relative, &text));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(actors >= 9, "only {actors} actor files found");
}

#[test]
fn the_check_names_a_file_without_its_doc_and_an_actor_without_its_sections() {
    let actor = "use ractor::Actor;\n\npub struct A;\n\nimpl Actor for A {\n}\n";
    assert_eq!(
        problems("src/bare.rs", "fn main() {}\n"),
        ["src/bare.rs: no `//!` module doc at the top of the file"]
    );
    assert_eq!(
        problems("src/late.rs", "use std::fmt;\n//! Too late.\n"),
        ["src/late.rs: no `//!` module doc at the top of the file"]
    );
    assert_eq!(
        problems(
            "actors/src/a.rs",
            &format!("//! An actor.\n//!\n//! ## Messages\n//! None.\n\n{actor}")
        ),
        [
            "actors/src/a.rs: an actor file whose `//!` doc has no section `## Supervision`, \
          `## Restart policy`"
        ]
    );
    let kind = "//! A child.\n//! ## Supervision\n\npub const KIND: &str = \"k\";\n";
    assert_eq!(
        problems("actors/src/k.rs", kind),
        [
            "actors/src/k.rs: an actor file whose `//!` doc has no section `## Messages`, \
          `## Restart policy`"
        ]
    );
    let whole = format!(
        "//! An actor.\n//!\n//! ## Messages\n//! ## Supervision\n//! ### Restart policy\n\n{actor}"
    );
    assert!(problems("actors/src/a.rs", &whole).is_empty());
    // Fixtures: a test file, a bench, a `tests.rs`, a `#[cfg(test)]` module.
    let fixture = format!("//! Tests.\n\n{actor}");
    for path in [
        "tests/it/x.rs",
        "actors/benches/b.rs",
        "actors/src/s/tests.rs",
    ] {
        assert!(problems(path, &fixture).is_empty(), "{path}");
    }
    let test_module = format!("//! Plain code.\n\n#[cfg(test)]\nmod tests {{\n{actor}}}\n");
    assert!(problems("actors/src/plain.rs", &test_module).is_empty());
}
