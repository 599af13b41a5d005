//! Causeway's wire formats and shared vocabulary.
//!
//! This crate defines what gateways say to each other and the names they say it with: parsed
//! newtypes for zones, services, gateways and SPIFFE identities; the control-stream codec (preface,
//! length-prefixed postcard frames, messages); the error codes put on the wire; the header names of a
//! service flow; and the limits every decoder enforces.
//!
//! It does NOT open sockets, spawn tasks or read files: no tokio, no quinn, no rustls. Everything here
//! is a pure function of its inputs, so it can be fuzzed and property-tested in isolation.
//! `SPEC.md` next to this crate is the normative description; this code is its reference.

pub mod codes;
pub mod control;
pub mod document;
pub mod flow;
pub mod identity;
pub mod limits;
pub mod names;
pub mod trace;
pub mod vip;

pub use codes::ErrorCode;
pub use identity::{Identity, IdentityError, TrustDomain};
pub use names::{GatewayId, NameError, ServiceName, ZoneName};
