//! The running authorization: the policies and rate limits in force (swapped whole on reload),
//! the decisions they make for flows and requests, counted and logged, and the overlay's
//! `Authorizer` built on them.

use super::*;
use crate::rules::{RuleSpec, Rules};

/// Authorization decisions, by service, deciding policy and action (`allow`, `deny`, or `audit`:
/// an audit rule matched, or audit mode let a denial through).
pub const POLICY_DECISIONS: &str = "causeway_policy_decisions_total";

/// The rules in force ([`Rules`]: routes, endpoint options, policies, rate limits), installed
/// whole from a snapshot; every decision counted and every denial or audit logged (target
/// `causeway::audit`, `kind=policy`; the flow or request has its own access event).
pub struct Enforcer {
    rules: std::sync::RwLock<std::sync::Arc<Rules>>,
    /// One install at a time (each builds on the rules and store in force).
    installing: std::sync::Mutex<()>,
    /// The shared store of global rate limits, kept across installs that do not change it.
    store: std::sync::Mutex<Option<std::sync::Arc<crate::ratelimit::store::Store>>>,
    /// This gateway's zone and identity (the store's namespace and this gateway's name in it).
    zone: String,
    member: String,
    metrics: causeway_overlay::metrics::Metrics,
}

/// A caller's owned rate-limit keys (a check outlives the request's borrowed fields).
type RateKey = (ServiceName, String, String);

impl Enforcer {
    /// Needs a Tokio runtime when `spec` names a store (its heartbeat is a task).
    pub fn new(
        spec: RuleSpec<'_>,
        zone: &str,
        member: &str,
        metrics: causeway_overlay::metrics::Metrics,
    ) -> std::sync::Arc<Self> {
        let empty = Rules {
            routes: Vec::new(),
            options: Default::default(),
            policies: Policies::default(),
            limits: std::sync::Arc::new(crate::ratelimit::RateLimits::new(&[], None, metrics.clone())),
            limit_specs: Vec::new(),
        };
        let e = Self {
            rules: std::sync::RwLock::new(std::sync::Arc::new(empty)),
            installing: std::sync::Mutex::new(()),
            store: std::sync::Mutex::new(None),
            zone: zone.to_string(),
            member: member.to_string(),
            metrics,
        };
        e.install(spec);
        std::sync::Arc::new(e)
    }

    /// The rules in force: a request or flow loads them once and decides everything by them.
    pub fn rules(&self) -> std::sync::Arc<Rules> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Builds the rules of `spec` and swaps them in with one write: the next request or flow sees
    /// all of them, one already deciding keeps the set it loaded. Rate limits whose specs and
    /// store are unchanged are kept with their state; changed ones start fresh, on a new store
    /// connection only when the store's configuration changed.
    pub fn install(&self, spec: RuleSpec<'_>) {
        let _one = self.installing.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.rules();
        let store_changed = {
            let cur = self.store.lock().unwrap_or_else(|e| e.into_inner());
            cur.as_ref().map(|s| s.spec()) != spec.rate_limit_store
        };
        let limits = if !store_changed && old.limit_specs == spec.rate_limits {
            old.limits.clone()
        } else {
            let store = {
                let mut cur = self.store.lock().unwrap_or_else(|e| e.into_inner());
                if store_changed {
                    // The old store stops when the last rules using it are dropped.
                    *cur = spec.rate_limit_store.and_then(|s| {
                        crate::ratelimit::store::Store::start(s, &self.zone, &self.member, self.metrics.clone())
                            .inspect_err(|err| tracing::error!(error = %err, "rate_limit.store.config"))
                            .ok()
                    });
                }
                cur.clone()
            };
            std::sync::Arc::new(crate::ratelimit::RateLimits::new(spec.rate_limits, store, self.metrics.clone()))
        };
        let rules = Rules {
            routes: spec.routes.to_vec(),
            options: spec.options.clone(),
            policies: spec.policies.clone(),
            limits,
            limit_specs: spec.rate_limits.to_vec(),
        };
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(rules);
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
        rules: &Rules,
        s: &Subject<'_>,
    ) -> impl std::future::Future<Output = Result<(), crate::ratelimit::Limited>> + Send + 'static {
        let limits = rules.limits.clone();
        let key = Self::rate_key(s);
        async move {
            let Some((service, identity, zone)) = key else { return Ok(()) };
            limits.check_request(&service, &identity, &zone).await
        }
    }

    /// The decision for `s`, as `causeway policy explain` prints it; nothing counted or logged.
    pub fn explain(&self, s: &Subject<'_>) -> serde_json::Value {
        self.rules().policies.explain(s)
    }

    /// Decides by `rules`, counts and logs; returns whether the request or flow may pass, and the
    /// decision.
    pub fn check(&self, rules: &Rules, s: &Subject<'_>) -> (bool, Decision) {
        let p = &rules.policies;
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
                target: "causeway::audit",
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

fn flow_subject<'a>(c: &'a causeway_overlay::ports::FlowCaller<'a>) -> Subject<'a> {
    Subject {
        service: Some(c.service),
        identity: c.identity,
        zone: c.zone.map(|z| z.as_str()),
        addr: c.addr,
        port: Some(c.port),
        http: None,
    }
}

impl causeway_overlay::ports::Authorizer for Enforcer {
    /// The policy now, then (a future) the rate limits, both of one set of rules.
    fn authorize_flow(
        &self,
        c: &causeway_overlay::ports::FlowCaller<'_>,
    ) -> Result<causeway_overlay::ports::Admission, String> {
        let rules = self.rules();
        if let (false, d) = self.check(&rules, &flow_subject(c)) {
            return Err(d.policy);
        }
        let limits = rules.limits.clone();
        let service = c.service.clone();
        let identity = c.identity.map(|i| i.as_str().to_string()).unwrap_or_default();
        let zone = c.zone.map(|z| z.as_str().to_string()).unwrap_or_default();
        Ok(Box::pin(async move {
            match limits.admit_flow(&service, &identity, &zone).await {
                Ok(slots) => Ok(Box::new(slots) as Box<dyn Send + Sync>),
                Err(l) => Err(l.name),
            }
        }))
    }

    /// An open flow asked again after a policy change: decided, not counted as a new call (the
    /// mesh counts and logs a revocation).
    fn reauthorize_flow(&self, c: &causeway_overlay::ports::FlowCaller<'_>) -> Result<(), String> {
        let rules = self.rules();
        let d = rules.policies.decide(&flow_subject(c));
        if d.allowed || rules.policies.audit_mode {
            Ok(())
        } else {
            Err(d.policy)
        }
    }
}
