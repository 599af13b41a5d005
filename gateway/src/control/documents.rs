//! Mesh-wide documents at this gateway: the overlay verifies and floods them; this applies each
//! one (merged with the file, validated as `causeway check` would), reports the outcome back over
//! the overlay, writes an audit line, and keeps the last one applied on disk so a restart with no
//! publisher reachable serves it again.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use causeway_overlay::core::documents::Verified;
use causeway_overlay::state::documents::Origin;
use causeway_overlay::Mesh;
use causeway_protocol::document::{DocumentState, SignedDocument, MAX_BODY_LEN};

use crate::app::Reloader;

/// The version of the mesh-wide document in force at this gateway (0: none).
pub const DOCUMENT_VERSION: &str = "causeway_mesh_document_version";
/// Documents this gateway applied or refused (after verification), by result.
pub const DOCUMENT_APPLIES: &str = "causeway_mesh_document_applies_total";

/// The file the last applied document is kept in, under `control.state_dir`.
pub const STATE_FILE: &str = "mesh-document.postcard";

/// Applies verified documents to a running gateway (the overlay's `DocumentHandler`).
pub struct Applier {
    pub reloader: Reloader,
    pub mesh: Mesh,
    pub state_dir: Option<PathBuf>,
}

impl causeway_overlay::ports::DocumentHandler for Applier {
    fn apply(self: Arc<Self>, doc: Arc<Verified>) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move { self.apply_now(&doc).await })
    }
}

impl Applier {
    /// Applies `v` and reports what happened.
    pub async fn apply_now(&self, v: &Arc<Verified>) {
        let m = self.mesh.metrics();
        match self.reloader.apply_document(v).await {
            Ok(None) => {}
            Ok(Some(r)) => {
                m.counter(DOCUMENT_APPLIES, &[("result", "applied")]).increment(1);
                m.gauge(DOCUMENT_VERSION, &[]).set(v.version as f64);
                if let Some(dir) = &self.state_dir {
                    if let Err(e) = persist(dir, &v.signed) {
                        tracing::error!(error = %e, dir = %dir.display(), "document.persist.failed");
                    }
                }
                tracing::info!(
                    target: "causeway::audit",
                    kind = "document",
                    result = "applied",
                    version = v.version,
                    digest = %v.digest_hex(),
                    publisher = %v.publisher,
                    http_routes_changed = r.http_routes_changed,
                    authorization_changed = r.authorization_changed,
                    flows_revoked = r.flows_revoked,
                    "document.applied"
                );
                self.mesh.report_document(v, DocumentState::Applied, "");
            }
            Err(errors) => {
                m.counter(DOCUMENT_APPLIES, &[("result", "refused")]).increment(1);
                let reason = errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ");
                tracing::warn!(
                    target: "causeway::audit",
                    kind = "document",
                    result = "refused",
                    version = v.version,
                    digest = %v.digest_hex(),
                    publisher = %v.publisher,
                    reason = %reason,
                    "document.refused"
                );
                self.mesh.report_document(v, DocumentState::Refused, &reason);
            }
        }
    }

    /// At start: the persisted document, verified as of when it was published, applied before
    /// the gateway reports ready. A missing file is no document; an unreadable or refused one is
    /// logged and skipped (peers will send the current one).
    pub async fn restore(&self) {
        let Some(dir) = &self.state_dir else { return };
        let path = dir.join(STATE_FILE);
        let doc = match read(&path) {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), "document.restore.failed");
                return;
            }
        };
        if let Ok(causeway_overlay::state::documents::Accepted::Newer(v)) =
            self.mesh.offer_document(doc, Origin::Persisted)
        {
            tracing::info!(version = v.version, digest = %v.digest_hex(), "document.restored");
            self.apply_now(&v).await;
        }
    }
}

/// `control.document_file` (GitOps): every `interval`, and at once, whenever the file's content
/// differs from the document held, this gateway publishes it as the next version, signed with its
/// own identity (which must be in `control.publishers` for any gateway to accept it). A file that
/// does not parse as a document is logged and skipped. Two gateways watching the same file
/// publish the same content: whichever version wins, the content in force is the file's.
pub fn watch_file(mesh: Mesh, path: PathBuf, interval: std::time::Duration, stop: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refused: Option<String> = None;
        let mut too_big = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            // Bounded before reading: a document is at most MAX_CONTENT_LEN bytes.
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if size > causeway_protocol::document::MAX_CONTENT_LEN as u64 {
                if !too_big {
                    tracing::error!(file = %path.display(), size, "document.file.refused: over the size limit");
                    too_big = true;
                }
                continue;
            }
            too_big = false;
            let Ok(content) = std::fs::read_to_string(&path) else { continue };
            let held = mesh.held_document();
            if held.as_ref().is_some_and(|h| h.content == content) || refused.as_ref() == Some(&content) {
                continue;
            }
            if let Err(errors) = super::parse_document(&content) {
                let reason = errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ");
                tracing::error!(file = %path.display(), %reason, "document.file.refused");
                refused = Some(content);
                continue;
            }
            let version = held.map(|h| h.version).unwrap_or(0) + 1;
            let signed = super::publish::sign_with(version, &content, |msg| mesh.tls().sign(msg));
            let res = signed
                .map_err(|e| format!("{e:#}"))
                .and_then(|doc| mesh.offer_document(doc, Origin::Local).map_err(|e| e.to_string()));
            match res {
                Ok(_) => tracing::info!(file = %path.display(), version, "document.file.published"),
                Err(reason) => {
                    tracing::error!(file = %path.display(), %reason, "document.file.refused");
                    refused = Some(content);
                }
            }
        }
    });
}

/// Writes the document atomically (a temporary file renamed over the old one).
fn persist(dir: &Path, doc: &SignedDocument) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes = postcard::to_stdvec(doc).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, dir.join(STATE_FILE))
}

fn read(path: &Path) -> std::io::Result<Option<SignedDocument>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if bytes.len() > 2 * MAX_BODY_LEN {
        return Err(std::io::Error::other("larger than any document"));
    }
    postcard::from_bytes(&bytes).map(Some).map_err(std::io::Error::other)
}
