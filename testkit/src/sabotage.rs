//! What an operator (or another tool) does to a node behind tweed's back, written once for the
//! tests that show the agent repairs it. The names are the agent's (`tweed_agent::rules`); the
//! kit does not depend on the agent, so a rename there fails these tests loudly.

/// The commands that delete the agent's masquerade chain as someone cleaning up iptables by
/// hand would: the jump from POSTROUTING, then the chain's rules, then the chain.
pub const DELETE_MASQUERADE_CHAIN: [&[&str]; 3] = [
    &[
        "iptables",
        "-t",
        "nat",
        "-D",
        "POSTROUTING",
        "-m",
        "comment",
        "--comment",
        "tweed",
        "-j",
        "TWEED-POSTRTG",
    ],
    &["iptables", "-t", "nat", "-F", "TWEED-POSTRTG"],
    &["iptables", "-t", "nat", "-X", "TWEED-POSTRTG"],
];
