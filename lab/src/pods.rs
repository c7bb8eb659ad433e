//! Pod wiring: a `cni0` bridge in the host namespace and one namespace per pod behind it.
//!
//! This is what a CNI bridge plugin does; it lives in one module so that the lab can switch to the
//! real tweed CNI plugin by replacing only this file's callers.

use ipnetwork::Ipv4Network;
use tweed_config::SubnetEnv;

use crate::cmd::CmdError;
use crate::names::{self, Names};
use crate::netns;

/// One pod to create. Pure data, so the plan is unit-testable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlan {
    pub name: String,
    pub netns: String,
    /// Address with prefix, e.g. 10.244.3.2/24.
    pub ip: Ipv4Network,
    /// The pod's cable end on the host's bridge.
    pub host_veth: String,
}

/// The pods of host `host`, given its subnet.env.
pub fn plan(
    names: &Names,
    host: usize,
    env: &SubnetEnv,
    count: usize,
) -> Result<Vec<PodPlan>, String> {
    (1..=count)
        .map(|p| {
            Ok(PodPlan {
                name: names.pod(p),
                netns: names.pod_ns(host, p),
                ip: names::pod_ip(env.subnet, p)?,
                host_veth: names.pod_veth(p),
            })
        })
        .collect()
}

/// The host's pod bridge: holds TWEED_SUBNET's address, MTU TWEED_MTU.
pub fn wire_bridge(host_ns: &str, env: &SubnetEnv) -> Result<(), CmdError> {
    netns::bridge(
        host_ns,
        names::POD_BRIDGE,
        Some(&env.subnet.to_string()),
        Some(env.mtu),
    )
}

/// One pod: its namespace, a veth into `cni0`, its address and a default route via the bridge.
pub fn wire_pod(host_ns: &str, env: &SubnetEnv, pod: &PodPlan) -> Result<(), CmdError> {
    netns::add(&pod.netns)?;
    netns::veth(
        host_ns,
        &pod.host_veth,
        &pod.netns,
        names::POD_IFACE,
        Some(env.mtu),
    )?;
    netns::ip(
        host_ns,
        &["link", "set", &pod.host_veth, "master", names::POD_BRIDGE],
    )?;
    netns::ip(
        &pod.netns,
        &["addr", "add", &pod.ip.to_string(), "dev", names::POD_IFACE],
    )?;
    netns::ip(
        &pod.netns,
        &[
            "route",
            "add",
            "default",
            "via",
            &env.subnet.ip().to_string(),
            "dev",
            names::POD_IFACE,
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_numbers_pods_after_the_bridge() {
        let names = Names::new("demo").unwrap();
        let env = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.7.1/24".parse().unwrap(),
            mtu: 1450,
            ipmasq: true,
        };
        let p = plan(&names, 2, &env, 2).unwrap();
        assert_eq!(
            p,
            vec![
                PodPlan {
                    name: "p1".into(),
                    netns: "twl-demo-h2-p1".into(),
                    ip: "10.244.7.2/24".parse().unwrap(),
                    host_veth: "veth-p1".into(),
                },
                PodPlan {
                    name: "p2".into(),
                    netns: "twl-demo-h2-p2".into(),
                    ip: "10.244.7.3/24".parse().unwrap(),
                    host_veth: "veth-p2".into(),
                },
            ]
        );
        assert!(plan(&names, 2, &env, 254).is_err());
    }
}
