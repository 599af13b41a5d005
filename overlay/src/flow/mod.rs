//! Service flows. Outbound: a local client's TCP connection goes to the best zone that offers the
//! service, as an HTTP/3 CONNECT to that zone's gateway (RFC 9114 §4.4), trying the next candidate
//! when one refuses or fails before the flow is established. Inbound: a peer's CONNECT is served by
//! connecting to a healthy local endpoint of an exported service.
//!
//! Every flow ends in exactly one access-log event (written when its [`FlowLog`] drops) and one
//! outcome in the metrics.

pub(crate) mod inbound;
mod outbound;
pub mod relay;
pub mod request;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::access::{Access, Direction, Kind};
use causeway_protocol::trace::TraceParent;
use rand::Rng;

pub use self::outbound::Downstream;
pub use self::request::Candidate;

/// Candidates tried per flow before giving up: enough to pass one dead and one refusing zone.
const MAX_ATTEMPTS: usize = 3;

/// The access event of one flow (`crate::access`), written exactly once, when it drops.
pub(crate) struct FlowLog {
    pub access: Access,
    /// The flow's places in rate limits' open-flow counts, given back when the flow ends.
    pub hold: Option<Box<dyn Send + Sync>>,
}

impl FlowLog {
    pub fn new(direction: Direction, service: String, trace: TraceParent, parent: Option<u64>) -> Self {
        let mut access = Access::new(Kind::Flow, direction, service, trace);
        access.parent_span = parent;
        Self { access, hold: None }
    }

    /// The flow ran and ended as the relay says.
    pub fn relayed(&mut self, outcome: relay::Outcome, up: u64, down: u64) {
        let a = &mut self.access;
        (a.bytes_up, a.bytes_down) = (up, down);
        (a.outcome, a.side) = outcome.access();
    }
}

impl Drop for FlowLog {
    fn drop(&mut self) {
        self.access.emit();
    }
}

/// A new root trace context (random ids), for a flow or request that arrived without one: the one
/// way every part of the gateway and the redirector starts a trace. It is sampled when its trace
/// id falls in the root sampling ratio ([`set_root_sample_ratio`]); everything downstream follows
/// that flag (parent-based sampling).
pub fn root_trace() -> TraceParent {
    let mut rng = rand::rng();
    let t = TraceParent::root(rng.random(), rng.random());
    TraceParent { sampled: sampled(t.trace_id, f64::from_bits(ROOT_RATIO.load(Ordering::Relaxed))), ..t }
}

/// The share of new root traces that are sampled (`tracing.sample_ratio`; 1 until set).
static ROOT_RATIO: AtomicU64 = AtomicU64::new(0x3FF0_0000_0000_0000); // 1.0f64

/// Sets the share of new root traces that are sampled, clamped to 0..=1.
pub fn set_root_sample_ratio(ratio: f64) {
    let r = if ratio.is_nan() { 1.0 } else { ratio.clamp(0.0, 1.0) };
    ROOT_RATIO.store(r.to_bits(), Ordering::Relaxed);
}

/// Trace-id ratio sampling (as OpenTelemetry's `TraceIdRatioBased`): the low 64 bits of the id
/// below `ratio` × 2^64. Any gateway deciding on the same id decides alike.
fn sampled(trace_id: u128, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    ((trace_id as u64) >> 1) < (ratio * (1u64 << 63) as f64) as u64
}

/// One relay phase: a flow's two sides joined, in a boxed future of its own (B6: memory per idle
/// flow). It resolves to the outcome and the bytes each way.
type RelayPhase<'a> = Pin<Box<dyn Future<Output = (relay::Outcome, u64, u64)> + Send + 'a>>;

#[cfg(test)]
mod tests {
    #[test]
    fn root_sampling_follows_the_ratio_by_trace_id() {
        assert!(super::sampled(u128::MAX, 1.0));
        assert!(!super::sampled(1, 0.0));
        let n = 100_000u128;
        let hits =
            (0..n).filter(|i| super::sampled(i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835), 0.25)).count();
        assert!((23_000..27_000).contains(&hits), "{hits} of {n}");
    }
}
