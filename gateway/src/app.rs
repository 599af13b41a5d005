//! The composition root: from a validated [`Config`] to a running gateway, returning the addresses
//! actually bound so tests can ask for port 0.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use causeway_overlay::metrics::Metrics;
use causeway_overlay::{Credentials, Mesh, MeshConfig, TrustBundle};
use causeway_protocol::{ServiceName, TrustDomain};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{Admin, AdminState};
use crate::config::{Config, ConfigError, TlsPaths};
use crate::listeners::ImportListener;

/// Reads the TLS files a configuration names and checks that our own identity is in its trust domain.
/// Errors carry the key path of the offending file.
pub fn load_tls(cfg: &Config) -> Result<(Credentials, TrustBundle), Vec<ConfigError>> {
    load_tls_files(&cfg.tls, &cfg.trust_domain)
}

fn load_tls_files(paths: &TlsPaths, td: &TrustDomain) -> Result<(Credentials, TrustBundle), Vec<ConfigError>> {
    let err = |path: &str, reason: String| vec![ConfigError { path: path.into(), reason }];
    let read = |path: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| err(path, format!("cannot read {}: {e}", p.display())))
    };
    let cert = read("tls.cert", &paths.cert)?;
    let key = read("tls.key", &paths.key)?;
    let bundle = read("tls.bundle", &paths.bundle)?;
    let creds = crate::certs::credentials_from_pem(&cert, &key).map_err(|e| err("tls.cert", format!("{e:#}")))?;
    let id = creds.identity().map_err(|e| err("tls.cert", e.to_string()))?;
    if id.trust_domain() != *td {
        return Err(err("tls.cert", format!("certificate identity {id} is not in trust_domain {td}")));
    }
    let bundle = crate::certs::bundle_from_pem(&bundle).map_err(|e| err("tls.bundle", format!("{e:#}")))?;
    Ok((creds, bundle))
}

/// Re-reads the certificate, key and bundle every `interval`. A changed set that loads and passes
/// [`Mesh::update_tls`] is used for every later handshake (and peer connections are replaced
/// make-before-break when the leaf changed); anything else is refused with its reason, logged and
/// counted, and the certificate in use keeps serving. Files are compared by content, so a
/// Kubernetes Secret's symlink swap and an in-place rewrite are both seen; a half-written pair
/// (new certificate, old key) is refused and picked up once complete.
async fn watch_tls(paths: TlsPaths, td: TrustDomain, mesh: Mesh, stop: CancellationToken) {
    let snapshot = || [&paths.cert, &paths.key, &paths.bundle].map(|p| std::fs::read(p).ok());
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
        match load_tls_files(&paths, &td) {
            Ok((creds, bundle)) => match mesh.update_tls(creds, bundle) {
                Ok(leaf_changed) => tracing::info!(leaf_changed, "tls.reloaded"),
                Err(e) => tracing::error!(error = %e, "tls.reload.refused"),
            },
            Err(errors) => {
                mesh.tls_refused();
                for e in errors {
                    tracing::error!(path = %e.path, reason = %e.reason, "tls.reload.refused");
                }
            }
        }
    }
}

/// A running gateway.
pub struct Gateway {
    pub mesh: Mesh,
    pub overlay_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub import_addrs: Vec<(ServiceName, SocketAddr)>,
    pub metrics: PrometheusHandle,
    stop_listeners: CancellationToken,
    tasks: TaskTracker,
}

impl Gateway {
    /// Binds every socket and starts every component. Returns once all are bound.
    pub async fn start(cfg: &Config, creds: Credentials, bundle: TrustBundle) -> anyhow::Result<Self> {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let metrics = Metrics::new(Arc::new(recorder));
        let mesh = Mesh::bind(MeshConfig {
            zone: cfg.zone.clone(),
            gateway: cfg.gateway.clone(),
            listen: cfg.overlay,
            credentials: creds,
            bundle,
            peers: cfg.peers.clone(),
            exports: cfg.exports.clone(),
            preferences: cfg.preferences.clone(),
            redirectors: cfg.redirectors.clone(),
            workloads: cfg.workloads.clone(),
            allowed_sources: cfg.allowed_sources.clone(),
            timing: cfg.timing,
            metrics,
        })
        .context("listen.overlay")?;
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let ready = Arc::new(AtomicBool::new(false));

        let mut import_addrs = Vec::new();
        for (i, imp) in cfg.imports.iter().enumerate() {
            let l = ImportListener::bind(imp.listen, imp.service.clone())
                .await
                .with_context(|| format!("imports[{i}].listen: cannot bind {}", imp.listen))?;
            import_addrs.push((imp.service.clone(), l.local_addr()));
            tasks.spawn(l.run(mesh.clone(), stop.clone()));
        }
        let admin_addr = match cfg.admin {
            Some(addr) => {
                let state = AdminState { mesh: Some(mesh.clone()), metrics: handle.clone(), ready: ready.clone() };
                let admin =
                    Admin::bind(addr, state).await.with_context(|| format!("listen.admin: cannot bind {addr}"))?;
                let bound = admin.local_addr();
                // The admin server outlives the listeners so a drain can be observed (`/ready` is 503).
                tokio::spawn(admin.run(mesh_stopped(&mesh)));
                Some(bound)
            }
            None => None,
        };
        let overlay_addr = mesh.local_addr();
        tasks.spawn(mesh.clone().run());
        tokio::spawn(watch_tls(cfg.tls.clone(), cfg.trust_domain.clone(), mesh.clone(), mesh_stopped(&mesh)));
        tasks.close();
        ready.store(true, Ordering::Relaxed);
        tracing::info!(
            zone = %cfg.zone, gateway = %cfg.gateway, identity = %mesh.identity(), overlay = %overlay_addr,
            admin = ?admin_addr, imports = ?import_addrs, "gateway.started"
        );
        Ok(Self { mesh, overlay_addr, admin_addr, import_addrs, metrics: handle, stop_listeners: stop, tasks })
    }

    /// The local listener of an imported service.
    pub fn import_addr(&self, service: &str) -> Option<SocketAddr> {
        self.import_addrs.iter().find(|(s, _)| s.as_str() == service).map(|(_, a)| *a)
    }

    /// Prometheus text of this gateway's metrics.
    pub fn metrics_text(&self) -> String {
        self.metrics.run_upkeep();
        self.metrics.render()
    }

    /// Graceful stop: listeners close, peers are told (goodbye), open flows get until `deadline`.
    pub async fn drain(self, deadline: Duration) -> usize {
        self.stop_listeners.cancel();
        let cut = self.mesh.drain(deadline).await;
        self.finish().await;
        cut
    }

    /// Immediate stop: every connection closed now.
    pub async fn shutdown(self) {
        self.stop_listeners.cancel();
        self.mesh.shutdown();
        self.finish().await;
    }

    async fn finish(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.mesh.wait_closed()).await;
    }
}

/// A token cancelled when the mesh has shut down (the admin server stops with it).
fn mesh_stopped(mesh: &Mesh) -> CancellationToken {
    let t = CancellationToken::new();
    let (mesh, child) = (mesh.clone(), t.clone());
    tokio::spawn(async move {
        mesh.stopped().await;
        child.cancel();
    });
    t
}
