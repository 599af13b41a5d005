//! Moving bytes between a TCP connection and an HTTP/3 stream: both directions joined, half-close
//! propagated (TCP FIN ⇄ QUIC FIN), and any error turned into a reset on both sides — never a
//! silent truncation. Bytes are counted live.

use std::future::Future;

use bytes::{Buf, Bytes, BytesMut};
use causeway_protocol::ErrorCode;
use h3::error::{Code, StreamError};
use metrics::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::h3q;

/// First read buffer per direction; it doubles up to [`MAX_READ`] while reads fill it, so idle flows
/// stay small and bulk flows make few, large DATA frames.
const MIN_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;

/// The sending half of an HTTP/3 request stream (client or server side).
pub trait H3Send: Send {
    fn send(&mut self, data: Bytes) -> impl Future<Output = Result<(), StreamError>> + Send;
    fn finish(&mut self) -> impl Future<Output = Result<(), StreamError>> + Send;
    fn reset(&mut self, code: ErrorCode);
}

/// The receiving half of an HTTP/3 request stream.
pub trait H3Recv: Send {
    fn recv(&mut self) -> impl Future<Output = Result<Option<Bytes>, StreamError>> + Send;
    fn stop(&mut self, code: ErrorCode);
}

pub type ClientSend = h3::client::RequestStream<h3q::SendStream, Bytes>;
pub type ClientRecv = h3::client::RequestStream<h3q::RecvStream, Bytes>;
pub type ServerSend = h3::server::RequestStream<h3q::SendStream, Bytes>;
pub type ServerRecv = h3::server::RequestStream<h3q::RecvStream, Bytes>;

macro_rules! impl_halves {
    ($send:ty, $recv:ty) => {
        impl H3Send for $send {
            async fn send(&mut self, data: Bytes) -> Result<(), StreamError> {
                self.send_data(data).await
            }
            async fn finish(&mut self) -> Result<(), StreamError> {
                <$send>::finish(self).await
            }
            fn reset(&mut self, code: ErrorCode) {
                self.stop_stream(Code::from(code.0));
            }
        }

        impl H3Recv for $recv {
            async fn recv(&mut self) -> Result<Option<Bytes>, StreamError> {
                Ok(self
                    .recv_data()
                    .await?
                    .map(|mut b| b.copy_to_bytes(b.remaining())))
            }
            fn stop(&mut self, code: ErrorCode) {
                self.stop_sending(Code::from(code.0));
            }
        }
    };
}

impl_halves!(ClientSend, ClientRecv);
impl_halves!(ServerSend, ServerRecv);

/// How a relayed flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions reached end of stream.
    Complete,
    /// The TCP side failed or was reset; the stream was reset toward the peer.
    TcpReset,
    /// The QUIC side was reset or the connection lost; the TCP side was reset.
    StreamReset,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::TcpReset => "tcp_reset",
            Outcome::StreamReset => "stream_reset",
        }
    }
}

/// Live byte counters of one flow: `up` is TCP → stream, `down` stream → TCP.
pub struct Counters {
    pub up: Counter,
    pub down: Counter,
}

/// Relays until both directions end. `tcp_reset_code` is sent on the stream when the TCP side fails.
pub async fn relay<S: H3Send, R: H3Recv>(
    tcp: TcpStream,
    tx: &mut S,
    rx: &mut R,
    counters: &Counters,
    tcp_reset_code: ErrorCode,
) -> (Outcome, u64, u64) {
    let (mut tr, mut tw) = tcp.into_split();
    let mut up_bytes = 0u64;
    let mut down_bytes = 0u64;
    let up = async {
        let mut size = MIN_READ;
        let mut buf = BytesMut::with_capacity(size);
        loop {
            if buf.capacity() < size {
                buf.reserve(size);
            }
            let n = tr.read_buf(&mut buf).await.map_err(|_| Outcome::TcpReset)?;
            if n == 0 {
                tx.finish().await.map_err(|_| Outcome::StreamReset)?;
                return Ok::<_, Outcome>(());
            }
            if n == size && size < MAX_READ {
                size *= 2;
            }
            up_bytes += n as u64;
            counters.up.increment(n as u64);
            tx.send(buf.split().freeze()).await.map_err(|_| Outcome::StreamReset)?;
        }
    };
    let down = async {
        while let Some(chunk) = rx.recv().await.map_err(|_| Outcome::StreamReset)? {
            tw.write_all(&chunk).await.map_err(|_| Outcome::TcpReset)?;
            down_bytes += chunk.len() as u64;
            counters.down.increment(chunk.len() as u64);
        }
        // Peer finished its side: propagate the half-close.
        tw.shutdown().await.map_err(|_| Outcome::TcpReset)
    };
    let res = tokio::try_join!(up, down);
    let outcome = match res {
        Ok(_) => Outcome::Complete,
        Err(o) => o,
    };
    if outcome != Outcome::Complete {
        let code = if outcome == Outcome::TcpReset {
            tcp_reset_code
        } else {
            ErrorCode::FLOW_BACKEND_RESET
        };
        tx.reset(code);
        rx.stop(code);
        if let Ok(tcp) = tr.reunite(tw) {
            abort(tcp);
        }
    }
    (outcome, up_bytes, down_bytes)
}

/// Closes a TCP connection with RST rather than FIN, so the application sees an error and not a
/// clean (possibly truncated) end of stream.
pub fn abort(tcp: TcpStream) {
    // Linger 0 sends RST at once; it does not block (only a non-zero linger does).
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
    drop(tcp);
}
