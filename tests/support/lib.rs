//! Test support: in-process meshes of gateways on loopback with a throwaway CA, gateway processes,
//! a rogue peer that speaks the overlay's protocols by hand, metric parsing, and waits on events.
//!
//! It does NOT sleep to wait for something: [`eventually`] polls a condition with a deadline.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use causeway::demo::{free_udp_port, GatewaySpec, Pki};
use causeway::Gateway;
use causeway_protocol::Identity;

pub use causeway::certs::Validity;
pub use causeway::demo::{echo_flow, echo_server};

pub mod impair;
pub mod k8s;
pub mod netns;
pub mod prometheus;
pub mod rogue;
pub mod sim;
pub mod web;

pub const TRUST_DOMAIN: &str = "test.causeway";

static ERRORS: AtomicUsize = AtomicUsize::new(0);

/// Counts ERROR events: a happy-path test asserts there were none.
struct ErrorCounter;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ErrorCounter {
    fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *e.metadata().level() == tracing::Level::ERROR {
            ERRORS.fetch_add(1, Ordering::Relaxed);
        }
        if *e.metadata().level() == tracing::Level::WARN {
            let mut line = AccessLine::default();
            e.record(&mut line);
            let mut log = WARNINGS.lock().unwrap_or_else(|p| p.into_inner());
            if log.len() < 10_000 {
                log.push(line);
            }
        }
        if matches!(e.metadata().target(), "causeway::access" | "causeway::audit") {
            let mut line = AccessLine::default();
            e.record(&mut line);
            let mut log = ACCESS.lock().unwrap_or_else(|p| p.into_inner());
            if log.len() < 100_000 {
                log.push(line);
            }
        }
    }
}

/// One access-log event (`causeway::access`) of the gateways in this test binary, field by field.
#[derive(Debug, Default, Clone)]
pub struct AccessLine(pub std::collections::BTreeMap<String, String>);

impl AccessLine {
    pub fn get(&self, field: &str) -> &str {
        self.0.get(field).map(String::as_str).unwrap_or("")
    }
}

impl tracing::field::Visit for AccessLine {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

static ACCESS: std::sync::Mutex<Vec<AccessLine>> = std::sync::Mutex::new(Vec::new());
static WARNINGS: std::sync::Mutex<Vec<AccessLine>> = std::sync::Mutex::new(Vec::new());

/// WARN events logged so far in this test binary (at most 10,000), field by field (`message`…).
pub fn warnings() -> Vec<AccessLine> {
    WARNINGS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The access-log events written so far by the gateways in this test binary (at most 100,000).
pub fn access_log() -> Vec<AccessLine> {
    ACCESS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Waits (up to 5 s) until `n` access-log lines hold `pred`, and returns them. An HTTP request's
/// line is written when its response body ends, a moment after the client may have it all.
pub async fn access_lines(n: usize, pred: impl Fn(&AccessLine) -> bool) -> Vec<AccessLine> {
    let matching = || access_log().into_iter().filter(|l| pred(l)).collect::<Vec<_>>();
    eventually(Duration::from_secs(5), || matching().len() >= n).await;
    matching()
}

/// Installs logging for a test binary (once) and raises the open-file limit to its hard maximum,
/// since a thousand loopback flows hold four descriptors each in one process.
pub fn init() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,causeway::access=off,causeway::audit=off"));
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_test_writer().with_filter(filter))
        .with(ErrorCounter)
        // Exports nothing unless a gateway of this binary configures `tracing.otlp` (`observability.rs`).
        .with(
            causeway::telemetry::otlp::SpanLayer::new().with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("causeway::access", tracing::Level::INFO)
                    .with_target("causeway::trace", tracing::Level::DEBUG),
            ),
        )
        .try_init();
    raise_fd_limit();
}

use tracing_subscriber::Layer as _;

#[allow(unsafe_code)]
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// ERROR events logged so far in this test binary.
pub fn error_logs() -> usize {
    ERRORS.load(Ordering::Relaxed)
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of one sample in Prometheus text: `name{labels}` where every `k="v"` in `labels` matches.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            continue;
        }
        if labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))) {
            *total.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    total
}

/// One zone of a test mesh.
pub struct ZoneSpec {
    pub zone: &'static str,
    /// (service, endpoints)
    pub exports: Vec<(&'static str, Vec<SocketAddr>)>,
    /// (service, preferred zones)
    pub imports: Vec<(&'static str, Vec<&'static str>)>,
}

/// Gateways of several zones on loopback, each peered with every other.
pub struct TestMesh {
    pub pki: Pki,
    pub ids: Vec<Identity>,
    pub addrs: Vec<SocketAddr>,
    pub specs: Vec<GatewaySpec>,
    pub gateways: Vec<Option<Gateway>>,
}

pub const SERVICE_PORT: u16 = 8080;

impl TestMesh {
    /// Renders configurations for `zones` (full mesh, every gateway knowing every address). A zone
    /// listed again is another gateway of it (`gw-2`, …).
    pub fn plan(zones: Vec<ZoneSpec>, extra: &str) -> anyhow::Result<Self> {
        let pki = Pki::new(TRUST_DOMAIN)?;
        let names: Vec<String> = (0..zones.len())
            .map(|i| format!("gw-{}", 1 + zones[..i].iter().filter(|z| z.zone == zones[i].zone).count()))
            .collect();
        let ids: Vec<_> = zones.iter().zip(&names).map(|(z, g)| pki.identity(z.zone, g)).collect();
        let addrs: Vec<SocketAddr> = zones
            .iter()
            .map(|_| free_udp_port().map(|p| SocketAddr::from(([127, 0, 0, 1], p))))
            .collect::<Result<_, _>>()?;
        let mut specs = Vec::new();
        for (i, z) in zones.iter().enumerate() {
            let file = if names[i] == "gw-1" { z.zone.to_string() } else { format!("{}-{}", z.zone, names[i]) };
            let tls = pki.issue(&file, &ids[i], Validity::for_duration(Duration::from_secs(3600)))?;
            let peers = (0..zones.len())
                .filter(|j| *j != i)
                .map(|j| (ids[j].clone(), Some(addrs[j].to_string()), zones[j].zone.to_string()))
                .collect();
            specs.push(GatewaySpec {
                zone: z.zone.into(),
                gateway: names[i].clone(),
                trust_domain: TRUST_DOMAIN.into(),
                tls,
                overlay: addrs[i],
                admin: Some("127.0.0.1:0".parse()?),
                peers,
                exports: z.exports.iter().map(|(s, e)| (s.to_string(), SERVICE_PORT, e.clone())).collect(),
                imports: z
                    .imports
                    .iter()
                    .map(|(s, p)| {
                        (
                            s.to_string(),
                            SocketAddr::from(([127, 0, 0, 1], 0)),
                            p.iter().map(|x| x.to_string()).collect(),
                        )
                    })
                    .collect(),
                extra: extra.to_string(),
            });
        }
        Ok(Self { pki, ids, addrs, gateways: specs.iter().map(|_| None).collect(), specs })
    }

    /// Starts every planned gateway in this process.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.specs.len() {
            self.start(i).await?;
        }
        Ok(())
    }

    pub async fn start(&mut self, i: usize) -> anyhow::Result<()> {
        self.gateways[i] = Some(self.specs[i].start(&self.pki.dir).await?);
        Ok(())
    }

    pub fn gw(&self, i: usize) -> &Gateway {
        self.gateways[i].as_ref().expect("gateway started")
    }

    /// Waits until gateway `i` routes `service` to `n` candidates.
    pub async fn wait_routes(&self, i: usize, service: &str, n: usize) -> bool {
        let gw = self.gw(i);
        eventually(Duration::from_secs(10), || {
            let s = causeway::admin::services_json(&gw.mesh);
            s["services"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["name"] == service)
                .is_some_and(|x| x["route_order"].as_array().map(|a| a.len()) == Some(n))
        })
        .await
    }

    /// Writes the YAML of gateway `i` and returns its path (for running it as a process).
    pub fn write_config(&self, i: usize) -> anyhow::Result<PathBuf> {
        let s = &self.specs[i];
        let path = self.pki.dir.join(format!("{}-process.yaml", s.zone));
        std::fs::write(&path, s.yaml()).context("write config")?;
        Ok(path)
    }

    pub async fn shutdown(mut self) {
        for g in self.gateways.iter_mut().filter_map(Option::take) {
            g.shutdown().await;
        }
    }
}

/// The `causeway` binary built alongside the tests (`target/<profile>/causeway`).
pub fn causeway_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/causeway
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join("causeway")
}

/// A deterministic pseudo-random payload (xorshift), so corruption anywhere shows up.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().to_vec()
}

/// Zone a imports `echo.test`, zone b exports it (an echo service answering with banner "b"); both
/// started, routes learned. Returns the mesh and a's local listener for `echo.test`.
pub async fn echo_pair() -> (TestMesh, SocketAddr) {
    let mut m = echo_pair_plan().await;
    m.start_all().await.expect("start");
    assert!(m.wait_routes(0, "echo.test", 1).await, "zone a never learned echo.test");
    let listen = m.gw(0).import_addr("echo.test").expect("listener");
    (m, listen)
}

/// The mesh of [`echo_pair`], planned but not started (tests adjust peers or timing first).
pub async fn echo_pair_plan() -> TestMesh {
    init();
    let (echo, _) = echo_server("b".into()).await.expect("echo server");
    TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![("echo.test", vec![])] },
            ZoneSpec { zone: "b", exports: vec![("echo.test", vec![echo])], imports: vec![] },
        ],
        "",
    )
    .expect("plan")
}

/// [`echo_three_zones`] with b as a real process (signals, kill -9) and a and c in this process;
/// returns once a routes `echo.test` to both. Returns the mesh, b, and a's listener.
pub async fn three_zones_with_b_process() -> (TestMesh, GatewayProcess, SocketAddr) {
    let mut m = echo_three_zones().await;
    let b = GatewayProcess::spawn(&m, 1, "warn");
    m.start(0).await.expect("start a");
    m.start(2).await.expect("start c");
    assert!(m.wait_routes(0, "echo.test", 2).await, "a never learned echo.test from both zones");
    let listen = m.gw(0).import_addr("echo.test").expect("listener");
    (m, b, listen)
}

/// Checks that an open echo flow still answers ("two") and then ends cleanly after our FIN.
pub async fn open_flow_echoes_then_ends(open: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    open.write_all(b"two").await.expect("write");
    let mut two = [0u8; 3];
    open.read_exact(&mut two).await.expect("echo");
    assert_eq!(&two, b"two");
    open.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.expect("clean end");
    assert!(rest.is_empty());
}

/// A gateway running as a process (the `causeway` binary), killed when dropped.
pub struct GatewayProcess(pub std::process::Child);

impl GatewayProcess {
    /// Runs gateway `i` of `m` as a process, its logs discarded below `log_level`.
    pub fn spawn(m: &TestMesh, i: usize, log_level: &str) -> Self {
        let bin = causeway_bin();
        assert!(bin.exists(), "{} is missing: run `cargo build --bins` before the tests", bin.display());
        let cfg = m.write_config(i).expect("config");
        let child = std::process::Command::new(bin)
            .args(["gateway", "--config"])
            .arg(cfg)
            .env("RUST_LOG", log_level)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn causeway gateway");
        Self(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends a signal by name ("STOP", "CONT", "KILL", "TERM").
    pub fn signal(&self, sig: &str) {
        let _ = std::process::Command::new("kill").args([&format!("-{sig}"), &self.0.id().to_string()]).status();
    }

    /// kill -9 and reap.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Zone a imports `echo.test` preferring zone b; b and c export it (echo services answering with
/// banners "b" and "c"). Planned, not started: tests start each zone in-process or as a process.
pub async fn echo_three_zones() -> TestMesh {
    init();
    let (echo_b, _) = echo_server("b".into()).await.expect("echo server");
    let (echo_c, _) = echo_server("c".into()).await.expect("echo server");
    TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![("echo.test", vec!["b"])] },
            ZoneSpec { zone: "b", exports: vec![("echo.test", vec![echo_b])], imports: vec![] },
            ZoneSpec { zone: "c", exports: vec![("echo.test", vec![echo_c])], imports: vec![] },
        ],
        "",
    )
    .expect("plan")
}

/// Like [`echo_pair`], plus a zone c that is configured on b but not started: tests play it by
/// hand (`rogue`). `extra_b` is appended to b's configuration.
pub async fn echo_pair_with_c(extra_b: &str) -> (TestMesh, SocketAddr) {
    init();
    let (echo, _) = echo_server("b".into()).await.expect("echo server");
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![("echo.test", vec![])] },
            ZoneSpec { zone: "b", exports: vec![("echo.test", vec![echo])], imports: vec![] },
            ZoneSpec { zone: "c", exports: vec![], imports: vec![] },
        ],
        "",
    )
    .expect("plan");
    m.specs[1].extra = extra_b.to_string();
    m.start(0).await.expect("start a");
    m.start(1).await.expect("start b");
    assert!(m.wait_routes(0, "echo.test", 1).await, "zone a never learned echo.test");
    let listen = m.gw(0).import_addr("echo.test").expect("listener");
    (m, listen)
}

/// A flow that writes a deterministic 1 KiB chunk every 20 ms until `stop`, then half-closes and
/// checks the whole echo byte for byte. Returns the echo's banner and the bytes sent; `Err` on a
/// reset or any difference.
pub async fn long_flow(
    listen: SocketAddr,
    seed: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<(String, u64), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(listen).await.map_err(|e| e.to_string())?;
    let (mut r, mut w) = s.split();
    let send = async {
        let mut sent = Vec::new();
        let mut i = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let chunk = payload(1024, seed * 1_000_003 + i);
            w.write_all(&chunk).await.map_err(|e| format!("write: {e}"))?;
            sent.extend_from_slice(&chunk);
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        Ok::<_, String>(sent)
    };
    let recv = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(got)
    };
    let (sent, got) = tokio::join!(send, recv);
    let (sent, got) = (sent?, got?);
    let nl = got.iter().position(|b| *b == b'\n').ok_or_else(|| format!("no banner ({} bytes)", got.len()))?;
    if got[nl + 1..] != sent[..] {
        return Err(format!("echo differs: sent {} bytes, got {}", sent.len(), got.len() - nl - 1));
    }
    Ok((String::from_utf8_lossy(&got[..nl]).into_owned(), sent.len() as u64))
}
