//! Hostile images: each test is one attack an image author could try on `tweedctl image import`
//! (or on running what it stored), in the docker-save and OCI formats where both apply. Each
//! asserts that the host file the attack aims at is untouched, that nothing was stored, and that
//! the error names the entry, file or field at fault. Also: the runtime's state is private.
//!
//! Run: `cargo test -p tweed-runtime --test hostile_images` (as root).

mod common;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use tweed_runtime::digest::{hex_part, sha256_of};

const HOST: &str = "host content\n";

/// A raw tar entry with any name (see [`raw_entry`]); `link` empty for none.
fn entry(name: &str, kind: tar::EntryType, link: &str, data: &[u8]) -> Vec<u8> {
    raw_entry(name, kind, Some(link).filter(|l| !l.is_empty()), data)
}

fn file(name: &str, data: &[u8]) -> Vec<u8> {
    entry(name, tar::EntryType::Regular, "", data)
}

fn tar_of(entries: Vec<Vec<u8>>) -> Vec<u8> {
    finish_tar(entries.concat())
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    g.write_all(data).unwrap();
    g.finish().unwrap()
}

/// One attack's world: a runtime, and a host file outside it that must stay as it is.
struct Case {
    e: Env,
    victim: PathBuf,
}

impl Case {
    fn new() -> Case {
        let e = Env::new();
        let victim = e.dir.path().join("host-secret");
        std::fs::write(&victim, HOST).unwrap();
        Case { e, victim }
    }

    fn v(&self) -> &str {
        self.victim.to_str().unwrap()
    }

    fn write(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.e.dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    /// `image import` of `path` must fail with every one of `expect` in its error, leave the
    /// host file, the layer store and the temp dir as they were, and record no image.
    fn refused(&self, path: &Path, extra: &[&str], expect: &[&str]) -> String {
        let layers = |e: &Env| list(&e.image_root.join("layers"));
        let before = if self.e.image_root.exists() {
            layers(&self.e)
        } else {
            vec![]
        };
        let mut args = vec!["image", "import"];
        args.extend_from_slice(extra);
        args.push(path.to_str().unwrap());
        let err = self.e.fails(&args);
        for x in expect {
            assert!(err.contains(x), "{path:?}: error lacks {x:?}: {err}");
        }
        assert_eq!(std::fs::read_to_string(&self.victim).unwrap(), HOST);
        assert_eq!(layers(&self.e), before, "{path:?}: a layer was kept");
        assert!(
            list(&self.e.image_root.join("tmp")).is_empty(),
            "{path:?}: temporary files kept"
        );
        assert_eq!(self.e.ok(&["image", "ls", "-q"]).trim(), "");
        err
    }
}

/// A docker-save tarball: `extra` entries first (the attack), then config, layers and manifest.
fn docker_archive(extra: Vec<Vec<u8>>, config: &serde_json::Value, layers: &[Vec<u8>]) -> Vec<u8> {
    let cfg = config.to_string();
    let chex = hex_part(&sha256_of(cfg.as_bytes())).to_string();
    let mut entries = extra;
    entries.push(file(&format!("{chex}.json"), cfg.as_bytes()));
    let mut names = vec![];
    for (i, l) in layers.iter().enumerate() {
        names.push(format!("l{i}/layer.tar"));
        entries.push(file(&format!("l{i}/layer.tar"), l));
    }
    let manifest = serde_json::json!([{"Config": format!("{chex}.json"), "RepoTags": ["evil:1"], "Layers": names}]);
    entries.push(file("manifest.json", manifest.to_string().as_bytes()));
    tar_of(entries)
}

fn config_for(diff_ids: &[String]) -> serde_json::Value {
    serde_json::json!({"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sh"]},
        "rootfs":{"type":"layers","diff_ids":diff_ids}})
}

/// An OCI layout as (path, bytes) pairs: blobs for `layers` and a config from `diff_ids`
/// (their true diff ids when `None`); `tweak` may rewrite the manifest before it is stored.
fn oci_files(
    layers: &[Vec<u8>],
    diff_ids: Option<Vec<String>>,
    tweak: impl FnOnce(&mut serde_json::Value),
) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![(
        "oci-layout".to_string(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    )];
    let mut put = |data: &[u8]| {
        let d = sha256_of(data);
        files.push((format!("blobs/sha256/{}", hex_part(&d)), data.to_vec()));
        (d, data.len())
    };
    let mut descs = vec![];
    for l in layers {
        let (d, n) = put(l);
        descs.push(serde_json::json!({"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":d,"size":n}));
    }
    let diff_ids = diff_ids.unwrap_or_else(|| layers.iter().map(|l| sha256_of(l)).collect());
    let (cd, cn) = put(config_for(&diff_ids).to_string().as_bytes());
    let mut manifest = serde_json::json!({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":cd,"size":cn},"layers":descs});
    tweak(&mut manifest);
    let (md, mn) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "digest":md,"size":mn,"annotations":{"org.opencontainers.image.ref.name":"evil:1"}}]});
    files.push(("index.json".into(), index.to_string().into_bytes()));
    files
}

fn oci_dir(dir: &Path, files: &[(String, Vec<u8>)]) -> PathBuf {
    for (name, data) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    dir.to_path_buf()
}

fn oci_archive(extra: Vec<Vec<u8>>, files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut entries = extra;
    entries.extend(files.iter().map(|(n, d)| file(n, d)));
    tar_of(entries)
}

fn one_file_layer() -> Vec<u8> {
    tar_of(vec![file("hello", b"hi\n")])
}

fn both_formats(c: &Case, name: &str, extra: Vec<Vec<u8>>, expect: &[&str]) {
    let layer = one_file_layer();
    let d = c.write(
        &format!("{name}-docker.tar"),
        &docker_archive(
            extra.clone(),
            &config_for(&[sha256_of(&layer)]),
            std::slice::from_ref(&layer),
        ),
    );
    c.refused(&d, &[], expect);
    let o = c.write(
        &format!("{name}-oci.tar"),
        &oci_archive(extra, &oci_files(&[layer], None, |_| {})),
    );
    c.refused(&o, &[], expect);
}

#[test]
fn archive_symlink_then_file_cannot_overwrite_a_host_file() {
    let c = Case::new();
    let attack = vec![
        entry("f", tar::EntryType::Symlink, c.v(), b""),
        file("f", b"image bytes\n"),
    ];
    both_formats(&c, "symfile", attack, &["\"f\"", "leaves the archive"]);
    // A relative link climbing out, then a write through it as a directory.
    let attack = vec![
        entry("d", tar::EntryType::Symlink, "../../..", b""),
        file("d/host-secret", b"image bytes\n"),
    ];
    both_formats(&c, "symdir", attack, &["\"d\"", "leaves the archive"]);
}

#[test]
fn archive_dotdot_and_absolute_entries_are_refused() {
    let c = Case::new();
    both_formats(
        &c,
        "dotdot",
        vec![file("a/../../host-secret", b"image bytes\n")],
        &["\"a/../../host-secret\"", "contains '..'"],
    );
    let abs = c.v().to_string();
    both_formats(
        &c,
        "abs",
        vec![file(&abs, b"image bytes\n")],
        &[&format!("{abs:?}"), "absolute path"],
    );
}

#[test]
fn layer_dotdot_and_absolute_entries_are_refused_in_both_formats() {
    let c = Case::new();
    for (name, layer, expect) in [
        (
            "ldotdot",
            tar_of(vec![file("x/../../../host-secret", b"image bytes\n")]),
            "contains '..'",
        ),
        (
            "labs",
            tar_of(vec![file(c.v(), b"image bytes\n")]),
            "absolute path",
        ),
    ] {
        let d = c.write(
            &format!("{name}.tar"),
            &docker_archive(
                vec![],
                &config_for(&[sha256_of(&layer)]),
                std::slice::from_ref(&layer),
            ),
        );
        c.refused(&d, &[], &["l0/layer.tar", expect]);
        let dir = c.e.dir.path().join(name);
        oci_dir(&dir, &oci_files(&[layer], None, |_| {}));
        c.refused(&dir, &[], &["blobs/sha256/", expect]);
    }
}

#[test]
fn hardlinks_out_of_the_tree_are_refused() {
    let c = Case::new();
    let abs = c.v().to_string();
    both_formats(
        &c,
        "hlabs",
        vec![entry("h", tar::EntryType::Link, &abs, b"")],
        &["\"h\"", "escapes"],
    );
    both_formats(
        &c,
        "hlrel",
        vec![entry("h", tar::EntryType::Link, "../../host-secret", b"")],
        &["\"h\"", "escapes"],
    );
    // Through a symlinked directory that stays inside by name but is a link all the same.
    both_formats(
        &c,
        "hlvia",
        vec![
            entry("real", tar::EntryType::Directory, "", b""),
            entry("alias", tar::EntryType::Symlink, "real", b""),
            file("real/f", b"x"),
            entry("h", tar::EntryType::Link, "alias/f", b""),
        ],
        &["\"h\"", "escapes"],
    );
    // And in a layer.
    let layer = tar_of(vec![entry("h", tar::EntryType::Link, &abs, b"")]);
    let dir = c.e.dir.path().join("hllayer");
    oci_dir(&dir, &oci_files(&[layer], None, |_| {}));
    c.refused(&dir, &[], &["\"h\"", "escapes the layer"]);
}

#[test]
fn symlink_chains_cannot_lead_the_metadata_outside() {
    let c = Case::new();
    // Each link stays inside by name; followed, x leads four levels above the archive root:
    // y is d1/d2/d3/y -> ../.. (d1), and x = d1/d2/d3/x -> y/../../../.. climbs from there.
    let planted = c.e.dir.path().join("planted.json");
    std::fs::write(&planted, config_for(&[]).to_string()).unwrap();
    let chain = vec![
        entry("d1/d2/d3/y", tar::EntryType::Symlink, "../..", b""),
        entry("d1/d2/d3/x", tar::EntryType::Symlink, "y/../../../..", b""),
    ];
    let manifest =
        serde_json::json!([{"Config":"d1/d2/d3/x/planted.json","RepoTags":["evil:1"],"Layers":[]}]);
    let mut entries = chain.clone();
    entries.push(file("manifest.json", manifest.to_string().as_bytes()));
    let p = c.write("chain-docker.tar", &tar_of(entries));
    c.refused(
        &p,
        &[],
        &["\"d1/d2/d3/x/planted.json\"", "escapes the image directory"],
    );
    // In an OCI archive the chain replaces the blob directory, and the blobs wait outside
    // (where the link leads): reading them would mean reading host files.
    let (blobs, files): (Vec<_>, Vec<_>) = oci_files(&[one_file_layer()], None, |_| {})
        .into_iter()
        .partition(|(n, _)| n.starts_with("blobs/"));
    oci_dir(c.e.dir.path(), &blobs_outside(blobs));
    let mut extra = chain;
    extra.push(entry("blobs", tar::EntryType::Symlink, "d1/d2/d3/x", b""));
    let p = c.write("chain-oci.tar", &oci_archive(extra, &files));
    c.refused(&p, &[], &["blobs/sha256/", "escapes the image directory"]);
    // In a layer, a chain ending outside is never written through.
    let layer = tar_of(vec![
        entry("a", tar::EntryType::Symlink, "b", b""),
        entry(
            "b",
            tar::EntryType::Symlink,
            c.e.dir.path().to_str().unwrap(),
            b"",
        ),
        file("a/host-secret", b"image bytes\n"),
    ]);
    let dir = c.e.dir.path().join("chainlayer");
    oci_dir(&dir, &oci_files(&[layer], None, |_| {}));
    c.refused(&dir, &[], &["\"a/host-secret\"", "symlink escape"]);
}

/// `blobs/sha256/X` -> `sha256/X`: where the chain's `blobs` link points.
fn blobs_outside(blobs: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    blobs
        .into_iter()
        .map(|(n, d)| (n.trim_start_matches("blobs/").to_string(), d))
        .collect()
}

#[test]
fn device_nodes_and_fifos_in_archives_are_refused() {
    let c = Case::new();
    for (name, kind, what) in [
        ("blk", tar::EntryType::Block, "block device"),
        ("chr", tar::EntryType::Char, "character device"),
        ("fifo", tar::EntryType::Fifo, "fifo"),
    ] {
        both_formats(
            &c,
            name,
            vec![entry(&format!("dev/{name}"), kind, "", b"")],
            &[&format!("\"dev/{name}\""), what, "refused"],
        );
    }
}

#[test]
fn traversal_diff_ids_cannot_name_a_host_directory() {
    let c = Case::new();
    let layer = one_file_layer();
    let evil = "sha256:../../../../../../../../etc".to_string();
    // docker-save: the config names the layer by a traversal.
    let d = c.write(
        "difftrav-docker.tar",
        &docker_archive(
            vec![],
            &config_for(std::slice::from_ref(&evil)),
            std::slice::from_ref(&layer),
        ),
    );
    c.refused(&d, &[], &["rootfs.diff_ids[0]", "not 64 lowercase hex"]);
    // OCI: same, with the true layer blob present and verified.
    let dir = c.e.dir.path().join("difftrav");
    oci_dir(&dir, &oci_files(&[layer], Some(vec![evil]), |_| {}));
    c.refused(&dir, &[], &["rootfs.diff_ids[0]", "not 64 lowercase hex"]);
    // A record that names one anyway (written by hand into the store) does not load, so
    // cannot be run.
    let e = &c.e;
    e.ok(&["image", "ls"]);
    let rec = serde_json::json!({"name":"evil:1","id":sha256_of(b"x"),"layers":["sha256:../../../../../../../../etc"],
        "config":{"cmd":["cat","/etc/shadow"]},"created":"","source":"oci-layout"});
    std::fs::write(e.image_root.join("images/evil%3A1.json"), rec.to_string()).unwrap();
    let err = e.fails(&["run", "--rm", "evil:1"]);
    assert!(
        err.contains("evil%3A1.json") && err.contains("not 64 lowercase hex"),
        "{err}"
    );
    e.assert_nothing_left();
}

#[test]
fn bad_digests_are_refused_naming_the_field() {
    let c = Case::new();
    let layer = one_file_layer();
    let upper = format!("sha256:{}", hex_part(&sha256_of(&layer)).to_uppercase());
    for (name, bad, want) in [
        ("upper", upper.as_str(), "not 64 lowercase hex"),
        ("sha512", "sha512:0000", "only sha256"),
        (
            "trav",
            "sha256:../../../../etc/passwd",
            "not 64 lowercase hex",
        ),
        ("none", "deadbeef", "no algorithm"),
    ] {
        let bad = bad.to_string();
        let dir = c.e.dir.path().join(format!("bd-{name}"));
        oci_dir(
            &dir,
            &oci_files(std::slice::from_ref(&layer), None, |m| {
                m["layers"][0]["digest"] = bad.into()
            }),
        );
        c.refused(&dir, &[], &["layers[0].digest", want]);
    }
    // A config whose content does not hash to its descriptor.
    let dir = c.e.dir.path().join("bd-mismatch");
    let mut files = oci_files(std::slice::from_ref(&layer), None, |_| {});
    let cfg = config_for(&[sha256_of(&layer)]).to_string();
    let cpath = format!("blobs/sha256/{}", hex_part(&sha256_of(cfg.as_bytes())));
    for (n, d) in files.iter_mut() {
        if *n == cpath {
            d[0] = b' ';
        }
    }
    oci_dir(&dir, &files);
    c.refused(&dir, &[], &[&cpath, "sha256 mismatch"]);
    // A layer whose content is not its diff id (docker-save carries no blob digests).
    let d = c.write(
        "bd-diff.tar",
        &docker_archive(vec![], &config_for(&[sha256_of(b"other")]), &[layer]),
    );
    c.refused(&d, &[], &["l0/layer.tar", "the image config says"]);
}

#[test]
fn metadata_pointing_outside_is_refused() {
    let c = Case::new();
    let layer = one_file_layer();
    let cfg = config_for(&[sha256_of(&layer)]).to_string();
    let chex = hex_part(&sha256_of(cfg.as_bytes())).to_string();
    for (name, config, layers) in [
        (
            "cfgabs",
            c.v().to_string(),
            vec!["l0/layer.tar".to_string()],
        ),
        (
            "cfgrel",
            "../../host-secret".to_string(),
            vec!["l0/layer.tar".to_string()],
        ),
        ("layabs", format!("{chex}.json"), vec![c.v().to_string()]),
        (
            "layrel",
            format!("{chex}.json"),
            vec!["l0/../../../host-secret".to_string()],
        ),
    ] {
        let manifest = serde_json::json!([{"Config":config,"RepoTags":["evil:1"],"Layers":layers}]);
        let p = c.write(
            &format!("{name}.tar"),
            &tar_of(vec![
                file(&format!("{chex}.json"), cfg.as_bytes()),
                file("l0/layer.tar", &layer),
                file("manifest.json", manifest.to_string().as_bytes()),
            ]),
        );
        let shown = if name.starts_with("cfg") {
            config
        } else {
            layers[0].clone()
        };
        c.refused(
            &p,
            &[],
            &[&format!("{shown:?}"), "escapes the image directory"],
        );
    }
    // An OCI directory whose index.json and blobs are links to host files.
    let dir = c.e.dir.path().join("ocilinks");
    let files = oci_files(&[layer], None, |_| {});
    oci_dir(&dir, &files);
    let (blob, _) = files.iter().find(|(n, _)| n.starts_with("blobs/")).unwrap();
    std::fs::remove_file(dir.join(blob)).unwrap();
    std::os::unix::fs::symlink(&c.victim, dir.join(blob)).unwrap();
    c.refused(&dir, &[], &[blob.as_str(), "escapes the image directory"]);
    std::fs::remove_file(dir.join("index.json")).unwrap();
    std::os::unix::fs::symlink(&c.victim, dir.join("index.json")).unwrap();
    c.refused(
        &dir,
        &[],
        &["\"index.json\"", "escapes the image directory"],
    );
}

#[test]
fn tar_and_gzip_bombs_are_stopped_by_the_limits() {
    let c = Case::new();
    // 64 MiB of zeros: about 64 KiB gzipped.
    let big = tar_of(vec![file("zeros", &vec![0u8; 64 << 20])]);
    let layer = gzip(&big);
    assert!(layer.len() < 1 << 20);
    let d = c.write(
        "bomb-docker.tar",
        &docker_archive(
            vec![],
            &config_for(&[sha256_of(&big)]),
            std::slice::from_ref(&layer),
        ),
    );
    c.refused(
        &d,
        &["--max-unpacked", "8m"],
        &[
            "l0/layer.tar",
            "\"zeros\"",
            "8388608 bytes",
            "--max-unpacked",
        ],
    );
    // The whole archive gzipped: the outer stream is bounded too.
    let outer = gzip(&docker_archive(
        vec![],
        &config_for(&[sha256_of(&big)]),
        std::slice::from_ref(&big),
    ));
    let o = c.write("bomb-outer.tar.gz", &outer);
    c.refused(
        &o,
        &["--max-unpacked", "8m"],
        &["image archive", "--max-unpacked"],
    );
    // Under the default limits the same image is fine.
    let dir = c.e.dir.path().join("bomb-ok");
    oci_dir(
        &dir,
        &oci_files(&[layer], Some(vec![sha256_of(&big)]), |_| {}),
    );
    c.e.ok(&["image", "import", dir.to_str().unwrap()]);
}

#[test]
fn huge_entry_counts_are_stopped_by_the_limits() {
    let c = Case::new();
    let layer = tar_of((0..3000).map(|i| file(&format!("f{i}"), b"")).collect());
    let dir = c.e.dir.path().join("many");
    oci_dir(&dir, &oci_files(std::slice::from_ref(&layer), None, |_| {}));
    c.refused(
        &dir,
        &["--max-entries", "1000"],
        &["\"f1000\"", "more than 1000 entries", "--max-entries"],
    );
    let d = c.write(
        "many-docker.tar",
        &docker_archive(
            (0..2000).map(|i| file(&format!("junk/{i}"), b"")).collect(),
            &config_for(&[sha256_of(&layer)]),
            &[layer],
        ),
    );
    c.refused(
        &d,
        &["--max-entries", "1000"],
        &["image archive", "more than 1000 entries"],
    );
}

#[test]
fn whiteouts_of_dot_and_dotdot_are_refused() {
    let c = Case::new();
    for (name, wh) in [("whdot", "a/.wh.."), ("whdotdot", ".wh...")] {
        let layer = tar_of(vec![file("a/keep", b"k"), file(wh, b"")]);
        let dir = c.e.dir.path().join(name);
        oci_dir(&dir, &oci_files(&[layer], None, |_| {}));
        c.refused(&dir, &[], &[&format!("{wh:?}"), "whiteout of '.' or '..'"]);
    }
    // The store itself survived (a whiteout of ".." would have removed the layer's parent).
    assert!(c.e.image_root.join("tmp").is_dir());
}

#[test]
fn an_unverified_layer_directory_is_never_trusted() {
    let c = Case::new();
    let layer = one_file_layer();
    let diff = sha256_of(&layer);
    let dir = c.e.dir.path().join("img");
    oci_dir(&dir, &oci_files(&[layer], None, |_| {}));
    // Something sits where the layer would go before any import verified it: a directory
    // with a planted file, then a link to a host directory.
    c.e.ok(&["image", "ls"]);
    let ldir = c.e.image_root.join("layers").join(hex_part(&diff));
    std::fs::create_dir(&ldir).unwrap();
    std::fs::write(ldir.join("planted"), "x").unwrap();
    c.e.ok(&["image", "import", "--name", "a:1", dir.to_str().unwrap()]);
    assert!(
        !ldir.join("planted").exists(),
        "the planted directory was trusted"
    );
    assert_eq!(std::fs::read(ldir.join("hello")).unwrap(), b"hi\n");
    assert!(c
        .e
        .image_root
        .join("verified")
        .join(hex_part(&diff))
        .is_file());

    let host_dir = c.e.dir.path().join("hostdir");
    std::fs::create_dir(&host_dir).unwrap();
    std::fs::write(host_dir.join("keep"), "k").unwrap();
    std::fs::remove_file(c.e.image_root.join("verified").join(hex_part(&diff))).unwrap();
    std::fs::remove_dir_all(&ldir).unwrap();
    std::os::unix::fs::symlink(&host_dir, &ldir).unwrap();
    // Not marked: running the image refuses it rather than mounting the host directory.
    let err = c.e.fails(&["run", "--rm", "a:1", "/bin/sh"]);
    assert!(
        err.contains(&diff) && err.contains("never verified"),
        "{err}"
    );
    c.e.ok(&["image", "import", "--name", "a:1", dir.to_str().unwrap()]);
    assert!(std::fs::symlink_metadata(&ldir).unwrap().is_dir());
    assert_eq!(list(&host_dir), vec!["keep".to_string()]);
    c.e.assert_nothing_left();
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn runtime_state_and_logs_are_private() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    let id = e.start(&[
        "-e",
        "SECRET=hunter2",
        // Limits, so that the rendered /proc views exist too.
        "--memory",
        "64m",
        "--cpus",
        "0.5",
        "busybox",
        "sh",
        "-c",
        "echo out-secret; sleep 30",
    ]);
    e.wait_until("the log", std::time::Duration::from_secs(10), || {
        e.ok(&["logs", &id]).contains("out-secret")
    });
    let state = e.run_root.join("containers").join(&id);
    for d in [
        e.run_root.clone(),
        e.run_root.join("containers"),
        e.run_root.join("names"),
        state.clone(),
        e.image_root.clone(),
        e.image_root.join("layers"),
        e.image_root.join("verified"),
        e.image_root.join("images"),
        e.image_root.join("tmp"),
        e.image_root.join("containers"),
    ] {
        assert_eq!(mode(&d), 0o700, "{d:?}");
    }
    // Every regular file the runtime wrote for itself, container env and output included.
    for f in ["config.json", "log", "shim.log", "shim.json"] {
        let p = state.join(f);
        if f == "config.json" {
            assert!(std::fs::read_to_string(&p).unwrap().contains("hunter2"));
        }
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{p:?}");
        }
    }
    for dir in [e.image_root.join("images"), e.image_root.join("verified")] {
        for f in list(&dir) {
            let p = dir.join(f);
            assert_eq!(mode(&p), 0o600, "{p:?}");
            assert_eq!(std::fs::metadata(&p).unwrap().uid(), 0);
        }
    }
    // The /proc views: in a 0700 directory, each 0444 and root's, like the /proc files they
    // stand for (the container reads them as any uid, through read-only bind mounts).
    let views = state.join("proc");
    assert_eq!(mode(&views), 0o700);
    assert_eq!(list(&views), ["cpu-online", "cpuinfo", "meminfo"]);
    for f in list(&views) {
        let p = views.join(&f);
        assert_eq!(mode(&p), 0o444, "{p:?}");
        assert_eq!(std::fs::metadata(&p).unwrap().uid(), 0, "{p:?}");
    }
    // Atomic writes leave no temporary files behind.
    for d in [&state, &views] {
        for f in list(d) {
            assert!(!f.contains(".tmp"), "{f}");
        }
    }
    e.ok(&["rm", "-f", &id]);
    e.assert_nothing_left();
}
