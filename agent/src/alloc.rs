//! Choosing this node's subnet. Pure: the caller lists leases, this decides, the caller writes.

use ipnetwork::{Ipv4Network, Ipv6Network};
use rand::distr::uniform::SampleUniform;
use rand::Rng;
use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::{Add, Rem};
use tweed_config::{Ipv6Config, NetworkConfig};

use crate::watch::Lease;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error(
        "out of subnets: all {count} /{subnet_len} subnets of {network} between {min} and {max} are leased"
    )]
    OutOfSubnets {
        network: Ipv4Network,
        subnet_len: u8,
        count: u32,
        min: Ipv4Addr,
        max: Ipv4Addr,
    },
    #[error(
        "no free IPv6 subnet: the /{subnet_len} subnets of {network} between {min} and {max} are leased or covered by other keys"
    )]
    OutOfIpv6Subnets {
        network: Ipv6Network,
        subnet_len: u8,
        min: Ipv6Addr,
        max: Ipv6Addr,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A lease for our public IP already exists: keep it (restart, or a lease that outlived us).
    Reuse(Lease),
    /// Try to create a lease for this subnet.
    Take(Ipv4Network),
}

fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Decides in design order: our own existing lease; else the subnet we had before (from the old
/// subnet.env) if still free; else a random free one. `occupied` are the subnets of every key under
/// `subnets/`, including keys whose values are unreadable: such a key still blocks creation.
/// `exclude` holds subnets that just lost a creation race.
pub fn choose(
    cfg: &NetworkConfig,
    own_leases: &[Lease],
    occupied: &[Ipv4Network],
    public_ip: Ipv4Addr,
    previous: Option<Ipv4Network>,
    exclude: &HashSet<Ipv4Network>,
    rng: &mut impl Rng,
) -> Result<Decision, AllocError> {
    if let Some(l) = own_leases
        .iter()
        .filter(|l| l.attrs.public_ip == public_ip && cfg.is_allocatable(l.key.ipv4))
        .min_by_key(|l| l.key.ipv4)
    {
        return Ok(Decision::Reuse(l.clone()));
    }
    let is_free =
        |s: Ipv4Network| !exclude.contains(&s) && !occupied.iter().any(|o| overlaps(*o, s));
    if let Some(p) = previous.filter(|p| cfg.is_allocatable(*p) && is_free(*p)) {
        return Ok(Decision::Take(p));
    }
    let count = cfg.subnet_count();
    if let Some(s) = probe_then_scan(count, count, |i| cfg.nth_subnet(i), is_free, rng) {
        return Ok(Decision::Take(s));
    }
    Err(AllocError::OutOfSubnets {
        network: cfg.network,
        subnet_len: cfg.subnet_len,
        count,
        min: cfg.subnet_min,
        max: cfg.subnet_max,
    })
}

/// The free subnet among indices `0..count` that `nth` names: 32 random probes, then `steps`
/// indices from a random start. Random probes find a free subnet fast in a sparse network; the
/// scan from a random start makes a nearly full one still terminate, and still spreads nodes that
/// race for the last few subnets.
fn probe_then_scan<I, N>(
    count: I,
    steps: I,
    nth: impl Fn(I) -> Option<N>,
    is_free: impl Fn(N) -> bool,
    rng: &mut impl Rng,
) -> Option<N>
where
    I: SampleUniform + Copy + PartialOrd + Add<Output = I> + Rem<Output = I> + From<u8>,
    N: Copy,
{
    for _ in 0..32 {
        let s = nth(rng.random_range(I::from(0)..count)).expect("index in range");
        if is_free(s) {
            return Some(s);
        }
    }
    let start = rng.random_range(I::from(0)..count);
    let mut i = I::from(0);
    while i < steps {
        let s = nth((start + i) % count).expect("index in range");
        if is_free(s) {
            return Some(s);
        }
        i = i + I::from(1);
    }
    None
}

fn overlaps_v6(a: Ipv6Network, b: Ipv6Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// The IPv6 half of a dual-stack lease, chosen by the same rules as [`choose`]: the previous
/// subnet (from the old subnet.env) if still free, else a random free one in
/// [IPv6SubnetMin, IPv6SubnetMax]. `occupied` holds the v6 part of every key under `subnets/`.
///
/// The range can hold 2^116 subnets, so it is never walked subnet by subnet: after random probes
/// (which spread nodes), the first free subnet at or after a random index is found from the
/// occupied keys alone, as gaps between their index ranges. That is exact: the error comes only
/// when no subnet is free, however wide the foreign keys.
pub fn choose_v6(
    cfg: &Ipv6Config,
    occupied: &[Ipv6Network],
    previous: Option<Ipv6Network>,
    exclude: &HashSet<Ipv6Network>,
    rng: &mut impl Rng,
) -> Result<Ipv6Network, AllocError> {
    let is_free =
        |s: Ipv6Network| !exclude.contains(&s) && !occupied.iter().any(|o| overlaps_v6(*o, s));
    if let Some(p) = previous.filter(|p| cfg.is_allocatable(*p) && is_free(*p)) {
        return Ok(p);
    }
    let count = cfg.subnet_count();
    // The random probes only: the scan is replaced by the gap search below.
    if let Some(s) = probe_then_scan(count, 0, |i| cfg.nth_subnet(i), is_free, rng) {
        return Ok(s);
    }
    let blocked = blocked_indices(cfg, occupied.iter().chain(exclude));
    let start = rng.random_range(0..count);
    first_free(&blocked, start, count)
        .or_else(|| first_free(&blocked, 0, count))
        .map(|i| cfg.nth_subnet(i).expect("index in range"))
        .ok_or(AllocError::OutOfIpv6Subnets {
            network: cfg.network,
            subnet_len: cfg.subnet_len,
            min: cfg.subnet_min,
            max: cfg.subnet_max,
        })
}

/// The allocatable indices (as in [`Ipv6Config::nth_subnet`]) each key overlaps, as inclusive
/// ranges sorted by start. Keys of any length and alignment count: a foreign /40 blocks every
/// node subnet inside it, a foreign /120 the one node subnet around it.
fn blocked_indices<'a>(
    cfg: &Ipv6Config,
    keys: impl Iterator<Item = &'a Ipv6Network>,
) -> Vec<(u128, u128)> {
    let size = cfg.subnet_size();
    let min = u128::from(cfg.subnet_min);
    let last = cfg.subnet_count() - 1;
    let mut out: Vec<(u128, u128)> = keys
        .filter_map(|k| {
            let lo = u128::from(k.network());
            // A /0 spans 2^128 addresses: its last one is u128::MAX, computed without overflow.
            let hi = lo | (u128::MAX.checked_shr(u32::from(k.prefix())).unwrap_or(0));
            if hi < min {
                return None;
            }
            let first = lo.saturating_sub(min) / size;
            (first <= last).then(|| (first, ((hi - min) / size).min(last)))
        })
        .collect();
    out.sort_unstable();
    out
}

/// The lowest index in [from, count) that no range covers.
fn first_free(blocked: &[(u128, u128)], from: u128, count: u128) -> Option<u128> {
    let mut candidate = from;
    for &(lo, hi) in blocked {
        if lo > candidate {
            break;
        }
        if hi >= candidate {
            candidate = hi.checked_add(1)?;
        }
    }
    (candidate < count).then_some(candidate)
}

#[cfg(test)]
mod v6_tests {
    use super::*;
    use rand::SeedableRng;

    fn v6(extra: &str) -> Ipv6Config {
        NetworkConfig::parse(&format!(
            r#"{{"Network":"10.244.0.0/16","EnableIPv6":true{extra}}}"#
        ))
        .unwrap()
        .ipv6
        .unwrap()
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(11)
    }

    fn n(s: &str) -> Ipv6Network {
        s.parse().unwrap()
    }

    #[test]
    fn previous_when_free_else_random_in_range() {
        let c = v6(r#","IPv6Network":"fd00:10:244::/56""#);
        let prev = n("fd00:10:244:12::/64");
        assert_eq!(
            choose_v6(&c, &[], Some(prev), &HashSet::new(), &mut rng()).unwrap(),
            prev
        );
        for seed in 0..50 {
            let s = choose_v6(
                &c,
                &[prev],
                Some(prev),
                &HashSet::new(),
                &mut rand::rngs::StdRng::seed_from_u64(seed),
            )
            .unwrap();
            assert_ne!(s, prev);
            assert!(c.is_allocatable(s), "{s}");
        }
        // Previous subnet of another length or outside the range: ignored.
        for p in [
            "fd00:10:244:12::/80",
            "fd00:10:244::/64",
            "fd00:10:245:1::/64",
        ] {
            let s = choose_v6(&c, &[], Some(n(p)), &HashSet::new(), &mut rng()).unwrap();
            assert!(c.is_allocatable(s) && s != n(p), "{p} -> {s}");
        }
    }

    #[test]
    fn every_free_subnet_is_reachable_then_exhaustion() {
        let c = v6(r#","IPv6Network":"fd00::/60""#);
        assert_eq!(c.subnet_count(), 15);
        let mut occ = Vec::new();
        for _ in 0..15 {
            let s = choose_v6(&c, &occ, None, &HashSet::new(), &mut rng()).unwrap();
            assert!(!occ.contains(&s));
            occ.push(s);
        }
        let err = choose_v6(&c, &occ, None, &HashSet::new(), &mut rng()).unwrap_err();
        assert!(
            matches!(err, AllocError::OutOfIpv6Subnets { subnet_len: 64, .. }),
            "{err}"
        );
    }

    #[test]
    fn foreign_wide_keys_and_race_exclusions_block() {
        let c = v6(r#","IPv6Network":"fd00::/60""#);
        // A foreign key covering the whole network: nothing is free.
        assert!(choose_v6(&c, &[n("fd00::/56")], None, &HashSet::new(), &mut rng()).is_err());
        // Everything but fd00:0:0:5::/64 is occupied or lost a race.
        let occ: Vec<_> = (1..=15u16)
            .filter(|i| i % 2 == 0)
            .map(|i| n(&format!("fd00:0:0:{i:x}::/64")))
            .collect();
        let lost: HashSet<_> = (1..=15u16)
            .filter(|i| i % 2 == 1 && *i != 5)
            .map(|i| n(&format!("fd00:0:0:{i:x}::/64")))
            .collect();
        assert_eq!(
            choose_v6(&c, &occ, None, &lost, &mut rng()).unwrap(),
            n("fd00:0:0:5::/64")
        );
    }

    #[test]
    fn a_huge_range_terminates_and_avoids_occupied() {
        // 2^116 - 1 subnets: never scanned whole.
        let c = v6(r#","IPv6Network":"fd00::/8","IPv6SubnetLen":124"#);
        let occ = vec![n("fd00::10/124"), n("fd00::20/124")];
        let s = choose_v6(
            &c,
            &occ,
            Some(n("fd00::10/124")),
            &HashSet::new(),
            &mut rng(),
        )
        .unwrap();
        assert!(c.is_allocatable(s) && !occ.contains(&s), "{s}");
        // A foreign key covering it all: a bounded search, then a clear error.
        let err = choose_v6(&c, &[n("fd00::/8")], None, &HashSet::new(), &mut rng()).unwrap_err();
        assert!(err.to_string().contains("fd00::/8"), "{err}");
        // Keys covering the whole address space or reaching past it end to end.
        for k in ["::/0", "fc00::/7", "fd00::/8"] {
            assert!(
                choose_v6(&c, &[n(k)], None, &HashSet::new(), &mut rng()).is_err(),
                "{k}"
            );
        }
    }

    /// A fresh node's v6 choice with nothing excluded, reproducible by seed.
    fn choose_seeded(c: &Ipv6Config, occ: &[Ipv6Network], seed: u64) -> Ipv6Network {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        choose_v6(c, occ, None, &HashSet::new(), &mut rng).unwrap()
    }

    /// For each prefix length in `lens`, the other half of the subnet of that length around
    /// `target`: together they cover everything above `target` except `target` itself.
    fn siblings_on_path(
        target: Ipv6Network,
        lens: std::ops::RangeInclusive<u8>,
    ) -> Vec<Ipv6Network> {
        lens.map(|len| {
            let on_path = Ipv6Network::new(target.ip(), len).unwrap();
            let sibling = u128::from(on_path.network()) ^ (1u128 << (128 - u32::from(len)));
            Ipv6Network::new(Ipv6Addr::from(sibling), len).unwrap()
        })
        .collect()
    }

    /// A /48 of /64s, or a /32 of /64s (2^32 subnets): one free subnet left among foreign keys
    /// that cover everything else is found at once, from every random start.
    #[test]
    fn the_only_free_subnet_of_a_large_range_is_found_without_walking_it() {
        for (net, free) in [
            ("fd00:10:244::/48", "fd00:10:244:beef::/64"),
            ("2001:db8::/32", "2001:db8:1234:5678::/64"),
            ("fd00::/8", "fd12:3456:789a:bcde::/64"),
        ] {
            let c = v6(&format!(r#","IPv6Network":"{net}""#));
            let free = n(free);
            // The siblings along the path from the network down to `free` cover all but it.
            let occ = siblings_on_path(free, (c.network.prefix() + 1)..=64);
            for seed in 0..20 {
                assert_eq!(choose_seeded(&c, &occ, seed), free, "{net} seed {seed}");
            }
            // Lost the race for it too: now nothing is free.
            let lost = HashSet::from([free]);
            assert!(
                choose_v6(&c, &occ, None, &lost, &mut rng()).is_err(),
                "{net}"
            );
        }
    }

    /// 1023/1024 of a 2^32-subnet range covered by ten foreign keys: 32 random probes nearly
    /// always miss the 2^22 free subnets, and a scan bounded by the key count would give up; the
    /// gap search must find one from every start.
    #[test]
    fn wide_foreign_keys_never_make_a_mostly_covered_range_look_full() {
        let c = v6(r#","IPv6Network":"2001:db8::/32""#);
        let free = n("2001:db8:ffc0::/42");
        let occ = siblings_on_path(free, 33..=42);
        for seed in 0..200 {
            let s = choose_seeded(&c, &occ, seed);
            assert!(
                c.is_allocatable(s) && free.contains(s.ip()),
                "seed {seed}: {s}"
            );
        }
    }

    #[test]
    fn gap_search_over_index_ranges() {
        let b = [(0, 3), (2, 5), (7, 7), (9, 20)];
        assert_eq!(first_free(&b, 0, 30), Some(6));
        assert_eq!(first_free(&b, 6, 30), Some(6));
        assert_eq!(first_free(&b, 7, 30), Some(8));
        assert_eq!(first_free(&b, 9, 30), Some(21));
        assert_eq!(first_free(&b, 9, 21), None);
        assert_eq!(first_free(&[(0, u128::MAX)], 0, u128::MAX), None);
        assert_eq!(first_free(&[], 5, 5), None);
        // Key ranges clamp to the allocatable range: below SubnetMin blocks nothing, past
        // SubnetMax stops at the last index.
        let c = v6(r#","IPv6Network":"fd00::/60""#);
        assert_eq!(
            blocked_indices(
                &c,
                [
                    n("fd00::/64"),
                    n("fd00::/62"),
                    n("fd00:0:0:1::8/125"),
                    n("fd00:0:0:f::/64"),
                    n("fd00:0:0:8::/61"),
                    n("fe80::/10"),
                ]
                .iter()
            ),
            [(0, 0), (0, 2), (7, 14), (14, 14)]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use tweed_config::{LeaseAttrs, SubnetKey};

    fn cfg(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json).unwrap()
    }

    fn lease(subnet: &str, ip: &str) -> Lease {
        Lease {
            key: SubnetKey::new(subnet.parse().unwrap()),
            attrs: LeaseAttrs::new(ip.parse().unwrap(), "vxlan", None),
            lease_id: 1,
            mod_revision: 1,
        }
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    /// `choose` for the node at `me`, with nothing excluded and the seeded rng.
    fn choose_for(
        c: &NetworkConfig,
        own_leases: &[Lease],
        occupied: &[Ipv4Network],
        me: &str,
        previous: Option<&str>,
    ) -> Result<Decision, AllocError> {
        let previous = previous.map(|p| p.parse().unwrap());
        let (me, none) = (me.parse().unwrap(), HashSet::new());
        choose(c, own_leases, occupied, me, previous, &none, &mut rng())
    }

    #[test]
    fn reuses_the_lease_held_for_our_ip_first() {
        let c = cfg(r#"{"Network":"10.244.0.0/16"}"#);
        let leases = vec![
            lease("10.244.7.0/24", "198.18.0.2"),
            lease("10.244.9.0/24", "198.18.0.1"),
        ];
        let occ: Vec<_> = leases.iter().map(|l| l.key.ipv4).collect();
        let d = choose_for(&c, &leases, &occ, "198.18.0.1", Some("10.244.3.0/24")).unwrap();
        assert_eq!(d, Decision::Reuse(leases[1].clone()));
    }

    #[test]
    fn a_held_lease_outside_the_range_is_not_reused() {
        let c = cfg(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0"}"#);
        let leases = vec![lease("10.244.3.0/24", "198.18.0.1")];
        let d = choose_for(&c, &leases, &[leases[0].key.ipv4], "198.18.0.1", None).unwrap();
        match d {
            Decision::Take(s) => assert!(c.is_allocatable(s)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn previous_subnet_when_free_else_random_in_range() {
        let c = cfg(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.20.0"}"#,
        );
        let me = "198.18.0.1".parse().unwrap();
        let prev: Ipv4Network = "10.244.12.0/24".parse().unwrap();
        assert_eq!(
            choose(&c, &[], &[], me, Some(prev), &HashSet::new(), &mut rng()).unwrap(),
            Decision::Take(prev)
        );
        // Taken by another node (even with an unreadable value): not reused.
        for _ in 0..50 {
            let d = choose(
                &c,
                &[],
                &[prev],
                me,
                Some(prev),
                &HashSet::new(),
                &mut rand::rng(),
            )
            .unwrap();
            let Decision::Take(s) = d else { panic!() };
            assert_ne!(s, prev);
            assert!(c.is_allocatable(s), "{s} outside [min,max]");
        }
        // Previous subnet outside the (changed) range: ignored.
        let outside: Ipv4Network = "10.244.30.0/24".parse().unwrap();
        let Decision::Take(s) =
            choose(&c, &[], &[], me, Some(outside), &HashSet::new(), &mut rng()).unwrap()
        else {
            panic!()
        };
        assert!(c.is_allocatable(s));
    }

    #[test]
    fn alignment_and_overlap_with_odd_foreign_keys() {
        let c = cfg(
            r#"{"Network":"10.0.0.0/16","SubnetLen":26,"SubnetMin":"10.0.0.64","SubnetMax":"10.0.0.192"}"#,
        );
        assert_eq!(c.subnet_count(), 3);
        // A foreign /24 key covers the whole range.
        let occ = vec!["10.0.0.0/24".parse().unwrap()];
        let err = choose_for(&c, &[], &occ, "1.1.1.1", None).unwrap_err();
        assert!(
            err.to_string().contains("all 3 /26 subnets of 10.0.0.0/16"),
            "{err}"
        );
    }

    #[test]
    fn exhaustion_and_race_exclusions() {
        let c = cfg(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.0","SubnetMax":"10.0.4.0"}"#);
        let me = "1.1.1.1".parse().unwrap();
        let occ: Vec<Ipv4Network> = vec![
            "10.0.1.0/24".parse().unwrap(),
            "10.0.3.0/24".parse().unwrap(),
        ];
        let mut lost = HashSet::new();
        lost.insert("10.0.2.0/24".parse().unwrap());
        assert_eq!(
            choose(&c, &[], &occ, me, None, &lost, &mut rng()).unwrap(),
            Decision::Take("10.0.4.0/24".parse().unwrap())
        );
        lost.insert("10.0.4.0/24".parse().unwrap());
        assert!(matches!(
            choose(&c, &[], &occ, me, None, &lost, &mut rng()),
            Err(AllocError::OutOfSubnets { count: 4, .. })
        ));
    }

    #[test]
    fn every_free_subnet_is_reachable() {
        let c = cfg(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.0","SubnetMax":"10.0.8.0"}"#);
        let mut occ: Vec<Ipv4Network> = Vec::new();
        for _ in 0..8 {
            let Decision::Take(s) = choose_for(&c, &[], &occ, "1.1.1.1", None).unwrap() else {
                panic!()
            };
            assert!(!occ.contains(&s));
            occ.push(s);
        }
        assert!(choose_for(&c, &[], &occ, "1.1.1.1", None).is_err());
    }
}
