use super::*;
use crate::caps::CapSet;
use std::os::unix::fs::OpenOptionsExt;

fn allowed_names(p: &Profile) -> BTreeSet<String> {
    p.rules
        .iter()
        .filter(|r| r.action == Action::Allow)
        .map(|r| r.name.clone())
        .collect()
}

#[test]
fn default_profile_leaves_out_every_blocked_group() {
    let p = default::profile(CapSet::docker_default());
    assert_eq!(p.default_action, Action::Errno(libc::EPERM as u32));
    let allowed = allowed_names(&p);
    for (why, names) in default::BLOCKED {
        for n in *names {
            assert!(!allowed.contains(*n), "{n} is allowed but blocked: {why}");
        }
    }
    // chroot comes with CAP_SYS_CHROOT, which the default set has.
    assert!(allowed.contains("chroot"));
    // clone only without namespace flags; clone3 gets ENOSYS.
    let clone: Vec<_> = p.rules.iter().filter(|r| r.name == "clone").collect();
    assert_eq!(clone.len(), 1);
    assert_eq!(
        clone[0].args[0].op,
        CmpOp::MaskedEq(default::CLONE_NS_FLAGS)
    );
    assert!(p
        .rules
        .iter()
        .any(|r| r.name == "clone3" && r.action == Action::Errno(libc::ENOSYS as u32)));
}

#[test]
fn capabilities_unlock_their_groups() {
    let mut caps = CapSet::docker_default();
    caps.0 |= 1 << crate::caps::SYS_ADMIN | 1 << crate::caps::SYS_PTRACE;
    let allowed = allowed_names(&default::profile(caps));
    for n in [
        "mount",
        "unshare",
        "setns",
        "clone",
        "clone3",
        "ptrace",
        "process_vm_readv",
    ] {
        assert!(allowed.contains(n), "{n}");
    }
    // Never, whatever the capabilities: the keyring and userfaultfd.
    for n in ["keyctl", "add_key", "request_key", "userfaultfd"] {
        assert!(!allowed.contains(n), "{n}");
    }
}

#[test]
fn stack_is_allowlist_then_one_filter_per_other_action() {
    let p = default::profile(CapSet::docker_default());
    let g = groups(&p);
    assert_eq!(g.len(), 2);
    assert_eq!(g[0].0, Action::Errno(libc::EPERM as u32));
    assert_eq!(g[0].1, Action::Allow);
    // clone3 passes the allowlist, and the second filter turns it into ENOSYS.
    assert!(g[0].2.contains_key("clone3"));
    assert_eq!(g[1].1, Action::Errno(libc::ENOSYS as u32));
    assert_eq!(g[1].2.keys().collect::<Vec<_>>(), ["clone3"]);
    // An unconditional rule absorbs the conditional ones of the same syscall.
    let p = Profile {
        default_action: Action::Errno(1),
        rules: vec![
            Rule {
                name: "socket".into(),
                action: Action::Allow,
                args: vec![Arg {
                    index: 0,
                    op: CmpOp::Eq,
                    value: 1,
                }],
            },
            Rule::allow("socket"),
        ],
    };
    assert_eq!(groups(&p)[0].2["socket"], None);
}

#[test]
fn compiles_and_caches_by_hash() {
    let p = default::profile(CapSet::docker_default());
    let progs = compile(&p).unwrap();
    assert_eq!(progs.len(), 2);
    assert!(progs[0].len() > 100, "{}", progs[0].len());
    let dir = tempfile::tempdir().unwrap();
    let first = compiled(&p, dir.path()).unwrap();
    assert_eq!(first, progs);
    let file = dir.path().join(format!("{}.bpf", cache_key(&p)));
    assert!(file.exists());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
    // A second container reads it back.
    assert_eq!(compiled(&p, dir.path()).unwrap(), progs);
    // Another profile is another key.
    let mut q = p.clone();
    q.rules.pop();
    assert_ne!(cache_key(&p), cache_key(&q));
    // A damaged cache file is a miss, recompiled and rewritten.
    std::fs::write(&file, b"\x01\x00\x00\x00\xff").unwrap();
    assert_eq!(compiled(&p, dir.path()).unwrap(), progs);
    assert_eq!(cached(&p, &file), Some(progs));
}

/// What a cache file holds, if it is intact.
fn cached(p: &Profile, file: &std::path::Path) -> Option<Programs> {
    unseal(&cache_key(p), &std::fs::read(file).unwrap()).and_then(decode)
}

/// One instruction: SECCOMP_RET_ALLOW, a valid program unlike anything `compile` makes.
fn allow_all() -> Programs {
    vec![vec![Insn {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: 0x7fff_0000,
    }]]
}

#[test]
fn the_cache_is_really_read_a_planted_program_is_what_loads() {
    let p = default::profile(CapSet::docker_default());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{}.bpf", cache_key(&p)));
    // Planted before any compile: were the profile compiled on every run, this would not load.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .unwrap();
    f.write_all(&seal(&cache_key(&p), &encode(&allow_all())))
        .unwrap();
    drop(f);
    assert_eq!(compiled(&p, dir.path()).unwrap(), allow_all());
    // And it is left as it was: a hit writes nothing.
    assert_eq!(cached(&p, &file), Some(allow_all()));
}

#[test]
fn a_cache_file_damaged_into_another_valid_filter_is_rejected_and_recompiled() {
    let p = default::profile(CapSet::docker_default());
    let progs = compile(&p).unwrap();
    let dir = tempfile::tempdir().unwrap();
    compiled(&p, dir.path()).unwrap();
    let file = dir.path().join(format!("{}.bpf", cache_key(&p)));
    let mut b = std::fs::read(&file).unwrap();
    // One flipped bit in the last instruction's k (the default action of the last filter):
    // structurally still a valid program, so only the checksum can tell.
    let last = b.len() - 1;
    b[last] ^= 0x01;
    assert!(decode(&b[32..]).is_some_and(|d| d != progs));
    std::fs::write(&file, &b).unwrap();
    assert_eq!(compiled(&p, dir.path()).unwrap(), progs);
    assert_eq!(cached(&p, &file), Some(progs));
}

#[test]
fn a_cache_file_others_could_write_is_not_read() {
    use std::os::unix::fs::PermissionsExt;
    let p = default::profile(CapSet::docker_default());
    let progs = compile(&p).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{}.bpf", cache_key(&p)));
    std::fs::write(&file, seal(&cache_key(&p), &encode(&allow_all()))).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(compiled(&p, dir.path()).unwrap(), progs);
    // Replaced by the compiled filters, root-only again.
    assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
    // A symlink is not followed either.
    std::fs::remove_file(&file).unwrap();
    let elsewhere = dir.path().join("elsewhere");
    std::fs::write(&elsewhere, seal(&cache_key(&p), &encode(&allow_all()))).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
    assert_eq!(compiled(&p, dir.path()).unwrap(), progs);
}

#[test]
fn a_cache_file_sealed_for_another_profile_or_in_an_open_directory_is_not_read() {
    use std::os::unix::fs::PermissionsExt;
    let p = default::profile(CapSet::docker_default());
    let progs = compile(&p).unwrap();
    let mut other = p.clone();
    other.rules.pop();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{}.bpf", cache_key(&p)));
    // Valid, root-owned, 0600, but sealed under the other profile's key (a copied file).
    std::fs::write(&file, seal(&cache_key(&other), &encode(&allow_all()))).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(compiled(&p, dir.path()).unwrap(), progs);
    // Correctly sealed for p, but in a directory others can write.
    std::fs::write(&file, seal(&cache_key(&p), &encode(&allow_all()))).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(compiled(&p, dir.path()).unwrap(), progs);
    // The same file in a private directory is what loads (the two refusals above were theirs).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(&file, seal(&cache_key(&p), &encode(&allow_all()))).unwrap();
    assert_eq!(compiled(&p, dir.path()).unwrap(), allow_all());
}

#[test]
fn decode_refuses_malformed_caches() {
    let progs: Programs = vec![vec![Insn {
        code: 6,
        jt: 0,
        jf: 0,
        k: 0x7fff_0000,
    }]];
    let b = encode(&progs);
    assert_eq!(decode(&b).unwrap(), progs);
    assert!(decode(&b[..b.len() - 1]).is_none());
    let mut long = b.clone();
    long.push(0);
    assert!(decode(&long).is_none());
    assert!(decode(&[0xff, 0xff, 0xff, 0xff]).is_none());
    assert!(decode(&[1, 0, 0, 0, 0, 0, 0, 0]).is_none()); // empty program
    assert!(decode(&[]).is_none());
}

/// Runs `f` in a forked child under the default filter; returns the child's exit code.
fn under_default_filter(f: fn() -> i32) -> i32 {
    let progs = compile(&default::profile(CapSet::docker_default())).unwrap();
    // SAFETY: the child only makes syscalls and exits.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            if install(&progs).is_err() {
                libc::_exit(100);
            }
            libc::_exit(f());
        }
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        assert!(libc::WIFEXITED(st), "status {st:#x}");
        libc::WEXITSTATUS(st)
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[test]
fn the_filter_blocks_user_namespaces_and_keyctl_and_keeps_ordinary_calls() {
    // SAFETY (in each closure): raw syscalls with valid arguments in the forked child.
    assert_eq!(
        under_default_filter(|| unsafe {
            if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                0
            } else {
                errno()
            }
        }),
        libc::EPERM
    );
    assert_eq!(
        under_default_filter(|| unsafe {
            if libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0) == 0 {
                0
            } else {
                errno()
            }
        }),
        libc::EPERM
    );
    assert_eq!(
        under_default_filter(|| unsafe {
            if libc::syscall(libc::SYS_clone3, 0, 0) == 0 {
                0
            } else {
                errno()
            }
        }),
        libc::ENOSYS
    );
    // fork (clone without namespace flags), getpid, and socket(AF_INET) still work; AF_VSOCK not.
    assert_eq!(
        under_default_filter(|| unsafe {
            let pid = libc::fork();
            if pid == 0 {
                libc::_exit(7);
            }
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            let v = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0);
            if libc::WEXITSTATUS(st) == 7
                && libc::getpid() > 0
                && s >= 0
                && v < 0
                && errno() == libc::EPERM
            {
                0
            } else {
                1
            }
        }),
        0
    );
}

mod docker_format {
    use super::*;
    use std::path::Path;

    fn parse(s: &str) -> Result<Profile, SeccompError> {
        docker::parse(s, CapSet::docker_default(), Path::new("/p.json"))
    }

    #[test]
    fn reads_a_docker_profile() {
        let p = parse(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,
                "architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_AARCH64"],
                "syscalls":[
                  {"names":["read","write"],"action":"SCMP_ACT_ALLOW"},
                  {"names":["personality"],"action":"SCMP_ACT_ALLOW",
                   "args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
                  {"names":["clone"],"action":"SCMP_ACT_ALLOW",
                   "args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}],
                   "excludes":{"caps":["CAP_SYS_ADMIN"]}},
                  {"names":["mount"],"action":"SCMP_ACT_ALLOW","includes":{"caps":["CAP_SYS_ADMIN"]}},
                  {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38}
                ]}"#,
        )
        .unwrap();
        assert_eq!(p.default_action, Action::Errno(1));
        let names: Vec<_> = p.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["read", "write", "personality", "clone", "clone3"]);
        assert_eq!(p.rules[3].args[0].op, CmpOp::MaskedEq(2114060288));
        assert_eq!(p.rules[4].action, Action::Errno(38));
        assert!(compile(&p).is_ok());
    }

    #[test]
    fn hostile_profiles_are_refused_naming_the_entry() {
        let cases = [
            (r#"{"defaultAction":"SCMP_ACT_NOPE"}"#, "defaultAction"),
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":0}"#,
                "errno 0",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","errnoRet":99999}]}"#,
                "syscalls[0]",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":[],"action":"SCMP_ACT_ALLOW"}]}"#,
                "no syscall names",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["../../x"],"action":"SCMP_ACT_ALLOW"}]}"#,
                "bad syscall name",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["re\u0000ad"],"action":"SCMP_ACT_ALLOW"}]}"#,
                "bad syscall name",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_NOTIFY"}]}"#,
                "unsupported action",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW","args":[{"index":6,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#,
                "index 6",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":0,"op":"SCMP_CMP_LIKE"}]}]}"#,
                "unsupported operator",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW","includes":{"caps":["CAP_NOPE"]}}]}"#,
                "unknown capability",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_MIPS"]}"#,
                "do not include",
            ),
            (
                r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":"#,
                "/p.json",
            ),
            (r#"[]"#, "/p.json"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.contains("/p.json"), "{e}");
        }
        // Too many names.
        let names: Vec<String> = (0..docker::MAX_NAMES + 1)
            .map(|_| "\"read\"".to_string())
            .collect();
        let text = format!(
            r#"{{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{{"names":[{}],"action":"SCMP_ACT_ALLOW"}}]}}"#,
            names.join(",")
        );
        assert!(parse(&text).unwrap_err().to_string().contains("more than"));
        // Names that exist on no architecture compile (they are skipped), as with libseccomp.
        let p = parse(r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read","no_such_call"],"action":"SCMP_ACT_ALLOW"}]}"#).unwrap();
        assert!(compile(&p).is_ok());
    }

    #[test]
    fn the_default_profile_round_trips_through_docker_format() {
        let p = default::profile(CapSet::docker_default());
        let text = docker::to_docker(&p).to_string();
        assert_eq!(parse(&text).unwrap(), p);
    }

    #[test]
    fn oversized_and_odd_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; docker::MAX_BYTES as usize + 1]).unwrap();
        let e = docker::load(&big, CapSet::docker_default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("limit") && e.contains("big.json"), "{e}");
        let e = docker::load(dir.path(), CapSet::docker_default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
