//! Congestion control for peer connections: quinn's BBR, with a path minimum RTT that may rise.
//!
//! [`PathBbr`] wraps quinn's [`Bbr`] unchanged and sizes the window from the pure
//! [`PathModel`] (`core::path_model`, where the rules and the benchmark that found the need are
//! described): quinn 0.11's BBR keeps the smallest RTT a connection ever saw, and a connection
//! whose path got longer stays window-bound for days.
//!
//! Written by hand because no maintained crate offers this; the fix belongs upstream in quinn.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Bbr, BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

pub use crate::core::path_model::PathModel;

/// quinn's BBR with [`PathModel`]'s path minimum RTT. See the module documentation.
pub struct PathBbr {
    bbr: Box<dyn Controller>,
    model: PathModel,
}

impl PathBbr {
    pub fn model(&self) -> &PathModel {
        &self.model
    }
}

impl Controller for PathBbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.bbr.on_sent(now, bytes, last_packet_number);
        self.model.on_sent(now, bytes);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.bbr.on_ack(now, sent, bytes, app_limited, rtt);
        self.model.on_ack(now, sent, bytes, app_limited, rtt.min(), rtt.get());
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest: Option<u64>) {
        self.bbr.on_end_acks(now, in_flight, app_limited, largest);
        self.model.on_end_acks(now, in_flight, app_limited);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, persistent: bool, lost_bytes: u64) {
        self.bbr.on_congestion_event(now, sent, persistent, lost_bytes);
        if persistent {
            self.model.on_persistent_congestion(lost_bytes);
        } else {
            self.model.on_loss(lost_bytes);
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.bbr.on_mtu_update(new_mtu);
        self.model.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.model.window(Instant::now(), self.bbr.window())
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.bbr.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Self { bbr: self.bbr.clone_box(), model: self.model.clone() })
    }

    fn initial_window(&self) -> u64 {
        self.bbr.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Builds [`PathBbr`] controllers with quinn's default BBR configuration.
#[derive(Debug, Default)]
pub struct PathBbrConfig {
    bbr: BbrConfig,
}

impl ControllerFactory for PathBbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let bbr: Box<dyn Controller> = Box::new(Bbr::new(Arc::new(self.bbr.clone()), current_mtu));
        Box::new(PathBbr { bbr, model: PathModel::new(now, current_mtu) })
    }
}

/// What [`PathBbr`] knows about a connection's path, for the gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathState {
    /// The path minimum RTT, once a clean sample was taken.
    pub min_rtt: Option<Duration>,
    pub stretched: bool,
    /// Packets sent as silence probes over the connection's life.
    pub silence_probes: u64,
}

/// The path state of a connection using [`PathBbr`].
pub fn path_state(conn: &quinn::Connection) -> Option<PathState> {
    let any = conn.congestion_state().into_any();
    let c = any.downcast::<PathBbr>().ok()?;
    let m = &c.model;
    Some(PathState { min_rtt: m.path_min_rtt(), stretched: m.stretched(), silence_probes: m.silence_probes() })
}
