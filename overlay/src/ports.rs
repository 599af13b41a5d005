//! What the overlay asks of the gateway that embeds it, and the plain types both sides speak: who
//! opened a flow, who a peer's caller is, and the handlers of HTTP requests and flow admission.
//!
//! A leaf: it names no mesh state, so every layer (state, peer sessions, flows, the zone side) may
//! use it without importing the others.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use causeway_protocol::{Identity, ServiceName, ZoneName};

use crate::core::abuse::StreamEnd;
use crate::transport::h3q::BidiStream;

/// The server side of an HTTP/3 request (a peer's, a redirector's or an HTTP/3 client's).
pub type ServerStream = h3::server::RequestStream<BidiStream, Bytes>;

/// The client side of an HTTP/3 request toward a peer.
pub type ClientStream = h3::client::RequestStream<BidiStream, Bytes>;

/// Who opened a flow.
#[derive(Debug, Clone)]
pub struct Source {
    pub identity: Identity,
    pub addr: SocketAddr,
    /// The address the client connected to (a listener's local address, or a captured
    /// connection's original destination). With `addr`, it names the client's connection for
    /// loop detection.
    pub dst: SocketAddr,
}

/// What the destination knows of a flow a peer opened to one of its exports.
#[derive(Debug)]
pub struct FlowCaller<'a> {
    pub service: &'a ServiceName,
    /// The workload's SPIFFE ID as its gateway vouched for it (that gateway's own when absent).
    pub identity: Option<&'a Identity>,
    /// The caller's gateway's zone (configured for the authenticated peer).
    pub zone: Option<&'a ZoneName>,
    /// The workload's address as its gateway saw it.
    pub addr: Option<std::net::IpAddr>,
    pub port: u16,
}

/// The gateway's authorization of flows: `Err(policy)` refuses the flow (403 `policy_denied`,
/// `causeway-policy: <policy>`). A mesh cannot be built without one ([`crate::MeshConfig`]), so
/// "no authorizer" can never mean "admit everything".
pub trait Authorizer: Send + Sync + 'static {
    /// Decides a new flow: `Err(policy)` refuses it; `Ok(admission)` is the answer of its rate
    /// limits, taken from the same rules as the decision.
    fn authorize_flow(&self, caller: &FlowCaller<'_>) -> Result<Admission, String>;

    /// The same question for a flow already open (after a policy change); nothing is admitted.
    fn reauthorize_flow(&self, caller: &FlowCaller<'_>) -> Result<(), String>;
}

/// The rate limits' answer for an authorized new flow (see [`Authorizer::authorize_flow`]):
/// `Ok(guard)` holds the flow's place among the open flows until dropped; `Err(limit)` refuses it
/// (429 `rate_limited`). A future: a limit the zone's gateways share asks their store.
pub type Admission = Pin<Box<dyn Future<Output = Result<Box<dyn Send + Sync>, String>> + Send + 'static>>;

/// Applies verified mesh-wide documents (the gateway): validates one against its own
/// configuration, applies it or refuses it, and reports which with
/// [`crate::Mesh::report_document`].
pub trait DocumentHandler: Send + Sync + 'static {
    fn apply(self: Arc<Self>, doc: Arc<crate::core::documents::Verified>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Who sent a request across the overlay.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub identity: Identity,
    pub zone: Option<ZoneName>,
}

/// Serves the HTTP requests of `http` services that reach this gateway: from peers (for its
/// exports), from HTTP/3 clients and from redirectors' captured connections. The gateway's.
pub trait HttpHandler: Send + Sync + 'static {
    /// Serves one request until its response is complete. Returns whether the peer reset it (for
    /// the rapid-reset rule).
    fn serve(
        self: Arc<Self>,
        req: http::Request<()>,
        stream: ServerStream,
        from: PeerInfo,
    ) -> Pin<Box<dyn Future<Output = StreamEnd> + Send + 'static>>;

    /// Serves one request an HTTP/3 client (a workload holding a mesh certificate) sent straight
    /// to this gateway: `:authority` names the service; routed like a listener's requests.
    fn serve_request(
        self: Arc<Self>,
        req: http::Request<()>,
        stream: ServerStream,
        source: Source,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

    /// Serves a client connection of an `http` service that reached the gateway as bytes (a
    /// redirector's captured connection), at the other end of `io`, until it closes.
    fn serve_connection(
        self: Arc<Self>,
        io: tokio::io::DuplexStream,
        service: ServiceName,
        source: Source,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
}

/// Answers a request this gateway cannot serve with `e`'s status and wire name (`causeway-error`).
pub async fn refuse(mut stream: ServerStream, e: causeway_protocol::flow::FlowError) {
    if stream.send_response(refusal(e)).await.is_ok() {
        let _ = stream.finish().await;
    }
}

/// The response head of a refusal: `e`'s status and `causeway-error: <wire name>`.
pub fn refusal(e: causeway_protocol::flow::FlowError) -> http::Response<()> {
    http::Response::builder()
        .status(e.status())
        .header(causeway_protocol::flow::ERROR, e.as_str())
        .body(())
        .unwrap_or_default()
}
