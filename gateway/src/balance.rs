//! Choosing an endpoint for an HTTP request: power of two choices over peak-EWMA latency ×
//! outstanding requests (Linkerd's balancer), with passive health — outlier ejection of endpoints
//! that fail in a row, for a time that grows with each ejection, never more than half of them.
//!
//! Per service, per endpoint: a latency estimate that jumps up at once to a slower response and
//! decays toward faster ones with a 10 s time constant, the requests in flight, and the failure
//! streak. Written by hand: tower's balancer works on tower `Service`s and discovery streams, not
//! on the endpoint list and health flags the overlay already keeps.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;

/// Decay time constant of the latency estimate.
const DECAY: Duration = Duration::from_secs(10);
/// Failures in a row (5xx or connect failures) that eject an endpoint.
pub const CONSECUTIVE_FAILURES: u32 = 5;
/// First ejection time; the n-th ejection lasts n times this (at most [`MAX_EJECTION`]), ±10 %.
pub const BASE_EJECTION: Duration = Duration::from_secs(30);
pub const MAX_EJECTION: Duration = Duration::from_secs(300);
/// At most this share of a service's endpoints is ejected at once.
pub const MAX_EJECTED_SHARE: f64 = 0.5;

#[derive(Debug, Default)]
struct Stats {
    /// Peak-EWMA latency in seconds, and when it was last updated.
    ewma: f64,
    updated: Option<Instant>,
    in_flight: u32,
    streak: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl Stats {
    fn cost(&self) -> f64 {
        self.ewma * f64::from(self.in_flight + 1)
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }
}

/// What happened to one request, for the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx from the endpoint, or no connection to it.
    Failure,
}

/// Balancer state of every endpoint of every service.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Mutex<HashMap<SocketAddr, Stats>>,
    base_ejection: Duration,
}

impl Balancer {
    pub fn new(base_ejection: Duration) -> Self {
        Self { endpoints: Mutex::new(HashMap::new()), base_ejection }
    }

    /// Forgets the endpoints not in `keep` (the configured ones, after a reload).
    pub fn retain(&self, keep: &[SocketAddr]) {
        let mut m = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|a, _| keep.contains(a));
    }

    /// Picks one of `healthy` (the endpoints the active checks pass) for a new request; `None`
    /// when there is none. The pick counts as in flight until [`Balancer::done`].
    pub fn pick(&self, healthy: &[SocketAddr]) -> Option<SocketAddr> {
        let now = Instant::now();
        let mut map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let ejected = healthy.iter().filter(|a| map.get(a).is_some_and(|s| s.ejected(now))).count();
        // Ejections beyond the allowed share do not apply (a whole service is never ejected).
        let honour = (ejected as f64) <= (healthy.len() as f64 * MAX_EJECTED_SHARE).floor();
        let usable: Vec<SocketAddr> =
            healthy.iter().copied().filter(|a| !honour || !map.get(a).is_some_and(|s| s.ejected(now))).collect();
        let chosen = match usable.len() {
            0 => return None,
            1 => usable[0],
            n => {
                let mut rng = rand::rng();
                let i = rng.random_range(0..n);
                let j = (i + rng.random_range(1..n)) % n;
                let cost = |a: &SocketAddr| map.get(a).map(Stats::cost).unwrap_or(0.0);
                if cost(&usable[j]) < cost(&usable[i]) {
                    usable[j]
                } else {
                    usable[i]
                }
            }
        };
        map.entry(chosen).or_default().in_flight += 1;
        Some(chosen)
    }

    /// A request to `addr` ended after `took`; returns whether this ejected the endpoint.
    pub fn done(&self, addr: SocketAddr, took: Duration, outcome: Outcome) -> bool {
        let now = Instant::now();
        let mut map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let s = map.entry(addr).or_default();
        s.in_flight = s.in_flight.saturating_sub(1);
        let sample = took.as_secs_f64();
        s.ewma = match s.updated {
            Some(t) if sample < s.ewma => {
                let w = (-now.saturating_duration_since(t).as_secs_f64() / DECAY.as_secs_f64()).exp();
                s.ewma * w + sample * (1.0 - w)
            }
            _ => sample,
        };
        s.updated = Some(now);
        match outcome {
            Outcome::Success => {
                s.streak = 0;
                false
            }
            Outcome::Failure => {
                s.streak += 1;
                if s.streak < CONSECUTIVE_FAILURES {
                    return false;
                }
                s.streak = 0;
                s.ejections += 1;
                let base = (self.base_ejection * s.ejections).min(MAX_EJECTION);
                let jitter: f64 = rand::rng().random_range(0.9..1.1);
                s.ejected_until = Some(now + base.mul_f64(jitter));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn the_faster_endpoint_takes_most_requests() {
        let b = Balancer::new(BASE_EJECTION);
        let eps = [addr(1), addr(2)];
        let mut fast = 0;
        for _ in 0..1000 {
            let a = b.pick(&eps).unwrap();
            let took = if a == addr(1) { Duration::from_millis(2) } else { Duration::from_millis(52) };
            if a == addr(1) {
                fast += 1;
            }
            b.done(a, took, Outcome::Success);
        }
        assert!(fast >= 900, "{fast} of 1000 to the fast endpoint");
    }

    #[test]
    fn five_failures_in_a_row_eject_but_never_more_than_half() {
        let b = Balancer::new(Duration::from_secs(60));
        let eps = [addr(1), addr(2)];
        for i in 0..CONSECUTIVE_FAILURES {
            assert_eq!(b.done(addr(1), Duration::from_millis(1), Outcome::Failure), i + 1 == CONSECUTIVE_FAILURES);
        }
        assert!((0..100).all(|_| {
            let a = b.pick(&eps).unwrap();
            b.done(a, Duration::from_millis(1), Outcome::Success);
            a == addr(2)
        }));
        // Both failing: only one may be out at a time.
        for _ in 0..CONSECUTIVE_FAILURES {
            b.done(addr(2), Duration::from_millis(1), Outcome::Failure);
        }
        assert!(b.pick(&eps).is_some(), "a whole service ejected");
    }
}
