//! What a peer may do with streams on its connection: open new flows at a bounded rate, and not
//! reset most of them right after opening them.
//!
//! A stream costs the peer one frame and costs us a task, a header parse and — for a flow — a
//! backend connect. HTTP/2's "rapid reset" (CVE-2023-44487) opened and cancelled streams in a loop so
//! that the concurrency limit never applied; QUIC's stream limit has the same hole, because a reset
//! stream frees its slot at once. Two rules close it, per peer connection:
//!
//! - **New flows are rate limited** (token bucket, `limits.peer_flow_rate` per second, a burst of one
//!   second's worth). Over the rate a flow is answered 429 `peer_flow_rate` before anything else is
//!   done for it; the peer's client tries another zone.
//! - **Rapid reset throttles, then closes.** Streams are tallied as they end, in batches of
//!   [`RAPID_RESET_BATCH`]; when more than half of a batch were reset by the peer within
//!   [`RAPID_RESET_AGE`] of opening, the peer is *throttled*: for [`THROTTLE_FOR`] its new streams
//!   are answered 429 `peer_flow_rate` at once (its clients try another zone), while its open flows
//!   go on. Only a peer that trips the rule [`STRIKES`] times within [`STRIKE_WINDOW`] — that keeps
//!   resetting while refused — has its connection closed with `H3_EXCESSIVE_LOAD`: the connection
//!   carries every flow between two zones, so closing it is the last resort. Each step is logged and
//!   counted.
//!
//! A reset with `FLOW_CLIENT_RESET` is the peer gateway relaying its own client's abort (a health
//! checker, an impatient client, a crashing pod: `SPEC.md` §5), not the peer's doing, and is not
//! judged. A hostile peer that lies with that code gains nothing the rate limit does not already
//! bound: each of its streams still costs it a token of `peer_flow_rate`.

use super::bucket::{Bucket, RateGate};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Streams are judged in batches of this many (counted as they end).
pub const RAPID_RESET_BATCH: u32 = 500;
/// A stream reset by the peer this soon after it was opened counts as a rapid reset.
pub const RAPID_RESET_AGE: Duration = Duration::from_secs(1);
/// How long a peer that tripped the rapid-reset rule has its new streams refused.
pub const THROTTLE_FOR: Duration = Duration::from_secs(10);
/// Trips within [`STRIKE_WINDOW`] that close the connection.
pub const STRIKES: u32 = 3;
/// The window in which trips add up to [`STRIKES`].
pub const STRIKE_WINDOW: Duration = Duration::from_secs(60);
/// Default new flows per second per peer connection (`limits.peer_flow_rate`).
pub const DEFAULT_PEER_FLOW_RATE: u32 = 5_000;

/// Per peer connection: the new-flow token bucket and the current rapid-reset batch.
#[derive(Debug)]
pub struct StreamRules {
    rate: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    flows: Bucket,
    ended: u32,
    early_resets: u32,
    /// New streams are refused until then.
    throttled_until: Option<Instant>,
    /// Trips within the current strike window, and when the window began.
    strikes: u32,
    first_strike: Option<Instant>,
    /// The rule closed the connection: later streams are not judged again.
    closed: bool,
}

/// What the rapid-reset rule decided at the end of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Refuse the peer's new streams until `until` (`early` of the batch were rapid resets).
    Throttle { early: u32, until: Instant },
    /// Close the connection: the peer kept it up after [`STRIKES`] trips.
    Close { early: u32 },
}

/// How a stream from the peer ended, for the rapid-reset tally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Reset (or abandoned before its headers completed) by the peer.
    ResetByPeer,
    /// Reset by the peer with `FLOW_CLIENT_RESET`: it relayed its own client's abort.
    RelayedAbort,
    /// Anything else: completed, refused by us, reset by the backend.
    Other,
}

impl StreamRules {
    /// `rate` new flows per second (at least 1), with a burst of one second's worth.
    pub fn new(rate: u32, now: Instant) -> Self {
        let rate = f64::from(rate.max(1));
        let state = State {
            flows: Bucket::full(RateGate { burst: rate, per_second: rate }, now),
            ended: 0,
            early_resets: 0,
            throttled_until: None,
            strikes: 0,
            first_strike: None,
            closed: false,
        };
        Self { rate, state: Mutex::new(state) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the peer's new streams are refused at `now` (it tripped the rapid-reset rule).
    pub fn throttled(&self, now: Instant) -> bool {
        self.state().throttled_until.is_some_and(|t| now < t)
    }

    /// A new flow from the peer at `now`: whether it may go ahead (within the rate, not throttled).
    pub fn admit(&self, now: Instant) -> bool {
        let mut s = self.state();
        if s.throttled_until.is_some_and(|t| now < t) {
            return false;
        }
        s.flows.take(RateGate { burst: self.rate, per_second: self.rate }, now)
    }

    /// A stream opened at `opened` ended at `now`. At the end of a batch that was mostly rapid
    /// resets: throttle the peer, or — at the [`STRIKES`]-th trip within [`STRIKE_WINDOW`] — close
    /// its connection (once per connection).
    pub fn ended(&self, opened: Instant, now: Instant, how: StreamEnd) -> Option<Verdict> {
        let mut s = self.state();
        s.ended += 1;
        if how == StreamEnd::ResetByPeer && now.saturating_duration_since(opened) < RAPID_RESET_AGE {
            s.early_resets += 1;
        }
        if s.ended < RAPID_RESET_BATCH {
            return None;
        }
        let early = s.early_resets;
        s.ended = 0;
        s.early_resets = 0;
        if early * 2 <= RAPID_RESET_BATCH || s.closed {
            return None;
        }
        if s.first_strike.is_none_or(|t| now.saturating_duration_since(t) > STRIKE_WINDOW) {
            s.first_strike = Some(now);
            s.strikes = 0;
        }
        s.strikes += 1;
        if s.strikes >= STRIKES {
            s.closed = true;
            return Some(Verdict::Close { early });
        }
        let until = now + THROTTLE_FOR;
        s.throttled_until = Some(until);
        Some(Verdict::Throttle { early, until })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_flows_are_admitted_at_the_rate_with_a_one_second_burst() {
        let t0 = Instant::now();
        let r = StreamRules::new(100, t0);
        assert_eq!((0..1000).filter(|_| r.admit(t0)).count(), 100, "burst of one second's worth");
        // 10 ms later: one more token.
        assert!(r.admit(t0 + Duration::from_millis(10)));
        assert!(!r.admit(t0 + Duration::from_millis(10)));
        // Over 10 s at 1,000 attempts a second, about 100 a second get through.
        let admitted = (0..10_000).filter(|i| r.admit(t0 + Duration::from_millis(10 + i))).count();
        assert!((990..=1010).contains(&admitted), "{admitted}");
    }

    #[test]
    fn a_batch_mostly_reset_within_a_second_closes_and_an_honest_one_does_not() {
        let t0 = Instant::now();
        let r = StreamRules::new(DEFAULT_PEER_FLOW_RATE, t0);
        let soon = t0 + Duration::from_millis(5);
        let late = t0 + Duration::from_secs(2);
        // Half reset early, half complete: not more than half — kept.
        for i in 0..RAPID_RESET_BATCH {
            let how = if i % 2 == 0 { StreamEnd::ResetByPeer } else { StreamEnd::Other };
            assert_eq!(r.ended(t0, soon, how), None);
        }
        // Resets after a second are a client giving up, not an attack.
        for _ in 0..RAPID_RESET_BATCH {
            assert_eq!(r.ended(t0, late, StreamEnd::ResetByPeer), None);
        }
        // 251 of 500 reset within a second: throttled at the end of the batch.
        let mut verdicts = (0..RAPID_RESET_BATCH).map(|i| {
            let how = if i < 251 { StreamEnd::ResetByPeer } else { StreamEnd::Other };
            r.ended(t0, soon, how)
        });
        assert!(verdicts.by_ref().take(RAPID_RESET_BATCH as usize - 1).all(|v| v.is_none()));
        assert_eq!(verdicts.next(), Some(Some(Verdict::Throttle { early: 251, until: soon + THROTTLE_FOR })));
        assert!(r.throttled(soon) && !r.admit(soon), "new streams are refused while throttled");
        assert!(!r.throttled(soon + THROTTLE_FOR) && r.admit(soon + THROTTLE_FOR), "and admitted after");
    }

    fn batch(r: &StreamRules, opened: Instant, how: StreamEnd) -> Vec<Verdict> {
        (0..RAPID_RESET_BATCH).filter_map(|_| r.ended(opened, opened + Duration::from_millis(5), how)).collect()
    }

    #[test]
    fn relayed_client_aborts_are_not_the_peers_doing() {
        let t0 = Instant::now();
        let r = StreamRules::new(DEFAULT_PEER_FLOW_RATE, t0);
        for _ in 0..10 {
            assert_eq!(batch(&r, t0, StreamEnd::RelayedAbort), vec![]);
        }
        assert!(r.admit(t0));
    }

    #[test]
    fn a_peer_that_keeps_resetting_is_closed_at_the_third_strike_only() {
        let t0 = Instant::now();
        let r = StreamRules::new(DEFAULT_PEER_FLOW_RATE, t0);
        let v1 = batch(&r, t0, StreamEnd::ResetByPeer);
        assert!(matches!(v1[..], [Verdict::Throttle { early: 500, .. }]), "{v1:?}");
        let v2 = batch(&r, t0 + Duration::from_secs(1), StreamEnd::ResetByPeer);
        assert!(matches!(v2[..], [Verdict::Throttle { .. }]), "{v2:?}");
        let v3 = batch(&r, t0 + Duration::from_secs(2), StreamEnd::ResetByPeer);
        assert_eq!(v3, vec![Verdict::Close { early: 500 }]);
        // Once: the streams still ending while the connection closes do not fire it again.
        assert!(batch(&r, t0 + Duration::from_secs(3), StreamEnd::ResetByPeer).is_empty());
    }

    #[test]
    fn strikes_far_apart_only_throttle() {
        let t0 = Instant::now();
        let r = StreamRules::new(DEFAULT_PEER_FLOW_RATE, t0);
        for i in 0..5u64 {
            let at = t0 + (STRIKE_WINDOW / 2 + Duration::from_secs(1)) * i as u32 * 2;
            let v = batch(&r, at, StreamEnd::ResetByPeer);
            assert!(matches!(v[..], [Verdict::Throttle { .. }]), "trip {i}: {v:?}");
        }
    }
}
