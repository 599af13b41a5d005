//! An Upgrade (WebSocket) falls back to a tunnel: a TCP flow to the service carrying the
//! HTTP/1.1 handshake and then the upgraded bytes.

use super::*;

impl Http {
    /// An Upgrade request (WebSocket): a TCP flow to the service (CONNECT across the overlay, as
    /// for a `tcp` service) carries the HTTP/1.1 handshake to an endpoint; once it answers 101 the
    /// client's connection and the flow are joined byte for byte. Routes do not apply: a tunnel
    /// goes to the best zone of the service.
    pub(super) async fn tunnel(
        &self,
        mut req: Request<Incoming>,
        service: &ServiceName,
        source: &Source,
    ) -> Response<ChanBody> {
        let start = Instant::now();
        let (ours, theirs) = tokio::io::duplex(TUNNEL_PIPE);
        let parent = req.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(TraceParent::parse);
        let trace = parent.map(|p| p.child(new_trace().span_id)).unwrap_or_else(new_trace);
        let (mesh, svc, src) = (self.mesh.clone(), service.clone(), source.clone());
        tokio::spawn(async move {
            mesh.serve(causeway_overlay::flow::Downstream::Pipe(theirs), svc, src, Some(trace)).await;
        });
        let client_side = hyper::upgrade::on(&mut req);
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/".into());
        // The handshake as the client sent it, less our own headers; Host names the service.
        let internal: Vec<HeaderName> =
            parts.headers.keys().filter(|k| k.as_str().starts_with("causeway-")).cloned().collect();
        for k in internal {
            parts.headers.remove(k);
        }
        if let Ok(host) = service.as_str().parse() {
            parts.headers.insert(http::header::HOST, host);
        }
        parts.uri = path.parse().unwrap_or_default();
        let handshake = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours)).await.ok()?;
            tokio::spawn(conn.with_upgrades());
            sender.send_request(Request::from_parts(parts, body)).await.ok()
        };
        let m = self.mesh.metrics();
        let outcome = |result: &'static str| {
            m.counter(HTTP_UPGRADES, &[("service", service.as_str()), ("result", result)]).increment(1);
        };
        // A handshake that fails still gets its access event (the tunnel's flow span is its child).
        let failed = |e: FlowError, status: StatusCode| {
            outcome("refused");
            let mut a = self.outbound_event(service, source, trace, parent, start);
            (a.route, a.path, a.status, a.attempts) = ("upgrade".into(), path.clone(), status.as_u16(), 1);
            a.refused(e);
            a.emit();
            error_response(status, e)
        };
        let resp = match tokio::time::timeout(RESPONSE_TIMEOUT, handshake).await {
            Ok(Some(r)) => r,
            Ok(None) => return failed(FlowError::BackendRefused, StatusCode::BAD_GATEWAY),
            Err(_) => return failed(FlowError::BackendTimeout, StatusCode::GATEWAY_TIMEOUT),
        };
        let status = resp.status();
        let mut a = self.outbound_event(service, source, trace, parent, start);
        a.route = "upgrade".into();
        a.path = path.clone();
        a.status = status.as_u16();
        a.attempts = 1;
        a.upgrade = resp.headers().get(http::header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or("").into();
        if status == StatusCode::SWITCHING_PROTOCOLS {
            a.outcome = causeway_overlay::access::Outcome::Complete;
        } else {
            a.refused_for("upgrade_refused", false);
            a.side = Some(Side::Upstream);
        }
        a.emit();
        let mut resp = resp;
        if status != StatusCode::SWITCHING_PROTOCOLS {
            outcome("refused");
            let (parts, body) = resp.into_parts();
            let mut r = Response::new(piped(body, ()));
            *r.status_mut() = parts.status;
            *r.headers_mut() = end_to_end(&parts.headers);
            return r;
        }
        outcome("upgraded");
        let endpoint_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(c), Ok(e)) = tokio::join!(client_side, endpoint_side) else { return };
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(e)).await;
        });
        // The 101 with the endpoint's headers, Upgrade and Connection included.
        let mut r = Response::new(ChanBody::empty());
        *r.status_mut() = status;
        *r.headers_mut() = resp.headers().clone();
        r
    }
}
