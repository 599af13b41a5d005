//! The configuration file as written: serde types that mirror the YAML, every key optional or
//! defaulted, unknown keys refused. `validate` (in the parent) turns them into a [`super::Config`].

use std::collections::BTreeMap;
use std::path::PathBuf;

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
    pub http_routes: Vec<crate::http::routes::RawHttpRoute>,
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
    #[serde(default)]
    pub tracing: RawTracing,
    /// Mesh-wide documents: who may publish them, where the last one applied is kept.
    #[serde(default)]
    pub control: RawControl,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawControl {
    #[serde(default)]
    pub publishers: Vec<String>,
    pub state_dir: Option<PathBuf>,
    pub document_file: Option<PathBuf>,
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
pub(super) const DEFAULT_MAX_PENDING: u32 = 1024;

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

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    pub otlp: Option<RawOtlp>,
    /// Share of new traces sampled, 0 to 1 (default 1; `OTEL_TRACES_SAMPLER_ARG` when unset).
    pub sample_ratio: Option<f64>,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawOtlp {
    /// The OTLP/HTTP traces URL, e.g. `http://otel-collector:4318/v1/traces`.
    pub endpoint: Option<String>,
    /// Export request timeout (default 10s).
    pub timeout: Option<String>,
}
