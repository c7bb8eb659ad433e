//! Parsers the unit tests share, so a test writes addresses as text. Test-only.

use ipnetwork::Ipv4Network;
use std::net::Ipv4Addr;

pub fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}
