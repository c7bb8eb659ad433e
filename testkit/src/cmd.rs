//! Running programs for tests. A failure is a [`CmdError`] carrying the command line as it would
//! be typed, the exit status and stderr, so a failed step names itself without a debugger. The
//! `try_` functions return it; the others panic with it (what a test step wants).

use std::fmt;
use std::process::{Child, Command, Output, Stdio};

/// A command that could not be started or did not exit 0.
pub struct CmdError {
    /// The command line, e.g. `ip -n twt1 link add …`.
    pub line: String,
    /// Why: the spawn error, or the exit status.
    pub why: String,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` {}", self.line, self.why)?;
        if !self.stderr.trim().is_empty() {
            write!(f, ": {}", self.stderr.trim())?;
        }
        Ok(())
    }
}

// Debug is what `.unwrap()` and `.expect()` print: the same readable line.
impl fmt::Debug for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for CmdError {}

impl From<CmdError> for std::io::Error {
    fn from(e: CmdError) -> std::io::Error {
        std::io::Error::other(e.to_string())
    }
}

/// `cmd` as it would be typed (program and arguments, lossily).
pub fn line(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd` to completion with stdin closed unless the caller set it; its output, or the
/// error naming it when it cannot start or exits non-zero.
pub fn output(cmd: &mut Command) -> Result<Output, CmdError> {
    let out = cmd.output().map_err(|e| CmdError {
        line: line(cmd),
        why: format!("could not start: {e}"),
        stdout: String::new(),
        stderr: String::new(),
    })?;
    if !out.status.success() {
        return Err(CmdError {
            line: line(cmd),
            why: format!("failed ({})", out.status),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out)
}

/// Stdout of `cmd`, or the error naming it.
pub fn stdout_of(cmd: &mut Command) -> Result<String, CmdError> {
    output(cmd).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// `program ARGS...` with stdin closed: stdout, or the error naming it.
pub fn try_run(program: &str, args: &[&str]) -> Result<String, CmdError> {
    stdout_of(Command::new(program).args(args).stdin(Stdio::null()))
}

/// [`try_run`], panicking with the error.
pub fn run(program: &str, args: &[&str]) -> String {
    try_run(program, args).unwrap_or_else(|e| panic!("{e}"))
}

/// `ip ARGS...` (give `-n NETNS` to reach into a namespace): stdout; panics naming the command.
pub fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// `ip -n NS ARGS...`: stdout; panics naming the command.
pub fn ip_in(ns: &str, args: &[&str]) -> String {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    run("ip", &a)
}

/// `argv` in namespace `ns` (through `ip netns exec`), stdin closed, for the caller to run.
pub fn ns_command(ns: &str, argv: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .args(argv)
        .stdin(Stdio::null());
    cmd
}

/// `argv` in `ns`: stdout, or the error naming it.
pub fn try_in_ns(ns: &str, argv: &[&str]) -> Result<String, CmdError> {
    stdout_of(&mut ns_command(ns, argv))
}

/// `argv` in `ns`: stdout; panics naming the command and its stderr.
pub fn in_ns(ns: &str, argv: &[&str]) -> String {
    try_in_ns(ns, argv).unwrap_or_else(|e| panic!("{e}"))
}

/// `argv` in `ns` whatever its exit: (success, stdout followed by stderr). For probes whose
/// failure is an answer (ping).
pub fn probe_in(ns: &str, argv: &[&str]) -> (bool, String) {
    let out = ns_command(ns, argv)
        .output()
        .unwrap_or_else(|e| panic!("`{}`: {e}", line(&ns_command(ns, argv))));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Whether `argv` succeeds in `ns` (for polling), its output dropped.
pub fn ok_in(ns: &str, argv: &[&str]) -> bool {
    ns_command(ns, argv)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts `argv` in `ns` without waiting; its stderr is dropped.
pub fn spawn_in(ns: &str, argv: &[&str], stdout: Stdio) -> Child {
    let mut cmd = ns_command(ns, argv);
    cmd.stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("`{}`: {e}", line(&cmd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_names_the_command_line_status_and_stderr() {
        let e = try_run("sh", &["-c", "echo out; echo bad thing >&2; exit 3"]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("`sh -c echo out; echo bad thing >&2; exit 3` failed ("),
            "{msg}"
        );
        assert!(
            msg.contains("exit status: 3") && msg.ends_with(": bad thing"),
            "{msg}"
        );
        assert_eq!(e.stdout, "out\n");
        assert_eq!(format!("{e:?}"), msg);
    }

    #[test]
    fn a_program_that_cannot_start_is_named() {
        let e = try_run("/nonexistent/tweed-test-program", &["x"]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("`/nonexistent/tweed-test-program x` could not start:"),
            "{e}"
        );
    }

    #[test]
    fn success_is_stdout() {
        assert_eq!(run("echo", &["a", "b"]), "a b\n");
    }

    #[test]
    fn the_namespace_command_goes_through_ip_netns_exec() {
        assert_eq!(
            line(&ns_command("twx", &["ping", "-c1", "10.0.0.1"])),
            "ip netns exec twx ping -c1 10.0.0.1"
        );
    }
}
