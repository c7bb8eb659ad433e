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
    del_with(ip, comment, list, |spec| iptables("-D", spec))
}

/// [`del`] over its two iptables calls. `iptables -D` exits non-zero both for a rule that is
/// not there (gone meanwhile: fine) and for a delete that failed; a listing tells the two
/// apart, so a rule that stays fails DEL/GC and its address record is kept for the retry.
fn del_with(
    ip: Ipv4Addr,
    comment: &str,
    mut list: impl FnMut() -> Result<String, MasqError>,
    mut delete: impl FnMut(&[String]) -> Result<bool, MasqError>,
) -> Result<(), MasqError> {
    let mut missed = false;
    for spec in matching(&list()?, ip, comment) {
        missed |= !delete(&spec)?;
    }
    if missed {
        if let Some(left) = matching(&list()?, ip, comment).into_iter().next() {
            return Err(MasqError::Failed {
                args: format!("-w -t nat -D POSTROUTING {}", left.join(" ")),
                stderr: "the rule is still there after the delete".into(),
            });
        }
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

    /// A delete iptables refuses is an error while the rule stays, and none when the rule went
    /// meanwhile (another DEL or GC took it).
    #[test]
    fn a_delete_that_left_the_rule_fails() {
        let ip: Ipv4Addr = "10.244.1.2".parse().unwrap();
        let line = format!(
            "-A POSTROUTING {}",
            rule(ip, "10.244.0.0/16".parse().unwrap(), "tweed-c1-eth0").join(" ")
        );
        let stays = || Ok(line.clone());
        let err = del_with(ip, "tweed-c1-eth0", stays, |_| Ok(false)).unwrap_err();
        assert!(err.to_string().contains("still there"), "{err}");
        let mut listings = vec![String::new(), line.clone()];
        let gone = || Ok(listings.pop().unwrap());
        del_with(ip, "tweed-c1-eth0", gone, |_| Ok(false)).unwrap();
        let mut deleted = 0;
        del_with(ip, "tweed-c1-eth0", stays, |_| {
            deleted += 1;
            Ok(true)
        })
        .unwrap();
        assert_eq!(deleted, 1);
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
