//! The composition root: from a validated [`Config`] to a running gateway, returning the addresses
//! actually bound so tests can ask for port 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use causeway_overlay::metrics::{Metrics, CONFIG_RELOADS};
use causeway_overlay::{Credentials, Mesh, MeshConfig, TrustBundle};
use causeway_protocol::control::Protocol;
use causeway_protocol::{ServiceName, TrustDomain};
use metrics_exporter_prometheus::PrometheusHandle;
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
async fn watch_gateway_tls(paths: TlsPaths, td: TrustDomain, mesh: Mesh, stop: CancellationToken) {
    let files = paths.clone();
    watch_tls(paths, stop, move || {
        let (creds, bundle) = load_tls_files(&files, &td).inspect_err(|_| mesh.tls().count_refused())?;
        mesh.update_tls(creds, bundle).map_err(|e| vec![ConfigError { path: "tls".into(), reason: e.to_string() }])
    })
    .await
}

/// A running gateway.
pub struct Gateway {
    pub mesh: Mesh,
    pub overlay_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub metrics: PrometheusHandle,
    reloader: Reloader,
    stop_listeners: CancellationToken,
    tasks: TaskTracker,
}

/// One import listener as running.
struct ImportRun {
    service: ServiceName,
    listen: SocketAddr,
    bound: SocketAddr,
    stop: CancellationToken,
}

/// Applies configuration reloads to a running gateway (see [`Reloader::reload`]).
#[derive(Clone)]
pub struct Reloader {
    mesh: Mesh,
    http: Arc<crate::http::Http>,
    config: Arc<Mutex<Config>>,
    imports: Arc<Mutex<Vec<ImportRun>>>,
    stop_listeners: CancellationToken,
    tasks: TaskTracker,
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
    /// Applies `new` to the running gateway: peers, exports and imports are added, removed or
    /// changed without touching unrelated flows (a removed peer's connections close at once, a
    /// removed import's listener stops accepting while its open flows run on). Any other key needs
    /// a restart: a change to one refuses the whole reload, naming the key, and the running
    /// configuration stays as it was — as it does when a new listener cannot bind.
    pub async fn reload(&self, new: &Config) -> Result<Reloaded, Vec<ConfigError>> {
        let metrics = self.mesh.metrics();
        let res = self.apply(new).await;
        let result = if res.is_ok() { "ok" } else { "refused" };
        metrics.counter(CONFIG_RELOADS, &[("result", result)]).increment(1);
        res
    }

    async fn apply(&self, new: &Config) -> Result<Reloaded, Vec<ConfigError>> {
        let old = self.config.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let fixed = |path: &str, changed: bool| {
            changed.then(|| ConfigError {
                path: path.into(),
                reason: "cannot change while running: restart to apply".into(),
            })
        };
        let d = |x: &dyn std::fmt::Debug| format!("{x:?}");
        let (ot, nt) = (&old.tls, &new.tls);
        let errors: Vec<ConfigError> = [
            fixed("zone", old.zone != new.zone),
            fixed("gateway", old.gateway != new.gateway),
            fixed("trust_domain", old.trust_domain != new.trust_domain),
            fixed("tls", (&ot.cert, &ot.key, &ot.bundle) != (&nt.cert, &nt.key, &nt.bundle)),
            fixed("federation", ot.federation != nt.federation),
            fixed("imports[].protocol", {
                let p = |c: &Config| {
                    c.imports.iter().map(|i| (i.service.clone(), i.listen, i.protocol)).collect::<Vec<_>>()
                };
                let (o, n) = (p(&old), p(new));
                n.iter().any(|x| o.iter().any(|y| (&y.0, y.1) == (&x.0, x.1) && y.2 != x.2))
            }),
            fixed("listen.overlay", old.overlay != new.overlay),
            fixed("listen.admin", old.admin != new.admin),
            fixed("redirectors", old.redirectors != new.redirectors),
            fixed("http3_clients", old.http3_clients != new.http3_clients),
            fixed("workloads", old.workloads != new.workloads),
            fixed("allowed_sources", old.allowed_sources != new.allowed_sources),
            fixed(
                "timing",
                d(&old.timing) != d(&new.timing)
                    || old.outlier_ejection != new.outlier_ejection
                    || ot.watch_interval != nt.watch_interval,
            ),
            // The memory budget applies live; every other limit is fixed at start.
            fixed(
                "limits",
                causeway_overlay::Limits { memory_budget: None, ..old.limits }
                    != causeway_overlay::Limits { memory_budget: None, ..new.limits },
            ),
            fixed("log", (old.log_format, &old.log_level) != (new.log_format, &new.log_level)),
            fixed("tracing", old.tracing != new.tracing),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !errors.is_empty() {
            return Err(errors);
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
        {
            let mut imports = self.imports.lock().unwrap_or_else(|e| e.into_inner());
            imports.retain(|r| {
                let keep = new.imports.iter().any(|i| i.service == r.service && i.listen == r.listen);
                if !keep {
                    r.stop.cancel();
                    out.imports_removed += 1;
                }
                keep
            });
            for (imp, l) in bound {
                let stop = self.stop_listeners.child_token();
                imports.push(ImportRun {
                    service: imp.service,
                    listen: imp.listen,
                    bound: l.local_addr(),
                    stop: stop.clone(),
                });
                self.tasks.spawn(l.run(self.mesh.clone(), stop));
            }
        }
        self.mesh.set_memory_budget(new.limits.memory_budget);
        self.mesh.set_preferences(new.preferences.clone());
        let r = self.mesh.reconfigure(new.peers.clone(), new.exports.clone());
        out.peers_added = r.peers_added;
        out.peers_removed = r.peers_removed;
        out.exports_changed = r.exports_changed;
        out.http_routes_changed = old.http_routes != new.http_routes;
        self.http.reconfigure(new.http_settings(), &self.mesh.endpoint_addrs());
        out.authorization_changed = old.authorization != new.authorization;
        self.http.policy().replace(new.authorization.clone());
        self.mesh.set_client_allowlists(new.client_allowlists.clone());
        if old.rate_limits != new.rate_limits || old.rate_limit_store != new.rate_limit_store {
            self.http.policy().replace_limits(&new.rate_limits, new.rate_limit_store.as_ref());
        }
        if out.authorization_changed {
            out.flows_revoked = self.mesh.reauthorize();
        }
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = new.clone();
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

impl Gateway {
    /// Binds every socket and starts every component. Returns once all are bound.
    pub async fn start(cfg: &Config, creds: Credentials, bundle: TrustBundle) -> anyhow::Result<Self> {
        let recorder = crate::telemetry::recorder();
        let handle = recorder.handle();
        let metrics = Metrics::new(Arc::new(recorder));
        crate::metrics::describe(&metrics);
        // The policy exists before the mesh: a mesh cannot be built without its authorizer.
        let identity = creds.identity().context("tls.cert")?;
        let policy = crate::policy::Enforcer::new(
            cfg.authorization.clone(),
            &cfg.rate_limits,
            cfg.rate_limit_store.as_ref(),
            cfg.zone.as_str(),
            identity.as_str(),
            metrics.clone(),
        );
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
            http3_clients: cfg.http3_clients.clone(),
            workloads: cfg.workloads.clone(),
            client_allowlists: cfg.client_allowlists.clone(),
            allowed_sources: cfg.allowed_sources.clone(),
            timing: cfg.timing,
            limits: cfg.limits,
            metrics,
            authorizer: policy.clone(),
        })
        .context("listen.overlay")?;
        let resource = [("causeway.zone", cfg.zone.to_string()), ("causeway.gateway", cfg.gateway.to_string())];
        crate::telemetry::otlp::start(&cfg.tracing, mesh.metrics(), &resource).context("tracing.otlp")?;
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let ready = Arc::new(AtomicBool::new(false));

        let http = crate::http::Http::new(mesh.clone(), cfg.http_settings(), policy);
        let handler: Arc<dyn causeway_overlay::ports::HttpHandler> = http.clone();
        mesh.set_http_handler(&handler);
        let mut imports = Vec::new();
        for (i, imp) in cfg.imports.iter().enumerate() {
            let h = (imp.protocol == Protocol::Http).then(|| http.clone());
            let l = ImportListener::bind(imp.listen, imp.service.clone(), h)
                .await
                .with_context(|| format!("imports[{i}].listen: cannot bind {}", imp.listen))?;
            let own = stop.child_token();
            imports.push(ImportRun {
                service: imp.service.clone(),
                listen: imp.listen,
                bound: l.local_addr(),
                stop: own.clone(),
            });
            tasks.spawn(l.run(mesh.clone(), own));
        }
        let import_addrs: Vec<_> = imports.iter().map(|r| (r.service.to_string(), r.bound)).collect();
        let admin_addr = match cfg.admin {
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
        tasks.spawn(mesh.clone().run());
        tokio::spawn(watch_gateway_tls(cfg.tls.clone(), cfg.trust_domain.clone(), mesh.clone(), mesh_stopped(&mesh)));
        tasks.close();
        ready.store(true, Ordering::Relaxed);
        tracing::info!(
            zone = %cfg.zone, gateway = %cfg.gateway, identity = %mesh.identity(), overlay = %overlay_addr,
            admin = ?admin_addr, imports = ?import_addrs, "gateway.started"
        );
        let reloader = Reloader {
            mesh: mesh.clone(),
            http,
            config: Arc::new(Mutex::new(cfg.clone())),
            imports: Arc::new(Mutex::new(imports)),
            stop_listeners: stop.clone(),
            tasks: tasks.clone(),
        };
        Ok(Self { mesh, overlay_addr, admin_addr, metrics: handle, reloader, stop_listeners: stop, tasks })
    }

    /// The local listener of an imported service.
    pub fn import_addr(&self, service: &str) -> Option<SocketAddr> {
        let imports = self.reloader.imports.lock().unwrap_or_else(|e| e.into_inner());
        imports.iter().find(|r| r.service.as_str() == service).map(|r| r.bound)
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
