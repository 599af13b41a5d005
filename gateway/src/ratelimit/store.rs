//! The shared store of `scope: global` rate limits (`rate_limit_store`): the gateways of a zone
//! draw from the same buckets in one Redis.
//!
//! Each bucket is a GCRA state (its theoretical arrival time) under one key, advanced by a Lua
//! script on Redis's own clock, so a check is one atomic round trip and the gateways' clocks need
//! not agree. Every second each gateway also stamps itself in a sorted set of the zone's gateways
//! and learns how many there are. A check Redis does not answer within `timeout` is decided by
//! the fallback; when Redis fails (an error, or three checks in a row unanswered) the gateway
//! falls back for every check — to its local share of each limit (the limit divided by that
//! count, or by `gateways` when set) or, configured `closed`, to refusing the calls those limits
//! govern — and says so: a warning, `causeway_rate_limit_store_up 0`, and each fallback decision
//! counted. The heartbeat reconnects within a second of Redis returning.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use causeway_overlay::metrics::Metrics;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::parse::Errors;

/// Whether the store answers (1) or its limits run on the fallback (0).
pub const STORE_UP: &str = "causeway_rate_limit_store_up";
/// Gateways of this zone seen sharing the store in the last 3 s (the divisor of a local share).
pub const STORE_GATEWAYS: &str = "causeway_rate_limit_store_gateways";
/// Failed store calls, by `op`: `check` (an error, or the third late answer in a row),
/// `check_timeout` (each late answer), `heartbeat` (connects included).
pub const STORE_ERRORS: &str = "causeway_rate_limit_store_errors_total";

/// How often a gateway stamps itself in the zone's set, and reconnects when the store is down.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A gateway not stamped for this long no longer counts among the zone's gateways.
const GATEWAY_TTL_MS: u64 = 3_000;
/// Checks in a row not answered within the timeout before the store counts as down.
const LATE_IN_A_ROW: u32 = 3;
/// Longest a connection attempt may take (the store is down meanwhile).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// GCRA over Redis's clock. KEYS[1]: the bucket; ARGV[1]: the emission interval (µs, with a
/// fraction: 150,000/s is 6.667 µs); ARGV[2]: the burst. Returns 0 when the call is admitted (and
/// advances the bucket), otherwise the µs to wait (at least 1). The key expires once the bucket is
/// full again. Times are µs since the epoch (≈ 2^51: exact in Lua's doubles). `TIME` before a
/// write needs effects replication: Redis 5 or later.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * tonumber(ARGV[2])
if allow_at > now then return math.max(1, allow_at - now) end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1)
return 0
";

/// KEYS[1]: the zone's gateway set; ARGV[1]: this gateway; ARGV[2]: the TTL (ms). Returns how
/// many gateways stamped themselves within the TTL.
const STAMP: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return redis.call('ZCARD', KEYS[1])
";

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

static GCRA_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(GCRA));
static STAMP_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(STAMP));

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// `redis://[user:password@]host:port[/db]`, or `host:port`.
    pub redis: String,
    /// Longest a check may wait for Redis before the fallback decides (default 50ms).
    #[serde(default)]
    pub timeout: Option<String>,
    /// `local` (default: this gateway's share of each limit) or `closed` (refuse).
    #[serde(default)]
    pub on_failure: Option<String>,
    /// The zone's gateway count for the local share; default: as last seen in Redis (1 before).
    #[serde(default)]
    pub gateways: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Each gateway admits its share: the limit divided by the zone's gateways.
    Local,
    /// Calls a global limit governs are refused while the store is down.
    Closed,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Closed => "closed",
        }
    }
}

/// A validated `rate_limit_store`. Its `Debug` (the effective configuration is logged at start)
/// leaves the URL's password out.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreSpec {
    pub url: String,
    pub timeout: Duration,
    pub on_failure: OnFailure,
    pub gateways: Option<NonZeroU32>,
}

impl std::fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // redis://user:password@host… → redis://user:***@host…
        let url = match self.url.split_once("://").and_then(|(scheme, rest)| Some((scheme, rest.split_once('@')?))) {
            Some((scheme, (user, host))) => {
                let user = user.split_once(':').map_or(user, |(u, _)| u);
                format!("{scheme}://{user}:***@{host}")
            }
            None => self.url.clone(),
        };
        f.debug_struct("StoreSpec")
            .field("url", &url)
            .field("timeout", &self.timeout)
            .field("on_failure", &self.on_failure)
            .field("gateways", &self.gateways)
            .finish()
    }
}

pub(crate) fn validate(raw: &RawStore, e: &mut Errors) -> Option<StoreSpec> {
    let url = if raw.redis.contains("://") { raw.redis.clone() } else { format!("redis://{}", raw.redis) };
    if !url.starts_with("redis://") {
        e.push("rate_limit_store.redis", "only redis:// (plain TCP) is supported");
    } else if let Err(err) = redis::Client::open(url.as_str()) {
        e.push("rate_limit_store.redis", format!("not a Redis address: {err}"));
    }
    let timeout = match raw.timeout.as_deref().map(crate::parse::duration) {
        None => Duration::from_millis(50),
        Some(Ok(d)) if !d.is_zero() && d <= Duration::from_secs(5) => d,
        Some(Ok(_)) => {
            e.push("rate_limit_store.timeout", "must be more than 0 and at most 5s");
            Duration::from_millis(50)
        }
        Some(Err(why)) => {
            e.push("rate_limit_store.timeout", why);
            Duration::from_millis(50)
        }
    };
    let on_failure = match raw.on_failure.as_deref() {
        None | Some("local") => OnFailure::Local,
        Some("closed") => OnFailure::Closed,
        Some(other) => {
            e.push("rate_limit_store.on_failure", format!("{other:?} is not one of local, closed"));
            OnFailure::Local
        }
    };
    let gateways = raw.gateways.and_then(|g| {
        let n = NonZeroU32::new(g);
        if n.is_none() {
            e.push("rate_limit_store.gateways", "must be at least 1");
        }
        n
    });
    Some(StoreSpec { url, timeout, on_failure, gateways })
}

/// A global check's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// Refused: the bucket refills enough in this long.
    Wait(Duration),
    /// The store did not answer: the fallback decides.
    Unavailable,
}

struct Inner {
    spec: StoreSpec,
    client: redis::Client,
    /// `host:port` of the store, for logs (never the password).
    addr: String,
    /// Key prefix: the zone's namespace in a store that several zones may share.
    prefix: String,
    /// This gateway, in the zone's set.
    member: String,
    /// `Some` while the store answers.
    conn: RwLock<Option<MultiplexedConnection>>,
    /// `UNKNOWN` until the first heartbeat, then `UP` or `DOWN`.
    state: AtomicU8,
    /// Gateways seen in the zone's set at the last heartbeat (0: never seen).
    seen: AtomicU32,
    /// Checks not answered in time since the last answer.
    late: AtomicU32,
    metrics: Metrics,
}

/// A connection to the store and its heartbeat; the heartbeat stops when this is dropped.
pub struct Store {
    inner: Arc<Inner>,
    stop: CancellationToken,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Store {
    /// Starts the heartbeat (which connects). Until it has, calls fall back. Needs a Tokio runtime.
    pub fn start(spec: &StoreSpec, zone: &str, member: &str, metrics: Metrics) -> anyhow::Result<Arc<Self>> {
        let client = redis::Client::open(spec.url.as_str())?;
        let addr = client.get_connection_info().addr().to_string();
        let inner = Arc::new(Inner {
            spec: spec.clone(),
            client,
            addr,
            prefix: format!("causeway:{zone}:"),
            member: member.to_string(),
            conn: RwLock::new(None),
            state: AtomicU8::new(UNKNOWN),
            seen: AtomicU32::new(0),
            late: AtomicU32::new(0),
            metrics,
        });
        inner.metrics.gauge(STORE_UP, &[]).set(0.0);
        let stop = CancellationToken::new();
        tokio::spawn(heartbeat(inner.clone(), stop.clone()));
        Ok(Arc::new(Self { inner, stop }))
    }

    /// Stops the heartbeat (the gateway is shutting down); checks fall back from now on.
    pub fn close(&self) {
        self.stop.cancel();
        *self.inner.conn.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn spec(&self) -> &StoreSpec {
        &self.inner.spec
    }

    pub fn is_up(&self) -> bool {
        self.inner.state.load(Ordering::Relaxed) == UP
    }

    /// The divisor of this gateway's local share: configured, else as last seen, else 1.
    pub fn share(&self) -> u32 {
        self.inner.spec.gateways.map(NonZeroU32::get).unwrap_or_else(|| self.inner.seen.load(Ordering::Relaxed).max(1))
    }

    /// One call against `bucket` (a key within the zone's namespace) at `rate` per second with
    /// `burst`.
    pub async fn take(&self, bucket: &str, rate: NonZeroU32, burst: NonZeroU32) -> Verdict {
        let Some(mut conn) = self.inner.conn() else { return Verdict::Unavailable };
        let interval_us = format!("{:.6}", 1e6 / f64::from(rate.get()));
        let key = format!("{}rl:{bucket}", self.inner.prefix);
        let mut call = GCRA_SCRIPT.key(key);
        call.arg(interval_us).arg(burst.get());
        match tokio::time::timeout(self.inner.spec.timeout, call.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(n)) => {
                self.inner.late.store(0, Ordering::Relaxed);
                if n == 0 {
                    Verdict::Admit
                } else {
                    Verdict::Wait(Duration::from_micros(n.unsigned_abs()))
                }
            }
            Ok(Err(err)) => {
                self.inner.failed("check", &err.to_string());
                Verdict::Unavailable
            }
            Err(_) => {
                // One late answer (a busy moment here or there) decides only its own call; the
                // store is given up after a few in a row.
                self.inner.metrics.counter(STORE_ERRORS, &[("op", "check_timeout")]).increment(1);
                if self.inner.late.fetch_add(1, Ordering::Relaxed) + 1 >= LATE_IN_A_ROW {
                    let why =
                        format!("{LATE_IN_A_ROW} checks in a row not answered within {:?}", self.inner.spec.timeout);
                    self.inner.failed("check", &why);
                }
                Verdict::Unavailable
            }
        }
    }
}

impl Inner {
    fn conn(&self) -> Option<MultiplexedConnection> {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The store answered the heartbeat on `conn`: calls use it from now on.
    fn answered(&self, conn: MultiplexedConnection, gateways: u32) {
        *self.conn.write().unwrap_or_else(|e| e.into_inner()) = Some(conn);
        self.late.store(0, Ordering::Relaxed);
        self.seen.store(gateways, Ordering::Relaxed);
        self.metrics.gauge(STORE_GATEWAYS, &[]).set(f64::from(gateways));
        if self.state.swap(UP, Ordering::Relaxed) != UP {
            self.metrics.gauge(STORE_UP, &[]).set(1.0);
            tracing::info!(store = %self.addr, gateways, "rate_limit.store.up");
        }
    }

    /// A call failed: drop the connection (the heartbeat makes a new one) and fall back until then.
    fn failed(&self, op: &'static str, why: &str) {
        self.metrics.counter(STORE_ERRORS, &[("op", op)]).increment(1);
        *self.conn.write().unwrap_or_else(|e| e.into_inner()) = None;
        if self.state.swap(DOWN, Ordering::Relaxed) != DOWN {
            self.metrics.gauge(STORE_UP, &[]).set(0.0);
            let fallback = match self.spec.on_failure {
                OnFailure::Local => {
                    let n = self.spec.gateways.map(NonZeroU32::get).unwrap_or(self.seen.load(Ordering::Relaxed).max(1));
                    format!("local: 1/{n} of each global limit")
                }
                OnFailure::Closed => "closed: calls under global limits are refused".to_string(),
            };
            tracing::warn!(store = %self.addr, op, error = why, fallback, "rate_limit.store.down");
        }
    }
}

/// Connects when needed and stamps this gateway in the zone's set every second.
async fn heartbeat(inner: Arc<Inner>, stop: CancellationToken) {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(inner.spec.timeout.max(Duration::from_millis(500))));
    loop {
        let conn = match inner.conn() {
            Some(c) => Ok(c),
            None => {
                let connect = inner.client.get_multiplexed_async_connection_with_config(&config);
                match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                    Ok(Ok(c)) => Ok(c),
                    Ok(Err(err)) => Err(err.to_string()),
                    Err(_) => Err(format!("no connection within {CONNECT_TIMEOUT:?}")),
                }
            }
        };
        let stamped = match conn {
            Ok(mut conn) => {
                let mut call = STAMP_SCRIPT.key(format!("{}gateways", inner.prefix));
                call.arg(&inner.member).arg(GATEWAY_TTL_MS);
                let answer = tokio::time::timeout(CONNECT_TIMEOUT, call.invoke_async::<u32>(&mut conn)).await;
                match answer {
                    Ok(Ok(n)) => Ok((conn, n)),
                    Ok(Err(err)) => Err(err.to_string()),
                    Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
                }
            }
            Err(why) => Err(why),
        };
        match stamped {
            Ok((conn, n)) => inner.answered(conn, n),
            Err(why) => inner.failed("heartbeat", &why),
        }
        tokio::select! {
            () = tokio::time::sleep(HEARTBEAT) => {}
            () = stop.cancelled() => return,
        }
    }
}
