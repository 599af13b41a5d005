//! The memory budget (`limits.memory_budget`): while the gateway's resident memory is above it,
//! new flows are refused at once with 503 `over_budget` and existing flows keep going — Envoy's
//! overload manager, for the one resource that matters here.
//!
//! The gateway's buffered bytes live in many places — quinn's per-stream receive buffers and send
//! queues, h3's, the relays' — and no one counter of ours sees them all; resident memory does. It
//! is sampled every [`SAMPLE_INTERVAL`] from `/proc/self/status` (a read of about 1 KiB), so a
//! burst can overshoot the budget by what arrives in one interval, which the per-peer windows
//! bound (README "Limits"). `causeway_memory_resident_bytes` shows the sample,
//! `causeway_memory_over_budget` the state.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics::{MEMORY_OVER_BUDGET, MEMORY_RESIDENT};
use crate::Mesh;

pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// The budget (0: none) and whether the last sample was over it.
#[derive(Debug, Default)]
pub struct Budget {
    limit: AtomicU64,
    over: AtomicBool,
}

impl Budget {
    pub fn new(limit: Option<u64>) -> Self {
        Self { limit: AtomicU64::new(limit.unwrap_or(0)), over: AtomicBool::new(false) }
    }

    /// Changes the budget (configuration reload); applies from the next sample.
    pub fn set_limit(&self, limit: Option<u64>) {
        self.limit.store(limit.unwrap_or(0), Ordering::Relaxed);
    }

    /// Whether new flows must be refused now.
    pub fn over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Records one sample of resident memory; returns whether it is over the budget.
    pub fn record(&self, resident: u64) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let over = limit != 0 && resident > limit;
        self.over.store(over, Ordering::Relaxed);
        over
    }
}

/// This process's resident memory in bytes (Linux), or `None` where `/proc` is not available.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Samples resident memory until the mesh shuts down, logging when the budget is crossed.
pub(crate) async fn sample_loop(mesh: Mesh) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_over = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = mesh.stopped() => return,
        }
        let Some(resident) = resident_bytes() else { return };
        let over = mesh.admission().budget.record(resident);
        mesh.metrics().gauge(MEMORY_RESIDENT, &[]).set(resident as f64);
        mesh.metrics().gauge(MEMORY_OVER_BUDGET, &[]).set(f64::from(u8::from(over)));
        if over != was_over {
            was_over = over;
            let limit = mesh.admission().budget.limit.load(Ordering::Relaxed);
            if over {
                tracing::warn!(resident, limit, "memory.over_budget");
            } else {
                tracing::info!(resident, limit, "memory.within_budget");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_only_above_a_set_budget() {
        let b = Budget::new(None);
        assert!(!b.record(u64::MAX), "no budget, never over");
        b.set_limit(Some(100 << 20));
        assert!(!b.record(100 << 20));
        assert!(b.record((100 << 20) + 1));
        assert!(b.over());
        assert!(!b.record(50 << 20));
        assert!(!b.over());
    }

    #[test]
    fn resident_memory_is_read() {
        let r = resident_bytes().expect("Linux /proc");
        assert!(r > 1 << 20 && r < 1 << 40, "{r}");
    }
}
