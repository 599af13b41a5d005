//! The overlay's metrics: their one home. Names are `causeway_<subsystem>_<thing>_<unit>`; label
//! values come from closed enums or from validated names (zones, services).
//!
//! Each gateway records into the recorder it is given rather than a process-global one, so several
//! gateways in one process (the demo, the tests) keep separate books.

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};

pub const PEER_HANDSHAKE_FAILURES: &str = "causeway_peer_handshake_failures_total";
pub const PEER_CONNECTS: &str = "causeway_peer_connects_total";
pub const PEER_UP: &str = "causeway_peer_up";
pub const PEER_SILENCES: &str = "causeway_peer_silences_total";
pub const TLS_RELOADS: &str = "causeway_tls_reloads_total";
pub const CONFIG_RELOADS: &str = "causeway_config_reloads_total";
/// Mesh-wide documents offered to this gateway, by result (`accepted`, `duplicate`, `refused`),
/// reason of a refusal and origin (`peer`, `local`, `persisted`).
pub const DOCUMENTS: &str = "causeway_mesh_documents_total";
/// Status reports dropped because the table holds `MAX_STATUS_ROWS` gateways already.
pub const DOCUMENT_STATUS_DROPPED: &str = "causeway_mesh_document_statuses_dropped_total";
pub const TLS_LEAF_NOT_AFTER: &str = "causeway_tls_leaf_not_after_seconds";
pub const PEER_REPLACED: &str = "causeway_peer_connections_replaced_total";
pub const PEER_RTT: &str = "causeway_peer_rtt_seconds";
pub const PEER_CWND: &str = "causeway_peer_cwnd_bytes";
pub const PEER_PATH_MIN_RTT: &str = "causeway_peer_path_min_rtt_seconds";
pub const PEER_WINDOW_STRETCHED: &str = "causeway_peer_window_stretched";
pub const PEER_SILENCE_PROBES: &str = "causeway_peer_silence_probes_total";
pub const PEER_SENT_PACKETS: &str = "causeway_peer_sent_packets_total";
pub const PEER_LOST_PACKETS: &str = "causeway_peer_lost_packets_total";
pub const PEER_LOSS_RATIO: &str = "causeway_peer_loss_ratio";
pub const PEER_CONGESTION_EVENTS: &str = "causeway_peer_congestion_events_total";
pub const PEER_SENT_BYTES: &str = "causeway_peer_sent_bytes_total";
pub const PEER_RECEIVED_BYTES: &str = "causeway_peer_received_bytes_total";
pub const PEER_MIGRATIONS: &str = "causeway_peer_path_migrations_total";
pub const PEER_CONTROL_ERRORS: &str = "causeway_peer_control_errors_total";
pub const PEER_ABUSE_CLOSES: &str = "causeway_peer_abuse_closes_total";
pub const PEER_THROTTLES: &str = "causeway_peer_throttles_total";
pub const PEER_ASSERTIONS_REFUSED: &str = "causeway_peer_assertions_refused_total";
pub const LISTENER_REFUSED: &str = "causeway_listener_refused_total";
pub const MEMORY_RESIDENT: &str = "causeway_memory_resident_bytes";
pub const MEMORY_OVER_BUDGET: &str = "causeway_memory_over_budget";
pub const FLOWS_OPENED: &str = "causeway_flows_opened_total";
pub const FLOWS_CLOSED: &str = "causeway_flows_closed_total";
pub const FLOWS_FAILED: &str = "causeway_flows_failed_total";
pub const FLOWS_ACTIVE: &str = "causeway_flows_active";
/// Clients refused by a service's allowlist before any overlay traffic, by service and where
/// (`listener`, `capture`).
pub const CLIENTS_REFUSED: &str = "causeway_clients_refused_total";
/// Open inbound flows reset because a changed policy no longer allows them, by service.
pub const FLOWS_REVOKED: &str = "causeway_flows_revoked_total";
pub const FLOW_BYTES: &str = "causeway_flow_bytes_total";
pub const FLOW_EARLY_BYTES: &str = "causeway_flow_early_bytes_total";
pub const FLOW_DURATION: &str = "causeway_flow_duration_seconds";
pub const FLOW_CONNECT: &str = "causeway_flow_connect_seconds";
pub const INBOUND_FLOWS: &str = "causeway_inbound_flows_total";
pub const FAILOVERS: &str = "causeway_flow_failovers_total";
pub const REDIRECTORS: &str = "causeway_redirectors_connected";
/// HTTP/3 clients (workloads) connected straight to this gateway.
pub const HTTP3_CLIENTS: &str = "causeway_http3_clients_connected";
pub const REDIRECT_FLOWS: &str = "causeway_redirector_flows_total";
pub const CAPTURED: &str = "causeway_captured_flows_total";
pub const GATEWAY_UP: &str = "causeway_redirect_gateway_up";
pub const DNS_QUERIES: &str = "causeway_dns_queries_total";
pub const VIPS: &str = "causeway_redirect_vips";
pub const H3_FRAMES_REFUSED: &str = "causeway_h3_frames_refused_total";
pub const INITIALS_REFUSED: &str = "causeway_quic_initials_refused_total";

/// Bucket upper bounds (seconds) of the overlay's histograms, for the recorder the binary builds:
/// every duration is exported as a Prometheus histogram, so `histogram_quantile` works and
/// gateways aggregate. Chosen per metric: a flow set-up on a LAN takes tens of µs, across a WAN
/// tens of ms, and at worst a failover's `flow_connect_timeout` (3 s); a flow lives from
/// milliseconds to hours.
pub const BUCKETS: &[(&str, &[f64])] = &[
    (
        FLOW_CONNECT,
        &[
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            5.0, 10.0,
        ],
    ),
    (FLOW_DURATION, &[0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0, 86_400.0]),
];

/// Buckets for a histogram not listed in [`BUCKETS`] (none today): 100 µs to a minute.
pub const DEFAULT_BUCKETS: &[f64] =
    &[0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

const META: Metadata<'static> = Metadata::new("causeway", Level::INFO, Some(module_path!()));

/// The type of a metric, as exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A handle on one gateway's recorder.
#[derive(Clone)]
pub struct Metrics {
    rec: Arc<dyn Recorder + Send + Sync>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, v.to_string())).collect::<Vec<_>>())
}

impl Metrics {
    pub fn new(rec: Arc<dyn Recorder + Send + Sync>) -> Self {
        let m = Self { rec };
        m.describe_own();
        m
    }

    /// Metrics that go nowhere (unit tests).
    pub fn noop() -> Self {
        Self { rec: Arc::new(metrics::NoopRecorder) }
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.rec.register_counter(&key(name, labels), &META)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.rec.register_gauge(&key(name, labels), &META)
    }

    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.rec.register_histogram(&key(name, labels), &META)
    }

    /// Describes a metric recorded outside this crate (the gateway's own).
    pub fn describe(&self, kind: Kind, name: &'static str, unit: Option<Unit>, help: &'static str) {
        match kind {
            Kind::Counter => self.rec.describe_counter(name.into(), unit, help.into()),
            Kind::Gauge => self.rec.describe_gauge(name.into(), unit, help.into()),
            Kind::Histogram => self.rec.describe_histogram(name.into(), unit, help.into()),
        }
    }

    fn describe_own(&self) {
        let c =
            |n: &'static str, unit: Option<Unit>, d: &'static str| self.rec.describe_counter(n.into(), unit, d.into());
        let g =
            |n: &'static str, unit: Option<Unit>, d: &'static str| self.rec.describe_gauge(n.into(), unit, d.into());
        let h = |n: &'static str, unit: Option<Unit>, d: &'static str| {
            self.rec.describe_histogram(n.into(), unit, d.into())
        };
        c(PEER_HANDSHAKE_FAILURES, None, "Peer TLS handshakes refused, by reason.");
        c(PEER_CONNECTS, None, "Peer connections established or failed, by peer zone, direction and result.");
        g(PEER_UP, None, "1 while a peer's connection is up and its control stream live.");
        c(CONFIG_RELOADS, None, "Configuration reloads (file change or SIGHUP), by result (ok, refused).");
        c(
            DOCUMENTS,
            None,
            "Mesh-wide documents offered, by result (accepted, duplicate, refused), refusal reason and origin (peer, local, persisted).",
        );
        c(DOCUMENT_STATUS_DROPPED, None, "Document status reports dropped: the table was full.");
        c(TLS_RELOADS, None, "Certificate and trust-bundle reloads from the watched files, by result (ok, refused).");
        g(TLS_LEAF_NOT_AFTER, Some(Unit::Seconds), "Expiry of the leaf certificate in use (Unix time).");
        c(
            PEER_REPLACED,
            None,
            "Peer connections replaced make-before-break after a certificate changed on either side.",
        );
        c(
            PEER_SILENCES,
            None,
            "Times a peer went silent past timing.peer_timeout (routed around; closed only after peer_close_timeout).",
        );
        g(PEER_RTT, Some(Unit::Seconds), "Smoothed round-trip time to a peer.");
        c(PEER_CONTROL_ERRORS, None, "Peer connections closed for a control-protocol error, by code.");
        c(
            PEER_ABUSE_CLOSES,
            None,
            "Peer connections closed for abusing streams (rapid reset, also while throttled), by peer and reason.",
        );
        c(
            PEER_THROTTLES,
            None,
            "Times a peer's new streams were refused for abuse::THROTTLE_FOR (rapid reset), by peer and reason.",
        );
        c(
            PEER_ASSERTIONS_REFUSED,
            None,
            "Flows and requests refused because the peer asserted a caller identity it may not vouch for, by peer and reason.",
        );
        c(LISTENER_REFUSED, None, "Connections a local listener reset at once, by service and reason (per_source: the source address has limits.connections_per_source open).");
        g(MEMORY_RESIDENT, Some(Unit::Bytes), "Resident memory of the gateway, sampled every 100 ms.");
        g(
            MEMORY_OVER_BUDGET,
            None,
            "1 while resident memory is above limits.memory_budget: new flows get 503 over_budget.",
        );
        c(FLOWS_OPENED, None, "Flows opened by a local client, by service and serving zone.");
        c(FLOWS_CLOSED, None, "Flows ended, by service, serving zone and outcome.");
        c(FLOWS_FAILED, None, "Flows that found no route or were refused everywhere, by service and reason.");
        g(FLOWS_ACTIVE, None, "Flows open now, by service and serving zone.");
        c(
            CLIENTS_REFUSED,
            None,
            "Clients refused by a service's allowlist before any overlay traffic, by service and where.",
        );
        c(FLOWS_REVOKED, None, "Open inbound flows reset because a changed policy no longer allows them, by service.");
        g(PEER_CWND, Some(Unit::Bytes), "Congestion window of the connection to a peer.");
        g(
            PEER_PATH_MIN_RTT,
            Some(Unit::Seconds),
            "Minimum RTT of the path to a peer over the last 10 s, from samples our own queue cannot inflate.",
        );
        g(
            PEER_WINDOW_STRETCHED,
            None,
            "1 while the window to a peer is sized for a path longer than the connection started on.",
        );
        c(
            PEER_SILENCE_PROBES,
            None,
            "Packets sent beyond the congestion window to probe a path silent for two intervals (200 ms or an RTT).",
        );
        c(PEER_SENT_PACKETS, None, "QUIC packets sent to a peer.");
        c(PEER_LOST_PACKETS, None, "QUIC packets to a peer declared lost (retransmitted).");
        g(
            PEER_LOSS_RATIO,
            None,
            "Packets lost over packets sent to a peer in the last window of at least 1 s and 200 packets.",
        );
        c(PEER_CONGESTION_EVENTS, None, "Congestion events (window reductions) on the connection to a peer.");
        c(PEER_SENT_BYTES, Some(Unit::Bytes), "UDP bytes sent to a peer (QUIC overhead included).");
        c(PEER_RECEIVED_BYTES, Some(Unit::Bytes), "UDP bytes received from a peer (QUIC overhead included).");
        c(PEER_MIGRATIONS, None, "Times a peer's address changed on its connection (NAT rebinding, migration).");
        c(FLOW_BYTES, Some(Unit::Bytes), "Bytes relayed, by service, serving zone and direction.");
        c(
            FLOW_EARLY_BYTES,
            Some(Unit::Bytes),
            "Bytes sent along with a flow's CONNECT (already counted in the flow's up bytes), by service and serving zone.",
        );
        h(FLOW_DURATION, Some(Unit::Seconds), "Flow lifetimes.");
        h(FLOW_CONNECT, Some(Unit::Seconds), "Time from accepting a client to the flow being established.");
        c(INBOUND_FLOWS, None, "Flows served for peers, by service, source zone and outcome.");
        c(FAILOVERS, None, "Flow attempts moved to another zone, by service and reason.");
        g(REDIRECTORS, None, "Redirectors (node agents) connected to this gateway.");
        g(HTTP3_CLIENTS, None, "HTTP/3 clients (workloads with mesh certificates) connected straight to this gateway.");
        c(REDIRECT_FLOWS, None, "Flows handed over by redirectors, by outcome of the hand-off.");
        c(CAPTURED, None, "Redirector: captured connections, by outcome.");
        g(GATEWAY_UP, None, "Redirector: 1 while its gateway connection is up.");
        c(DNS_QUERIES, None, "Redirector: mesh DNS queries, by result.");
        g(VIPS, None, "Redirector: services with a virtual IP.");
        c(H3_FRAMES_REFUSED, None, "HTTP/3 frames refused for declaring more than their type's limit.");
        c(INITIALS_REFUSED, None, "QUIC connection attempts refused or sent a Retry before any crypto, by reason.");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use metrics::{KeyName, SharedString};

    use super::*;

    /// Collects the names described to it.
    #[derive(Default)]
    struct Described(Mutex<BTreeSet<String>>);

    impl Recorder for Described {
        fn describe_counter(&self, k: KeyName, _: Option<Unit>, _: SharedString) {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(k.as_str().to_string());
        }
        fn describe_gauge(&self, k: KeyName, _: Option<Unit>, _: SharedString) {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(k.as_str().to_string());
        }
        fn describe_histogram(&self, k: KeyName, _: Option<Unit>, _: SharedString) {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(k.as_str().to_string());
        }
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    /// Every `causeway_*` name constant of this file is described (HELP on `/metrics`), and every
    /// histogram has buckets of its own.
    #[test]
    fn every_metric_is_described() {
        let rec = Arc::new(Described::default());
        let _m = Metrics::new(rec.clone());
        let described = rec.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let names: Vec<&str> = include_str!("metrics.rs")
            .lines()
            .filter(|l| l.starts_with("pub const"))
            .filter_map(|l| l.split('"').nth(1))
            .filter(|n| n.starts_with("causeway_"))
            .collect();
        assert!(names.len() > 30, "{names:?}");
        for n in names {
            assert!(described.contains(n), "{n} is not described");
        }
        for n in [FLOW_CONNECT, FLOW_DURATION] {
            let b = BUCKETS.iter().find(|b| b.0 == n).map(|b| b.1);
            assert!(b.is_some_and(|b| b.windows(2).all(|w| w[0] < w[1])), "{n}: buckets missing or unsorted");
        }
    }
}
