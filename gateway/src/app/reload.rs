//! Configuration changes while running: a new [`Snapshot`] is checked against what is running,
//! its listeners bound, and then swapped in whole; a change to the [`StaticConfig`] is refused.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_overlay::metrics::CONFIG_RELOADS;
use causeway_overlay::Mesh;
use causeway_protocol::control::Protocol;
use causeway_protocol::ServiceName;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError, Snapshot, StaticConfig};
use crate::listeners::ImportListener;

/// One import listener as running.
pub(super) struct ImportRun {
    pub(super) service: ServiceName,
    pub(super) listen: SocketAddr,
    pub(super) bound: SocketAddr,
    pub(super) stop: CancellationToken,
    /// Its accept loop: ended (and the socket closed) once `stop` has been cancelled.
    pub(super) accepting: tokio::task::JoinHandle<()>,
}

/// Applies configuration reloads to a running gateway (see [`Reloader::reload`]).
#[derive(Clone)]
pub struct Reloader {
    pub(super) mesh: Mesh,
    pub(super) http: Arc<crate::http::Http>,
    /// Fixed for the process.
    pub(super) fixed: Arc<StaticConfig>,
    /// The snapshot in force; replaced whole by each change.
    pub(super) current: Arc<watch::Sender<Arc<Snapshot>>>,
    /// One change at a time (the file watcher and mesh-wide documents may race); it guards the
    /// sources a snapshot is composed from: the file's last accepted configuration and the
    /// document in force.
    pub(super) applying: Arc<tokio::sync::Mutex<Sources>>,
    pub(super) imports: Arc<Mutex<Vec<ImportRun>>>,
    pub(super) stop_listeners: CancellationToken,
    pub(super) tasks: TaskTracker,
}

/// What the snapshot in force was composed from.
pub struct Sources {
    pub(super) file: Arc<Config>,
    pub(super) document: Option<crate::control::InForce>,
}

/// What a reload changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    pub peers_added: usize,
    pub peers_removed: usize,
    pub exports_changed: bool,
    pub imports_added: usize,
    pub imports_removed: usize,
    pub http_routes_changed: bool,
    pub authorization_changed: bool,
    /// Open flows reset because the new policy no longer allows them.
    pub flows_revoked: usize,
}

impl Reloader {
    /// Applies `new` to the running gateway: its fixed part must equal the running one (each key
    /// that differs is refused, naming it: restart to apply), and its snapshot is swapped in whole —
    /// peers, exports and imports are added, removed or changed without touching unrelated flows
    /// (a removed peer's connections close at once, a removed import's listener stops accepting
    /// while its open flows run on). A refused change leaves everything as it was, as does a new
    /// listener that cannot bind.
    ///
    /// With a mesh-wide document in force, the new file is merged with it as it was with the old
    /// one ([`crate::control::compose`]); a file the document no longer fits is refused.
    pub async fn reload(&self, new: &Config) -> Result<Reloaded, Vec<ConfigError>> {
        let mut sources = self.applying.lock().await;
        let res = self.reload_locked(&mut sources, new).await;
        let result = if res.is_ok() { "ok" } else { "refused" };
        self.mesh.metrics().counter(CONFIG_RELOADS, &[("result", result)]).increment(1);
        res
    }

    async fn reload_locked(&self, sources: &mut Sources, new: &Config) -> Result<Reloaded, Vec<ConfigError>> {
        self.fixed_unchanged(new)?;
        let composed = match &sources.document {
            Some(d) => crate::control::compose(new, &d.document)?,
            None => new.clone(),
        };
        let r = self.apply_locked(sources, Arc::new(composed.snapshot)).await?;
        sources.file = Arc::new(new.clone());
        Ok(r)
    }

    fn fixed_unchanged(&self, new: &Config) -> Result<(), Vec<ConfigError>> {
        let fixed: Vec<ConfigError> = self
            .fixed
            .changed_keys(&new.fixed)
            .into_iter()
            .map(|key| ConfigError { path: key.into(), reason: "cannot change while running: restart to apply".into() })
            .collect();
        if fixed.is_empty() {
            Ok(())
        } else {
            Err(fixed)
        }
    }

    /// Applies a verified mesh-wide document, merged with the file ([`crate::control::compose`]).
    /// `Ok(None)`: skipped, because the mesh holds a newer document by now (its own apply follows).
    pub async fn apply_document(
        &self,
        v: &Arc<causeway_overlay::core::documents::Verified>,
    ) -> Result<Option<Reloaded>, Vec<ConfigError>> {
        let mut sources = self.applying.lock().await;
        if self.mesh.held_document().is_some_and(|h| h.key() != v.key()) {
            return Ok(None);
        }
        let document = crate::control::parse_document(&v.content)?;
        let composed = crate::control::compose(&sources.file, &document)?;
        self.fixed_unchanged(&composed)?;
        let r = self.apply_locked(&mut sources, Arc::new(composed.snapshot)).await?;
        sources.document = Some(crate::control::InForce { verified: v.clone(), document });
        Ok(Some(r))
    }

    /// The mesh-wide document in force, if any.
    pub async fn document(&self) -> Option<crate::control::InForce> {
        self.applying.lock().await.document.clone()
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.borrow().clone()
    }

    async fn apply_locked(&self, _sources: &mut Sources, new: Arc<Snapshot>) -> Result<Reloaded, Vec<ConfigError>> {
        let old = self.snapshot();
        // A listener keeps the protocol it was bound with.
        let rebound = new.imports.iter().enumerate().find(|(_, n)| {
            old.imports.iter().any(|o| (&o.service, o.listen) == (&n.service, n.listen) && o.protocol != n.protocol)
        });
        if let Some((i, _)) = rebound {
            return Err(vec![ConfigError {
                path: format!("imports[{i}].protocol"),
                reason: "cannot change while running: restart to apply".into(),
            }]);
        }
        // Imports: bind the new listeners first, so a failure leaves everything as it was.
        let running: Vec<(ServiceName, SocketAddr)> = self
            .imports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|r| (r.service.clone(), r.listen))
            .collect();
        let mut bound = Vec::new();
        for (i, imp) in new.imports.iter().enumerate() {
            if running.contains(&(imp.service.clone(), imp.listen)) {
                continue;
            }
            let http = (imp.protocol == Protocol::Http).then(|| self.http.clone());
            match ImportListener::bind(imp.listen, imp.service.clone(), http).await {
                Ok(l) => bound.push((imp.clone(), l)),
                Err(e) => {
                    return Err(vec![ConfigError {
                        path: format!("imports[{i}].listen"),
                        reason: format!("cannot bind {}: {e}", imp.listen),
                    }])
                }
            }
        }
        let mut out = Reloaded { imports_added: bound.len(), ..Default::default() };
        let removed: Vec<ImportRun> = {
            let mut imports = self.imports.lock().unwrap_or_else(|e| e.into_inner());
            let (kept, removed) = std::mem::take(&mut *imports)
                .into_iter()
                .partition(|r| new.imports.iter().any(|i| i.service == r.service && i.listen == r.listen));
            *imports = kept;
            for (imp, l) in bound {
                let stop = self.stop_listeners.child_token();
                let bound = l.local_addr();
                let accepting = self.tasks.spawn(l.run(self.mesh.clone(), stop.clone()));
                imports.push(ImportRun { service: imp.service, listen: imp.listen, bound, stop, accepting });
            }
            removed
        };
        // A removed listener stops accepting before the change is reported (its open flows run on).
        out.imports_removed = removed.len();
        for r in removed {
            r.stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), r.accepting).await;
        }
        self.mesh.set_memory_budget(new.memory_budget);
        self.mesh.set_preferences(new.preferences.clone());
        let r = self.mesh.reconfigure(new.peers.clone(), new.exports.clone());
        out.peers_added = r.peers_added;
        out.peers_removed = r.peers_removed;
        out.exports_changed = r.exports_changed;
        out.http_routes_changed = old.http_routes != new.http_routes;
        out.authorization_changed = old.authorization != new.authorization;
        // Routes, endpoint options, policy and rate limits: one swap.
        self.http.policy().install(new.rule_spec());
        self.http.retain_endpoints(&self.mesh.endpoint_addrs());
        self.mesh.set_client_allowlists(new.client_allowlists.clone());
        if out.authorization_changed {
            out.flows_revoked = self.mesh.reauthorize();
        }
        self.current.send_replace(new);
        Ok(out)
    }

    /// Re-reads `path` every `interval` (by content) and on SIGHUP, and reloads what changed. A file
    /// that does not parse or validate is refused with the same errors as `causeway check`, logged
    /// and counted (`config_reloads_total{result="refused"}`), and the running configuration stays.
    pub fn watch(&self, path: PathBuf, interval: Duration, stop: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut seen = std::fs::read(&path).ok();
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let forced = tokio::select! {
                    _ = tick.tick() => false,
                    _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => true,
                    _ = stop.cancelled() => return,
                };
                let now = std::fs::read(&path).ok();
                if now == seen && !forced {
                    continue;
                }
                seen = now;
                let res = match crate::config::load(&path) {
                    Ok(cfg) => this.reload(&cfg).await,
                    Err(e) => {
                        this.mesh.metrics().counter(CONFIG_RELOADS, &[("result", "refused")]).increment(1);
                        Err(e.errors)
                    }
                };
                match res {
                    Ok(r) => tracing::info!(
                        peers_added = r.peers_added,
                        peers_removed = r.peers_removed,
                        exports_changed = r.exports_changed,
                        imports_added = r.imports_added,
                        imports_removed = r.imports_removed,
                        http_routes_changed = r.http_routes_changed,
                        authorization_changed = r.authorization_changed,
                        flows_revoked = r.flows_revoked,
                        "config.reloaded"
                    ),
                    Err(errors) => {
                        for e in errors {
                            tracing::error!(path = %e.path, reason = %e.reason, "config.reload.refused");
                        }
                    }
                }
            }
        });
    }
}
