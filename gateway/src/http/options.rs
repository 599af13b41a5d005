//! How an `http` export's endpoints are spoken to: protocol, balancing and circuit breakers. The
//! gateway's alone (the overlay carries requests, it does not choose endpoints for them).

/// An `http` export's endpoint protocol and circuit breakers. Each breaker, when tripped, answers
/// an immediate 503 `circuit_open` naming it (Envoy's thresholds, per destination gateway).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpOptions {
    /// The endpoints speak HTTP/2 cleartext with prior knowledge (h2c; gRPC servers), not HTTP/1.1.
    pub h2: bool,
    /// How an endpoint is chosen for a request.
    pub lb: LbPolicy,
    /// Requests to the endpoints in progress at once. `None`: no limit.
    pub max_requests: Option<u32>,
    /// Connections to each HTTP/1.1 endpoint at once (one request per connection at a time). A
    /// request finding every endpoint at its limit waits for one ... `None`: no limit.
    pub max_connections: Option<u32>,
    /// ... and at most this many requests wait; the next is refused. Set with `max_connections`.
    pub max_pending: Option<u32>,
}

/// How an `http` export's endpoint is chosen for each request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LbPolicy {
    /// Power of two choices over peak-EWMA latency × requests in flight (Linkerd's).
    #[default]
    PowerOfTwo,
    /// Each endpoint in turn.
    RoundRobin,
    /// Consistent (rendezvous) hashing on this request header's value: the same value goes to
    /// the same endpoint while it is healthy; requests without it are balanced as by default.
    HashHeader(String),
    /// The same on this cookie's value (session affinity).
    HashCookie(String),
}
