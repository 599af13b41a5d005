//! `causeway redirect`: the node agent. It installs the iptables rules that send TCP bound for the
//! VIP range to its capture port, recovers each captured connection's original destination
//! (`SO_ORIGINAL_DST`), hands it to the zone gateway ([`Redirector`]), and answers mesh DNS.
//! It removes its rules when it stops.

pub mod dns;
pub mod iptables;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use causeway_overlay::metrics::{Metrics, CAPTURED};
use causeway_overlay::redirector::{RedirectTiming, Redirector, RedirectorConfig};
use causeway_protocol::vip::VipRange;
use causeway_protocol::{Identity, ServiceName, TrustDomain};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConfigErrors, LogFormat, RawLog, RawTls};
use crate::parse::{addr, duration, host_port, ConfigError, Errors};
use iptables::Chain;

/// Captured connections handled at once by default (`capture.max_connections`); more wait in the
/// kernel's accept queue.
pub const MAX_CAPTURED: usize = 10_000;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedirect {
    #[serde(default)]
    pub node: Option<String>,
    pub trust_domain: String,
    pub tls: RawTls,
    pub gateway: RawGateway,
    pub capture: RawCapture,
    #[serde(default)]
    pub dns: Option<RawDns>,
    #[serde(default)]
    pub admin: Option<String>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub tracing: crate::config::RawTracing,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub address: String,
    pub id: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCapture {
    pub listen: String,
    #[serde(default)]
    pub vip_range: Option<String>,
    /// `output` (the node's own processes) and/or `prerouting` (pods routed through the node).
    #[serde(default)]
    pub chains: Option<Vec<String>>,
    /// Captured connections handled at once (default 10,000; more wait in the accept queue).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Captured connections one pod address may hold at once (default 1,000; more are reset).
    #[serde(default)]
    pub connections_per_source: Option<usize>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub listen: String,
    #[serde(default)]
    pub suffix: Option<String>,
    pub upstream: String,
    #[serde(default)]
    pub ttl: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DnsConfig {
    pub listen: SocketAddr,
    pub suffix: String,
    pub upstream: SocketAddr,
    pub ttl: Duration,
}

/// A validated redirector configuration.
#[derive(Debug, Clone)]
pub struct RedirectConfig {
    pub node: String,
    pub trust_domain: TrustDomain,
    pub tls: crate::config::TlsPaths,
    /// `IP:port` or `host:port`.
    pub gateway: String,
    pub gateway_id: Identity,
    pub capture: SocketAddr,
    pub vip_range: VipRange,
    pub chains: Vec<Chain>,
    pub max_connections: usize,
    pub connections_per_source: usize,
    pub dns: Option<DnsConfig>,
    pub admin: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub log_level: String,
    /// Span export of captured connections (`tracing.*`, as for a gateway).
    pub tracing: crate::telemetry::otlp::TraceConfig,
}

pub fn load(path: &Path) -> Result<RedirectConfig, ConfigErrors> {
    crate::config::load_with(path, parse, |c| &mut c.tls)
}

pub fn parse(text: &str) -> Result<RedirectConfig, Vec<ConfigError>> {
    let raw: RawRedirect = crate::parse::from_yaml(text)?;
    let mut e = Errors(Vec::new());
    let trust_domain = e.parse("trust_domain", TrustDomain::new(&raw.trust_domain));
    let gateway = e.parse("gateway.address", host_port(&raw.gateway.address));
    let gateway_id = e.parse("gateway.id", Identity::parse(&raw.gateway.id));
    let capture = e.parse("capture.listen", addr(&raw.capture.listen));
    let vip_range =
        e.parse("capture.vip_range", VipRange::parse(raw.capture.vip_range.as_deref().unwrap_or(VipRange::DEFAULT)));
    let mut chains = Vec::new();
    for (i, c) in
        raw.capture.chains.clone().unwrap_or_else(|| vec!["output".into(), "prerouting".into()]).iter().enumerate()
    {
        match c.as_str() {
            "output" => chains.push(Chain::Output),
            "prerouting" => chains.push(Chain::Prerouting),
            other => e.push(format!("capture.chains[{i}]"), format!("{other:?} is not one of output, prerouting")),
        }
    }
    let max_connections = raw.capture.max_connections.unwrap_or(MAX_CAPTURED);
    let connections_per_source = raw.capture.connections_per_source.unwrap_or(crate::listeners::MAX_PER_SOURCE);
    if !(1..=1_000_000).contains(&max_connections) {
        e.push("capture.max_connections", "must be 1 to 1,000,000");
    }
    if connections_per_source == 0 || connections_per_source > max_connections {
        e.push("capture.connections_per_source", "must be at least 1 and at most capture.max_connections");
    }
    let dns = raw.dns.as_ref().and_then(|d| {
        let listen = e.parse("dns.listen", addr(&d.listen));
        let upstream = e.parse("dns.upstream", addr(&d.upstream));
        let suffix = d.suffix.clone().unwrap_or_else(|| "mesh".into());
        if ServiceName::new(&suffix).is_err() {
            e.push("dns.suffix", format!("{suffix:?} is not a DNS name"));
        }
        let ttl = match &d.ttl {
            Some(t) => e.parse("dns.ttl", duration(t))?,
            None => Duration::from_secs(5),
        };
        Some(DnsConfig { listen: listen?, suffix, upstream: upstream?, ttl })
    });
    let admin = raw.admin.as_deref().and_then(|a| e.parse("admin", addr(a)));
    let log_format = crate::config::log_format(&raw.log, &mut e);
    for (k, p) in [("tls.cert", &raw.tls.cert), ("tls.key", &raw.tls.key), ("tls.bundle", &raw.tls.bundle)] {
        if p.as_os_str().is_empty() {
            e.push(k, "must name a file");
        }
    }
    let tracing = crate::config::tracing_config(&raw.tracing, &mut e);
    if !e.0.is_empty() {
        return Err(e.0);
    }
    match (trust_domain, gateway, gateway_id, capture, vip_range) {
        (Some(trust_domain), Some(gateway), Some(gateway_id), Some(capture), Some(vip_range)) => Ok(RedirectConfig {
            node: raw.node.clone().unwrap_or_else(|| "node".into()),
            trust_domain,
            tls: crate::config::TlsPaths {
                cert: raw.tls.cert.clone(),
                key: raw.tls.key.clone(),
                bundle: raw.tls.bundle.clone(),
                federation: Vec::new(),
                watch_interval: crate::config::WATCH_INTERVAL,
            },
            gateway,
            gateway_id,
            capture,
            vip_range,
            chains,
            max_connections,
            connections_per_source,
            dns,
            admin,
            log_format,
            log_level: raw.log.level.clone().unwrap_or_else(|| "info".into()),
            tracing,
        }),
        _ => Err(vec![ConfigError { path: String::new(), reason: "incomplete configuration".into() }]),
    }
}

/// A running redirector.
pub struct Redirect {
    pub redirector: Redirector,
    pub capture_addr: SocketAddr,
    pub dns_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub metrics: PrometheusHandle,
    rules: bool,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Redirect {
    /// Installs the iptables rules (when `rules`), binds the capture port, DNS and admin, and starts
    /// the gateway connection.
    pub async fn start(cfg: &RedirectConfig, rules: bool) -> anyhow::Result<Self> {
        let (creds, bundle) = load_tls(cfg)
            .map_err(|e| anyhow::anyhow!("{}", e.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")))?;
        if rules {
            iptables::check_privilege()?;
        }
        let recorder = crate::telemetry::recorder();
        let handle = recorder.handle();
        let metrics = Metrics::new(Arc::new(recorder));
        crate::metrics::describe(&metrics);
        crate::telemetry::otlp::start(&cfg.tracing, &metrics, &[("causeway.node", cfg.node.clone())])
            .context("tracing.otlp")?;
        let redirector = Redirector::new(RedirectorConfig {
            gateway: cfg.gateway.clone(),
            gateway_id: cfg.gateway_id.clone(),
            credentials: creds,
            bundle,
            vip_range: cfg.vip_range,
            timing: RedirectTiming::default(),
            metrics: metrics.clone(),
        })?;
        let capture = crate::listeners::listen(cfg.capture)
            .with_context(|| format!("capture.listen: cannot bind {}", cfg.capture))?;
        let capture_addr = capture.local_addr()?;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let dns_addr = match &cfg.dns {
            Some(d) => {
                let server = dns::MeshDns::bind(d.listen, &d.suffix, d.upstream, d.ttl)
                    .await
                    .with_context(|| format!("dns.listen: cannot bind {}", d.listen))?;
                let a = server.local_addr();
                tasks.spawn(server.run(redirector.clone(), metrics.clone(), stop.clone()));
                Some(a)
            }
            None => None,
        };
        let admin_addr = match cfg.admin {
            Some(a) => {
                let state = crate::admin::AdminState {
                    mesh: None,
                    metrics: handle.clone(),
                    ready: Arc::new(AtomicBool::new(true)),
                    policy: None,
                };
                let admin =
                    crate::admin::Admin::bind(a, state).await.with_context(|| format!("admin: cannot bind {a}"))?;
                let bound = admin.local_addr();
                tasks.spawn(admin.run(stop.clone()));
                Some(bound)
            }
            None => None,
        };
        if rules {
            iptables::install(&cfg.chains, &cfg.vip_range.to_string(), capture_addr)?;
        }
        tasks.spawn(redirector.clone().run());
        {
            let (cfg, r) = (cfg.clone(), redirector.clone());
            tasks.spawn(crate::app::watch_tls(cfg.tls.clone(), stop.clone(), move || {
                let (creds, bundle) = load_tls(&cfg).inspect_err(|_| r.tls().count_refused())?;
                r.tls()
                    .update(creds, bundle)
                    .map_err(|e| vec![ConfigError { path: "tls".into(), reason: e.to_string() }])
            }));
        }
        let limits = (cfg.max_connections, cfg.connections_per_source);
        tasks.spawn(capture_loop(capture, limits, redirector.clone(), metrics, stop.clone()));
        tasks.close();
        tracing::info!(node = %cfg.node, identity = %redirector.identity(), capture = %capture_addr, dns = ?dns_addr,
            vip_range = %cfg.vip_range, gateway = %cfg.gateway, rules, "redirect.started");
        Ok(Self { redirector, capture_addr, dns_addr, admin_addr, metrics: handle, rules, stop, tasks })
    }

    pub fn metrics_text(&self) -> String {
        self.metrics.run_upkeep();
        self.metrics.render()
    }

    /// Stops capturing, removes the rules, closes the gateway connection.
    pub async fn stop(self) -> anyhow::Result<()> {
        let removed = if self.rules { iptables::cleanup() } else { Ok(0) };
        self.stop.cancel();
        self.redirector.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
        let removed = removed?;
        tracing::info!(rules_removed = removed, "redirect.stopped");
        Ok(())
    }
}

fn load_tls(
    cfg: &RedirectConfig,
) -> Result<(causeway_overlay::Credentials, causeway_overlay::TrustBundle), Vec<ConfigError>> {
    crate::app::load_tls_files(&cfg.tls, &cfg.trust_domain)
}

/// Validates a redirector config and its TLS files (for `causeway check --redirect`).
pub fn check(cfg: &RedirectConfig) -> Result<Identity, Vec<ConfigError>> {
    let (creds, _) = load_tls(cfg)?;
    creds.identity().map_err(|e| vec![ConfigError { path: "tls.cert".into(), reason: e.to_string() }])
}

async fn capture_loop(
    listener: TcpListener,
    limits: (usize, usize),
    redirector: Redirector,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.0));
    let per_source = crate::listeners::PerSource::new(limits.1);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.cancelled() => return,
        };
        let (tcp, src) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "capture.accept.failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        // SO_ORIGINAL_DST: where the client meant to go before the nat REDIRECT.
        let dst = socket2::SockRef::from(&tcp).original_dst().ok().and_then(|a| a.as_socket());
        let Some(dst) = dst else {
            metrics.counter(CAPTURED, &[("outcome", "no_original_dst")]).increment(1);
            causeway_overlay::flow::relay::abort(tcp);
            continue;
        };
        let Some(slot) = per_source.admit(src.ip()) else {
            metrics.counter(CAPTURED, &[("outcome", "source_full")]).increment(1);
            causeway_overlay::flow::relay::abort(tcp);
            continue;
        };
        let r = redirector.clone();
        tokio::spawn(async move {
            r.serve_captured(tcp, dst, src).await;
            drop((permit, slot));
        });
    }
}

/// `causeway redirect --config F`: runs until SIGTERM/SIGINT, then removes its rules.
pub async fn run(cfg: RedirectConfig) -> anyhow::Result<()> {
    let r = Redirect::start(&cfg, true).await?;
    crate::wait_for_signal().await;
    r.stop().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    const BASE: &str = "trust_domain: td.example\n\
        tls: { cert: c.pem, key: k.pem, bundle: ca.crt }\n\
        gateway: { address: \"127.0.0.1:4433\", id: \"spiffe://td.example/zone/a/gateway/gw-1\" }\n";

    #[test]
    fn capture_limits_default_and_are_checked() {
        let cfg = super::parse(&format!("{BASE}capture: {{ listen: \"0.0.0.0:15001\" }}\n")).unwrap();
        assert_eq!((cfg.max_connections, cfg.connections_per_source), (10_000, 1_000));
        let cfg = super::parse(&format!(
            "{BASE}capture: {{ listen: \"0.0.0.0:15001\", max_connections: 50000, connections_per_source: 20000 }}\n"
        ))
        .unwrap();
        assert_eq!((cfg.max_connections, cfg.connections_per_source), (50_000, 20_000));
        let errs = super::parse(&format!(
            "{BASE}capture: {{ listen: \"0.0.0.0:15001\", max_connections: 0, connections_per_source: 5 }}\n"
        ))
        .unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["capture.max_connections", "capture.connections_per_source"]);
    }
}
