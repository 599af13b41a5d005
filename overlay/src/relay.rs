//! Moving bytes between the two sides of a flow — a TCP connection or an HTTP/3 stream each: both
//! directions joined, half-close propagated (TCP FIN ⇄ QUIC FIN), and any error turned into a
//! reset of both sides — never a silent truncation. Bytes are counted live.

use std::future::Future;

use bytes::{Buf, Bytes, BytesMut};
use causeway_protocol::ErrorCode;
use h3::error::Code;
use metrics::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::h3q;

/// First read buffer of a TCP source; it doubles up to [`MAX_READ`] while reads fill it, so idle
/// flows stay small and bulk flows make few, large DATA frames.
const MIN_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;

/// Where a flow's bytes come from. `Err` means the side failed (reset, connection lost).
pub trait ByteSource: Send {
    fn recv(&mut self) -> impl Future<Output = Result<Option<Bytes>, ()>> + Send;
    /// Tells the sending peer to stop (STOP_SENDING, or a TCP reset).
    fn abort(&mut self, code: ErrorCode);
}

/// Where a flow's bytes go.
pub trait ByteSink: Send {
    fn send(&mut self, data: Bytes) -> impl Future<Output = Result<(), ()>> + Send;
    /// End of stream: QUIC FIN or TCP FIN (half-close).
    fn finish(&mut self) -> impl Future<Output = Result<(), ()>> + Send;
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
            async fn send(&mut self, data: Bytes) -> Result<(), ()> {
                self.send_data(data).await.map_err(|_| ())
            }
            async fn finish(&mut self) -> Result<(), ()> {
                <$send>::finish(self).await.map_err(|_| ())
            }
            fn abort(&mut self, code: ErrorCode) {
                self.stop_stream(Code::from(code.0));
            }
        }

        impl ByteSource for $recv {
            async fn recv(&mut self) -> Result<Option<Bytes>, ()> {
                match self.recv_data().await {
                    Ok(b) => Ok(b.map(|mut b| b.copy_to_bytes(b.remaining()))),
                    Err(_) => Err(()),
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
    async fn recv(&mut self) -> Result<Option<Bytes>, ()> {
        if self.buf.capacity() < self.size {
            self.buf.reserve(self.size);
        }
        let n = self.half.read_buf(&mut self.buf).await.map_err(|_| ())?;
        if n == 0 {
            return Ok(None);
        }
        if n == self.size && self.size < MAX_READ {
            self.size *= 2;
        }
        Ok(Some(self.buf.split().freeze()))
    }

    fn abort(&mut self, _code: ErrorCode) {
        reset_on_drop(self.half.as_ref());
    }
}

impl ByteSink for TcpSink {
    async fn send(&mut self, data: Bytes) -> Result<(), ()> {
        let half = self.half.as_mut().ok_or(())?;
        half.write_all(&data).await.map_err(|_| ())
    }

    async fn finish(&mut self) -> Result<(), ()> {
        let half = self.half.as_mut().ok_or(())?;
        half.shutdown().await.map_err(|_| ())
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

/// How a relayed flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions reached end of stream.
    Complete,
    /// The client's side failed or was reset; the upstream side was reset too.
    ClientReset,
    /// The upstream side (peer gateway or backend) failed or was reset; the client was reset too.
    UpstreamReset,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::ClientReset => "client_reset",
            Outcome::UpstreamReset => "upstream_reset",
        }
    }
}

/// Live byte counters of one flow: `up` is client → upstream, `down` upstream → client.
pub struct Counters {
    pub up: Counter,
    pub down: Counter,
}

/// Which end of one direction failed.
enum End {
    Source,
    Sink,
}

async fn pump<S: ByteSource, K: ByteSink>(
    src: &mut S,
    sink: &mut K,
    counter: &Counter,
    total: &mut u64,
) -> Result<(), End> {
    loop {
        match src.recv().await {
            Ok(Some(chunk)) => {
                let n = chunk.len() as u64;
                sink.send(chunk).await.map_err(|_| End::Sink)?;
                *total += n;
                counter.increment(n);
            }
            Ok(None) => return sink.finish().await.map_err(|_| End::Sink),
            Err(()) => return Err(End::Source),
        }
    }
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
        let up_dir = async { pump(c_src, u_sink, &counters.up, &mut up).await.map_err(|e| matches!(e, End::Source)) };
        let down_dir =
            async { pump(u_src, c_sink, &counters.down, &mut down).await.map_err(|e| matches!(e, End::Sink)) };
        // Err(true): the client's side failed; Err(false): the upstream's.
        tokio::try_join!(up_dir, down_dir)
    };
    let outcome = match res {
        Ok(_) => return (Outcome::Complete, up, down),
        Err(true) => Outcome::ClientReset,
        Err(false) => Outcome::UpstreamReset,
    };
    // Tell each side why: the upstream learns the client went away and vice versa.
    u_sink.abort(ErrorCode::FLOW_CLIENT_RESET);
    u_src.abort(ErrorCode::FLOW_CLIENT_RESET);
    c_sink.abort(ErrorCode::FLOW_BACKEND_RESET);
    c_src.abort(ErrorCode::FLOW_BACKEND_RESET);
    (outcome, up, down)
}

/// Closes a TCP connection with RST rather than FIN, so the application sees an error and not a
/// clean (possibly truncated) end of stream.
pub fn abort(tcp: TcpStream) {
    reset_on_drop(&tcp);
    drop(tcp);
}
