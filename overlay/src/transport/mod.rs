//! QUIC transport settings and the UDP endpoint. Every value that bounds memory or detection time
//! is set here, with its arithmetic, because quinn's defaults silently cap an overlay (100 streams,
//! an unlimited connection window, no keep-alive).

pub mod congestion;
pub mod frame_guard;
pub mod h3q;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};

/// Concurrent flows (bidirectional streams) one peer may have open toward us. Each open stream costs
/// quinn ~1 KiB of state plus its unread data, which the connection window below bounds; 10,000 idle
/// flows ≈ 10 MiB per peer.
pub const MAX_FLOWS_PER_PEER: u32 = 10_000;
/// Bidirectional streams beyond the flows: the control stream, and streams whose credit the peer
/// has not yet seen returned (a stream's slot comes back only once its close is acknowledged).
pub const STREAM_HEADROOM: u32 = 64;
/// HTTP/3 opens three unidirectional streams per session and a connection carries two sessions.
pub const MAX_UNI_STREAMS: u32 = 16;
/// Per-flow receive window: 16 MiB sustains 1.3 Gbit/s per flow at 100 ms RTT (window / RTT), so a
/// single flow on a long fat link is not window-bound. It is a cap, not an allocation.
pub const STREAM_WINDOW: u32 = 16 * 1024 * 1024;
/// Per-peer receive window: all flows of one peer together may have at most 64 MiB unread here
/// (5 Gbit/s at 100 ms RTT). This is the real memory bound per peer: 100 peers ≤ 6.4 GiB worst case,
/// reached only if every backend stops reading.
pub const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;
/// Unacknowledged data we buffer per peer for sending, matching the peer's window.
pub const SEND_WINDOW: u64 = 64 * 1024 * 1024;
/// Incoming handshakes quinn holds at once (its default is 65,536). Each costs a few KiB until it
/// completes or times out: 256 × ~8 KiB ≈ 2 MiB.
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// Kernel socket buffers. The OS default (208 KiB) drops packets at a few Gbit/s on loopback;
/// 4 MiB holds ~2,800 full-size datagrams.
pub const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Transport timers. Liveness is also checked by control-stream pings (see `peer::control`), which notice
/// a silent peer well before the idle timeout; the idle timeout is the backstop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Self { keep_alive: Duration::from_secs(1), idle_timeout: Duration::from_secs(5) }
    }
}

/// What one peer connection may hold, configurable as `limits.*` (README "Limits"); the defaults
/// are the constants above, with their memory arithmetic. Every window is finite: quinn's own
/// default connection window is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuicLimits {
    /// Concurrent flows (bidirectional streams) a peer may have open toward us.
    pub flows_per_peer: u32,
    /// Per-flow receive window, bytes.
    pub stream_window: u32,
    /// Per-peer receive window (all flows together), bytes; also our send buffer per peer.
    pub peer_receive_window: u32,
    /// Incoming handshakes held at once.
    pub pending_handshakes: usize,
}

impl Default for QuicLimits {
    fn default() -> Self {
        Self {
            flows_per_peer: MAX_FLOWS_PER_PEER,
            stream_window: STREAM_WINDOW,
            peer_receive_window: CONNECTION_WINDOW,
            pending_handshakes: MAX_PENDING_HANDSHAKES,
        }
    }
}

/// Loss detection thresholds (RFC 9002 §6.1). The defaults (3 packets, 9/8 RTT) declare a packet
/// lost as soon as a few later ones arrive; WAN paths with per-packet jitter reorder far more, and
/// every spurious loss halves the congestion window. 8 packets and 1.5 RTT tolerate that reordering
/// while still recovering a real loss within a fraction of an RTT.
pub const PACKET_THRESHOLD: u32 = 8;
pub const TIME_THRESHOLD: f32 = 1.5;

pub fn transport_config(t: Timers, l: QuicLimits) -> TransportConfig {
    let mut c = TransportConfig::default();
    c.packet_threshold(PACKET_THRESHOLD).time_threshold(TIME_THRESHOLD);
    // BBR rather than quinn's default Cubic: an overlay spans lossy, jittery WAN paths, where Cubic
    // reads every loss or reordering as congestion. Measured through the impairment relay
    // (tests/impair.rs, debug build): 64 MiB at 10 % loss took 126 s with Cubic and 5.4 s with BBR;
    // 0-20 ms per-packet jitter stalled Cubic outright (the fault suite fails with Cubic). On clean
    // paths the benchmarks show no throughput difference (BENCHMARKS.md).
    // quinn 0.11's BBR alone keeps the window sized for the shortest RTT the connection ever saw,
    // so a long-lived connection whose path gets longer collapses; `PathBbr` keeps a path minimum
    // RTT that may rise (crate::transport::congestion; BENCHMARKS.md, B1r).
    c.congestion_controller_factory(Arc::new(crate::transport::congestion::PathBbrConfig::default()));
    c.max_concurrent_bidi_streams(VarInt::from_u32(l.flows_per_peer.saturating_add(STREAM_HEADROOM)))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS))
        .stream_receive_window(VarInt::from_u32(l.stream_window))
        .receive_window(VarInt::from_u32(l.peer_receive_window))
        .send_window(u64::from(l.peer_receive_window))
        .keep_alive_interval(Some(t.keep_alive))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(t.idle_timeout).unwrap_or(IdleTimeout::from(VarInt::from_u32(5_000))),
        ));
    c
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot bind UDP {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("QUIC endpoint: {0}")]
    Quic(std::io::Error),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// Binds the overlay's UDP socket with large buffers and creates the quinn endpoint (server and client).
pub fn bind(addr: SocketAddr, server: quinn::ServerConfig) -> Result<quinn::Endpoint, EndpointError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| EndpointError::Bind { addr, source };
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    sock.bind(&addr.into()).map_err(err)?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| EndpointError::Quic(std::io::Error::other("no async runtime")))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), sock.into(), runtime)
        .map_err(EndpointError::Quic)
}

pub fn server_config(
    tls: rustls::ServerConfig,
    timers: Timers,
    limits: QuicLimits,
) -> Result<quinn::ServerConfig, EndpointError> {
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Tls(e.to_string()))?;
    let mut s = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    s.transport_config(Arc::new(transport_config(timers, limits)));
    s.max_incoming(limits.pending_handshakes);
    Ok(s)
}

pub fn client_config(
    tls: rustls::ClientConfig,
    timers: Timers,
    limits: QuicLimits,
) -> Result<quinn::ClientConfig, EndpointError> {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Tls(e.to_string()))?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(Arc::new(transport_config(timers, limits)));
    Ok(c)
}

/// Resolves `host:port` (or `IP:port`) to an address the endpoint bound at `local` can send to:
/// the first of the name's addresses in the socket's family, or, on a dual-stack IPv6 socket, an
/// IPv4 address written as v4-mapped IPv6. Resolved at every attempt, so a name that moves is
/// followed.
pub async fn resolve(target: &str, local: SocketAddr, timeout: std::time::Duration) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(timeout, tokio::net::lookup_host(target)).await {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => return Err(format!("resolving {target}: {e}")),
        Err(_) => return Err(format!("resolving {target} timed out")),
    };
    let same_family = addrs.iter().find(|a| a.is_ipv4() == local.is_ipv4()).copied();
    match (same_family, addrs.first(), local) {
        (Some(a), _, _) => Ok(a),
        (None, Some(SocketAddr::V4(v4)), SocketAddr::V6(_)) => {
            Ok(SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())))
        }
        _ => Err(format!("{target} has no address reachable from {local}")),
    }
}

/// What proves a peer alive, from its connection's statistics (`core::liveness`): datagrams
/// received, and STREAM, MAX_DATA and MAX_STREAM_DATA frames (flow data and flow credit).
pub(crate) fn liveness_counters(conn: &quinn::Connection) -> crate::core::liveness::Counters {
    let stats = conn.stats();
    let rx = stats.frame_rx;
    crate::core::liveness::Counters {
        datagrams: stats.udp_rx.datagrams,
        app_frames: rx.stream + rx.max_data + rx.max_stream_data,
    }
}

/// A connection's cumulative path counters, for `core::path_stats`.
pub(crate) fn path_totals(stats: &quinn::ConnectionStats) -> crate::core::path_stats::Totals {
    crate::core::path_stats::Totals {
        sent_packets: stats.path.sent_packets,
        lost_packets: stats.path.lost_packets,
        congestion_events: stats.path.congestion_events,
        sent_bytes: stats.udp_tx.bytes,
        received_bytes: stats.udp_rx.bytes,
    }
}

/// Dials `target` (`IP:port`, or `host:port` resolved now) from `endpoint`: resolution and the
/// QUIC/TLS handshake both within `timeout`.
pub(crate) async fn dial(
    endpoint: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    target: &str,
    timeout: std::time::Duration,
) -> Result<quinn::Connection, String> {
    let local = endpoint.local_addr().map_err(|e| e.to_string())?;
    let addr = resolve(target, local, timeout).await?;
    let connecting = endpoint.connect_with(cfg, addr, crate::transport::tls::SERVER_NAME).map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("handshake timed out".into()),
    }
}

/// Closes a connection with an application error code and a reason the peer logs.
pub fn close(conn: &quinn::Connection, code: causeway_protocol::ErrorCode, reason: &str) {
    conn.close(h3q::varint(code.0), reason.as_bytes());
}

/// Largest HTTP/3 field section we accept (RFC 9114 §4.2.2 SETTINGS_MAX_FIELD_SECTION_SIZE).
pub const MAX_FIELD_SECTION: u64 = 64 * 1024;

/// Exponential backoff with jitter: each delay is uniform in [base/2, base], base doubling to `max`.
pub struct Backoff {
    min: Duration,
    max: Duration,
    base: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, base: min }
    }
    pub fn reset(&mut self) {
        self.base = self.min;
    }
    pub fn next_delay(&mut self) -> Duration {
        use rand::Rng;
        let d = self.base.mul_f64(rand::rng().random_range(0.5..=1.0));
        self.base = (self.base * 2).min(self.max);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = Duration::from_millis(100 * (1 << i.min(4))).min(Duration::from_secs(1));
            assert!(*d >= base / 2 && *d <= base, "delay {i} = {d:?}, base {base:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
