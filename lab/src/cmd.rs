//! Small helpers for running external programs with errors that say what failed.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// A failed external command: what was run, how it ended, and its stderr.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("could not run `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
        stdout: String,
    },
}

impl CmdError {
    /// The exit code when the command ran and failed (None when it could not start or died by signal).
    pub fn code(&self) -> Option<i32> {
        match self {
            CmdError::Failed { status, .. } => status.code(),
            CmdError::Spawn { .. } => None,
        }
    }

    pub fn stderr(&self) -> &str {
        match self {
            CmdError::Failed { stderr, .. } => stderr,
            CmdError::Spawn { .. } => "",
        }
    }
}

/// Renders a command line for messages, quoting arguments that need it.
pub fn display(cmd: &Command) -> String {
    let mut s = String::new();
    s.push_str(&quote(cmd.get_program()));
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(a));
    }
    s
}

fn quote(a: &OsStr) -> String {
    let a = a.to_string_lossy();
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c))
    {
        a.into_owned()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// Runs a command to completion; returns its stdout, or an error carrying its stderr.
pub fn run(cmd: &mut Command) -> Result<String, CmdError> {
    let out = cmd.output().map_err(|source| CmdError::Spawn {
        command: display(cmd),
        source,
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(CmdError::Failed {
            command: display(cmd),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            stdout,
        })
    }
}

/// Looks a program up in `$PATH` (plus the sbin directories, which non-root `$PATH`s often lack).
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The last `lines` lines of a (log) file, read from its end so huge logs stay cheap.
pub fn tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let read = || -> io::Result<String> {
        let mut f = fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(MAX)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            let mut s = String::new();
            for l in &all[start..] {
                let _ = writeln!(s, "{l}");
            }
            if s.is_empty() {
                s.push_str("(log is empty)\n");
            }
            s
        }
        Err(e) => format!("(cannot read {}: {e})\n", path.display()),
    }
}

/// Whether a process with this pid exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the parenthesised command name, which may itself contain spaces.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// Sends a signal; false when the process is gone (or the pid is nonsense).
pub fn signal(pid: u32, sig: i32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// Makes the child the leader of a new session, so it outlives us and our terminal's signals.
pub fn new_session(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_when_needed() {
        let mut c = Command::new("ip");
        c.args([
            "-n",
            "twl-a-u",
            "addr",
            "add",
            "198.18.0.1/24",
            "it's here",
            "",
        ]);
        assert_eq!(
            display(&c),
            r"ip -n twl-a-u addr add 198.18.0.1/24 'it'\''s here' ''"
        );
    }

    #[test]
    fn run_reports_stderr_and_status() {
        let err = run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        assert_eq!(err.code(), Some(3));
        assert_eq!(err.stderr(), "oops");
        assert!(err.to_string().contains("oops"), "{err}");
        assert_eq!(
            run(Command::new("sh").args(["-c", "echo hi"])).unwrap(),
            "hi\n"
        );
    }

    #[test]
    fn tail_takes_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        fs::write(&p, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&p, 2), "c\nd\n");
        assert!(tail(&dir.path().join("missing"), 2).contains("cannot read"));
    }

    #[test]
    fn own_pid_is_alive() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX));
    }
}
