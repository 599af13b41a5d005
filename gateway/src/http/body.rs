//! Bodies: what the two sides of a request read, polled straight from their source (hyper, an
//! HTTP/3 stream) or fed by the gateway, carrying the holds and the access record to their end.

use std::sync::atomic::AtomicU64;

use super::*;

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body one side of the gateway reads: polled straight from where it comes from (the other
/// side's hyper body, or an HTTP/3 stream: no task, no queue between them), or fed from a channel
/// by the gateway itself (an answer it makes). No source: no body at all (a trailers-only gRPC
/// answer, a 101), which HTTP/2 ends with the headers.
///
/// The body the client reads carries the request's access-log line, written when the body ends
/// (or is dropped unfinished: the client went away), so it has the bytes sent and the whole
/// duration, and a gRPC status from the trailers.
pub struct ChanBody {
    from: BodyFrom,
    /// Held until the body ends or is dropped (a breaker's place, the peer stream's hold).
    hold: Option<Box<dyn Send>>,
    /// The request's access event, and the counter of its request body's bytes (source side).
    log: Option<Box<(Access, Option<Arc<AtomicU64>>)>>,
    bytes: u64,
    /// The response's Content-Length: HTTP/1.1 stops reading a body once it has that many bytes.
    length: Option<u64>,
}

/// Where a [`ChanBody`] reads from.
pub(super) enum BodyFrom {
    None,
    Chan(mpsc::Receiver<Result<Frame<Bytes>, BoxError>>),
    Direct(http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>),
}

impl ChanBody {
    pub(super) fn empty() -> Self {
        ChanBody { from: BodyFrom::None, hold: None, log: None, bytes: 0, length: None }
    }

    /// Writes `record` when this body ends (`length`: the response's Content-Length).
    pub(super) fn log_at_end(&mut self, record: Access, length: Option<u64>, up: Option<Arc<AtomicU64>>) {
        self.log = Some(Box::new((record, up)));
        self.length = length;
    }

    /// Ends the request's access event: `End::Complete`, the client went away (`Abandoned`), or
    /// the body's source failed mid-response (`UpstreamFailed`: the peer or the endpoint).
    pub(super) fn finish(&mut self, end: End) {
        self.hold = None;
        if let Some(log) = self.log.take() {
            let (mut a, up) = *log;
            a.bytes_down = self.bytes;
            if let Some(up) = up {
                a.bytes_up = up.load(std::sync::atomic::Ordering::Relaxed);
            }
            if a.outcome == causeway_overlay::access::Outcome::Complete {
                use causeway_overlay::access::Outcome;
                match end {
                    End::Complete => {}
                    End::Abandoned => (a.outcome, a.side) = (Outcome::Abandoned, Some(Side::Client)),
                    End::UpstreamFailed => (a.outcome, a.side) = (Outcome::Reset, Some(Side::Upstream)),
                }
            }
            a.emit();
        }
    }
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = match &mut self.from {
            BodyFrom::None => Poll::Ready(None),
            BodyFrom::Chan(rx) => rx.poll_recv(cx),
            BodyFrom::Direct(b) => Pin::new(b).poll_frame(cx),
        };
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                } else if let (Some(t), Some(log)) = (f.trailers_ref(), self.log.as_mut()) {
                    if let Some(v) = t.get(GRPC_STATUS).and_then(|v| v.to_str().ok()) {
                        log.0.grpc_status = v.to_string();
                    }
                }
            }
            Poll::Ready(None) => self.finish(End::Complete),
            Poll::Ready(Some(Err(_))) => self.finish(End::UpstreamFailed),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.from {
            BodyFrom::None => true,
            BodyFrom::Chan(_) => false,
            BodyFrom::Direct(b) => b.is_end_stream(),
        }
    }
}

impl Drop for ChanBody {
    fn drop(&mut self) {
        // A body without a source is complete as it is (HTTP/2 may never poll it), and so is
        // one whose Content-Length was sent (HTTP/1.1 stops there).
        let complete = match &self.from {
            BodyFrom::None => true,
            // Empty from the start (a 204, a 304): hyper never polls it.
            BodyFrom::Direct(b) if b.is_end_stream() => true,
            _ => self.length == Some(self.bytes),
        };
        self.finish(if complete { End::Complete } else { End::Abandoned });
    }
}

/// `body`, read straight from its source by whoever reads this one; `hold` is kept until it ends.
pub(super) fn piped<B>(body: B, hold: impl Send + 'static) -> ChanBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    ChanBody {
        from: BodyFrom::Direct(body.map_err(Into::into).boxed_unsync()),
        hold: Some(Box::new(hold)),
        log: None,
        bytes: 0,
        length: None,
    }
}

pub(super) fn chan() -> (mpsc::Sender<Result<Frame<Bytes>, BoxError>>, ChanBody) {
    let (tx, rx) = mpsc::channel(BODY_QUEUE);
    (tx, ChanBody { from: BodyFrom::Chan(rx), hold: None, log: None, bytes: 0, length: None })
}

/// The receive half of an HTTP/3 request stream, client or server side (h3 gives them the same
/// methods and no common trait).
pub(super) trait H3Recv: Send + 'static {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, h3::error::StreamError>>;
    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, h3::error::StreamError>>;
}

impl<S: h3::quic::RecvStream + Send + 'static> H3Recv for h3::client::RequestStream<S, Bytes> {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, h3::error::StreamError>> {
        self.poll_recv_data(cx).map_ok(|b| b.map(|mut b| b.copy_to_bytes(b.remaining())))
    }
    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, h3::error::StreamError>> {
        self.poll_recv_trailers(cx)
    }
}

impl<S: h3::quic::RecvStream + Send + 'static> H3Recv for h3::server::RequestStream<S, Bytes> {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, h3::error::StreamError>> {
        self.poll_recv_data(cx).map_ok(|b| b.map(|mut b| b.copy_to_bytes(b.remaining())))
    }
    fn poll_trailers(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, h3::error::StreamError>> {
        self.poll_recv_trailers(cx)
    }
}

/// An HTTP/3 stream's DATA, then its trailers, as a body; the bytes are also added to `counted`.
pub(super) struct H3Body<R> {
    rx: R,
    data_done: bool,
    ended: bool,
    counted: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl<R: H3Recv> H3Body<R> {
    pub(super) fn new(rx: R, counted: Option<Arc<std::sync::atomic::AtomicU64>>) -> Self {
        Self { rx, data_done: false, ended: false, counted }
    }
}

impl<R: H3Recv + Unpin> Body for H3Body<R> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if !self.data_done {
            match std::task::ready!(self.rx.poll_data(cx)) {
                Ok(Some(b)) => {
                    if let Some(c) = &self.counted {
                        c.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Ok(None) => self.data_done = true,
                Err(e) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
        let t = std::task::ready!(self.rx.poll_trailers(cx));
        self.ended = true;
        Poll::Ready(t.ok().flatten().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// How a response body ended, for its access event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    Complete,
    Abandoned,
    UpstreamFailed,
}

/// A body that counts the data bytes read through it (a request's, for its access event).
pub(super) struct Counted<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub(super) fn new(inner: B, bytes: Arc<AtomicU64>) -> Self {
        Self { inner, bytes }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.bytes.fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
