//! Per-peer path telemetry from the transport's cumulative counters: what changed since the last
//! sample (for counters), and the loss rate over a window long enough to mean something (for a
//! gauge and for `/peers`). Sans-IO: the control loop feeds it quinn's totals with `now`.
//!
//! The loss rate is packets declared lost over packets sent in a window of at least
//! [`WINDOW`] and [`WINDOW_PACKETS`] sent packets: short enough to show a lossy minute, long
//! enough that an idle connection's pings (about 20 packets a second) do not make it jump. The
//! transport declares a packet lost about one RTT after sending it, so a window's ratio lags its
//! sends by that much, and packets that carry only acknowledgements are never declared lost: on a
//! connection that mostly acknowledges, the rate reads low (`README.md`, "Metrics").

use std::time::{Duration, Instant};

/// Shortest window a loss rate is computed over.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Fewest packets sent in a window a loss rate is computed from.
pub const WINDOW_PACKETS: u64 = 200;

/// A connection's cumulative counters, as the transport reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub congestion_events: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

impl Totals {
    /// `self - earlier`, saturating (a counter never runs backwards on one connection).
    fn since(self, earlier: Totals) -> Totals {
        Totals {
            sent_packets: self.sent_packets.saturating_sub(earlier.sent_packets),
            lost_packets: self.lost_packets.saturating_sub(earlier.lost_packets),
            congestion_events: self.congestion_events.saturating_sub(earlier.congestion_events),
            sent_bytes: self.sent_bytes.saturating_sub(earlier.sent_bytes),
            received_bytes: self.received_bytes.saturating_sub(earlier.received_bytes),
        }
    }
}

/// What one sample says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Added to each counter since the previous sample.
    pub delta: Totals,
    /// The loss rate of the window that just closed, if one did.
    pub loss_ratio: Option<f64>,
}

/// The sampler of one connection.
#[derive(Debug, Clone)]
pub struct PathWindow {
    last: Totals,
    window: (Instant, Totals),
    ratio: Option<f64>,
}

impl PathWindow {
    pub fn new(now: Instant, totals: Totals) -> Self {
        Self { last: totals, window: (now, totals), ratio: None }
    }

    /// Takes the counters at `now`.
    pub fn sample(&mut self, now: Instant, totals: Totals) -> Sample {
        let delta = totals.since(self.last);
        self.last = totals;
        let w = totals.since(self.window.1);
        let mut loss_ratio = None;
        if now.saturating_duration_since(self.window.0) >= WINDOW && w.sent_packets >= WINDOW_PACKETS {
            let r = w.lost_packets as f64 / w.sent_packets as f64;
            loss_ratio = Some(r.min(1.0));
            self.ratio = loss_ratio;
            self.window = (now, totals);
        }
        Sample { delta, loss_ratio }
    }

    /// The loss rate of the last window that closed.
    pub fn loss_ratio(&self) -> Option<f64> {
        self.ratio
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(sent: u64, lost: u64) -> Totals {
        Totals { sent_packets: sent, lost_packets: lost, ..Default::default() }
    }

    #[test]
    fn counters_move_by_their_deltas_and_the_rate_waits_for_a_full_window() {
        let t0 = Instant::now();
        let mut w = PathWindow::new(t0, t(10, 0));
        let s = w.sample(t0 + Duration::from_millis(100), t(110, 5));
        assert_eq!((s.delta.sent_packets, s.delta.lost_packets), (100, 5));
        assert_eq!(s.loss_ratio, None, "a tenth of a second is no window");
        // A second but too few packets: still none.
        let s = w.sample(t0 + Duration::from_millis(1100), t(150, 6));
        assert_eq!(s.loss_ratio, None);
        // Enough of both: 10 lost of 200 sent since the window opened.
        let s = w.sample(t0 + Duration::from_millis(1200), t(210, 10));
        assert_eq!(s.loss_ratio, Some(0.05));
        assert_eq!(w.loss_ratio(), Some(0.05));
        // The next window starts there; the rate holds until it closes.
        let s = w.sample(t0 + Duration::from_millis(1300), t(260, 10));
        assert_eq!((s.loss_ratio, w.loss_ratio()), (None, Some(0.05)));
        let s = w.sample(t0 + Duration::from_millis(2300), t(410, 12));
        assert_eq!(s.loss_ratio, Some(0.01));
    }

    #[test]
    fn a_counter_that_seems_to_run_backwards_adds_nothing() {
        let t0 = Instant::now();
        let mut w = PathWindow::new(t0, t(500, 20));
        let s = w.sample(t0 + Duration::from_secs(2), t(400, 10));
        assert_eq!(s.delta, Totals::default());
        assert_eq!(s.loss_ratio, None);
    }
}
