//! The path model of a peer connection's congestion controller (`transport::congestion`): the
//! path minimum RTT, the bottleneck bandwidth and our own ProbeRTT, as plain data fed by the
//! controller's callbacks with `now` passed in, so tests drive it with any timeline.
//!
//! quinn 0.11's BBR sizes its window as `gain × bandwidth × min_rtt`, and takes `min_rtt` from the
//! connection's RTT estimator, whose minimum is the smallest RTT the connection *ever* saw. A peer
//! connection lives for days; when its path gets longer (a route change, a failover to a farther
//! link) the window stays sized for the old path and throughput collapses (BENCHMARKS.md, B1r:
//! 0.01 Gbit/s at 50 ms after starting at 0.1 ms). BBR's design (Linux `tcp_bbr.c`, the IETF
//! draft) keeps min RTT in a 10 s window instead, refreshed by ProbeRTT.
//!
//! `transport::congestion::PathBbr` wraps quinn's `Bbr` unchanged and keeps its own path minimum RTT ([`PathModel`]):
//!
//! - **Clean samples only.** An RTT sample counts only if its packet was sent while at most
//!   [`CLEAN_PACKETS`] packets were in flight, so our own queue cannot inflate it. Counting every
//!   sample was tried first and ran away: queueing raised the samples, the window followed, the
//!   queue grew. Idle and lightly used connections (pings) give clean samples all the time; a busy
//!   one gives them while BBR's ProbeRTT, or ours, drains it.
//! - **A 10 s window, as BBR's.** A clean sample replaces the minimum when it is lower, or when the
//!   minimum is older than [`MIN_RTT_WINDOW`]; and a whole [`EPOCH`] of clean samples above it
//!   raises it at once (clean samples need no long window to wash out queueing).
//! - **Stretched mode.** Once the path minimum is at least twice the lifetime minimum (and 1 ms
//!   above it), quinn's window is sized for a path that no longer exists; the window becomes
//!   `max(quinn's, 2 × bottleneck bandwidth × path min RTT)`, where the bandwidth is the highest
//!   per-round delivery rate of the last [`BW_ROUNDS`] rounds. While stretched, the model runs its own
//!   ProbeRTT every [`MIN_RTT_WINDOW`] (window of [`CLEAN_PACKETS`] until the pipe drained, then
//!   [`PROBE_HOLD`] or one RTT), so the path minimum can also come back down. Loss cuts the
//!   bandwidth estimate by 30 % once a round (BBRv2's response): a stretched window must not keep
//!   a receiver's socket buffer or a shallow bottleneck overflowing.
//!
//! Unstretched, the window is exactly quinn's: nothing changes on a path whose RTT never grew.
//!
//! **A silent path is probed at a steady pace.** When no acknowledgement has arrived for two
//! [`SILENCE_PROBE`] intervals while packets are in flight, the window grants one more MTU per
//! interval beyond what was in flight. RFC 9002's probe timeout doubles after every unanswered probe,
//! so on a WAN link that flaps (dark 2 s of every 5 s) the probes walk into the dark windows and the
//! whole connection — flows and control pings alike, all behind a full window — stalls for 5 s and
//! more: long enough for the peer to be closed as dead (found by the fault suite, `tests/impair.rs`).
//! One packet per interval (≤ 1 MTU per 200 ms, ~60 kbit/s, only while silent) carries whatever is
//! queued first, the peer acknowledges it at once, and recovery starts within an interval of the
//! path coming back. Writers on the connection wake quinn (control pings every 100 ms), so the larger
//! window is seen.
//!

use std::time::{Duration, Instant};

/// An RTT sample is clean when at most this many full-size packets were in flight as it was sent.
pub const CLEAN_PACKETS: u64 = 4;
/// How long a path minimum stands without a lower clean sample (BBR's min RTT filter window).
pub const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// Clean samples are also gathered in epochs of this length: when a whole epoch of them (at least
/// [`EPOCH_SAMPLES`]) lies above the path minimum, the path got longer and its minimum rises at
/// once, instead of after [`MIN_RTT_WINDOW`]. Safe because clean samples carry no queue of ours;
/// an idle or lightly used connection (pings every 100 ms) notices a longer path within 2 s.
pub const EPOCH: Duration = Duration::from_secs(1);
pub const EPOCH_SAMPLES: u32 = 8;
/// How long our ProbeRTT holds the window at [`CLEAN_PACKETS`] once the pipe drained (BBR's 200 ms).
pub const PROBE_HOLD: Duration = Duration::from_millis(200);
/// Rounds of delivery-rate samples the bandwidth max filter keeps (BBR's 10).
pub const BW_ROUNDS: usize = 10;
/// A busy connection whose smoothed RTT is this many times its path minimum (and
/// [`STRETCH_MARGIN`] above it) may be on a longer path: a short probe (drain, then one RTT of
/// clean samples) checks, at most once per [`SUSPECT_INTERVAL`]. A window of 2 × BDP cannot queue
/// that much by itself.
const SUSPECT_RATIO: u32 = 3;
pub const SUSPECT_INTERVAL: Duration = Duration::from_secs(2);
/// On loss while stretched, the bandwidth estimate is multiplied by this, at most once a round
/// (BBRv2's beta): the stretched window must not keep a full socket buffer or a shallow bottleneck
/// overflowing — quinn's own recovery does not bound it.
const LOSS_BETA: f64 = 0.7;
/// The window's gain over the bandwidth-delay product while stretched (BBR's ProbeBW cwnd gain).
const CWND_GAIN: f64 = 2.0;
/// Stretched from this ratio of path to lifetime minimum RTT; back to quinn's window below the next
/// (or below half the margin).
const STRETCH_ON: f64 = 2.0;
const STRETCH_OFF: f64 = 1.5;
/// ...and only when the path minimum exceeds the lifetime minimum by this much: below it, quinn's
/// minimum window already covers the difference.
const STRETCH_MARGIN: Duration = Duration::from_millis(1);

/// A path with packets in flight and no acknowledgement for two of these (or two smoothed RTTs, if
/// longer) is silent: the window grants one MTU per interval from then on (module documentation).
pub const SILENCE_PROBE: Duration = Duration::from_millis(200);

/// Our own ProbeRTT: every [`MIN_RTT_WINDOW`] while stretched, or when the path looks longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Off,
    /// Window held small until in-flight falls to [`CLEAN_PACKETS`]; then hold for this long.
    Draining(Duration),
    /// Pipe drained: hold until then, collecting clean samples.
    Holding(Instant),
}

/// The path minimum RTT, bottleneck bandwidth and ProbeRTT state, fed by the controller callbacks.
/// Plain data, so tests can drive it with any timeline.
#[derive(Debug, Clone)]
pub struct PathModel {
    mtu: u64,
    in_flight: u64,
    /// Since when in-flight has stayed at or below the clean limit; `None` while above it.
    clean_since: Option<Instant>,
    /// The path minimum RTT and when it was taken (or last confirmed by a ProbeRTT).
    path_min: Option<(Duration, Instant)>,
    lifetime_min: Option<Duration>,
    /// The current epoch of clean samples: when it began, their minimum and count.
    epoch: (Instant, Duration, u32),
    /// The current round began when this packet send time was reached.
    round_start: Instant,
    round_bytes: u64,
    /// Delivery rate (bytes/s) of the last rounds.
    bw: [u64; BW_ROUNDS],
    bw_next: usize,
    /// Rounds completed, and the last round whose loss already cut the bandwidth estimate.
    rounds: u64,
    cut_round: Option<u64>,
    stretched: bool,
    probe: Probe,
    /// The lowest clean sample of the current probe.
    probe_min: Option<Duration>,
    last_probe: Option<Instant>,
    srtt: Duration,
    /// When the last acknowledgement was processed, and the bytes sent since the path fell silent.
    last_ack: Instant,
    silence_sent: u64,
    /// Packets sent as silence probes over the connection's life.
    silence_probes: u64,
}

impl PathModel {
    pub fn new(now: Instant, mtu: u16) -> Self {
        Self {
            mtu: u64::from(mtu),
            in_flight: 0,
            clean_since: Some(now),
            path_min: None,
            lifetime_min: None,
            epoch: (now, Duration::MAX, 0),
            round_start: now,
            round_bytes: 0,
            bw: [0; BW_ROUNDS],
            bw_next: 0,
            rounds: 0,
            cut_round: None,
            stretched: false,
            probe: Probe::Off,
            probe_min: None,
            last_probe: None,
            srtt: Duration::ZERO,
            last_ack: now,
            silence_sent: 0,
            silence_probes: 0,
        }
    }

    fn clean_limit(&self) -> u64 {
        CLEAN_PACKETS * self.mtu
    }

    pub fn on_sent(&mut self, now: Instant, bytes: u64) {
        if self.silent_probes(now) > 0 {
            self.silence_sent += bytes;
            self.silence_probes += 1;
        }
        self.in_flight += bytes;
        if self.in_flight > self.clean_limit() {
            self.clean_since = None;
        }
    }

    /// One packet acknowledged. `lifetime_min` is the connection's all-time minimum RTT, `srtt`
    /// its smoothed RTT.
    pub fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        lifetime_min: Duration,
        srtt: Duration,
    ) {
        self.lifetime_min = Some(lifetime_min);
        self.srtt = srtt;
        if self.clean_since.is_some_and(|t| sent >= t) {
            let sample = now.saturating_duration_since(sent);
            if self.probe != Probe::Off {
                self.probe_min = Some(self.probe_min.map_or(sample, |m| m.min(sample)));
            }
            let (began, epoch_min, count) = self.epoch;
            if now.saturating_duration_since(began) >= EPOCH {
                if let Some((min, _)) = self.path_min {
                    if count >= EPOCH_SAMPLES && epoch_min > min {
                        self.path_min = Some((epoch_min, now));
                    }
                }
                self.epoch = (now, sample, 1);
            } else {
                self.epoch = (began, epoch_min.min(sample), count + 1);
            }
            let expired = self.path_min.is_none_or(|(_, at)| now.saturating_duration_since(at) > MIN_RTT_WINDOW);
            if expired || self.path_min.is_some_and(|(min, _)| sample < min) {
                self.path_min = Some((sample, now));
            }
        }
        // A round ends when a packet sent after it began is acknowledged: its delivery rate is
        // one bandwidth sample. An application-limited round counts only if it raises the max.
        self.round_bytes += bytes;
        if sent >= self.round_start {
            let secs = now.saturating_duration_since(self.round_start).as_secs_f64();
            if secs > 0.0 {
                let rate = (self.round_bytes as f64 / secs) as u64;
                if !app_limited || rate > self.max_bw() {
                    self.bw[self.bw_next] = rate;
                    self.bw_next = (self.bw_next + 1) % BW_ROUNDS;
                }
            }
            self.round_start = now;
            self.round_bytes = 0;
            self.rounds += 1;
        }
    }

    /// The end of an ACK frame's processing: `in_flight` is exact here.
    pub fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool) {
        self.in_flight = in_flight;
        self.last_ack = now;
        self.silence_sent = 0;
        if in_flight <= self.clean_limit() {
            self.clean_since.get_or_insert(now);
        } else {
            self.clean_since = None;
        }
        let Some(lifetime) = self.lifetime_min else { return };
        // Until a clean sample is taken, start from the connection's own minimum.
        let (path_min, taken) = *self.path_min.get_or_insert((lifetime, now));
        let ratio = path_min.as_secs_f64() / lifetime.as_secs_f64().max(1e-6);
        if !self.stretched && ratio >= STRETCH_ON && path_min >= lifetime + STRETCH_MARGIN {
            self.stretched = true;
        } else if self.stretched && (ratio < STRETCH_OFF || path_min < lifetime + STRETCH_MARGIN / 2) {
            self.stretched = false;
        }
        match self.probe {
            Probe::Off if !app_limited => {
                let due = self.stretched && now.saturating_duration_since(taken) > MIN_RTT_WINDOW;
                let suspect = self.srtt > path_min * SUSPECT_RATIO
                    && self.srtt >= path_min + STRETCH_MARGIN
                    && self.last_probe.is_none_or(|t| now.saturating_duration_since(t) >= SUSPECT_INTERVAL);
                if due || suspect {
                    // A due probe holds as BBR's does; a suspect one for one RTT of the longer path.
                    let hold = if due { PROBE_HOLD.max(path_min) } else { self.srtt + self.srtt / 4 };
                    self.probe = Probe::Draining(hold);
                    self.probe_min = None;
                    self.last_probe = Some(now);
                }
            }
            Probe::Draining(hold) if in_flight <= self.clean_limit() => {
                self.probe = Probe::Holding(now + hold);
            }
            Probe::Holding(until) if now >= until => {
                self.probe = Probe::Off;
                // Lower samples already replaced the minimum; samples all above it mean the path
                // got longer (the pipe was drained: no queue of ours in them). Either way the
                // probe confirmed the minimum, and the next due probe is a window away.
                let min = match self.probe_min.take() {
                    Some(probed) if probed > path_min => probed,
                    _ => path_min,
                };
                self.path_min = Some((min, now));
            }
            _ => {}
        }
    }

    /// Persistent congestion: the bandwidth samples no longer describe the path.
    pub fn on_persistent_congestion(&mut self, lost_bytes: u64) {
        self.in_flight = self.in_flight.saturating_sub(lost_bytes);
        self.bw = [0; BW_ROUNDS];
    }

    /// Packets were lost: while stretched, cut the bandwidth estimate (once a round).
    pub fn on_loss(&mut self, lost_bytes: u64) {
        self.in_flight = self.in_flight.saturating_sub(lost_bytes);
        if self.stretched && self.cut_round != Some(self.rounds) {
            self.cut_round = Some(self.rounds);
            for b in &mut self.bw {
                *b = (*b as f64 * LOSS_BETA) as u64;
            }
        }
    }

    pub fn on_mtu_update(&mut self, mtu: u16) {
        self.mtu = u64::from(mtu);
    }

    fn max_bw(&self) -> u64 {
        self.bw.iter().copied().max().unwrap_or(0)
    }

    /// How many silence probes the path has earned by `now`: none while acknowledgements arrive or
    /// nothing is in flight, then one per interval from the second interval of silence on.
    fn silent_probes(&self, now: Instant) -> u64 {
        if self.in_flight == 0 {
            return 0;
        }
        let interval = SILENCE_PROBE.max(self.srtt);
        let silent = now.saturating_duration_since(self.last_ack);
        (silent.as_nanos() / interval.as_nanos()).saturating_sub(1) as u64
    }

    /// The window to use at `now` given quinn's.
    pub fn window(&self, now: Instant, bbr_window: u64) -> u64 {
        let window = self.steady_window(bbr_window);
        match self.silent_probes(now) {
            0 => window,
            // quinn sends while `in_flight + MTU < window`: this admits `probes` MTUs beyond what
            // was in flight when the path fell silent, and no more.
            probes => window.max(self.in_flight - self.silence_sent.min(self.in_flight)) + probes * self.mtu + 1,
        }
    }

    fn steady_window(&self, bbr_window: u64) -> u64 {
        if self.probe != Probe::Off {
            return self.clean_limit();
        }
        if !self.stretched {
            return bbr_window;
        }
        let path_min = self.path_min.map(|(m, _)| m).unwrap_or_default();
        let bdp = self.max_bw() as f64 * path_min.as_secs_f64();
        bbr_window.max((CWND_GAIN * bdp) as u64).max(self.clean_limit())
    }

    /// The path minimum RTT, if any clean sample was taken.
    pub fn path_min_rtt(&self) -> Option<Duration> {
        self.path_min.map(|(m, _)| m)
    }

    pub fn stretched(&self) -> bool {
        self.stretched
    }

    /// Packets sent as silence probes so far.
    pub fn silence_probes(&self) -> u64 {
        self.silence_probes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTU: u16 = 1200;
    const PKT: u64 = 1200;

    /// Drives the model like a sender on a path of `rtt` and `rate` bytes/s with the window the
    /// model allows, for `dur`; returns the end time. quinn's window is `bbr`, except in its
    /// ProbeRTT: 4 packets for the last 300 ms of every 10 s of the run.
    fn run(m: &mut PathModel, start: Instant, dur: Duration, rtt: Duration, rate: u64, bbr: u64) -> Instant {
        let bbr_at = |now: Instant| {
            if now.duration_since(start).as_millis() % 10_000 >= 9_700 {
                4 * PKT
            } else {
                bbr
            }
        };
        // Packets in flight, as (sent, due) where due = sent + rtt + queueing at the bottleneck.
        let mut flight: std::collections::VecDeque<(Instant, Instant)> = Default::default();
        let tick = Duration::from_micros(200);
        let per_tick = ((rate as f64 * tick.as_secs_f64()) / PKT as f64).max(1.0) as usize;
        let mut now = start;
        let mut link_free = start;
        let mut srtt = rtt;
        while now < start + dur {
            let mut acked = false;
            while flight.front().is_some_and(|&(_, due)| due <= now) {
                let (sent, _) = flight.pop_front().unwrap();
                srtt = (srtt * 7 + (now - sent)) / 8;
                m.on_ack(now, sent, PKT, false, Duration::from_micros(100), srtt);
                acked = true;
            }
            if acked {
                m.on_end_acks(now, flight.len() as u64 * PKT, false);
            }
            let mut sent_now = 0;
            while (flight.len() as u64 + 1) * PKT <= m.window(now, bbr_at(now)) && sent_now < per_tick * 4 {
                // The bottleneck serialises packets at `rate`: a standing queue delays them.
                link_free = link_free.max(now) + Duration::from_secs_f64(PKT as f64 / rate as f64);
                flight.push_back((now, link_free + rtt));
                m.on_sent(now, PKT);
                sent_now += 1;
            }
            now += tick;
        }
        now
    }

    #[test]
    fn a_path_that_never_grew_keeps_quinns_window() {
        let t0 = Instant::now();
        let mut m = PathModel::new(t0, MTU);
        let t = run(&mut m, t0, Duration::from_secs(3), Duration::from_micros(100), 100_000_000, 64 * PKT);
        assert!(!m.stretched());
        assert_eq!(m.window(t, 64 * PKT), 64 * PKT);
    }

    #[test]
    fn a_busy_connection_follows_a_longer_path_within_three_seconds() {
        let t0 = Instant::now();
        let mut m = PathModel::new(t0, MTU);
        let rate = 50_000_000; // 400 Mbit/s
        let t = run(&mut m, t0, Duration::from_secs(1), Duration::from_micros(100), rate, 16 * PKT);
        // The path becomes 50 ms long; quinn's window stays sized for 0.1 ms (16 packets), and the
        // connection stays busy: only a suspect probe gives clean samples before BBR's own ProbeRTT.
        let t = run(&mut m, t, Duration::from_secs(3), Duration::from_millis(50), rate, 16 * PKT);
        assert!(m.stretched());
        let min = m.path_min_rtt().unwrap();
        assert!(min >= Duration::from_millis(50) && min < Duration::from_millis(60), "path min {min:?}");
        // About 2 × BDP (2.5 MB at 50 ms): far above quinn's 19 KB.
        let w = m.window(t, 16 * PKT);
        assert!(w > 3_000_000 && w < 8_000_000, "window {w}");
        // Keep going: the window stays bounded and the minimum does not creep up with the queue.
        let t = run(&mut m, t, Duration::from_secs(25), Duration::from_millis(50), rate, 16 * PKT);
        let min = m.path_min_rtt().unwrap();
        assert!(min < Duration::from_millis(60), "path min crept up to {min:?}");
        let w = m.window(t, 16 * PKT);
        assert!(w < 8_000_000, "window ran away: {w}");
    }

    #[test]
    fn an_idle_connection_notices_a_longer_path_within_two_seconds() {
        // Pings every 100 ms, answered at once (no data: the connection is application-limited).
        let t0 = Instant::now();
        let mut m = PathModel::new(t0, MTU);
        let ping = |m: &mut PathModel, at: Instant, rtt: Duration| {
            m.on_sent(at, 40);
            m.on_ack(at + rtt, at, 40, true, Duration::from_micros(100), rtt);
            m.on_end_acks(at + rtt, 0, true);
        };
        let mut at = t0;
        for _ in 0..50 {
            ping(&mut m, at, Duration::from_micros(100));
            at += Duration::from_millis(100);
        }
        assert!(!m.stretched());
        let longer = at;
        while !m.stretched() {
            ping(&mut m, at, Duration::from_millis(30));
            at += Duration::from_millis(100);
            assert!(at - longer < Duration::from_secs(2), "not stretched after {:?}", at - longer);
        }
        assert_eq!(m.path_min_rtt(), Some(Duration::from_millis(30)));
    }

    #[test]
    fn loss_while_stretched_cuts_the_window_once_a_round() {
        let t0 = Instant::now();
        let mut m = PathModel::new(t0, MTU);
        let t = run(&mut m, t0, Duration::from_secs(3), Duration::from_millis(50), 50_000_000, 16 * PKT);
        assert!(m.stretched());
        let before = m.window(t, 16 * PKT);
        m.on_loss(0);
        let once = m.window(t, 16 * PKT);
        assert!((once as f64) < before as f64 * 0.75, "{before} -> {once}");
        // More loss in the same round cuts nothing more.
        m.on_loss(0);
        assert_eq!(m.window(t, 16 * PKT), once);
        // Loss every round: the window falls back towards quinn's.
        let mut at = t;
        for _ in 0..30 {
            m.on_ack(
                at + Duration::from_millis(50),
                at,
                PKT,
                false,
                Duration::from_micros(100),
                Duration::from_millis(50),
            );
            m.on_loss(0);
            at += Duration::from_millis(51);
        }
        let w = m.steady_window(16 * PKT);
        assert!(w < before / 10, "window {w} after 30 lossy rounds");
    }

    #[test]
    fn a_path_that_shortens_again_returns_to_quinns_window() {
        let t0 = Instant::now();
        let mut m = PathModel::new(t0, MTU);
        let rate = 20_000_000;
        let t = run(&mut m, t0, Duration::from_secs(11), Duration::from_millis(20), rate, 16 * PKT);
        assert!(m.stretched());
        // Back to 0.1 ms: a lower clean sample is taken at once, the stretch ends.
        let t = run(&mut m, t, Duration::from_secs(12), Duration::from_micros(100), rate, 16 * PKT);
        assert!(!m.stretched());
        assert_eq!(m.window(t, 16 * PKT), 16 * PKT);
    }

    #[test]
    fn a_silent_path_is_probed_once_an_interval_whatever_the_window() {
        let t0 = Instant::now();
        let mut m = PathModel::new(t0, MTU);
        // A full window in flight (quinn's: 64 packets), acknowledged at t0, then nothing comes back.
        for _ in 0..64 {
            m.on_sent(t0, PKT);
        }
        m.on_end_acks(t0, 64 * PKT, false);
        // quinn sends a packet while `in_flight + MTU < window`.
        let can_send = |m: &PathModel, at: Instant| m.in_flight + PKT < m.window(at, 64 * PKT);
        let ms = |n| t0 + Duration::from_millis(n);
        assert!(!can_send(&m, ms(100)) && !can_send(&m, ms(399)), "probing before two intervals of silence");
        let mut sent = 0;
        for step in (400..=5_000).step_by(10) {
            while can_send(&m, ms(step)) {
                m.on_sent(ms(step), PKT);
                sent += 1;
            }
            // One probe per 200 ms from 400 ms on: never ahead of that pace.
            assert!(sent <= (step - 200) / 200, "{sent} probes by {step} ms");
        }
        assert_eq!(sent, 24, "one probe per interval from 400 ms to 5 s");
        assert_eq!(m.silence_probes(), 24);
        // An acknowledgement ends the silence: quinn's window again, exactly.
        m.on_end_acks(ms(5_000), 30 * PKT, false);
        assert_eq!(m.window(ms(5_000), 64 * PKT), 64 * PKT);
        // Nothing in flight is not silence.
        m.on_end_acks(ms(5_010), 0, true);
        assert_eq!(m.window(ms(9_000), 64 * PKT), 64 * PKT);
    }
}
