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
//! - **Rapid reset closes the connection.** Streams are tallied as they end, in batches of
//!   [`RAPID_RESET_BATCH`]; when more than half of a batch were reset by the peer within
//!   [`RAPID_RESET_AGE`] of opening, the connection is closed with `H3_EXCESSIVE_LOAD`, logged and
//!   counted. An honest peer resets streams only when its clients give up, never most of them
//!   within a second.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Streams are judged in batches of this many (counted as they end).
pub const RAPID_RESET_BATCH: u32 = 500;
/// A stream reset by the peer this soon after it was opened counts as a rapid reset.
pub const RAPID_RESET_AGE: Duration = Duration::from_secs(1);
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
    tokens: f64,
    refilled: Instant,
    ended: u32,
    early_resets: u32,
    /// The rule fired: the connection is closing, later streams are not judged again.
    fired: bool,
}

/// How a stream from the peer ended, for the rapid-reset tally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Reset (or abandoned before its headers completed) by the peer.
    ResetByPeer,
    /// Anything else: completed, refused by us, reset by the backend.
    Other,
}

impl StreamRules {
    /// `rate` new flows per second (at least 1), with a burst of one second's worth.
    pub fn new(rate: u32, now: Instant) -> Self {
        let rate = f64::from(rate.max(1));
        Self { rate, state: Mutex::new(State { tokens: rate, refilled: now, ended: 0, early_resets: 0, fired: false }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new flow from the peer at `now`: whether it may go ahead.
    pub fn admit(&self, now: Instant) -> bool {
        let mut s = self.state();
        let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
        s.tokens = (s.tokens + elapsed * self.rate).min(self.rate);
        s.refilled = now;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// A stream opened at `opened` ended at `now`. Returns the batch's rapid resets when they are
    /// more than half of a full batch: the connection must be closed. Fires once per connection.
    pub fn ended(&self, opened: Instant, now: Instant, how: StreamEnd) -> Option<u32> {
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
        let fire = early * 2 > RAPID_RESET_BATCH && !s.fired;
        s.fired |= fire;
        fire.then_some(early)
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
        // 251 of 500 reset within a second: closed at the end of the batch.
        let mut verdicts = (0..RAPID_RESET_BATCH).map(|i| {
            let how = if i < 251 { StreamEnd::ResetByPeer } else { StreamEnd::Other };
            r.ended(t0, soon, how)
        });
        assert!(verdicts.by_ref().take(RAPID_RESET_BATCH as usize - 1).all(|v| v.is_none()));
        assert_eq!(verdicts.next(), Some(Some(251)));
        // Once: the streams still ending while the connection closes do not fire it again.
        assert!((0..2 * RAPID_RESET_BATCH).all(|_| r.ended(t0, soon, StreamEnd::ResetByPeer).is_none()));
    }
}
