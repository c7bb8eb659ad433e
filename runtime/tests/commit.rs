//! `commit`: the writable layer becomes an image layer (whiteouts converted back, init-layer
//! files left out), and the new image runs with the change.

mod common;

use common::*;

#[test]
fn commit_round_trip() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    e.start(&[
        "--name",
        "src",
        "--hostname",
        "srchost",
        "busybox",
        "sh",
        "-c",
        "echo made > /new; mkdir -p /var/data; echo v1 > /var/data/keep; \
         rm /bin/vi; rm -rf /etc; mkdir /etc; echo only > /etc/only; \
         echo 'root:x:0:0:root:/root:/bin/sh' > /etc/passwd; echo '10.9.9.9 evil' >> /etc/hosts; \
         chmod 4755 /new; exec sleep 1000",
    ]);
    e.wait_until("the changes", std::time::Duration::from_secs(5), || {
        e.run(&["exec", "src", "test", "-f", "/etc/only"])
            .status
            .success()
    });
    let out = e.ok(&["commit", "src", "derived:v1"]);
    assert!(out.starts_with("derived:v1 sha256:"), "{out}");
    let imgs = e.ok(&["image", "ls"]);
    assert!(imgs.contains("derived:v1"));

    let out = e.ok(&[
        "run",
        "--rm",
        "--hostname",
        "newhost",
        "derived:v1",
        "sh",
        "-c",
        "cat /new; cat /var/data/keep; ls /bin/vi 2>/dev/null || echo vi-gone; \
         ls /etc | tr '\\n' ' '; echo; cat /etc/hostname; grep -c evil /etc/hosts; stat -c %a /new",
    ]);
    let l: Vec<&str> = out.lines().collect();
    assert_eq!(l[0], "made");
    assert_eq!(l[1], "v1");
    assert_eq!(l[2], "vi-gone", "whiteout lost");
    // The recreated /etc is opaque: the image's group file is gone; init-layer files are the
    // new container's own.
    let etc: Vec<&str> = l[3].split_whitespace().collect();
    assert!(etc.contains(&"only") && etc.contains(&"passwd"), "{etc:?}");
    assert!(!etc.contains(&"group"), "opaque dir lost: {etc:?}");
    assert_eq!(l[4], "newhost");
    assert_eq!(
        l[5], "0",
        "the committed image carries the old container's /etc/hosts"
    );
    assert_eq!(l[6], "4755");

    // The layer of the old image is shared, not copied.
    let layers = list(&e.image_root.join("layers"));
    assert_eq!(layers.len(), 2);
    // The image in use cannot be removed; once the container is gone it can.
    assert!(e
        .fails(&["image", "rm", "busybox"])
        .contains("used by container"));
    e.ok(&["rm", "-f", "src"]);
    e.ok(&["image", "rm", "derived:v1"]);
    e.ok(&["image", "rm", "busybox"]);
    assert!(list(&e.image_root.join("layers")).is_empty());
    e.assert_nothing_left();
}
