//! The running authorization: the policies and rate limits in force (swapped whole on reload),
//! the decisions they make for flows and requests, counted and logged, and the overlay's
//! `Authorizer` built on them.

use super::*;

/// Authorization decisions, by service, deciding policy and action (`allow`, `deny`, or `audit`:
/// an audit rule matched, or audit mode let a denial through).
pub const POLICY_DECISIONS: &str = "causeway_policy_decisions_total";

/// The running policy: replaced whole by a reload; every decision counted and every denial or
/// audit logged (target `causeway::audit`, `kind=policy`; the flow or request has its own access event).
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
    fn authorize_flow(&self, c: &causeway_overlay::ports::FlowCaller<'_>) -> Result<(), String> {
        match self.check(&flow_subject(c)) {
            (true, _) => Ok(()),
            (false, d) => Err(d.policy),
        }
    }

    /// An open flow asked again after a reload: decided, not counted as a new call (the mesh
    /// counts and logs a revocation).
    fn reauthorize_flow(&self, c: &causeway_overlay::ports::FlowCaller<'_>) -> Result<(), String> {
        let p = self.policies.read().unwrap_or_else(|e| e.into_inner()).clone();
        let d = p.decide(&flow_subject(c));
        if d.allowed || p.audit_mode {
            Ok(())
        } else {
            Err(d.policy)
        }
    }

    fn admit_flow(&self, c: &causeway_overlay::ports::FlowCaller<'_>) -> causeway_overlay::ports::Admission {
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
