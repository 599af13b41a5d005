//! Parsing helpers every configuration module shares: the error type (a key path and a reason),
//! the collector of errors, and the scalar formats (addresses, durations, byte sizes, CIDRs). A
//! leaf: it imports no other module of the gateway, so the configuration and the policy, rate-limit
//! and route modules that use it do not import one another.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

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

/// Deserializes YAML into raw types; a structural error (unknown key, wrong type) carries its path.
pub(crate) fn from_yaml<R: serde::de::DeserializeOwned>(text: &str) -> Result<R, Vec<ConfigError>> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        vec![ConfigError { path, reason: e.into_inner().to_string() }]
    })
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
pub(crate) fn cidr(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| format!("{s:?} is not an address or CIDR"))
}

pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like \"250ms\" or \"5s\": {e}"))
}
