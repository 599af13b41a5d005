//! The access event: one per flow and one per HTTP request at every gateway it crosses (and one
//! per connection a redirector captured), with one schema, written in one place ([`Access::emit`]).
//!
//! It is a `tracing` event with target `causeway::access`, so it lands in the access log as is;
//! the gateway's trace exporter turns the same event into the OTLP span of that flow or request
//! (same values, `traceparent` its span context, `parent_span` its parent), so the log and the
//! trace never disagree. Retry attempts are `causeway::trace` events of kind `attempt`: child
//! spans, not access-log lines. Every field is always present (empty or 0 when it does not apply);
//! README "Access log" lists them with a sample of each kind.

use std::time::{Duration, Instant};

use causeway_protocol::flow::FlowError;
use causeway_protocol::trace::TraceParent;

/// What the event describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TCP flow (a CONNECT stream across the overlay, or a local endpoint).
    Flow,
    /// One HTTP request of an `http` service.
    Http,
    /// A connection a redirector captured and handed to its gateway.
    Capture,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Flow => "flow",
            Kind::Http => "http",
            Kind::Capture => "capture",
        }
    }
}

/// Where the event was written: at the source side (the caller's zone: its client entered the
/// mesh here) or at the destination (this gateway serves the service).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// How a flow or request ended: the one vocabulary of outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It ran to its end (both directions closed; a response sent in full).
    Complete,
    /// It was refused before it was established (`reason` says why).
    Refused,
    /// It was established and then cut (`side` says whose end failed first).
    Reset,
    /// The client went away before the end.
    Abandoned,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Refused => "refused",
            Outcome::Reset => "reset",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// Which side ended a flow or request that did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client (or the peer gateway relaying its client's abort).
    Client,
    /// The upstream: the peer gateway or the endpoint.
    Upstream,
    /// This gateway (a refusal, a limit, a timeout of its own).
    Local,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Local => "local",
        }
    }
}

/// One access event. Strings are empty and numbers 0 where a field does not apply.
#[derive(Debug, Clone)]
pub struct Access {
    pub kind: Kind,
    pub direction: Direction,
    pub service: String,
    /// The caller workload's SPIFFE ID (at a destination: as its gateway vouched for it).
    pub source_identity: String,
    /// The caller's address as the source gateway (or redirector) saw it.
    pub source_address: String,
    /// The caller's zone.
    pub source_zone: String,
    /// The other gateway: the one that served the flow (outbound), or the one it came from
    /// (inbound). Empty when this gateway served its own client.
    pub peer: String,
    /// The zone that served it.
    pub zone: String,
    /// The endpoint that served it (at the serving gateway).
    pub endpoint: String,
    pub route: String,
    pub subset: String,
    pub method: String,
    pub path: String,
    /// The HTTP status (0 for flows and for requests that got none).
    pub status: u16,
    pub grpc_status: String,
    pub outcome: Outcome,
    /// Why it was refused or cut: a `causeway-error` wire name (`SPEC.md` §5), or a reason of the
    /// redirector's own (`unknown_vip`, `gateway_down`, …); empty when it completed.
    pub reason: &'static str,
    /// Whether another zone might have served it (the refusal is not the service's answer).
    pub retryable: bool,
    pub side: Option<Side>,
    /// The policy or limit that decided a refusal, or the allowing policy of a request.
    pub policy: String,
    /// Zones (or endpoints) tried.
    pub attempts: u32,
    /// Client → service bytes, and service → client.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// This flow's span context (what it sent onwards) and its parent span, if it had one.
    pub trace: TraceParent,
    pub parent_span: Option<u64>,
    /// HTTP only: an injected fault, a mirrored copy, an Upgrade's protocol.
    pub fault: &'static str,
    pub mirrored: bool,
    pub upgrade: String,
    /// HTTP only: the version the client spoke (`HTTP/1.1`, `HTTP/2.0`, `HTTP/3.0`).
    pub client_protocol: String,
    pub start: Instant,
}

impl Access {
    /// An event with every optional field empty, started now.
    pub fn new(kind: Kind, direction: Direction, service: impl Into<String>, trace: TraceParent) -> Self {
        Self {
            kind,
            direction,
            service: service.into(),
            source_identity: String::new(),
            source_address: String::new(),
            source_zone: String::new(),
            peer: String::new(),
            zone: String::new(),
            endpoint: String::new(),
            route: String::new(),
            subset: String::new(),
            method: String::new(),
            path: String::new(),
            status: 0,
            grpc_status: String::new(),
            outcome: Outcome::Refused,
            reason: "",
            retryable: false,
            side: None,
            policy: String::new(),
            attempts: 0,
            bytes_up: 0,
            bytes_down: 0,
            trace,
            parent_span: None,
            fault: "",
            mirrored: false,
            upgrade: String::new(),
            client_protocol: String::new(),
            start: Instant::now(),
        }
    }

    /// Refused (or failed before it was established) for `reason`, by this gateway.
    pub fn refused(&mut self, reason: FlowError) {
        self.refused_for(reason.as_str(), reason.retryable_elsewhere());
    }

    /// Refused for a reason that is no [`FlowError`] (a redirector's `unknown_vip`, say).
    pub fn refused_for(&mut self, reason: &'static str, retryable: bool) {
        self.outcome = Outcome::Refused;
        self.reason = reason;
        self.retryable = retryable;
        self.side.get_or_insert(Side::Local);
    }

    /// Writes the event (the access-log line; the trace exporter makes it a span).
    pub fn emit(&self) {
        self.emit_at(self.start.elapsed());
    }

    /// [`Self::emit`] with a duration measured by the caller.
    pub fn emit_at(&self, took: Duration) {
        let parent = self.parent_span.map(|p| format!("{p:016x}")).unwrap_or_default();
        tracing::info!(
            target: "causeway::access",
            kind = self.kind.as_str(),
            direction = self.direction.as_str(),
            service = %self.service,
            source_identity = %self.source_identity,
            source_address = %self.source_address,
            source_zone = %self.source_zone,
            peer = %self.peer,
            zone = %self.zone,
            endpoint = %self.endpoint,
            route = %self.route,
            subset = %self.subset,
            method = %self.method,
            path = %self.path,
            status = self.status,
            grpc_status = %self.grpc_status,
            outcome = self.outcome.as_str(),
            reason = self.reason,
            side = self.side.map(Side::as_str).unwrap_or(""),
            retryable = self.retryable,
            policy = %self.policy,
            attempts = self.attempts,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            fault = self.fault,
            mirrored = self.mirrored,
            upgrade = %self.upgrade,
            client_protocol = %self.client_protocol,
            traceparent = %self.trace,
            parent_span = %parent,
            duration_ms = took.as_secs_f64() * 1000.0,
            "access"
        );
    }
}

/// One attempt of a flow or request at a zone or endpoint (a child span of its access event's
/// span; not an access-log line): where it went, what came back, how long it took.
pub fn attempt(parent: &TraceParent, span_id: u64, target: &str, result: &str, took: Duration) {
    tracing::debug!(
        target: "causeway::trace",
        kind = "attempt",
        traceparent = %parent.child(span_id),
        parent_span = %format!("{:016x}", parent.span_id),
        peer = target,
        outcome = result,
        duration_ms = took.as_secs_f64() * 1000.0,
        "attempt"
    );
}
