//! HTTP routes (`http_routes`), shaped like Kubernetes Gateway API's `HTTPRoute` (with Istio
//! VirtualService's fault injection): their YAML, their validation, and how a request is matched
//! and changed. The gateway's request path (`http.rs`) picks a rule here and acts on it.
//!
//! A rule applies when any of its matches holds (every field of a match must). Paths match
//! exactly, by prefix or by regular expression; headers and query parameters exactly, by
//! regular expression, or by presence. Regular expressions match the whole value (as Envoy's
//! and Gateway API's do) and are bounded in size when compiled.

use std::collections::BTreeMap;
use std::time::Duration;

use causeway_protocol::limits::MAX_LABEL_LEN;
use causeway_protocol::ServiceName;
use serde::{Deserialize, Serialize};

use crate::parse::{duration, Errors};

/// Compiled size bound of one regular expression (its automaton), so a route cannot make the
/// gateway build a huge one.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Longest regular expression accepted, in bytes.
const REGEX_MAX_LEN: usize = 1024;
/// Most header or query changes in one modifier list.
const MAX_HEADER_CHANGES: usize = 32;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpRoute {
    pub name: String,
    pub service: String,
    pub rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Any one of them must hold; none: every request.
    #[serde(default)]
    pub matches: Vec<RawMatch>,
    pub backends: Vec<RawBackend>,
    /// The whole request, every attempt included: past it the client gets 504.
    #[serde(default)]
    pub timeout: Option<String>,
    /// One attempt's wait for its response head.
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<RawRetries>,
    /// Changes to the request's headers before it is sent on.
    #[serde(default)]
    pub request_headers: Option<RawHeaderChanges>,
    /// Changes to the response's headers before the client gets it.
    #[serde(default)]
    pub response_headers: Option<RawHeaderChanges>,
    /// Delays or aborts a share of the requests (resilience drills).
    #[serde(default)]
    pub fault: Option<RawFault>,
    /// Sends a copy of a share of the requests to a shadow subset; its answers are dropped.
    #[serde(default)]
    pub mirror: Option<RawMirror>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetries {
    /// Attempts in all, the first included (2–5).
    pub attempts: u32,
    /// `5xx`, `gateway-error` (502, 503, 504), `connect-failure`, `reset`.
    #[serde(default)]
    pub on: Vec<String>,
    /// Further status codes to retry.
    #[serde(default)]
    pub codes: Vec<u16>,
    /// Retry POST and PATCH too (their requests may have had effects).
    #[serde(default)]
    pub non_idempotent: bool,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    #[serde(default)]
    pub path: Option<RawPathMatch>,
    #[serde(default)]
    pub method: Option<String>,
    /// Header name → exact value, `"*"` (present with any value), or `{ regex: … }`.
    #[serde(default)]
    pub headers: BTreeMap<String, RawValueMatch>,
    /// Query parameter name → the same forms as headers.
    #[serde(default)]
    pub query: BTreeMap<String, RawValueMatch>,
}

/// How a header or query value must look.
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawValueMatch {
    /// An exact value, or `"*"`: present with any value.
    Exact(String),
    Regex {
        regex: String,
    },
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPathMatch {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    /// Labels the serving zone's service must carry, e.g. `{ version: v2 }`.
    #[serde(default)]
    pub subset: BTreeMap<String, String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// Gateway API's header modifier: `set` replaces, `add` appends, `remove` deletes.
#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderChanges {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFault {
    #[serde(default)]
    pub delay: Option<RawDelay>,
    #[serde(default)]
    pub abort: Option<RawAbort>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelay {
    /// Share of requests delayed, 0–100.
    pub percent: f64,
    pub duration: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAbort {
    /// Share of requests answered at once with `status`, 0–100.
    pub percent: f64,
    pub status: u16,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMirror {
    pub subset: BTreeMap<String, String>,
    /// Share of requests copied, 0–100.
    #[serde(default = "hundred")]
    pub percent: f64,
}

fn hundred() -> f64 {
    100.0
}

/// A validated HTTP route.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRoute {
    pub name: String,
    pub service: ServiceName,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub matches: Vec<RouteMatch>,
    pub backends: Vec<Backend>,
    pub timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    pub retries: Option<Retries>,
    pub request_headers: HeaderChanges,
    pub response_headers: HeaderChanges,
    pub fault: Fault,
    pub mirror: Option<Mirror>,
}

/// When a request is tried again (`http_routes[].rules[].retries`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Retries {
    pub attempts: u32,
    pub on_5xx: bool,
    pub on_gateway_error: bool,
    pub on_connect_failure: bool,
    pub on_reset: bool,
    pub codes: Vec<u16>,
    pub non_idempotent: bool,
}

/// A regular expression matched against a whole value. Compared by its text (routes are compared
/// to tell whether a reload changed them).
#[derive(Debug, Clone)]
pub struct Pattern(regex::Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Pattern {
    fn new(re: &str) -> Result<Self, String> {
        if re.len() > REGEX_MAX_LEN {
            return Err(format!("longer than {REGEX_MAX_LEN} bytes"));
        }
        regex::RegexBuilder::new(&format!("^(?:{re})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map(Pattern)
            .map_err(|e| format!("not a valid regular expression: {e}"))
    }

    pub fn is_match(&self, s: &str) -> bool {
        self.0.is_match(s)
    }
}

/// How one header or query value must look.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueMatch {
    Exact(String),
    Present,
    Regex(Pattern),
}

impl ValueMatch {
    fn holds(&self, v: Option<&str>) -> bool {
        match (self, v) {
            (_, None) => false,
            (ValueMatch::Present, Some(_)) => true,
            (ValueMatch::Exact(x), Some(v)) => x == v,
            (ValueMatch::Regex(p), Some(v)) => p.is_match(v),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Pattern),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    pub method: Option<String>,
    /// (lower-case name, how its value must look)
    pub headers: Vec<(String, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
}

impl RouteMatch {
    /// Whether a request with this method, URI and headers matches.
    pub fn holds(&self, method: &http::Method, uri: &http::Uri, headers: &http::HeaderMap) -> bool {
        let path = uri.path();
        let path_ok = match &self.path {
            None => true,
            Some(PathMatch::Exact(p)) => path == p,
            Some(PathMatch::Prefix(p)) => path.starts_with(p.as_str()),
            Some(PathMatch::Regex(p)) => p.is_match(path),
        };
        let method_ok = self.method.as_ref().is_none_or(|m| method.as_str().eq_ignore_ascii_case(m));
        let headers_ok =
            self.headers.iter().all(|(name, m)| m.holds(headers.get(name.as_str()).and_then(|v| v.to_str().ok())));
        let query_ok = self.query.is_empty() || {
            let pairs = query_pairs(uri.query().unwrap_or(""));
            self.query.iter().all(|(name, m)| m.holds(pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())))
        };
        path_ok && method_ok && headers_ok && query_ok
    }
}

/// A query string's `name=value` pairs, percent-decoded (`+` as space); the first of a name wins.
fn query_pairs(q: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                    match hex {
                        Some(v) => {
                            out.push(v);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub subset: Vec<(String, String)>,
    pub weight: u32,
}

/// Header changes, validated: names lower-case, values valid.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderChanges {
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    pub remove: Vec<http::HeaderName>,
}

impl HeaderChanges {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the changes: remove, then set, then add.
    pub fn apply(&self, h: &mut http::HeaderMap) {
        for k in &self.remove {
            h.remove(k);
        }
        for (k, v) in &self.set {
            h.insert(k.clone(), v.clone());
        }
        for (k, v) in &self.add {
            h.append(k.clone(), v.clone());
        }
    }
}

/// Fault injection of one rule.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Fault {
    /// (share 0–1, how long)
    pub delay: Option<(f64, Duration)>,
    /// (share 0–1, status)
    pub abort: Option<(f64, http::StatusCode)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub subset: Vec<(String, String)>,
    /// Share 0–1.
    pub share: f64,
}

/// `http_routes`: each for a service imported as `http`, with valid matches and weighted backends.
/// `http_imports`: the services imported with `protocol: http`.
pub(crate) fn validate(
    raw: &[RawHttpRoute],
    http_imports: &std::collections::HashSet<ServiceName>,
    e: &mut Errors,
) -> Vec<HttpRoute> {
    let mut out = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let at = |k: &str| format!("http_routes[{i}].{k}");
        let Some(service) = e.parse(at("service"), ServiceName::new(&r.service)) else { continue };
        if !http_imports.contains(&service) {
            e.push(at("service"), format!("{service} is not imported with protocol: http"));
        }
        if r.name.is_empty() || r.name.len() > MAX_LABEL_LEN {
            e.push(at("name"), format!("must be 1-{MAX_LABEL_LEN} bytes"));
        }
        if r.rules.is_empty() {
            e.push(at("rules"), "must list at least one rule");
        }
        let rules = r
            .rules
            .iter()
            .enumerate()
            .map(|(j, rule)| validate_rule(rule, &format!("http_routes[{i}].rules[{j}]"), e))
            .collect();
        out.push(HttpRoute { name: r.name.clone(), service, rules });
    }
    out
}

fn validate_rule(rule: &RawRule, base: &str, e: &mut Errors) -> Rule {
    let at = |k: &str| format!("{base}.{k}");
    let mut matches = Vec::new();
    for (k, m) in rule.matches.iter().enumerate() {
        matches.push(validate_match(m, &at(&format!("matches[{k}]")), e));
    }
    if rule.backends.is_empty() || rule.backends.iter().all(|b| b.weight == 0) {
        e.push(at("backends"), "must list at least one backend with a weight above 0");
    }
    let backends = rule
        .backends
        .iter()
        .map(|b| Backend { subset: b.subset.iter().map(|(k, v)| (k.clone(), v.clone())).collect(), weight: b.weight })
        .collect();
    let mut dur = |k: &str, v: Option<&str>| {
        let v = v?;
        e.parse(at(k), duration(v)).filter(|d| {
            let ok = !d.is_zero();
            if !ok {
                e.push(at(k), "must be above 0");
            }
            ok
        })
    };
    let timeout = dur("timeout", rule.timeout.as_deref());
    let per_try_timeout = dur("per_try_timeout", rule.per_try_timeout.as_deref());
    let retries = rule.retries.as_ref().map(|r| validate_retries(r, &at("retries"), e));
    let request_headers = changes(rule.request_headers.as_ref(), &at("request_headers"), e);
    let response_headers = changes(rule.response_headers.as_ref(), &at("response_headers"), e);
    let share = |e: &mut Errors, k: &str, p: f64| {
        if !(0.0..=100.0).contains(&p) {
            e.push(at(k), format!("{p} is outside 0..=100"));
        }
        (p / 100.0).clamp(0.0, 1.0)
    };
    let mut fault = Fault::default();
    if let Some(f) = &rule.fault {
        if let Some(d) = &f.delay {
            let s = share(e, "fault.delay.percent", d.percent);
            if let Some(t) = e.parse(at("fault.delay.duration"), duration(&d.duration)) {
                fault.delay = Some((s, t));
            }
        }
        if let Some(a) = &f.abort {
            let s = share(e, "fault.abort.percent", a.percent);
            match http::StatusCode::from_u16(a.status) {
                Ok(c) if (200..=599).contains(&a.status) => fault.abort = Some((s, c)),
                _ => e.push(at("fault.abort.status"), format!("{} is not a status code 200-599", a.status)),
            }
        }
    }
    let mirror = rule.mirror.as_ref().map(|m| Mirror {
        subset: m.subset.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        share: share(e, "mirror.percent", m.percent),
    });
    Rule { matches, backends, timeout, per_try_timeout, retries, request_headers, response_headers, fault, mirror }
}

fn validate_match(m: &RawMatch, base: &str, e: &mut Errors) -> RouteMatch {
    let at = |k: &str| format!("{base}.{k}");
    let mut rm = RouteMatch { method: m.method.clone(), ..Default::default() };
    if let Some(p) = &m.path {
        rm.path = match (&p.exact, &p.prefix, &p.regex) {
            (Some(x), None, None) if x.starts_with('/') => Some(PathMatch::Exact(x.clone())),
            (None, Some(x), None) if x.starts_with('/') => Some(PathMatch::Prefix(x.clone())),
            (None, None, Some(x)) => e.parse(at("path.regex"), Pattern::new(x)).map(PathMatch::Regex),
            _ => {
                e.push(at("path"), "one of exact or prefix (starting with '/'), or regex");
                None
            }
        };
    }
    for (kind, raw, out) in [("headers", &m.headers, &mut rm.headers), ("query", &m.query, &mut rm.query)] {
        for (name, value) in raw {
            let at = at(&format!("{kind}.{name}"));
            if kind == "headers" && http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                e.push(at.clone(), "not a valid header name");
            }
            let vm = match value {
                RawValueMatch::Exact(v) if v == "*" => Some(ValueMatch::Present),
                RawValueMatch::Exact(v) => Some(ValueMatch::Exact(v.clone())),
                RawValueMatch::Regex { regex } => e.parse(at, Pattern::new(regex)).map(ValueMatch::Regex),
            };
            let name = if kind == "headers" { name.to_ascii_lowercase() } else { name.clone() };
            out.extend(vm.map(|v| (name, v)));
        }
    }
    rm
}

fn validate_retries(r: &RawRetries, base: &str, e: &mut Errors) -> Retries {
    if !(2..=5).contains(&r.attempts) {
        e.push(format!("{base}.attempts"), format!("{} is outside 2..=5", r.attempts));
    }
    let mut p = Retries {
        attempts: r.attempts.clamp(1, 5),
        codes: r.codes.clone(),
        non_idempotent: r.non_idempotent,
        ..Default::default()
    };
    for (k, on) in r.on.iter().enumerate() {
        match on.as_str() {
            "5xx" => p.on_5xx = true,
            "gateway-error" => p.on_gateway_error = true,
            "connect-failure" => p.on_connect_failure = true,
            "reset" => p.on_reset = true,
            other => e.push(
                format!("{base}.on[{k}]"),
                format!("{other:?} is not one of 5xx, gateway-error, connect-failure, reset"),
            ),
        }
    }
    p
}

fn changes(raw: Option<&RawHeaderChanges>, base: &str, e: &mut Errors) -> HeaderChanges {
    let mut out = HeaderChanges::default();
    let Some(raw) = raw else { return out };
    if raw.set.len() + raw.add.len() + raw.remove.len() > MAX_HEADER_CHANGES {
        e.push(base.to_string(), format!("at most {MAX_HEADER_CHANGES} changes"));
    }
    let name = |e: &mut Errors, at: String, n: &str| {
        let h = http::HeaderName::from_bytes(n.as_bytes()).map_err(|_| "not a valid header name");
        // The gateways' own headers are theirs to write.
        let h = h.and_then(|h| {
            if h.as_str().starts_with("causeway-") || h.as_str().starts_with(':') {
                Err("causeway-* headers are the gateways' own")
            } else {
                Ok(h)
            }
        });
        e.parse(at, h)
    };
    for (kind, map, list) in [("set", &raw.set, &mut out.set), ("add", &raw.add, &mut out.add)] {
        for (k, v) in map {
            let at = format!("{base}.{kind}.{k}");
            let n = name(e, at.clone(), k);
            let v = e.parse(at, http::HeaderValue::from_str(v).map_err(|_| "not a valid header value"));
            if let (Some(n), Some(v)) = (n, v) {
                list.push((n, v));
            }
        }
    }
    for (i, k) in raw.remove.iter().enumerate() {
        if let Some(n) = name(e, format!("{base}.remove[{i}]"), k) {
            out.remove.push(n);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> (http::Method, http::Uri, http::HeaderMap) {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        (http::Method::GET, uri.parse().unwrap(), h)
    }

    fn one(yaml: &str) -> Result<RouteMatch, Vec<crate::parse::ConfigError>> {
        let m: RawMatch = serde_yaml_ng::from_str(yaml).unwrap();
        let mut e = Errors::default();
        let rm = validate_match(&m, "m", &mut e);
        e.into_result().map(|()| rm)
    }

    #[test]
    fn paths_headers_and_query_match_exactly_by_regex_or_by_presence() {
        let m = one("{ path: { regex: \"/reviews/[0-9]+\" }, headers: { x-user: { regex: \"j.*\" }, x-any: \"*\" }, query: { canary: \"1\" } }").unwrap();
        let ok = req("/reviews/12?canary=1&x=2", &[("x-user", "jason"), ("x-any", "")]);
        assert!(m.holds(&ok.0, &ok.1, &ok.2));
        for (uri, h) in [
            ("/reviews/12x?canary=1", vec![("x-user", "jason"), ("x-any", "1")]), // regex is anchored
            ("/reviews/12?canary=2", vec![("x-user", "jason"), ("x-any", "1")]),
            ("/reviews/12?canary=1", vec![("x-user", "bob"), ("x-any", "1")]),
            ("/reviews/12?canary=1", vec![("x-user", "jason")]),
            ("/reviews/12", vec![("x-user", "jason"), ("x-any", "1")]),
        ] {
            let r = req(uri, &h);
            assert!(!m.holds(&r.0, &r.1, &r.2), "{uri} {h:?}");
        }
        let q = one("{ query: { name: \"a b/c\" } }").unwrap();
        let r = req("/?name=a+b%2Fc", &[]);
        assert!(q.holds(&r.0, &r.1, &r.2));
    }

    #[test]
    fn bad_patterns_and_header_changes_name_their_paths() {
        let errs = one("{ path: { regex: \"(\" } }").unwrap_err();
        assert_eq!(errs[0].path, "m.path.regex");
        let errs = one("{ path: { regex: \"a{1000}{1000}\" } }").unwrap_err();
        assert_eq!(errs[0].path, "m.path.regex", "the size limit holds");
        let raw: RawHeaderChanges =
            serde_yaml_ng::from_str("{ set: { causeway-source-identity: x, \"bad name\": y } }").unwrap();
        let mut e = Errors::default();
        let _ = changes(Some(&raw), "r", &mut e);
        let paths: Vec<_> = e.into_result().unwrap_err().into_iter().map(|x| x.path).collect();
        assert_eq!(paths, vec!["r.set.bad name", "r.set.causeway-source-identity"]);
    }

    #[test]
    fn header_changes_remove_then_set_then_add() {
        let raw: RawHeaderChanges =
            serde_yaml_ng::from_str("{ set: { x-a: one }, add: { x-b: two }, remove: [server] }").unwrap();
        let mut e = Errors::default();
        let c = changes(Some(&raw), "r", &mut e);
        let mut h = http::HeaderMap::new();
        h.insert("server", "py".parse().unwrap());
        h.insert("x-a", "old".parse().unwrap());
        h.insert("x-b", "first".parse().unwrap());
        c.apply(&mut h);
        assert!(h.get("server").is_none());
        assert_eq!(h.get("x-a").unwrap(), "one");
        assert_eq!(h.get_all("x-b").iter().count(), 2);
    }
}
