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

/// Response header naming the authorization policy that refused a flow or request.
pub const POLICY: &str = "causeway-policy";

/// Response header naming the circuit breaker that refused a request (`max_requests`,
/// `max_pending`), with [`ERROR`] `circuit_open`.
pub const BREAKER: &str = "causeway-breaker";

/// `:authority` of the control stream. `.invalid` is reserved (RFC 2606), so no service can have it.
pub const CONTROL_AUTHORITY: &str = "control.causeway.invalid:1";

/// Why the destination gateway refused or failed a flow. Each maps to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowError {
    /// No zone is known to export the service (503): the answer of a gateway asked by its own
    /// client (a redirector, an HTTP/3 client), or of a destination whose export went away while
    /// the flow was being set up. A peer asking for a name this gateway does not export gets
    /// [`Self::Forbidden`] (`SPEC.md` §5.4).
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
    /// The peer opened new flows faster than `limits.peer_flow_rate`, or is throttled after rapid
    /// resets (429).
    PeerFlowRate,
    /// The gateway is above its memory budget: no new flows until it is back below (503).
    OverBudget,
    /// A circuit breaker is open: the service has its `max_requests` in progress, or its
    /// `max_pending` requests waiting for an endpoint connection (503; [`BREAKER`] names which).
    CircuitOpen,
    /// The flow would re-enter a gateway it already crossed (508): the destination's own backend
    /// connection came back as this flow's client, or the hop marker names the destination.
    Loop,
    /// The destination's authorization policy refuses this caller (403; [`POLICY`] names the
    /// deciding policy).
    PolicyDenied,
    /// A rate limit of the destination refuses this call for now (429; [`POLICY`] names the limit,
    /// `retry-after` says when to try again).
    RateLimited,
    /// The peer gateway asserted a caller identity it may not vouch for: outside its own trust
    /// domain, outside the prefixes configured for it, or not a SPIFFE ID (403).
    IdentityRefused,
}

impl FlowError {
    pub const ALL: [FlowError; 14] = [
        Self::UnknownService,
        Self::NoHealthyEndpoint,
        Self::Draining,
        Self::BackendRefused,
        Self::BackendTimeout,
        Self::BadRequest,
        Self::Forbidden,
        Self::PeerFlowRate,
        Self::Loop,
        Self::OverBudget,
        Self::CircuitOpen,
        Self::PolicyDenied,
        Self::RateLimited,
        Self::IdentityRefused,
    ];

    pub fn status(self) -> u16 {
        match self {
            Self::UnknownService | Self::NoHealthyEndpoint | Self::Draining | Self::OverBudget | Self::CircuitOpen => {
                503
            }
            Self::BackendRefused => 502,
            Self::BackendTimeout => 504,
            Self::BadRequest => 400,
            Self::Forbidden | Self::PolicyDenied | Self::IdentityRefused => 403,
            Self::PeerFlowRate | Self::RateLimited => 429,
            Self::Loop => 508,
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
            Self::PeerFlowRate => "peer_flow_rate",
            Self::Loop => "loop_detected",
            Self::OverBudget => "over_budget",
            Self::CircuitOpen => "circuit_open",
            Self::PolicyDenied => "policy_denied",
            Self::RateLimited => "rate_limited",
            Self::IdentityRefused => "identity_refused",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }

    /// Whether another zone might serve the flow instead.
    pub fn retryable_elsewhere(self) -> bool {
        !matches!(self, Self::BadRequest | Self::Loop | Self::PolicyDenied | Self::RateLimited | Self::IdentityRefused)
    }
}

/// `:authority` of the catalog stream a redirector opens to its gateway (`SPEC.md` §Redirectors).
pub const CATALOG_AUTHORITY: &str = "catalog.causeway.invalid:1";
/// Header a redirector sets: the captured connection's original destination (VIP:port).
pub const ORIGINAL_DST: &str = "causeway-original-dst";
/// Header a redirector sets: the captured connection's source address (pod IP:port).
pub const SOURCE_ADDRESS: &str = "causeway-source-address";
/// Header on a flow's CONNECT between gateways: the address the flow's client connected from. The
/// destination refuses the flow (508) when the client's connection ([`CLIENT_DST`] too) is one of
/// its own backend connections: a flow that left it for an endpoint came back (`SPEC.md` §5).
pub const CLIENT_ADDRESS: &str = "causeway-client-address";
/// Header on a flow's CONNECT between gateways: the address the flow's client connected to (with
/// [`CLIENT_ADDRESS`], the client's TCP connection, for loop detection).
pub const CLIENT_DST: &str = "causeway-client-dst";
/// Header on a flow's CONNECT between gateways: the hop marker, the SPIFFE IDs of the gateways the
/// flow crossed so far, comma-separated. A gateway that finds itself in it, or more than
/// [`MAX_HOPS`] entries, refuses the flow (508).
pub const VIA: &str = "causeway-via";
/// Most gateways a flow may cross.
pub const MAX_HOPS: usize = 8;
