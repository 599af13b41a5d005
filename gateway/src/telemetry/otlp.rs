//! OTLP trace export. Every access event (`causeway_overlay::access`, target `causeway::access`)
//! becomes the span of its flow or request, and every attempt event (`causeway::trace`) a child
//! span: same values as the log line, the span context from its `traceparent`, the parent from
//! `parent_span`. Sampling is parent-based: a span is exported when its context is sampled; new
//! roots are sampled at `tracing.sample_ratio` (by trace id, so every gateway agrees).
//!
//! Why not the SDK's tracer and batch processor: the spans already exist as events with their ids
//! chosen (a flow's span id is the one it sent onwards), and the SDK's default batch processor
//! exports on a thread of its own with no tokio runtime, where the async HTTP client panics
//! (opentelemetry-rust#3125). So the layer builds the SDK's `SpanData` itself, queues it without
//! ever waiting (a full queue drops the span and counts it), and one tokio task batches the queue
//! into the OTLP/HTTP protobuf exporter of `opentelemetry-otlp` (which reads the standard
//! `OTEL_EXPORTER_OTLP_*` variables).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use causeway_overlay::metrics::Metrics;
use causeway_protocol::trace::TraceParent;
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

/// Spans exported, and spans dropped (`reason`: `queue_full`, `export_failed`).
pub const SPANS_EXPORTED: &str = "causeway_trace_spans_exported_total";
pub const SPANS_DROPPED: &str = "causeway_trace_spans_dropped_total";

/// Spans waiting for export at most; beyond, new ones are dropped (never a wait on a flow's path).
const QUEUE: usize = 4096;
/// Spans per export request, and the longest a span waits for its batch to fill.
const BATCH: usize = 512;
const LINGER: Duration = Duration::from_millis(500);

/// Where spans go once an exporter runs: set once per process, by the first gateway started.
static SINK: OnceLock<Sink> = OnceLock::new();

struct Sink {
    tx: mpsc::Sender<SpanData>,
    /// Dropped because the queue was full (the exporter task publishes it as a counter).
    full: Arc<AtomicU64>,
}

/// What a gateway exports traces with (`tracing.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    /// OTLP/HTTP traces endpoint (`http://collector:4318/v1/traces`); `None`: the standard
    /// variables decide (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_ENDPOINT`), and
    /// with neither set nothing is exported.
    pub endpoint: Option<String>,
    /// Share of new traces (started here, without a sampled parent) that are sampled.
    pub sample_ratio: f64,
    /// Export request timeout.
    pub timeout: Duration,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self { endpoint: None, sample_ratio: 1.0, timeout: Duration::from_secs(10) }
    }
}

impl TraceConfig {
    /// Whether spans are to be exported at all: an endpoint configured here or in the environment,
    /// and the SDK not disabled (`OTEL_SDK_DISABLED=true`).
    pub fn enabled(&self) -> bool {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        !disabled
            && (self.endpoint.is_some()
                || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
                || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some())
    }
}

/// Starts exporting (once per process; later calls only set the root sampling ratio). `resource`
/// (a gateway's `causeway.zone` and `causeway.gateway`, a redirector's `causeway.node`) goes on the
/// resource, with `service.name` (`OTEL_SERVICE_NAME`, else `causeway`) and
/// `OTEL_RESOURCE_ATTRIBUTES`.
pub fn start(cfg: &TraceConfig, metrics: &Metrics, resource: &[(&'static str, String)]) -> anyhow::Result<()> {
    causeway_overlay::flow::set_root_sample_ratio(cfg.sample_ratio);
    if !cfg.enabled() || SINK.get().is_some() {
        return Ok(());
    }
    use opentelemetry_otlp::WithExportConfig;
    let mut b = opentelemetry_otlp::SpanExporter::builder().with_http().with_timeout(cfg.timeout);
    if let Some(e) = &cfg.endpoint {
        b = b.with_endpoint(e.clone());
    }
    let mut exporter = b.build().map_err(|e| anyhow::anyhow!("tracing.otlp: {e}"))?;
    let service = std::env::var("OTEL_SERVICE_NAME").ok().filter(|s| !s.is_empty());
    let attributes = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.unwrap_or_else(|| "causeway".into()))
        .with_attributes(resource.iter().map(|(k, v)| KeyValue::new(*k, v.clone())))
        .build();
    exporter.set_resource(&attributes);
    let (tx, rx) = mpsc::channel(QUEUE);
    let full = Arc::new(AtomicU64::new(0));
    if SINK.set(Sink { tx, full: full.clone() }).is_err() {
        return Ok(());
    }
    tokio::spawn(export_loop(exporter, rx, full, metrics.clone()));
    tracing::info!(endpoint = cfg.endpoint.as_deref().unwrap_or("(from OTEL_* variables)"), "tracing.otlp.started");
    Ok(())
}

async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    full: Arc<AtomicU64>,
    metrics: Metrics,
) {
    let exported = metrics.counter(SPANS_EXPORTED, &[]);
    let queue_full = metrics.counter(SPANS_DROPPED, &[("reason", "queue_full")]);
    let failed = metrics.counter(SPANS_DROPPED, &[("reason", "export_failed")]);
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        queue_full.absolute(full.load(Ordering::Relaxed));
        let n = batch.len() as u64;
        match exporter.export(std::mem::take(&mut batch)).await {
            Ok(()) => exported.increment(n),
            Err(e) => {
                failed.increment(n);
                causeway_overlay::warn_limited!(spans = n, error = %e, "tracing.otlp.export_failed");
            }
        }
    }
}

/// The `tracing` layer that turns access and attempt events into spans (installed always; it
/// does nothing until [`start`] ran).
pub struct SpanLayer {
    scope: InstrumentationScope,
}

impl SpanLayer {
    pub fn new() -> Self {
        Self { scope: InstrumentationScope::builder("causeway").with_version(env!("CARGO_PKG_VERSION")).build() }
    }
}

impl Default for SpanLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SpanLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let Some(sink) = SINK.get() else { return };
        let target = event.metadata().target();
        if target != "causeway::access" && target != "causeway::trace" {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let Some(span) = span_data(fields, &self.scope, SystemTime::now()) else { return };
        if sink.tx.try_send(span).is_err() {
            sink.full.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An event's fields, as recorded.
#[derive(Default, Debug)]
struct Fields(HashMap<&'static str, Value>);

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Str(String),
    I64(i64),
    F64(f64),
    Bool(bool),
}

impl Fields {
    fn str(&self, k: &str) -> &str {
        match self.0.get(k) {
            Some(Value::Str(s)) => s,
            _ => "",
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name(), Value::Str(format!("{v:?}")));
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name(), Value::Str(v.to_string()));
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.0.insert(f.name(), Value::I64(v));
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.0.insert(f.name(), Value::I64(i64::try_from(v).unwrap_or(i64::MAX)));
    }
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.0.insert(f.name(), Value::F64(v));
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.0.insert(f.name(), Value::Bool(v));
    }
}

/// The span of one access or attempt event ended at `now`; `None` when it is not sampled (or
/// carries no valid context).
fn span_data(f: Fields, scope: &InstrumentationScope, now: SystemTime) -> Option<SpanData> {
    let trace = TraceParent::parse(f.str("traceparent"))?;
    if !trace.sampled {
        return None;
    }
    let parent = u64::from_str_radix(f.str("parent_span"), 16).ok().filter(|p| *p != 0);
    let took = match f.0.get("duration_ms") {
        Some(Value::F64(ms)) if ms.is_finite() && *ms >= 0.0 => Duration::from_secs_f64(ms / 1000.0),
        _ => Duration::ZERO,
    };
    let (kind, direction, service) = (f.str("kind"), f.str("direction"), f.str("service"));
    let name = match kind {
        "attempt" => format!("attempt {}", f.str("peer")),
        _ => format!("{kind} {direction} {service}"),
    };
    let span_kind = match (kind, direction) {
        ("attempt", _) | ("capture", _) | (_, "outbound") => SpanKind::Client,
        _ => SpanKind::Server,
    };
    // An error: any outcome but `complete`, and HTTP statuses as OpenTelemetry's conventions
    // count them — 5xx on the serving side, 4xx and 5xx on the calling side (an attempt's outcome
    // is its status or refusal).
    let outcome = f.str("outcome");
    let http_status = match f.0.get("status") {
        Some(Value::I64(s)) => *s,
        _ if kind == "attempt" => outcome.parse().unwrap_or(0),
        _ => 0,
    };
    let failed_status = if span_kind == SpanKind::Server { http_status >= 500 } else { http_status >= 400 };
    let status = match outcome {
        _ if failed_status => Status::error(format!("HTTP {http_status}")),
        "" | "complete" | "ok" => Status::Unset,
        o if kind == "attempt" && o.parse::<u16>().is_ok_and(|c| c < 400) => Status::Unset,
        o => {
            let reason = f.str("reason");
            Status::error(if reason.is_empty() { o.to_string() } else { format!("{o}: {reason}") })
        }
    };
    let mut attributes = Vec::with_capacity(f.0.len() + 3);
    let mut keys: Vec<_> = f.0.keys().copied().collect();
    keys.sort_unstable();
    for k in keys {
        if matches!(k, "traceparent" | "parent_span" | "message") {
            continue;
        }
        let v = match &f.0[k] {
            Value::Str(s) if s.is_empty() => continue,
            Value::Str(s) => opentelemetry::Value::from(s.clone()),
            Value::I64(i) => opentelemetry::Value::from(*i),
            Value::F64(x) => opentelemetry::Value::from(*x),
            Value::Bool(b) => opentelemetry::Value::from(*b),
        };
        attributes.push(KeyValue::new(format!("causeway.{k}"), v));
    }
    // The semantic-convention names of what has one, so generic trace UIs show them.
    for (from, to) in [("method", "http.request.method"), ("path", "url.path")] {
        if !f.str(from).is_empty() {
            attributes.push(KeyValue::new(to, f.str(from).to_string()));
        }
    }
    if let Some(Value::I64(s)) = f.0.get("status").filter(|s| **s != Value::I64(0)) {
        attributes.push(KeyValue::new("http.response.status_code", *s));
    }
    let flags = TraceFlags::SAMPLED;
    Some(SpanData {
        span_context: SpanContext::new(
            TraceId::from(trace.trace_id),
            SpanId::from(trace.span_id),
            flags,
            false,
            TraceState::NONE,
        ),
        parent_span_id: parent.map(SpanId::from).unwrap_or(SpanId::INVALID),
        parent_span_is_remote: kind != "attempt" && parent.is_some(),
        span_kind,
        name: Cow::Owned(name),
        start_time: now.checked_sub(took).unwrap_or(now),
        end_time: now,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&'static str, Value)]) -> Fields {
        Fields(pairs.iter().cloned().collect())
    }

    #[test]
    fn an_access_event_becomes_its_span_with_the_same_values() {
        let scope = InstrumentationScope::builder("t").build();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let f = fields(&[
            ("traceparent", Value::Str("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into())),
            ("parent_span", Value::Str("00000000000000aa".into())),
            ("kind", Value::Str("http".into())),
            ("direction", Value::Str("inbound".into())),
            ("service", Value::Str("orders.shop".into())),
            ("outcome", Value::Str("refused".into())),
            ("reason", Value::Str("policy_denied".into())),
            ("status", Value::I64(403)),
            ("peer", Value::Str(String::new())),
            ("duration_ms", Value::F64(250.0)),
        ]);
        let s = span_data(f, &scope, now).expect("sampled");
        assert_eq!(s.span_context.trace_id(), TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736u128));
        assert_eq!(s.span_context.span_id(), SpanId::from(0x00f067aa0ba902b7u64));
        assert_eq!(s.parent_span_id, SpanId::from(0xaau64));
        assert_eq!(s.span_kind, SpanKind::Server);
        assert_eq!(s.name, "http inbound orders.shop");
        assert_eq!(s.end_time.duration_since(s.start_time).expect("order"), Duration::from_millis(250));
        assert_eq!(s.status, Status::error("refused: policy_denied"));
        let status = |kind: &str, direction: &str, outcome: &str, code: i64| {
            let f = fields(&[
                ("traceparent", Value::Str("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into())),
                ("kind", Value::Str(kind.into())),
                ("direction", Value::Str(direction.into())),
                ("outcome", Value::Str(outcome.into())),
                ("status", Value::I64(code)),
            ]);
            span_data(f, &scope, now).expect("sampled").status
        };
        // HTTP statuses count as OpenTelemetry's conventions say: 5xx serving, 4xx calling.
        assert_eq!(status("http", "inbound", "complete", 404), Status::Unset);
        assert_eq!(status("http", "inbound", "complete", 503), Status::error("HTTP 503"));
        assert_eq!(status("http", "outbound", "complete", 404), Status::error("HTTP 404"));
        assert_eq!(status("flow", "outbound", "complete", 0), Status::Unset);
        let attr = |k: &str| s.attributes.iter().find(|a| a.key.as_str() == k).map(|a| a.value.to_string());
        assert_eq!(attr("causeway.service").as_deref(), Some("orders.shop"));
        assert_eq!(attr("http.response.status_code").as_deref(), Some("403"));
        assert_eq!(attr("causeway.peer"), None, "empty fields are left out");
        assert_eq!(attr("causeway.traceparent"), None);
    }

    #[test]
    fn unsampled_or_contextless_events_make_no_span() {
        let scope = InstrumentationScope::builder("t").build();
        let unsampled =
            fields(&[("traceparent", Value::Str("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".into()))]);
        assert!(span_data(unsampled, &scope, SystemTime::now()).is_none());
        assert!(span_data(fields(&[("kind", Value::Str("flow".into()))]), &scope, SystemTime::now()).is_none());
    }
}
