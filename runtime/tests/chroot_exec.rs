//! tweedctl started from inside a chroot (a build root, a debootstrapped test root): the
//! container's root is then not the root of its mount namespace, and an exec that only joined
//! the namespace landed in the namespace's root, the host's. It must land in the container's.

mod common;

use std::process::{Command, Output, Stdio};

use common::*;

/// Runs tweedctl chrooted into a recursive bind of the host's `/` (so every path stays valid),
/// in a private mount namespace: the process root is then a mount below the namespace root.
fn chrooted(e: &Env, args: &[&str]) -> Output {
    let jail = e.dir.path().join("jail");
    std::fs::create_dir_all(&jail).unwrap();
    let script = r#"mount --rbind / "$1" && mount --make-rslave "$1" && j=$1 && shift && exec chroot "$j" "$@""#;
    Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&jail)
        .arg(tweedctl_bin())
        .args(args)
        .env("TWEED_ROOT", &e.run_root)
        .env("TWEED_IMAGE_ROOT", &e.image_root)
        .env("TWEED_CGROUP_PARENT", &e.cgroup_parent)
        .stdin(Stdio::null())
        .output()
        .expect("running unshare")
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn exec_from_a_chrooted_tweedctl_lands_in_the_container_root() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    // A file only the host has: seen from an exec, it means the exec is in the host's root.
    let host_only = e.dir.path().join("host-only-marker");
    std::fs::write(&host_only, "host").unwrap();
    let name = unique("chx");
    ok(
        chrooted(
            &e,
            &[
                "run",
                "-d",
                "--name",
                &name,
                "busybox",
                "sh",
                "-c",
                "echo inside > /container-only; exec sleep 1000",
            ],
        ),
        "run -d from a chroot",
    );
    // Through the init's own root, which does not depend on how exec enters it.
    let in_init = format!("/proc/{}/root/container-only", e.init_pid(&name));
    e.wait_until(
        "the container's file",
        std::time::Duration::from_secs(5),
        || std::path::Path::new(&in_init).exists(),
    );

    let seen = chrooted(&e, &["exec", &name, "cat", "/container-only"]);
    assert_eq!(ok(seen, "exec from a chroot"), "inside\n");
    let host = chrooted(
        &e,
        &["exec", &name, "test", "-e", host_only.to_str().unwrap()],
    );
    assert_eq!(
        host.status.code(),
        Some(1),
        "exec from a chroot sees the host's {} (stderr: {})",
        host_only.display(),
        String::from_utf8_lossy(&host.stderr)
    );
    // The exec from outside any chroot agrees.
    assert_eq!(e.ok(&["exec", &name, "cat", "/container-only"]), "inside\n");
    e.ok(&["rm", "-f", &name]);
    e.assert_nothing_left();
}
