//! Moving bytes between the two sides of a flow — a TCP connection or an HTTP/3 stream each: both
//! directions joined, half-close propagated (TCP FIN ⇄ QUIC FIN), and any error turned into a
//! reset of both sides — never a silent truncation. Bytes are counted live.

use std::future::Future;

use bytes::{Buf, Bytes, BytesMut};
use causeway_protocol::ErrorCode;
use h3::error::Code;
use metrics::Counter;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::transport::h3q;

/// First read buffer of a TCP source; it doubles up to [`MAX_READ`] while reads fill it, so idle
/// flows stay small and bulk flows make few, large DATA frames.
const MIN_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;

/// A source failed (reset, connection lost); `code` is the reset code its peer sent, when it sent
/// one (QUIC RESET_STREAM; a TCP reset carries none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Failed {
    pub code: Option<ErrorCode>,
}

impl Failed {
    /// Failed without a code: a TCP error, a lost connection, a revoked flow.
    pub const LOST: Failed = Failed { code: None };

    /// The failure of an h3 stream operation: with the peer's code when it reset or stopped it.
    pub fn from_h3(e: &h3::error::StreamError) -> Self {
        match e {
            h3::error::StreamError::RemoteTerminate { code, .. } => Failed { code: Some(ErrorCode(code.value())) },
            _ => Self::LOST,
        }
    }

    /// For the rapid-reset rule: a peer stream that failed so was reset by the peer — its own
    /// doing, unless it relayed its client's abort (`FLOW_CLIENT_RESET`).
    pub fn stream_end(self) -> crate::core::abuse::StreamEnd {
        match self.code {
            Some(ErrorCode::FLOW_CLIENT_RESET) => crate::core::abuse::StreamEnd::RelayedAbort,
            _ => crate::core::abuse::StreamEnd::ResetByPeer,
        }
    }
}

/// Where a flow's bytes come from. `Err` means the side failed.
pub trait ByteSource: Send {
    fn recv(&mut self) -> impl Future<Output = Result<Option<Bytes>, Failed>> + Send;
    /// Tells the sending peer to stop (STOP_SENDING, or a TCP reset).
    fn abort(&mut self, code: ErrorCode);
}

/// Chunks gathered into one write: QUIC hands a stream's data over packet by packet (~1.2 KB), and
/// one `send` per chunk into a TCP socket costs a syscall and a wake-up of the reader each time —
/// the receiving gateway's main cost before batching (perf: 16 % in tcp_sendmsg wake-ups).
const BATCH_CHUNKS: usize = 64;
const BATCH_BYTES: usize = 256 * 1024;

/// Where a flow's bytes go.
pub trait ByteSink: Send {
    fn send(&mut self, data: Bytes) -> impl Future<Output = Result<(), Failed>> + Send;
    /// Sends every chunk of `batch` in order, leaving it empty.
    fn send_batch(&mut self, batch: &mut Vec<Bytes>) -> impl Future<Output = Result<(), Failed>> + Send {
        async move {
            for chunk in batch.drain(..) {
                self.send(chunk).await?;
            }
            Ok(())
        }
    }
    /// End of stream: QUIC FIN or TCP FIN (half-close).
    fn finish(&mut self) -> impl Future<Output = Result<(), Failed>> + Send;
    /// Ends the stream with an error (RESET_STREAM, or a TCP reset).
    fn abort(&mut self, code: ErrorCode);
}

pub type ClientSend = h3::client::RequestStream<h3q::SendStream, Bytes>;
pub type ClientRecv = h3::client::RequestStream<h3q::RecvStream, Bytes>;
pub type ServerSend = h3::server::RequestStream<h3q::SendStream, Bytes>;
pub type ServerRecv = h3::server::RequestStream<h3q::RecvStream, Bytes>;

macro_rules! impl_h3 {
    ($send:ty, $recv:ty) => {
        impl ByteSink for $send {
            async fn send(&mut self, data: Bytes) -> Result<(), Failed> {
                h3q::send_data_zero_copy(&data.clone(), self.send_data(data)).await.map_err(|e| Failed::from_h3(&e))
            }
            async fn finish(&mut self) -> Result<(), Failed> {
                <$send>::finish(self).await.map_err(|e| Failed::from_h3(&e))
            }
            fn abort(&mut self, code: ErrorCode) {
                self.stop_stream(Code::from(code.0));
            }
        }

        impl ByteSource for $recv {
            async fn recv(&mut self) -> Result<Option<Bytes>, Failed> {
                match self.recv_data().await {
                    Ok(b) => Ok(b.map(|mut b| b.copy_to_bytes(b.remaining()))),
                    Err(e) => Err(Failed::from_h3(&e)),
                }
            }
            fn abort(&mut self, code: ErrorCode) {
                self.stop_sending(Code::from(code.0));
            }
        }
    };
}

impl_h3!(ClientSend, ClientRecv);
impl_h3!(ServerSend, ServerRecv);

/// The reading half of a TCP connection.
pub struct TcpSource {
    half: OwnedReadHalf,
    buf: BytesMut,
    size: usize,
}

/// The writing half of a TCP connection.
pub struct TcpSink {
    /// `None` once aborted: the half is forgotten so its drop does not send a FIN before the RST.
    half: Option<OwnedWriteHalf>,
}

/// Most a new flow sends ahead of the answer to its CONNECT.
pub const EARLY_DATA_MAX: usize = 16 * 1024;

/// What the client already sent when its connection was taken (typically a request that followed
/// the TCP handshake at once), read without waiting. Sending it right behind the CONNECT headers
/// saves a round trip between the gateways on every new flow; the caller keeps it to send again to
/// another zone if this one refuses. Empty when nothing has arrived yet (or for protocols where the
/// server speaks first).
pub fn read_early(tcp: &TcpStream) -> Bytes {
    let mut buf = [0u8; EARLY_DATA_MAX];
    match tcp.try_read(&mut buf) {
        Ok(n) if n > 0 => Bytes::copy_from_slice(&buf[..n]),
        _ => Bytes::new(),
    }
}

/// Splits a TCP connection into the two sides a relay needs.
pub fn tcp(stream: TcpStream) -> (TcpSource, TcpSink) {
    let (r, w) = stream.into_split();
    (TcpSource { half: r, buf: BytesMut::new(), size: MIN_READ }, TcpSink { half: Some(w) })
}

/// Makes the socket send RST instead of FIN when it is dropped. Linger 0 resets at once; it does not
/// block (only a non-zero linger does).
fn reset_on_drop(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
}

impl ByteSource for TcpSource {
    async fn recv(&mut self) -> Result<Option<Bytes>, Failed> {
        loop {
            if self.buf.capacity() == 0 {
                // An idle flow holds no buffer: wait for data before allocating one.
                self.half.readable().await.map_err(|_| Failed::LOST)?;
                self.buf.reserve(self.size);
            }
            match self.half.try_read_buf(&mut self.buf) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    if n == self.size && self.size < MAX_READ {
                        self.size *= 2;
                    }
                    return Ok(Some(self.buf.split().freeze()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.size <= MIN_READ {
                        // A small flow going quiet gives its buffer back (10,000 idle flows would
                        // otherwise hold 80 MiB); bulk flows keep theirs.
                        self.buf = BytesMut::new();
                    } else {
                        self.half.readable().await.map_err(|_| Failed::LOST)?;
                    }
                }
                Err(_) => return Err(Failed::LOST),
            }
        }
    }

    fn abort(&mut self, _code: ErrorCode) {
        reset_on_drop(self.half.as_ref());
    }
}

impl ByteSink for TcpSink {
    async fn send(&mut self, data: Bytes) -> Result<(), Failed> {
        let half = self.half.as_mut().ok_or(Failed::LOST)?;
        half.write_all(&data).await.map_err(|_| Failed::LOST)
    }

    /// One `writev` for as many chunks as the socket takes.
    async fn send_batch(&mut self, batch: &mut Vec<Bytes>) -> Result<(), Failed> {
        let half = self.half.as_mut().ok_or(Failed::LOST)?;
        let mut first = 0;
        while first < batch.len() {
            // The slices live only inside the poll, not in the flow's future.
            let mut written = std::future::poll_fn(|cx| {
                let mut slices = [std::io::IoSlice::new(&[]); BATCH_CHUNKS];
                let n = batch[first..].len().min(BATCH_CHUNKS);
                for (s, b) in slices.iter_mut().zip(&batch[first..first + n]) {
                    *s = std::io::IoSlice::new(b);
                }
                tokio::io::AsyncWrite::poll_write_vectored(std::pin::Pin::new(&mut *half), cx, &slices[..n])
            })
            .await
            .map_err(|_| Failed::LOST)?;
            if written == 0 {
                return Err(Failed::LOST);
            }
            while written > 0 {
                let len = batch[first].len();
                if written >= len {
                    written -= len;
                    first += 1;
                } else {
                    batch[first].advance(written);
                    written = 0;
                }
            }
        }
        batch.clear();
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), Failed> {
        let half = self.half.as_mut().ok_or(Failed::LOST)?;
        half.shutdown().await.map_err(|_| Failed::LOST)
    }

    fn abort(&mut self, _code: ErrorCode) {
        if let Some(half) = self.half.take() {
            reset_on_drop(half.as_ref());
            // A dropped write half sends FIN; forgetting it leaves the close (now an RST) to the
            // read half's drop.
            half.forget();
        }
    }
}

/// One side of an in-process pipe (`tokio::io::duplex`): the gateway's own client of a flow,
/// such as the tunnel an HTTP Upgrade (WebSocket) falls back to.
pub struct PipeSource(tokio::io::ReadHalf<tokio::io::DuplexStream>);

/// The other half of [`PipeSource`]'s pipe end.
pub struct PipeSink(Option<tokio::io::WriteHalf<tokio::io::DuplexStream>>);

/// Splits a pipe end into the two sides a relay needs.
pub fn pipe(p: tokio::io::DuplexStream) -> (PipeSource, PipeSink) {
    let (r, w) = tokio::io::split(p);
    (PipeSource(r), PipeSink(Some(w)))
}

impl ByteSource for PipeSource {
    async fn recv(&mut self) -> Result<Option<Bytes>, Failed> {
        use tokio::io::AsyncReadExt;
        let mut buf = BytesMut::with_capacity(MIN_READ);
        match self.0.read_buf(&mut buf).await {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(buf.freeze())),
            Err(_) => Err(Failed::LOST),
        }
    }

    fn abort(&mut self, _code: ErrorCode) {}
}

impl ByteSink for PipeSink {
    async fn send(&mut self, data: Bytes) -> Result<(), Failed> {
        self.0.as_mut().ok_or(Failed::LOST)?.write_all(&data).await.map_err(|_| Failed::LOST)
    }

    async fn finish(&mut self) -> Result<(), Failed> {
        self.0.as_mut().ok_or(Failed::LOST)?.shutdown().await.map_err(|_| Failed::LOST)
    }

    /// A pipe has no reset: this end is let go, and the other end sees the pipe close once the
    /// relay drops its reading half too.
    fn abort(&mut self, _code: ErrorCode) {
        self.0 = None;
    }
}

/// A source that fails once `revoke` is cancelled: the relay then resets both sides (an open flow a
/// changed policy no longer allows). The wait on the token is registered once, not per read.
pub struct Revocable<S> {
    inner: S,
    revoked: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl<S> Revocable<S> {
    pub fn new(inner: S, revoke: tokio_util::sync::CancellationToken) -> Self {
        Self { inner, revoked: Box::pin(revoke.cancelled_owned()) }
    }
}

impl<S: ByteSource> ByteSource for Revocable<S> {
    async fn recv(&mut self) -> Result<Option<Bytes>, Failed> {
        tokio::select! {
            r = self.inner.recv() => r,
            () = &mut self.revoked => Err(Failed::LOST),
        }
    }

    fn abort(&mut self, code: ErrorCode) {
        self.inner.abort(code);
    }
}

/// How a relayed flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions reached end of stream.
    Complete,
    /// The client's side failed or was reset; the upstream side was reset too.
    ClientReset,
    /// The client's side is a peer gateway's stream, reset with `FLOW_CLIENT_RESET`: the peer
    /// relayed its own client's abort (counted as `client_reset`; not the peer's own doing, so it
    /// does not count toward the rapid-reset rule).
    RelayedAbort,
    /// The upstream side (peer gateway or backend) failed or was reset; the client was reset too.
    UpstreamReset,
}

impl Outcome {
    /// The access event's outcome and side of this ending.
    pub fn access(self) -> (crate::access::Outcome, Option<crate::access::Side>) {
        use crate::access::{Outcome as A, Side};
        match self {
            Outcome::Complete => (A::Complete, None),
            Outcome::ClientReset | Outcome::RelayedAbort => (A::Reset, Some(Side::Client)),
            Outcome::UpstreamReset => (A::Reset, Some(Side::Upstream)),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::ClientReset | Outcome::RelayedAbort => "client_reset",
            Outcome::UpstreamReset => "upstream_reset",
        }
    }
}

/// Live byte counters of one flow: `up` is client → upstream, `down` upstream → client.
pub struct Counters {
    pub up: Counter,
    pub down: Counter,
}

impl Counters {
    /// Counters that count nowhere (a relay whose bytes are counted elsewhere).
    pub fn detached() -> Self {
        Self { up: Counter::noop(), down: Counter::noop() }
    }
}

/// Which end of one direction failed, and how (the peer's code, when it sent one).
enum End {
    Source(Failed),
    Sink(Failed),
}

async fn pump<S: ByteSource, K: ByteSink>(
    src: &mut S,
    sink: &mut K,
    counter: &Counter,
    total: &mut u64,
) -> Result<(), End> {
    let mut batch = Vec::new();
    loop {
        let first = match src.recv().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return sink.finish().await.map_err(End::Sink),
            Err(f) => return Err(End::Source(f)),
        };
        // Gather what has already arrived, without waiting for more.
        let mut n = first.len();
        batch.push(first);
        let mut ended = false;
        while batch.len() < BATCH_CHUNKS && n < BATCH_BYTES {
            match ready_now(src.recv()).await {
                Some(Ok(Some(chunk))) => {
                    n += chunk.len();
                    batch.push(chunk);
                }
                Some(Ok(None)) => {
                    ended = true;
                    break;
                }
                Some(Err(f)) => return Err(End::Source(f)),
                None => break,
            }
        }
        sink.send_batch(&mut batch).await.map_err(End::Sink)?;
        *total += n as u64;
        counter.increment(n as u64);
        if ended {
            return sink.finish().await.map_err(End::Sink);
        }
    }
}

/// Polls `fut` once: its output if it is ready now, `None` if it would wait. Only for cancel-safe
/// futures (both sources keep their state in the stream, not the future).
async fn ready_now<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

/// Relays until both directions end, or resets both sides when either fails. Returns the outcome
/// and the bytes moved up and down.
pub async fn relay<CS, CK, US, UK>(
    client: (&mut CS, &mut CK),
    upstream: (&mut US, &mut UK),
    counters: &Counters,
) -> (Outcome, u64, u64)
where
    CS: ByteSource,
    CK: ByteSink,
    US: ByteSource,
    UK: ByteSink,
{
    let (c_src, c_sink) = client;
    let (u_src, u_sink) = upstream;
    let (mut up, mut down) = (0u64, 0u64);
    let res = {
        // Err(Some(code)): the client's side failed (with the reset code it sent, if any);
        // Err(None): the upstream's.
        // (The client's side fails as a source — a reset — or as a sink — a STOP_SENDING.)
        let up_dir = async {
            pump(c_src, u_sink, &counters.up, &mut up).await.map_err(|e| match e {
                End::Source(f) => Some(f.code),
                End::Sink(_) => None,
            })
        };
        let down_dir = async {
            pump(u_src, c_sink, &counters.down, &mut down).await.map_err(|e| match e {
                End::Sink(f) => Some(f.code),
                End::Source(_) => None,
            })
        };
        tokio::try_join!(up_dir, down_dir)
    };
    let outcome = match res {
        Ok(_) => return (Outcome::Complete, up, down),
        Err(Some(Some(ErrorCode::FLOW_CLIENT_RESET))) => Outcome::RelayedAbort,
        Err(Some(_)) => Outcome::ClientReset,
        Err(None) => Outcome::UpstreamReset,
    };
    // Tell each side why: the upstream learns the client went away and vice versa.
    u_sink.abort(ErrorCode::FLOW_CLIENT_RESET);
    u_src.abort(ErrorCode::FLOW_CLIENT_RESET);
    c_sink.abort(ErrorCode::FLOW_BACKEND_RESET);
    c_src.abort(ErrorCode::FLOW_BACKEND_RESET);
    (outcome, up, down)
}

/// Relays between two sides it owns (arguments used in place: no second copy in the future).
pub async fn relay_owned<CS: ByteSource, CK: ByteSink, US: ByteSource, UK: ByteSink>(
    mut cs: CS,
    mut ck: CK,
    mut us: US,
    mut uk: UK,
    counters: Counters,
) -> (Outcome, u64, u64) {
    relay((&mut cs, &mut ck), (&mut us, &mut uk), &counters).await
}

/// Closes a TCP connection with RST rather than FIN, so the application sees an error and not a
/// clean (possibly truncated) end of stream.
pub fn abort(tcp: TcpStream) {
    reset_on_drop(&tcp);
    drop(tcp);
}
