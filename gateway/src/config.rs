//! Gateway configuration: YAML in, validated types out.
//!
//! Two stages, so that one run reports every mistake: serde reads the file into raw types
//! (`deny_unknown_fields`; names, addresses and durations stay strings), then [`validate`] parses
//! each field and collects every error with its key path (`peers[1].id: ...`). Structural errors
//! (an unknown key, a list where a map belongs) stop serde at the first one, also with its path.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use causeway_overlay::mesh::{HttpOptions, LbPolicy};
use causeway_overlay::transport::Timers;
use causeway_overlay::{Export, Limits, PeerSpec, Timing};
use causeway_protocol::control::Protocol;
use causeway_protocol::limits::{MAX_LABELS, MAX_LABEL_LEN};
use causeway_protocol::{GatewayId, Identity, ServiceName, TrustDomain, ZoneName};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub zone: String,
    pub gateway: String,
    pub trust_domain: String,
    pub tls: RawTls,
    pub listen: RawListen,
    /// Other trust domains whose identities this gateway accepts, each with its own bundle.
    #[serde(default)]
    pub federation: Vec<RawFederation>,
    #[serde(default)]
    pub http_routes: Vec<crate::routes::RawHttpRoute>,
    /// Who may call this zone's exported services (README "Authorization").
    #[serde(default)]
    pub authorization: crate::policy::RawAuthorization,
    /// Which client addresses may use a service through capture or a local listener.
    #[serde(default)]
    pub client_allowlists: Vec<RawClientAllowlist>,
    /// Rate limits on this gateway's exported services (README "Authorization").
    #[serde(default)]
    pub rate_limits: Vec<crate::ratelimit::RawRateLimit>,
    /// Where `scope: global` rate limits keep the buckets the zone's gateways share (Redis).
    #[serde(default)]
    pub rate_limit_store: Option<crate::ratelimit::store::RawStore>,
    #[serde(default)]
    pub peers: Vec<RawPeer>,
    #[serde(default)]
    pub exports: Vec<RawExport>,
    #[serde(default)]
    pub imports: Vec<RawImport>,
    #[serde(default)]
    pub redirectors: Vec<RawRedirector>,
    /// Workloads that may send HTTP/3 requests straight to this gateway, by SPIFFE ID prefix.
    #[serde(default)]
    pub http3_clients: Vec<RawRedirector>,
    /// Addresses or CIDRs allowed to start a QUIC handshake (besides configured peer addresses).
    #[serde(default)]
    pub allowed_sources: Vec<String>,
    #[serde(default)]
    pub workloads: Vec<RawWorkload>,
    #[serde(default)]
    pub timing: RawTiming,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub log: RawLog,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFederation {
    pub trust_domain: String,
    pub bundle: PathBuf,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub peer_flow_rate: Option<u32>,
    pub flows_per_peer: Option<u32>,
    /// Byte sizes: an integer, or a number with KiB, MiB or GiB.
    pub stream_window: Option<String>,
    pub peer_receive_window: Option<String>,
    pub pending_handshakes: Option<u32>,
    pub memory_budget: Option<String>,
    pub connections_per_listener: Option<u32>,
    pub connections_per_source: Option<u32>,
}

/// Parses a byte size: `65536`, `64KiB`, `16 MiB`, `1GiB`.
pub fn byte_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a byte size (like 65536, 64KiB, 16MiB, 1GiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unit {other:?} is not one of B, KiB, MiB, GiB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedirector {
    /// SPIFFE ID prefix of the node agents (or HTTP/3 clients) allowed to connect.
    pub id_prefix: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkload {
    /// Source addresses (an address or CIDR) of the workload.
    pub cidr: String,
    /// Its SPIFFE ID, carried across the overlay for flows from those addresses.
    pub id: String,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8).
    pub key: PathBuf,
    /// PEM CA certificates trusted for peers.
    pub bundle: PathBuf,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub overlay: String,
    #[serde(default)]
    pub admin: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub id: String,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
    /// Prefixes of the caller identities this peer may assert (`causeway-source-identity`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_identities: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawExport {
    pub name: String,
    #[serde(default = "default_protocol")]
    pub protocol: String,
    pub port: u16,
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `http`: requests to the endpoints in progress at once; more get an immediate 503.
    #[serde(default)]
    pub max_requests: Option<u32>,
    /// `http` (HTTP/1.1 endpoints): connections to each endpoint at once; a request finding every
    /// endpoint at its limit waits (at most `max_pending` of them; default 1024, the next gets 503).
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub max_pending: Option<u32>,
    /// `http`: how an endpoint is chosen for each request.
    #[serde(default)]
    pub load_balancer: Option<RawLoadBalancer>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientAllowlist {
    pub service: String,
    /// Addresses or CIDRs of the pods (or hosts) that may use it; everyone else is refused.
    pub cidrs: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLoadBalancer {
    /// `p2c` (default), `round_robin`, or `hash` (with `header` or `cookie`).
    pub policy: String,
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub cookie: Option<String>,
}

/// Requests that may wait for an endpoint connection when `max_connections` is set alone.
const DEFAULT_MAX_PENDING: u32 = 1024;

fn default_protocol() -> String {
    "tcp".into()
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawImport {
    pub service: String,
    pub listen: String,
    #[serde(default)]
    pub prefer_zones: Vec<String>,
    /// `tcp` (default): opaque bytes; `http` (or `http2`, `grpc`): each HTTP/1.1 or HTTP/2 request
    /// routed on its own.
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTiming {
    pub ping_interval: Option<String>,
    pub peer_timeout: Option<String>,
    pub peer_close_timeout: Option<String>,
    pub handshake_timeout: Option<String>,
    pub flow_connect_timeout: Option<String>,
    pub backend_connect_timeout: Option<String>,
    pub header_timeout: Option<String>,
    pub backoff_min: Option<String>,
    pub backoff_max: Option<String>,
    pub health_interval: Option<String>,
    pub drain_timeout: Option<String>,
    pub outlier_ejection: Option<String>,
    pub keep_alive: Option<String>,
    pub idle_timeout: Option<String>,
    pub watch_interval: Option<String>,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// `text` (default) or `json`.
    pub format: Option<String>,
    /// A tracing filter, e.g. `info` or `info,causeway::access=warn`. `RUST_LOG` overrides it.
    pub level: Option<String>,
}

/// One configuration error: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

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

#[derive(Debug, Clone)]
pub struct Import {
    pub service: ServiceName,
    pub listen: SocketAddr,
    pub protocol: Protocol,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub zone: ZoneName,
    pub gateway: GatewayId,
    pub trust_domain: TrustDomain,
    pub tls: TlsPaths,
    pub overlay: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub peers: Vec<PeerSpec>,
    pub exports: Vec<Export>,
    pub imports: Vec<Import>,
    pub preferences: HashMap<ServiceName, Vec<ZoneName>>,
    pub redirectors: Vec<String>,
    /// SPIFFE ID prefixes of workloads that may send HTTP/3 requests straight to this gateway.
    pub http3_clients: Vec<String>,
    pub workloads: Vec<(ipnet::IpNet, Identity)>,
    pub allowed_sources: Vec<ipnet::IpNet>,
    pub timing: Timing,
    pub limits: Limits,
    pub http_routes: Vec<crate::routes::HttpRoute>,
    pub authorization: crate::policy::Policies,
    pub client_allowlists: HashMap<ServiceName, Vec<ipnet::IpNet>>,
    pub rate_limits: Vec<crate::ratelimit::LimitSpec>,
    pub rate_limit_store: Option<crate::ratelimit::store::StoreSpec>,
    pub log_format: LogFormat,
    pub log_level: String,
}

#[derive(Debug, Clone)]
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

/// Reads and validates a file. Relative TLS paths are resolved against the file's directory.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with(path, parse, |c| &mut c.tls)
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

/// Deserializes YAML into raw types; a structural error (unknown key, wrong type) carries its path.
pub(crate) fn from_yaml<R: serde::de::DeserializeOwned>(text: &str) -> Result<R, Vec<ConfigError>> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        vec![ConfigError { path, reason: e.into_inner().to_string() }]
    })
}

/// Parses and validates YAML text.
pub fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
    validate(&from_yaml::<RawConfig>(text)?)
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

#[derive(Default)]
pub(crate) struct Errors(pub(crate) Vec<ConfigError>);

impl Errors {
    /// Every error found, or none.
    pub(crate) fn into_result(self) -> Result<(), Vec<ConfigError>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }

    pub(crate) fn push(&mut self, path: impl Into<String>, reason: impl fmt::Display) {
        self.0.push(ConfigError { path: path.into(), reason: reason.to_string() });
    }

    pub(crate) fn parse<T, E: fmt::Display>(&mut self, path: impl Into<String>, r: Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(path, e);
                None
            }
        }
    }
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

pub(crate) fn host_port(s: &str) -> Result<String, String> {
    if s.parse::<SocketAddr>().is_ok() {
        return Ok(s.to_string());
    }
    let bad = || format!("{s:?} is not IP:port or host:port");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'));
    match (host_ok, port.parse::<u16>()) {
        (true, Ok(p)) if p > 0 => Ok(s.to_string()),
        _ => Err(bad()),
    }
}

pub(crate) fn addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>().map_err(|_| format!("{s:?} is not an IP:port address"))
}

/// An address or CIDR, host bits cleared.
fn cidr(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| format!("{s:?} is not an address or CIDR"))
}

pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like \"250ms\" or \"5s\": {e}"))
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
            exports.push(Export { name, protocol, port: x.port, endpoints, labels, http });
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
    let http_routes = crate::routes::validate(&raw.http_routes, &imports, &mut e);
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
        set("outlier_ejection", &t.outlier_ejection, &mut timing.outlier_ejection);
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

    let log_format = match raw.log.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            e.push("log.format", format!("{other:?} is not one of text, json"));
            LogFormat::Text
        }
    };
    let log_level = raw.log.level.clone().unwrap_or_else(|| "info".into());
    if let Err(err) = tracing_subscriber::EnvFilter::try_new(&log_level) {
        e.push("log.level", format!("{log_level:?} is not a valid filter: {err}"));
    }

    e.into_result()?;
    // Every field parsed (no errors were pushed), so the options below are all Some.
    match (zone, gateway, trust_domain, overlay) {
        (Some(zone), Some(gateway), Some(trust_domain), Some(overlay)) => Ok(Config {
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
            peers,
            exports,
            imports,
            preferences,
            redirectors,
            http3_clients,
            workloads,
            allowed_sources,
            timing,
            limits,
            http_routes,
            authorization,
            client_allowlists,
            rate_limits,
            rate_limit_store,
            log_format,
            log_level,
        }),
        _ => Err(vec![ConfigError { path: String::new(), reason: "incomplete configuration".into() }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
zone: eu-west
gateway: gw-1
trust_domain: prod.example
tls: { cert: gw.crt, key: gw.key, bundle: ca.crt }
listen: { overlay: "0.0.0.0:4433", admin: "127.0.0.1:9901" }
peers:
  - { id: "spiffe://prod.example/zone/us-east/gw-1", address: "10.0.0.2:4433", zone: us-east }
exports:
  - { name: orders.shop, port: 8080, endpoints: ["127.0.0.1:18080"], labels: { version: v1 } }
imports:
  - { service: catalog.shop, listen: "127.0.0.1:15001", prefer_zones: [us-east] }
timing: { ping_interval: 100ms, peer_timeout: 500ms }
"#;

    #[test]
    fn parses_a_good_config() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.zone.as_str(), "eu-west");
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.exports[0].labels, vec![("version".to_string(), "v1".to_string())]);
        assert_eq!(c.timing.peer_timeout, Duration::from_millis(500));
        assert_eq!(c.preferences.len(), 1);
    }

    #[test]
    fn unknown_key_names_its_path() {
        let bad = GOOD.replace("zone: us-east }", "zone: us-east, wieght: 3 }");
        let errs = parse(&bad).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].path, "peers[0].wieght");
        assert!(errs[0].reason.contains("unknown field `wieght`"), "{}", errs[0].reason);
    }

    #[test]
    fn reports_every_semantic_error_with_its_path() {
        let bad = GOOD
            .replace("zone: eu-west", "zone: EU")
            .replace("\"10.0.0.2:4433\"", "\"no where:x\"")
            .replace("127.0.0.1:18080", "localhost")
            .replace("ping_interval: 100ms", "ping_interval: soon");
        let errs = parse(&bad).unwrap_err();
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["zone", "peers[0].address", "exports[0].endpoints[0]", "timing.ping_interval"]);
    }

    #[test]
    fn limits_parse_with_units_and_refuse_what_is_out_of_range() {
        let with = |l: &str| GOOD.replace("timing: {", &format!("limits: {{ {l} }}\ntiming: {{"));
        let c =
            parse(&with("peer_receive_window: 32MiB, stream_window: 4MiB, memory_budget: 2GiB, flows_per_peer: 500"))
                .unwrap();
        assert_eq!(c.limits.quic.peer_receive_window, 32 << 20);
        assert_eq!(c.limits.quic.stream_window, 4 << 20);
        assert_eq!(c.limits.quic.flows_per_peer, 500);
        assert_eq!(c.limits.memory_budget, Some(2 << 30));
        let defaults = parse(GOOD).unwrap().limits;
        assert_eq!(defaults.quic.peer_receive_window, 64 << 20, "never unlimited by default");
        assert_eq!(defaults.memory_budget, None);
        let errs = parse(&with("peer_receive_window: 0, stream_window: 2GiB, memory_budget: lots, peer_flow_rate: 0"))
            .unwrap_err();
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec!["limits.peer_flow_rate", "limits.peer_receive_window", "limits.stream_window", "limits.memory_budget"],
            "{errs:?}"
        );
        let errs = parse(&with("stream_window: 128MiB")).unwrap_err();
        assert_eq!(errs[0].path, "limits.stream_window");
        assert!(errs[0].reason.contains("must not exceed limits.peer_receive_window"));
        let errs = parse(&with("connections_per_listener: 10, connections_per_source: 20")).unwrap_err();
        assert_eq!(errs[0].path, "limits.connections_per_source");
    }

    #[test]
    fn http_breakers_and_endpoint_protocols_are_checked() {
        let with = |fields: &str| {
            GOOD.replace("{ name: orders.shop, port: 8080,", &format!("{{ name: orders.shop, port: 8080, {fields}"))
        };
        let c = parse(&with("protocol: grpc, max_requests: 10,")).unwrap();
        assert!(c.exports[0].http.h2);
        assert_eq!(c.exports[0].protocol, Protocol::Http);
        let c = parse(&with("protocol: http, max_connections: 4,")).unwrap();
        assert!(!c.exports[0].http.h2);
        assert_eq!((c.exports[0].http.max_connections, c.exports[0].http.max_pending), (Some(4), Some(1024)));
        let cases = [
            ("protocol: http, max_pending: 5,", "exports[0].max_pending", "needs max_connections"),
            ("protocol: http2, max_connections: 2,", "exports[0].max_connections", "HTTP/1.1 endpoints"),
            ("max_requests: 3,", "exports[0].max_requests", "http services only"),
            ("protocol: http, max_connections: 0,", "exports[0].max_connections", "at least 1"),
            ("protocol: h3,", "exports[0].protocol", "one of tcp, http, http2, grpc"),
        ];
        for (fields, path, reason) in cases {
            let errs = parse(&with(fields)).unwrap_err();
            assert_eq!(errs[0].path, path, "{fields}: {errs:?}");
            assert!(errs[0].reason.contains(reason), "{fields}: {}", errs[0].reason);
        }
    }

    #[test]
    fn federated_trust_domains_admit_their_peers_and_nothing_else() {
        let partner = "  - { id: \"spiffe://partner.example/zone/ap/gw-1\", zone: ap }\n";
        let with_peer = GOOD.replace("exports:", &format!("{partner}exports:"));
        let errs = parse(&with_peer).unwrap_err();
        assert_eq!(errs[0].path, "peers[1].id");
        assert!(errs[0].reason.contains("neither trust_domain"), "{}", errs[0].reason);
        let fed = with_peer
            .replace("peers:", "federation:\n  - { trust_domain: partner.example, bundle: partner.crt }\npeers:");
        let c = parse(&fed).unwrap();
        assert_eq!(c.tls.federation.len(), 1);
        assert_eq!(c.tls.federation[0].0.as_str(), "partner.example");
        let own = fed.replace("trust_domain: partner.example", "trust_domain: prod.example");
        let errs = parse(&own).unwrap_err();
        assert_eq!(errs[0].path, "federation[0].trust_domain");
    }

    #[test]
    fn refuses_inconsistent_timers() {
        let longer = parse(&GOOD.replace("peer_timeout: 500ms", "peer_timeout: 4s")).unwrap();
        assert_eq!(longer.timing.peer_close_timeout, Duration::from_secs(8));
        let errs = parse(&GOOD.replace("peer_timeout: 500ms", "peer_timeout: 4s, peer_close_timeout: 2s")).unwrap_err();
        assert_eq!(errs[0].path, "timing.peer_close_timeout");
        let bad = GOOD.replace("peer_timeout: 500ms", "peer_timeout: 50ms");
        let errs = parse(&bad).unwrap_err();
        assert_eq!(errs[0].path, "timing.peer_timeout");
    }
}
