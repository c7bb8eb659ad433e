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

/// Removes every rule of `ip` marked `comment`, whatever overlay network it excludes; none is
/// fine. Found by listing rather than spelled from the node's network: after a dual-stack ->
/// IPv6-only switch subnet.env names no IPv4 network, and after a network change another one,
/// while a pod made before keeps the rule it got then.
pub fn del(ip: Ipv4Addr, comment: &str) -> Result<(), MasqError> {
    let listing = list()?;
    for spec in matching(&listing, ip, comment) {
        iptables("-D", &spec)?;
    }
    Ok(())
}

fn list() -> Result<String, MasqError> {
    let args = ["-w", "-t", "nat", "-S", "POSTROUTING"];
    let out = Command::new("iptables")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(MasqError::Spawn)?;
    if !out.status.success() {
        return Err(MasqError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The rules of an `iptables -S POSTROUTING` listing that [`rule`] made for `ip` and `comment`
/// (any network), as arguments after `-D POSTROUTING`. Pure.
pub fn matching(listing: &str, ip: Ipv4Addr, comment: &str) -> Vec<Vec<String>> {
    let source = format!("{ip}/32");
    listing
        .lines()
        .filter_map(|l| l.strip_prefix("-A POSTROUTING "))
        .map(words)
        .filter(|w| {
            let after = |flag: &str| w.windows(2).find(|p| p[0] == flag).map(|p| p[1].as_str());
            after("-s") == Some(&source)
                && after("--comment") == Some(comment)
                && after("-j") == Some("MASQUERADE")
        })
        .collect()
}

/// A listing line's words; iptables quotes a comment with spaces or quotes in it.
fn words(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => (quoted, any) = (!quoted, true),
            '\\' if quoted => cur.extend(chars.next()),
            c if c.is_whitespace() && !quoted => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            c => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletion_finds_the_rule_whatever_network_it_excludes() {
        let ip = "10.244.1.2".parse().unwrap();
        let listing = "-P POSTROUTING ACCEPT
-A POSTROUTING -s 10.244.1.2/32 ! -d 10.244.0.0/16 -m comment --comment tweed/n/c1/eth0 -j MASQUERADE
-A POSTROUTING -s 10.244.1.2/32 ! -d 10.9.0.0/16 -m comment --comment \"tweed/n/c1/eth0\" -j MASQUERADE
-A POSTROUTING -s 10.244.1.2/32 ! -d 10.244.0.0/16 -m comment --comment tweed/n/c2/eth0 -j MASQUERADE
-A POSTROUTING -s 10.244.1.20/32 ! -d 10.244.0.0/16 -m comment --comment tweed/n/c1/eth0 -j MASQUERADE
-A POSTROUTING -s 10.244.1.2/32 -m comment --comment tweed/n/c1/eth0 -j ACCEPT
";
        let found = matching(listing, ip, "tweed/n/c1/eth0");
        assert_eq!(
            found,
            [
                rule(ip, "10.244.0.0/16".parse().unwrap(), "tweed/n/c1/eth0"),
                rule(ip, "10.9.0.0/16".parse().unwrap(), "tweed/n/c1/eth0"),
            ]
        );
        assert!(matching(listing, ip, "tweed/n/c9/eth0").is_empty());
        assert_eq!(
            words(r#"-A X --comment "a \"b\" c" -j Y"#),
            ["-A", "X", "--comment", "a \"b\" c", "-j", "Y"]
        );
    }

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
