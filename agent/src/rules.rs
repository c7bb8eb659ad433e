//! Masquerade and forward rules, as plain data rendered for `iptables-restore`.
//!
//! The chain structure follows flannel's: a nat chain jumped to from POSTROUTING that returns early
//! for traffic staying inside the overlay and masquerades what leaves it, and a filter chain
//! jumped to from FORWARD that accepts the overlay's traffic on hosts whose FORWARD policy is DROP.
//! Only tweed's own chains are ever flushed; the jumps into them are checked and inserted one by
//! one, so other software's rules are left alone.

use ipnetwork::Ipv4Network;
use std::process::{Command, Stdio};

pub const NAT_CHAIN: &str = "TWEED-POSTRTG";
pub const FWD_CHAIN: &str = "TWEED-FWD";
const COMMENT: &str = "tweed";

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{program} {args}: {reason}")]
    Command {
        program: &'static str,
        args: String,
        reason: String,
    },
}

/// One of tweed's chains: where it hangs (table + built-in chain) and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub table: &'static str,
    pub builtin: &'static str,
    pub name: &'static str,
    /// Rule specs as `iptables -S` prints them after `-A <name>`.
    pub rules: Vec<String>,
}

impl Chain {
    /// The jump from the built-in chain, in `-S` form minus the `-A <builtin>`.
    pub fn jump(&self) -> String {
        format!("-m comment --comment {COMMENT} -j {}", self.name)
    }
}

/// nat rules: pod-to-pod keeps pod addresses, traffic from the overlay to anywhere else leaves
/// with the host's address, and traffic from outside into another node's pods is masqueraded so
/// replies come back through this host.
pub fn masquerade_chain(network: Ipv4Network, subnet: Ipv4Network) -> Chain {
    // Unquoted: `iptables -S` prints a one-word comment without quotes, and listings are
    // compared with what we render.
    let c = format!("-m comment --comment {COMMENT}");
    Chain {
        table: "nat",
        builtin: "POSTROUTING",
        name: NAT_CHAIN,
        rules: vec![
            // Already masqueraded by kube-proxy: leave it to kube-proxy.
            format!("-m mark --mark 0x4000/0x4000 {c} -j RETURN"),
            format!("-s {network} -d {network} {c} -j RETURN"),
            format!("! -s {network} -d {subnet} {c} -j RETURN"),
            format!("-s {network} ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully"),
            format!("! -s {network} -d {network} {c} -j MASQUERADE --random-fully"),
        ],
    }
}

pub fn forward_chain(network: Ipv4Network) -> Chain {
    // Unquoted: `iptables -S` prints a one-word comment without quotes, and listings are
    // compared with what we render.
    let c = format!("-m comment --comment {COMMENT}");
    Chain {
        table: "filter",
        builtin: "FORWARD",
        name: FWD_CHAIN,
        rules: vec![
            format!("-s {network} {c} -j ACCEPT"),
            format!("-d {network} {c} -j ACCEPT"),
        ],
    }
}

/// `iptables-restore --noflush` input that replaces the contents of `chains` and nothing else.
pub fn render_restore(chains: &[Chain]) -> String {
    let mut out = String::new();
    for table in ["nat", "filter"] {
        let mine: Vec<&Chain> = chains.iter().filter(|c| c.table == table).collect();
        if mine.is_empty() {
            continue;
        }
        out.push_str(&format!("*{table}\n"));
        for c in &mine {
            out.push_str(&format!(":{} - [0:0]\n", c.name));
        }
        for c in &mine {
            out.push_str(&format!("-F {}\n", c.name));
            for r in &c.rules {
                out.push_str(&format!("-A {} {}\n", c.name, r));
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// What `iptables -t T -S` printed, reduced to the rule specs of one chain.
pub fn chain_rules_from_listing(listing: &str, chain: &str) -> Option<Vec<String>> {
    let prefix = format!("-A {chain} ");
    let mut exists = false;
    let mut rules = Vec::new();
    for line in listing.lines() {
        if line == format!("-N {chain}") {
            exists = true;
        } else if let Some(r) = line.strip_prefix(&prefix) {
            rules.push(r.to_string());
        }
    }
    exists.then_some(rules)
}

/// Whether the built-in chain's listing holds the jump into `chain`.
pub fn has_jump(listing: &str, c: &Chain) -> bool {
    let want = format!("-A {} {}", c.builtin, c.jump());
    listing.lines().any(|l| l == want)
}

/// What a sync has to do, decided from listings (pure, so it is unit-tested).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncPlan {
    pub restore: Option<String>,
    pub insert_jumps: Vec<Chain>,
}

pub fn plan_sync(chains: &[Chain], listings: &dyn Fn(&str) -> String) -> SyncPlan {
    let mut stale = Vec::new();
    let mut jumps = Vec::new();
    for c in chains {
        let listing = listings(c.table);
        if chain_rules_from_listing(&listing, c.name).as_ref() != Some(&c.rules) {
            stale.push(c.clone());
        }
        if !has_jump(&listing, c) {
            jumps.push(c.clone());
        }
    }
    SyncPlan {
        restore: (!stale.is_empty()).then(|| render_restore(&stale)),
        insert_jumps: jumps,
    }
}

/// Runs the iptables binaries (the only way to reach both iptables-legacy and iptables-nft hosts).
pub struct Iptables;

impl Iptables {
    fn run(
        program: &'static str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, RulesError> {
        let err = |reason: String| RulesError::Command {
            program,
            args: args.join(" "),
            reason,
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| err(format!("{e} (is the iptables package installed?)")))?;
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(input.as_bytes())
                .map_err(|e| err(e.to_string()))?;
        }
        let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
        if !out.status.success() {
            return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn listing(table: &str) -> Result<String, RulesError> {
        Self::run("iptables", &["-w", "5", "-t", table, "-S"], None)
    }

    /// Brings `chains` to the desired state; returns whether anything had to change.
    pub fn sync(chains: &[Chain]) -> Result<bool, RulesError> {
        let mut listings = std::collections::HashMap::new();
        for c in chains {
            if !listings.contains_key(c.table) {
                listings.insert(c.table, Self::listing(c.table)?);
            }
        }
        let plan = plan_sync(chains, &|t| listings.get(t).cloned().unwrap_or_default());
        if let Some(input) = &plan.restore {
            Self::run("iptables-restore", &["-w", "5", "--noflush"], Some(input))?;
        }
        for c in &plan.insert_jumps {
            let mut args = vec!["-w", "5", "-t", c.table, "-I", c.builtin, "1"];
            args.extend(["-m", "comment", "--comment", COMMENT, "-j", c.name]);
            Self::run("iptables", &args, None)?;
        }
        Ok(plan.restore.is_some() || !plan.insert_jumps.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Ipv4Network {
        "10.244.0.0/16".parse().unwrap()
    }

    fn sub() -> Ipv4Network {
        "10.244.3.0/24".parse().unwrap()
    }

    #[test]
    fn restore_text_replaces_only_our_chains() {
        let text = render_restore(&[masquerade_chain(net(), sub()), forward_chain(net())]);
        assert!(
            text.starts_with("*nat\n:TWEED-POSTRTG - [0:0]\n-F TWEED-POSTRTG\n"),
            "{text}"
        );
        assert!(text.contains("-A TWEED-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment tweed -j RETURN\n"));
        assert!(text.contains("-A TWEED-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment tweed -j MASQUERADE --random-fully\n"));
        assert!(text
            .contains("*filter\n:TWEED-FWD - [0:0]\n-F TWEED-FWD\n-A TWEED-FWD -s 10.244.0.0/16"));
        assert_eq!(text.matches("COMMIT").count(), 2);
        assert!(!text.contains("-F POSTROUTING") && !text.contains("-F FORWARD"));
    }

    #[test]
    fn plan_is_empty_when_listing_matches_and_repairs_what_is_missing() {
        let chains = [masquerade_chain(net(), sub()), forward_chain(net())];
        let listing_for = |t: &str| -> String {
            let c = chains.iter().find(|c| c.table == t).unwrap();
            let mut s = format!("-P {} ACCEPT\n-N {}\n", c.builtin, c.name);
            s.push_str(&format!("-A {} {}\n", c.builtin, c.jump()));
            for r in &c.rules {
                s.push_str(&format!("-A {} {r}\n", c.name));
            }
            s
        };
        assert_eq!(plan_sync(&chains, &listing_for), SyncPlan::default());
        // Chain deleted by hand: restore it and re-add the jump.
        let p = plan_sync(&chains, &|t| {
            if t == "nat" {
                "-P POSTROUTING ACCEPT\n".into()
            } else {
                listing_for(t)
            }
        });
        assert!(
            p.restore.as_ref().unwrap().contains("*nat")
                && !p.restore.as_ref().unwrap().contains("*filter")
        );
        assert_eq!(p.insert_jumps.len(), 1);
        assert_eq!(p.insert_jumps[0].name, NAT_CHAIN);
        // Subnet changed: old rule set differs, the chain is rewritten.
        let other = [
            masquerade_chain(net(), "10.244.9.0/24".parse().unwrap()),
            forward_chain(net()),
        ];
        let p = plan_sync(&other, &listing_for);
        assert!(p.restore.unwrap().contains("-d 10.244.9.0/24"));
        assert!(p.insert_jumps.is_empty());
    }

    #[test]
    fn listing_parse() {
        let l = "-N TWEED-FWD\n-A TWEED-FWD -s 10.0.0.0/8 -j ACCEPT\n-A OTHER -j DROP\n";
        assert_eq!(
            chain_rules_from_listing(l, "TWEED-FWD"),
            Some(vec!["-s 10.0.0.0/8 -j ACCEPT".to_string()])
        );
        assert_eq!(chain_rules_from_listing(l, "TWEED-POSTRTG"), None);
        assert_eq!(chain_rules_from_listing("-N X\n", "X"), Some(vec![]));
    }
}
