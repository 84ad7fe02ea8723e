//! The architecture invariants of `src/lib.rs`, checked on the source text:
//! only the sled engine (`src/store/sled_engine.rs`) uses sled, only the HTTP modules (and the `send` client)
//! use hyper, and every source file opens with a `//!` line saying what it
//! is for. The bench binary is outside these rules (it drives hyper and
//! sled directly as baselines).

use std::path::{Path, PathBuf};

/// Where a crate may be used, by path prefix under the crate root.
const OWNERS: &[(&str, &[&str])] = &[
    ("sled::", &["src/store/sled_engine.rs", "src/bin/ordertrail-bench/"]),
    ("hyper::", &["src/http/", "src/send.rs", "src/bin/ordertrail-bench/"]),
    ("hyper_util::", &["src/http/", "src/send.rs", "src/bin/ordertrail-bench/"]),
];

/// What is wrong with the file at `path` (relative, `/`-separated) holding
/// `text`.
fn problems(path: &str, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    if path.ends_with(".rs") && !text.starts_with("//!") {
        found.push(format!("{path}: does not open with a `//!` line saying what it is for"));
    }
    for (crate_path, owners) in OWNERS {
        if owners.iter().any(|owner| path.starts_with(owner)) {
            continue;
        }
        let used = text.lines().map(str::trim_start).filter(|line| !line.starts_with("//")).any(|line| {
            line.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .any(|word| word.starts_with(crate_path))
        });
        if used {
            found.push(format!("{path}: uses {crate_path} outside {owners:?}"));
        }
    }
    found
}

fn sources(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push(path);
        }
    }
}

#[test]
fn the_architecture_invariants_hold() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    sources(&root.join("tests"), &mut files);
    assert!(files.len() > 40, "found only {} source files", files.len());
    let mut found = Vec::new();
    for file in files {
        let path = file.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
        // Tests may use any crate but sled (the store's layout is private:
        // tests use its `test-util` hooks); they must still say what they
        // are. This file names sled in its own checks.
        let text = std::fs::read_to_string(&file).unwrap();
        let problems = problems(&path, &text);
        let applies = |p: &String| {
            !path.starts_with("tests/") || p.contains("//!") || (p.contains("sled::") && path != "tests/it/tidy.rs")
        };
        found.extend(problems.into_iter().filter(applies));
    }
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn the_check_sees_each_kind_of_breach() {
    assert!(problems("src/api/mod.rs", "//! ok\nuse sled::Db;\n")[0].contains("sled::"));
    assert!(problems("tests/it/binary.rs", "//! ok\nlet db = sled::open(dir);\n")[0].contains("sled::"));
    assert!(problems("src/api/mod.rs", "//! ok\nfn f() { let _ = hyper::Error; }\n")[0].contains("hyper::"));
    assert!(problems("src/server.rs", "//! ok\nuse hyper_util::rt::TokioIo;\n")[0].contains("hyper_util::"));
    assert!(problems("src/store/x.rs", "use sled::Db;\n")[0].contains("//!"));
    // Allowed: the owners, and mentions in comments.
    assert!(problems("src/store/mod.rs", "//! ok\nuse sled::Db;\n")[0].contains("sled::"));
    assert!(problems("src/store/sled_engine.rs", "//! ok\nuse sled::Db;\n").is_empty());
    assert!(problems("src/http/mod.rs", "//! ok\nuse hyper::server;\n").is_empty());
    assert!(problems("src/gate.rs", "//! hyper's HTTP/2 server waits\n// sled::Db is the store's\n").is_empty());
}
