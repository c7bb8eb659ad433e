//! What `up` builds ([`LabSpec`]), the network configuration it writes to etcd, and the checks it
//! makes before touching anything ([`preflight`]), including finding the binaries it runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::cmd;
use crate::error::LabError;
use crate::names;
use crate::pods::PodsVia;

/// Where flannel (and tweed) look for the network config.
pub const CONFIG_KEY: &str = "/coreos.com/network/config";

/// The most pods a host's /24 takes besides its bridge address.
const MAX_PODS_PER_HOST: usize = 250;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Vxlan,
    HostGw,
    Udp,
    Wireguard,
}

// The spelling of flannel's `Backend.Type`.
string_enum!(Backend, "backend", {
    Vxlan => "vxlan",
    HostGw => "host-gw",
    Udp => "udp",
    Wireguard => "wireguard",
});

/// The address families of a lab's underlay and overlay (`--ip-family`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpFamily {
    #[default]
    V4,
    /// IPv4 and IPv6 on the underlay and in the overlay (flannel's `EnableIPv6`).
    Dual,
    /// IPv6 only (`EnableIPv4: false`).
    V6,
}

string_enum!(IpFamily, "IP family", {
    V4 => "v4",
    Dual => "dual",
    V6 => "v6",
});

impl IpFamily {
    pub fn has_v6(self) -> bool {
        self != IpFamily::V4
    }
}

/// The network config the lab writes to etcd (`DirectRouting` only when set, vxlan only; the
/// IPv6 keys only for a dual-stack or IPv6-only lab; `EnableIPv4: false` and no IPv4 keys for
/// an IPv6-only one).
pub fn network_config_json(backend: Backend, direct_routing: bool, family: IpFamily) -> String {
    let mut b = serde_json::json!({"Type": backend.as_str()});
    if direct_routing {
        b["DirectRouting"] = true.into();
    }
    if family == IpFamily::V6 {
        return serde_json::json!({
            "EnableIPv4": false,
            "EnableIPv6": true,
            "IPv6Network": names::OVERLAY6_NETWORK,
            "IPv6SubnetLen": names::OVERLAY6_SUBNET_LEN,
            "Backend": b,
        })
        .to_string();
    }
    let mut c = serde_json::json!({
        "Network": names::OVERLAY_NETWORK,
        "SubnetLen": names::OVERLAY_SUBNET_LEN,
        "Backend": b,
    });
    if family.has_v6() {
        if backend == Backend::Wireguard {
            // `auto` carries both families on one device over the IPv4 underlay (a lab may ask
            // for another mode: `LabSpec::wireguard_mode`).
            c["Backend"]["Mode"] = "auto".into();
        }
        c["EnableIPv6"] = true.into();
        c["IPv6Network"] = names::OVERLAY6_NETWORK.into();
        c["IPv6SubnetLen"] = names::OVERLAY6_SUBNET_LEN.into();
    }
    c.to_string()
}

/// What `up` builds.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub name: String,
    pub hosts: usize,
    pub backend: Backend,
    /// vxlan's `DirectRouting`: peers on the same underlay segment get plain routes.
    pub direct_routing: bool,
    /// Underlay segments: 1 (198.18.0.0/24) or 2 (hosts alternate between 198.18.0.0/24 and
    /// 198.18.1.0/24, routed by the underlay namespace).
    pub segments: usize,
    pub pods_per_host: usize,
    /// How pods are attached (default: the tweed CNI plugin).
    pub pods_via: PodsVia,
    /// Default: `tweedd` beside the running executable (or one directory up, for test binaries
    /// in `target/*/deps`), else in `$PATH`.
    pub tweedd: Option<PathBuf>,
    /// The tweed CNI plugin; found like `tweedd` (as `tweed`).
    pub cni_plugin: Option<PathBuf>,
    /// tweedctl, for `PodsVia::Runtime`; found like `tweedd`.
    pub tweedctl: Option<PathBuf>,
    /// etcd members: 1 (on 198.18.0.254) or a real cluster of 2-3 (198.18.0.251-253).
    pub etcd_members: usize,
    /// Pass `--ip-masq` to the agents.
    pub ip_masq: bool,
    /// IPv4 only (default) or dual stack, underlay and overlay alike.
    pub ip_family: IpFamily,
    pub lease_ttl: Duration,
    /// Default: [`crate::state::default_root`].
    pub root: Option<PathBuf>,
    /// How long each agent may take to write its subnet.env.
    pub agent_timeout: Duration,
    /// Appended to every tweedd command line; a flag the lab passes itself (`--api-socket`,
    /// `--ip-masq`, `--metrics-addr`) given here replaces the lab's.
    pub agent_args: Vec<String>,
    /// Set it (e.g. from a SIGINT handler) to make `up` stop between steps and tear down.
    pub cancel: Option<Arc<AtomicBool>>,
    /// wireguard's `Backend.Mode` in a dual-stack lab; `None`: `auto`
    /// ([`network_config_json`]).
    pub wireguard_mode: Option<String>,
}

impl LabSpec {
    pub fn new(name: impl Into<String>, hosts: usize) -> Self {
        LabSpec {
            name: name.into(),
            hosts,
            backend: Backend::Vxlan,
            direct_routing: false,
            segments: 1,
            pods_per_host: 2,
            pods_via: PodsVia::default(),
            tweedd: None,
            cni_plugin: None,
            tweedctl: None,
            etcd_members: 1,
            ip_masq: true,
            ip_family: IpFamily::V4,
            lease_ttl: Duration::from_secs(300),
            root: None,
            agent_timeout: Duration::from_secs(30),
            agent_args: Vec::new(),
            cancel: None,
            wireguard_mode: None,
        }
    }
}

/// The programs `up` runs.
#[derive(Debug)]
pub(crate) struct Tools {
    pub tweedd: PathBuf,
    pub cni_plugin: Option<PathBuf>,
    pub tweedctl: Option<PathBuf>,
}

/// The spec's own contradictions and out-of-range numbers (pure).
fn validate(spec: &LabSpec) -> Result<(), LabError> {
    let range = |flag: &str, value: usize, max: usize| {
        if (1..=max).contains(&value) {
            Ok(())
        } else {
            Err(LabError::Spec(format!(
                "{flag} must be 1 to {max}, not {value}"
            )))
        }
    };
    range("--hosts", spec.hosts, names::MAX_HOSTS)?;
    if spec.pods_per_host > MAX_PODS_PER_HOST {
        return Err(LabError::Spec(format!(
            "--pods-per-host {} does not fit a /{} node subnet",
            spec.pods_per_host,
            names::OVERLAY_SUBNET_LEN
        )));
    }
    if spec.direct_routing && spec.backend != Backend::Vxlan {
        return Err(LabError::Spec(format!(
            "--direct-routing is a vxlan option; backend {} has none",
            spec.backend
        )));
    }
    range("--segments", spec.segments, names::MAX_SEGMENTS)?;
    range("--etcd-members", spec.etcd_members, names::MAX_ETCD_MEMBERS)?;
    match spec.ip_family {
        IpFamily::V4 => Ok(()),
        // Refused rather than half-built: what the agent or the lab cannot run IPv6 only.
        IpFamily::V6 => {
            if spec.backend == Backend::Udp {
                return Err(LabError::Spec(format!(
                    "--ip-family v6: backend {} cannot run an IPv6-only network; use vxlan, \
                     host-gw or wireguard",
                    spec.backend
                )));
            }
            if spec.segments != 1 || spec.etcd_members != 1 {
                return Err(LabError::Spec(
                    "--ip-family v6 builds one segment and one etcd member \
                     (--segments 1 --etcd-members 1)"
                        .into(),
                ));
            }
            Ok(())
        }
        IpFamily::Dual => Ok(()),
    }
}

/// Checks what `up` needs before it touches anything; returns the programs to run.
pub(crate) fn preflight(spec: &LabSpec) -> Result<Tools, LabError> {
    validate(spec)?;
    // SAFETY: geteuid cannot fail and has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LabError::NotRoot);
    }
    let mut needed = vec![
        ("ip", "iproute2"),
        ("sysctl", "procps"),
        ("etcd", "etcd-server"),
        ("etcdctl", "etcd-client"),
    ];
    if spec.pods_via == PodsVia::Runtime {
        needed.push(("busybox", "busybox-static"));
    }
    for (program, package) in needed {
        cmd::find_program(program).ok_or(LabError::MissingProgram { program, package })?;
    }
    Ok(Tools {
        tweedd: find_binary(Binary::Tweedd, spec.tweedd.as_deref())?,
        cni_plugin: spec
            .pods_via
            .uses_plugin()
            .then(|| find_binary(Binary::CniPlugin, spec.cni_plugin.as_deref()))
            .transpose()?,
        tweedctl: (spec.pods_via == PodsVia::Runtime)
            .then(|| find_binary(Binary::Tweedctl, spec.tweedctl.as_deref()))
            .transpose()?,
    })
}

/// The workspace's binaries the lab runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Binary {
    Tweedd,
    CniPlugin,
    Tweedctl,
}

impl Binary {
    /// (file name, cargo package, `tweed-lab up` flag)
    fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Binary::Tweedd => ("tweedd", "tweed-agent", "--tweedd"),
            Binary::CniPlugin => ("tweed", "tweed-cni", "--cni-plugin"),
            Binary::Tweedctl => ("tweedctl", "tweed-runtime", "--tweedctl"),
        }
    }
}

/// `explicit`, else the binary beside the running executable (or one directory up, for test
/// binaries in `target/*/deps`), else in `$PATH`.
pub(crate) fn find_binary(which: Binary, explicit: Option<&Path>) -> Result<PathBuf, LabError> {
    let (name, package, flag) = which.names();
    if let Some(p) = explicit {
        return fs::canonicalize(p)
            .map_err(|e| LabError::Spec(format!("{name} {}: {e}", p.display())));
    }
    let exe_dirs = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .map(|d| vec![d.clone(), d.join("..")])
        .unwrap_or_default();
    exe_dirs
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .or_else(|| cmd::find_program(name))
        .and_then(|p| fs::canonicalize(p).ok())
        .ok_or_else(|| {
            LabError::Spec(format!(
                "{name} not found beside tweed-lab nor in PATH: build it \
                 (cargo build -p {package}) or pass {flag} PATH"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_is_flannels() {
        assert_eq!(
            network_config_json(Backend::Vxlan, false, IpFamily::V4),
            r#"{"Backend":{"Type":"vxlan"},"Network":"10.244.0.0/16","SubnetLen":24}"#
        );
        assert_eq!(
            network_config_json(Backend::HostGw, false, IpFamily::Dual),
            r#"{"Backend":{"Type":"host-gw"},"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","IPv6SubnetLen":64,"Network":"10.244.0.0/16","SubnetLen":24}"#
        );
        // wireguard dual stack: one device for both families (Mode auto), IPv4-only unchanged.
        let wg = network_config_json(Backend::Wireguard, false, IpFamily::Dual);
        let parsed = tweed_config::NetworkConfig::parse(&wg).unwrap();
        assert!(parsed.ipv6.is_some());
        let tweed_config::BackendConfig::Wireguard(w) = parsed.backend else {
            panic!("{wg}")
        };
        assert_eq!(w.mode, tweed_config::WireguardMode::Auto);
        assert!(!network_config_json(Backend::Wireguard, false, IpFamily::V4).contains("Mode"));
        // What the lab writes is what the agent reads, dual-stack half included.
        let dual = network_config_json(Backend::Vxlan, false, IpFamily::Dual);
        let parsed = tweed_config::NetworkConfig::parse(&dual).unwrap();
        let v6 = parsed.ipv6.expect("IPv6 enabled");
        assert_eq!(v6.network.to_string(), names::OVERLAY6_NETWORK);
        let v: serde_json::Value =
            serde_json::from_str(&network_config_json(Backend::HostGw, false, IpFamily::V4))
                .unwrap();
        assert_eq!(v["Backend"]["Type"], "host-gw");
        let v: serde_json::Value =
            serde_json::from_str(&network_config_json(Backend::Udp, false, IpFamily::V4)).unwrap();
        assert_eq!(v["Backend"]["Type"], "udp");
        let v: serde_json::Value =
            serde_json::from_str(&network_config_json(Backend::Vxlan, true, IpFamily::V4)).unwrap();
        assert_eq!(v["Backend"]["DirectRouting"], true);
    }

    #[test]
    fn backends_parse() {
        for b in [
            Backend::Vxlan,
            Backend::HostGw,
            Backend::Udp,
            Backend::Wireguard,
        ] {
            assert_eq!(b.as_str().parse::<Backend>().unwrap(), b);
            assert_eq!(serde_json::to_value(b).unwrap(), b.as_str());
        }
        assert_eq!("host-gw".parse::<Backend>().unwrap(), Backend::HostGw);
        assert_eq!(
            "ipip".parse::<Backend>().unwrap_err(),
            r#"unknown backend "ipip": expected vxlan, host-gw, udp or wireguard"#
        );
    }

    #[test]
    fn impossible_specs_are_rejected_before_anything_is_made() {
        let err = |f: &dyn Fn(&mut LabSpec)| {
            let mut spec = LabSpec::new("x", 2);
            f(&mut spec);
            validate(&spec).unwrap_err().to_string()
        };
        validate(&LabSpec::new("x", 2)).unwrap();
        let e = err(&|s| {
            s.backend = Backend::HostGw;
            s.direct_routing = true;
        });
        assert!(
            e.contains("--direct-routing") && e.contains("host-gw"),
            "{e}"
        );
        assert_eq!(err(&|s| s.hosts = 0), "--hosts must be 1 to 249, not 0");
        assert!(err(&|s| s.hosts = 250).contains("--hosts"));
        assert!(err(&|s| s.segments = 3).contains("--segments"));
        assert!(err(&|s| s.segments = 0).contains("--segments"));
        assert!(err(&|s| s.etcd_members = 4).contains("--etcd-members"));
        assert!(err(&|s| s.pods_per_host = 251).contains("--pods-per-host"));
        // IPv6 only: vxlan, host-gw and wireguard, one segment, one etcd member; pods any way, or none.
        let v6 = |f: &dyn Fn(&mut LabSpec)| {
            err(&|s| {
                s.ip_family = IpFamily::V6;
                f(s)
            })
        };
        assert!(v6(&|s| s.backend = Backend::Udp).contains("backend udp"));
        assert!(v6(&|s| s.segments = 2).contains("--segments 1"));
        assert!(v6(&|s| s.etcd_members = 3).contains("--etcd-members 1"));
        for (b, via, pods) in [
            (Backend::Vxlan, PodsVia::Cni, 2),
            (Backend::HostGw, PodsVia::Direct, 2),
            (Backend::Vxlan, PodsVia::Runtime, 2),
            (Backend::HostGw, PodsVia::Cni, 0),
            (Backend::Wireguard, PodsVia::Cni, 2),
        ] {
            let mut spec = LabSpec::new("x", 3);
            (spec.ip_family, spec.backend) = (IpFamily::V6, b);
            (spec.pods_via, spec.pods_per_host) = (via, pods);
            validate(&spec).unwrap();
        }
        let c: serde_json::Value =
            serde_json::from_str(&network_config_json(Backend::HostGw, false, IpFamily::V6))
                .unwrap();
        assert_eq!(c["EnableIPv4"], false);
        assert!(c.get("Network").is_none(), "{c}");
        let tweed_config::ParsedNetwork::Ipv6Only(n) =
            tweed_config::NetworkConfig::parse_any(&c.to_string()).unwrap()
        else {
            panic!("{c}: not IPv6-only")
        };
        assert_eq!(n.ipv6.network.to_string(), names::OVERLAY6_NETWORK);
        for b in [
            Backend::Vxlan,
            Backend::HostGw,
            Backend::Udp,
            Backend::Wireguard,
        ] {
            let mut spec = LabSpec::new("x", 2);
            (spec.ip_family, spec.backend) = (IpFamily::Dual, b);
            validate(&spec).unwrap();
        }
        assert_eq!("dual".parse::<IpFamily>().unwrap(), IpFamily::Dual);
        assert!("v5"
            .parse::<IpFamily>()
            .unwrap_err()
            .contains("v4, dual or v6"));
    }

    #[test]
    fn a_missing_explicit_binary_names_itself() {
        let e = find_binary(Binary::Tweedd, Some(Path::new("/nonexistent/tweedd")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tweedd /nonexistent/tweedd"), "{e}");
    }
}
