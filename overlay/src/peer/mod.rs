//! Peer sessions: dialing with backoff (`dial`), one session per registered connection
//! (`session`: HTTP/3 both ways, the peer's requests) and its control stream (`control`).
//!
//! Connection set-up, for the dialer D and the acceptor A (`SPEC.md` §Connections):
//! 1. QUIC + mutual TLS; the verifiers refuse wrong CAs, validity and SPIFFE IDs in the handshake.
//! 2. If a live connection to the same peer exists, the tie-break (`core::tiebreak`, applied by
//!    the peer table) keeps exactly one.
//! 3. Both HTTP/3 sessions start (`h3q`); D opens the control stream: a plain CONNECT to
//!    `CONTROL_AUTHORITY`. Both sides write the preface and a hello, then a catalog snapshot.
//! 4. The control loop answers pings, applies catalog changes, and declares the peer down when it
//!    has been silent for `peer_timeout` (`core::liveness`).
//!
//! What a peer's request asks for (a flow, an HTTP request) is not this layer's business: each
//! request goes to the [`Dispatch`] the node passed in.

pub(crate) mod control;
pub(crate) mod dial;
pub(crate) mod session;

use std::future::Future;
use std::pin::Pin;

use causeway_protocol::Identity;

use crate::core::abuse::StreamEnd;
use crate::ports::ServerStream;
use crate::state::{ConnFlow, Mesh};

/// One request a peer opened on its connection (not the control stream).
pub(crate) struct PeerRequest {
    pub req: http::Request<()>,
    pub stream: ServerStream,
    pub peer: Identity,
    /// Keeps a replaced connection open while the request is served.
    pub held: ConnFlow,
    /// The peer's new-flow rate (and throttle, `core::abuse`) let it through.
    pub admitted: bool,
}

/// Serves a peer's request until it ends; says how it ended (the rapid-reset rule's input).
pub(crate) type Dispatch = fn(Mesh, PeerRequest) -> Pin<Box<dyn Future<Output = StreamEnd> + Send>>;
