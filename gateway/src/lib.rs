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
pub mod control;
pub mod demo;
pub mod http;
pub mod listeners;
pub mod metrics;
pub mod parse;
pub mod policy;
pub mod ratelimit;
pub mod redirect;
pub mod rules;
pub mod telemetry;

pub use app::Gateway;

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the process can only be killed; run until then.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
