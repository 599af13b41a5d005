//! Service virtual IPs: the address mesh DNS answers for `<service>.<suffix>` and that redirectors
//! capture. Sans-IO and deterministic, so every node computes the same table from the same catalog
//! without coordination (`SPEC.md` §Virtual IPs).
//!
//! A service's candidate addresses are `base + 1 + (fnv1a64(name, probe) mod (size - 2))` for
//! probe = 0, 1, 2, …; the network and broadcast addresses are never used. Services are placed in
//! order of (first-probe position, name) and each takes its first candidate not yet taken, so a
//! collision moves only the later of the two names, and a new service can displace an existing one
//! only when both hash to the same first address and the new name sorts first (for two services in a
//! /16, a 1 in 65,534 chance).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use crate::names::ServiceName;

/// An IPv4 range for service VIPs, e.g. `240.240.0.0/16` (the default: reserved space, never routed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VipRange {
    base: u32,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VipRangeError {
    #[error("expected an IPv4 CIDR like 240.240.0.0/16")]
    Syntax,
    #[error("prefix must be between /8 and /24 (room for services, and not the whole internet)")]
    Prefix,
    #[error("address has host bits set for /{0}")]
    HostBits(u8),
}

impl VipRange {
    pub const DEFAULT: &'static str = "240.240.0.0/16";

    pub fn parse(s: &str) -> Result<Self, VipRangeError> {
        let (addr, prefix) = s.split_once('/').ok_or(VipRangeError::Syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| VipRangeError::Syntax)?;
        let prefix: u8 = prefix.parse().map_err(|_| VipRangeError::Syntax)?;
        if !(8..=24).contains(&prefix) {
            return Err(VipRangeError::Prefix);
        }
        let base = u32::from(addr);
        let mask = u32::MAX << (32 - prefix);
        if base & !mask != 0 {
            return Err(VipRangeError::HostBits(prefix));
        }
        Ok(Self { base, prefix })
    }

    fn size(&self) -> u32 {
        1u32 << (32 - self.prefix)
    }

    /// Usable addresses (without network and broadcast).
    pub fn capacity(&self) -> u32 {
        self.size() - 2
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & (u32::MAX << (32 - self.prefix)) == self.base
    }

    fn candidate(&self, name: &ServiceName, probe: u32) -> u32 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.as_str().bytes().chain(probe.to_be_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.base + 1 + (h % u64::from(self.capacity())) as u32
    }
}

impl std::fmt::Display for VipRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

/// Service ⇄ VIP, both ways.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VipTable {
    by_name: BTreeMap<ServiceName, Ipv4Addr>,
    by_ip: HashMap<Ipv4Addr, ServiceName>,
}

impl VipTable {
    /// Assigns VIPs to `names`. Names beyond the range's capacity get none.
    pub fn assign<'a>(range: VipRange, names: impl IntoIterator<Item = &'a ServiceName>) -> Self {
        let mut order: Vec<(u32, &ServiceName)> = names.into_iter().map(|n| (range.candidate(n, 0), n)).collect();
        order.sort();
        order.dedup_by(|a, b| a.1 == b.1);
        let mut t = Self::default();
        for (first, name) in order {
            if t.by_ip.len() as u32 >= range.capacity() {
                break;
            }
            let mut probe = 0;
            let mut ip = first;
            while t.by_ip.contains_key(&Ipv4Addr::from(ip)) {
                probe += 1;
                ip = range.candidate(name, probe);
            }
            t.by_ip.insert(Ipv4Addr::from(ip), name.clone());
            t.by_name.insert(name.clone(), Ipv4Addr::from(ip));
        }
        t
    }

    pub fn vip(&self, name: &ServiceName) -> Option<Ipv4Addr> {
        self.by_name.get(name).copied()
    }

    pub fn service(&self, ip: Ipv4Addr) -> Option<&ServiceName> {
        self.by_ip.get(&ip)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ServiceName, &Ipv4Addr)> {
        self.by_name.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<ServiceName> {
        (0..n).map(|i| ServiceName::new(&format!("svc-{i}.ns")).unwrap()).collect()
    }

    #[test]
    fn parses_ranges() {
        let r = VipRange::parse("240.240.0.0/16").unwrap();
        assert_eq!(r.capacity(), 65_534);
        assert!(r.contains("240.240.7.9".parse().unwrap()));
        assert!(!r.contains("240.241.0.1".parse().unwrap()));
        assert_eq!(VipRange::parse("240.240.0.1/16"), Err(VipRangeError::HostBits(16)));
        assert_eq!(VipRange::parse("0.0.0.0/0"), Err(VipRangeError::Prefix));
        assert_eq!(VipRange::parse("nope"), Err(VipRangeError::Syntax));
    }

    #[test]
    fn same_names_same_table_in_any_order() {
        let r = VipRange::parse("240.240.0.0/16").unwrap();
        let n = names(500);
        let a = VipTable::assign(r, &n);
        let b = VipTable::assign(r, n.iter().rev());
        assert_eq!(a, b);
        assert_eq!(a.len(), 500);
        for (name, ip) in a.iter() {
            assert!(r.contains(*ip));
            assert_ne!(u32::from(*ip) & 0xffff, 0, "network address used");
            assert_ne!(u32::from(*ip) & 0xffff, 0xffff, "broadcast address used");
            assert_eq!(a.service(*ip), Some(name));
        }
    }

    #[test]
    fn collisions_are_resolved_and_adding_a_service_rarely_moves_others() {
        // 2,000 services in a /16: a few first-choice collisions, resolved by probing.
        let r = VipRange::parse("240.240.0.0/16").unwrap();
        let n = names(2_001);
        let before = VipTable::assign(r, &n[..2_000]);
        let after = VipTable::assign(r, &n);
        assert_eq!(after.len(), 2_001);
        let moved = n[..2_000].iter().filter(|s| before.vip(s) != after.vip(s)).count();
        assert!(moved <= 1, "{moved} services moved when one was added");
    }

    #[test]
    fn a_full_range_assigns_what_fits() {
        let r = VipRange::parse("240.240.7.0/24").unwrap();
        assert_eq!(VipTable::assign(r, &names(300)).len(), 254);
    }
}
