//! What a request's access event needs (`causeway_overlay::access`: one per request at each
//! gateway, written when its response ends), and the headers that cross (end-to-end only).

use super::*;

/// The endpoint that answered a request (a response extension, for the access log).
#[derive(Debug, Clone, Copy)]
pub(super) struct EndpointUsed(pub(super) std::net::SocketAddr);

/// Hop-by-hop headers (RFC 9110 §7.6.1), those named by `Connection`, and anything a client sends
/// under our own `causeway-` prefix: identity is named by gateways only.
pub(super) fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    const HOP: [&str; 8] =
        ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade", "host", "trailer"];
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (k, v) in headers {
        let n = k.as_str();
        if HOP.contains(&n) || named.iter().any(|c| c == n) || n.starts_with("causeway-") || n == "traceparent" {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    // `TE: trailers` is the one TE an HTTP/2 or HTTP/3 request may carry, and gRPC needs it.
    let trailers = headers
        .get_all(http::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
    if trailers {
        out.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    }
    out
}

/// The span of one request at this gateway (its trace context is in the access-log line).
pub(super) fn request_span<B>(direction: &'static str, service: &str, req: &Request<B>) -> tracing::Span {
    tracing::info_span!("http", direction, service, method = %req.method(), path = %req.uri().path())
}

pub(super) use causeway_overlay::flow::root_trace as new_trace;

impl Http {
    /// A request's access event at the source: its caller, its span and its parent.
    pub(super) fn outbound_event(
        &self,
        service: &ServiceName,
        source: &Source,
        trace: TraceParent,
        parent: Option<TraceParent>,
        start: Instant,
    ) -> Access {
        let mut a = Access::new(Kind::Http, Direction::Outbound, service.as_str(), trace);
        a.start = start;
        a.parent_span = parent.map(|p| p.span_id);
        a.source_identity = source.identity.to_string();
        a.source_address = source.addr.to_string();
        a.source_zone = self.mesh.zone().to_string();
        a
    }
}
