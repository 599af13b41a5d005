//! Which caller identity a peer gateway may vouch for (`SPEC.md` §5, THREATS.md).
//!
//! A source gateway names the workload behind a flow or request in `causeway-source-identity`;
//! the destination authorizes on it. The handshake scopes each peer to its own trust domain (a
//! federated CA verifies only leaves of the domain it is configured for), and this rule keeps the
//! assertion inside the same scope: a peer may name callers of its own trust domain only — and,
//! where `peers[].source_identities` lists prefixes, only under them. Without it a federated
//! partner could claim `spiffe://<our domain>/ns/shop/…` and match our `identities`, `namespaces`
//! and `trust_domains` rules.

use causeway_protocol::Identity;

/// Why an asserted caller identity was refused (the `reason` label of
/// `causeway_peer_assertions_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not a SPIFFE ID.
    Malformed,
    /// A trust domain other than the peer's own.
    ForeignTrustDomain,
    /// In the peer's trust domain, but under none of the prefixes configured for it.
    OutsidePrefixes,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::ForeignTrustDomain => "foreign_trust_domain",
            Self::OutsidePrefixes => "outside_prefixes",
        }
    }
}

/// The caller a flow or request from `peer` is authorized as: the identity it asserted when the
/// peer may vouch for it, the peer itself when it asserted none (an empty header is none).
/// `prefixes` are the peer's `source_identities` (empty: anything in its trust domain).
pub fn vouched(peer: &Identity, prefixes: &[String], asserted: Option<&str>) -> Result<Identity, Refused> {
    let Some(asserted) = asserted.filter(|a| !a.is_empty()) else { return Ok(peer.clone()) };
    let id = Identity::parse(asserted).map_err(|_| Refused::Malformed)?;
    if id == *peer {
        return Ok(id);
    }
    if id.trust_domain() != peer.trust_domain() {
        return Err(Refused::ForeignTrustDomain);
    }
    if !prefixes.is_empty() && !prefixes.iter().any(|p| id.as_str().starts_with(p.as_str())) {
        return Err(Refused::OutsidePrefixes);
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        Identity::parse(s).expect("id")
    }

    #[test]
    fn a_peer_vouches_for_its_own_trust_domain_only() {
        let partner = id("spiffe://partner.example/zone/p/gateway/gw-1");
        let ours = "spiffe://prod.example/ns/shop/sa/orders";
        assert_eq!(vouched(&partner, &[], Some(ours)), Err(Refused::ForeignTrustDomain));
        let theirs = "spiffe://partner.example/ns/pay/sa/api";
        assert_eq!(vouched(&partner, &[], Some(theirs)), Ok(id(theirs)));
        assert_eq!(vouched(&partner, &[], None), Ok(partner.clone()));
        assert_eq!(vouched(&partner, &[], Some("")), Ok(partner.clone()));
        assert_eq!(vouched(&partner, &[], Some("not a spiffe id")), Err(Refused::Malformed));
    }

    #[test]
    fn listed_prefixes_narrow_what_a_peer_may_assert() {
        let peer = id("spiffe://prod.example/zone/b/gateway/gw-1");
        let prefixes = vec!["spiffe://prod.example/ns/shop/".to_string()];
        assert!(vouched(&peer, &prefixes, Some("spiffe://prod.example/ns/shop/sa/a")).is_ok());
        assert_eq!(
            vouched(&peer, &prefixes, Some("spiffe://prod.example/ns/admin/sa/a")),
            Err(Refused::OutsidePrefixes)
        );
        // Its own identity (what an unmapped client is) stays allowed.
        assert_eq!(vouched(&peer, &prefixes, Some(peer.as_str())), Ok(peer.clone()));
    }
}
