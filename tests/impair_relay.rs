//! `causeway-impair`: the tests' impairment relay as a program, to stand between gateways in
//! different network namespaces (or hosts). Both directions get the same impairments; it prints
//! what it did, one JSON line a second, until killed.
//!
//! ```text
//! causeway-impair --listen 10.99.0.1:4433 --target 10.98.0.2:4433 --delay-ms 25 --loss 0.01
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use causeway_tests::impair::{Impairment, Relay};
use clap::Parser;

#[derive(Parser)]
#[command(name = "causeway-impair", about = "A seeded UDP relay that delays, reorders, drops, duplicates and corrupts")]
struct Cli {
    /// Address clients send to.
    #[arg(long)]
    listen: SocketAddr,
    /// Where packets go.
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Extra delay, uniform in [0, jitter]: packets overtake each other.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Probability that a loss event starts at a packet.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Packets dropped per loss event.
    #[arg(long, default_value_t = 1)]
    burst: u32,
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    #[arg(long, default_value_t = 0.0)]
    corrupt: f64,
    /// Every PERIOD ms, drop everything for DURATION ms: `--blackhole 5000,2000`.
    #[arg(long, value_delimiter = ',', num_args = 2)]
    blackhole: Vec<u64>,
    /// Larger datagrams are dropped.
    #[arg(long)]
    mtu: Option<usize>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let ms = Duration::from_millis;
    let imp = Impairment {
        delay: ms(cli.delay_ms),
        jitter: ms(cli.jitter_ms),
        loss: cli.loss,
        burst: cli.burst.max(1),
        duplicate: cli.duplicate,
        corrupt: cli.corrupt,
        blackhole: (cli.blackhole.len() == 2).then(|| (ms(cli.blackhole[0]), ms(cli.blackhole[1]))),
        mtu: cli.mtu,
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("causeway-impair: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let relay = match Relay::start_on(cli.listen, cli.target, imp.clone(), imp, cli.seed).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("causeway-impair: cannot listen on {}: {e}", cli.listen);
                return std::process::ExitCode::from(2);
            }
        };
        eprintln!("causeway-impair: {} -> {}", relay.addr, cli.target);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let dir = |s: &causeway_tests::impair::Stats| {
                let (forwarded, dropped, duplicated, corrupted) = s.get();
                serde_json::json!({ "forwarded": forwarded, "dropped": dropped, "duplicated": duplicated, "corrupted": corrupted })
            };
            println!("{}", serde_json::json!({ "up": dir(&relay.up), "down": dir(&relay.down) }));
        }
    })
}
