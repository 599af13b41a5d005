//! Mesh-wide documents, decided without I/O (`SPEC.md` §4.8): which of two verified documents
//! wins, what each gateway's latest report says, and how fast a peer may send documents.
//!
//! Order: a higher version wins; of two with the same version, the higher SHA-256 digest of the
//! body. Every gateway applies the same order to whatever reaches it, so concurrent publishes
//! converge on one document everywhere, whatever the order they arrive in.

use std::collections::HashMap;
use std::sync::Arc;

use causeway_protocol::document::{DocumentState, DocumentStatus, SignedDocument};
use causeway_protocol::Identity;

pub use super::bucket::{Bucket, RateGate};

/// Gateways a status table keeps (a report from one more is dropped and counted).
pub const MAX_STATUS_ROWS: usize = 4096;

/// A document whose signature and publisher were verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub version: u64,
    pub digest: [u8; 32],
    pub publisher: Identity,
    pub published_ms: u64,
    pub content: String,
    /// As received: what is flooded on and persisted.
    pub signed: SignedDocument,
}

impl Verified {
    pub fn key(&self) -> (u64, [u8; 32]) {
        (self.version, self.digest)
    }

    /// The digest as lowercase hex (logs, the admin API).
    pub fn digest_hex(&self) -> String {
        hex(&self.digest)
    }
}

pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// What to do with a verified document, given the one held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It wins: hold it, apply it, flood it.
    Newer,
    /// The one held: nothing to do.
    Duplicate,
    /// Older than the one held: refused.
    Older { held: u64 },
    /// Same version as the one held, which wins by digest: refused as superseded.
    Superseded,
}

impl Verdict {
    /// The `reason` label of a refusal.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Newer => "newer",
            Verdict::Duplicate => "duplicate",
            Verdict::Older { .. } => "older",
            Verdict::Superseded => "superseded",
        }
    }
}

/// Judges `offered` (version, digest) against the `held` one.
pub fn judge(held: Option<(u64, [u8; 32])>, offered: (u64, [u8; 32])) -> Verdict {
    match held {
        None => Verdict::Newer,
        Some(h) if h == offered => Verdict::Duplicate,
        Some((v, _)) if offered.0 < v => Verdict::Older { held: v },
        Some(h) if offered > h => Verdict::Newer,
        Some(_) => Verdict::Superseded,
    }
}

/// How a gateway stands with the held document, as `causeway status --mesh` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Applied,
    Refused,
    /// Its latest report is about another (older, or superseded) document.
    Behind,
}

impl Standing {
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Applied => "applied",
            Standing::Refused => "refused",
            Standing::Behind => "behind",
        }
    }
}

/// Where a report stands against the held document's (version, digest).
pub fn standing(report: &DocumentStatus, held: Option<(u64, [u8; 32])>) -> Standing {
    match held {
        Some(h) if (report.version, report.digest) == h => match report.state {
            DocumentState::Applied => Standing::Applied,
            DocumentState::Refused => Standing::Refused,
        },
        _ => Standing::Behind,
    }
}

/// Every gateway's latest report.
#[derive(Debug, Default)]
pub struct StatusTable {
    rows: HashMap<Identity, DocumentStatus>,
}

/// What [`StatusTable::offer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Newer than what was known: kept (and to be flooded on).
    Kept,
    /// Not newer than what was known.
    Stale,
    /// From one gateway too many.
    Full,
}

impl StatusTable {
    /// Keeps `s` if it is newer (by `seq`) than the report known from the same gateway.
    pub fn offer(&mut self, s: DocumentStatus) -> Offered {
        match self.rows.get(&s.identity) {
            Some(old) if old.seq >= s.seq => Offered::Stale,
            None if self.rows.len() >= MAX_STATUS_ROWS => Offered::Full,
            _ => {
                self.rows.insert(s.identity.clone(), s);
                Offered::Kept
            }
        }
    }

    pub fn get(&self, id: &Identity) -> Option<&DocumentStatus> {
        self.rows.get(id)
    }

    /// Every report, by identity.
    pub fn rows(&self) -> Vec<DocumentStatus> {
        let mut v: Vec<_> = self.rows.values().cloned().collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }
}

/// Documents a peer may send: a burst, then a steady rate (each costs a signature check).
pub const DOCUMENT_RATE: RateGate = RateGate { burst: 20.0, per_second: 5.0 };

/// Shared handle to the held document.
pub type Held = Option<Arc<Verified>>;

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_protocol::{GatewayId, ZoneName};

    fn d(b: u8) -> [u8; 32] {
        [b; 32]
    }

    #[test]
    fn higher_versions_win_then_higher_digests_and_the_same_one_is_a_duplicate() {
        assert_eq!(judge(None, (1, d(1))), Verdict::Newer);
        assert_eq!(judge(Some((3, d(1))), (4, d(0))), Verdict::Newer);
        assert_eq!(judge(Some((3, d(1))), (3, d(1))), Verdict::Duplicate);
        assert_eq!(judge(Some((3, d(1))), (2, d(9))), Verdict::Older { held: 3 });
        assert_eq!(judge(Some((3, d(1))), (3, d(2))), Verdict::Newer);
        assert_eq!(judge(Some((3, d(2))), (3, d(1))), Verdict::Superseded);
    }

    /// Whatever order two gateways see the same documents in, they end on the same one.
    #[test]
    fn any_arrival_order_converges_on_one_document() {
        let docs = [(5, d(3)), (5, d(7)), (4, d(9)), (6, d(1)), (6, d(0))];
        let mut orders = vec![docs.to_vec()];
        let mut rev = docs.to_vec();
        rev.reverse();
        orders.push(rev);
        orders.push(vec![docs[3], docs[0], docs[4], docs[2], docs[1]]);
        let ends: Vec<_> = orders
            .iter()
            .map(|order| {
                let mut held = None;
                for o in order {
                    if judge(held, *o) == Verdict::Newer {
                        held = Some(*o);
                    }
                }
                held
            })
            .collect();
        assert!(ends.iter().all(|e| *e == Some((6, d(1)))), "{ends:?}");
    }

    fn report(seq: u64, version: u64, state: DocumentState) -> DocumentStatus {
        DocumentStatus {
            identity: Identity::parse("spiffe://td/gw/a").unwrap(),
            zone: ZoneName::new("a").unwrap(),
            gateway: GatewayId::new("gw-1").unwrap(),
            seq,
            version,
            digest: d(version as u8),
            state,
            reason: String::new(),
            at_ms: 0,
        }
    }

    #[test]
    fn a_newer_report_replaces_an_older_one_and_standing_follows_the_held_document() {
        let mut t = StatusTable::default();
        assert_eq!(t.offer(report(2, 1, DocumentState::Applied)), Offered::Kept);
        assert_eq!(t.offer(report(1, 2, DocumentState::Applied)), Offered::Stale);
        assert_eq!(t.offer(report(2, 2, DocumentState::Applied)), Offered::Stale);
        let r = t.rows()[0].clone();
        assert_eq!(standing(&r, Some((1, d(1)))), Standing::Applied);
        assert_eq!(standing(&r, Some((2, d(2)))), Standing::Behind);
        assert_eq!(t.offer(report(3, 2, DocumentState::Refused)), Offered::Kept);
        assert_eq!(standing(&t.rows()[0], Some((2, d(2)))), Standing::Refused);
        assert_eq!(standing(&t.rows()[0], None), Standing::Behind);
    }
}
