//! `ipMasq`: one nat rule per container address, for nodes where the agent does not masquerade.
//! Off by default (tweedd masquerades for the whole node), so the common path never forks.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use ipnetwork::Ipv4Network;

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("ipMasq: running iptables (Debian package `iptables`): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("ipMasq: `iptables {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
}

/// The rule's arguments after `-t nat -A|-D POSTROUTING`: traffic from the container to
/// anywhere outside the overlay leaves with the node's address.
pub fn rule(ip: Ipv4Addr, network: Ipv4Network, comment: &str) -> Vec<String> {
    [
        "-s",
        &format!("{ip}/32"),
        "!",
        "-d",
        &network.to_string(),
        "-m",
        "comment",
        "--comment",
        comment,
        "-j",
        "MASQUERADE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn iptables(action: &str, spec: &[String]) -> Result<bool, MasqError> {
    let mut args = vec![
        "-w".to_string(),
        "-t".into(),
        "nat".into(),
        action.into(),
        "POSTROUTING".into(),
    ];
    args.extend(spec.iter().cloned());
    let out = Command::new("iptables")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(MasqError::Spawn)?;
    if out.status.success() {
        return Ok(true);
    }
    if action == "-C" || action == "-D" {
        // "Bad rule (does a matching rule exist in that chain?)": absent.
        return Ok(false);
    }
    Err(MasqError::Failed {
        args: args.join(" "),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Adds the rule unless it is there.
pub fn add(ip: Ipv4Addr, network: Ipv4Network, comment: &str) -> Result<(), MasqError> {
    let spec = rule(ip, network, comment);
    if !iptables("-C", &spec)? {
        iptables("-A", &spec)?;
    }
    Ok(())
}

/// Removes the rule; absent is fine.
pub fn del(ip: Ipv4Addr, network: Ipv4Network, comment: &str) -> Result<(), MasqError> {
    iptables("-D", &rule(ip, network, comment)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_spells_the_exclusion() {
        let r = rule(
            "10.244.1.2".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
            "tweed/n/c1",
        );
        assert_eq!(
            r.join(" "),
            "-s 10.244.1.2/32 ! -d 10.244.0.0/16 -m comment --comment tweed/n/c1 -j MASQUERADE"
        );
    }
}
