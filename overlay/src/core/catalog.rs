//! What a gateway advertises to its peers, and the control messages that carry it (`SPEC.md` §4.3).
//!
//! A catalog version counts *service changes*, not change sets: a set that changes `n` services
//! advances the version by `n`, and its `n` messages carry the versions `old+1 ..= new`. A receiver
//! ignores an update whose version is not above the one it holds, so the sender's version must
//! never fall behind the last number it sent — an earlier rule (the set advanced the version by
//! one while its messages were numbered `old+1, old+2, …`) left the receiver ahead after any set of
//! two or more changes, and the next single change was dropped as old until a reconnect.
//!
//! Pure: no I/O, no clock. The session encodes what these functions return.

use std::collections::BTreeMap;

use causeway_protocol::control::{Catalog, Message, ServiceAd, ServiceUpdate, ServiceWithdraw};
use causeway_protocol::limits::MAX_SERVICES_PER_FRAME;
use causeway_protocol::ServiceName;

/// What this gateway offers, as advertised to peers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalCatalog {
    pub version: u64,
    pub services: BTreeMap<ServiceName, ServiceAd>,
}

impl LocalCatalog {
    /// The first catalog of a gateway process (version 1; a peer holds 0 before any snapshot).
    pub fn new(services: BTreeMap<ServiceName, ServiceAd>) -> Self {
        Self { version: 1, services }
    }

    /// The catalog with `services` in place of ours, its version advanced by the number of
    /// services that changed; `None` when nothing did.
    pub fn next(&self, services: BTreeMap<ServiceName, ServiceAd>) -> Option<Self> {
        let changes = changes(&self.services, &services);
        (changes > 0).then(|| Self { version: self.version + changes, services })
    }

    /// The snapshot a new session starts with: chunks of at most [`MAX_SERVICES_PER_FRAME`], all at
    /// this version, every one but the last marked `more`.
    pub fn snapshot(&self) -> Vec<Message> {
        chunks(self.version, self.services.values().cloned().collect()).into_iter().map(Message::Catalog).collect()
    }

    /// Update and withdraw messages that turn `old` (what the peer was last sent) into `self`.
    ///
    /// The last message carries `self.version` and the numbers before it count down by one, so
    /// every message is above `old.version` — also when the session skipped catalogs in between
    /// (a watch keeps only the newest), since the net diff never has more entries than the
    /// changes the skipped catalogs counted.
    pub fn diff(&self, old: &LocalCatalog) -> Vec<Message> {
        let updated: Vec<&ServiceAd> =
            self.services.iter().filter(|(n, ad)| old.services.get(*n) != Some(*ad)).map(|(_, ad)| ad).collect();
        let withdrawn: Vec<&ServiceName> = old.services.keys().filter(|n| !self.services.contains_key(*n)).collect();
        let n = (updated.len() + withdrawn.len()) as u64;
        let mut version = self.version.saturating_sub(n).max(old.version);
        let mut out = Vec::with_capacity(n as usize);
        for ad in updated {
            version += 1;
            out.push(Message::ServiceUpdate(ServiceUpdate { version, service: ad.clone() }));
        }
        for name in withdrawn {
            version += 1;
            out.push(Message::ServiceWithdraw(ServiceWithdraw { version, name: name.clone() }));
        }
        out
    }
}

/// Services added, changed or removed between two catalogs.
fn changes(old: &BTreeMap<ServiceName, ServiceAd>, new: &BTreeMap<ServiceName, ServiceAd>) -> u64 {
    let changed = new.iter().filter(|(n, ad)| old.get(*n) != Some(*ad)).count();
    let removed = old.keys().filter(|n| !new.contains_key(*n)).count();
    (changed + removed) as u64
}

/// A catalog at `version` as snapshot chunks (one empty chunk for an empty catalog).
pub fn chunks(version: u64, ads: Vec<ServiceAd>) -> Vec<Catalog> {
    if ads.is_empty() {
        return vec![Catalog { version, services: vec![], more: false }];
    }
    let mut out: Vec<Catalog> =
        ads.chunks(MAX_SERVICES_PER_FRAME).map(|c| Catalog { version, services: c.to_vec(), more: true }).collect();
    if let Some(last) = out.last_mut() {
        last.more = false;
    }
    out
}

#[cfg(test)]
mod tests {
    use causeway_protocol::control::Protocol;
    use causeway_protocol::{GatewayId, Identity, ZoneName};

    use super::*;
    use crate::core::route_table::RouteTable;

    fn ad(name: &str, healthy: u32) -> ServiceAd {
        ServiceAd {
            name: ServiceName::new(name).expect("name"),
            protocol: Protocol::Tcp,
            port: 8080,
            healthy_endpoints: healthy,
            labels: vec![],
        }
    }

    fn cat(ads: &[(&str, u32)]) -> BTreeMap<ServiceName, ServiceAd> {
        ads.iter().map(|(n, h)| (ServiceName::new(n).expect("name"), ad(n, *h))).collect()
    }

    /// A peer's route table fed exactly what a session would send.
    struct Peer {
        table: RouteTable,
        id: Identity,
    }

    impl Peer {
        fn new(first: &LocalCatalog) -> Self {
            let id = Identity::parse("spiffe://t.example/zone/b/gateway/gw-1").expect("id");
            let mut table = RouteTable::new(ZoneName::new("a").expect("zone"), Default::default());
            table.peer_up(&id, ZoneName::new("b").expect("zone"), GatewayId::new("gw-1").expect("gateway"));
            let mut p = Self { table, id };
            p.apply(first.snapshot());
            p
        }
        fn apply(&mut self, msgs: Vec<Message>) {
            for m in msgs {
                self.table.apply(&self.id, &m).expect("apply");
            }
        }
        fn healthy(&self, name: &str) -> Option<u32> {
            self.table
                .peer(&self.id)
                .and_then(|e| e.services.get(&ServiceName::new(name).expect("name")).map(|a| a.healthy_endpoints))
        }
        fn version(&self) -> u64 {
            self.table.peer(&self.id).map(|e| e.version).unwrap_or(0)
        }
    }

    /// The bug of issue 17: two services change in one set, then one recovers alone.
    #[test]
    fn a_single_change_after_a_multi_change_set_is_applied() {
        let v1 = LocalCatalog::new(cat(&[("a.shop", 1), ("b.shop", 1)]));
        let mut peer = Peer::new(&v1);
        let v2 = v1.next(cat(&[("a.shop", 0), ("b.shop", 0)])).expect("changed");
        assert_eq!(v2.version, 3);
        peer.apply(v2.diff(&v1));
        assert_eq!((peer.healthy("a.shop"), peer.healthy("b.shop"), peer.version()), (Some(0), Some(0), 3));
        let v3 = v2.next(cat(&[("a.shop", 1), ("b.shop", 0)])).expect("changed");
        peer.apply(v3.diff(&v2));
        assert_eq!(peer.healthy("a.shop"), Some(1), "the recovery was dropped as old");
        assert_eq!(peer.version(), v3.version);
    }

    #[test]
    fn nothing_changed_is_no_new_version() {
        let v1 = LocalCatalog::new(cat(&[("a.shop", 1)]));
        assert_eq!(v1.next(cat(&[("a.shop", 1)])), None);
    }

    #[test]
    fn skipped_catalogs_still_number_above_what_was_sent() {
        // The session sent v1, then the watch coalesced two sets into the newest.
        let v1 = LocalCatalog::new(cat(&[("a.shop", 1), ("b.shop", 1), ("c.shop", 1)]));
        let mut peer = Peer::new(&v1);
        let v2 = v1.next(cat(&[("a.shop", 0), ("b.shop", 0), ("c.shop", 1)])).expect("changed");
        let v3 = v2.next(cat(&[("a.shop", 1), ("b.shop", 0)])).expect("changed");
        let msgs = v3.diff(&v1);
        assert_eq!(msgs.len(), 2, "b changed, c withdrawn; a is back to what was sent");
        peer.apply(msgs);
        assert_eq!((peer.healthy("b.shop"), peer.healthy("c.shop"), peer.version()), (Some(0), None, v3.version));
        let v4 = v3.next(cat(&[("a.shop", 1), ("b.shop", 1)])).expect("changed");
        peer.apply(v4.diff(&v3));
        assert_eq!(peer.healthy("b.shop"), Some(1));
    }

    #[test]
    fn snapshots_chunk_and_mark_all_but_the_last() {
        let many: BTreeMap<_, _> = (0..MAX_SERVICES_PER_FRAME + 1)
            .map(|i| {
                let n = format!("s{i}.shop");
                (ServiceName::new(&n).expect("name"), ad(&n, 1))
            })
            .collect();
        let c = LocalCatalog::new(many).snapshot();
        let more: Vec<bool> = c.iter().map(|m| matches!(m, Message::Catalog(c) if c.more)).collect();
        assert_eq!(more, [true, false]);
        assert_eq!(LocalCatalog::new(BTreeMap::new()).snapshot().len(), 1);
    }

    proptest::proptest! {
        /// Any sequence of catalogs, each diffed against the last one the session sent (some
        /// skipped), leaves the peer holding exactly the sender's catalog and version.
        #[test]
        fn a_peer_follows_any_sequence(steps in proptest::collection::vec((proptest::collection::vec(0u32..3, 4), proptest::bool::ANY), 1..20)) {
            let names = ["a.shop", "b.shop", "c.shop", "d.shop"];
            let mut cur = LocalCatalog::new(cat(&[("a.shop", 1)]));
            let mut sent = cur.clone();
            let mut peer = Peer::new(&sent);
            for (health, deliver) in steps {
                // 0 means "not exported", else healthy_endpoints - 1.
                let ads: Vec<(&str, u32)> =
                    names.iter().zip(&health).filter(|(_, h)| **h > 0).map(|(n, h)| (*n, *h - 1)).collect();
                if let Some(next) = cur.next(cat(&ads)) {
                    cur = next;
                }
                if deliver {
                    let msgs = cur.diff(&sent);
                    let empty = msgs.is_empty();
                    peer.apply(msgs);
                    sent = cur.clone();
                    let held = peer.table.peer(&peer.id).map(|e| e.services.clone()).unwrap_or_default();
                    proptest::prop_assert!(held.same_as(&cur.services), "{held:?} != {:?}", cur.services);
                    // Skipped catalogs that cancel out send nothing: the peer may lag behind the
                    // sender's number (harmless: later numbers start above it), never run ahead.
                    proptest::prop_assert!(peer.version() <= cur.version);
                    if !empty {
                        proptest::prop_assert_eq!(peer.version(), cur.version);
                    }
                }
            }
        }
    }
}
