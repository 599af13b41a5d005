//! A token bucket with time passed in: the peer flow rate (`abuse`) and the document rate.

use std::time::Instant;

/// A rate: a burst, then a steady rate.
#[derive(Debug, Clone, Copy)]
pub struct RateGate {
    pub burst: f64,
    pub per_second: f64,
}

/// One sender's bucket under a [`RateGate`].
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(gate: RateGate, now: Instant) -> Self {
        Self { tokens: gate.burst, at: now }
    }

    /// Takes one token if there is one at `now`.
    pub fn take(&mut self, gate: RateGate, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * gate.per_second).min(gate.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_sender_gets_a_burst_then_the_steady_rate() {
        let gate = RateGate { burst: 3.0, per_second: 2.0 };
        let t0 = Instant::now();
        let mut b = Bucket::full(gate, t0);
        assert!((0..3).all(|_| b.take(gate, t0)));
        assert!(!b.take(gate, t0));
        assert!(b.take(gate, t0 + Duration::from_millis(500)));
        assert!(!b.take(gate, t0 + Duration::from_millis(600)));
    }
}
