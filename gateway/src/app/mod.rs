//! The composition root: from a validated [`Config`] to a running gateway, returning the addresses
//! actually bound so tests can ask for port 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use causeway_overlay::metrics::Metrics;
use causeway_overlay::{Credentials, Mesh, MeshConfig, TrustBundle};
use causeway_protocol::control::Protocol;
use causeway_protocol::TrustDomain;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{Admin, AdminState};
use crate::config::{Config, ConfigError, TlsPaths};
use crate::listeners::ImportListener;

mod reload;
mod tls_watch;

use self::reload::ImportRun;
pub use self::reload::{Reloaded, Reloader, Sources};
pub(crate) use self::tls_watch::watch_tls;

/// Reads the TLS files a configuration names and checks that our own identity is in its trust domain.
/// Errors carry the key path of the offending file.
pub fn load_tls(cfg: &Config) -> Result<(Credentials, TrustBundle), Vec<ConfigError>> {
    load_tls_files(&cfg.fixed.tls, &cfg.fixed.trust_domain)
}

pub(crate) fn load_tls_files(
    paths: &TlsPaths,
    td: &TrustDomain,
) -> Result<(Credentials, TrustBundle), Vec<ConfigError>> {
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
    let mut bundle = crate::certs::bundle_from_pem(&bundle).map_err(|e| err("tls.bundle", format!("{e:#}")))?;
    for (i, (fed_td, path)) in paths.federation.iter().enumerate() {
        let key = format!("federation[{i}].bundle");
        let pem = read(&key, path)?;
        bundle = crate::certs::federate_pem(bundle, fed_td.clone(), &pem).map_err(|e| err(&key, format!("{e:#}")))?;
    }
    Ok((creds, bundle))
}

/// A running gateway.
pub struct Gateway {
    pub mesh: Mesh,
    pub overlay_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub metrics: PrometheusHandle,
    reloader: Reloader,
    /// Applies mesh-wide documents (the mesh holds it weakly).
    _applier: Arc<dyn causeway_overlay::ports::DocumentHandler>,
    stop_listeners: CancellationToken,
    tasks: TaskTracker,
}

impl Gateway {
    /// Binds every socket and starts every component. Returns once all are bound.
    pub async fn start(cfg: &Config, creds: Credentials, bundle: TrustBundle) -> anyhow::Result<Self> {
        let (fixed, snap) = (&cfg.fixed, &cfg.snapshot);
        let recorder = crate::telemetry::recorder();
        let handle = recorder.handle();
        let metrics = Metrics::new(Arc::new(recorder));
        crate::metrics::describe(&metrics);
        // The policy exists before the mesh: a mesh cannot be built without its authorizer.
        let identity = creds.identity().context("tls.cert")?;
        let policy =
            crate::policy::Enforcer::new(snap.rule_spec(), fixed.zone.as_str(), identity.as_str(), metrics.clone());
        let mesh = Mesh::bind(MeshConfig {
            zone: fixed.zone.clone(),
            gateway: fixed.gateway.clone(),
            listen: fixed.overlay,
            credentials: creds,
            bundle,
            peers: snap.peers.clone(),
            exports: snap.exports.clone(),
            preferences: snap.preferences.clone(),
            redirectors: fixed.redirectors.clone(),
            http3_clients: fixed.http3_clients.clone(),
            workloads: fixed.workloads.clone(),
            client_allowlists: snap.client_allowlists.clone(),
            allowed_sources: fixed.allowed_sources.clone(),
            timing: fixed.timing,
            limits: fixed.limits_with(snap),
            publishers: fixed.publishers.clone(),
            metrics,
            authorizer: policy.clone(),
        })
        .context("listen.overlay")?;
        let resource = [("causeway.zone", fixed.zone.to_string()), ("causeway.gateway", fixed.gateway.to_string())];
        crate::telemetry::otlp::start(&fixed.tracing, mesh.metrics(), &resource).context("tracing.otlp")?;
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let ready = Arc::new(AtomicBool::new(false));

        let http = crate::http::Http::new(mesh.clone(), fixed.outlier_ejection, policy);
        let handler: Arc<dyn causeway_overlay::ports::HttpHandler> = http.clone();
        mesh.set_http_handler(&handler);
        let mut imports = Vec::new();
        for (i, imp) in snap.imports.iter().enumerate() {
            let h = (imp.protocol == Protocol::Http).then(|| http.clone());
            let l = ImportListener::bind(imp.listen, imp.service.clone(), h)
                .await
                .with_context(|| format!("imports[{i}].listen: cannot bind {}", imp.listen))?;
            let own = stop.child_token();
            let bound = l.local_addr();
            let accepting = tasks.spawn(l.run(mesh.clone(), own.clone()));
            imports.push(ImportRun { service: imp.service.clone(), listen: imp.listen, bound, stop: own, accepting });
        }
        let import_addrs: Vec<_> = imports.iter().map(|r| (r.service.to_string(), r.bound)).collect();
        let admin_addr = match fixed.admin {
            Some(addr) => {
                let state = AdminState {
                    mesh: Some(mesh.clone()),
                    metrics: handle.clone(),
                    ready: ready.clone(),
                    policy: Some(http.policy().clone()),
                };
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
        let reloader = Reloader {
            mesh: mesh.clone(),
            http,
            fixed: Arc::new(fixed.clone()),
            current: Arc::new(tokio::sync::watch::Sender::new(Arc::new(snap.clone()))),
            applying: Arc::new(tokio::sync::Mutex::new(Sources { file: Arc::new(cfg.clone()), document: None })),
            imports: Arc::new(Mutex::new(imports)),
            stop_listeners: stop.clone(),
            tasks: tasks.clone(),
        };
        // Mesh-wide documents: the last one applied first, then whatever peers send.
        let applier = Arc::new(crate::control::documents::Applier {
            reloader: reloader.clone(),
            mesh: mesh.clone(),
            state_dir: fixed.state_dir.clone(),
        });
        applier.restore().await;
        let applier: Arc<dyn causeway_overlay::ports::DocumentHandler> = applier;
        mesh.set_document_handler(&applier);
        if let Some(file) = &fixed.document_file {
            crate::control::documents::watch_file(
                mesh.clone(),
                file.clone(),
                fixed.tls.watch_interval,
                mesh_stopped(&mesh),
            );
        }
        tasks.spawn(mesh.clone().run());
        tokio::spawn(tls_watch::watch_gateway_tls(
            fixed.tls.clone(),
            fixed.trust_domain.clone(),
            mesh.clone(),
            mesh_stopped(&mesh),
        ));
        tasks.close();
        ready.store(true, Ordering::Relaxed);
        tracing::info!(
            zone = %fixed.zone, gateway = %fixed.gateway, identity = %mesh.identity(), overlay = %overlay_addr,
            admin = ?admin_addr, imports = ?import_addrs, "gateway.started"
        );
        Ok(Self {
            mesh,
            overlay_addr,
            admin_addr,
            metrics: handle,
            reloader,
            _applier: applier,
            stop_listeners: stop,
            tasks,
        })
    }

    /// The local listener of an imported service.
    pub fn import_addr(&self, service: &str) -> Option<SocketAddr> {
        let imports = self.reloader.imports.lock().unwrap_or_else(|e| e.into_inner());
        imports.iter().find(|r| r.service.as_str() == service).map(|r| r.bound)
    }

    /// The configuration snapshot in force (the file's, merged with any mesh-wide document).
    pub fn snapshot(&self) -> Arc<crate::config::Snapshot> {
        self.reloader.snapshot()
    }

    /// Applies a new configuration while running (see [`Reloader::reload`]).
    pub async fn reload(&self, new: &Config) -> Result<Reloaded, Vec<ConfigError>> {
        self.reloader.reload(new).await
    }

    /// Reloads the configuration from `path` when it changes or on SIGHUP, until the gateway stops.
    pub fn watch_config(&self, path: PathBuf, interval: Duration) {
        self.reloader.watch(path, interval, mesh_stopped(&self.mesh));
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
        self.reloader.http.policy().close();
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
