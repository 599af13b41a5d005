//! Gateway configuration: YAML in, validated types out.
//!
//! Two stages, so that one run reports every mistake: serde reads the file into raw types
//! (`deny_unknown_fields`; names, addresses and durations stay strings), then [`validate`] parses
//! each field and collects every error with its key path (`peers[1].id: ...`). Structural errors
//! (an unknown key, a list where a map belongs) stop serde at the first one, also with its path.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::http::{HttpOptions, LbPolicy};
use causeway_overlay::transport::Timers;
use causeway_overlay::{Export, Limits, PeerSpec, Timing};
use causeway_protocol::control::Protocol;
use causeway_protocol::limits::{MAX_LABELS, MAX_LABEL_LEN};
use causeway_protocol::{GatewayId, Identity, ServiceName, TrustDomain, ZoneName};

mod raw;

pub use self::raw::*;
use crate::parse::{addr, cidr, duration, from_yaml, host_port, Errors};
pub use crate::parse::{byte_size, ConfigError};

/// All errors of one configuration file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {} error(s)", self.file, self.errors.len())?;
        for e in &self.errors {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Import {
    pub service: ServiceName,
    pub listen: SocketAddr,
    pub protocol: Protocol,
}

/// A validated configuration: what is fixed for the life of a process, and a snapshot of what may
/// change while it runs.
#[derive(Clone)]
pub struct Config {
    pub fixed: StaticConfig,
    pub snapshot: Snapshot,
    /// The file as YAML, which a mesh-wide document's sections are merged into
    /// ([`crate::control::compose`]).
    pub source: Arc<serde_yaml_ng::Value>,
}

/// The effective configuration (what `config.effective` logs), without the file's text again.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config").field("fixed", &self.fixed).field("snapshot", &self.snapshot).finish_non_exhaustive()
    }
}

/// What is fixed for a process: identity, listen addresses, TLS paths, timing, limits, logging. A
/// reload is refused if any of it changed; compared whole ([`StaticConfig::changed_keys`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StaticConfig {
    pub zone: ZoneName,
    pub gateway: GatewayId,
    pub trust_domain: TrustDomain,
    pub tls: TlsPaths,
    pub overlay: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub redirectors: Vec<String>,
    /// SPIFFE ID prefixes of workloads that may send HTTP/3 requests straight to this gateway.
    pub http3_clients: Vec<String>,
    pub workloads: Vec<(ipnet::IpNet, Identity)>,
    pub allowed_sources: Vec<ipnet::IpNet>,
    pub timing: Timing,
    /// Every limit but the memory budget, which is part of the [`Snapshot`] (`memory_budget` is
    /// always `None` here).
    pub limits: Limits,
    /// `timing.outlier_ejection`: the first ejection of a failing HTTP endpoint.
    pub outlier_ejection: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    /// Trace export (`tracing.*`).
    pub tracing: crate::telemetry::otlp::TraceConfig,
    /// `control.publishers`: who may publish mesh-wide documents.
    pub publishers: Vec<Identity>,
    /// `control.state_dir`: where the last document applied is kept (none: not kept).
    pub state_dir: Option<PathBuf>,
    /// `control.document_file`: a document this gateway publishes whenever the file's content
    /// differs from the document held (GitOps), signed with its own identity.
    pub document_file: Option<PathBuf>,
}

impl StaticConfig {
    /// The keys (as the file names them) whose values differ between `self` and `other`; empty
    /// when they are equal. Every field is destructured, so a new one cannot be left out.
    pub fn changed_keys(&self, other: &Self) -> Vec<&'static str> {
        if self == other {
            return Vec::new();
        }
        let StaticConfig {
            zone,
            gateway,
            trust_domain,
            tls,
            overlay,
            admin,
            redirectors,
            http3_clients,
            workloads,
            allowed_sources,
            timing,
            limits,
            outlier_ejection,
            log_format,
            log_level,
            tracing,
            publishers,
            state_dir,
            document_file,
        } = self;
        let TlsPaths { cert, key, bundle, federation, watch_interval } = tls;
        let o = &other.tls;
        [
            ("zone", *zone != other.zone),
            ("gateway", *gateway != other.gateway),
            ("trust_domain", *trust_domain != other.trust_domain),
            ("tls", (cert, key, bundle) != (&o.cert, &o.key, &o.bundle)),
            ("federation", *federation != o.federation),
            ("listen.overlay", *overlay != other.overlay),
            ("listen.admin", *admin != other.admin),
            ("redirectors", *redirectors != other.redirectors),
            ("http3_clients", *http3_clients != other.http3_clients),
            ("workloads", *workloads != other.workloads),
            ("allowed_sources", *allowed_sources != other.allowed_sources),
            (
                "timing",
                *timing != other.timing
                    || *outlier_ejection != other.outlier_ejection
                    || *watch_interval != o.watch_interval,
            ),
            ("limits", *limits != other.limits),
            ("log", (log_format, log_level) != (&other.log_format, &other.log_level)),
            ("tracing", *tracing != other.tracing),
            (
                "control",
                (publishers, state_dir, document_file) != (&other.publishers, &other.state_dir, &other.document_file),
            ),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }

    /// The limits a gateway starts with: these, with the snapshot's memory budget.
    pub fn limits_with(&self, snapshot: &Snapshot) -> Limits {
        Limits { memory_budget: snapshot.memory_budget, ..self.limits }
    }
}

/// What may change while a gateway runs — peers, exports, imports, HTTP routes, authorization,
/// rate limits, allowlists — validated together and swapped in whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub peers: Vec<PeerSpec>,
    pub exports: Vec<Export>,
    pub imports: Vec<Import>,
    pub preferences: HashMap<ServiceName, Vec<ZoneName>>,
    pub http_routes: Vec<crate::http::routes::HttpRoute>,
    /// How each exported `http` service's endpoints are spoken to.
    pub http_options: HashMap<ServiceName, HttpOptions>,
    pub authorization: crate::policy::Policies,
    pub client_allowlists: HashMap<ServiceName, Vec<ipnet::IpNet>>,
    pub rate_limits: Vec<crate::ratelimit::LimitSpec>,
    pub rate_limit_store: Option<crate::ratelimit::store::StoreSpec>,
    /// `limits.memory_budget`.
    pub memory_budget: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
    /// Bundles of federated trust domains (`federation`): each verifies only identities of its own
    /// trust domain.
    pub federation: Vec<(TrustDomain, PathBuf)>,
    /// How often the gateway re-reads the files for a rotated certificate or bundle.
    pub watch_interval: Duration,
}

/// Default of `timing.watch_interval`.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// `timing.outlier_ejection` when unset.
pub const DEFAULT_OUTLIER_EJECTION: Duration = Duration::from_secs(30);

impl Snapshot {
    /// What the gateway's rules are built from.
    pub fn rule_spec(&self) -> crate::rules::RuleSpec<'_> {
        crate::rules::RuleSpec {
            routes: &self.http_routes,
            options: &self.http_options,
            policies: &self.authorization,
            rate_limits: &self.rate_limits,
            rate_limit_store: self.rate_limit_store.as_ref(),
        }
    }
}

/// Reads and validates a file. Relative TLS paths are resolved against the file's directory.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let mut cfg = load_with(path, parse, |c| &mut c.fixed.tls)?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [&mut cfg.fixed.state_dir, &mut cfg.fixed.document_file].into_iter().flatten() {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok(cfg)
}

/// Reads a YAML file, parses it with `parse`, and resolves the TLS paths it names against the
/// file's directory. Shared by the gateway and redirector configurations.
pub(crate) fn load_with<T>(
    path: &Path,
    parse: impl Fn(&str) -> Result<T, Vec<ConfigError>>,
    tls: impl Fn(&mut T) -> &mut TlsPaths,
) -> Result<T, ConfigErrors> {
    let file = path.display().to_string();
    let fail = |errors| ConfigErrors { file: file.clone(), errors };
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail(vec![ConfigError { path: String::new(), reason: format!("cannot read: {e}") }]))?;
    let mut cfg = parse(&text).map_err(fail)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let t = tls(&mut cfg);
    let paths = [&mut t.cert, &mut t.key, &mut t.bundle].into_iter().chain(t.federation.iter_mut().map(|(_, b)| b));
    for p in paths {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok(cfg)
}

/// Parses and validates YAML text.
pub fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
    let mut cfg = validate(&from_yaml::<RawConfig>(text)?)?;
    cfg.source = Arc::new(from_yaml::<serde_yaml_ng::Value>(text)?);
    Ok(cfg)
}

/// `limits.*`: each within a range that keeps memory bounded (README "Limits").
fn limits(raw: &RawLimits, e: &mut Errors) -> Limits {
    let mut l = Limits::default();
    let mut count = |key: &str, v: Option<u32>, min: u32, max: u32| -> Option<u32> {
        let v = v?;
        if v < min || v > max {
            e.push(format!("limits.{key}"), format!("{v} is outside {min}..={max}"));
            return None;
        }
        Some(v)
    };
    if let Some(v) = count("peer_flow_rate", raw.peer_flow_rate, 1, 1_000_000) {
        l.peer_flow_rate = v;
    }
    if let Some(v) = count("flows_per_peer", raw.flows_per_peer, 1, 100_000) {
        l.quic.flows_per_peer = v;
    }
    if let Some(v) = count("pending_handshakes", raw.pending_handshakes, 1, 65_536) {
        l.quic.pending_handshakes = v as usize;
    }
    if let Some(v) = count("connections_per_listener", raw.connections_per_listener, 1, 1_000_000) {
        l.connections_per_listener = v;
    }
    if let Some(v) = count("connections_per_source", raw.connections_per_source, 1, 1_000_000) {
        l.connections_per_source = v;
    }
    let mut bytes = |key: &str, v: &Option<String>, min: u64, max: u64| -> Option<u64> {
        let s = v.as_deref()?;
        match byte_size(s) {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            Ok(n) => {
                e.push(format!("limits.{key}"), format!("{n} bytes is outside {min}..={max}"));
                None
            }
            Err(why) => {
                e.push(format!("limits.{key}"), why);
                None
            }
        }
    };
    if let Some(v) = bytes("peer_receive_window", &raw.peer_receive_window, 1 << 20, 1 << 30) {
        l.quic.peer_receive_window = v as u32;
    }
    if let Some(v) = bytes("stream_window", &raw.stream_window, 64 << 10, 1 << 30) {
        l.quic.stream_window = v as u32;
    }
    if let Some(v) = bytes("memory_budget", &raw.memory_budget, 16 << 20, 1 << 50) {
        l.memory_budget = Some(v);
    }
    if l.quic.stream_window > l.quic.peer_receive_window {
        e.push("limits.stream_window", "must not exceed limits.peer_receive_window");
    }
    if l.connections_per_source > l.connections_per_listener {
        e.push("limits.connections_per_source", "must not exceed limits.connections_per_listener");
    }
    l
}

/// `exports[].load_balancer`.
fn load_balancer(raw: &RawLoadBalancer, at: &str, e: &mut Errors) -> LbPolicy {
    match (raw.policy.as_str(), &raw.header, &raw.cookie) {
        ("p2c", None, None) => LbPolicy::PowerOfTwo,
        ("round_robin", None, None) => LbPolicy::RoundRobin,
        ("hash", Some(h), None) if http::HeaderName::from_bytes(h.as_bytes()).is_ok() => {
            LbPolicy::HashHeader(h.to_ascii_lowercase())
        }
        ("hash", None, Some(c)) if !c.is_empty() && !c.contains([';', '=', ' ']) => LbPolicy::HashCookie(c.clone()),
        ("hash", ..) => {
            e.push(
                format!("{at}.policy"),
                "hash needs exactly one of header (a header name) or cookie (a cookie name)",
            );
            LbPolicy::PowerOfTwo
        }
        ("p2c" | "round_robin", ..) => {
            e.push(format!("{at}.policy"), "header and cookie apply to policy: hash only");
            LbPolicy::PowerOfTwo
        }
        (other, ..) => {
            e.push(format!("{at}.policy"), format!("{other:?} is not one of p2c, round_robin, hash"));
            LbPolicy::PowerOfTwo
        }
    }
}

/// SPIFFE ID prefixes (`key[i].id_prefix`). A prefix must name at least a trust domain, ours, and
/// end at a segment boundary, so that `spiffe://td/zone/eu/node/` cannot match
/// `spiffe://td/zone/eu/node-evil/...`.
fn id_prefixes(key: &str, raw: &[RawRedirector], own: Option<&TrustDomain>, e: &mut Errors) -> Vec<String> {
    let mut out = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let path = format!("{key}[{i}].id_prefix");
        match Identity::parse(r.id_prefix.trim_end_matches('/')) {
            Ok(id) if r.id_prefix.ends_with('/') => {
                if let Some(td) = own.filter(|td| **td != id.trust_domain()) {
                    e.push(path, format!("trust domain {} differs from trust_domain {td}", id.trust_domain()));
                } else {
                    out.push(r.id_prefix.clone());
                }
            }
            Ok(_) => e.push(path, "must end with '/' (a whole path segment)"),
            Err(err) => e.push(path, err),
        }
    }
    out
}

/// `IP:port`, `[IPv6]:port` or `host:port`.
/// An exported endpoint: `IP:port`, or `host:port` (every address of the name is an endpoint).
fn endpoint(s: &str) -> Result<causeway_overlay::Endpoint, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(causeway_overlay::Endpoint::Addr(a));
    }
    let checked = host_port(s)?;
    let (host, port) = checked.rsplit_once(':').ok_or_else(|| format!("{s:?} is not IP:port or host:port"))?;
    let port = port.parse().map_err(|_| format!("{s:?} is not IP:port or host:port"))?;
    Ok(causeway_overlay::Endpoint::Name { host: host.to_string(), port })
}

pub fn validate(raw: &RawConfig) -> Result<Config, Vec<ConfigError>> {
    let mut e = Errors(Vec::new());
    let zone = e.parse("zone", ZoneName::new(&raw.zone));
    let gateway = e.parse("gateway", GatewayId::new(&raw.gateway));
    let trust_domain = e.parse("trust_domain", TrustDomain::new(&raw.trust_domain));
    for (k, p) in [("tls.cert", &raw.tls.cert), ("tls.key", &raw.tls.key), ("tls.bundle", &raw.tls.bundle)] {
        if p.as_os_str().is_empty() {
            e.push(k, "must name a file");
        }
    }
    let overlay = e.parse("listen.overlay", addr(&raw.listen.overlay));
    let admin = raw.listen.admin.as_deref().and_then(|a| e.parse("listen.admin", addr(a)));

    let mut federation: Vec<(TrustDomain, PathBuf)> = Vec::new();
    for (i, f) in raw.federation.iter().enumerate() {
        let Some(td) = e.parse(format!("federation[{i}].trust_domain"), TrustDomain::new(&f.trust_domain)) else {
            continue;
        };
        if f.bundle.as_os_str().is_empty() {
            e.push(format!("federation[{i}].bundle"), "must name a file");
        }
        if trust_domain.as_ref() == Some(&td) {
            e.push(
                format!("federation[{i}].trust_domain"),
                "is this gateway's own trust_domain (its bundle is tls.bundle)",
            );
        } else if federation.iter().any(|(t, _)| *t == td) {
            e.push(format!("federation[{i}].trust_domain"), format!("{td} is listed twice"));
        } else {
            federation.push((td, f.bundle.clone()));
        }
    }
    let known_domain = |td: &TrustDomain| trust_domain.as_ref() == Some(td) || federation.iter().any(|(t, _)| t == td);

    let mut peers = Vec::new();
    let mut seen_peers = HashSet::new();
    for (i, p) in raw.peers.iter().enumerate() {
        let id = e.parse(format!("peers[{i}].id"), Identity::parse(&p.id));
        let address = p.address.as_deref().and_then(|a| e.parse(format!("peers[{i}].address"), host_port(a)));
        let pzone = p.zone.as_deref().and_then(|z| e.parse(format!("peers[{i}].zone"), ZoneName::new(z)));
        if let Some(id) = id {
            if !seen_peers.insert(id.clone()) {
                e.push(format!("peers[{i}].id"), format!("{id} is listed twice"));
            }
            if let Some(td) = trust_domain.as_ref().filter(|_| !known_domain(&id.trust_domain())) {
                e.push(
                    format!("peers[{i}].id"),
                    format!("trust domain {} is neither trust_domain {td} nor a federated one", id.trust_domain()),
                );
            }
            let mut source_identities = Vec::new();
            for (j, prefix) in p.source_identities.iter().enumerate() {
                let key = format!("peers[{i}].source_identities[{j}]");
                match Identity::parse(prefix.trim_end_matches('/')) {
                    Ok(pre) if !prefix.ends_with('/') => {
                        e.push(key, format!("{pre} must end with '/' (a prefix of SPIFFE IDs)"));
                    }
                    Ok(pre) if pre.trust_domain() != id.trust_domain() => e.push(
                        key,
                        format!(
                            "is in trust domain {}, but the peer may only assert identities of its own, {}",
                            pre.trust_domain(),
                            id.trust_domain()
                        ),
                    ),
                    Ok(_) => source_identities.push(prefix.clone()),
                    Err(err) => e.push(key, format!("{prefix:?} is not a SPIFFE ID prefix: {err}")),
                }
            }
            peers.push(PeerSpec { id, address, zone: pzone, source_identities });
        }
    }

    let mut exports = Vec::new();
    let mut http_options = HashMap::new();
    let mut seen_exports = HashSet::new();
    for (i, x) in raw.exports.iter().enumerate() {
        let path = |k: &str| format!("exports[{i}].{k}");
        let name = e.parse(path("name"), ServiceName::new(&x.name));
        // `http2` and `grpc` are `http` services whose endpoints speak HTTP/2 cleartext (h2c).
        let protocol = match x.protocol.as_str() {
            "tcp" => Some(Protocol::Tcp),
            "http" | "http2" | "grpc" => Some(Protocol::Http),
            other => {
                e.push(path("protocol"), format!("{other:?} is not one of tcp, http, http2, grpc"));
                None
            }
        };
        if x.port == 0 {
            e.push(path("port"), "must be 1-65535");
        }
        if x.endpoints.is_empty() {
            e.push(path("endpoints"), "must list at least one endpoint");
        }
        let endpoints: Vec<_> = x
            .endpoints
            .iter()
            .enumerate()
            .filter_map(|(j, a)| e.parse(format!("exports[{i}].endpoints[{j}]"), endpoint(a)))
            .collect();
        if x.labels.len() > MAX_LABELS {
            e.push(path("labels"), format!("at most {MAX_LABELS} labels"));
        }
        for (k, v) in &x.labels {
            if k.is_empty() || k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN {
                e.push(
                    format!("exports[{i}].labels.{k}"),
                    format!("keys must be 1-{MAX_LABEL_LEN} bytes, values at most {MAX_LABEL_LEN}"),
                );
            }
        }
        if let (Some(name), Some(protocol)) = (name, protocol) {
            if !seen_exports.insert(name.clone()) {
                e.push(path("name"), format!("{name} is exported twice"));
            }
            let labels = x.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            for (k, v) in [
                ("max_requests", x.max_requests),
                ("max_connections", x.max_connections),
                ("max_pending", x.max_pending),
            ] {
                if v == Some(0) {
                    e.push(path(k), "must be at least 1");
                }
                if v.is_some() && protocol != Protocol::Http {
                    e.push(path(k), "applies to http services only");
                }
            }
            if x.max_pending.is_some() && x.max_connections.is_none() {
                e.push(path("max_pending"), "needs max_connections (requests wait only for a connection)");
            }
            let h2 = matches!(x.protocol.as_str(), "http2" | "grpc");
            if h2 && x.max_connections.is_some() {
                e.push(path("max_connections"), "applies to HTTP/1.1 endpoints (http2 multiplexes one connection)");
            }
            let lb =
                x.load_balancer.as_ref().map(|l| load_balancer(l, &path("load_balancer"), &mut e)).unwrap_or_default();
            if x.load_balancer.is_some() && protocol != Protocol::Http {
                e.push(path("load_balancer"), "applies to http services only");
            }
            let http = HttpOptions {
                h2,
                lb,
                max_requests: x.max_requests,
                max_connections: x.max_connections,
                max_pending: x.max_connections.map(|_| x.max_pending.unwrap_or(DEFAULT_MAX_PENDING)),
            };
            http_options.insert(name.clone(), http);
            exports.push(Export { name, protocol, port: x.port, endpoints, labels });
        }
    }

    let mut imports = Vec::new();
    let mut preferences = HashMap::new();
    let mut seen_listen = HashSet::new();
    for (i, x) in raw.imports.iter().enumerate() {
        let service = e.parse(format!("imports[{i}].service"), ServiceName::new(&x.service));
        let listen = e.parse(format!("imports[{i}].listen"), addr(&x.listen));
        let prefs: Vec<_> = x
            .prefer_zones
            .iter()
            .enumerate()
            .filter_map(|(j, z)| e.parse(format!("imports[{i}].prefer_zones[{j}]"), ZoneName::new(z)))
            .collect();
        if let Some(l) = listen {
            if l.port() != 0 && (!seen_listen.insert(l) || Some(l) == admin) {
                e.push(format!("imports[{i}].listen"), format!("{l} is already used by another listener"));
            }
        }
        let protocol = match x.protocol.as_str() {
            "tcp" => Some(Protocol::Tcp),
            "http" | "http2" | "grpc" => Some(Protocol::Http),
            other => {
                e.push(format!("imports[{i}].protocol"), format!("{other:?} is not one of tcp, http, http2, grpc"));
                None
            }
        };
        if let (Some(service), Some(listen), Some(protocol)) = (service, listen, protocol) {
            if !prefs.is_empty() {
                preferences.insert(service.clone(), prefs);
            }
            imports.push(Import { service, listen, protocol });
        }
    }
    let http_imports = imports.iter().filter(|i| i.protocol == Protocol::Http).map(|i| i.service.clone()).collect();
    let http_routes = crate::http::routes::validate(&raw.http_routes, &http_imports, &mut e);
    let authorization = crate::policy::validate(&raw.authorization, &mut e);
    let rate_limit_store = raw.rate_limit_store.as_ref().and_then(|r| crate::ratelimit::store::validate(r, &mut e));
    let rate_limits = crate::ratelimit::validate(&raw.rate_limits, &exports, rate_limit_store.as_ref(), &mut e);
    let mut client_allowlists: HashMap<ServiceName, Vec<ipnet::IpNet>> = HashMap::new();
    for (i, a) in raw.client_allowlists.iter().enumerate() {
        let Some(service) = e.parse(format!("client_allowlists[{i}].service"), ServiceName::new(&a.service)) else {
            continue;
        };
        if a.cidrs.is_empty() {
            e.push(format!("client_allowlists[{i}].cidrs"), "must list at least one address or CIDR");
        }
        let nets: Vec<_> = a
            .cidrs
            .iter()
            .enumerate()
            .filter_map(|(j, c)| e.parse(format!("client_allowlists[{i}].cidrs[{j}]"), cidr(c)))
            .collect();
        if client_allowlists.insert(service.clone(), nets).is_some() {
            e.push(format!("client_allowlists[{i}].service"), format!("{service} is listed twice"));
        }
    }
    for (i, p) in authorization.policies.iter().enumerate() {
        if let Some(s) = p.service.as_ref().filter(|s| !exports.iter().any(|x| &x.name == *s)) {
            e.push(format!("authorization.policies[{i}].service"), format!("{s} is not exported by this gateway"));
        }
    }

    let redirectors = id_prefixes("redirectors", &raw.redirectors, trust_domain.as_ref(), &mut e);
    let http3_clients = id_prefixes("http3_clients", &raw.http3_clients, trust_domain.as_ref(), &mut e);
    let mut workloads = Vec::new();
    for (i, w) in raw.workloads.iter().enumerate() {
        let net =
            w.cidr.parse::<ipnet::IpNet>().or_else(|_| w.cidr.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        let net =
            e.parse(format!("workloads[{i}].cidr"), net.map_err(|_| format!("{:?} is not an address or CIDR", w.cidr)));
        let id = e.parse(format!("workloads[{i}].id"), Identity::parse(&w.id));
        if let (Some(net), Some(id)) = (net, id) {
            workloads.push((net, id));
        }
    }

    let allowed_sources: Vec<ipnet::IpNet> = raw
        .allowed_sources
        .iter()
        .enumerate()
        .filter_map(|(i, s)| e.parse(format!("allowed_sources[{i}]"), cidr(s)))
        .collect();

    let mut timing = Timing::default();
    let mut outlier_ejection = DEFAULT_OUTLIER_EJECTION;
    let mut tls_watch = WATCH_INTERVAL;
    {
        let t = &raw.timing;
        let mut set = |key: &str, v: &Option<String>, slot: &mut Duration| {
            if let Some(s) = v {
                if let Some(d) = e.parse(format!("timing.{key}"), duration(s)) {
                    if d.is_zero() {
                        e.push(format!("timing.{key}"), "must be greater than zero");
                    } else {
                        *slot = d;
                    }
                }
            }
        };
        set("ping_interval", &t.ping_interval, &mut timing.ping_interval);
        set("peer_timeout", &t.peer_timeout, &mut timing.peer_timeout);
        set("peer_close_timeout", &t.peer_close_timeout, &mut timing.peer_close_timeout);
        if t.peer_close_timeout.is_none() {
            // Unset: follow a longer peer_timeout rather than refuse it.
            timing.peer_close_timeout = timing.peer_close_timeout.max(timing.peer_timeout * 2);
        }
        set("handshake_timeout", &t.handshake_timeout, &mut timing.handshake_timeout);
        set("flow_connect_timeout", &t.flow_connect_timeout, &mut timing.flow_connect_timeout);
        set("backend_connect_timeout", &t.backend_connect_timeout, &mut timing.backend_connect_timeout);
        set("header_timeout", &t.header_timeout, &mut timing.header_timeout);
        set("backoff_min", &t.backoff_min, &mut timing.backoff_min);
        set("backoff_max", &t.backoff_max, &mut timing.backoff_max);
        set("health_interval", &t.health_interval, &mut timing.health_interval);
        set("drain_timeout", &t.drain_timeout, &mut timing.drain_timeout);
        set("outlier_ejection", &t.outlier_ejection, &mut outlier_ejection);
        let mut tr: Timers = timing.transport;
        set("keep_alive", &t.keep_alive, &mut tr.keep_alive);
        set("idle_timeout", &t.idle_timeout, &mut tr.idle_timeout);
        if t.idle_timeout.is_none() {
            // Unset: QUIC's idle timeout must not close a connection liveness would still keep.
            tr.idle_timeout = tr.idle_timeout.max(timing.peer_close_timeout);
        }
        set("watch_interval", &t.watch_interval, &mut tls_watch);
        timing.transport = tr;
    }
    if timing.peer_timeout <= timing.ping_interval {
        e.push(
            "timing.peer_timeout",
            "must be longer than timing.ping_interval (a peer is declared down after missing pings)",
        );
    }
    if timing.peer_close_timeout <= timing.peer_timeout {
        e.push(
            "timing.peer_close_timeout",
            "must be longer than timing.peer_timeout (a silent peer is routed around first, closed later)",
        );
    }
    if timing.backoff_max < timing.backoff_min {
        e.push("timing.backoff_max", "must not be shorter than timing.backoff_min");
    }
    if timing.transport.idle_timeout <= timing.transport.keep_alive {
        e.push("timing.idle_timeout", "must be longer than timing.keep_alive");
    }
    if timing.transport.idle_timeout < timing.peer_close_timeout {
        e.push(
            "timing.idle_timeout",
            "must not be shorter than timing.peer_close_timeout (QUIC would close a silent peer's connection first)",
        );
    }
    let limits = limits(&raw.limits, &mut e);

    let log_format = log_format(&raw.log, &mut e);
    let log_level = raw.log.level.clone().unwrap_or_else(|| "info".into());
    if let Err(err) = tracing_subscriber::EnvFilter::try_new(&log_level) {
        e.push("log.level", format!("{log_level:?} is not a valid filter: {err}"));
    }

    let tracing = tracing_config(&raw.tracing, &mut e);
    let publishers: Vec<Identity> = raw
        .control
        .publishers
        .iter()
        .enumerate()
        .filter_map(|(i, p)| e.parse(format!("control.publishers[{i}]"), Identity::parse(p)))
        .collect();
    e.into_result()?;
    // Every field parsed (no errors were pushed), so the options below are all Some.
    match (zone, gateway, trust_domain, overlay) {
        (Some(zone), Some(gateway), Some(trust_domain), Some(overlay)) => Ok(Config {
            fixed: StaticConfig {
                zone,
                gateway,
                trust_domain,
                tls: TlsPaths {
                    cert: raw.tls.cert.clone(),
                    key: raw.tls.key.clone(),
                    bundle: raw.tls.bundle.clone(),
                    federation,
                    watch_interval: tls_watch,
                },
                overlay,
                admin,
                redirectors,
                http3_clients,
                workloads,
                allowed_sources,
                timing,
                limits: Limits { memory_budget: None, ..limits },
                outlier_ejection,
                log_format,
                log_level,
                tracing,
                publishers,
                state_dir: raw.control.state_dir.clone(),
                document_file: raw.control.document_file.clone(),
            },
            snapshot: Snapshot {
                peers,
                exports,
                imports,
                preferences,
                http_routes,
                http_options,
                authorization,
                client_allowlists,
                rate_limits,
                rate_limit_store,
                memory_budget: limits.memory_budget,
            },
            source: Arc::new(serde_yaml_ng::Value::Null),
        }),
        _ => Err(vec![ConfigError { path: String::new(), reason: "incomplete configuration".into() }]),
    }
}

#[cfg(test)]
mod tests;

/// `tracing.*`: the OTLP endpoint (an `http://` or `https://` URL), its timeout, the root sampling
/// ratio (`OTEL_TRACES_SAMPLER_ARG` when unset).
pub(crate) fn tracing_config(raw: &RawTracing, e: &mut Errors) -> crate::telemetry::otlp::TraceConfig {
    let mut t = crate::telemetry::otlp::TraceConfig::default();
    if let Some(o) = &raw.otlp {
        if let Some(url) = &o.endpoint {
            match url.parse::<http::Uri>() {
                Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() => {
                    t.endpoint = Some(url.clone())
                }
                _ => e.push("tracing.otlp.endpoint", format!("{url:?} is not an http:// or https:// URL")),
            }
        }
        if let Some(d) = o.timeout.as_deref().and_then(|d| e.parse("tracing.otlp.timeout", duration(d))) {
            t.timeout = d;
        }
    }
    match raw.sample_ratio {
        Some(r) if (0.0..=1.0).contains(&r) => t.sample_ratio = r,
        Some(r) => e.push("tracing.sample_ratio", format!("{r} is not between 0 and 1")),
        None => {
            let env = std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().and_then(|v| v.trim().parse::<f64>().ok());
            if let Some(r) = env.filter(|r| r.is_finite()) {
                t.sample_ratio = r.clamp(0.0, 1.0);
            }
        }
    }
    t
}

/// `log.format`: `text` (default) or `json`; shared by the gateway's and the redirector's files.
pub(crate) fn log_format(raw: &RawLog, e: &mut Errors) -> LogFormat {
    match raw.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            e.push("log.format", format!("{other:?} is not one of text, json"));
            LogFormat::Text
        }
    }
}
