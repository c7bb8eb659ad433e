//! The one root rule: a test that needs root (namespaces, mounts, cgroups, iptables) and does not
//! have it is skipped, and says so on stderr in one recognisable line,
//! `skip: <test> needs root: <why>`, so a run as a normal user is never mistaken for a pass of
//! those tests (grep the output for `skip:`). Start such a test with
//! `tweed_testkit::require_root!("why")`.

use std::io::Write;

/// Whether the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The skip line for `test`.
pub fn skip_line(test: &str, why: &str) -> String {
    format!("skip: {test} needs root: {why}")
}

/// True when root; otherwise prints the skip line for `test` and returns false.
pub fn skip_unless_root(test: &str, why: &str) -> bool {
    if is_root() {
        return true;
    }
    // Straight to stderr, not through `eprintln!`: the test harness captures that and shows it
    // only for failed tests, and a skipped test passes.
    let _ = writeln!(std::io::stderr(), "{}", skip_line(test, why));
    false
}

/// `test_file::module::test_fn::here` (a fn item's type name) → `test_file::module::test_fn`:
/// an integration test's crate is its file, so the name says where the test is.
#[doc(hidden)]
pub fn test_name(marker: &str) -> &str {
    marker.strip_suffix("::here").unwrap_or(marker)
}

/// Returns from the calling test (after printing `skip: <test> needs root: <why>`) unless root.
#[macro_export]
macro_rules! require_root {
    ($why:expr) => {{
        fn here() {}
        fn name_of<T>(_: T) -> &'static str {
            ::std::any::type_name::<T>()
        }
        if !$crate::root::skip_unless_root($crate::root::test_name(name_of(here)), $why) {
            return;
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_skip_line_names_the_test_and_the_reason() {
        assert_eq!(
            skip_line("vxlan::two_hosts", "network namespaces"),
            "skip: vxlan::two_hosts needs root: network namespaces"
        );
    }

    #[test]
    fn the_macro_names_the_calling_test() {
        fn here() {}
        fn name_of<T>(_: T) -> &'static str {
            std::any::type_name::<T>()
        }
        assert_eq!(
            test_name(name_of(here)),
            "tweed_testkit::root::tests::the_macro_names_the_calling_test"
        );
    }

    #[test]
    fn the_macro_returns_early_only_when_not_root() {
        let mut ran = false;
        let mut body = || {
            crate::require_root!("a test of the macro");
            ran = true;
        };
        body();
        assert_eq!(ran, is_root());
    }
}
