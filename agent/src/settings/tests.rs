use super::*;
use std::path::Path;

/// Loads `args` (after the program name) with `file` as the `--config` file, if any.
fn load(args: &[&str], file: Option<&str>) -> Result<Settings, SettingsError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tweedd.yaml");
    let mut argv: Vec<OsString> = vec!["tweedd".into()];
    argv.extend(args.iter().map(OsString::from));
    if let Some(text) = file {
        std::fs::write(&path, text).unwrap();
        argv.extend(["--config".into(), path.clone().into_os_string()]);
    }
    let _g = env_lock();
    Settings::load_from(argv).map_err(|e| match e {
        // Errors name the file by its path; tests look for one fixed name.
        SettingsError::Invalid {
            source_name,
            flag,
            reason,
        } => SettingsError::Invalid {
            source_name: source_name.replace(path.to_str().unwrap(), "/etc/tweed/f.yaml"),
            flag,
            reason,
        },
        other => other,
    })
}

fn err(args: &[&str], file: Option<&str>) -> String {
    load(args, file).unwrap_err().to_string()
}

/// The precedence table: per setting, the flag as given, then the value of its environment
/// variable and of its file key (named after the flag). Each layer's value differs from the next
/// one's and the file's from the default (a boolean cannot differ from all three).
const LAYERS: &[(&str, &str, &str)] = &[
    ("--lease-ttl=1h", "2h", "3h"),
    ("--subnet-lease-renew-margin=30", "90s", "2h"),
    ("--iptables-resync=7", "30s", "1m"),
    ("--ip-masq", "no", "true"),
    ("--nftables=yes", "0", "on"),
    ("--iface=eth1 --iface=10.0.0.1", "eth2,eth3", "[eth4]"),
    (
        "--iface-regex=^f --iface-regex=^198\\.18\\.",
        "^e,1",
        "'^a,^b'",
    ),
    ("--iface-can-reach=198.18.0.1", "198.18.0.2", "198.18.0.3"),
    ("--public-ip=10.0.0.1", "10.0.0.2", "10.0.0.3"),
    (
        "--etcd-endpoints=http://a:1,http://b:2",
        "https://e:1",
        "[http://f:1]",
    ),
    ("--etcd-prefix=/flag", "/env", "/file"),
    ("--etcd-cafile=/flag.pem", "/env.pem", "/file.pem"),
    ("--metrics-addr=off", ":9100", "127.0.0.1:1"),
    ("--api-socket=/flag.sock", "/env.sock", "/file.sock"),
    ("--subnet-file=/flag/s.env", "/env/s.env", "/file/s.env"),
    ("--state-dir=/flag", "/env", "/file"),
    ("--log-level=debug", "warn", "trace"),
    ("--udp-workers=1", "2", "3"),
];

/// The precedence, once for every setting: for each combination of layers that set it, the
/// settings equal those of the highest layer alone (flag > environment > file > default).
#[test]
fn flag_beats_env_beats_file_beats_default() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tweedd.yaml");
    let _g = env_lock();
    for (flag, env_value, file_value) in LAYERS {
        let long = &flag[2..flag.find(['=', ' ']).unwrap_or(flag.len())];
        let var = format!("TWEED_{}", long.to_ascii_uppercase().replace('-', "_"));
        std::fs::write(&path, format!("{long}: {file_value}\n")).unwrap();
        // The settings with the layers in `layers` (flag, env, file) set, as Debug text.
        let load = |layers: [bool; 3]| {
            let mut argv: Vec<OsString> = vec!["tweedd".into()];
            if layers[0] {
                argv.extend(flag.split(' ').map(OsString::from));
            }
            if layers[1] {
                std::env::set_var(&var, env_value);
            }
            if layers[2] {
                argv.extend(["--config".into(), path.clone().into_os_string()]);
            }
            let loaded = Settings::load_from(argv);
            std::env::remove_var(&var);
            let mut s = loaded.unwrap_or_else(|e| panic!("{flag} {layers:?}: {e}"));
            s.config = None;
            format!("{s:?}")
        };
        let alone: Vec<String> = (0..4).map(|i| load([i == 0, i == 1, i == 2])).collect();
        for pair in alone.windows(2) {
            assert_ne!(
                pair[0], pair[1],
                "{flag}: a layer gives what the next one does"
            );
        }
        for combo in 0..8u8 {
            let layers = [combo & 1 != 0, combo & 2 != 0, combo & 4 != 0];
            let winner = layers.iter().position(|set| *set).unwrap_or(3);
            assert_eq!(load(layers), alone[winner], "{flag} with {layers:?}");
        }
    }
}

/// What a few layers' values become (the bare-number rules, lists, `off`).
#[test]
fn values_of_each_form() {
    let s = load(
        &["--iptables-resync=7", "--subnet-lease-renew-margin=30"],
        None,
    )
    .unwrap();
    assert_eq!(
        (s.iptables_resync, s.subnet_lease_renew_margin),
        (Duration::from_secs(7), Duration::from_secs(1800))
    );
    let s = load(
        &[
            "--iface-regex=^f",
            "--iface-regex=^198\\.18\\.",
            "--iface=eth1,10.0.0.1",
        ],
        Some("etcd-endpoints: [http://f:1]\nmetrics-addr: off\nudp-workers: 3\n"),
    )
    .unwrap();
    assert_eq!(s.iface_regex, vec!["^f", "^198\\.18\\."]);
    assert_eq!(s.iface, vec!["eth1", "10.0.0.1"]);
    assert_eq!(s.etcd().endpoints, vec!["http://f:1"]);
    assert_eq!((s.metrics_addr.0, s.udp_workers()), (None, 3));
    let s = load(&[], Some("iface-regex: '^a,^b'\nip-masq: true\n")).unwrap();
    assert_eq!(s.iface_regex, vec!["^a", "^b"], "the file splits at commas");
    assert!(s.ip_masq);
    let _g = env_lock();
    std::env::set_var("TWEED_IFACE_REGEX", "^e,1");
    let s = Settings::load_from(["tweedd"]);
    std::env::remove_var("TWEED_IFACE_REGEX");
    assert_eq!(
        s.unwrap().iface_regex,
        vec!["^e,1"],
        "a regex may hold a comma"
    );
}

/// Each flag's variable is `TWEED_` and its name: documented once, true for every flag but
/// one, whose variable is flannel's so a flannel node's environment carries over.
#[test]
fn every_flag_has_its_environment_variable() {
    let cmd = Settings::command();
    for a in cmd.get_arguments() {
        let Some(long) = a.get_long() else { continue };
        if matches!(long, "help" | "version") {
            continue;
        }
        let want = match long {
            "wireguard-key-file" => "WIREGUARD_KEY_FILE".to_string(),
            _ => format!("TWEED_{}", long.to_ascii_uppercase().replace('-', "_")),
        };
        assert_eq!(
            a.get_env().and_then(|e| e.to_str()),
            Some(want.as_str()),
            "--{long}"
        );
    }
}

/// docs/operations.md's table lists exactly the flags, with their variables, file keys and
/// defaults.
#[test]
fn the_operations_guide_table_matches_the_flags() {
    let doc = include_str!("../../../docs/operations.md");
    let cmd = Settings::command();
    let mut documented = Vec::new();
    for line in doc.lines().filter(|l| l.starts_with("| `--")) {
        let cols: Vec<&str> = line
            .split(" | ")
            .map(|c| c.trim_matches(['|', ' ']))
            .collect();
        let long = cols[0]
            .trim_start_matches("`--")
            .split(['`', ' ', '['])
            .next()
            .unwrap()
            .to_string();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
            .unwrap_or_else(|| panic!("the guide documents --{long}, which tweedd lacks"));
        let env = arg.get_env().unwrap().to_str().unwrap();
        assert_eq!(cols[1], format!("`{env}`"), "--{long}");
        let key = if long == "config" {
            "n/a".to_string()
        } else {
            format!("`{long}`")
        };
        assert_eq!(cols[2], key, "--{long}");
        if let [d] = arg.get_default_values() {
            assert_eq!(cols[3], format!("`{}`", d.to_str().unwrap()), "--{long}");
        }
        documented.push(long);
    }
    for a in cmd.get_arguments() {
        let long = a.get_long().unwrap();
        assert!(
            documented.iter().any(|d| d == long),
            "--{long} is missing from the table in docs/operations.md"
        );
    }
}

#[test]
fn defaults() {
    let s = load(&[], None).unwrap();
    let e = s.etcd();
    assert_eq!(e.endpoints, vec!["http://127.0.0.1:2379"]);
    assert_eq!(e.prefix, "/coreos.com/network");
    assert!(e.username.is_none() && e.password.is_none());
    assert_eq!(s.subnet_file, PathBuf::from("/run/tweed/subnet.env"));
    assert_eq!(s.lease_ttl, Duration::from_secs(24 * 3600));
    assert_eq!(s.subnet_lease_renew_margin, Duration::from_secs(3600));
    assert_eq!(s.state_dir, PathBuf::from("/var/lib/tweed"));
    assert_eq!(s.metrics_addr.0, Some("0.0.0.0:9867".parse().unwrap()));
    assert_eq!(s.api_socket, PathBuf::from("/run/tweed/tweedd.sock"));
    assert!(!s.ip_masq && !s.nftables);
    assert_eq!(s.iptables_resync, Duration::from_secs(5));
    assert!(s.iface.is_empty() && s.public_ip.is_none());
    assert!(s.iface_regex.is_empty() && s.iface_can_reach.is_none());
    assert!(s.iface_choice().unwrap().is_automatic());
    assert!((1..=8).contains(&s.udp_workers()));
    assert_eq!(s.http_limits(), crate::http::HttpLimits::default());
    let tight = load(
        &[
            "--metrics-max-connections",
            "10",
            "--metrics-max-connections-per-ip",
            "2",
            "--metrics-header-timeout",
            "1s",
        ],
        None,
    )
    .unwrap()
    .http_limits();
    assert_eq!(
        (
            tight.max_connections,
            tight.max_per_ip,
            tight.header_timeout
        ),
        (10, 2, Duration::from_secs(1))
    );
}

#[test]
fn flag_forms() {
    // A bare boolean flag means true; the next flag is not taken as its value.
    let s = load(&["--ip-masq", "--nftables"], None).unwrap();
    assert!(s.ip_masq && s.nftables);
    for (v, want) in [("", None), ("OFF", None), (":9100", Some("0.0.0.0:9100"))] {
        let s = load(&["--metrics-addr", v], None).unwrap();
        assert_eq!(s.metrics_addr.0, want.map(|w| w.parse().unwrap()), "{v:?}");
    }
    let s = load(
        &["--iface-regex", "^eth", "--iface-can-reach", "198.18.0.1"],
        None,
    )
    .unwrap();
    let c = s.iface_choice().unwrap();
    assert_eq!((c.regexes.len(), c.can_reach.is_some()), (1, true));
    // An IPv6 --iface-can-reach is read (an IPv6-only network uses it); a network with IPv4
    // chooses by IPv4 and says so rather than ignoring it.
    let s = load(&["--iface-can-reach", "fd00:198:18::254"], None).unwrap();
    let e = s.iface_choice().unwrap_err().to_string();
    assert!(
        e.contains("--iface-can-reach fd00:198:18::254") && e.contains("IPv6-only"),
        "{e}"
    );
    assert_eq!(
        load(&["--udp-workers", "64"], None).unwrap().udp_workers(),
        64
    );
    // Empty entries of a comma list are dropped.
    let s = load(&["--etcd-endpoints", " http://a:1,,http://b:2 "], None).unwrap();
    assert_eq!(s.etcd().endpoints, vec!["http://a:1", "http://b:2"]);
}

#[test]
fn etcd_password_file_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let pws = pw.to_str().unwrap();
    let s = load(
        &["--etcd-username", "tweed", "--etcd-password-file", pws],
        None,
    )
    .unwrap();
    let e = s.etcd();
    assert_eq!(
        (e.username.as_deref(), e.password.as_deref()),
        (Some("tweed"), Some("s3cret"))
    );
    assert!(
        !format!("{s:?}").contains("s3cret") && !format!("{e:?}").contains("s3cret"),
        "Debug must not show the password"
    );
    // From the file, and a flag password overrides the file's password file.
    let f = format!("etcd-username: tweed\netcd-password-file: {pws}\n");
    let s = load(&[], Some(&f)).unwrap();
    assert_eq!(s.etcd().password.as_deref(), Some("s3cret"));
    let s = load(&["--etcd-password", "flagpw"], Some(&f)).unwrap();
    assert_eq!(s.etcd().password.as_deref(), Some("flagpw"));

    let missing = dir.path().join("nope");
    let ms = missing.to_str().unwrap();
    let e = err(&["--etcd-username", "u", "--etcd-password-file", ms], None);
    assert!(
        e.contains("--etcd-password-file") && e.contains("nope"),
        "{e}"
    );
    let e = err(
        &[],
        Some(&format!("etcd-username: u\netcd-password-file: {ms}\n")),
    );
    assert!(
        e.contains("/etc/tweed/f.yaml") && e.contains("etcd-password-file"),
        "{e}"
    );
    std::fs::write(&pw, "\n").unwrap();
    let e = err(&["--etcd-username", "u", "--etcd-password-file", pws], None);
    assert!(e.contains("empty"), "{e}");
    let e = err(
        &[
            "--etcd-username",
            "u",
            "--etcd-password",
            "p",
            "--etcd-password-file",
            pws,
        ],
        None,
    );
    assert!(e.contains("not both"), "{e}");
    let e = err(&["--etcd-username", "u"], None);
    assert!(
        e.contains("etcd-username") && e.contains("--etcd-password"),
        "{e}"
    );
    let e = err(&["--etcd-password", "p"], None);
    assert!(e.contains("needs --etcd-username"), "{e}");
}

#[test]
fn bad_values_name_the_flag() {
    for (args, words) in [
        (&["--lease-ttl", "soon"][..], &["lease-ttl", "soon"][..]),
        (&["--lease-ttl", "0s"], &["lease-ttl"]),
        (&["--lease-ttl", "10"], &["lease-ttl"]),
        (
            &["--etcd-endpoints", "127.0.0.1:2379"],
            &["etcd-endpoints", "http://"],
        ),
        (
            &["--etcd-endpoints", ","],
            &["etcd-endpoints", "no endpoint"],
        ),
        (&["--etcd-certfile", "/c.pem"], &["etcd-keyfile"]),
        (
            &["--metrics-addr", "localhost"],
            &["--metrics-addr", "localhost"],
        ),
        (
            &["--iptables-resync", "often"],
            &["iptables-resync", "often"],
        ),
        (
            &["--metrics-max-connections", "0"],
            &["metrics-max-connections", "1 to 65536"],
        ),
        (
            &["--metrics-header-timeout", "never"],
            &["metrics-header-timeout", "never"],
        ),
        (&["--iptables-resync", "0"], &["iptables-resync"]),
        (&["--iface-regex", "(eth"], &["--iface-regex", "(eth"]),
        (&["--iface-can-reach", "etcd1"], &["--iface-can-reach"]),
        (&["--public-ip", "not-an-ip"], &["--public-ip"]),
        (&["--ip-masq=perhaps"], &["--ip-masq"]),
        (&["--nftables=2"], &["--nftables"]),
        (&["--udp-workers", "0"], &["--udp-workers", "1 to 64"]),
        (&["--udp-workers", "65"], &["--udp-workers"]),
    ] {
        let e = err(args, None);
        for w in words {
            assert!(e.contains(w), "{args:?}: {w:?} not in {e}");
        }
    }
    // A value from the environment is checked like a flag's.
    let e = {
        let _g = env_lock();
        std::env::set_var("TWEED_UDP_WORKERS", "many");
        let r = Settings::load_from(["tweedd"]);
        std::env::remove_var("TWEED_UDP_WORKERS");
        r.unwrap_err().to_string()
    };
    assert!(e.contains("--udp-workers") && e.contains("many"), "{e}");
}

#[test]
fn bad_file_values_name_the_file_and_key() {
    for (key, value) in [
        ("lease-ttl", "soon"),
        ("metrics-addr", "nope:1"),
        ("iface-regex", "'['"),
        ("iface-can-reach", "etcd1"),
        ("public-ip", "nope"),
        ("ip-masq", "maybe"),
        ("udp-workers", "0"),
        ("etcd-endpoints", "127.0.0.1:2379"),
    ] {
        let text = format!("{key}: {value}\n");
        let e = err(&[], Some(&text));
        assert!(
            e.contains("/etc/tweed/f.yaml")
                && e.contains(key)
                && e.contains(value.trim_matches('\'')),
            "{text:?}: {e}"
        );
    }
    // A file value a flag overrides is never used, so never an error.
    let s = load(&["--lease-ttl", "1h"], Some("lease-ttl: soon\n")).unwrap();
    assert_eq!(s.lease_ttl, Duration::from_secs(3600));
}

#[test]
fn bad_file_keys_name_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tweedd.yaml");
    for (text, want) in [
        ("etcd-endpoint: x\n", "etcd-endpoint"),
        ("config: /other.yaml\n", "config"),
        ("lease-ttl: [1h, 2h]\n", "lease-ttl"),
    ] {
        std::fs::write(&path, text).unwrap();
        let _g = env_lock();
        let e = Settings::load_from(["tweedd".as_ref(), "--config".as_ref(), path.as_os_str()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(path.to_str().unwrap()) && e.contains(want),
            "{text:?}: {e}"
        );
    }
    let e = err(&["--config", "/nonexistent/tweedd.yaml"], None);
    assert!(e.contains("/nonexistent/tweedd.yaml"), "{e}");
    assert!(Path::new(&path).exists());
}

#[test]
fn credentials_over_plain_http_are_warned_about_and_nothing_else() {
    let creds = ["--etcd-username", "tweed", "--etcd-password", "pw"];
    let plain = load(
        &[
            &creds[..],
            &[
                "--etcd-endpoints",
                "https://10.0.0.1:2379,http://10.0.0.2:2379",
            ],
        ]
        .concat(),
        None,
    )
    .unwrap();
    let w = plain.security_warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("http://10.0.0.2:2379")
            && !w[0].contains("https://10.0.0.1")
            && w[0].contains("\"tweed\"")
            && !w[0].contains("pw "),
        "{w:?}"
    );
    let tls = load(
        &[&creds[..], &["--etcd-endpoints", "https://10.0.0.1:2379"]].concat(),
        None,
    )
    .unwrap();
    assert!(tls.security_warnings().is_empty());
    // No credentials: nothing secret travels.
    assert!(load(&[], None).unwrap().security_warnings().is_empty());
}

#[test]
fn public_ipv6_takes_only_an_address_peers_can_reach() {
    let s = load(&["--public-ipv6", "2001:db8::7"], None).unwrap();
    assert_eq!(s.public_ipv6, Some("2001:db8::7".parse().unwrap()));
    let s = load(&[], Some("public-ipv6: fd00::7\n")).unwrap();
    assert_eq!(s.public_ipv6, Some("fd00::7".parse().unwrap()));
    for bad in [
        "::",
        "::1",
        "fe80::1",
        "ff02::1",
        "::ffff:198.18.0.1",
        "198.18.0.1",
        "2001:db8::1/64",
        "2001:db8::1%eth0",
        "",
        "2001:db8::1\n--iface=x",
    ] {
        let e = err(&["--public-ipv6", bad], None);
        assert!(e.contains("public-ipv6"), "{bad:?}: {e}");
    }
    assert_eq!(load(&[], None).unwrap().public_ipv6, None);
}
