//! Rate limits at the destination gateway (`rate_limits`): token buckets (GCRA) per service, per
//! source identity or per source zone — requests per second for HTTP (429 with `Retry-After`),
//! new flows per second and concurrent flows for TCP.
//!
//! `scope: local` (the default) keeps a limit's buckets in each gateway (governor): N gateways of
//! a zone behind one address admit up to N times a limit together. `scope: global` draws its
//! rates from buckets the zone's gateways share in Redis (`rate_limit_store`, see [`store`]); when
//! the store does not answer, each gateway falls back to its local share of the limit or refuses,
//! as configured. Concurrent-flow counts (`max_flows`) are always per gateway. A reload that
//! changes the limits starts fresh local buckets (shared ones carry on).

pub mod store;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use causeway_protocol::ServiceName;
use governor::clock::Clock;
use serde::{Deserialize, Serialize};

use crate::parse::Errors;
use store::{OnFailure, Store, StoreSpec, Verdict};

/// Distinct callers a limit's local buckets track. Past it, callers whose buckets are full again
/// are forgotten (at most once a second); if that is not enough (a flood of distinct callers),
/// callers without a bucket share one overflow bucket, and those with one keep it.
const MAX_KEYS: usize = 10_000;
/// How often a full table of buckets is swept for idle callers.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

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
    /// TCP flows open at once (always per gateway).
    #[serde(default)]
    pub max_flows: Option<u32>,
    /// `local` (default: each gateway on its own) or `global` (the zone's gateways share the
    /// rates through `rate_limit_store`).
    #[serde(default)]
    pub scope: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Per {
    Identity,
    Zone,
    Service,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Local,
    Global,
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
    pub scope: Scope,
}

pub(crate) fn validate(
    raw: &[RawRateLimit],
    exports: &[causeway_overlay::Export],
    store: Option<&StoreSpec>,
    e: &mut Errors,
) -> Vec<LimitSpec> {
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
        let scope = match r.scope.as_deref() {
            None | Some("local") => Scope::Local,
            Some("global") => {
                if store.is_none() {
                    e.push(at("scope"), "global needs a rate_limit_store");
                }
                Scope::Global
            }
            Some(other) => {
                e.push(at("scope"), format!("{other:?} is not one of local, global"));
                Scope::Local
            }
        };
        out.push(LimitSpec {
            name: r.name.clone(),
            service,
            per,
            requests_per_second,
            flows_per_second,
            burst,
            max_flows: r.max_flows,
            scope,
        });
    }
    out
}

/// One limit's local buckets, a GCRA (governor) per caller, bounded by [`MAX_KEYS`].
struct Keyed {
    quota: governor::Quota,
    clock: governor::clock::DefaultClock,
    /// A bucket is full again this long after its last admitted call: forgetting it loses nothing.
    refill: Duration,
    table: Mutex<Table>,
}

struct Table {
    buckets: HashMap<String, (governor::DefaultDirectRateLimiter, std::time::Instant)>,
    swept: std::time::Instant,
}

impl Keyed {
    fn new(quota: governor::Quota) -> Self {
        let refill = quota.replenish_interval() * quota.burst_size().get();
        let table = Table { buckets: HashMap::new(), swept: std::time::Instant::now() };
        Self { quota, clock: governor::clock::DefaultClock::default(), refill, table: Mutex::new(table) }
    }

    /// One call by `key` (`overflow`: the bucket of callers the table has no room for); `Err` is
    /// the time until the bucket admits one.
    fn check(&self, key: &str, overflow: impl FnOnce() -> String) -> Result<(), Duration> {
        let now = std::time::Instant::now();
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if !t.buckets.contains_key(key) && t.buckets.len() >= MAX_KEYS && now.duration_since(t.swept) >= SWEEP_EVERY {
            let refill = self.refill;
            t.buckets.retain(|_, (_, last)| now.duration_since(*last) < refill);
            t.swept = now;
        }
        let key = if t.buckets.contains_key(key) || t.buckets.len() < MAX_KEYS { key.to_string() } else { overflow() };
        let (bucket, last) = t
            .buckets
            .entry(key)
            .or_insert_with(|| (governor::RateLimiter::direct_with_clock(self.quota, self.clock.clone()), now));
        match bucket.check() {
            Ok(()) => {
                *last = now;
                Ok(())
            }
            Err(not_until) => Err(not_until.wait_time_from(self.clock.now())),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).buckets.len()
    }
}

/// A limit's local buckets, at `1/share` of its rates (share 1 unless a global limit falls back).
struct Local {
    share: u32,
    requests: Option<Keyed>,
    flows: Option<Keyed>,
}

impl Local {
    fn new(spec: &LimitSpec, share: u32) -> Arc<Self> {
        let part = |rate: NonZeroU32| quota(rate, spec.burst, share);
        Arc::new(Self {
            share,
            requests: spec.requests_per_second.map(|r| Keyed::new(part(r))),
            flows: spec.flows_per_second.map(|r| Keyed::new(part(r))),
        })
    }
}

/// One limit's running state.
struct Limit {
    spec: LimitSpec,
    local: RwLock<Arc<Local>>,
    open: OpenFlows,
}

/// A call refused by a limit: which, and when to try again.
#[derive(Debug, Clone)]
pub struct Limited {
    pub name: String,
    pub retry_after: Duration,
    /// Refused because the shared store is down and its fallback is `closed`.
    pub store_unavailable: bool,
}

/// The running limits, replaced whole by a reload.
pub struct RateLimits {
    limits: Vec<Limit>,
    store: Option<Arc<Store>>,
    metrics: causeway_overlay::metrics::Metrics,
}

/// Rate-limited calls, by service, limit and kind (`requests`, `flows`, `concurrent`).
pub const RATE_LIMITED: &str = "causeway_rate_limited_total";
/// Decisions of global limits taken without the store, by limit and fallback (`local`, `closed`).
pub const FALLBACKS: &str = "causeway_rate_limit_fallbacks_total";

/// The default burst: a tenth of a second's worth.
fn burst_of(rate: NonZeroU32, burst: Option<NonZeroU32>) -> NonZeroU32 {
    burst.unwrap_or_else(|| NonZeroU32::new((rate.get() / 10).max(1)).unwrap_or(NonZeroU32::MIN))
}

/// `1/share` of a rate and its burst (each at least 1).
fn quota(rate: NonZeroU32, burst: Option<NonZeroU32>, share: u32) -> governor::Quota {
    let part = |n: NonZeroU32| NonZeroU32::new(n.get().div_ceil(share.max(1))).unwrap_or(NonZeroU32::MIN);
    governor::Quota::per_second(part(rate)).allow_burst(part(burst_of(rate, burst)))
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

#[derive(Clone, Copy)]
enum Kind {
    Requests,
    Flows,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Flows => "flows",
        }
    }
}

impl RateLimits {
    /// `store` serves the `scope: global` limits (validation made sure there is one).
    pub fn new(specs: &[LimitSpec], store: Option<Arc<Store>>, metrics: causeway_overlay::metrics::Metrics) -> Self {
        let limits = specs
            .iter()
            .map(|s| Limit { spec: s.clone(), local: RwLock::new(Local::new(s, 1)), open: Arc::default() })
            .collect();
        Self { limits, store, metrics }
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

    /// One call of `kind` against limit `l`: from the shared store for a global limit (its
    /// fallback when the store does not answer), else from the local buckets.
    async fn take(&self, l: &Limit, kind: Kind, key: String, service: &ServiceName) -> Result<(), Limited> {
        let rate = match kind {
            Kind::Requests => l.spec.requests_per_second,
            Kind::Flows => l.spec.flows_per_second,
        };
        let Some(rate) = rate else { return Ok(()) };
        let refused = |retry_after: Duration, store_unavailable: bool| {
            self.count(service, l, kind.as_str());
            Err(Limited { name: l.spec.name.clone(), retry_after, store_unavailable })
        };
        let mut share = 1;
        if let (Scope::Global, Some(store)) = (l.spec.scope, &self.store) {
            let bucket = format!("{}:{}:{key}", l.spec.name, kind.as_str());
            match store.take(&bucket, rate, burst_of(rate, l.spec.burst)).await {
                Verdict::Admit => return Ok(()),
                Verdict::Wait(d) => return refused(d, false),
                Verdict::Unavailable => {
                    let mode = store.spec().on_failure;
                    self.metrics.counter(FALLBACKS, &[("limit", &l.spec.name), ("mode", mode.as_str())]).increment(1);
                    if mode == OnFailure::Closed {
                        return refused(Duration::from_secs(1), true);
                    }
                    share = store.share();
                }
            }
        }
        let local = {
            let cur = l.local.read().unwrap_or_else(|e| e.into_inner()).clone();
            if cur.share == share {
                cur
            } else {
                // The zone's gateway count changed since this limit last fell back.
                let fresh = Local::new(&l.spec, share);
                *l.local.write().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
                fresh
            }
        };
        let bucket = match kind {
            Kind::Requests => local.requests.as_ref(),
            Kind::Flows => local.flows.as_ref(),
        };
        let Some(bucket) = bucket else { return Ok(()) };
        match bucket.check(&key, || format!("{service}|~overflow")) {
            Ok(()) => Ok(()),
            Err(wait) => refused(wait, false),
        }
    }

    fn count(&self, service: &ServiceName, l: &Limit, kind: &'static str) {
        self.metrics
            .counter(RATE_LIMITED, &[("service", service.as_str()), ("limit", &l.spec.name), ("kind", kind)])
            .increment(1);
    }

    /// An HTTP request to `service` from `identity` in `zone`.
    pub async fn check_request(&self, service: &ServiceName, identity: &str, zone: &str) -> Result<(), Limited> {
        for l in self.applicable(service) {
            self.take(l, Kind::Requests, Self::key(l, service, identity, zone), service).await?;
        }
        Ok(())
    }

    /// A new TCP flow: its rate, then its place among the open flows (held until the slots drop).
    pub async fn admit_flow(&self, service: &ServiceName, identity: &str, zone: &str) -> Result<FlowSlots, Limited> {
        let mut slots = FlowSlots(Vec::new());
        for l in self.applicable(service) {
            let key = Self::key(l, service, identity, zone);
            self.take(l, Kind::Flows, key.clone(), service).await?;
            if let Some(max) = l.spec.max_flows {
                let mut open = l.open.lock().unwrap_or_else(|e| e.into_inner());
                let n = open.get(&key).copied();
                // A flood of distinct callers finds no room either once the table is full.
                if n.unwrap_or(0) >= max || (n.is_none() && open.len() >= MAX_KEYS) {
                    drop(open);
                    self.count(service, l, "concurrent");
                    // A place frees when a flow ends: no time to promise.
                    return Err(Limited {
                        name: l.spec.name.clone(),
                        retry_after: Duration::from_secs(1),
                        store_unavailable: false,
                    });
                }
                *open.entry(key.clone()).or_insert(0) += 1;
                slots.0.push((l.open.clone(), key));
            }
        }
        Ok(slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(yaml: &str, store: Option<&StoreSpec>) -> Vec<LimitSpec> {
        let raw: Vec<RawRateLimit> = serde_yaml_ng::from_str(yaml).unwrap();
        let mut e = Errors::default();
        let specs = validate(&raw, &[], store, &mut e);
        e.into_result().unwrap();
        specs
    }

    fn limits(yaml: &str) -> RateLimits {
        RateLimits::new(&specs(yaml, None), None, causeway_overlay::metrics::Metrics::noop())
    }

    async fn admitted(l: &RateLimits, s: &ServiceName, id: &str, n: usize) -> usize {
        let mut ok = 0;
        for _ in 0..n {
            ok += usize::from(l.check_request(s, id, "east").await.is_ok());
        }
        ok
    }

    #[tokio::test]
    async fn buckets_are_per_identity_and_flows_are_counted_while_open() {
        let l = limits("[{ name: r, requests_per_second: 100, flows_per_second: 1000, max_flows: 2 }]");
        let s = ServiceName::new("a.shop").unwrap();
        // A tenth of a second's worth at once, then refused with a wait of about 10 ms.
        assert_eq!(admitted(&l, &s, "id-a", 50).await, 10);
        let err = l.check_request(&s, "id-a", "east").await.unwrap_err();
        assert!(err.retry_after <= Duration::from_millis(10) && err.name == "r", "{err:?}");
        assert!(l.check_request(&s, "id-b", "east").await.is_ok(), "another identity has its own bucket");
        let one = l.admit_flow(&s, "id-a", "east").await.unwrap();
        let two = l.admit_flow(&s, "id-a", "east").await.unwrap();
        assert!(l.admit_flow(&s, "id-a", "east").await.is_err(), "a third concurrent flow");
        drop(one);
        let three = l.admit_flow(&s, "id-a", "east").await.unwrap();
        drop((two, three));
    }

    #[tokio::test]
    async fn a_flood_of_new_callers_shares_one_overflow_bucket_and_known_callers_keep_theirs() {
        let l = limits("[{ name: r, requests_per_second: 1, burst: 2 }]");
        let s = ServiceName::new("a.shop").unwrap();
        for i in 0..MAX_KEYS {
            assert!(l.check_request(&s, &format!("id-{i}"), "east").await.is_ok());
        }
        // None of those is idle yet: new callers draw from one bucket (a burst of 2)…
        assert!(l.check_request(&s, "late-1", "east").await.is_ok());
        assert!(l.check_request(&s, "late-2", "east").await.is_ok());
        assert!(l.check_request(&s, "late-3", "east").await.is_err(), "shares late-1's overflow bucket");
        // …while a known caller still has the second call of its own burst.
        assert!(l.check_request(&s, "id-0", "east").await.is_ok());
        let local = l.limits[0].local.read().unwrap().clone();
        assert_eq!(local.requests.as_ref().unwrap().len(), MAX_KEYS + 1);
    }

    /// A store nobody answers on: global limits fall back at once (the heartbeat has not connected).
    fn unreachable(on_failure: &str, gateways: &str) -> StoreSpec {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let raw: store::RawStore =
            serde_yaml_ng::from_str(&format!("{{ redis: 127.0.0.1:{port}, on_failure: {on_failure}{gateways} }}"))
                .unwrap();
        let mut e = Errors::default();
        let spec = store::validate(&raw, &mut e).unwrap();
        e.into_result().unwrap();
        spec
    }

    #[tokio::test]
    async fn without_the_store_a_global_limit_admits_its_local_share_or_refuses() {
        let s = ServiceName::new("a.shop").unwrap();
        let yaml = "[{ name: g, requests_per_second: 100, scope: global }]";
        let spec = unreachable("local", ", gateways: 2");
        let store = Store::start(&spec, "east", "gw-1", causeway_overlay::metrics::Metrics::noop()).unwrap();
        let l = RateLimits::new(&specs(yaml, Some(&spec)), Some(store), causeway_overlay::metrics::Metrics::noop());
        // Half of the rate and of the burst of 10.
        assert_eq!(admitted(&l, &s, "id-a", 50).await, 5);

        let spec = unreachable("closed", "");
        let store = Store::start(&spec, "east", "gw-1", causeway_overlay::metrics::Metrics::noop()).unwrap();
        let l = RateLimits::new(&specs(yaml, Some(&spec)), Some(store), causeway_overlay::metrics::Metrics::noop());
        let err = l.check_request(&s, "id-a", "east").await.unwrap_err();
        assert!(err.store_unavailable && err.name == "g", "{err:?}");
    }

    #[test]
    fn bad_limits_name_their_paths() {
        let raw: Vec<RawRateLimit> = serde_yaml_ng::from_str(
            "[{ name: a, per: team, requests_per_second: 0 }, { name: a, max_flows: 3 }, \
             { name: b, max_flows: 1, scope: global }, { name: c, max_flows: 1, scope: zone }]",
        )
        .unwrap();
        let mut e = Errors::default();
        let _ = validate(&raw, &[], None, &mut e);
        let paths: Vec<String> = e.into_result().unwrap_err().into_iter().map(|x| x.path).collect();
        assert_eq!(
            paths,
            vec![
                "rate_limits[0].per",
                "rate_limits[0].requests_per_second",
                "rate_limits[1].name",
                "rate_limits[2].scope",
                "rate_limits[3].scope"
            ]
        );
    }

    #[test]
    fn the_store_password_stays_out_of_logs() {
        let raw: store::RawStore = serde_yaml_ng::from_str("{ redis: 'redis://app:s3cret@10.0.0.5:6379/2' }").unwrap();
        let mut e = Errors::default();
        let spec = store::validate(&raw, &mut e).unwrap();
        let shown = format!("{spec:?}");
        assert!(!shown.contains("s3cret") && shown.contains("redis://app:***@10.0.0.5:6379/2"), "{shown}");
    }

    #[test]
    fn a_bad_store_names_its_keys() {
        let raw: store::RawStore =
            serde_yaml_ng::from_str("{ redis: 'rediss://x:6379', timeout: 0s, on_failure: open, gateways: 0 }")
                .unwrap();
        let mut e = Errors::default();
        let _ = store::validate(&raw, &mut e);
        let paths: Vec<String> = e.into_result().unwrap_err().into_iter().map(|x| x.path).collect();
        assert_eq!(
            paths,
            vec![
                "rate_limit_store.redis",
                "rate_limit_store.timeout",
                "rate_limit_store.on_failure",
                "rate_limit_store.gateways"
            ]
        );
    }
}
