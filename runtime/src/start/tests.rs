//! The start sequence on a fake host: state and layers in a temporary directory, the kernel,
//! the cgroup and the CNI plugins faked, all three writing one journal so that the order of
//! their side effects is visible across seams.

use std::fs;
use std::path::PathBuf;

use super::*;
use crate::caps::CapSet;
use crate::cgroup::fake::{FakeCgroup, Op};
use crate::cni::{Exec, FakeExec, NetworkList, Output};
use crate::journal::Journal;
use crate::runtime::Options;
use crate::syscall::fake::{Call, FakeSyscall};
use crate::units::Limits;

const ID: &str = "0123456789abcdef0123456789abcdef";

struct Bed {
    /// Holds the runtime's roots for the test's length.
    _dir: tempfile::TempDir,
    rt: Runtime,
    journal: Journal,
    sys: FakeSyscall,
    cgroup: FakeCgroup,
    cni: Cni,
    plan: Plan,
}

impl Bed {
    /// An overlay container `web` with every limit, so that every stage has work to do.
    fn new() -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(Options {
            run_root: dir.path().join("run"),
            image_root: dir.path().join("lib"),
            cni_conf: dir.path().join("unused.conflist"),
            cni_path: vec![],
            ..Options::default()
        })
        .unwrap();
        let journal = Journal::default();
        let exec = FakeExec {
            journal: journal.clone(),
            ..FakeExec::default()
        };
        exec.answers.lock().unwrap().push_back(Output {
            success: true,
            stdout: br#"{"cniVersion":"1.0.0","ips":[{"address":"10.9.8.7/24"}],"dns":{"nameservers":["10.9.8.1"]}}"#.to_vec(),
            stderr: vec![],
        });
        let mut plugin = serde_json::Map::new();
        plugin.insert("type".into(), "tweed".into());
        let cgroup = FakeCgroup {
            journal: journal.clone(),
            ..FakeCgroup::default()
        };
        let plan = Plan {
            config: ContainerConfig {
                id: ID.into(),
                name: "web".into(),
                image: "busybox".into(),
                image_id: "sha256:feed".into(),
                layers: vec!["sha256:beef".into()],
                argv: vec!["/bin/true".into()],
                env: vec!["PATH=/bin".into()],
                cwd: "/".into(),
                user: String::new(),
                hostname: "web".into(),
                limits: Limits {
                    memory: Some(64 << 20),
                    millicpus: Some(500),
                    pids: Some(100),
                },
                cpus: vec![0],
                net: NetMode::Overlay,
                volumes: vec![],
                cgroup: cgroup.record(),
                caps: CapSet::docker_default(),
                security: Default::default(),
                created: String::new(),
                auto_remove: false,
                host_netns: None,
                netns_path: Some(rt.paths.netns(ID)),
                userns: None,
            },
            lowers: vec![dir.path().join("lib/layers/beef")],
            join_netns: Some(rt.paths.netns(ID)),
            network: Some(NetworkList {
                name: "tnet".into(),
                cni_version: "1.0.0".into(),
                plugins: vec![plugin],
            }),
            seccomp: None,
            userns_lock: Default::default(),
        };
        Bed {
            rt,
            sys: FakeSyscall {
                journal: journal.clone(),
                ..FakeSyscall::default()
            },
            cgroup,
            cni: Cni {
                exec: Exec::Fake(exec),
                path: vec![],
            },
            journal,
            plan,
            _dir: dir,
        }
    }

    fn host(&self) -> Host<'_> {
        Host {
            sys: &self.sys,
            cgroup: &self.cgroup,
            cni: &self.cni,
        }
    }

    fn start(&self) -> Result<(), StartError> {
        self.rt.start(&self.plan, &self.host())
    }

    fn state_dir(&self) -> PathBuf {
        self.rt.paths.state_dir(ID)
    }

    fn data_dir(&self) -> PathBuf {
        self.rt.paths.data_dir(ID)
    }

    fn netns(&self) -> PathBuf {
        self.rt.paths.netns(ID)
    }

    /// A start that ran every stage up to and including the network, for tests of the stages
    /// after it.
    fn through_network_stage<'a>(&'a self, host: &'a Host<'a>) -> (Starting<'a>, Attached) {
        let mut s = Starting {
            rt: &self.rt,
            plan: &self.plan,
            host,
            state_dir: self.state_dir(),
            data_dir: self.data_dir(),
            undo: Vec::new(),
        };
        s.reserve().unwrap();
        s.rootfs().unwrap();
        s.cgroup().unwrap();
        let net = s.network().unwrap();
        (s, net)
    }

    /// The journal of the stages up to and including a successful network stage.
    fn through_network(&self) -> Vec<String> {
        vec![
            "cgroup create".into(),
            "cgroup devices Default".into(),
            "cgroup apply".into(),
            format!("sys unshare {:#x}", libc::CLONE_NEWNET),
            "sys loopback up".into(),
            format!("sys mount {}", self.netns().display()),
            "cni ADD tweed".into(),
        ]
    }

    /// What undoing the network and cgroup stages journals, in that order.
    fn network_and_cgroup_undone(&self) -> Vec<String> {
        vec![
            "cni DEL tweed".into(),
            format!("sys umount {}", self.netns().display()),
            "cgroup remove".into(),
        ]
    }

    /// No name, state, layers or netns file of the container is left, and `ps` lists nothing.
    fn assert_nothing_left(&self) {
        let link = self.rt.paths.name_link("web");
        assert!(fs::symlink_metadata(&link).is_err(), "name {link:?} left");
        assert!(!self.state_dir().exists(), "state dir left");
        assert!(!self.data_dir().exists(), "layers left");
        assert!(self.rt.list().unwrap().is_empty(), "ps still lists it");
    }
}

fn concat(parts: &[Vec<String>]) -> Vec<String> {
    parts.concat()
}

/// The start failed at `stage` with exactly `journal` on the fakes, and nothing is left.
fn assert_undone(b: &Bed, e: &StartError, stage: Stage, journal: Vec<String>) {
    assert_eq!(e.stage(), stage, "{e}");
    assert_eq!(b.journal.lines(), journal);
    b.assert_nothing_left();
}

#[test]
fn the_stages_run_in_order_and_success_records_state() {
    let b = Bed::new();
    b.start().unwrap();
    let started = format!("sys start supervisor {}", b.state_dir().display());
    // Nothing was undone.
    assert_eq!(
        b.journal.lines(),
        concat(&[b.through_network(), vec![started]])
    );

    let cfg = b.rt.config(ID).unwrap();
    assert_eq!(b.rt.resolve("web").unwrap(), ID);
    // What was planned, stamped with its creation time.
    assert!(!cfg.created.is_empty());
    assert_eq!(
        cfg,
        ContainerConfig {
            created: cfg.created.clone(),
            ..b.plan.config.clone()
        }
    );
    let rec: CniRecord = state::read_json(&b.state_dir().join("cni.json"))
        .unwrap()
        .unwrap();
    assert_eq!(cni::result_ips(rec.result.as_ref().unwrap()), ["10.9.8.7"]);
    for d in ["upper", "work"] {
        assert!(b.data_dir().join(d).is_dir(), "{d}");
    }
    // The init layer and the overlay's mount point are the init's, on its scratch tmpfs:
    // nothing of them on disk.
    for d in ["init", "merged"] {
        assert!(!b.data_dir().join(d).exists(), "{d}");
    }
    assert!(b.rt.paths.scratch().is_dir());
    assert_eq!(fs::read_dir(b.rt.paths.scratch()).unwrap().count(), 0);
    assert!(b.state_dir().join("proc/meminfo").is_file());
    assert!(b.state_dir().join("proc/cpuinfo").is_file());
    let Some(Call::StartSupervisor {
        clone_flags,
        join_netns,
        config_recorded,
        sync_meanwhile,
        init_layer,
        scratch,
        ..
    }) = b.sys.calls().last().cloned()
    else {
        panic!("the supervisor was not started last: {:?}", b.sys.calls())
    };
    assert_eq!(scratch, b.rt.paths.scratch());
    // The init layer was made after the network: it names the address CNI gave.
    assert!(
        init_layer.hosts.contains("10.9.8.7\tweb"),
        "{}",
        init_layer.hosts
    );
    assert!(
        init_layer.resolv_conf.contains("nameserver 10.9.8.1"),
        "{}",
        init_layer.resolv_conf
    );
    assert_eq!(init_layer.hostname, b.plan.config.hostname);
    // The init joins the pinned namespace rather than getting a new one from clone.
    assert_eq!(join_netns, Some(b.netns()));
    assert_eq!(clone_flags & libc::CLONE_NEWNET, 0);
    assert_ne!(clone_flags & libc::CLONE_NEWPID, 0);
    // A --rm supervisor cleans up from config.json: it was recorded before the start, and
    // the start makes it durable before returning (it names the layers and the cgroup).
    assert!(config_recorded);
    assert_eq!(sync_meanwhile, vec![b.state_dir().join("config.json")]);
}

#[test]
fn a_container_without_network_gets_its_namespace_from_clone() {
    let mut b = Bed::new();
    b.plan.config.net = NetMode::None;
    b.plan.config.netns_path = None;
    b.plan.join_netns = None;
    b.plan.network = None;
    b.start().unwrap();
    assert_eq!(
        b.journal.lines(),
        [
            "cgroup create".to_string(),
            "cgroup devices Default".into(),
            "cgroup apply".into(),
            format!("sys start supervisor {}", b.state_dir().display()),
        ]
    );
    let Some(Call::StartSupervisor { clone_flags, .. }) = b.sys.calls().last().cloned() else {
        panic!("no start: {:?}", b.sys.calls())
    };
    assert_ne!(clone_flags & libc::CLONE_NEWNET, 0);
    assert_eq!(b.rt.config(ID).unwrap().netns_path, None);
    assert!(!b.netns().exists());
}

#[test]
fn a_busy_name_stops_the_start_before_anything_is_made() {
    let b = Bed::new();
    fs::create_dir(b.rt.paths.state_dir("other")).unwrap();
    std::os::unix::fs::symlink("other", b.rt.paths.name_link("web")).unwrap();
    let e = b.start().unwrap_err();
    assert!(
        matches!(&e, StartError::NameInUse { name, other } if name == "web" && other == "other"),
        "{e}"
    );
    assert_eq!(e.stage(), Stage::Reserve);
    assert!(b.journal.lines().is_empty());
    assert!(!b.state_dir().exists());
    // The other container keeps its name.
    assert_eq!(
        fs::read_link(b.rt.paths.name_link("web")).unwrap(),
        PathBuf::from("other")
    );
}

/// A stage that fails on `path`, which is not the container's: the host was not touched,
/// the name is free again, no state is left, and `path` is as it was.
fn assert_refused_at(b: &Bed, e: &StartError, stage: Stage, path: &std::path::Path) {
    assert_eq!(e.stage(), stage, "{e}");
    let failed_on = match e {
        StartError::Reserve { path, .. } | StartError::Rootfs { path, .. } => path,
        other => panic!("not a directory failure: {other}"),
    };
    assert_eq!(failed_on, path);
    assert!(b.journal.lines().is_empty(), "{:?}", b.journal.lines());
    assert!(fs::symlink_metadata(b.rt.paths.name_link("web")).is_err());
    assert_eq!(fs::read_to_string(path).unwrap(), "not ours");
}

#[test]
fn a_directory_that_cannot_be_made_undoes_the_reservation() {
    for (stage, dir) in [Stage::Reserve, Stage::Rootfs]
        .into_iter()
        .zip([Bed::state_dir, Bed::data_dir])
    {
        let b = Bed::new();
        let path = dir(&b);
        fs::write(&path, "not ours").unwrap();
        let e = b.start().unwrap_err();
        assert_refused_at(&b, &e, stage, &path);
        assert!(!b.state_dir().is_dir(), "{stage:?}: state dir left");
    }
}

#[test]
fn a_cgroup_that_cannot_be_made_is_removed_with_the_dirs() {
    let mut b = Bed::new();
    b.cgroup.fail_on = Some(Op::Create);
    let e = b.start().unwrap_err();
    assert!(
        matches!(&e, StartError::Cgroup { id, .. } if id == ID),
        "{e}"
    );
    assert_eq!(e.stage(), Stage::Cgroup);
    assert_eq!(b.journal.lines(), ["cgroup create", "cgroup remove"]);
    b.assert_nothing_left();
}

#[test]
fn refused_limits_remove_the_cgroup_and_the_dirs() {
    let mut b = Bed::new();
    b.cgroup.fail_on = Some(Op::Apply);
    let e = b.start().unwrap_err();
    let journal = [
        "cgroup create",
        "cgroup devices Default",
        "cgroup apply",
        "cgroup remove",
    ];
    assert_undone(&b, &e, Stage::Cgroup, journal.map(String::from).into());
}

#[test]
fn a_netns_that_cannot_be_pinned_undoes_cgroup_and_dirs() {
    let mut b = Bed::new();
    b.sys.fail_on = Some(b.netns());
    let e = b.start().unwrap_err();
    assert!(
        matches!(&e, StartError::Netns(NetnsError::Create { path, .. }) if *path == b.netns()),
        "{e}"
    );
    let mut want = b.through_network();
    want.truncate(6); // up to the failed mount: no plugin ran
    want.push("cgroup remove".into());
    assert_undone(&b, &e, Stage::Network, want);
    assert!(!b.netns().exists());
}

#[test]
fn a_failed_cni_add_unpins_the_netns_and_undoes_the_rest() {
    let b = Bed::new();
    let Exec::Fake(exec) = &b.cni.exec else {
        unreachable!()
    };
    exec.answers.lock().unwrap().clear();
    exec.answers.lock().unwrap().push_back(Output {
        success: false,
        stdout: br#"{"code":11,"msg":"no addresses left"}"#.to_vec(),
        stderr: vec![],
    });
    let e = b.start().unwrap_err();
    assert!(matches!(&e, StartError::Cni { id, .. } if id == ID), "{e}");
    assert!(e.to_string().contains("no addresses left"), "{e}");
    // The DEL is the CNI client's own cleanup of a failed ADD; the start then undoes the
    // netns and the cgroup, and does not DEL a second time.
    let journal = concat(&[b.through_network(), b.network_and_cgroup_undone()]);
    assert_undone(&b, &e, Stage::Network, journal);
}

#[test]
fn a_failed_record_undoes_every_earlier_stage() {
    // Nothing but the disk can refuse config.json: run the stages one by one and put a
    // directory where it goes.
    let b = Bed::new();
    let host = b.host();
    let (mut s, net) = b.through_network_stage(&host);
    s.init_layer(&net).unwrap();
    fs::create_dir(b.state_dir().join("config.json")).unwrap();
    let e = s.record().unwrap_err();
    drop(s);
    assert!(!b.plan.userns_lock.is_held());
    let journal = concat(&[b.through_network(), b.network_and_cgroup_undone()]);
    assert_undone(&b, &e, Stage::Record, journal);
}

#[test]
fn a_failed_start_undoes_every_stage_in_reverse() {
    let mut b = Bed::new();
    b.sys.fail_on = Some(b.state_dir());
    let e = b.start().unwrap_err();
    assert!(
        matches!(&e, StartError::Start { id, .. } if id == ID),
        "{e}"
    );
    let started = format!("sys start supervisor {}", b.state_dir().display());
    let undone = b.network_and_cgroup_undone();
    let journal = concat(&[b.through_network(), vec![started], undone]);
    assert_undone(&b, &e, Stage::Start, journal);
}

#[test]
fn rm_gives_back_what_a_start_took() {
    let b = Bed::new();
    b.start().unwrap();
    let before = b.journal.lines().len();
    let cfg = b.rt.config(ID).unwrap();
    let errors =
        b.rt.release(ID, Some(&cfg), &b.sys, &b.cni, Some(&b.cgroup));
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        b.journal.lines()[before..],
        b.network_and_cgroup_undone()[..]
    );
    b.assert_nothing_left();
}

/// Concurrent `--userns auto` runs: the lock taken with the choice of ids is held through the
/// stages that come before `config.json` and let go as soon as it is written, before the
/// supervisor is started (which would otherwise inherit it).
#[test]
fn the_userns_choice_lock_is_held_until_the_config_records_it() {
    use crate::fsutil::FileLock;
    use crate::plan::{ChoiceLock, USERNS_LOCK};
    let mut b = Bed::new();
    let lock_path = b.rt.paths.run_root.join(USERNS_LOCK);
    b.plan.userns_lock = ChoiceLock::held(FileLock::acquire(&lock_path).unwrap());
    let free = || FileLock::try_acquire(&lock_path).unwrap().is_some();
    let host = b.host();
    let (mut s, net) = b.through_network_stage(&host);
    let views = s.init_layer(&net).unwrap();
    assert!(!free(), "let go before the record");
    s.record().unwrap();
    assert!(free(), "still held after the record");
    assert!(b.state_dir().join("config.json").is_file());
    s.start(views).unwrap();
    s.undo.clear();
    // Clones of the plan share the lock: released once is released for all.
    let other = FileLock::acquire(&lock_path).unwrap();
    let shared = ChoiceLock::held(other);
    let copy = shared.clone();
    shared.release();
    assert!(!copy.is_held() && free());
}
