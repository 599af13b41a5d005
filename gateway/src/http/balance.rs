//! Choosing an endpoint for an HTTP request: power of two choices over peak-EWMA latency ×
//! outstanding requests (Linkerd's balancer) by default, or round robin, or consistent
//! (rendezvous) hashing on a key for affinity; whichever, with passive health — outlier ejection
//! of endpoints that fail in a row, for a time that grows with each ejection, never more than half
//! of them.
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
pub enum Answer {
    Success,
    /// A 5xx from the endpoint, or no connection to it.
    Failure,
}

/// Balancer state of every endpoint of every service.
#[derive(Debug)]
pub struct Balancer {
    endpoints: Mutex<HashMap<SocketAddr, Stats>>,
    /// The next turn of each round-robin service.
    turns: Mutex<HashMap<String, usize>>,
    base_ejection: Duration,
}

/// How one pick chooses among the usable endpoints.
#[derive(Debug, Clone, Copy)]
pub enum Choice<'a> {
    /// Power of two choices over peak-EWMA × in flight.
    PowerOfTwo,
    /// The next in turn for this service.
    RoundRobin(&'a str),
    /// Rendezvous hashing: the endpoint whose hash with this key is highest. Removing or ejecting
    /// an endpoint moves only its own keys.
    Hash(&'a [u8]),
}

/// A stable 64-bit hash (FNV-1a) of the key and an endpoint: the same on every gateway and run.
fn rendezvous(key: &[u8], addr: &SocketAddr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |b: &[u8]| {
        for x in b {
            h ^= u64::from(*x);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(key);
    feed(addr.to_string().as_bytes());
    // FNV's low bits mix poorly for near-identical inputs; a final avalanche (splitmix64).
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Balancer {
    pub fn new(base_ejection: Duration) -> Self {
        Self { endpoints: Mutex::new(HashMap::new()), turns: Mutex::new(HashMap::new()), base_ejection }
    }

    /// Forgets the endpoints not in `keep` (the configured ones, after a reload).
    pub fn retain(&self, keep: &[SocketAddr]) {
        let mut m = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|a, _| keep.contains(a));
    }

    /// Picks one of `healthy` (the endpoints the active checks pass) for a new request; `None`
    /// when there is none. The pick counts as in flight until [`Balancer::done`].
    pub fn pick(&self, healthy: &[SocketAddr]) -> Option<SocketAddr> {
        self.pick_by(healthy, Choice::PowerOfTwo)
    }

    /// [`Balancer::pick`] by `choice`.
    pub fn pick_by(&self, healthy: &[SocketAddr], choice: Choice<'_>) -> Option<SocketAddr> {
        let now = Instant::now();
        let mut map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let ejected = healthy.iter().filter(|a| map.get(a).is_some_and(|s| s.ejected(now))).count();
        // Ejections beyond the allowed share do not apply (a whole service is never ejected).
        let honour = (ejected as f64) <= (healthy.len() as f64 * MAX_EJECTED_SHARE).floor();
        let usable: Vec<SocketAddr> =
            healthy.iter().copied().filter(|a| !honour || !map.get(a).is_some_and(|s| s.ejected(now))).collect();
        let chosen = match (usable.len(), choice) {
            (0, _) => return None,
            (1, _) => usable[0],
            (n, Choice::RoundRobin(service)) => {
                let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
                let t = turns.entry(service.to_string()).or_insert(0);
                // In a stable order, whatever order the caller listed them in.
                let mut sorted = usable.clone();
                sorted.sort();
                let e = sorted[*t % n];
                *t = t.wrapping_add(1);
                e
            }
            (_, Choice::Hash(key)) => *usable.iter().max_by_key(|a| rendezvous(key, a)).unwrap_or(&usable[0]),
            (n, Choice::PowerOfTwo) => {
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
    pub fn done(&self, addr: SocketAddr, took: Duration, outcome: Answer) -> bool {
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
            Answer::Success => {
                s.streak = 0;
                false
            }
            Answer::Failure => {
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
            b.done(a, took, Answer::Success);
        }
        assert!(fast >= 900, "{fast} of 1000 to the fast endpoint");
    }

    #[test]
    fn round_robin_takes_turns_and_hashing_keeps_a_key_on_its_endpoint() {
        let b = Balancer::new(BASE_EJECTION);
        let eps = [addr(1), addr(2), addr(3)];
        let turns: Vec<_> = (0..6).map(|_| b.pick_by(&eps, Choice::RoundRobin("s")).unwrap()).collect();
        assert_eq!(turns, [eps, eps].concat());
        // A key sticks to one endpoint; keys spread over all of them.
        let of = |k: &str, eps: &[SocketAddr]| b.pick_by(eps, Choice::Hash(k.as_bytes())).unwrap();
        let keys: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
        let before: Vec<_> = keys.iter().map(|k| of(k, &eps)).collect();
        assert!(keys.iter().zip(&before).all(|(k, e)| of(k, &eps) == *e));
        for e in eps {
            let n = before.iter().filter(|x| **x == e).count();
            assert!((60..=140).contains(&n), "{n} of 300 keys on {e}");
        }
        // Without endpoint 3, only its keys move.
        let fewer = [addr(1), addr(2)];
        for (k, e) in keys.iter().zip(&before) {
            if *e != addr(3) {
                assert_eq!(of(k, &fewer), *e, "{k} moved though its endpoint stayed");
            }
        }
    }

    #[test]
    fn five_failures_in_a_row_eject_but_never_more_than_half() {
        let b = Balancer::new(Duration::from_secs(60));
        let eps = [addr(1), addr(2)];
        for i in 0..CONSECUTIVE_FAILURES {
            assert_eq!(b.done(addr(1), Duration::from_millis(1), Answer::Failure), i + 1 == CONSECUTIVE_FAILURES);
        }
        assert!((0..100).all(|_| {
            let a = b.pick(&eps).unwrap();
            b.done(a, Duration::from_millis(1), Answer::Success);
            a == addr(2)
        }));
        // Both failing: only one may be out at a time.
        for _ in 0..CONSECUTIVE_FAILURES {
            b.done(addr(2), Duration::from_millis(1), Answer::Failure);
        }
        assert!(b.pick(&eps).is_some(), "a whole service ejected");
    }
}
