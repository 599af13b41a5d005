//! Rate limits at the destination gateway (`rate_limits`): token buckets (governor's GCRA) per
//! service, per source identity or per source zone — requests per second for HTTP (429 with
//! `Retry-After`), new flows per second and concurrent flows for TCP.
//!
//! Limits are local to each gateway: N gateways of a zone behind one address admit up to N times a
//! limit together (a shared, Redis-backed mode is issue 9's next step). A reload that changes the
//! limits starts fresh buckets.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use causeway_protocol::ServiceName;
use governor::clock::Clock;
use serde::{Deserialize, Serialize};

use crate::config::Errors;

/// Distinct keys a limit tracks before it forgets idle ones (a bound on its memory).
const MAX_KEYS: usize = 10_000;

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub name: String,
    /// The exported service it limits; absent: each exported service on its own.
    #[serde(default)]
    pub service: Option<String>,
    /// `identity` (default), `zone` or `service`: whose bucket a call draws from.
    #[serde(default)]
    pub per: Option<String>,
    /// HTTP requests per second.
    #[serde(default)]
    pub requests_per_second: Option<u32>,
    /// TCP flows opened per second.
    #[serde(default)]
    pub flows_per_second: Option<u32>,
    /// Calls that may arrive at once above the rate; default a tenth of a second's worth.
    #[serde(default)]
    pub burst: Option<u32>,
    /// TCP flows open at once.
    #[serde(default)]
    pub max_flows: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Per {
    Identity,
    Zone,
    Service,
}

/// A validated limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSpec {
    pub name: String,
    pub service: Option<ServiceName>,
    pub per: Per,
    pub requests_per_second: Option<NonZeroU32>,
    pub flows_per_second: Option<NonZeroU32>,
    pub burst: Option<NonZeroU32>,
    pub max_flows: Option<u32>,
}

pub(crate) fn validate(raw: &[RawRateLimit], exports: &[causeway_overlay::Export], e: &mut Errors) -> Vec<LimitSpec> {
    let mut names = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let at = |k: &str| format!("rate_limits[{i}].{k}");
        if r.name.is_empty() || r.name.len() > 63 || !names.insert(r.name.clone()) {
            e.push(at("name"), "must be 1-63 bytes and unique");
        }
        let service = r.service.as_ref().and_then(|s| e.parse(at("service"), ServiceName::new(s)));
        if let Some(s) = service.as_ref().filter(|s| !exports.iter().any(|x| &x.name == *s)) {
            e.push(at("service"), format!("{s} is not exported by this gateway"));
        }
        let per = match r.per.as_deref() {
            None | Some("identity") => Per::Identity,
            Some("zone") => Per::Zone,
            Some("service") => Per::Service,
            Some(other) => {
                e.push(at("per"), format!("{other:?} is not one of identity, zone, service"));
                Per::Identity
            }
        };
        let nz = |e: &mut Errors, k: &str, v: Option<u32>| {
            v.and_then(|v| {
                let n = NonZeroU32::new(v);
                if n.is_none() {
                    e.push(at(k), "must be at least 1");
                }
                n
            })
        };
        let requests_per_second = nz(e, "requests_per_second", r.requests_per_second);
        let flows_per_second = nz(e, "flows_per_second", r.flows_per_second);
        let burst = nz(e, "burst", r.burst);
        if r.max_flows == Some(0) {
            e.push(at("max_flows"), "must be at least 1");
        }
        if r.requests_per_second.is_none() && r.flows_per_second.is_none() && r.max_flows.is_none() {
            e.push(at("name"), "limits nothing: set requests_per_second, flows_per_second or max_flows");
        }
        out.push(LimitSpec {
            name: r.name.clone(),
            service,
            per,
            requests_per_second,
            flows_per_second,
            burst,
            max_flows: r.max_flows,
        });
    }
    out
}

type Bucket = governor::DefaultKeyedRateLimiter<String>;

/// One limit's running state.
struct Limit {
    spec: LimitSpec,
    requests: Option<Bucket>,
    flows: Option<Bucket>,
    open: OpenFlows,
}

/// A call refused by a limit: which, and when to try again.
#[derive(Debug, Clone)]
pub struct Limited {
    pub name: String,
    pub retry_after: Duration,
}

/// The running limits, replaced whole by a reload.
pub struct RateLimits {
    limits: Vec<Limit>,
    metrics: causeway_overlay::metrics::Metrics,
}

/// Rate-limited calls, by service, limit and kind (`requests`, `flows`, `concurrent`).
pub const RATE_LIMITED: &str = "causeway_rate_limited_total";

fn quota(rate: NonZeroU32, burst: Option<NonZeroU32>) -> governor::Quota {
    let burst = burst.unwrap_or_else(|| NonZeroU32::new((rate.get() / 10).max(1)).unwrap_or(NonZeroU32::MIN));
    governor::Quota::per_second(rate).allow_burst(burst)
}

/// Open flows per key of one limit.
type OpenFlows = Arc<Mutex<HashMap<String, u32>>>;

/// A flow's places in the concurrent-flow counts, given back when dropped.
pub struct FlowSlots(Vec<(OpenFlows, String)>);

impl Drop for FlowSlots {
    fn drop(&mut self) {
        for (open, key) in &self.0 {
            let mut m = open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    m.remove(key);
                }
            }
        }
    }
}

impl RateLimits {
    pub fn new(specs: &[LimitSpec], metrics: causeway_overlay::metrics::Metrics) -> Self {
        let limits = specs
            .iter()
            .map(|s| Limit {
                spec: s.clone(),
                requests: s.requests_per_second.map(|r| Bucket::keyed(quota(r, s.burst))),
                flows: s.flows_per_second.map(|r| Bucket::keyed(quota(r, s.burst))),
                open: Arc::default(),
            })
            .collect();
        Self { limits, metrics }
    }

    fn applicable<'a>(&'a self, service: &'a ServiceName) -> impl Iterator<Item = &'a Limit> + 'a {
        self.limits.iter().filter(move |l| l.spec.service.as_ref().is_none_or(|s| s == service))
    }

    fn key(l: &Limit, service: &ServiceName, identity: &str, zone: &str) -> String {
        // Limits without a service keep one bucket per service.
        let who = match l.spec.per {
            Per::Identity => identity,
            Per::Zone => zone,
            Per::Service => "",
        };
        format!("{service}|{who}")
    }

    fn take(
        &self,
        bucket: &Bucket,
        key: String,
        l: &Limit,
        service: &ServiceName,
        kind: &'static str,
    ) -> Result<(), Limited> {
        if bucket.len() > MAX_KEYS {
            bucket.retain_recent();
        }
        match bucket.check_key(&key) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                self.count(service, l, kind);
                Err(Limited { name: l.spec.name.clone(), retry_after: not_until.wait_time_from(bucket.clock().now()) })
            }
        }
    }

    fn count(&self, service: &ServiceName, l: &Limit, kind: &'static str) {
        self.metrics
            .counter(RATE_LIMITED, &[("service", service.as_str()), ("limit", &l.spec.name), ("kind", kind)])
            .increment(1);
    }

    /// An HTTP request to `service` from `identity` in `zone`.
    pub fn check_request(&self, service: &ServiceName, identity: &str, zone: &str) -> Result<(), Limited> {
        for l in self.applicable(service) {
            if let Some(b) = &l.requests {
                self.take(b, Self::key(l, service, identity, zone), l, service, "requests")?;
            }
        }
        Ok(())
    }

    /// A new TCP flow: its rate, then its place among the open flows (held until the slots drop).
    pub fn admit_flow(&self, service: &ServiceName, identity: &str, zone: &str) -> Result<FlowSlots, Limited> {
        let mut slots = FlowSlots(Vec::new());
        for l in self.applicable(service) {
            let key = Self::key(l, service, identity, zone);
            if let Some(b) = &l.flows {
                self.take(b, key.clone(), l, service, "flows")?;
            }
            if let Some(max) = l.spec.max_flows {
                let mut open = l.open.lock().unwrap_or_else(|e| e.into_inner());
                let n = open.entry(key.clone()).or_insert(0);
                if *n >= max {
                    drop(open);
                    self.count(service, l, "concurrent");
                    // A place frees when a flow ends: no time to promise.
                    return Err(Limited { name: l.spec.name.clone(), retry_after: Duration::from_secs(1) });
                }
                *n += 1;
                slots.0.push((l.open.clone(), key));
            }
        }
        Ok(slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(yaml: &str) -> RateLimits {
        let raw: Vec<RawRateLimit> = serde_yaml_ng::from_str(yaml).unwrap();
        let mut e = Errors::default();
        let specs = validate(&raw, &[], &mut e);
        e.into_result().unwrap();
        RateLimits::new(&specs, causeway_overlay::metrics::Metrics::noop())
    }

    #[test]
    fn buckets_are_per_identity_and_flows_are_counted_while_open() {
        let l = limits("[{ name: r, requests_per_second: 100, flows_per_second: 1000, max_flows: 2 }]");
        let s = ServiceName::new("a.shop").unwrap();
        // A tenth of a second's worth at once, then refused with a wait of about 10 ms.
        let admitted = (0..50).filter(|_| l.check_request(&s, "id-a", "east").is_ok()).count();
        assert_eq!(admitted, 10);
        let err = l.check_request(&s, "id-a", "east").unwrap_err();
        assert!(err.retry_after <= Duration::from_millis(10) && err.name == "r", "{err:?}");
        assert!(l.check_request(&s, "id-b", "east").is_ok(), "another identity has its own bucket");
        let (one, two) = (l.admit_flow(&s, "id-a", "east").unwrap(), l.admit_flow(&s, "id-a", "east").unwrap());
        assert!(l.admit_flow(&s, "id-a", "east").is_err(), "a third concurrent flow");
        drop(one);
        let three = l.admit_flow(&s, "id-a", "east").unwrap();
        drop((two, three));
    }

    #[test]
    fn bad_limits_name_their_paths() {
        let raw: Vec<RawRateLimit> =
            serde_yaml_ng::from_str("[{ name: a, per: team, requests_per_second: 0 }, { name: a, max_flows: 3 }]")
                .unwrap();
        let mut e = Errors::default();
        let _ = validate(&raw, &[], &mut e);
        let paths: Vec<String> = e.into_result().unwrap_err().into_iter().map(|x| x.path).collect();
        assert_eq!(paths, vec!["rate_limits[0].per", "rate_limits[0].requests_per_second", "rate_limits[1].name"]);
    }
}
