//! Image import: umoci/skopeo images carrying whiteouts, hand-made hostile layers, metadata
//! preservation, digest verification.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use tweed_runtime::digest::{hex_part, sha256_of};

fn sh(dir: &Path, script: &str) {
    let o = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{script}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// An OCI layout holding one image made of `layers` (uncompressed tars).
fn oci_layout(dir: &Path, layers: &[Vec<u8>], cmd: &[&str]) -> PathBuf {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let put = |data: &[u8]| {
        let d = sha256_of(data);
        std::fs::write(blobs.join(hex_part(&d)), data).unwrap();
        (d, data.len())
    };
    let mut descs = vec![];
    let mut diff_ids = vec![];
    for l in layers {
        let (d, n) = put(l);
        diff_ids.push(d.clone());
        descs.push(serde_json::json!({"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":d,"size":n}));
    }
    let config = serde_json::json!({"architecture":"amd64","os":"linux","config":{"Cmd":cmd},"rootfs":{"type":"layers","diff_ids":diff_ids}});
    let (cd, cn) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":cd,"size":cn},"layers":descs});
    let (md, mn) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "digest":md,"size":mn,"annotations":{"org.opencontainers.image.ref.name":"latest"}}]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    dir.to_path_buf()
}

#[test]
fn umoci_and_skopeo_images_with_whiteouts() {
    require_root!(NEEDS_ROOT);
    let e = Env::new();
    let work = e.mkdir("umoci");
    let rootfs = busybox_rootfs(e.dir.path());
    // Layer 1: busybox. Layer 2 (umoci's own diff): /bin/vi and /etc/group deleted, /etc
    // rewritten, /var/lib/{a,b} added. Layer 3 (hand-made): /var/lib made opaque with only c,
    // and a whiteout for /etc/only's sibling.
    sh(&work, &format!(
        "umoci init --layout oci; umoci new --image oci:bb; umoci unpack --image oci:bb b >/dev/null; \
         cp -a {}/. b/rootfs/; umoci repack --image oci:bb b; rm -rf b; \
         umoci unpack --image oci:bb b >/dev/null; rm b/rootfs/bin/vi; rm -rf b/rootfs/etc; mkdir b/rootfs/etc; \
         echo only > b/rootfs/etc/only; echo drop > b/rootfs/etc/drop; mkdir -p b/rootfs/var/lib; \
         echo a > b/rootfs/var/lib/a; echo b > b/rootfs/var/lib/b; umoci repack --image oci:bb b; rm -rf b",
        rootfs.display()
    ));
    let mut l3 = raw_entry("var/lib/.wh..wh..opq", tar::EntryType::Regular, None, b"");
    l3.extend(raw_entry(
        "var/lib/c",
        tar::EntryType::Regular,
        None,
        b"c\n",
    ));
    l3.extend(raw_entry(
        "etc/.wh.drop",
        tar::EntryType::Regular,
        None,
        b"",
    ));
    std::fs::write(work.join("l3.tar"), finish_tar(l3)).unwrap();
    sh(&work, "umoci raw add-layer --image oci:bb l3.tar; umoci config --image oci:bb --config.cmd /bin/sh; \
         skopeo --insecure-policy copy -q oci:oci:bb docker-archive:bb-docker.tar:bb:docker; \
         skopeo --insecure-policy copy -q oci:oci:bb oci-archive:bb-oci.tar:oci");

    let o = e.ok(&[
        "image",
        "import",
        "--name",
        "bb:dir",
        work.join("oci").to_str().unwrap(),
    ]);
    assert!(o.starts_with("bb:dir sha256:"), "{o}");
    let o = e.ok(&[
        "image",
        "import",
        work.join("bb-docker.tar").to_str().unwrap(),
    ]);
    assert!(o.starts_with("docker.io/library/bb:docker sha256:"), "{o}");
    let o = e.ok(&["image", "import", work.join("bb-oci.tar").to_str().unwrap()]);
    assert!(o.starts_with("bb-oci:oci sha256:"), "{o}");
    // One extraction per layer, shared by the three images.
    assert_eq!(list(&e.image_root.join("layers")).len(), 3);
    assert!(list(&e.image_root.join("tmp")).is_empty());

    for img in ["bb:dir", "bb:docker", "bb-oci:oci"] {
        let out = e.ok(&[
            "run", "--rm", img, "sh", "-c",
            "ls /bin/vi 2>/dev/null || echo no-vi; ls /etc | tr '\\n' ' '; echo; ls /var/lib | tr '\\n' ' '; echo; cat /var/lib/c",
        ]);
        let l: Vec<&str> = out.lines().collect();
        assert_eq!(l[0], "no-vi", "{img}: {out}");
        let etc: Vec<&str> = l[1].split_whitespace().collect();
        assert!(
            etc.contains(&"only") && !etc.contains(&"drop") && !etc.contains(&"group"),
            "{img}: {etc:?}"
        );
        assert_eq!(l[2].trim(), "c", "{img}: opaque /var/lib");
        assert_eq!(l[3], "c");
    }
    // The overlay-format whiteouts on disk.
    let layer3 = list(&e.image_root.join("layers"))
        .into_iter()
        .map(|h| e.image_root.join("layers").join(h))
        .find(|p| p.join("var/lib/c").exists())
        .unwrap();
    let wh = std::fs::symlink_metadata(layer3.join("etc/drop")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert!(!layer3.join("etc/.wh.drop").exists());
    let opq = tweed_runtime::fsutil::lgetxattr(&layer3.join("var/lib"), "trusted.overlay.opaque")
        .unwrap();
    assert_eq!(opq.as_deref(), Some(&b"y"[..]));
    assert!(!layer3.join("var/lib/.wh..wh..opq").exists());
    e.assert_nothing_left();
}

fn refused(e: &Env, name: &str, layer: Vec<u8>, expect: &str) {
    let dir = e.dir.path().join(name);
    oci_layout(&dir, &[finish_tar(layer)], &["/bin/sh"]);
    let before = list(&e.image_root.join("layers"));
    let err = e.fails(&["image", "import", "--name", name, dir.to_str().unwrap()]);
    assert!(err.contains(expect), "{name}: {err}");
    assert_eq!(
        list(&e.image_root.join("layers")),
        before,
        "{name}: partial layer kept"
    );
    assert!(
        list(&e.image_root.join("tmp")).is_empty(),
        "{name}: temp files kept"
    );
    assert!(!e.ok(&["image", "ls", "-q"]).contains(name));
}

#[test]
fn hostile_layers_are_refused_with_a_clear_error() {
    require_root!(NEEDS_ROOT);
    let e = Env::new();
    let outside = e.mkdir("outside");
    let outside_s = outside.to_str().unwrap();
    // Each layer: its tar entries (name, kind, link target, data) and the error it must get.
    type Entry<'a> = (&'a str, tar::EntryType, Option<&'a str>, &'a [u8]);
    use tar::EntryType::{Link, Regular, Symlink};
    let cases: &[(&str, &[Entry], &str)] = &[
        (
            "dotdot",
            &[("a/../../evil", Regular, None, b"x")],
            "contains '..'",
        ),
        (
            "absolute",
            &[("/etc/evil", Regular, None, b"x")],
            "absolute path",
        ),
        (
            "symlink",
            &[
                ("lnk", Symlink, Some(outside_s), b""),
                ("lnk/evil", Regular, None, b"x"),
            ],
            "symlink escape",
        ),
        (
            "relsymlink",
            &[
                ("up", Symlink, Some("../../.."), b""),
                ("up/evil", Regular, None, b"x"),
            ],
            "symlink escape",
        ),
        (
            "hardlink",
            &[("h", Link, Some("../../etc/passwd"), b"")],
            "escapes the layer",
        ),
        (
            "hardlinkvia",
            &[
                ("d", Symlink, Some("/etc"), b""),
                ("h", Link, Some("d/passwd"), b""),
            ],
            "escapes the layer",
        ),
        (
            "hardlinkabs",
            &[("h", Link, Some("/etc/passwd"), b"")],
            "escapes the layer",
        ),
    ];
    for (name, entries, expect) in cases {
        let layer = entries
            .iter()
            .flat_map(|(n, kind, link, data)| raw_entry(n, *kind, *link, data))
            .collect();
        refused(&e, name, layer, expect);
    }
    assert!(list(&outside).is_empty(), "something was written outside");

    // A tampered blob.
    let dir = e.dir.path().join("tampered");
    oci_layout(
        &dir,
        &[finish_tar(raw_entry(
            "f",
            tar::EntryType::Regular,
            None,
            b"good",
        ))],
        &["/bin/sh"],
    );
    let blobs = dir.join("blobs/sha256");
    for b in list(&blobs) {
        let p = blobs.join(&b);
        let mut data = std::fs::read(&p).unwrap();
        if let Some(i) = data.windows(4).position(|w| w == b"good") {
            data[i] = b'b';
            std::fs::write(&p, data).unwrap();
        }
    }
    let err = e.fails(&["image", "import", "--name", "t", dir.to_str().unwrap()]);
    assert!(err.contains("sha256 mismatch"), "{err}");
    // Not an image at all.
    let err = e.fails(&[
        "image",
        "import",
        e.dir.path().join("outside").to_str().unwrap(),
    ]);
    assert!(
        err.contains("not a docker-save tarball or OCI image layout"),
        "{err}"
    );
}

#[test]
fn modes_owners_xattrs_hardlinks_and_devices_are_preserved() {
    require_root!(NEEDS_ROOT);
    let e = Env::new();
    let b = &mut tar::Builder::new(Vec::new());
    #[allow(clippy::too_many_arguments)]
    fn add(
        b: &mut tar::Builder<Vec<u8>>,
        path: &str,
        kind: tar::EntryType,
        mode: u32,
        uid: u64,
        data: &[u8],
        link: Option<&str>,
        f: &dyn Fn(&mut tar::Header),
    ) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid + 1);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        f(&mut h);
        match link {
            Some(l) => b.append_link(&mut h, path, l).unwrap(),
            None => b.append_data(&mut h, path, data).unwrap(),
        }
    }
    add(
        b,
        "bin",
        tar::EntryType::Directory,
        0o755,
        0,
        b"",
        None,
        &|_| {},
    );
    add(
        b,
        "bin/suid",
        tar::EntryType::Regular,
        0o4755,
        1234,
        b"#!x",
        None,
        &|_| {},
    );
    add(
        b,
        "bin/again",
        tar::EntryType::Link,
        0o4755,
        1234,
        b"",
        Some("bin/suid"),
        &|_| {},
    );
    add(
        b,
        "secret",
        tar::EntryType::Directory,
        0o700,
        42,
        b"",
        None,
        &|_| {},
    );
    add(
        b,
        "dev-null",
        tar::EntryType::Char,
        0o666,
        0,
        b"",
        None,
        &|h| {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        },
    );
    add(
        b,
        "pipe",
        tar::EntryType::Fifo,
        0o600,
        0,
        b"",
        None,
        &|_| {},
    );
    add(
        b,
        "sl",
        tar::EntryType::Symlink,
        0o777,
        7,
        b"",
        Some("/bin/suid"),
        &|_| {},
    );
    b.append_pax_extensions([("SCHILY.xattr.user.tweed", &b"yes"[..])])
        .unwrap();
    add(
        b,
        "xattr-file",
        tar::EntryType::Regular,
        0o640,
        0,
        b"x",
        None,
        &|_| {},
    );
    let layer = std::mem::replace(b, tar::Builder::new(Vec::new()))
        .into_inner()
        .unwrap();

    // As a docker-save tarball.
    let diff = sha256_of(&layer);
    let config = serde_json::json!({"config":{"Cmd":["/bin/suid"]},"rootfs":{"type":"layers","diff_ids":[diff]}}).to_string();
    let chex = hex_part(&sha256_of(config.as_bytes())).to_string();
    let mut outer = tar::Builder::new(Vec::new());
    let mut put = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        outer.append_data(&mut h, name, data).unwrap();
    };
    put(&format!("{chex}.json"), config.as_bytes());
    put("abc/layer.tar", &layer);
    put("manifest.json", serde_json::json!([{"Config":format!("{chex}.json"),"RepoTags":["meta:1"],"Layers":["abc/layer.tar"]}]).to_string().as_bytes());
    let tarball = e.dir.path().join("meta.tar");
    std::fs::write(&tarball, outer.into_inner().unwrap()).unwrap();
    let o = e.ok(&["image", "import", tarball.to_str().unwrap()]);
    assert_eq!(o.trim(), format!("meta:1 sha256:{chex}"));

    let l = e.image_root.join("layers").join(hex_part(&diff));
    let m = |p: &str| std::fs::symlink_metadata(l.join(p)).unwrap();
    let suid = m("bin/suid");
    assert_eq!(suid.permissions().mode() & 0o7777, 0o4755);
    assert_eq!((suid.uid(), suid.gid()), (1234, 1235));
    assert_eq!(suid.mtime(), 1_600_000_000);
    assert_eq!(m("bin/again").ino(), suid.ino());
    assert_eq!(suid.nlink(), 2);
    let secret = m("secret");
    assert_eq!(
        (secret.permissions().mode() & 0o7777, secret.uid()),
        (0o700, 42)
    );
    let dev = m("dev-null");
    assert!(dev.file_type().is_char_device());
    assert_eq!(
        (
            tweed_runtime::fsutil::dev_major(dev.rdev()),
            tweed_runtime::fsutil::dev_minor(dev.rdev())
        ),
        (1, 3)
    );
    assert!(m("pipe").file_type().is_fifo());
    assert_eq!(
        std::fs::read_link(l.join("sl")).unwrap(),
        PathBuf::from("/bin/suid")
    );
    assert_eq!(m("sl").uid(), 7);
    assert_eq!(
        tweed_runtime::fsutil::lgetxattr(&l.join("xattr-file"), "user.tweed")
            .unwrap()
            .as_deref(),
        Some(&b"yes"[..])
    );

    // A wrong diff id in the config is caught.
    let bad_config =
        serde_json::json!({"rootfs":{"type":"layers","diff_ids":[sha256_of(b"other")]}})
            .to_string();
    let bhex = hex_part(&sha256_of(bad_config.as_bytes())).to_string();
    let mut outer = tar::Builder::new(Vec::new());
    for (name, data) in [
        (format!("{bhex}.json"), bad_config.as_bytes().to_vec()),
        ("x/layer.tar".to_string(), finish_tar(raw_entry("f", tar::EntryType::Regular, None, b"z"))),
        ("manifest.json".to_string(), serde_json::json!([{"Config":format!("{bhex}.json"),"RepoTags":["bad:1"],"Layers":["x/layer.tar"]}]).to_string().into_bytes()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        outer.append_data(&mut h, &name, &data[..]).unwrap();
    }
    let bad = e.dir.path().join("bad.tar");
    std::fs::write(&bad, outer.into_inner().unwrap()).unwrap();
    let err = e.fails(&["image", "import", bad.to_str().unwrap()]);
    assert!(err.contains("the image config says"), "{err}");
    assert_eq!(list(&e.image_root.join("layers")).len(), 1);
}
