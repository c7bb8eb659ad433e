//! The workspace's tests decide "am I root?" in one place, `tweed_testkit::root`, so that every
//! root test skips the same loud way (`skip: <test> needs root: <why>`). A test that calls
//! `geteuid` itself has its own rule again (the quiet `eprintln!` skips this kit replaced were
//! hidden by the harness, so a run as a normal user looked like a pass). This reads the test code
//! of every crate and names each place that does.

use std::path::{Path, PathBuf};

/// The workspace root: this crate's parent directory.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ lies in the workspace")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The part of `text` that is test code: all of it for integration tests, examples, benches and
/// `tests.rs` modules; in other files, what follows the first `#[cfg(test)]`.
fn test_code<'a>(rel: &Path, text: &'a str) -> Option<(usize, &'a str)> {
    let whole = rel.components().any(|c| {
        matches!(
            c.as_os_str().to_str(),
            Some("tests" | "examples" | "benches")
        )
    }) || rel.file_name().is_some_and(|n| n == "tests.rs");
    if whole {
        return Some((0, text));
    }
    let at = text.find("#[cfg(test)]")?;
    Some((text[..at].lines().count(), &text[at..]))
}

/// `file:line` of every `geteuid` in test code outside the kit, and the test files read.
fn own_root_checks(root: &Path) -> (Vec<String>, Vec<PathBuf>) {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let (mut found, mut read) = (Vec::new(), Vec::new());
    for path in files {
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        // The kit holds the rule (and this test names what it looks for).
        if rel.starts_with("testkit") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Some((first, code)) = test_code(&rel, &text) else {
            continue;
        };
        for (i, line) in code.lines().enumerate() {
            if line.contains("geteuid") {
                found.push(format!("{}:{}", rel.display(), first + i + 1));
            }
        }
        read.push(rel);
    }
    (found, read)
}

#[test]
fn no_test_checks_for_root_on_its_own() {
    let (found, read) = own_root_checks(&workspace());
    // The scan reaches integration tests, unit-test modules and separate tests.rs files (a wrong
    // root would read nothing and pass).
    for known in [
        "netlink/tests/events.rs",
        "lab/src/etcd.rs",
        "agent/src/run/tests.rs",
        "tests/tests/vxlan.rs",
    ] {
        assert!(
            read.iter().any(|p| p == Path::new(known)),
            "{known} not read"
        );
    }
    assert!(
        found.is_empty(),
        "tests that check for root themselves instead of tweed_testkit::require_root!: {found:?}"
    );
}

#[test]
fn a_root_check_of_its_own_is_found_where_it_is() {
    let dir = std::env::temp_dir().join(tweed_testkit::unique("twk-rootrule"));
    let write = |rel: &str, text: &str| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write(
        "a/tests/t.rs",
        "#[test]\nfn t() {\n    if unsafe { libc::geteuid() } != 0 { return; }\n}\n",
    );
    // Production code may ask (a CLI that needs root says so); its test module may not.
    write(
        "b/src/lib.rs",
        "fn need() -> bool { unsafe { libc::geteuid() == 0 } }\n\n#[cfg(test)]\nmod tests {\n    fn r() -> bool { unsafe { libc::geteuid() == 0 } }\n}\n",
    );
    write(
        "c/src/run/tests.rs",
        "fn r() -> u32 { unsafe { libc::geteuid() } }\n",
    );
    write(
        "testkit/src/root.rs",
        "fn is_root() -> bool { unsafe { libc::geteuid() == 0 } }\n",
    );
    let (mut found, _) = own_root_checks(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    found.sort();
    assert_eq!(
        found,
        ["a/tests/t.rs:3", "b/src/lib.rs:5", "c/src/run/tests.rs:1"]
    );
}
