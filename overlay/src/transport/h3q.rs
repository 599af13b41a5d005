//! h3's QUIC traits over quinn, for two HTTP/3 sessions on one QUIC connection.
//!
//! A gateway pair shares exactly one QUIC connection, yet either side must be able to open flows.
//! HTTP/3 lets only the client open requests (RFC 9114 §6.1), "though an extension could allow"
//! server-initiated bidirectional streams. Causeway's extension (`SPEC.md` §Roles): the connection
//! carries a *forward* session (QUIC client = HTTP/3 client) and a *reverse* session (QUIC server =
//! HTTP/3 client, requests on server-initiated bidirectional streams). Bidirectional streams need no
//! demultiplexing: each side accepts peer-initiated ones into exactly one session. Unidirectional
//! streams (HTTP/3 control and QPACK streams) of the reverse session start with the extension stream
//! type [`REVERSE_UNI_TYPE`]; [`demux_uni`] routes each incoming one by its first varint.
//!
//! This replaces h3-quinn (whose stream constructors are private) and is the seam where later work
//! moves `Bytes` without copying and caps HTTP/3 frame lengths before h3 buffers them.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use causeway_protocol::ErrorCode;
use h3::error::Code;
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};
use quinn::VarInt;
use tokio::sync::mpsc;
use tokio_util::sync::ReusableBoxFuture;

use crate::transport::frame_guard::{FrameGuard, StreamKind};

/// Extension unidirectional stream type that prefixes every unidirectional stream of the reverse
/// session (a 4-byte varint: 0x435752, "CWR").
pub const REVERSE_UNI_TYPE: u64 = 0x43_5752;
const REVERSE_UNI_PREFIX: [u8; 4] = [0x80, 0x43, 0x57, 0x52];
/// Unidirectional streams one session may have waiting to be accepted. HTTP/3 opens three per
/// session (control, QPACK encoder, QPACK decoder); quinn's stream limit bounds the rest.
const UNI_QUEUE: usize = 8;
/// How long a peer may take to send the first bytes of a unidirectional stream.
const UNI_TYPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Which of the two HTTP/3 sessions an adapter serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// QUIC client is the HTTP/3 client.
    Forward,
    /// QUIC server is the HTTP/3 client.
    Reverse,
}

/// One HTTP/3 session's view of the shared QUIC connection.
pub struct Session {
    conn: quinn::Connection,
    half: Half,
    /// Whether this session takes peer-initiated bidirectional streams (it is the HTTP/3 server).
    accepts_bidi: bool,
    uni: mpsc::Receiver<RecvStream>,
    accepting_bi:
        Option<ReusableBoxFuture<'static, Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>>>,
    opener: Opener,
    ctx: Arc<GuardCtx>,
}

/// Splits a connection into its two sessions and returns the task that routes unidirectional streams.
/// `is_client` is the QUIC role of this side. Returns `(client_session, server_session, demux)`: the
/// first is given to `h3::client`, the second to `h3::server`.
/// `refused` counts HTTP/3 frames the frame guard refused (`frame_guard`).
pub fn split(
    conn: &quinn::Connection,
    is_client: bool,
    refused: metrics::Counter,
) -> (Session, Session, impl std::future::Future<Output = ()>) {
    let ctx = GuardCtx::new(conn, refused);
    let (fwd_tx, fwd_rx) = mpsc::channel(UNI_QUEUE);
    let (rev_tx, rev_rx) = mpsc::channel(UNI_QUEUE);
    let mk = |half, accepts_bidi, rx| Session::new(conn, half, accepts_bidi, rx, ctx.clone());
    // QUIC client: its HTTP/3 client is the forward session and its server the reverse one.
    let (client, server) = if is_client {
        (mk(Half::Forward, false, fwd_rx), mk(Half::Reverse, true, rev_rx))
    } else {
        (mk(Half::Reverse, false, rev_rx), mk(Half::Forward, true, fwd_rx))
    };
    let demux = demux_uni(conn.clone(), fwd_tx, rev_tx, ctx);
    (client, server, demux)
}

impl Session {
    fn new(
        conn: &quinn::Connection,
        half: Half,
        accepts_bidi: bool,
        uni: mpsc::Receiver<RecvStream>,
        ctx: Arc<GuardCtx>,
    ) -> Self {
        Self {
            conn: conn.clone(),
            half,
            accepts_bidi,
            uni,
            accepting_bi: None,
            opener: Opener::new(conn.clone(), half, ctx.clone()),
            ctx,
        }
    }
}

/// Accepts unidirectional streams and hands each to its session by its first varint.
async fn demux_uni(
    conn: quinn::Connection,
    fwd: mpsc::Sender<RecvStream>,
    rev: mpsc::Sender<RecvStream>,
    ctx: Arc<GuardCtx>,
) {
    while let Ok(mut recv) = conn.accept_uni().await {
        let (fwd, rev, ctx) = (fwd.clone(), rev.clone(), ctx.clone());
        tokio::spawn(async move {
            let mut first = [0u8; 8];
            let read = async {
                recv.read_exact(&mut first[..1]).await.ok()?;
                let len = 1usize << (first[0] >> 6);
                recv.read_exact(&mut first[1..len]).await.ok()?;
                Some(len)
            };
            let Ok(Some(len)) = tokio::time::timeout(UNI_TYPE_TIMEOUT, read).await else {
                let _ = recv.stop(varint(Code::H3_STREAM_CREATION_ERROR.value()));
                return;
            };
            if first[..len] == REVERSE_UNI_PREFIX {
                let stream = RecvStream::new(recv, None, StreamKind::Unidirectional, ctx, ErrorCode::H3_NO_ERROR);
                let _ = rev.send(stream).await;
            } else {
                let prefix = Bytes::copy_from_slice(&first[..len]);
                let stream =
                    RecvStream::new(recv, Some(prefix), StreamKind::Unidirectional, ctx, ErrorCode::H3_NO_ERROR);
                let _ = fwd.send(stream).await;
            }
        });
    }
}

fn conn_err(e: quinn::ConnectionError) -> ConnectionErrorIncoming {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            ConnectionErrorIncoming::ApplicationClose { error_code: c.error_code.into_inner() }
        }
        quinn::ConnectionError::TimedOut => ConnectionErrorIncoming::Timeout,
        e => ConnectionErrorIncoming::Undefined(Arc::new(e)),
    }
}

fn stream_conn_err(e: quinn::ConnectionError) -> StreamErrorIncoming {
    StreamErrorIncoming::ConnectionErrorIncoming { connection_error: conn_err(e) }
}

fn write_err(e: quinn::WriteError) -> StreamErrorIncoming {
    match e {
        quinn::WriteError::Stopped(code) => StreamErrorIncoming::StreamTerminated { error_code: code.into_inner() },
        quinn::WriteError::ConnectionLost(e) => stream_conn_err(e),
        e => StreamErrorIncoming::Unknown(Box::new(e)),
    }
}

fn read_err(e: quinn::ReadError) -> StreamErrorIncoming {
    match e {
        quinn::ReadError::Reset(code) => StreamErrorIncoming::StreamTerminated { error_code: code.into_inner() },
        quinn::ReadError::ConnectionLost(e) => stream_conn_err(e),
        e => StreamErrorIncoming::Unknown(Box::new(e)),
    }
}

pub(crate) fn varint(code: u64) -> VarInt {
    VarInt::from_u64(code).unwrap_or(VarInt::MAX)
}

impl quic::Connection<Bytes> for Session {
    type RecvStream = RecvStream;
    type OpenStreams = Opener;

    fn poll_accept_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<RecvStream, ConnectionErrorIncoming>> {
        match ready!(self.uni.poll_recv(cx)) {
            Some(s) => Poll::Ready(Ok(s)),
            // The demux task ends only when the connection does.
            None => Poll::Ready(Err(self
                .conn
                .close_reason()
                .map(conn_err)
                .unwrap_or(ConnectionErrorIncoming::InternalError("stream demux ended".into())))),
        }
    }

    fn poll_accept_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<BidiStream, ConnectionErrorIncoming>> {
        if !self.accepts_bidi {
            // Peer-initiated bidirectional streams belong to the other session of this connection.
            return Poll::Pending;
        }
        let conn = self.conn.clone();
        let fut =
            self.accepting_bi.get_or_insert_with(|| ReusableBoxFuture::new(async move { conn.accept_bi().await }));
        let res = ready!(fut.poll(cx));
        let conn = self.conn.clone();
        fut.set(async move { conn.accept_bi().await });
        let (send, recv) = res.map_err(conn_err)?;
        Poll::Ready(Ok(BidiStream {
            send: SendStream::new(send, Some(ErrorCode::FLOW_BACKEND_RESET)),
            recv: RecvStream::new(recv, None, StreamKind::Request, self.ctx.clone(), ErrorCode::H3_NO_ERROR),
        }))
    }

    fn opener(&self) -> Opener {
        Opener::new(self.conn.clone(), self.half, self.ctx.clone())
    }
}

impl quic::OpenStreams<Bytes> for Session {
    type BidiStream = BidiStream;
    type SendStream = SendStream;

    fn poll_open_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<BidiStream, StreamErrorIncoming>> {
        quic::OpenStreams::poll_open_bidi(&mut self.opener, cx)
    }

    fn poll_open_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::poll_open_send(&mut self.opener, cx)
    }

    fn close(&mut self, code: Code, reason: &[u8]) {
        self.conn.close(varint(code.value()), reason);
    }
}

type OpenBiFut = ReusableBoxFuture<'static, Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>>;
type OpenUniFut = ReusableBoxFuture<'static, Result<quinn::SendStream, StreamErrorIncoming>>;

/// Opens streams for one session; reverse-session unidirectional streams get their type prefix.
pub struct Opener {
    conn: quinn::Connection,
    half: Half,
    ctx: Arc<GuardCtx>,
    opening_bi: Option<OpenBiFut>,
    opening_uni: Option<OpenUniFut>,
}

impl Opener {
    fn new(conn: quinn::Connection, half: Half, ctx: Arc<GuardCtx>) -> Self {
        Self { conn, half, ctx, opening_bi: None, opening_uni: None }
    }

    async fn open_uni(conn: quinn::Connection, half: Half) -> Result<quinn::SendStream, StreamErrorIncoming> {
        let mut s = conn.open_uni().await.map_err(stream_conn_err)?;
        if half == Half::Reverse {
            s.write_all(&REVERSE_UNI_PREFIX).await.map_err(write_err)?;
        }
        Ok(s)
    }
}

impl quic::OpenStreams<Bytes> for Opener {
    type BidiStream = BidiStream;
    type SendStream = SendStream;

    fn poll_open_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<BidiStream, StreamErrorIncoming>> {
        let conn = self.conn.clone();
        let fut = self.opening_bi.get_or_insert_with(|| ReusableBoxFuture::new(async move { conn.open_bi().await }));
        let res = ready!(fut.poll(cx));
        let conn = self.conn.clone();
        fut.set(async move { conn.open_bi().await });
        let (send, recv) = res.map_err(stream_conn_err)?;
        Poll::Ready(Ok(BidiStream {
            send: SendStream::new(send, Some(ErrorCode::FLOW_CLIENT_RESET)),
            recv: RecvStream::new(recv, None, StreamKind::Request, self.ctx.clone(), ErrorCode::FLOW_CLIENT_RESET),
        }))
    }

    fn poll_open_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<SendStream, StreamErrorIncoming>> {
        let (conn, half) = (self.conn.clone(), self.half);
        let fut = self.opening_uni.get_or_insert_with(|| ReusableBoxFuture::new(Self::open_uni(conn, half)));
        let res = ready!(fut.poll(cx));
        fut.set(Self::open_uni(self.conn.clone(), half));
        Poll::Ready(res.map(|s| SendStream::new(s, None)))
    }

    fn close(&mut self, code: Code, reason: &[u8]) {
        self.conn.close(varint(code.value()), reason);
    }
}

impl Clone for Opener {
    fn clone(&self) -> Self {
        Self::new(self.conn.clone(), self.half, self.ctx.clone())
    }
}

type ReadFut = ReusableBoxFuture<'static, (Guarded, Result<Option<quinn::Chunk>, quinn::ReadError>)>;

/// The quinn stream with the code it is stopped with when dropped — also while a read holds it
/// (then it lives in the read's future; quinn alone would stop it with 0, which is no HTTP/3 code).
struct Guarded {
    stream: quinn::RecvStream,
    code: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // Refused (and harmless) when the stream was read to its end or stopped already.
        let _ = self.stream.stop(varint(self.code.load(std::sync::atomic::Ordering::Relaxed)));
    }
}

pub struct RecvStream {
    /// Bytes the demultiplexer already read (the stream type), handed out first.
    prefix: Option<Bytes>,
    stream: Option<Guarded>,
    /// The stop code of `stream` (shared with it while a read holds it).
    stop_code: Arc<std::sync::atomic::AtomicU64>,
    id: StreamId,
    reading: Option<ReadFut>,
    guard: FrameGuard,
    ctx: Arc<GuardCtx>,
}

/// What a refused frame needs: the connection (a refused control-stream frame ends it) and a counter.
pub struct GuardCtx {
    conn: quinn::Connection,
    refused: metrics::Counter,
}

impl GuardCtx {
    pub fn new(conn: &quinn::Connection, refused: metrics::Counter) -> Arc<Self> {
        Arc::new(Self { conn: conn.clone(), refused })
    }
}

impl RecvStream {
    /// `dropped`: the code the stream is stopped with when dropped before its end — H3_NO_ERROR
    /// for an answer's request side (RFC 9114 §4.1.1: the response is complete), `FLOW_CLIENT_RESET`
    /// for the response side of a request we opened (we went away: the peer must not count it as
    /// its own rapid reset, `SPEC.md` §5.6).
    fn new(
        stream: quinn::RecvStream,
        prefix: Option<Bytes>,
        kind: StreamKind,
        ctx: Arc<GuardCtx>,
        dropped: ErrorCode,
    ) -> Self {
        let id = stream_id(stream.id());
        let stop_code = Arc::new(std::sync::atomic::AtomicU64::new(dropped.0));
        let stream = Some(Guarded { stream, code: stop_code.clone() });
        Self { prefix, stream, stop_code, id, reading: None, guard: FrameGuard::new(kind), ctx }
    }

    /// Stops the stream with `code` now: directly, or by dropping a pending read that holds it.
    fn stop_with(&mut self, code: u64) {
        self.stop_code.store(code, std::sync::atomic::Ordering::Relaxed);
        if let Some(g) = self.stream.as_mut() {
            let _ = g.stream.stop(varint(code));
        }
        self.stream = None;
        self.reading = None;
    }

    /// Passes `data` through the frame guard; refuses the stream (or, for the control stream, the
    /// connection) with H3_EXCESSIVE_LOAD when a frame declares too much.
    fn check(&mut self, data: &Bytes) -> Result<(), StreamErrorIncoming> {
        let Err(o) = self.guard.inspect(data) else { return Ok(()) };
        self.ctx.refused.increment(1);
        crate::warn_limited!(
            frame_type = o.frame_type, length = o.length, limit = o.limit, control = o.control,
            remote = %self.ctx.conn.remote_address(), "h3.frame.refused"
        );
        if o.control {
            self.ctx.conn.close(varint(Code::H3_EXCESSIVE_LOAD.value()), b"HTTP/3 frame over the limit");
        }
        self.stop_with(Code::H3_EXCESSIVE_LOAD.value());
        Err(StreamErrorIncoming::StreamTerminated { error_code: Code::H3_EXCESSIVE_LOAD.value() })
    }
}

fn stream_id(id: quinn::StreamId) -> StreamId {
    // quinn stream ids are at most 2^62 - 1, which h3's StreamId accepts.
    StreamId::try_from(u64::from(id)).unwrap_or_else(|_| unreachable!("QUIC stream ids are varints"))
}

impl quic::RecvStream for RecvStream {
    type Buf = Bytes;

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        if let Some(p) = self.prefix.take() {
            self.check(&p)?;
            return Poll::Ready(Ok(Some(p)));
        }
        if let Some(mut g) = self.stream.take() {
            let fut = async move {
                let r = g.stream.read_chunk(usize::MAX, true).await;
                (g, r)
            };
            match &mut self.reading {
                Some(f) => f.set(fut),
                None => self.reading = Some(ReusableBoxFuture::new(fut)),
            }
        }
        let Some(fut) = self.reading.as_mut() else {
            return Poll::Ready(Ok(None));
        };
        let (stream, res) = ready!(fut.poll(cx));
        self.stream = Some(stream);
        let chunk = res.map(|c| c.map(|c| c.bytes)).map_err(read_err)?;
        if let Some(b) = &chunk {
            self.check(b)?;
        }
        Poll::Ready(Ok(chunk))
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.stop_with(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.id
    }
}

/// `chunk` as a slice of `payload`, if it is exactly `payload`'s tail (the part not yet written).
fn tail_of(payload: &Bytes, chunk: &[u8]) -> Option<Bytes> {
    let (start, end) = (payload.as_ptr() as usize, payload.as_ptr() as usize + payload.len());
    let c = chunk.as_ptr() as usize;
    (!chunk.is_empty() && c >= start && c + chunk.len() == end).then(|| payload.slice(c - start..))
}

/// Moves `chunk` (or its first part) into the stream; returns how many bytes it took.
fn poll_write_chunk(
    stream: &mut quinn::SendStream,
    cx: &mut Context<'_>,
    chunk: &mut Bytes,
) -> Poll<Result<usize, StreamErrorIncoming>> {
    let mut bufs = [std::mem::take(chunk)];
    // `write_chunks` is cancel-safe: a pending poll wrote nothing, and the waker is registered.
    let r = std::future::Future::poll(std::pin::pin!(stream.write_chunks(&mut bufs)), cx);
    match r {
        Poll::Ready(Ok(w)) => Poll::Ready(Ok(w.bytes)),
        Poll::Ready(Err(e)) => Poll::Ready(Err(write_err(e))),
        Poll::Pending => Poll::Pending,
    }
}

type AckedFut = Pin<Box<dyn std::future::Future<Output = Result<Option<VarInt>, quinn::StoppedError>> + Send + Sync>>;

thread_local! {
    /// The payload the relay is about to hand to h3's `send_data` on this thread (see [`offer_payload`]).
    static OFFERED: std::cell::RefCell<Option<Bytes>> = const { std::cell::RefCell::new(None) };
}

/// Sends `data` as one DATA frame on an h3 stream without copying it: h3 hands its sink only a
/// `WriteBuf` (a `Buf` over the frame header and the payload), whose payload quinn would copy into a
/// new allocation (`poll_write(&[u8])`, 10–17 % of a sending gateway's CPU in perf). The payload is
/// offered here first, on this thread; h3 calls [`SendStream::send_data`] synchronously in the first
/// poll, which takes the offer, and `poll_ready` then moves a slice of the same `Bytes` into quinn
/// (`write_chunks`) once it sees the `WriteBuf` pointing into it. Anything else falls back to a copy.
pub async fn send_data_zero_copy<F: std::future::Future>(data: &Bytes, send: F) -> F::Output {
    let mut send = std::pin::pin!(send);
    // The offer lives only inside the first poll: it cannot outlive a cancelled send, nor reach a
    // stream other than the one this poll drives.
    let first = std::future::poll_fn(|cx| {
        OFFERED.with(|o| *o.borrow_mut() = Some(data.clone()));
        let r = send.as_mut().poll(cx);
        OFFERED.with(|o| o.borrow_mut().take());
        Poll::Ready(r)
    })
    .await;
    match first {
        Poll::Ready(v) => v,
        Poll::Pending => send.await,
    }
}

pub struct SendStream {
    stream: quinn::SendStream,
    writing: Option<WriteBuf<Bytes>>,
    /// The payload of `writing`, when the relay offered it (zero-copy path).
    payload: Option<Bytes>,
    /// After `finish`: resolves once the peer acknowledged everything, FIN included.
    acked: Option<AckedFut>,
    /// The reset code when dropped unfinished (request streams; `None` for HTTP/3's own
    /// unidirectional streams, which end with their connection).
    dropped: Option<ErrorCode>,
}

impl SendStream {
    /// `dropped`: the code a request stream is reset with when it is dropped unfinished.
    fn new(stream: quinn::SendStream, dropped: Option<ErrorCode>) -> Self {
        Self { stream, writing: None, payload: None, acked: None, dropped }
    }
}

impl Drop for SendStream {
    /// A request stream dropped before `finish` — an attempt given up (no answer in time, a silent
    /// peer), a request body cut off, a response abandoned — is reset, not ended: quinn would send
    /// a FIN, and the peer could take what it got (early data, part of a body) for all of it.
    /// Requests we opened reset with `FLOW_CLIENT_RESET` (our side went away: a peer does not
    /// count it as rapid reset), answers with `FLOW_BACKEND_RESET` (`SPEC.md` §5.3, §5.7). A
    /// stream reset already keeps its first code (quinn refuses a second).
    fn drop(&mut self) {
        if let (None, Some(code)) = (&self.acked, self.dropped) {
            let _ = self.stream.reset(varint(code.0));
        }
    }
}

impl quic::SendStream<Bytes> for SendStream {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        if let Some(data) = self.writing.as_mut() {
            while data.has_remaining() {
                let chunk = data.chunk();
                let n = match self.payload.as_ref().and_then(|p| tail_of(p, chunk)) {
                    Some(mut tail) => ready!(poll_write_chunk(&mut self.stream, cx, &mut tail))?,
                    None => ready!(Pin::new(&mut self.stream).poll_write(cx, chunk)).map_err(write_err)?,
                };
                data.advance(n);
            }
        }
        self.writing = None;
        self.payload = None;
        Poll::Ready(Ok(()))
    }

    fn send_data<T: Into<WriteBuf<Bytes>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        if self.writing.is_some() {
            return Err(StreamErrorIncoming::ConnectionErrorIncoming {
                connection_error: ConnectionErrorIncoming::InternalError("send_data while a write is pending".into()),
            });
        }
        self.writing = Some(data.into());
        self.payload = OFFERED.with(|o| o.borrow_mut().take());
        Ok(())
    }

    /// Finishes the stream and resolves once the peer has acknowledged all of it. A flow is then
    /// delivered, not merely queued: a gateway that closes its connections right after its last
    /// flow ended (a drain) cannot discard the end of that flow.
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        if self.acked.is_none() {
            self.stream.finish().map_err(|e| StreamErrorIncoming::Unknown(Box::new(e)))?;
            self.acked = Some(Box::pin(self.stream.stopped()));
        }
        let Some(acked) = self.acked.as_mut() else { return Poll::Ready(Ok(())) };
        Poll::Ready(match ready!(acked.as_mut().poll(cx)) {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(StreamErrorIncoming::StreamTerminated { error_code: code.into_inner() }),
            Err(quinn::StoppedError::ConnectionLost(e)) => Err(stream_conn_err(e)),
            Err(e) => Err(StreamErrorIncoming::Unknown(Box::new(e))),
        })
    }

    fn reset(&mut self, reset_code: u64) {
        let _ = self.stream.reset(varint(reset_code));
    }

    fn send_id(&self) -> StreamId {
        stream_id(self.stream.id())
    }
}

impl quic::SendStreamUnframed<Bytes> for SendStream {
    fn poll_send<D: Buf>(&mut self, cx: &mut Context<'_>, buf: &mut D) -> Poll<Result<usize, StreamErrorIncoming>> {
        let n = ready!(Pin::new(&mut self.stream).poll_write(cx, buf.chunk())).map_err(write_err)?;
        buf.advance(n);
        Poll::Ready(Ok(n))
    }
}

pub struct BidiStream {
    send: SendStream,
    recv: RecvStream,
}

impl quic::BidiStream<Bytes> for BidiStream {
    type SendStream = SendStream;
    type RecvStream = RecvStream;

    fn split(self) -> (SendStream, RecvStream) {
        (self.send, self.recv)
    }
}

impl quic::RecvStream for BidiStream {
    type Buf = Bytes;

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        self.recv.poll_data(cx)
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code)
    }

    fn recv_id(&self) -> StreamId {
        self.recv.recv_id()
    }
}

impl quic::SendStream<Bytes> for BidiStream {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<Bytes>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code)
    }

    fn send_id(&self) -> StreamId {
        self.send.send_id()
    }
}

impl quic::SendStreamUnframed<Bytes> for BidiStream {
    fn poll_send<D: Buf>(&mut self, cx: &mut Context<'_>, buf: &mut D) -> Poll<Result<usize, StreamErrorIncoming>> {
        self.send.poll_send(cx, buf)
    }
}
