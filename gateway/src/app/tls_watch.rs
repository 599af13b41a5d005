//! Rotated certificates and bundles, picked up while running: shared by the gateway and the
//! redirector.

use causeway_overlay::Mesh;
use causeway_protocol::TrustDomain;
use tokio_util::sync::CancellationToken;

use super::load_tls_files;
use crate::config::{ConfigError, TlsPaths};

/// Re-reads the certificate, key and bundle files every `interval`; when their content changed,
/// `apply` loads, checks and swaps them, and the outcome is logged: `tls.reloaded`, or
/// `tls.reload.refused` with each reason (the certificate in use keeps serving). Files are compared
/// by content, so a Kubernetes Secret's symlink swap and an in-place rewrite are both seen; a
/// half-written pair (new certificate, old key) is refused and picked up once complete. Shared by
/// the gateway and the redirector.
pub(crate) async fn watch_tls<A>(paths: TlsPaths, stop: CancellationToken, mut apply: A)
where
    A: FnMut() -> Result<bool, Vec<ConfigError>>,
{
    let snapshot = || {
        let files = [&paths.cert, &paths.key, &paths.bundle].into_iter().chain(paths.federation.iter().map(|(_, b)| b));
        files.map(|p| std::fs::read(p).ok()).collect::<Vec<_>>()
    };
    let mut seen = snapshot();
    let mut tick = tokio::time::interval(paths.watch_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = snapshot();
        if now == seen {
            continue;
        }
        seen = now;
        match apply() {
            Ok(leaf_changed) => tracing::info!(leaf_changed, "tls.reloaded"),
            Err(errors) => {
                for e in errors {
                    tracing::error!(path = %e.path, reason = %e.reason, "tls.reload.refused");
                }
            }
        }
    }
}

/// The gateway's [`watch_tls`]: a new leaf also replaces the peer connections ([`Mesh::update_tls`]).
pub(super) async fn watch_gateway_tls(paths: TlsPaths, td: TrustDomain, mesh: Mesh, stop: CancellationToken) {
    let files = paths.clone();
    watch_tls(paths, stop, move || {
        let (creds, bundle) = load_tls_files(&files, &td).inspect_err(|_| mesh.tls().count_refused())?;
        mesh.update_tls(creds, bundle).map_err(|e| vec![ConfigError { path: "tls".into(), reason: e.to_string() }])
    })
    .await
}
