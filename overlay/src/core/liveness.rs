//! Whether a peer connection is alive, sans-IO: what arrived and `now` in, decisions out.
//!
//! Two clocks of silence, on purpose (`SPEC.md` §4.5):
//! - **Silent** after `silent_after` (500 ms by default) without a datagram: routed around at once
//!   — new flows go elsewhere — while the connection is kept, so a WAN blackhole of a couple of
//!   seconds costs no connection and no flow. **Heard** again: routed to again.
//! - **Closed** after `close_after` (5 s) without a datagram, or without a control frame: the
//!   connection and its flows are given up (`PEER_UNRESPONSIVE`).
//!
//! What counts as hearing the peer, and why:
//! - control-stream bytes (pings, pongs, catalog);
//! - any datagram on the connection: a peer whose control task is starved of CPU while its QUIC
//!   stack still answers is busy, not dead (a stopped process or a cut link sends nothing);
//! - flow data or flow credit (QUIC STREAM, MAX_DATA, MAX_STREAM_DATA frames) count as a control
//!   frame: under sustained bulk load the control stream can wait seconds behind flow data in
//!   quinn's connection-wide send window (found by the benchmarks: 128 parallel bulk flows through a
//!   single-threaded gateway pair), and credit arrives only as the peer's gateway reads;
//! - a late tick of our own: when this process was not running (a starved node), what the peer sent
//!   meanwhile may still wait in the socket — silence counts only over time we were awake.
//!
//! A counter that moved since the last tick proves the peer spoke during that interval, not at
//! the tick: it is dated one interval back. The same rules serve a gateway's peer sessions and a
//! redirector's connection to its gateway (which sends no periodic frames, and no hello).

use std::time::{Duration, Instant};

use causeway_protocol::ErrorCode;

/// The thresholds of one connection's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// How often [`Liveness::tick`] is called (the ping interval).
    pub interval: Duration,
    /// No datagram this long: [`Event::Silent`].
    pub silent_after: Duration,
    /// No datagram this long, or no control frame when `frames` is set: [`Event::Close`].
    pub close_after: Duration,
    /// Whether the peer sends control frames periodically (pings), so that their absence is a
    /// reason to close on its own.
    pub frames: bool,
    /// A control frame begun must be complete within this.
    pub frame_deadline: Option<Duration>,
    /// The peer's hello must arrive within this of the start.
    pub hello_within: Option<Duration>,
}

/// The counters of the connection that prove the peer alive, read at each tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// UDP datagrams received.
    pub datagrams: u64,
    /// STREAM, MAX_DATA and MAX_STREAM_DATA frames received (flow data and flow credit).
    pub app_frames: u64,
}

/// A change the shell acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Route around the peer (it has been silent `for_`); keep the connection.
    Silent { for_: Duration },
    /// Route to it again (it was silent `for_`).
    Heard { for_: Duration },
    /// Close the connection with `code`; `tell`: send the peer an `Error` message first.
    Close { code: ErrorCode, reason: String, tell: bool },
}

/// One connection's liveness state.
#[derive(Debug, Clone)]
pub struct Liveness {
    t: Thresholds,
    started: Instant,
    last_heard: Instant,
    last_frame: Instant,
    last_tick: Instant,
    seen: Counters,
    frame_started: Option<Instant>,
    hello: bool,
    silent: bool,
}

impl Liveness {
    pub fn new(t: Thresholds, now: Instant, counters: Counters) -> Self {
        Self {
            t,
            started: now,
            last_heard: now,
            last_frame: now,
            last_tick: now,
            seen: counters,
            frame_started: None,
            hello: t.hello_within.is_none(),
            silent: false,
        }
    }

    /// Control-stream bytes arrived at `now`.
    pub fn on_control_data(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
        self.last_frame = self.last_frame.max(now);
    }

    /// After decoding what arrived at `now`: whether a frame is left incomplete, and whether any
    /// frame was completed (an incomplete frame is timed from its first byte).
    pub fn on_decoded(&mut self, now: Instant, incomplete: bool, completed: bool) {
        self.frame_started = match (incomplete, completed) {
            (false, _) => None,
            (true, true) => Some(now),
            (true, false) => self.frame_started.or(Some(now)),
        };
    }

    /// The peer's hello arrived.
    pub fn on_hello(&mut self) {
        self.hello = true;
    }

    /// Whether the peer is silent now (routed around).
    pub fn is_silent(&self) -> bool {
        self.silent
    }

    /// A tick at `now`, with the connection's counters. `routable`: whether this connection is the
    /// one routed to (a replaced connection still finishing is not marked silent). Returns what to
    /// do, if anything.
    pub fn tick(&mut self, now: Instant, counters: Counters, routable: bool) -> Option<Event> {
        let t = self.t;
        let late = now.saturating_duration_since(self.last_tick) > t.interval * 3;
        self.last_tick = now;
        let back = now.checked_sub(t.interval).unwrap_or(now);
        if let (Some(deadline), Some(s)) = (t.frame_deadline, self.frame_started) {
            if now.saturating_duration_since(s) > deadline {
                let reason = format!("control frame not completed within {} s", deadline.as_secs());
                return Some(Event::Close { code: ErrorCode::CONTROL_TRUNCATED, reason, tell: true });
            }
        }
        if counters.app_frames != self.seen.app_frames {
            self.last_frame = self.last_frame.max(back);
        }
        let close_after = t.close_after.max(t.silent_after);
        let unframed = now.saturating_duration_since(self.last_frame);
        if t.frames && unframed > close_after {
            let reason = format!("no control frame for {unframed:?}");
            return Some(Event::Close { code: ErrorCode::PEER_UNRESPONSIVE, reason, tell: false });
        }
        if let Some(within) = t.hello_within.filter(|_| !self.hello) {
            if now.saturating_duration_since(self.started) > within {
                return Some(Event::Close {
                    code: ErrorCode::PROTOCOL_VIOLATION,
                    reason: "no hello in time".into(),
                    tell: true,
                });
            }
        }
        if counters.datagrams != self.seen.datagrams || late {
            self.last_heard = self.last_heard.max(if late { now } else { back });
        }
        self.seen = counters;
        let quiet = now.saturating_duration_since(self.last_heard);
        if quiet > close_after {
            let reason = format!("silent for {quiet:?}");
            return Some(Event::Close { code: ErrorCode::PEER_UNRESPONSIVE, reason, tell: false });
        }
        if quiet > t.silent_after {
            if !self.silent && self.hello && routable {
                self.silent = true;
                return Some(Event::Silent { for_: quiet });
            }
        } else if self.silent {
            self.silent = false;
            return Some(Event::Heard { for_: quiet });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn gateway() -> Thresholds {
        Thresholds {
            interval: 100 * MS,
            silent_after: 500 * MS,
            close_after: 5000 * MS,
            frames: true,
            frame_deadline: Some(Duration::from_secs(10)),
            hello_within: Some(Duration::from_secs(5)),
        }
    }

    /// Drives `l` with ticks every interval from `from` for `d`, the counters as given by `c(i)`;
    /// returns the events with their time since `from`.
    fn run(l: &mut Liveness, from: Instant, d: Duration, mut c: impl FnMut(u32) -> Counters) -> Vec<(Duration, Event)> {
        let mut out = Vec::new();
        let n = (d.as_millis() / l.t.interval.as_millis()) as u32;
        for i in 1..=n {
            let now = from + l.t.interval * i;
            if let Some(e) = l.tick(now, c(i), true) {
                let close = matches!(e, Event::Close { .. });
                out.push((now - from, e));
                if close {
                    break; // the shell closes the connection: no more ticks
                }
            }
        }
        out
    }

    fn up(t0: Instant) -> Liveness {
        let mut l = Liveness::new(gateway(), t0, Counters::default());
        l.on_hello();
        l
    }

    #[test]
    fn pings_keep_a_peer_up() {
        let t0 = Instant::now();
        let mut l = up(t0);
        for i in 1..100u32 {
            let now = t0 + 100 * MS * i;
            l.on_control_data(now);
            assert_eq!(l.tick(now, Counters { datagrams: u64::from(i), app_frames: 0 }, true), None);
        }
    }

    #[test]
    fn silence_routes_around_then_closes_and_hearing_again_routes_back() {
        let t0 = Instant::now();
        let mut l = up(t0);
        // Dark: silent once past 500 ms (first tick after it), never twice.
        let ev = run(&mut l, t0, 2000 * MS, |_| Counters::default());
        assert_eq!(ev, vec![(600 * MS, Event::Silent { for_: 600 * MS })]);
        assert!(l.is_silent());
        // A datagram: heard (dated one interval back), routed to again.
        let at = t0 + 2100 * MS;
        assert_eq!(l.tick(at, Counters { datagrams: 1, app_frames: 0 }, true), Some(Event::Heard { for_: 100 * MS }));
        // Datagrams alone do not keep the connection past 5 s without a control frame.
        let ev = run(&mut l, at, 4000 * MS, |i| Counters { datagrams: 1 + u64::from(i), app_frames: 0 });
        match &ev[..] {
            [(d, Event::Close { code, tell: false, .. })] => {
                assert_eq!(*code, ErrorCode::PEER_UNRESPONSIVE);
                assert_eq!(at + *d - t0, 5100 * MS, "closed at the first tick past 5 s without a frame");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_dark_peer_is_closed_after_the_close_timeout() {
        let t0 = Instant::now();
        let mut l = up(t0);
        let ev = run(&mut l, t0, 6000 * MS, |_| Counters::default());
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(matches!(ev[1], (d, Event::Close { code: ErrorCode::PEER_UNRESPONSIVE, .. }) if d == 5100 * MS));
    }

    #[test]
    fn flow_data_counts_as_a_control_frame_and_datagrams_as_hearing() {
        let t0 = Instant::now();
        let mut l = up(t0);
        // Bulk load: no control bytes for 20 s, but flow frames and datagrams keep arriving.
        let ev = run(&mut l, t0, 20_000 * MS, |i| Counters { datagrams: u64::from(i), app_frames: u64::from(i) });
        assert_eq!(ev, vec![]);
    }

    #[test]
    fn a_late_tick_of_our_own_is_not_the_peers_silence() {
        let t0 = Instant::now();
        let mut l = up(t0);
        // We were not scheduled for 2 s: the tick is late, nothing counted arrived yet.
        assert_eq!(l.tick(t0 + 2000 * MS, Counters::default(), true), None);
        assert!(!l.is_silent());
    }

    #[test]
    fn no_hello_in_time_and_a_frame_never_completed_close_with_a_told_error() {
        let t0 = Instant::now();
        let mut l = Liveness::new(gateway(), t0, Counters::default());
        let ev = run(&mut l, t0, 6000 * MS, |i| Counters { datagrams: u64::from(i), app_frames: u64::from(i) });
        // Alive, but no hello within 5 s: closed, and told why.
        assert!(
            matches!(&ev[..], [(_, Event::Close { code: ErrorCode::PROTOCOL_VIOLATION, tell: true, .. })]),
            "{ev:?}"
        );

        let mut l = up(t0);
        l.on_control_data(t0 + 10 * MS);
        l.on_decoded(t0 + 10 * MS, true, false);
        // More bytes of the same frame do not restart its clock; a finished one clears it.
        let ev = run(&mut l, t0, 11_000 * MS, |i| Counters { datagrams: u64::from(i), app_frames: u64::from(i) });
        assert!(
            matches!(&ev[..], [(d, Event::Close { code: ErrorCode::CONTROL_TRUNCATED, .. })] if *d == 10_100 * MS),
            "{ev:?}"
        );
        let mut l = up(t0);
        l.on_decoded(t0, true, false);
        l.on_decoded(t0 + 5000 * MS, false, true);
        assert_eq!(l.tick(t0 + 11_000 * MS, Counters { datagrams: 1, app_frames: 1 }, true), None);
    }

    #[test]
    fn a_replaced_connection_is_not_marked_silent() {
        let t0 = Instant::now();
        let mut l = up(t0);
        for i in 1..20u32 {
            assert_eq!(l.tick(t0 + 100 * MS * i, Counters::default(), false), None, "tick {i}");
        }
    }

    #[test]
    fn a_redirector_closes_on_datagram_silence_only() {
        let t0 = Instant::now();
        let t = Thresholds {
            interval: 100 * MS,
            silent_after: 600 * MS,
            close_after: 3000 * MS,
            frames: false,
            frame_deadline: None,
            hello_within: None,
        };
        let mut l = Liveness::new(t, t0, Counters::default());
        // Its gateway sends no control frames while the catalog is unchanged: datagrams suffice.
        let ev = run(&mut l, t0, 10_000 * MS, |i| Counters { datagrams: u64::from(i), app_frames: 0 });
        assert_eq!(ev, vec![]);
        let from = t0 + 10_000 * MS;
        let ev = run(&mut l, from, 4000 * MS, |_| Counters { datagrams: 100, app_frames: 0 });
        let kinds: Vec<_> = ev.iter().map(|(d, e)| (*d, matches!(e, Event::Silent { .. }))).collect();
        // Last heard one interval before `from`: silent past 600 ms, closed past 3 s.
        assert_eq!(kinds, vec![(600 * MS, true), (3000 * MS, false)], "{ev:?}");
    }
}
