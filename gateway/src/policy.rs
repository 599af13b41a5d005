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

use crate::config::Errors;

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

/// Authorization decisions, by service, deciding policy and action (`allow`, `deny`, or `audit`:
/// an audit rule matched, or audit mode let a denial through).
pub const POLICY_DECISIONS: &str = "causeway_policy_decisions_total";

/// The running policy: replaced whole by a reload; every decision counted and every denial or
/// audit logged (target `causeway::access`, `kind=policy`).
pub struct Enforcer {
    policies: std::sync::RwLock<std::sync::Arc<Policies>>,
    limits: std::sync::RwLock<std::sync::Arc<crate::ratelimit::RateLimits>>,
    /// The shared store of global rate limits, kept across reloads that do not change it.
    store: std::sync::Mutex<Option<std::sync::Arc<crate::ratelimit::store::Store>>>,
    /// This gateway's zone and identity (the store's namespace and this gateway's name in it).
    zone: String,
    member: String,
    metrics: causeway_overlay::metrics::Metrics,
}

/// A caller's owned rate-limit keys (a check outlives the request's borrowed fields).
type RateKey = (ServiceName, String, String);

impl Enforcer {
    /// Needs a Tokio runtime when `store` is set (its heartbeat is a task).
    pub fn new(
        p: Policies,
        limits: &[crate::ratelimit::LimitSpec],
        store: Option<&crate::ratelimit::store::StoreSpec>,
        zone: &str,
        member: &str,
        metrics: causeway_overlay::metrics::Metrics,
    ) -> std::sync::Arc<Self> {
        let e = Self {
            policies: std::sync::RwLock::new(std::sync::Arc::new(p)),
            limits: std::sync::RwLock::new(std::sync::Arc::new(crate::ratelimit::RateLimits::new(
                &[],
                None,
                metrics.clone(),
            ))),
            store: std::sync::Mutex::new(None),
            zone: zone.to_string(),
            member: member.to_string(),
            metrics,
        };
        e.replace_limits(limits, store);
        std::sync::Arc::new(e)
    }

    pub fn replace(&self, p: Policies) {
        *self.policies.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(p);
    }

    /// New rate limits (a reload that changed them): fresh local buckets; a new store connection
    /// only when its configuration changed.
    pub fn replace_limits(
        &self,
        specs: &[crate::ratelimit::LimitSpec],
        store: Option<&crate::ratelimit::store::StoreSpec>,
    ) {
        let store = {
            let mut cur = self.store.lock().unwrap_or_else(|e| e.into_inner());
            if cur.as_ref().map(|s| s.spec()) != store {
                *cur = store.and_then(|spec| {
                    crate::ratelimit::store::Store::start(spec, &self.zone, &self.member, self.metrics.clone())
                        .inspect_err(|err| tracing::error!(error = %err, "rate_limit.store.config"))
                        .ok()
                });
            }
            cur.clone()
        };
        let l = crate::ratelimit::RateLimits::new(specs, store, self.metrics.clone());
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(l);
    }

    /// The gateway is shutting down: the rate-limit store's heartbeat stops.
    pub fn close(&self) {
        if let Some(store) = self.store.lock().unwrap_or_else(|e| e.into_inner()).take() {
            store.close();
        }
    }

    fn rate_key(s: &Subject<'_>) -> Option<RateKey> {
        let identity = s.identity.map(|i| i.as_str().to_string()).unwrap_or_default();
        Some((s.service?.clone(), identity, s.zone.unwrap_or("").to_string()))
    }

    /// The request rate limits for an authorized HTTP request (a round trip to the shared store
    /// for global limits).
    pub fn check_rate(
        &self,
        s: &Subject<'_>,
    ) -> impl std::future::Future<Output = Result<(), crate::ratelimit::Limited>> + Send + 'static {
        let limits = self.limits.read().unwrap_or_else(|e| e.into_inner()).clone();
        let key = Self::rate_key(s);
        async move {
            let Some((service, identity, zone)) = key else { return Ok(()) };
            limits.check_request(&service, &identity, &zone).await
        }
    }

    /// The decision for `s`, as `causeway policy explain` prints it; nothing counted or logged.
    pub fn explain(&self, s: &Subject<'_>) -> serde_json::Value {
        self.policies.read().unwrap_or_else(|e| e.into_inner()).explain(s)
    }

    /// Decides, counts and logs; returns whether the request or flow may pass, and the decision.
    pub fn check(&self, s: &Subject<'_>) -> (bool, Decision) {
        let p = self.policies.read().unwrap_or_else(|e| e.into_inner()).clone();
        let d = p.decide(s);
        let pass = d.allowed || p.audit_mode;
        let action = match (d.allowed, pass) {
            (true, _) => "allow",
            (false, true) => "audit",
            (false, false) => "deny",
        };
        let service = s.service.map(|x| x.as_str()).unwrap_or("");
        self.metrics
            .counter(POLICY_DECISIONS, &[("service", service), ("policy", &d.policy), ("action", action)])
            .increment(1);
        for a in &d.audited {
            self.metrics
                .counter(POLICY_DECISIONS, &[("service", service), ("policy", a), ("action", "audit")])
                .increment(1);
        }
        if !d.allowed || !d.audited.is_empty() {
            tracing::info!(
                target: "causeway::access",
                kind = "policy",
                service,
                source_identity = %s.identity.map(|i| i.as_str()).unwrap_or(""),
                source_zone = s.zone.unwrap_or(""),
                source_address = %s.addr.map(|a| a.to_string()).unwrap_or_default(),
                method = s.http.as_ref().map(|h| h.method).unwrap_or(""),
                path = s.http.as_ref().map(|h| h.path).unwrap_or(""),
                decision = action,
                policy = %d.policy,
                rule = d.rule.map(|r| r as i64).unwrap_or(-1),
                reason = d.reason,
                audited = %d.audited.join(","),
                "policy"
            );
        }
        (pass, d)
    }
}

fn flow_subject<'a>(c: &'a causeway_overlay::mesh::FlowCaller<'a>) -> Subject<'a> {
    Subject {
        service: Some(c.service),
        identity: c.identity,
        zone: c.zone.map(|z| z.as_str()),
        addr: c.addr,
        port: Some(c.port),
        http: None,
    }
}

impl causeway_overlay::mesh::Authorizer for Enforcer {
    fn authorize_flow(&self, c: &causeway_overlay::mesh::FlowCaller<'_>) -> Result<(), String> {
        match self.check(&flow_subject(c)) {
            (true, _) => Ok(()),
            (false, d) => Err(d.policy),
        }
    }

    /// An open flow asked again after a reload: decided, not counted as a new call (the mesh
    /// counts and logs a revocation).
    fn reauthorize_flow(&self, c: &causeway_overlay::mesh::FlowCaller<'_>) -> Result<(), String> {
        let p = self.policies.read().unwrap_or_else(|e| e.into_inner()).clone();
        let d = p.decide(&flow_subject(c));
        if d.allowed || p.audit_mode {
            Ok(())
        } else {
            Err(d.policy)
        }
    }

    fn admit_flow(&self, c: &causeway_overlay::mesh::FlowCaller<'_>) -> causeway_overlay::mesh::Admission {
        let limits = self.limits.read().unwrap_or_else(|e| e.into_inner()).clone();
        let service = c.service.clone();
        let identity = c.identity.map(|i| i.as_str().to_string()).unwrap_or_default();
        let zone = c.zone.map(|z| z.as_str().to_string()).unwrap_or_default();
        Box::pin(async move {
            match limits.admit_flow(&service, &identity, &zone).await {
                Ok(slots) => Ok(Box::new(slots) as Box<dyn Send + Sync>),
                Err(l) => Err(l.name),
            }
        })
    }
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(s: &str) -> Identity {
        Identity::parse(s).unwrap()
    }

    fn policies(yaml: &str) -> Policies {
        let raw: RawAuthorization = serde_yaml_ng::from_str(yaml).unwrap();
        let mut e = Errors::default();
        let p = validate(&raw, &mut e);
        e.into_result().unwrap();
        p
    }

    #[test]
    fn deny_wins_allow_narrows_and_the_default_decides_the_rest() {
        let p = policies(
            r#"
default_deny: false
policies:
  - name: readers
    service: reviews.shop
    action: allow
    rules:
      - from: { identities: ["spiffe://td/ns/shop/sa/frontend"] }
        to: { methods: [GET], paths: ["/public/*"] }
  - name: no-admin
    service: reviews.shop
    action: deny
    rules:
      - to: { paths: ["/admin*"] }
  - name: watch
    action: audit
    rules: [{ from: { namespaces: [shop] } }]
"#,
        );
        let (svc, other) = (ServiceName::new("reviews.shop").unwrap(), ServiceName::new("orders.shop").unwrap());
        let fe = id("spiffe://td/ns/shop/sa/frontend");
        let h = http::HeaderMap::new();
        let ask = |s: &ServiceName, who: &Identity, method: &'static str, path: &'static str| {
            p.decide(&Subject {
                service: Some(s),
                identity: Some(who),
                http: Some(HttpSubject { method, path, headers: &h }),
                ..Default::default()
            })
        };
        let d = ask(&svc, &fe, "GET", "/public/a");
        assert_eq!((d.allowed, d.policy.as_str(), d.reason), (true, "readers", "allow_rule"));
        assert_eq!(d.audited, vec!["watch"]);
        let d = ask(&svc, &fe, "POST", "/public/a");
        assert_eq!((d.allowed, d.reason), (false, "no_allow_rule"));
        let d = ask(&svc, &fe, "GET", "/admin/x");
        assert_eq!((d.allowed, d.policy.as_str(), d.reason), (false, "no-admin", "deny_rule"));
        // Another service has no allow policy: the default (allow) decides.
        let d = ask(&other, &id("spiffe://td/ns/x/sa/y"), "POST", "/anything");
        assert_eq!((d.allowed, d.reason), (true, "default_allow"));
        // A TCP flow: the allow rule's HTTP conditions never match it; the deny rule's always do.
        let d = p.decide(&Subject { service: Some(&svc), identity: Some(&fe), ..Default::default() });
        assert_eq!((d.allowed, d.policy.as_str()), (false, "no-admin"));
    }

    #[test]
    fn globs_and_namespaces() {
        assert!(glob("/api/*", "/api/v1/x"));
        assert!(glob("*.json", "/a/b.json"));
        assert!(glob("/a*b*c", "/a-b-b-c"));
        assert!(!glob("/api/*", "/apx/v1"));
        assert!(!glob("/exact", "/exact/more"));
        assert_eq!(namespace(&id("spiffe://td/ns/shop/sa/frontend")), Some("shop"));
        assert_eq!(namespace(&id("spiffe://td/zone/a/gateway/gw-1")), None);
    }

    #[test]
    fn bad_policies_name_their_paths() {
        let raw: RawAuthorization = serde_yaml_ng::from_str(
            r#"
policies:
  - { name: a, action: permit, rules: [{}] }
  - { name: a, action: allow, rules: [{ from: { identities: ["nope"], cidrs: ["10.0.0.0/99"] }, to: { paths: ["x"], ports: [0] } }] }
"#,
        )
        .unwrap();
        let mut e = Errors::default();
        let _ = validate(&raw, &mut e);
        let paths: Vec<String> = e.into_result().unwrap_err().into_iter().map(|x| x.path).collect();
        assert_eq!(
            paths,
            vec![
                "authorization.policies[0].action",
                "authorization.policies[1].name",
                "authorization.policies[1].rules[0].from.identities[0]",
                "authorization.policies[1].rules[0].from.cidrs[0]",
                "authorization.policies[1].rules[0].to.ports",
                "authorization.policies[1].rules[0].to.paths[0]",
            ]
        );
    }

    /// The plain reference: the README's four steps read literally, over the whole policy list.
    fn reference(p: &Policies, s: &Subject<'_>) -> bool {
        let applicable: Vec<&Policy> =
            p.policies.iter().filter(|x| x.service.is_none() || x.service.as_ref() == s.service).collect();
        let holds = |r: &PolicyRule, deny: bool| -> bool {
            let mut ok = true;
            if !r.identities.is_empty() {
                ok &= s.identity.is_some_and(|i| {
                    r.identities.iter().any(|m| match m {
                        IdMatch::Exact(x) => i.as_str() == x,
                        IdMatch::Prefix(x) => i.as_str().starts_with(x.as_str()),
                    })
                });
            }
            if !r.zones.is_empty() {
                ok &= s.zone.is_some_and(|z| r.zones.iter().any(|x| x == z));
            }
            if !r.cidrs.is_empty() {
                ok &= s.addr.is_some_and(|a| r.cidrs.iter().any(|n| n.contains(&a)));
            }
            if !r.ports.is_empty() {
                ok &= s.port.is_some_and(|x| r.ports.contains(&x));
            }
            match &s.http {
                Some(h) => {
                    if !r.methods.is_empty() {
                        ok &= r.methods.iter().any(|m| m == h.method);
                    }
                    if !r.paths.is_empty() {
                        ok &= r.paths.iter().any(|x| glob(x, h.path));
                    }
                }
                None => {
                    if !r.methods.is_empty() || !r.paths.is_empty() || !r.headers.is_empty() {
                        ok &= deny;
                    }
                }
            }
            ok
        };
        if applicable.iter().any(|x| x.action == Action::Deny && x.rules.iter().any(|r| holds(r, true))) {
            return false;
        }
        let allows: Vec<&&Policy> = applicable.iter().filter(|x| x.action == Action::Allow).collect();
        if !allows.is_empty() {
            return allows.iter().any(|x| x.rules.iter().any(|r| holds(r, false)));
        }
        !p.default_deny
    }

    fn arb_rule() -> impl Strategy<Value = PolicyRule> {
        let ids = prop::collection::vec(
            prop_oneof![
                Just(IdMatch::Exact("spiffe://td/ns/a/sa/x".into())),
                Just(IdMatch::Exact("spiffe://td/ns/b/sa/y".into())),
                Just(IdMatch::Prefix("spiffe://td/ns/a/".into())),
            ],
            0..2,
        );
        let zones = prop::collection::vec(prop_oneof![Just("east".to_string()), Just("west".to_string())], 0..2);
        let cidrs = prop::collection::vec(
            prop_oneof![
                Just("10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()),
                Just("10.1.0.0/16".parse::<ipnet::IpNet>().unwrap())
            ],
            0..2,
        );
        let ports = prop::collection::vec(prop_oneof![Just(80u16), Just(443)], 0..2);
        let methods = prop::collection::vec(prop_oneof![Just("GET".to_string()), Just("POST".to_string())], 0..2);
        let paths = prop::collection::vec(prop_oneof![Just("/a/*".to_string()), Just("/b".to_string())], 0..2);
        (ids, zones, cidrs, ports, methods, paths).prop_map(|(identities, zones, cidrs, ports, methods, paths)| {
            PolicyRule { identities, zones, cidrs, ports, methods, paths, ..Default::default() }
        })
    }

    fn arb_policies() -> impl Strategy<Value = Policies> {
        let policy = (
            prop_oneof![Just(Action::Allow), Just(Action::Deny), Just(Action::Audit)],
            prop_oneof![Just(None), Just(Some("s.one")), Just(Some("s.two"))],
            prop::collection::vec(arb_rule(), 1..3),
        );
        (any::<bool>(), prop::collection::vec(policy, 0..5)).prop_map(|(default_deny, ps)| Policies {
            audit_mode: false,
            default_deny,
            policies: ps
                .into_iter()
                .enumerate()
                .map(|(i, (action, svc, rules))| Policy {
                    name: format!("p{i}"),
                    service: svc.map(|s| ServiceName::new(s).unwrap()),
                    action,
                    rules,
                })
                .collect(),
        })
    }

    proptest! {
        #[test]
        fn the_evaluator_agrees_with_the_reference(
            p in arb_policies(),
            svc in prop_oneof![Just("s.one"), Just("s.two")],
            who in prop_oneof![Just("spiffe://td/ns/a/sa/x"), Just("spiffe://td/ns/b/sa/y"), Just("spiffe://td/ns/c/sa/z")],
            zone in prop_oneof![Just("east"), Just("west"), Just("north")],
            addr in prop_oneof![Just("10.1.2.3"), Just("10.2.0.1"), Just("192.168.0.1")],
            port in prop_oneof![Just(80u16), Just(443), Just(8080)],
            req in prop_oneof![Just(None), Just(Some(("GET", "/a/x"))), Just(Some(("POST", "/b"))), Just(Some(("GET", "/c")))],
        ) {
            let svc = ServiceName::new(svc).unwrap();
            let who = id(who);
            let h = http::HeaderMap::new();
            let s = Subject {
                service: Some(&svc),
                identity: Some(&who),
                zone: Some(zone),
                addr: Some(addr.parse().unwrap()),
                port: Some(port),
                http: req.map(|(method, path)| HttpSubject { method, path, headers: &h }),
            };
            prop_assert_eq!(p.decide(&s).allowed, reference(&p, &s));
        }
    }
}
