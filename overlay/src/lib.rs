//! The mesh between zone gateways.
//!
//! One QUIC connection per gateway pair (mutual TLS with SPIFFE identities, ALPN `h3`) carries two
//! HTTP/3 sessions so either side can open flows, a control stream of postcard frames, and every
//! service flow as an HTTP/3 CONNECT stream.
//!
//! Layers, each importing only those before it:
//! - [`core`]: decisions without I/O — route table, catalog versions and diffs, liveness, the
//!   duplicate-connection tie-break, abuse rules, who a peer may vouch for. Time is passed in.
//! - [`transport`]: QUIC and TLS settings, the endpoint, the h3 adapter and its frame guard, the
//!   congestion controller, backoff.
//! - [`ports`]: what the overlay asks of the gateway (authorizer, HTTP handler) and the plain types
//!   both speak.
//! - [`state`]: [`Mesh`], in owned parts — peers and connections, exports and health, admission,
//!   open flows.
//! - [`peer`] (dialing, sessions, the control stream), [`flow`] (TCP flows out and in, the relay,
//!   HTTP requests across the overlay) and [`zone`] (redirectors and HTTP/3 clients of this zone).
//! - [`node`]: runs the mesh and dispatches connections and requests to the three above.
//! - [`redirector`]: the node agent's side (transport, core and the relay only).
//!
//! This crate does not parse configuration, install a metrics recorder or listen on TCP for
//! clients: the `causeway` binary does that and hands accepted connections to [`Mesh`]. The one
//! file it reads is `/proc/self/status`, for the memory budget.

pub mod access;
pub mod core;
pub mod flow;
pub mod log_limit;
pub mod metrics;
mod node;
pub mod peer;
pub mod ports;
pub mod redirector;
pub mod state;
pub mod transport;
pub mod zone;

pub use state::{Endpoint, Export, Limits, Mesh, MeshConfig, PeerSpec, Timing};
pub use transport::tls::{Credentials, TrustBundle};
