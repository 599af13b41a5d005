//! Logging, trace export and the metrics recorder. `RUST_LOG` overrides the configured log filter.
//! Access events (target `causeway::access`, one per flow and per request at each gateway,
//! `causeway_overlay::access`) are access-log lines and, with `tracing.otlp` set, spans (`otlp`).

pub mod otlp;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

use crate::config::LogFormat;

/// Buckets (seconds) of the gateway's own histograms: an HTTP response head takes from a fraction
/// of a millisecond (a LAN endpoint) to the route's timeout (tens of seconds).
const GATEWAY_BUCKETS: &[(&str, &[f64])] = &[(
    crate::http::HTTP_DURATION,
    &[0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
)];

/// The Prometheus recorder of one gateway or redirector: every histogram with buckets (a recorder
/// built without them renders summaries, which neither aggregate across gateways nor feed
/// `histogram_quantile`).
pub fn recorder() -> PrometheusRecorder {
    let mut b = PrometheusBuilder::new();
    for (name, buckets) in causeway_overlay::metrics::BUCKETS.iter().chain(GATEWAY_BUCKETS) {
        b = match b.set_buckets_for_metric(Matcher::Full((*name).to_string()), buckets) {
            Ok(b) => b,
            Err(_) => unreachable!("bucket lists are non-empty constants"),
        };
    }
    match b.set_buckets(causeway_overlay::metrics::DEFAULT_BUCKETS) {
        Ok(b) => b.build_recorder(),
        Err(_) => unreachable!("bucket lists are non-empty constants"),
    }
}

/// Installs logging (the configured filter, `RUST_LOG` first) and the span layer, which sees
/// access and attempt events whatever the log filter says (it exports nothing until
/// [`otlp::start`]).
pub fn init(format: LogFormat, level: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let spans = tracing_subscriber::filter::Targets::new()
        .with_target("causeway::access", tracing::Level::INFO)
        .with_target("causeway::trace", tracing::Level::DEBUG);
    let span_layer = otlp::SpanLayer::new().with_filter(spans);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(span_layer);
    let _ = match format {
        LogFormat::Text => registry.with(fmt.with_filter(filter)).try_init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true).with_filter(filter)).try_init(),
    };
}
