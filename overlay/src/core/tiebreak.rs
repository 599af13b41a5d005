//! One connection per gateway pair: which of two connections to the same peer is kept
//! (`SPEC.md` §2). Pure: the facts in, the decision out; the session closes what it says.
//!
//! - A certificate changed on either side since the existing connection was made, and it is up:
//!   the new one replaces it make-before-break, once it can carry flows, and the old one closes
//!   when its last flow ends (rotation cuts no flow).
//! - Both dialed by the same side: an existing connection whose hello exchange is done is kept and
//!   the new one closed — a late duplicate (a dial that retransmitted its Initial until the peer
//!   came up) must not replace a connection that carries flows; a stale one is noticed by
//!   liveness, after which a re-dial wins. One not up yet is replaced by the redial.
//! - Dialed from opposite sides (a simultaneous dial): both sides keep the one dialed by the
//!   gateway whose SPIFFE ID sorts lower, whatever either knows of their state, so they agree
//!   without talking. The other is closed at once only when it is the newcomer — this side never
//!   served it, so the peer cannot have routed on it. When it is the existing one it is replaced
//!   make-before-break: the peer may have finished its hello exchange on it before we finished
//!   ours and be routing on it. (Deciding by our own view of "up" let each side keep a different
//!   one and close the other's: both connections lost at once, and a flow with them.)

/// What is known of the connection already registered for the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Existing {
    /// Its hello exchange is done (it may carry flows).
    pub up: bool,
    /// We dialed it.
    pub dialed: bool,
    /// A certificate (ours or the peer's) differs from the new connection's.
    pub rotated: bool,
}

/// What to do with a new connection to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No live connection to the peer: register the new one.
    Register,
    /// Keep the existing one; close the new one (`DUPLICATE_CONNECTION`).
    KeepExisting,
    /// Close the existing one (`DUPLICATE_CONNECTION`) and register the new one.
    ReplaceNow,
    /// Register the new one beside the existing, promote it once it carries flows, then retire the
    /// existing when its flows have ended.
    MakeBeforeBreak,
}

/// The decision for a new connection (`dialed`: by us) when `existing` is live; `we_sort_lower`:
/// our SPIFFE ID sorts before the peer's.
pub fn decide(existing: Option<Existing>, dialed: bool, we_sort_lower: bool) -> Decision {
    let Some(old) = existing else { return Decision::Register };
    if old.rotated && old.up {
        return Decision::MakeBeforeBreak;
    }
    if old.dialed == dialed {
        return if old.up { Decision::KeepExisting } else { Decision::ReplaceNow };
    }
    // A simultaneous dial: the lower side's connection wins.
    if dialed == we_sort_lower {
        Decision::MakeBeforeBreak
    } else {
        Decision::KeepExisting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(up: bool, dialed: bool, rotated: bool) -> Option<Existing> {
        Some(Existing { up, dialed, rotated })
    }

    #[test]
    fn an_established_connection_is_kept_against_a_late_duplicate_from_the_same_side() {
        for dialed in [true, false] {
            for lower in [true, false] {
                assert_eq!(decide(ex(true, dialed, false), dialed, lower), Decision::KeepExisting);
            }
        }
    }

    #[test]
    fn a_rotated_certificate_replaces_make_before_break_but_only_an_established_one() {
        assert_eq!(decide(ex(true, true, true), true, true), Decision::MakeBeforeBreak);
        assert_eq!(decide(ex(true, false, true), true, false), Decision::MakeBeforeBreak);
        // Not up yet: the ordinary rules (nothing to keep flows on).
        assert_eq!(decide(ex(false, true, true), true, false), Decision::ReplaceNow);
    }

    #[test]
    fn a_redial_from_the_same_side_replaces_one_not_yet_up() {
        assert_eq!(decide(ex(false, true, false), true, false), Decision::ReplaceNow);
        assert_eq!(decide(ex(false, false, false), false, true), Decision::ReplaceNow);
    }

    /// Both sides see both connections of a simultaneous dial, in either order and whatever each
    /// knows of their state, and keep the same one: the one dialed by the side whose ID sorts lower.
    /// The loser is closed at once only where it arrives second (never served there).
    #[test]
    fn both_sides_of_a_simultaneous_dial_keep_the_same_connection() {
        // Side L (sorts lower) dialed connection X; side H dialed Y.
        // At L: X is ours (dialed), Y the peer's. At H: X is the peer's, Y ours.
        let at = |we_lower: bool, first_dialed_by_us: bool, up: bool| -> (&'static str, Decision) {
            let d = decide(ex(up, first_dialed_by_us, false), !first_dialed_by_us, we_lower);
            let first_is_x = first_dialed_by_us == we_lower;
            let (first, second) = if first_is_x { ("X", "Y") } else { ("Y", "X") };
            match d {
                Decision::KeepExisting => (first, d),
                Decision::MakeBeforeBreak | Decision::ReplaceNow => (second, d),
                Decision::Register => panic!("{d:?}"),
            }
        };
        for we_lower in [true, false] {
            for first_ours in [true, false] {
                for up in [true, false] {
                    let (kept, d) = at(we_lower, first_ours, up);
                    assert_eq!(kept, "X", "lower {we_lower}, first ours {first_ours}, up {up}");
                    // An existing connection the peer may be routing on is never closed at once.
                    assert_ne!(d, Decision::ReplaceNow);
                }
            }
        }
        assert_eq!(decide(None, true, true), Decision::Register);
    }
}
