//! The answers the gateway makes itself: refusals, faults and errors. Every refusal carries a
//! typed [`Refusal`] in its extensions: retries, gRPC codes and the access event read that, never
//! the `causeway-error` header written for the client (a peer's header is parsed once, on arrival).

use super::*;

/// Why a response is a refusal, and whose: this gateway's (`Local`) or a peer's (`Upstream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refusal(pub(super) FlowError, pub(super) Side);

/// The refusal a response carries, if any.
pub(super) fn refusal<B>(resp: &Response<B>) -> Option<FlowError> {
    resp.extensions().get::<Refusal>().map(|r| r.0)
}

/// A request the destination's policy refuses: 403 naming the policy.
pub(super) fn policy_denied(policy: &str) -> Response<ChanBody> {
    let (tx, body) = chan();
    let _ = tx.try_send(Ok(Frame::data(Bytes::from(format!("policy_denied: {policy}\n")))));
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::FORBIDDEN;
    r.headers_mut().insert(causeway_protocol::flow::ERROR, http::HeaderValue::from_static("policy_denied"));
    r.extensions_mut().insert(Refusal(FlowError::PolicyDenied, Side::Local));
    if let Ok(v) = http::HeaderValue::from_str(policy) {
        r.headers_mut().insert(causeway_protocol::flow::POLICY, v);
    }
    r
}

/// A request over a rate limit: 429 naming the limit, with `Retry-After` (whole seconds, at least 1).
pub(super) fn rate_limited(l: &crate::ratelimit::Limited) -> Response<ChanBody> {
    let (tx, body) = chan();
    let why = if l.store_unavailable { " (the limit store does not answer; its fallback is closed)" } else { "" };
    let _ = tx.try_send(Ok(Frame::data(Bytes::from(format!("rate_limited: {}{why}\n", l.name)))));
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    r.extensions_mut().insert(Refusal(FlowError::RateLimited, Side::Local));
    let h = r.headers_mut();
    h.insert(causeway_protocol::flow::ERROR, http::HeaderValue::from_static("rate_limited"));
    h.insert(http::header::RETRY_AFTER, http::HeaderValue::from(l.retry_after.as_secs_f64().ceil().max(1.0) as u64));
    if let Ok(v) = http::HeaderValue::from_str(&l.name) {
        h.insert(causeway_protocol::flow::POLICY, v);
    }
    r
}

/// A fault-injected answer: the route's status, `causeway-fault: abort`, and the reason.
pub(super) fn fault_response(status: StatusCode) -> Response<ChanBody> {
    let (tx, body) = chan();
    let _ = tx.try_send(Ok(Frame::data(Bytes::from_static(b"fault_injected\n"))));
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert("causeway-fault", http::HeaderValue::from_static("abort"));
    r
}

/// A response the gateway writes itself: status, `causeway-error`, and the reason as the body.
pub(super) fn error_response(status: StatusCode, e: FlowError) -> Response<ChanBody> {
    let (tx, body) = chan();
    let _ = tx.try_send(Ok(Frame::data(Bytes::from(format!("{}\n", e.as_str())))));
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(causeway_protocol::flow::ERROR, http::HeaderValue::from_static(e.as_str()));
    r.extensions_mut().insert(Refusal(e, Side::Local));
    r
}
