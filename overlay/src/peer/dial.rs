//! Dialing a peer: one connection kept per peer we can dial, redialed with backoff, replaced
//! make-before-break when our certificate changes, and abandoned when the peer's own dial wins.

use std::time::Duration;

use causeway_protocol::ErrorCode;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::PEER_CONNECTS;
use crate::peer::Dispatch;
use crate::state::{Mesh, PeerSpec};
use crate::transport::{self, Backoff};

/// Keeps one connection to a peer we can dial, until `stop` (shutdown, or the peer removed).
pub(crate) async fn dial_loop(mesh: Mesh, spec: PeerSpec, stop: CancellationToken, dispatch: Dispatch) {
    let Some(addr) = spec.address.clone() else { return };
    let t = mesh.timing();
    let mut backoff = Backoff::new(t.backoff_min, t.backoff_max);
    let peer_zone = spec.zone.as_ref().map(|z| z.to_string()).unwrap_or_default();
    let mut refresh = mesh.peer_table().refresh();
    // When the connection this loop last established was registered.
    let mut connected: Option<Instant> = None;
    // Our certificate changed and the connection up was made with the old one: replace it (kept
    // until a replacement is registered, so a failed dial is retried after the backoff).
    let mut replace = false;
    loop {
        let changed = mesh.peer_table().conn_changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if stop.is_cancelled() || mesh.is_draining() {
            return;
        }
        // With a connection up, wait for it to end, or for our certificate to change (then a new
        // connection replaces it, make-before-break).
        let up = mesh.peer_table().connected(&spec.id);
        if !up {
            replace = false;
        }
        if up && !replace {
            tokio::select! {
                _ = changed => continue,
                r = refresh.changed() => {
                    if r.is_err() {
                        return;
                    }
                    replace = true;
                }
                _ = stop.cancelled() => return,
            }
        } else if let Some(since) = connected.filter(|_| !up) {
            connected = None;
            // The connection ended. One that lived long was healthy: redial at once, from the
            // shortest delay; one that did not backs off like a failed dial.
            if since.elapsed() > t.backoff_max {
                backoff.reset();
            } else if !sleep_or_stop(&stop, backoff.next_delay()).await {
                return;
            }
            continue;
        }
        // A connection the peer dialed may complete while our own dial is still retransmitting its
        // Initial; then our dial is abandoned rather than completed as a duplicate.
        let changed = mesh.peer_table().conn_changed();
        let mut attempt = {
            let (mesh, spec, addr) = (mesh.clone(), spec.clone(), addr.clone());
            tokio::spawn(async move { dial(&mesh, &spec, &addr).await })
        };
        let dialing = async {
            tokio::pin!(changed);
            loop {
                tokio::select! {
                    r = &mut attempt => return r.unwrap_or_else(|e| Err(e.to_string())),
                    _ = &mut changed => {
                        if !replace && mesh.peer_table().connected(&spec.id) {
                            // Abandoned, not dropped: a dropped handshake closes with code 0,
                            // which the peer — whose side of it may be complete — cannot tell
                            // from a failure. It is finished and closed as the duplicate it is.
                            tokio::spawn(async move {
                                if let Ok(Ok(c)) = attempt.await {
                                    transport::close(&c, ErrorCode::DUPLICATE_CONNECTION, "the peer connected first");
                                }
                            });
                            return Err("the peer connected first".to_string());
                        }
                        changed.set(mesh.peer_table().conn_changed());
                    }
                }
            }
        };
        match dialing.await {
            Ok(conn) => {
                mesh.metrics()
                    .counter(PEER_CONNECTS, &[("peer_zone", &peer_zone), ("direction", "dial"), ("result", "ok")])
                    .increment(1);
                if let Some(reg) = crate::peer::session::register(&mesh, &spec.id, &conn, true) {
                    connected = Some(Instant::now());
                    replace = false;
                    tokio::spawn(crate::peer::session::serve_connection(
                        mesh.clone(),
                        conn,
                        true,
                        spec.id.clone(),
                        reg,
                        dispatch,
                    ));
                    continue;
                }
            }
            Err(e) => {
                mesh.metrics()
                    .counter(PEER_CONNECTS, &[("peer_zone", &peer_zone), ("direction", "dial"), ("result", "error")])
                    .increment(1);
                tracing::debug!(peer = %spec.id, %addr, error = %e, "peer.dial.failed");
            }
        }
        if !sleep_or_stop(&stop, backoff.next_delay()).await {
            return;
        }
    }
}

/// Sleeps, or returns false at once when stopped.
async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.cancelled() => false,
    }
}

async fn dial(mesh: &Mesh, spec: &PeerSpec, target: &str) -> Result<quinn::Connection, String> {
    let tls = mesh.tls().client(spec.id.clone()).map_err(|e| e.to_string())?;
    let (t, limits) = (mesh.timing(), mesh.limits());
    let cfg = transport::client_config(tls, t.transport, limits.quic).map_err(|e| e.to_string())?;
    transport::dial(mesh.endpoint(), cfg, target, t.handshake_timeout).await
}
