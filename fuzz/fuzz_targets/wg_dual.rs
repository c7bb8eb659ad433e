//! cargo +nightly fuzz run wg_dual: a dual-stack wireguard peer lease (key line, then value) read
//! by a dual-stack node in each flannel `Mode`, then planned together with a fixed well-formed
//! peer. Never a panic, and the plan keeps its promises whatever the lease says: the fixed peer
//! is always served; a device's allowed IPs lie inside its family's network, never overlap one
//! another nor our own subnets; `separate` keeps the families on their own devices with
//! endpoints of their family; every inner source the filter lets through is in the peer's
//! allowed IPs.
//!
//! Seeds worth giving it (fuzz/corpus is not kept in git): a flannel dual-stack lease such as
//! `10.244.3.0-24&fd00:10:244:3::-64` + newline + `{"PublicIP":"10.1.0.3","PublicIPv6":
//! "2001:db8::3","BackendType":"wireguard","BackendData":{"PublicKey":"<base64 of 32 bytes>",
//! "Port":51820},"BackendV6Data":{"PublicKey":"<same>","Port":51821}}` (one line).
#![no_main]

use ipnetwork::IpNetwork;
use libfuzzer_sys::fuzz_target;
use tweed_agent::backend::wireguard::dual::{
    plan_dual, source_allowed, DualLocal, DualPeer, Local6, DEVICE_V6,
};
use tweed_agent::backend::wireguard::plan::Local;
use tweed_agent::backend::wireguard::PrivateKey;
use tweed_config::{Ipv6Config, LeaseAttrs, SubnetKey, WireguardMode};

fn cfg6() -> Ipv6Config {
    Ipv6Config {
        network: "fd00:10:244::/56".parse().unwrap(),
        subnet_len: 64,
        subnet_min: "fd00:10:244:1::".parse().unwrap(),
        subnet_max: "fd00:10:244:ff::".parse().unwrap(),
    }
}

fn local(mode: WireguardMode) -> DualLocal {
    DualLocal {
        mode,
        v4: Local {
            network: "10.244.0.0/16".parse().unwrap(),
            own_subnet: "10.244.1.0/24".parse().unwrap(),
            public_ip: "198.18.0.1".parse().unwrap(),
            public_key: PrivateKey::from_bytes([1; 32]).public(),
            psk: None,
            keepalive: 0,
        },
        v6: Some(Local6 {
            network: "fd00:10:244::/56".parse().unwrap(),
            own_subnet: "fd00:10:244:1::/64".parse().unwrap(),
            public_ipv6: "2001:db8::1".parse().unwrap(),
        }),
        listen_port: 51820,
        listen_port_v6: 51821,
        mtu: 1420,
    }
}

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (key, value) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let Ok(attrs) = LeaseAttrs::parse(value) else {
        return;
    };
    let Some(key) = std::str::from_utf8(key)
        .ok()
        .and_then(|k| k.parse::<SubnetKey>().ok())
    else {
        return;
    };
    let k2 = PrivateKey::from_bytes([2; 32]).public();
    let good_key: SubnetKey = "10.244.2.0-24&fd00:10:244:2::-64".parse().unwrap();
    let good = LeaseAttrs::parse(
        format!(
            r#"{{"PublicIP":"198.18.0.2","PublicIPv6":"2001:db8::2","BackendType":"wireguard","BackendData":{{"PublicKey":"{k2}","Port":51820}},"BackendV6Data":{{"PublicKey":"{k2}","Port":51821}}}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    let cfg = cfg6();
    for mode in [
        WireguardMode::Separate,
        WireguardMode::Auto,
        WireguardMode::Ipv4,
        WireguardMode::Ipv6,
    ] {
        let l = local(mode);
        let mut peers = vec![DualPeer::from_lease(&good_key, &good, Some(&cfg), &l).unwrap()];
        // As the agent does: a lease whose IPv4 half fails validation never reaches a backend.
        let mut interferes = false;
        if attrs.validate(&key, l.v4.network, 24).is_ok() {
            if let Ok(p) = DualPeer::from_lease(&key, &attrs, Some(&cfg), &l) {
                // The same subnet or key as the fixed peer: one of the two wins, by design.
                interferes = p.v4.subnet == peers[0].v4.subnet
                    || p.v4.public_key == k2
                    || p.v6
                        .as_ref()
                        .is_ok_and(|h| h.public_key == k2 || Some(h.subnet) == good_key.ipv6);
                peers.push(p);
            }
        }
        let plan = plan_dual(&l, &peers);
        let served: Vec<_> = plan
            .devices
            .iter()
            .flat_map(|d| d.peers.iter())
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect();
        assert!(
            interferes
                || (served.contains(&"10.244.2.0/24".parse().unwrap())
                    && served.contains(&"fd00:10:244:2::/64".parse().unwrap())),
            "{mode:?}: {plan:?}"
        );
        let own: [IpNetwork; 2] = [
            "10.244.1.0/24".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        ];
        for (i, a) in served.iter().enumerate() {
            let inside = match a {
                IpNetwork::V4(n) => "10.244.0.0/16"
                    .parse::<ipnetwork::Ipv4Network>()
                    .unwrap()
                    .contains(n.network()),
                IpNetwork::V6(n) => cfg.network.contains(n.network()),
            };
            assert!(inside, "{a} outside the network");
            assert!(!own.iter().any(|o| overlaps(o, a)), "{a} overlaps ours");
            assert!(
                !served[i + 1..].iter().any(|b| overlaps(a, b)),
                "{a} served twice"
            );
        }
        for d in &plan.devices {
            for p in &d.peers {
                if mode == WireguardMode::Separate {
                    let v6dev = d.name == DEVICE_V6;
                    assert!(p.allowed_ips.iter().all(|n| n.is_ipv6() == v6dev));
                    assert_eq!(p.endpoint.is_ipv6(), v6dev);
                }
                // The filter: a packet whose source is each allowed network's first address
                // passes; the same with the filter given nothing never does.
                for n in &p.allowed_ips {
                    let pkt = packet(n.network());
                    assert!(source_allowed(&p.allowed_ips, &pkt));
                    assert!(!source_allowed(&[], &pkt));
                }
            }
        }
    }
    // The filter on the raw fuzz bytes: never a panic, and nothing passes an empty list.
    assert!(!source_allowed(&[], value));
});

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    match (a, b) {
        (IpNetwork::V4(a), IpNetwork::V4(b)) => a.overlaps(*b),
        (IpNetwork::V6(a), IpNetwork::V6(b)) => a.overlaps(*b),
        _ => false,
    }
}

fn packet(src: std::net::IpAddr) -> Vec<u8> {
    match src {
        std::net::IpAddr::V4(a) => {
            let mut p = vec![0u8; 20];
            p[0] = 0x45;
            p[12..16].copy_from_slice(&a.octets());
            p
        }
        std::net::IpAddr::V6(a) => {
            let mut p = vec![0u8; 40];
            p[0] = 0x60;
            p[8..24].copy_from_slice(&a.octets());
            p
        }
    }
}
