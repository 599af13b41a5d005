//! Authorization at the zone boundary (`authorization` in the configuration): who may call which
//! exported service, decided by the destination gateway — the one that authenticated the caller's
//! gateway and serves the service — for every TCP flow and every HTTP request.
//!
//! Vocabulary (Istio's and Linkerd's AuthorizationPolicy, Consul's intentions): a policy applies to
//! one service or, without `service`, to every service of this zone; it has an action (`allow`,
//! `deny`, `audit`) and rules; a rule matches when every condition it states holds (`from`: the
//! caller's SPIFFE ID exactly or by prefix, trust domain, zone, namespace, address; `to`: port,
//! and for HTTP method, path and headers). Decision, in order:
//!
//! 1. a matching `deny` rule denies;
//! 2. matching `audit` rules are logged (they decide nothing);
//! 3. if any `allow` policy applies to the service, the request must match one of its rules;
//! 4. otherwise the zone's `default_deny` decides.
//!
//! A TCP flow has no method, path or headers: a rule that states them never matches a flow for
//! `allow` and `audit`, and always does for `deny` (fails closed).

use std::net::IpAddr;

use causeway_protocol::{Identity, ServiceName};
use serde::{Deserialize, Serialize};

use crate::parse::Errors;

mod enforcer;

pub use self::enforcer::*;

/// Most policies, and rules per policy, a configuration may hold (every request walks them).
pub const MAX_POLICIES: usize = 256;
pub const MAX_RULES: usize = 64;

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAuthorization {
    /// Deny what no `allow` policy admits, for services that have none too.
    #[serde(default)]
    pub default_deny: bool,
    /// `enforce` (default), or `audit`: denials are logged and counted as `audit` and let through.
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub policies: Vec<RawPolicy>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub name: String,
    /// The exported service it guards; absent: every service of this zone.
    #[serde(default)]
    pub service: Option<String>,
    /// `allow`, `deny` or `audit`.
    pub action: String,
    pub rules: Vec<RawPolicyRule>,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPolicyRule {
    #[serde(default)]
    pub from: RawFrom,
    #[serde(default)]
    pub to: RawTo,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawFrom {
    /// SPIFFE IDs: exact, or a prefix ending in `/` (a whole path segment).
    #[serde(default)]
    pub identities: Vec<String>,
    #[serde(default)]
    pub trust_domains: Vec<String>,
    #[serde(default)]
    pub zones: Vec<String>,
    /// Kubernetes namespaces (`spiffe://<td>/ns/<namespace>/…`).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// The caller's address (the workload's, as its own gateway saw it).
    #[serde(default)]
    pub cidrs: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTo {
    #[serde(default)]
    pub ports: Vec<u16>,
    /// HTTP only.
    #[serde(default)]
    pub methods: Vec<String>,
    /// HTTP only: exact, or a glob where `*` stands for any characters (`/api/*`).
    #[serde(default)]
    pub paths: Vec<String>,
    /// HTTP only: header name → exact value.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Audit => "audit",
        }
    }
}

/// A SPIFFE ID condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdMatch {
    Exact(String),
    Prefix(String),
}

/// The validated `authorization` section.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policies {
    pub default_deny: bool,
    /// Denials pass, logged (`audit` mode).
    pub audit_mode: bool,
    pub policies: Vec<Policy>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    pub service: Option<ServiceName>,
    pub action: Action,
    pub rules: Vec<PolicyRule>,
}

/// Every stated condition must hold; each list holds when any of its entries does.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicyRule {
    pub identities: Vec<IdMatch>,
    pub trust_domains: Vec<String>,
    pub zones: Vec<String>,
    pub namespaces: Vec<String>,
    pub cidrs: Vec<ipnet::IpNet>,
    pub ports: Vec<u16>,
    pub methods: Vec<String>,
    pub paths: Vec<String>,
    pub headers: Vec<(String, String)>,
}

impl PolicyRule {
    fn http_only(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty() || !self.headers.is_empty()
    }
}

/// What a request or flow is, as the destination gateway knows it.
#[derive(Debug, Clone, Default)]
pub struct Subject<'a> {
    pub service: Option<&'a ServiceName>,
    /// The workload's SPIFFE ID (its gateway vouches for it; that gateway's own ID when unknown).
    pub identity: Option<&'a Identity>,
    /// The zone the caller's gateway is in (from its authenticated hello).
    pub zone: Option<&'a str>,
    pub addr: Option<IpAddr>,
    pub port: Option<u16>,
    /// `None` for a TCP flow.
    pub http: Option<HttpSubject<'a>>,
}

#[derive(Debug, Clone)]
pub struct HttpSubject<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
}

/// The outcome, and what made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The deciding policy (`default` when none did).
    pub policy: String,
    /// Its rule, by index.
    pub rule: Option<usize>,
    /// Why: `deny_rule`, `allow_rule`, `no_allow_rule` (an allow policy applies; nothing
    /// matched), `default_deny`, `default_allow`.
    pub reason: &'static str,
    /// Audit policies whose rules matched.
    pub audited: Vec<String>,
}

/// The namespace of a Kubernetes-style SPIFFE ID (`spiffe://td/ns/<ns>/sa/<sa>`).
fn namespace(id: &Identity) -> Option<&str> {
    let path = id.as_str().strip_prefix("spiffe://")?.split_once('/')?.1;
    let mut parts = path.split('/');
    while let Some(p) = parts.next() {
        if p == "ns" {
            return parts.next();
        }
    }
    None
}

/// `*` matches any run of characters; everything else itself.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// Whether `r` matches `s`. For a TCP flow a rule with HTTP conditions matches only when
/// `fail_closed` (deny rules).
fn rule_matches(r: &PolicyRule, s: &Subject<'_>, fail_closed: bool) -> bool {
    let any = |list_empty: bool, f: &dyn Fn() -> bool| list_empty || f();
    let id = s.identity;
    let from = any(r.identities.is_empty(), &|| {
        id.is_some_and(|id| {
            r.identities.iter().any(|m| match m {
                IdMatch::Exact(x) => id.as_str() == x,
                IdMatch::Prefix(p) => id.as_str().starts_with(p.as_str()),
            })
        })
    }) && any(r.trust_domains.is_empty(), &|| {
        id.is_some_and(|id| r.trust_domains.iter().any(|t| t == id.trust_domain().as_str()))
    }) && any(r.zones.is_empty(), &|| s.zone.is_some_and(|z| r.zones.iter().any(|x| x == z)))
        && any(r.namespaces.is_empty(), &|| {
            id.and_then(namespace).is_some_and(|n| r.namespaces.iter().any(|x| x == n))
        })
        && any(r.cidrs.is_empty(), &|| s.addr.is_some_and(|a| r.cidrs.iter().any(|n| n.contains(&a))));
    let port = any(r.ports.is_empty(), &|| s.port.is_some_and(|p| r.ports.contains(&p)));
    let http = match &s.http {
        None => !r.http_only() || fail_closed,
        Some(h) => {
            any(r.methods.is_empty(), &|| r.methods.iter().any(|m| m.eq_ignore_ascii_case(h.method)))
                && any(r.paths.is_empty(), &|| r.paths.iter().any(|p| glob(p, h.path)))
                && r.headers
                    .iter()
                    .all(|(k, v)| h.headers.get(k.as_str()).is_some_and(|x| x.as_bytes() == v.as_bytes()))
        }
    };
    from && port && http
}

impl Policies {
    /// The decision for `s` and what made it, as `causeway policy explain` and the admin API's
    /// `/policy/explain` give it: `decision` (`allow`, `deny`, or `audit`: denied, let through by
    /// audit mode), `passes`, `policy`, `rule` (index, or null), `reason`, `audited`.
    pub fn explain(&self, s: &Subject<'_>) -> serde_json::Value {
        let d = self.decide(s);
        let decision = match (d.allowed, self.audit_mode) {
            (true, _) => "allow",
            (false, true) => "audit",
            (false, false) => "deny",
        };
        serde_json::json!({
            "decision": decision,
            "passes": d.allowed || self.audit_mode,
            "policy": d.policy,
            "rule": d.rule,
            "reason": d.reason,
            "audited": d.audited,
        })
    }

    /// The decision for `s` (README "Authorization").
    pub fn decide(&self, s: &Subject<'_>) -> Decision {
        let applies = |p: &&Policy| p.service.is_none() || p.service.as_ref() == s.service;
        let first_match = |p: &Policy, fail_closed: bool| p.rules.iter().position(|r| rule_matches(r, s, fail_closed));
        let mut audited = Vec::new();
        for p in self.policies.iter().filter(applies) {
            match p.action {
                Action::Deny => {
                    if let Some(i) = first_match(p, true) {
                        return Decision {
                            allowed: false,
                            policy: p.name.clone(),
                            rule: Some(i),
                            reason: "deny_rule",
                            audited,
                        };
                    }
                }
                Action::Audit => {
                    if first_match(p, false).is_some() {
                        audited.push(p.name.clone());
                    }
                }
                Action::Allow => {}
            }
        }
        let mut first_allow = None;
        for p in self.policies.iter().filter(applies).filter(|p| p.action == Action::Allow) {
            first_allow.get_or_insert(p.name.as_str());
            if let Some(i) = first_match(p, false) {
                return Decision {
                    allowed: true,
                    policy: p.name.clone(),
                    rule: Some(i),
                    reason: "allow_rule",
                    audited,
                };
            }
        }
        // Refused by an allow list that does not name the caller: that list's policy decided.
        let (allowed, reason, policy) = match (first_allow, self.default_deny) {
            (Some(p), _) => (false, "no_allow_rule", p),
            (None, true) => (false, "default_deny", "default"),
            (None, false) => (true, "default_allow", "default"),
        };
        Decision { allowed, policy: policy.to_string(), rule: None, reason, audited }
    }
}

/// The `authorization` section, validated: every path named on error.
pub(crate) fn validate(raw: &RawAuthorization, e: &mut Errors) -> Policies {
    if raw.policies.len() > MAX_POLICIES {
        e.push("authorization.policies", format!("at most {MAX_POLICIES} policies"));
    }
    let mut names = std::collections::HashSet::new();
    let mut policies = Vec::new();
    for (i, p) in raw.policies.iter().enumerate() {
        let at = |k: &str| format!("authorization.policies[{i}].{k}");
        if p.name.is_empty() || p.name.len() > 63 || !names.insert(p.name.clone()) {
            e.push(at("name"), "must be 1-63 bytes and unique");
        }
        let service = p.service.as_ref().and_then(|s| e.parse(at("service"), ServiceName::new(s)));
        let action = match p.action.as_str() {
            "allow" => Action::Allow,
            "deny" => Action::Deny,
            "audit" => Action::Audit,
            other => {
                e.push(at("action"), format!("{other:?} is not one of allow, deny, audit"));
                Action::Deny
            }
        };
        if p.rules.is_empty() || p.rules.len() > MAX_RULES {
            e.push(at("rules"), format!("must list 1-{MAX_RULES} rules (`{{}}` matches everything)"));
        }
        let rules = p.rules.iter().enumerate().map(|(j, r)| rule(r, &at(&format!("rules[{j}]")), e)).collect();
        policies.push(Policy { name: p.name.clone(), service, action, rules });
    }
    let audit_mode = match raw.mode.as_deref() {
        None | Some("enforce") => false,
        Some("audit") => true,
        Some(other) => {
            e.push("authorization.mode", format!("{other:?} is not one of enforce, audit"));
            false
        }
    };
    Policies { default_deny: raw.default_deny, audit_mode, policies }
}

fn rule(r: &RawPolicyRule, base: &str, e: &mut Errors) -> PolicyRule {
    let at = |k: &str| format!("{base}.{k}");
    let mut out = PolicyRule { ports: r.to.ports.clone(), ..Default::default() };
    for (i, id) in r.from.identities.iter().enumerate() {
        let m = if id.ends_with('/') {
            Identity::parse(id.trim_end_matches('/')).map(|_| IdMatch::Prefix(id.clone()))
        } else {
            Identity::parse(id).map(|_| IdMatch::Exact(id.clone()))
        };
        out.identities.extend(e.parse(at(&format!("from.identities[{i}]")), m));
    }
    for (i, t) in r.from.trust_domains.iter().enumerate() {
        out.trust_domains.extend(
            e.parse(at(&format!("from.trust_domains[{i}]")), causeway_protocol::TrustDomain::new(t))
                .map(|t| t.as_str().to_string()),
        );
    }
    for (i, z) in r.from.zones.iter().enumerate() {
        out.zones.extend(
            e.parse(at(&format!("from.zones[{i}]")), causeway_protocol::ZoneName::new(z)).map(|z| z.to_string()),
        );
    }
    out.namespaces = r.from.namespaces.clone();
    for (i, c) in r.from.cidrs.iter().enumerate() {
        let n = c.parse::<ipnet::IpNet>().or_else(|_| c.parse::<IpAddr>().map(ipnet::IpNet::from));
        out.cidrs.extend(e.parse(at(&format!("from.cidrs[{i}]")), n.map_err(|_| "not an address or CIDR")));
    }
    if out.ports.contains(&0) {
        e.push(at("to.ports"), "ports are 1-65535");
    }
    for (i, m) in r.to.methods.iter().enumerate() {
        if http::Method::from_bytes(m.as_bytes()).is_err() {
            e.push(at(&format!("to.methods[{i}]")), "not an HTTP method");
        }
    }
    out.methods = r.to.methods.iter().map(|m| m.to_ascii_uppercase()).collect();
    for (i, p) in r.to.paths.iter().enumerate() {
        if !p.starts_with('/') && p != "*" {
            e.push(at(&format!("to.paths[{i}]")), "must start with '/' (or be \"*\")");
        }
    }
    out.paths = r.to.paths.clone();
    for (k, v) in &r.to.headers {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
            e.push(at(&format!("to.headers.{k}")), "not a valid header name");
        }
        out.headers.push((k.to_ascii_lowercase(), v.clone()));
    }
    out
}

#[cfg(test)]
mod tests;
