//! The vocabulary of a service flow: an HTTP/3 plain CONNECT (RFC 9114 §4.4) from one gateway to
//! another, `:authority` naming `<service>:<port>`. See `SPEC.md` §Flows.

/// Header carrying the SPIFFE ID of the workload that opened the flow.
pub const SOURCE_IDENTITY: &str = "causeway-source-identity";
/// Header carrying the zone the flow entered the mesh in.
pub const SOURCE_ZONE: &str = "causeway-source-zone";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// Response header naming why a flow was refused ([`FlowError::as_str`]).
pub const ERROR: &str = "causeway-error";

/// `:authority` of the control stream. `.invalid` is reserved (RFC 2606), so no service can have it.
pub const CONTROL_AUTHORITY: &str = "control.causeway.invalid:1";

/// Why the destination gateway refused or failed a flow. Each maps to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowError {
    /// The service is not exported here (503).
    UnknownService,
    /// No healthy endpoint (503).
    NoHealthyEndpoint,
    /// The gateway is draining (503).
    Draining,
    /// Every endpoint refused the connection (502).
    BackendRefused,
    /// Connecting to the endpoint timed out (504).
    BackendTimeout,
    /// The request itself was malformed (400).
    BadRequest,
    /// The target is not a service this gateway exports (an address, its own ports, an unexported
    /// name): refused before any connection is attempted (403).
    Forbidden,
}

impl FlowError {
    pub const ALL: [FlowError; 7] = [
        Self::UnknownService,
        Self::NoHealthyEndpoint,
        Self::Draining,
        Self::BackendRefused,
        Self::BackendTimeout,
        Self::BadRequest,
        Self::Forbidden,
    ];

    pub fn status(self) -> u16 {
        match self {
            Self::UnknownService | Self::NoHealthyEndpoint | Self::Draining => 503,
            Self::BackendRefused => 502,
            Self::BackendTimeout => 504,
            Self::BadRequest => 400,
            Self::Forbidden => 403,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownService => "unknown_service",
            Self::NoHealthyEndpoint => "no_healthy_endpoint",
            Self::Draining => "draining",
            Self::BackendRefused => "backend_refused",
            Self::BackendTimeout => "backend_timeout",
            Self::BadRequest => "bad_request",
            Self::Forbidden => "forbidden_target",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }

    /// Whether another zone might serve the flow instead.
    pub fn retryable_elsewhere(self) -> bool {
        !matches!(self, Self::BadRequest)
    }
}

/// `:authority` of the catalog stream a redirector opens to its gateway (`SPEC.md` §Redirectors).
pub const CATALOG_AUTHORITY: &str = "catalog.causeway.invalid:1";
/// Header a redirector sets: the captured connection's original destination (VIP:port).
pub const ORIGINAL_DST: &str = "causeway-original-dst";
/// Header a redirector sets: the captured connection's source address (pod IP:port).
pub const SOURCE_ADDRESS: &str = "causeway-source-address";
