//! A peer that speaks the overlay by hand, to send what a real gateway never would.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use causeway::demo::Pki;
use causeway_overlay::metrics::Metrics;
use causeway_overlay::transport::h3q;
use causeway_overlay::transport::tls::TlsFactory;
use causeway_overlay::transport::{self, Timers};
use causeway_overlay::{Credentials, TrustBundle};
use causeway_protocol::flow::CONTROL_AUTHORITY;
use causeway_protocol::Identity;

/// Credentials for `id` issued by `issuer` with `validity`, and a bundle trusting `trust`'s CA.
pub fn credentials(
    issuer: &Pki,
    id: &Identity,
    validity: crate::Validity,
    trust: &Pki,
) -> anyhow::Result<(Credentials, TrustBundle)> {
    let leaf = causeway::certs::issue(&issuer.ca, id, validity)?;
    let chain = format!("{}{}", leaf.cert_pem, issuer.ca.cert_pem);
    let creds = causeway::certs::credentials_from_pem(chain.as_bytes(), leaf.key_pem.as_bytes())?;
    let bundle = causeway::certs::bundle_from_pem(trust.ca.cert_pem.as_bytes())?;
    Ok((creds, bundle))
}

/// Dials `target` expecting it to be `server`. Returns the connection once the handshake completes
/// on our side (the server may still refuse our certificate right after).
pub async fn dial(
    creds: Credentials,
    bundle: TrustBundle,
    server: &Identity,
    target: SocketAddr,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    dial_from("127.0.0.1:0".parse()?, creds, bundle, server, target).await
}

/// Like [`dial`], from a chosen local address (any 127.0.0.0/8 address works on loopback).
pub async fn dial_from(
    bind: SocketAddr,
    creds: Credentials,
    bundle: TrustBundle,
    server: &Identity,
    target: SocketAddr,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let tls = TlsFactory::new(creds, bundle, Metrics::noop())?.client(server.clone())?;
    let cfg = transport::client_config(tls, Timers::default(), transport::QuicLimits::default())?;
    let endpoint = quinn::Endpoint::client(bind)?;
    let conn = tokio::time::timeout(Duration::from_secs(5), endpoint.connect_with(cfg, target, "gateway")?).await??;
    Ok((endpoint, conn))
}

/// The control stream of a hand-made session, opened as a real dialing gateway would.
pub struct Control {
    pub stream: h3::client::RequestStream<h3q::BidiStream, Bytes>,
    pub requests: h3::client::SendRequest<h3q::Opener, Bytes>,
}

/// An HTTP/3 client session on `conn`, as a dialing gateway or a redirector opens one.
pub async fn h3_client(conn: &quinn::Connection) -> anyhow::Result<h3::client::SendRequest<h3q::Opener, Bytes>> {
    let (client, _server, demux) = h3q::split(conn, true, metrics::Counter::noop());
    tokio::spawn(demux);
    let (mut driver, requests) = h3::client::builder().build::<_, _, Bytes>(client).await?;
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    Ok(requests)
}

pub async fn open_control(conn: &quinn::Connection) -> anyhow::Result<Control> {
    let mut requests = h3_client(conn).await?;
    let mut stream = requests.send_request(http::Request::connect(CONTROL_AUTHORITY).body(())?).await?;
    let resp = stream.recv_response().await?;
    anyhow::ensure!(resp.status() == 200, "control stream refused: {}", resp.status());
    Ok(Control { stream, requests })
}

/// Waits for the connection to close and returns the application error code and reason it was
/// closed with, if it was closed by the peer with one.
pub async fn close_code(conn: &quinn::Connection, timeout: Duration) -> Option<(u64, String)> {
    match tokio::time::timeout(timeout, conn.closed()).await.ok()? {
        quinn::ConnectionError::ApplicationClosed(c) => {
            Some((c.error_code.into_inner(), String::from_utf8_lossy(&c.reason).into_owned()))
        }
        quinn::ConnectionError::ConnectionClosed(c) => {
            Some((u64::from(c.error_code), String::from_utf8_lossy(&c.reason).into_owned()))
        }
        _ => None,
    }
}
