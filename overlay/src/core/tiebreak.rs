//! One connection per gateway pair: which of two connections to the same peer is kept
//! (`SPEC.md` §2). Pure: the facts in, the decision out; the session closes what it says.
//!
//! - An existing connection whose hello exchange is done is kept and the new one closed: a late
//!   duplicate (a dial that retransmitted its Initial until the peer came up) must not replace a
//!   connection that carries flows; a stale one is noticed by liveness, after which a re-dial wins.
//! - Unless a certificate changed on either side since the existing one was made: then the new one
//!   replaces it make-before-break, once it can carry flows, and the old one closes when its last
//!   flow ends (rotation cuts no flow).
//! - An existing connection not up yet: a new one dialed from the same side replaces it (a redial);
//!   two dialed from opposite sides at once (a simultaneous dial) resolve to the one dialed by the
//!   gateway whose SPIFFE ID sorts lower, so both sides keep the same one without talking.

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
    let keep_new = !old.up && (old.dialed == dialed || dialed == we_sort_lower);
    if keep_new {
        Decision::ReplaceNow
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
    fn an_established_connection_is_kept_against_a_late_duplicate() {
        for dialed in [true, false] {
            for lower in [true, false] {
                assert_eq!(decide(ex(true, !dialed, false), dialed, lower), Decision::KeepExisting);
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

    /// Both sides see both connections of a simultaneous dial, in either order, and must keep the
    /// same one: the one dialed by the side whose ID sorts lower.
    #[test]
    fn both_sides_of_a_simultaneous_dial_keep_the_same_connection() {
        // Side L (sorts lower) dialed connection X; side H dialed Y.
        // At L: X is ours (dialed), Y the peer's. At H: X is the peer's, Y ours.
        let kept = |first_dialed_by_us: bool, we_lower: bool| -> &'static str {
            // `first` registered, then the other arrives.
            let new_dialed = !first_dialed_by_us;
            let d = decide(ex(false, first_dialed_by_us, false), new_dialed, we_lower);
            let (first, second) = if we_lower {
                if first_dialed_by_us {
                    ("X", "Y")
                } else {
                    ("Y", "X")
                }
            } else if first_dialed_by_us {
                ("Y", "X")
            } else {
                ("X", "Y")
            };
            match d {
                Decision::KeepExisting => first,
                Decision::ReplaceNow => second,
                other => panic!("{other:?}"),
            }
        };
        for l_first_ours in [true, false] {
            for h_first_ours in [true, false] {
                assert_eq!(kept(l_first_ours, true), "X");
                assert_eq!(kept(h_first_ours, false), "X");
            }
        }
        assert_eq!(decide(None, true, true), Decision::Register);
    }
}
