//! `causeway demo`: three zones on loopback in one process, a throwaway CA, echo services in two
//! zones, cross-zone traffic, then the serving zone's gateway stopped and traffic failing over.
//!
//! The pieces ([`Pki`], [`echo_server`], [`echo_flow`], [`GatewaySpec`]) are public because the
//! integration tests build their meshes the same way.

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use causeway_protocol::{Identity, TrustDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::app::{load_tls, Gateway};
use crate::certs::{self, Ca, Validity};

/// A throwaway CA writing certificates into a temporary directory (removed on drop).
pub struct Pki {
    pub dir: PathBuf,
    pub ca: Ca,
}

impl Pki {
    pub fn new(trust_domain: &str) -> anyhow::Result<Self> {
        let td = TrustDomain::new(trust_domain)?;
        let dir = std::env::temp_dir().join(format!("causeway-{}-{:x}", std::process::id(), rand_u64()));
        std::fs::create_dir_all(&dir)?;
        let ca = certs::new_ca(&td, Validity::for_duration(Duration::from_secs(86_400)))?;
        std::fs::write(dir.join(certs::CA_CERT), &ca.cert_pem)?;
        Ok(Self { dir, ca })
    }

    pub fn identity(&self, zone: &str, gateway: &str) -> Identity {
        Identity::parse(&format!("spiffe://{}/zone/{zone}/gateway/{gateway}", self.ca.trust_domain))
            .unwrap_or_else(|e| unreachable!("zone and gateway names form a valid SPIFFE ID: {e}"))
    }

    /// Issues a certificate for `id` with `validity` and writes `<name>.crt`/`<name>.key`; returns
    /// (cert, key, bundle) paths.
    pub fn issue(&self, name: &str, id: &Identity, validity: Validity) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
        let leaf = certs::issue(&self.ca, id, validity)?;
        let cert = self.dir.join(format!("{name}.crt"));
        let key = self.dir.join(format!("{name}.key"));
        std::fs::write(&cert, format!("{}{}", leaf.cert_pem, self.ca.cert_pem))?;
        std::fs::write(&key, leaf.key_pem)?;
        Ok((cert, key, self.dir.join(certs::CA_CERT)))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// A loopback UDP port that was free a moment ago (for configurations that must name peers' ports
/// before those peers start).
pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A TCP echo service: writes `banner` and a newline, then echoes everything until the client's FIN.
pub async fn echo_server(banner: String) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let l = crate::listeners::listen(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let banner = banner.clone();
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                if s.write_all(format!("{banner}\n").as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    Ok((addr, task))
}

/// One flow through a gateway listener to an echo service: sends `payload`, half-closes, reads the
/// banner and the echo, and checks every byte. Returns the banner and the flow's duration.
pub async fn echo_flow(addr: SocketAddr, payload: &[u8]) -> anyhow::Result<(String, Duration)> {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await.context("connect")?;
    let _ = s.set_nodelay(true);
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(payload).await?;
        w.shutdown().await
    };
    let read = async {
        let mut buf = Vec::with_capacity(payload.len() + 64);
        r.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let (wr, rd) = tokio::join!(write, read);
    let buf = rd.context("read")?;
    wr.context("write")?;
    let Some(nl) = buf.iter().position(|b| *b == b'\n') else { bail!("no banner: the flow was reset or empty") };
    let banner = String::from_utf8_lossy(&buf[..nl]).into_owned();
    if &buf[nl + 1..] != payload {
        bail!("echo mismatch: sent {} bytes, got {} back", payload.len(), buf.len() - nl - 1);
    }
    Ok((banner, start.elapsed()))
}

/// The configuration of one gateway, rendered as YAML so the real parser reads it.
pub struct GatewaySpec {
    pub zone: String,
    pub gateway: String,
    pub trust_domain: String,
    pub tls: (PathBuf, PathBuf, PathBuf),
    pub overlay: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// (SPIFFE ID, address as IP:port or host:port, zone)
    pub peers: Vec<(Identity, Option<String>, String)>,
    /// (service, port, endpoints)
    pub exports: Vec<(String, u16, Vec<SocketAddr>)>,
    /// (service, listen, preferred zones)
    pub imports: Vec<(String, SocketAddr, Vec<String>)>,
    /// Extra YAML appended verbatim (e.g. a `timing:` block).
    pub extra: String,
}

impl GatewaySpec {
    pub fn yaml(&self) -> String {
        let p = |p: &Path| p.display().to_string();
        let mut y = String::new();
        let _ = writeln!(y, "zone: {}\ngateway: {}\ntrust_domain: {}", self.zone, self.gateway, self.trust_domain);
        let _ = writeln!(
            y,
            "tls: {{ cert: \"{}\", key: \"{}\", bundle: \"{}\" }}",
            p(&self.tls.0),
            p(&self.tls.1),
            p(&self.tls.2)
        );
        let _ = write!(y, "listen: {{ overlay: \"{}\"", self.overlay);
        if let Some(a) = self.admin {
            let _ = write!(y, ", admin: \"{a}\"");
        }
        y.push_str(" }\npeers:\n");
        for (id, addr, zone) in &self.peers {
            let _ = write!(y, "  - {{ id: \"{id}\", zone: {zone}");
            if let Some(a) = addr {
                let _ = write!(y, ", address: \"{a}\"");
            }
            y.push_str(" }\n");
        }
        y.push_str("exports:\n");
        for (name, port, eps) in &self.exports {
            let eps: Vec<String> = eps.iter().map(|e| format!("\"{e}\"")).collect();
            let _ = writeln!(y, "  - {{ name: {name}, port: {port}, endpoints: [{}] }}", eps.join(", "));
        }
        y.push_str("imports:\n");
        for (svc, listen, prefs) in &self.imports {
            let _ = writeln!(y, "  - {{ service: {svc}, listen: \"{listen}\", prefer_zones: [{}] }}", prefs.join(", "));
        }
        y.push_str(&self.extra);
        y
    }

    /// Writes the YAML next to the certificates and starts a gateway in this process.
    pub async fn start(&self, dir: &Path) -> anyhow::Result<Gateway> {
        let path = dir.join(format!("{}-{}.yaml", self.zone, self.gateway));
        std::fs::write(&path, self.yaml())?;
        let cfg = crate::config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (creds, bundle) = load_tls(&cfg).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Gateway::start(&cfg, creds, bundle).await
    }
}

struct Phase {
    name: &'static str,
    ok: usize,
    failed: usize,
    bytes: usize,
    latencies: Vec<Duration>,
    zones: std::collections::BTreeMap<String, usize>,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn run_phase(name: &'static str, addr: SocketAddr, flows: usize, bytes: usize) -> Phase {
    let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let payload = std::sync::Arc::new(payload);
    let mut ph = Phase { name, ok: 0, failed: 0, bytes: 0, latencies: vec![], zones: Default::default() };
    // 16 flows at a time.
    for chunk in (0..flows).collect::<Vec<_>>().chunks(16) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|_| {
                let p = payload.clone();
                tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(10), echo_flow(addr, &p)).await })
            })
            .collect();
        for t in tasks {
            match t.await {
                Ok(Ok(Ok((banner, d)))) => {
                    ph.ok += 1;
                    ph.bytes += 2 * bytes;
                    ph.latencies.push(d);
                    *ph.zones.entry(banner).or_default() += 1;
                }
                _ => ph.failed += 1,
            }
        }
    }
    ph.latencies.sort();
    ph
}

/// Waits until `cond` holds, checking every 20 ms, for at most `timeout`.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Runs the demo; returns whether every check passed.
pub async fn run(flows: usize, bytes: usize) -> anyhow::Result<bool> {
    let td = "demo.causeway";
    let pki = Pki::new(td)?;
    let zones = ["eu", "us", "ap"];
    let ports: Vec<u16> = zones.iter().map(|_| free_udp_port()).collect::<Result<_, _>>()?;
    let ids: Vec<Identity> = zones.iter().map(|z| pki.identity(z, "gw-1")).collect();
    let (us_echo, _t1) = echo_server("served by zone us".into()).await?;
    let (ap_echo, _t2) = echo_server("served by zone ap".into()).await?;
    let (ap_cat, _t3) = echo_server("catalog served by zone ap".into()).await?;
    let mut gws = Vec::new();
    println!("causeway demo: three zones (eu, us, ap) on loopback, mutual TLS with a throwaway CA ({td})");
    for (i, zone) in zones.iter().enumerate() {
        let tls = pki.issue(zone, &ids[i], Validity::for_duration(Duration::from_secs(3600)))?;
        let peers = (0..zones.len())
            .filter(|j| *j != i)
            .map(|j| (ids[j].clone(), Some(format!("127.0.0.1:{}", ports[j])), zones[j].to_string()))
            .collect();
        let exports = match *zone {
            "us" => vec![("orders.shop".to_string(), 8080, vec![us_echo])],
            "ap" => {
                vec![("orders.shop".to_string(), 8080, vec![ap_echo]), ("catalog.shop".to_string(), 8080, vec![ap_cat])]
            }
            _ => vec![],
        };
        let imports = match *zone {
            "eu" => vec![
                ("orders.shop".to_string(), "127.0.0.1:0".parse()?, vec!["us".to_string()]),
                ("catalog.shop".to_string(), "127.0.0.1:0".parse()?, vec![]),
            ],
            _ => vec![],
        };
        let spec = GatewaySpec {
            zone: zone.to_string(),
            gateway: "gw-1".into(),
            trust_domain: td.into(),
            tls,
            overlay: SocketAddr::from(([127, 0, 0, 1], ports[i])),
            admin: None,
            peers,
            exports,
            imports,
            extra: String::new(),
        };
        gws.push(Some(spec.start(&pki.dir).await?));
    }
    let eu = gws[0].take().context("eu gateway")?;
    let orders = eu.import_addr("orders.shop").context("orders listener")?;
    let catalog = eu.import_addr("catalog.shop").context("catalog listener")?;
    let orders_svc = causeway_protocol::ServiceName::new("orders.shop")?;
    let catalog_svc = causeway_protocol::ServiceName::new("catalog.shop")?;
    let t0 = Instant::now();
    let meshed = wait_until(Duration::from_secs(10), || {
        let s = crate::admin::services_json(&eu.mesh);
        let routes = |name: &str| {
            s["services"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["name"] == name)
                .map(|x| x["route_order"].as_array().map(|a| a.len()).unwrap_or(0))
                .unwrap_or(0)
        };
        routes(orders_svc.as_str()) == 2 && routes(catalog_svc.as_str()) == 1
    })
    .await;
    if !meshed {
        bail!("the zones did not peer within 10 s: {}", crate::admin::peers_json(&eu.mesh));
    }
    println!(
        "mesh up in {:.0} ms: eu peers with us and ap; orders.shop is in us (preferred) and ap, catalog.shop in ap\n",
        t0.elapsed().as_secs_f64() * 1000.0
    );

    let mut phases = vec![
        run_phase("orders.shop", orders, flows, bytes).await,
        run_phase("catalog.shop", catalog, flows / 4, bytes).await,
    ];

    println!("stopping zone us's gateway (it serves orders.shop for eu)...");
    let us = gws[1].take().context("us gateway")?;
    let stopped = Instant::now();
    us.shutdown().await;
    let payload = vec![7u8; 1024];
    let failover = loop {
        if let Ok(Ok((banner, _))) = tokio::time::timeout(Duration::from_secs(2), echo_flow(orders, &payload)).await {
            if banner.contains("zone ap") {
                break Some(stopped.elapsed());
            }
        }
        if stopped.elapsed() > Duration::from_secs(10) {
            break None;
        }
    };
    phases.push(run_phase("orders.shop after failover", orders, flows, bytes).await);

    println!("\n{:<28} {:>6} {:>6} {:>10} {:>9} {:>9}  served by", "phase", "ok", "failed", "MiB", "p50 ms", "p99 ms");
    let mut all_ok = true;
    for ph in &phases {
        let zones: Vec<String> = ph
            .zones
            .iter()
            .map(|(b, n)| {
                format!("{} ×{n}", b.trim_start_matches("served by ").trim_start_matches("catalog served by "))
            })
            .collect();
        println!(
            "{:<28} {:>6} {:>6} {:>10.1} {:>9.2} {:>9.2}  {}",
            ph.name,
            ph.ok,
            ph.failed,
            ph.bytes as f64 / (1024.0 * 1024.0),
            pct(&ph.latencies, 0.5),
            pct(&ph.latencies, 0.99),
            zones.join(", ")
        );
        all_ok &= ph.failed == 0;
    }
    match failover {
        Some(d) => println!(
            "\nfailover: first new orders.shop flow served by zone ap {:.0} ms after zone us's gateway stopped",
            d.as_secs_f64() * 1000.0
        ),
        None => {
            println!("\nfailover: FAILED, no flow reached zone ap within 10 s");
            all_ok = false;
        }
    }
    let m = eu.metrics_text();
    let opened: f64 = m
        .lines()
        .filter(|l| l.starts_with(causeway_overlay::metrics::FLOWS_OPENED))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    println!(
        "zone eu's gateway counted {opened} flows opened ({} in its /metrics)",
        causeway_overlay::metrics::FLOWS_OPENED
    );
    for g in gws.into_iter().flatten() {
        g.shutdown().await;
    }
    eu.shutdown().await;
    println!("{}", if all_ok { "demo: all checks passed" } else { "demo: some checks FAILED" });
    Ok(all_ok)
}
