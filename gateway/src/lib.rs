//! The `causeway` binary's library: configuration, certificates, listeners, admin API, the
//! composition root and the subcommands. It reads files, parses the command line and installs the
//! metrics recorder; the mesh logic lives in `causeway-overlay`, the wire formats in
//! `causeway-protocol`.
//!
//! It does NOT implement routing, sessions or flows itself.

pub mod admin;
pub mod app;
pub mod certs;
pub mod config;
pub mod demo;
pub mod listeners;
pub mod telemetry;

pub use app::Gateway;
