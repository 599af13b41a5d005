//! The "raw quinn" arm: the QUIC ceiling. A TCP listener on one side, one QUIC connection between
//! the two processes, one bidirectional stream per TCP connection with no header at all, and a fixed
//! TCP target on the far side. Same transport configuration and same TLS (mutual, SPIFFE-checked,
//! ECDSA P-256, TLS 1.3) as the overlay, so the gap between this arm and Causeway is what the
//! HTTP/3 layer, routing and accounting cost.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use causeway_overlay::flow::relay::{self, ByteSink, ByteSource};
use causeway_overlay::transport::tls::{AllowedSet, TlsFactory};
use causeway_overlay::transport::{self, Timers};
use causeway_protocol::Identity;
use tokio::net::{TcpListener, TcpStream};

fn factory(cert: &Path, key: &Path, bundle: &Path) -> anyhow::Result<TlsFactory> {
    let creds = causeway::certs::credentials_from_pem(&std::fs::read(cert)?, &std::fs::read(key)?)?;
    let bundle = causeway::certs::bundle_from_pem(&std::fs::read(bundle)?)?;
    Ok(TlsFactory::new(creds, bundle, causeway_overlay::metrics::Metrics::noop())?)
}

/// The far side: accepts QUIC from `peer` and connects each stream to `forward`.
pub async fn server(
    listen: SocketAddr,
    forward: SocketAddr,
    tls: (&Path, &Path, &Path),
    peer: Identity,
) -> anyhow::Result<()> {
    let f = factory(tls.0, tls.1, tls.2)?;
    let allowed = Arc::new(RwLock::new(AllowedSet { peers: [peer].into_iter().collect(), ..Default::default() }));
    let server = transport::server_config(f.server(allowed)?, Timers::default(), transport::QuicLimits::default())?;
    let endpoint = transport::bind(listen, server)?;
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(async move {
                    if let Ok(tcp) = TcpStream::connect(forward).await {
                        splice(tcp, send, recv).await;
                    }
                });
            }
        });
    }
    Ok(())
}

/// The near side: one QUIC connection to `peer_addr`, a stream for every TCP connection on `listen`.
pub async fn client(
    listen: SocketAddr,
    peer_addr: SocketAddr,
    tls: (&Path, &Path, &Path),
    peer: Identity,
) -> anyhow::Result<()> {
    let f = factory(tls.0, tls.1, tls.2)?;
    let client = transport::client_config(f.client(peer)?, Timers::default(), transport::QuicLimits::default())?;
    let server =
        transport::server_config(f.server(Arc::default())?, Timers::default(), transport::QuicLimits::default())?;
    let bind: SocketAddr = if peer_addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let endpoint = transport::bind(bind, server)?;
    let dial = || async {
        let c = endpoint.connect_with(client.clone(), peer_addr, "peer.invalid")?.await.context("QUIC handshake")?;
        anyhow::Ok(c)
    };
    let mut conn = dial().await?;
    let l = TcpListener::bind(listen).await?;
    loop {
        let (tcp, _) = l.accept().await?;
        // Like a gateway, re-dial a connection that ended (an idle timeout while starved of CPU).
        if let Some(reason) = conn.close_reason() {
            eprintln!("quic-client: connection closed ({reason}); dialing again");
            conn = dial().await?;
        }
        let conn = conn.clone();
        tokio::spawn(async move {
            match conn.open_bi().await {
                Ok((send, recv)) => splice(tcp, send, recv).await,
                Err(e) => eprintln!("quic-client: open stream: {e}"),
            }
        });
    }
}

/// Copies both ways until both directions end, with the gateway's own TCP halves (adaptive reads,
/// batched writev) so only the QUIC/HTTP/3 layer differs between this arm and Causeway.
async fn splice(tcp: TcpStream, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let _ = tcp.set_nodelay(true);
    let (mut src, mut sink) = relay::tcp(tcp);
    let up = async move {
        while let Ok(Some(chunk)) = src.recv().await {
            if send.write_chunk(chunk).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
        let _ = send.stopped().await;
    };
    let down = async move {
        let mut chunks: Vec<bytes::Bytes> = vec![bytes::Bytes::new(); 64];
        while let Ok(Some(n)) = recv.read_chunks(&mut chunks).await {
            let mut batch: Vec<bytes::Bytes> = chunks[..n].iter_mut().map(std::mem::take).collect();
            if sink.send_batch(&mut batch).await.is_err() {
                return;
            }
        }
        let _ = sink.finish().await;
    };
    tokio::join!(up, down);
}
