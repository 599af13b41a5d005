//! The mesh between zone gateways.
//!
//! One QUIC connection per gateway pair (mutual TLS with SPIFFE identities, ALPN `h3`) carries two
//! HTTP/3 sessions so either side can open flows (`h3q`), a control stream of postcard frames
//! (`session`), and every service flow as an HTTP/3 CONNECT stream (`flow`). The route table
//! (`routes`) decides where a new flow goes and is fed by peer catalogs, liveness and RTT.
//!
//! This crate does NOT read files, parse configuration, install a metrics recorder or listen on TCP
//! for clients: the `causeway` binary does that and hands accepted connections to [`Mesh`].

pub mod abuse;
pub mod budget;
pub mod congestion;
pub mod core;
pub mod flow;
pub mod frame_guard;
pub mod h3q;
mod handoff;
pub mod http;
pub mod log_limit;
pub mod mesh;
pub mod metrics;
pub mod redirector;
pub mod relay;
pub mod routes;
pub mod session;
pub mod tls;
pub mod transport;

pub use mesh::{Endpoint, Export, Limits, Mesh, MeshConfig, PeerSpec, Timing};
pub use tls::{Credentials, TrustBundle};
