//! Every metric the gateway records itself (the overlay's are described in
//! `causeway_overlay::metrics`): one table, described once at start-up, so each has its HELP text
//! and type on `/metrics` (`promtool check metrics` finds nothing to lint). The names stay next to
//! the code that records them; a unit test checks that every `causeway_*` name in this crate is here.

use causeway_overlay::metrics::{Kind, Metrics};
use metrics::Unit;

use crate::http::{
    HTTP_ACTIVE, HTTP_BREAKER_OPEN, HTTP_DURATION, HTTP_EJECTIONS, HTTP_FAULTS, HTTP_MIRRORS, HTTP_PENDING,
    HTTP_REQUESTS, HTTP_RETRIES, HTTP_UPGRADES,
};
use crate::policy::POLICY_DECISIONS;
use crate::ratelimit::store::{STORE_ERRORS, STORE_GATEWAYS, STORE_UP};
use crate::ratelimit::{FALLBACKS, RATE_LIMITED};

/// (kind, name, unit, help)
pub const DESCRIBED: &[(Kind, &str, Option<Unit>, &str)] = &[
    (
        Kind::Counter,
        HTTP_REQUESTS,
        None,
        "HTTP requests, by service, route, zone (serving, or the source zone at the destination) and status code.",
    ),
    (
        Kind::Histogram,
        HTTP_DURATION,
        Some(Unit::Seconds),
        "Time from a request's first header byte to its response head, at the source, by service and route.",
    ),
    (Kind::Gauge, HTTP_ACTIVE, None, "Requests to a service's endpoints in progress at this gateway."),
    (
        Kind::Counter,
        HTTP_BREAKER_OPEN,
        None,
        "Requests refused at once by an open circuit breaker, by service and breaker (max_requests, max_pending).",
    ),
    (Kind::Counter, HTTP_EJECTIONS, None, "HTTP endpoints ejected for failing 5 times in a row, by service."),
    (Kind::Counter, HTTP_RETRIES, None, "Request retries, by service, route and result (retried, budget_exhausted)."),
    (
        Kind::Counter,
        HTTP_MIRRORS,
        None,
        "Mirrored copies of requests, by service, route and result (sent, no_zone, skipped_body, skipped_busy).",
    ),
    (
        Kind::Counter,
        HTTP_FAULTS,
        None,
        "Requests delayed or answered by fault injection, by service, route and kind (delay, abort).",
    ),
    (Kind::Gauge, HTTP_PENDING, None, "Requests waiting for an endpoint connection (max_connections), by service."),
    (
        Kind::Counter,
        HTTP_UPGRADES,
        None,
        "Upgrade (WebSocket) requests tunnelled, by service and result (upgraded, refused).",
    ),
    (
        Kind::Counter,
        POLICY_DECISIONS,
        None,
        "Authorization decisions, by service, deciding policy and action (allow, deny, audit).",
    ),
    (
        Kind::Counter,
        RATE_LIMITED,
        None,
        "Calls refused by a rate limit, by service, limit and kind (requests, flows, concurrent).",
    ),
    (
        Kind::Counter,
        FALLBACKS,
        None,
        "Global-limit decisions taken without the store, by limit and mode (local, closed).",
    ),
    (
        Kind::Gauge,
        STORE_UP,
        None,
        "1 while the Redis store of global rate limits answers; 0 while its limits run on the fallback.",
    ),
    (Kind::Gauge, STORE_GATEWAYS, None, "Gateways of this zone seen sharing the rate-limit store in the last 3 s."),
    (Kind::Counter, STORE_ERRORS, None, "Failed rate-limit store calls, by op (check, check_timeout, heartbeat)."),
    (Kind::Counter, crate::telemetry::otlp::SPANS_EXPORTED, None, "Spans sent to the OTLP endpoint."),
    (
        Kind::Counter,
        crate::telemetry::otlp::SPANS_DROPPED,
        None,
        "Spans dropped, by reason (queue_full: the export queue was full; export_failed: the endpoint refused or did not answer).",
    ),
    (
        Kind::Gauge,
        crate::control::documents::DOCUMENT_VERSION,
        None,
        "Version of the mesh-wide document in force at this gateway (absent: none applied).",
    ),
    (
        Kind::Counter,
        crate::control::documents::DOCUMENT_APPLIES,
        None,
        "Verified mesh-wide documents this gateway applied or refused (it does not fit its own configuration), by result.",
    ),
];

/// Describes every gateway metric on `m`'s recorder.
pub fn describe(m: &Metrics) {
    for (kind, name, unit, help) in DESCRIBED {
        m.describe(*kind, name, *unit, help);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `"causeway_…"` name this crate's sources define is in [`DESCRIBED`] (a metric added
    /// without a description would show on `/metrics` without HELP).
    #[test]
    fn every_metric_name_in_the_crate_is_described() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![src.clone()];
        let mut names = std::collections::BTreeSet::new();
        while let Some(p) = files.pop() {
            if p.is_dir() {
                files.extend(std::fs::read_dir(&p).into_iter().flatten().flatten().map(|e| e.path()));
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&p) else { continue };
            for line in text.lines().filter(|l| l.trim_start().starts_with("pub const")) {
                if let Some(n) = line.split('"').nth(1).filter(|n| n.starts_with("causeway_")) {
                    names.insert(n.to_string());
                }
            }
        }
        assert!(names.len() >= DESCRIBED.len(), "the scan found {names:?}");
        for n in &names {
            assert!(DESCRIBED.iter().any(|d| d.1 == n), "{n} is not described in gateway/src/metrics.rs");
        }
    }
}
