//! Rate-limited warnings for refusals a peer or a client can trigger at will.
//!
//! A refusal is counted every time (the metric carries the volume) but logged at most once per
//! second per call site, with how many were left out since the last line: a peer that sends 10,000
//! bad streams must not be able to write 10,000 log lines, nor hide other lines among them.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One call site's budget: a line per [`LogLimit::PERIOD`].
pub struct LogLimit {
    state: Mutex<State>,
}

struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    pub const PERIOD: Duration = Duration::from_secs(1);

    pub const fn new() -> Self {
        Self { state: Mutex::new(State { last: None, suppressed: 0 }) }
    }

    /// `Some(n)` when this event may be logged, `n` the events left out since the last line;
    /// `None` when it is to be left out.
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.last {
            Some(t) if now.saturating_duration_since(t) < Self::PERIOD => {
                s.suppressed += 1;
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.suppressed))
            }
        }
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// A `tracing::warn!` written at most once per second from this call site, with a `suppressed`
/// field counting the events left out before it.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimit = $crate::log_limit::LogLimit::new();
        if let Some(suppressed) = LIMIT.check(std::time::Instant::now()) {
            tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_with_the_count_left_out() {
        let l = LogLimit::new();
        let t0 = Instant::now();
        assert_eq!(l.check(t0), Some(0));
        for i in 1..100 {
            assert_eq!(l.check(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(l.check(t0 + Duration::from_millis(1000)), Some(99));
        assert_eq!(l.check(t0 + Duration::from_millis(1001)), None);
    }
}
