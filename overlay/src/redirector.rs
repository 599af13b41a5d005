//! The redirector's overlay side: one QUIC connection (mutual TLS with the node's identity) to the
//! zone gateway, a catalog stream from which it derives service VIPs, and one HTTP/3 CONNECT per
//! captured connection. It makes no routing or policy decision: capture and hand-off only.
//!
//! This module does NOT install iptables rules, accept captured sockets or answer DNS; the
//! `causeway redirect` command does, and hands each captured connection to [`Redirector::serve_captured`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use causeway_protocol::control::{Decoder, Event, Message};
use causeway_protocol::flow::{FlowError, CATALOG_AUTHORITY, ERROR, ORIGINAL_DST, SOURCE_ADDRESS, TRACEPARENT};
use causeway_protocol::vip::{VipRange, VipTable};
use causeway_protocol::{Identity, ServiceName};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::access::{Access, Direction, Kind};
use crate::core::liveness::{self, Liveness};
use crate::flow::relay::{self, ByteSource, Counters};
use crate::metrics::{Metrics, CAPTURED, FLOW_BYTES, GATEWAY_UP, H3_FRAMES_REFUSED, VIPS};
use crate::transport::h3q::{self, Opener};
use crate::transport::tls::{Credentials, TlsFactory, TrustBundle};
use crate::transport::{self, Timers};
use crate::transport::{Backoff, MAX_FIELD_SECTION};

/// Timers of the redirector. The gateway is on the same network, so a silent gateway is noticed
/// fast: new captured connections are reset at once after `silence`, and the connection (with its
/// flows) is dropped after `silence_close`.
#[derive(Debug, Clone, Copy)]
pub struct RedirectTiming {
    pub handshake_timeout: Duration,
    /// Waiting for the gateway's answer to a CONNECT (it may try several zones).
    pub flow_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub transport: Timers,
    /// No datagram from the gateway for this long (it acknowledges our keep-alives every
    /// `transport.keep_alive`) means it may be gone: new captured connections are refused at once
    /// (reset) until it is heard again ...
    pub silence: Duration,
    /// ... and after this long the connection is closed, resetting the flows still on it. Longer,
    /// so a gateway stalled for a moment (a busy node) costs no open flow.
    pub silence_close: Duration,
}

/// How often the redirector looks for datagrams from its gateway.
const WATCHDOG: Duration = Duration::from_millis(100);

impl Default for RedirectTiming {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(2),
            flow_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            // The QUIC idle timeout binds both ends (the smaller one wins), so it stays long enough
            // for a busy gateway; a silent gateway is noticed by `silence` instead.
            transport: Timers { keep_alive: Duration::from_millis(200), idle_timeout: Duration::from_secs(5) },
            silence: Duration::from_millis(600),
            silence_close: Duration::from_secs(3),
        }
    }
}

pub struct RedirectorConfig {
    /// `IP:port` or `host:port` (resolved at every connection attempt, so a Kubernetes Service name
    /// or a DNS name that moves is followed).
    pub gateway: String,
    pub gateway_id: Identity,
    pub credentials: Credentials,
    pub bundle: TrustBundle,
    pub vip_range: VipRange,
    pub timing: RedirectTiming,
    pub metrics: Metrics,
}

/// Services and their VIPs and ports, as the gateway last reported them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RedirectTable {
    pub vips: VipTable,
    pub ports: BTreeMap<ServiceName, u16>,
}

struct Inner {
    cfg: RedirectorConfig,
    identity: Identity,
    endpoint: quinn::Endpoint,
    tls: TlsFactory,
    session: watch::Sender<Option<h3::client::SendRequest<Opener, Bytes>>>,
    table: watch::Sender<Arc<RedirectTable>>,
    shutdown: CancellationToken,
}

#[derive(Clone)]
pub struct Redirector(Arc<Inner>);

#[derive(Debug, thiserror::Error)]
pub enum RedirectorError {
    #[error("TLS: {0}")]
    Tls(#[from] crate::transport::tls::TlsError),
    #[error("UDP socket: {0}")]
    Io(#[from] std::io::Error),
}

impl Redirector {
    pub fn new(cfg: RedirectorConfig) -> Result<Self, RedirectorError> {
        let identity = cfg.credentials.identity()?;
        let tls = TlsFactory::new(cfg.credentials.clone(), cfg.bundle.clone(), cfg.metrics.clone())?;
        // A dual-stack socket reaches IPv4 and IPv6 gateways alike.
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([0u16; 8], 0)))
            .or_else(|_| quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0))))?;
        Ok(Self(Arc::new(Inner {
            cfg,
            identity,
            endpoint,
            tls,
            session: watch::channel(None).0,
            table: watch::channel(Arc::new(RedirectTable::default())).0,
            shutdown: CancellationToken::new(),
        })))
    }

    pub fn identity(&self) -> &Identity {
        &self.0.identity
    }

    pub fn table(&self) -> Arc<RedirectTable> {
        self.0.table.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<RedirectTable>> {
        self.0.table.subscribe()
    }

    /// The TLS state: [`TlsFactory::update`] rotates the certificate and bundle for every later
    /// connection to the gateway. The connection up now stays: the gateway does not re-verify an
    /// established connection, and the next one presents the new leaf.
    pub fn tls(&self) -> &TlsFactory {
        &self.0.tls
    }

    pub fn connected(&self) -> bool {
        self.0.session.borrow().is_some()
    }

    pub fn shutdown(&self) {
        self.0.shutdown.cancel();
        self.0.endpoint.close(h3q::varint(causeway_protocol::ErrorCode::SHUTDOWN.0), b"shutdown");
    }

    /// Keeps one connection to the gateway, reconnecting with backoff, until shutdown.
    pub async fn run(self) {
        let t = self.0.cfg.timing;
        let mut backoff = Backoff::new(t.backoff_min, t.backoff_max);
        let up = self.0.cfg.metrics.gauge(GATEWAY_UP, &[]);
        while !self.0.shutdown.is_cancelled() {
            match self.connect().await {
                Ok(conn) => {
                    backoff.reset();
                    up.set(1.0);
                    tracing::info!(gateway = %self.0.cfg.gateway, "redirect.gateway.connected");
                    let end = self.session(&conn).await;
                    self.0.session.send_replace(None);
                    up.set(0.0);
                    tracing::warn!(reason = %end, "redirect.gateway.disconnected");
                }
                Err(e) => tracing::debug!(gateway = %self.0.cfg.gateway, error = %e, "redirect.gateway.dial_failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = self.0.shutdown.cancelled() => return,
            }
        }
    }

    async fn connect(&self) -> Result<quinn::Connection, String> {
        let tls = self.0.tls.client(self.0.cfg.gateway_id.clone()).map_err(|e| e.to_string())?;
        let cfg = transport::client_config(tls, self.0.cfg.timing.transport, transport::QuicLimits::default())
            .map_err(|e| e.to_string())?;
        transport::dial(&self.0.endpoint, cfg, &self.0.cfg.gateway, self.0.cfg.timing.handshake_timeout).await
    }

    /// Runs one connection: publishes it for flows and applies catalog snapshots until it ends.
    async fn session(&self, conn: &quinn::Connection) -> String {
        let refused = self.0.cfg.metrics.counter(H3_FRAMES_REFUSED, &[]);
        let (client, _server, demux) = h3q::split(conn, true, refused);
        tokio::spawn(demux);
        let built = h3::client::builder().max_field_section_size(MAX_FIELD_SECTION).build::<_, _, Bytes>(client).await;
        let (mut driver, mut requests) = match built {
            Ok(x) => x,
            Err(e) => return format!("HTTP/3: {e}"),
        };
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        let open = async {
            let mut s = requests
                .send_request(http::Request::connect(CATALOG_AUTHORITY).body(()).map_err(|e| e.to_string())?)
                .await
                .map_err(|e| e.to_string())?;
            let resp = s.recv_response().await.map_err(|e| e.to_string())?;
            if resp.status() != http::StatusCode::OK {
                return Err(format!("catalog refused: {}", resp.status()));
            }
            Ok(s)
        };
        let stream = match tokio::time::timeout(self.0.cfg.timing.handshake_timeout, open).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return e,
            Err(_) => return "catalog stream not answered".into(),
        };
        self.0.session.send_replace(Some(requests.clone()));
        let (_tx, mut rx) = stream.split();
        let mut dec = Decoder::new();
        let mut pending: BTreeMap<ServiceName, u16> = BTreeMap::new();
        let mut watchdog = tokio::time::interval(WATCHDOG);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The gateway's liveness, by the rules of a gateway's own peers (`core::liveness`); its
        // gateway sends no periodic frames on this stream, so only datagram silence counts.
        let thresholds = liveness::Thresholds {
            interval: WATCHDOG,
            silent_after: self.0.cfg.timing.silence,
            close_after: self.0.cfg.timing.silence_close,
            frames: false,
            frame_deadline: None,
            hello_within: None,
        };
        let mut live = Liveness::new(thresholds, std::time::Instant::now(), crate::transport::liveness_counters(conn));
        loop {
            let data = tokio::select! {
                d = rx.recv() => d,
                _ = watchdog.tick() => {
                    match live.tick(std::time::Instant::now(), crate::transport::liveness_counters(conn), true) {
                        None => {}
                        Some(liveness::Event::Heard { for_ }) => {
                            tracing::info!(silent_ms = for_.as_millis() as u64, "redirect.gateway.heard");
                            self.0.session.send_replace(Some(requests.clone()));
                        }
                        Some(liveness::Event::Silent { for_ }) => {
                            // New captured connections are reset at once; open flows wait a while.
                            tracing::warn!(silent_ms = for_.as_millis() as u64, "redirect.gateway.silent");
                            self.0.session.send_replace(None);
                        }
                        Some(liveness::Event::Close { code, reason, .. }) => {
                            let why = format!("gateway {reason}");
                            conn.close(h3q::varint(code.0), why.as_bytes());
                            return why;
                        }
                    }
                    continue;
                }
                _ = self.0.shutdown.cancelled() => return "shutdown".into(),
            };
            live.on_control_data(std::time::Instant::now());
            let data = match data {
                Ok(Some(d)) => d,
                Ok(None) | Err(_) => {
                    return conn.close_reason().map(|r| r.to_string()).unwrap_or_else(|| "catalog stream ended".into())
                }
            };
            if let Err(e) = dec.feed(data) {
                return e.to_string();
            }
            loop {
                match dec.next_event() {
                    Ok(Some(Event::Message(Message::Catalog(c)))) => {
                        pending.extend(c.services.into_iter().map(|a| (a.name, a.port)));
                        // A snapshot is buffered until its last chunk: bounded by what the VIP range
                        // can number (65,534 in the default /16; ~100 bytes a service).
                        let most = self.0.cfg.vip_range.capacity() as usize;
                        if pending.len() > most {
                            return format!("catalog of more than {most} services: the VIP range cannot hold them");
                        }
                        if !c.more {
                            let ports = std::mem::take(&mut pending);
                            let vips = VipTable::assign(self.0.cfg.vip_range, ports.keys());
                            self.0.cfg.metrics.gauge(VIPS, &[]).set(vips.len() as f64);
                            self.0.table.send_replace(Arc::new(RedirectTable { vips, ports }));
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => return e.to_string(),
                }
            }
        }
    }

    /// Hands one captured connection to the gateway and relays it. `dst` is its original destination.
    pub async fn serve_captured(&self, tcp: TcpStream, dst: SocketAddr, src: SocketAddr) {
        let start = Instant::now();
        let m = &self.0.cfg.metrics;
        let table = self.table();
        let service = match dst.ip() {
            IpAddr::V4(ip) => table.vips.service(ip).cloned(),
            IpAddr::V6(_) => None,
        };
        let trace = crate::flow::root_trace();
        let event = |service: &str| {
            let mut a = Access::new(Kind::Capture, Direction::Outbound, service, trace);
            a.start = start.into_std();
            a.source_address = src.to_string();
            a.endpoint = dst.to_string();
            a
        };
        let name = service.as_ref().map(|s| s.to_string()).unwrap_or_default();
        let fail = |outcome: &'static str, tcp: TcpStream| {
            m.counter(CAPTURED, &[("outcome", outcome)]).increment(1);
            let mut a = event(&name);
            a.refused_for(outcome, false);
            a.emit();
            relay::abort(tcp);
        };
        let Some(service) = service else { return fail("unknown_vip", tcp) };
        if table.ports.get(&service) != Some(&dst.port()) {
            return fail("unknown_port", tcp);
        }
        let Some(mut requests) = self.0.session.borrow().clone() else { return fail("gateway_down", tcp) };
        let _ = tcp.set_nodelay(true);
        let req = http::Request::connect(format!("{service}:{}", dst.port()))
            .header(ORIGINAL_DST, dst.to_string())
            .header(SOURCE_ADDRESS, src.to_string())
            .header(TRACEPARENT, trace.to_string())
            .body(());
        let Ok(req) = req else { return fail("bad_request", tcp) };
        let early = relay::read_early(&tcp);
        let attempt = async {
            let mut s = requests.send_request(req).await.map_err(|_| "gateway_error")?;
            if !early.is_empty() {
                crate::transport::h3q::send_data_zero_copy(&early, s.send_data(early.clone()))
                    .await
                    .map_err(|_| "gateway_error")?;
            }
            let resp = s.recv_response().await.map_err(|_| "gateway_error")?;
            if resp.status() != http::StatusCode::OK {
                let e = resp.headers().get(ERROR).and_then(|v| v.to_str().ok()).and_then(FlowError::parse);
                return Err(e.map(FlowError::as_str).unwrap_or("refused"));
            }
            Ok(s.split())
        };
        // Waiting for the gateway's answer ends early if the gateway falls silent meanwhile.
        let mut session = self.0.session.subscribe();
        let gone = async move {
            let _ = session.wait_for(Option::is_none).await;
        };
        let answered = tokio::time::timeout(self.0.cfg.timing.flow_timeout, Box::pin(attempt));
        let (tx, rx) = tokio::select! {
            r = answered => match r {
                Ok(Ok(x)) => x,
                Ok(Err(why)) => return fail(why, tcp),
                Err(_) => return fail("timeout", tcp),
            },
            _ = gone => return fail("gateway_down", tcp),
        };
        let counters = Counters {
            up: m.counter(FLOW_BYTES, &[("service", service.as_str()), ("zone", "redirect"), ("direction", "up")]),
            down: m.counter(FLOW_BYTES, &[("service", service.as_str()), ("zone", "redirect"), ("direction", "down")]),
        };
        counters.up.increment(early.len() as u64);
        let (cs, ck) = relay::tcp(tcp);
        let (outcome, up, down) = Box::pin(relay::relay_owned(cs, ck, rx, tx, counters)).await;
        let up = up + early.len() as u64;
        m.counter(CAPTURED, &[("outcome", outcome.as_str())]).increment(1);
        let mut a = event(service.as_str());
        (a.bytes_up, a.bytes_down, a.attempts) = (up, down, 1);
        (a.outcome, a.side) = outcome.access();
        a.emit();
    }
}
