//! `causeway-flood`: sends real QUIC Initials (valid version-1 packets, fresh connection IDs, a TLS
//! ClientHello) at a gateway from a chosen address, at a steady rate, as a handshake flood would;
//! it never completes a handshake. Prints how many connection attempts it made.
//!
//! ```text
//! causeway-flood --from 10.99.0.66 --to 10.99.0.2:4433 --count 10000 --rate 2000
//! ```

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
#[command(name = "causeway-flood", about = "Sends QUIC Initials (connection attempts) at an address")]
struct Cli {
    /// Source address to send from.
    #[arg(long)]
    from: IpAddr,
    /// Where to send.
    #[arg(long)]
    to: SocketAddr,
    #[arg(long, default_value_t = 10_000)]
    count: u32,
    /// Connection attempts per second.
    #[arg(long, default_value_t = 2_000)]
    rate: u32,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(flood(cli))
}

async fn flood(cli: Cli) -> anyhow::Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // One Initial per attempt: no retransmission within the attempt's short life.
    transport.initial_rtt(Duration::from_secs(5));
    client.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::client(SocketAddr::new(cli.from, 0))?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(cli.rate.max(1))));
    let mut attempts = 0u32;
    for _ in 0..cli.count {
        tick.tick().await;
        let connecting = endpoint.connect_with(client.clone(), cli.to, "gateway.causeway.invalid")?;
        attempts += 1;
        // Held briefly so its Initial goes out; then abandoned.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_millis(300), connecting).await;
        });
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    println!("{attempts}");
    Ok(())
}
