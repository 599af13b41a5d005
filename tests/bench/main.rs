//! `causeway-bench`: Causeway side by side with direct TCP, an HAProxy TLS gateway pair and raw
//! quinn, over a veth link between two network namespaces (and over a delay line for the RTT runs).
//!
//! ```text
//!  netns cwb-c (client zone)                               netns cwb-s (server zone)
//!  load generator ─┬─ direct ─────────────── veth 10.77.0.0/24 ──────────────┬─ server :7000 "b"
//!                  ├─ haproxy-a :8100 ══ TLS 1.3 mTLS ══════════ haproxy-b :8443 ┤
//!                  ├─ quic-in   :8200 ══ QUIC (raw streams) ═════ quic-out :8444 ┤
//!                  ├─ gw-a      :8300 ══ QUIC + HTTP/3 CONNECT ══ gw-b    :4433 ┘
//!                  ├─ VIP → redirector → gw-a (the path of an unmodified pod)
//!                  │                                            gw-c :4434 ── server :7001 "c" (failover)
//!                  └─ :8101 / :8201 / :8301 / 10.78.0.2 ── TUN delay line 10.78.0.0/30 (B1r, B4)
//!
//!  HTTP (B11, B4): wrk or new connections ─┬─ direct ─────────────────────────── http server :7080 "b"
//!                                          ├─ haproxy-a :8110/:8111 (mode http) ═ TLS ═ haproxy-b :8453 ┤
//!                                          └─ gw-a :8310 / gw-a2 :8311 (http import) ══ HTTP/3 ══ gw-b ┘
//! ```
//!
//! `causeway-bench run` (root) builds that, runs every measurement with the arms interleaved, and
//! writes a table and JSON. The other subcommands are the pieces it starts in the namespaces.

mod load;
mod quic;
mod report;
mod wire;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use causeway::certs::Validity;
use causeway::demo::{GatewaySpec, Pki};
use causeway_protocol::{Identity, ServiceName};
use causeway_tests::netns::{link, Netns, Proc};
use clap::{Parser, Subcommand};

use report::{Report, Series};

#[derive(Parser)]
#[command(name = "causeway-bench", about = "Side-by-side benchmarks of Causeway against TCP, HAProxy and raw QUIC")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the suite (root: it creates network namespaces).
    Run(Opts),
    /// The backend server.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
    },
    /// The HTTP/1.1 backend server.
    HttpServe {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
    },
    /// Raw quinn arm, far side.
    QuicServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        forward: SocketAddr,
        #[arg(long, num_args = 3)]
        tls: Vec<PathBuf>,
        #[arg(long)]
        peer: String,
    },
    /// Raw quinn arm, near side.
    QuicClient {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, num_args = 3)]
        tls: Vec<PathBuf>,
        #[arg(long)]
        peer: String,
    },
    /// One measurement from the client side; prints one JSON line.
    Load {
        kind: String,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        n: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 2.0)]
        secs: f64,
        /// `ready`: wait until this server answers.
        #[arg(long, default_value = "b")]
        expect: String,
    },
}

#[derive(clap::Args, Clone)]
struct Opts {
    /// Repetitions of every measurement (arms interleaved within each).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Seconds per throughput and latency measurement.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Idle flows for B6.
    #[arg(long, default_value_t = 10_000)]
    idle_flows: usize,
    /// Worker threads per gateway process (1 = a single-threaded runtime, like one HAProxy thread).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// A quick pass that checks the harness works: 1 repetition, short runs, 200 idle flows.
    #[arg(long)]
    smoke: bool,
    /// Only these measurements (comma-separated ids, e.g. B1,B3).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Only these arms (comma-separated: direct, haproxy, quinn, causeway, causeway-redirect).
    #[arg(long, value_delimiter = ',')]
    arms: Vec<String>,
    /// Where the table and JSON go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Run(mut o) => {
            if o.smoke {
                o.reps = 1;
                o.secs = 0.3;
                o.idle_flows = o.idle_flows.min(200);
            }
            run(o)
        }
        other => single_thread(other),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("causeway-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Every piece but the orchestrator runs on one thread, like each HAProxy process.
fn single_thread(cmd: Cmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        match cmd {
            Cmd::Serve { listen, name } => load::serve(listen, name).await,
            Cmd::HttpServe { listen, name } => load::http_serve(listen, name).await,
            Cmd::QuicServer { listen, forward, tls, peer } => {
                quic::server(listen, forward, (&tls[0], &tls[1], &tls[2]), Identity::parse(&peer)?).await
            }
            Cmd::QuicClient { listen, connect, tls, peer } => {
                quic::client(listen, connect, (&tls[0], &tls[1], &tls[2]), Identity::parse(&peer)?).await
            }
            Cmd::Load { kind, addr, n, size, secs, expect } => {
                let dur = Duration::from_secs_f64(secs);
                let v = match kind.as_str() {
                    "bulk" => {
                        let (bytes, s) = load::bulk(addr, dur).await?;
                        serde_json::json!({ "gbps": bytes as f64 * 8.0 / s / 1e9 })
                    }
                    "parallel" => serde_json::to_value(load::parallel(addr, n, dur).await?)?,
                    "rr" => serde_json::to_value(load::rr(addr, size, dur).await?)?,
                    "newflows" => serde_json::to_value(load::new_flows(addr, n, dur).await?)?,
                    "hol" => serde_json::to_value(load::hol(addr, dur).await?)?,
                    "hold" => return load::hold(addr, n).await,
                    "ttfb" => serde_json::to_value(load::first_byte(addr, n, false).await?)?,
                    "ttfb-http" => serde_json::to_value(load::first_byte(addr, n, true).await?)?,
                    "http-ready" => {
                        load::http_ready(addr, dur).await?;
                        serde_json::json!({ "ready": true })
                    }
                    "probe" => return load::probe(addr).await,
                    "ready" => {
                        let end = Instant::now() + dur;
                        loop {
                            match load::whoami(addr, Duration::from_secs(1)).await {
                                Some(name) if name == expect => break serde_json::json!({ "name": name }),
                                _ => {}
                            }
                            if Instant::now() > end {
                                bail!("{addr} did not reach server {expect} within {secs} s");
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    k => bail!("unknown load kind {k}"),
                };
                println!("{v}");
                Ok(())
            }
            Cmd::Run(_) => unreachable!("handled in main"),
        }
    })
}

const TD: &str = "bench.causeway";
const NS_C: &str = "cwb-c";
const NS_S: &str = "cwb-s";
const SERVICE: &str = "bench.svc";
const SERVICE_PORT: u16 = 7000;
/// The HTTP service (B11, B4 HTTP) and its port.
const WEB: &str = "web.svc";
const WEB_PORT: u16 = 7080;

/// The HTTP arms: (name, address over the veth link, address over the delay line).
const HTTP_ARMS: [(&str, &str, &str); 3] = [
    ("direct", "10.77.0.2:7080", "10.78.0.2:7080"),
    ("haproxy", "127.0.0.1:8110", "127.0.0.1:8111"),
    ("causeway", "127.0.0.1:8310", "127.0.0.1:8311"),
];

/// A path from the load generator to the server.
struct Arm {
    name: &'static str,
    /// Where the client connects over the veth link and over the delay line.
    veth: SocketAddr,
    wire: Option<SocketAddr>,
    /// Processes whose memory counts for this arm (B6).
    procs: &'static [&'static str],
}

/// How to (re)start a process of the topology.
struct Spec {
    ns: &'static str,
    args: Vec<String>,
}

struct Bench {
    o: Opts,
    exe: String,
    /// The `causeway` binary built next to this one.
    causeway: String,
    dir: PathBuf,
    pki: Pki,
    c: Netns,
    s: Netns,
    specs: BTreeMap<&'static str, Spec>,
    procs: BTreeMap<&'static str, Proc>,
    wire: Option<wire::Wire>,
    arms: Vec<Arm>,
    /// Measurements that failed (the run goes on; the report lists them).
    failures: std::cell::RefCell<Vec<String>>,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| unreachable!("fixed address {s}: {e}"))
}

fn run(o: Opts) -> anyhow::Result<()> {
    if !causeway_tests::netns::available() {
        bail!("needs root and iproute2 (it creates network namespaces)");
    }
    for tool in ["haproxy", "timeout"] {
        if Command::new("sh").args(["-c", &format!("command -v {tool}")]).output()?.stdout.is_empty() {
            bail!("{tool} is not installed (apt-get install haproxy coreutils)");
        }
    }
    let mut b = Bench::new(o)?;
    let rep = b.start_all().and_then(|()| b.measure());
    b.stop_all();
    // Keep every process's log, pass or fail.
    let logs = b.o.out.join("logs");
    std::fs::create_dir_all(&logs)?;
    for e in std::fs::read_dir(&b.dir)?.flatten() {
        if e.path().extension().is_some_and(|x| x == "log" || x == "yaml" || x == "cfg") {
            std::fs::copy(e.path(), logs.join(e.file_name()))?;
        }
    }
    let mut rep = rep.with_context(|| format!("logs in {}", logs.display()))?;
    rep.failures = b.failures.take();
    let md = rep.markdown();
    std::fs::write(b.o.out.join("results.md"), &md)?;
    std::fs::write(b.o.out.join("results.json"), serde_json::to_string_pretty(&rep.json())?)?;
    println!("{md}");
    println!("written: {0}/results.md, {0}/results.json", b.o.out.display());
    Ok(())
}

impl Bench {
    fn new(o: Opts) -> anyhow::Result<Self> {
        let exe_path = std::env::current_exe()?;
        let exe = exe_path.display().to_string();
        let causeway = exe_path.with_file_name("causeway");
        if !causeway.exists() {
            bail!("{} is missing: build it first (cargo build --release --bins)", causeway.display());
        }
        let causeway = causeway.display().to_string();
        let pki = Pki::new(TD)?;
        let dir = pki.dir.clone();
        let (c, s) = (Netns::new(NS_C)?, Netns::new(NS_S)?);
        link(&c, "cwbv0", "10.77.0.1/24", &s, "cwbv1", "10.77.0.2/24")?;
        // Kernel UDP buffers: the gateways ask for 4 MiB; the default cap (208 KiB) drops packets at
        // a few Gbit/s. Production hosts need the same (README, Operations).
        for k in ["net.core.rmem_max=8388608", "net.core.wmem_max=8388608"] {
            causeway_tests::netns::run(&["sysctl", "-qw", k])?;
        }
        // New-flow runs (B5) open thousands of connections a second; without reuse every arm would
        // measure the client's TIME_WAIT port exhaustion (~470 connections/s) instead of itself.
        for ns in [&c, &s] {
            ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
            ns.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"])?;
        }
        // The redirector arm: VIP traffic leaves by the veth route, so the OUTPUT chain sees it.
        c.exec(&["ip", "route", "add", "240.240.0.0/16", "dev", "cwbv0"])?;
        let arms = vec![
            Arm { name: "direct", veth: addr("10.77.0.2:7000"), wire: Some(addr("10.78.0.2:7000")), procs: &[] },
            Arm {
                name: "haproxy",
                veth: addr("127.0.0.1:8100"),
                wire: Some(addr("127.0.0.1:8101")),
                procs: &["haproxy-a", "haproxy-b"],
            },
            Arm {
                name: "quinn",
                veth: addr("127.0.0.1:8200"),
                wire: Some(addr("127.0.0.1:8201")),
                procs: &["quic-in", "quic-out"],
            },
            Arm {
                name: "causeway",
                veth: addr("127.0.0.1:8300"),
                wire: Some(addr("127.0.0.1:8301")),
                procs: &["gw-a", "gw-b"],
            },
            Arm {
                name: "causeway-redirect",
                veth: SocketAddr::from((vip(SERVICE)?, SERVICE_PORT)),
                wire: None,
                procs: &["redirector", "gw-a", "gw-b"],
            },
        ];
        Ok(Self {
            o,
            exe,
            causeway,
            dir,
            pki,
            c,
            s,
            specs: BTreeMap::new(),
            procs: BTreeMap::new(),
            wire: None,
            arms,
            failures: Default::default(),
        })
    }

    fn ns(&self, name: &str) -> &Netns {
        if name == NS_C {
            &self.c
        } else {
            &self.s
        }
    }

    fn tls(&self, name: &str, zone: &str, gw: &str) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
        self.pki.issue(name, &self.pki.identity(zone, gw), Validity::for_duration(Duration::from_secs(86_400)))
    }

    fn write(&self, name: &str, text: &str) -> anyhow::Result<String> {
        let p = self.dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p.display().to_string())
    }

    fn start_all(&mut self) -> anyhow::Result<()> {
        self.start_wire()?;
        let exe = self.exe.clone();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        self.specs.insert(
            "server-b",
            Spec { ns: NS_S, args: s(&[&exe, "serve", "--listen", "0.0.0.0:7000", "--name", "b"]) },
        );
        self.specs.insert(
            "http-b",
            Spec { ns: NS_S, args: s(&[&exe, "http-serve", "--listen", "0.0.0.0:7080", "--name", "b"]) },
        );
        self.specs.insert(
            "server-c",
            Spec { ns: NS_S, args: s(&[&exe, "serve", "--listen", "127.0.0.1:7001", "--name", "c"]) },
        );
        self.haproxy()?;
        self.quinn()?;
        self.gateways()?;
        let names: Vec<&'static str> = self.specs.keys().copied().collect();
        for n in names {
            self.spawn(n)?;
        }
        for arm in &self.arms {
            for a in [Some(arm.veth), arm.wire].into_iter().flatten() {
                let v = self.load("ready", a, &["--secs", "30"]).with_context(|| format!("arm {} at {a}", arm.name))?;
                if v["name"] != "b" {
                    bail!("arm {} at {a} reached {} instead of server b", arm.name, v["name"]);
                }
            }
        }
        for (name, veth, wire) in HTTP_ARMS {
            if !self.runs(name) {
                continue;
            }
            for a in [veth, wire] {
                self.load("http-ready", addr(a), &["--secs", "30"])
                    .with_context(|| format!("HTTP arm {name} at {a}"))?;
            }
        }
        eprintln!("all arms answer; measuring");
        Ok(())
    }

    fn start_wire(&mut self) -> anyhow::Result<()> {
        let a = wire::open_tun("cwbt0")?;
        let b = wire::open_tun("cwbt1")?;
        causeway_tests::netns::run(&["ip", "link", "set", "cwbt0", "netns", NS_C])?;
        causeway_tests::netns::run(&["ip", "link", "set", "cwbt1", "netns", NS_S])?;
        for (ns, dev, me, peer) in
            [(&self.c, "cwbt0", "10.78.0.1", "10.78.0.2"), (&self.s, "cwbt1", "10.78.0.2", "10.78.0.1")]
        {
            ns.exec(&["ip", "addr", "add", me, "peer", peer, "dev", dev])?;
            ns.exec(&["ip", "link", "set", dev, "mtu", "1500", "up"])?;
        }
        self.wire = Some(wire::Wire::start(a, b)?);
        Ok(())
    }

    fn haproxy(&mut self) -> anyhow::Result<()> {
        let pem = |me: &Self, name: &str, zone: &str| -> anyhow::Result<String> {
            let (cert, key, _) = me.tls(name, zone, "haproxy")?;
            let mut text = std::fs::read_to_string(cert)?;
            text.push_str(&std::fs::read_to_string(key)?);
            me.write(&format!("{name}.pem"), &text)
        };
        let (pa, pb) = (pem(self, "hap-a", "a")?, pem(self, "hap-b", "b")?);
        let ca = self.dir.join(causeway::certs::CA_CERT).display().to_string();
        let maxconn = hap_max_flows()? + 16;
        let global = format!("global\n  nbthread 1\n  maxconn {maxconn}\n\
                      defaults\n  mode tcp\n  maxconn {maxconn}\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n");
        let a = format!(
            "{global}frontend veth\n  bind 127.0.0.1:8100\n  default_backend veth\n\
             backend veth\n  server b 10.77.0.2:8443 ssl verify required ca-file {ca} crt {pa} ssl-min-ver TLSv1.3\n\
             frontend wire\n  bind 127.0.0.1:8101\n  default_backend wire\n\
             backend wire\n  server b 10.78.0.2:8443 ssl verify required ca-file {ca} crt {pa} ssl-min-ver TLSv1.3\n\
             frontend http\n  mode http\n  bind 127.0.0.1:8110\n  default_backend http\n\
             backend http\n  mode http\n  http-reuse always\n  server b 10.77.0.2:8453 ssl verify required ca-file {ca} crt {pa} ssl-min-ver TLSv1.3\n\
             frontend http-wire\n  mode http\n  bind 127.0.0.1:8111\n  default_backend http-wire\n\
             backend http-wire\n  mode http\n  http-reuse always\n  server b 10.78.0.2:8453 ssl verify required ca-file {ca} crt {pa} ssl-min-ver TLSv1.3\n"
        );
        let b = format!(
            "{global}frontend tls\n  bind 0.0.0.0:8443 ssl crt {pb} ca-file {ca} verify required ssl-min-ver TLSv1.3\n  default_backend srv\n\
             backend srv\n  server s 127.0.0.1:7000\n\
             frontend http\n  mode http\n  bind 0.0.0.0:8453 ssl crt {pb} ca-file {ca} verify required ssl-min-ver TLSv1.3\n  default_backend web\n\
             backend web\n  mode http\n  server w 127.0.0.1:7080\n"
        );
        let (fa, fb) = (self.write("haproxy-a.cfg", &a)?, self.write("haproxy-b.cfg", &b)?);
        for (name, ns, f) in [("haproxy-a", NS_C, fa), ("haproxy-b", NS_S, fb)] {
            let out = Command::new("haproxy").args(["-c", "-q", "-f", &f]).output()?;
            if !out.status.success() {
                bail!("{name} config refused: {}", String::from_utf8_lossy(&out.stderr));
            }
            self.specs.insert(name, Spec { ns, args: vec!["haproxy".into(), "-db".into(), "-f".into(), f] });
        }
        Ok(())
    }

    fn quinn(&mut self) -> anyhow::Result<()> {
        let (ca, cb) = (self.tls("quic-a", "a", "quinn")?, self.tls("quic-b", "b", "quinn")?);
        let p = |p: &Path| p.display().to_string();
        let exe = self.exe.clone();
        let id_a = self.pki.identity("a", "quinn").to_string();
        let id_b = self.pki.identity("b", "quinn").to_string();
        let server = vec![
            exe.clone(),
            "quic-server".into(),
            "--listen".into(),
            "0.0.0.0:8444".into(),
            "--forward".into(),
            "127.0.0.1:7000".into(),
            "--tls".into(),
            p(&cb.0),
            p(&cb.1),
            p(&cb.2),
            "--peer".into(),
            id_a,
        ];
        self.specs.insert("quic-out", Spec { ns: NS_S, args: server });
        for (name, listen, connect) in
            [("quic-in", "127.0.0.1:8200", "10.77.0.2:8444"), ("quic-in-wire", "127.0.0.1:8201", "10.78.0.2:8444")]
        {
            let args = vec![
                exe.clone(),
                "quic-client".into(),
                "--listen".into(),
                listen.into(),
                "--connect".into(),
                connect.into(),
                "--tls".into(),
                p(&ca.0),
                p(&ca.1),
                p(&ca.2),
                "--peer".into(),
                id_b.clone(),
            ];
            self.specs.insert(name, Spec { ns: NS_C, args });
        }
        Ok(())
    }

    fn gateways(&mut self) -> anyhow::Result<()> {
        let id = |z: &str| self.pki.identity(z, "gw-1");
        let svc = || SERVICE.to_string();
        let redirector = format!(
            "redirectors:\n  - {{ id_prefix: \"spiffe://{TD}/zone/a/node/\" }}\n\
             workloads:\n  - {{ cidr: 10.77.0.1/32, id: \"spiffe://{TD}/ns/bench/sa/client\" }}\n"
        );
        // The abuse limits are lifted: the bench measures capacity, and one client address opens
        // every flow (B6 holds 10,000 at once; the default is 1,000 per source address).
        let quiet = "log: { level: \"warn\" }\n\
                     limits: { connections_per_listener: 100000, connections_per_source: 100000, peer_flow_rate: 1000000 }\n";
        let specs = [
            (
                "gw-a",
                NS_C,
                GatewaySpec {
                    zone: "a".into(),
                    gateway: "gw-1".into(),
                    trust_domain: TD.into(),
                    tls: self.tls("gw-a", "a", "gw-1")?,
                    overlay: addr("0.0.0.0:4433"),
                    admin: Some(addr("127.0.0.1:9901")),
                    peers: vec![
                        (id("b"), Some("10.77.0.2:4433".into()), "b".into()),
                        (id("c"), Some("10.77.0.2:4434".into()), "c".into()),
                    ],
                    exports: vec![],
                    imports: vec![
                        (svc(), addr("127.0.0.1:8300"), vec!["b".into(), "c".into()]),
                        (WEB.into(), addr("127.0.0.1:8310"), vec![]),
                    ],
                    extra: format!("{redirector}{quiet}"),
                },
            ),
            (
                "gw-a2",
                NS_C,
                GatewaySpec {
                    zone: "a2".into(),
                    gateway: "gw-1".into(),
                    trust_domain: TD.into(),
                    tls: self.tls("gw-a2", "a2", "gw-1")?,
                    overlay: addr("0.0.0.0:4435"),
                    admin: Some(addr("127.0.0.1:9903")),
                    peers: vec![(id("b"), Some("10.78.0.2:4433".into()), "b".into())],
                    exports: vec![],
                    imports: vec![
                        (svc(), addr("127.0.0.1:8301"), vec!["b".into()]),
                        (WEB.into(), addr("127.0.0.1:8311"), vec![]),
                    ],
                    extra: quiet.into(),
                },
            ),
            (
                "gw-b",
                NS_S,
                GatewaySpec {
                    zone: "b".into(),
                    gateway: "gw-1".into(),
                    trust_domain: TD.into(),
                    tls: self.tls("gw-b", "b", "gw-1")?,
                    overlay: addr("0.0.0.0:4433"),
                    admin: Some(addr("127.0.0.1:9901")),
                    peers: vec![(id("a"), None, "a".into()), (id("a2"), None, "a2".into())],
                    exports: vec![
                        (svc(), SERVICE_PORT, vec![addr("127.0.0.1:7000")]),
                        (WEB.into(), WEB_PORT, vec![addr("127.0.0.1:7080")]),
                    ],
                    imports: vec![],
                    extra: quiet.into(),
                },
            ),
            (
                "gw-c",
                NS_S,
                GatewaySpec {
                    zone: "c".into(),
                    gateway: "gw-1".into(),
                    trust_domain: TD.into(),
                    tls: self.tls("gw-c", "c", "gw-1")?,
                    overlay: addr("0.0.0.0:4434"),
                    admin: Some(addr("127.0.0.1:9902")),
                    peers: vec![(id("a"), None, "a".into())],
                    exports: vec![(svc(), SERVICE_PORT, vec![addr("127.0.0.1:7001")])],
                    imports: vec![],
                    extra: quiet.into(),
                },
            ),
        ];
        let workers = self.o.workers.to_string();
        for (name, ns, spec) in specs {
            // The web service is HTTP at both ends (GatewaySpec renders every service as tcp).
            let yaml = spec
                .yaml()
                .replace(&format!("{{ name: {WEB},"), &format!("{{ name: {WEB}, protocol: http,"))
                .replace(&format!("{{ service: {WEB},"), &format!("{{ service: {WEB}, protocol: http,"));
            let f = self.write(&format!("{name}.yaml"), &yaml)?;
            let args = vec![
                self.causeway.clone(),
                "gateway".into(),
                "--config".into(),
                f,
                "--workers".into(),
                workers.clone(),
            ];
            self.specs.insert(name, Spec { ns, args });
        }
        let node = Identity::parse(&format!("spiffe://{TD}/zone/a/node/node-1"))?;
        let (cert, key, bundle) =
            self.pki.issue("node-1", &node, Validity::for_duration(Duration::from_secs(86_400)))?;
        let yaml = format!(
            "node: node-1\ntrust_domain: {TD}\ntls: {{ cert: \"{}\", key: \"{}\", bundle: \"{}\" }}\n\
             gateway: {{ address: \"127.0.0.1:4433\", id: \"{}\" }}\n\
             capture: {{ listen: \"0.0.0.0:15001\", vip_range: \"240.240.0.0/16\", chains: [output], max_connections: 100000, connections_per_source: 100000 }}\n\
             log: {{ level: \"warn\" }}\n",
            cert.display(),
            key.display(),
            bundle.display(),
            id("a")
        );
        let f = self.write("redirect.yaml", &yaml)?;
        let args = vec![self.causeway.clone(), "redirect".into(), "--config".into(), f, "--workers".into(), workers];
        self.specs.insert("redirector", Spec { ns: NS_C, args });
        Ok(())
    }

    /// Starts (or restarts) one process.
    fn spawn(&mut self, name: &'static str) -> anyhow::Result<()> {
        if let Some(mut p) = self.procs.remove(name) {
            p.signal("KILL");
        }
        let spec = &self.specs[name];
        let args: Vec<&str> = spec.args.iter().map(String::as_str).collect();
        let p = self.ns(spec.ns).spawn(&args, &self.dir.join(format!("{name}.log")))?;
        self.procs.insert(name, p);
        Ok(())
    }

    fn stop_all(&mut self) {
        for (_, mut p) in std::mem::take(&mut self.procs) {
            p.signal("KILL");
        }
    }

    fn rss_kib(&self, names: &[&str]) -> anyhow::Result<u64> {
        let mut total = 0;
        for n in names {
            let pid = self.procs.get(n).with_context(|| format!("{n} not running"))?.child.id();
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
            total += line.split_whitespace().nth(1).context("VmRSS value")?.parse::<u64>()?;
        }
        Ok(total)
    }

    fn load_cmd(&self, kind: &str, addr: SocketAddr, extra: &[&str]) -> Command {
        let mut cmd = Command::new("timeout");
        let a = addr.to_string();
        cmd.args(["300", "ip", "netns", "exec", NS_C, &self.exe, "load", kind]).args(["--addr", &a]).args(extra);
        cmd
    }

    /// Runs one client-side measurement and returns its JSON answer.
    fn load(&self, kind: &str, addr: SocketAddr, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = self.load_cmd(kind, addr, extra).output()?;
        if !out.status.success() {
            bail!("load {kind} {addr}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// One sample: its JSON, or `null` (every figure NaN) when it failed, recorded for the report.
    fn sample(&self, id: &str, arm: &str, kind: &str, addr: SocketAddr, extra: &[&str]) -> serde_json::Value {
        match self.load(kind, addr, extra) {
            Ok(v) => v,
            Err(e) => {
                let msg = format!("{id} {arm}: {e:#}");
                eprintln!("failed: {msg}");
                self.failures.borrow_mut().push(msg);
                serde_json::Value::Null
            }
        }
    }

    fn secs(&self) -> String {
        self.o.secs.to_string()
    }

    fn wants(&self, id: &str) -> bool {
        self.o.only.is_empty() || self.o.only.iter().any(|o| o.eq_ignore_ascii_case(id))
    }

    fn arms(&self, names: &[&str]) -> Vec<(&'static str, SocketAddr)> {
        self.arms.iter().filter(|a| names.contains(&a.name) && self.runs(a.name)).map(|a| (a.name, a.veth)).collect()
    }

    fn runs(&self, arm: &str) -> bool {
        self.o.arms.is_empty() || self.o.arms.iter().any(|a| a == arm)
    }

    fn measure(&mut self) -> anyhow::Result<Report> {
        let mut rep = Report::new(&self.o);
        let all = ["direct", "haproxy", "quinn", "causeway", "causeway-redirect"];
        let proxies = ["haproxy", "quinn", "causeway", "causeway-redirect"];
        // B6 first, on fresh processes: allocators keep freed memory, so each repetition restarts
        // the arm's processes.
        if self.wants("B6") {
            self.b6(&mut rep, &proxies)?;
        }
        if self.wants("B1") {
            let mut s = Series::new("B1", "single-flow bulk throughput", "Gbit/s", true);
            for _ in 0..self.o.reps {
                for (arm, a) in self.arms(&all) {
                    let v = self.sample("B1", arm, "bulk", a, &["--secs", &self.secs()]);
                    s.push(arm, v["gbps"].as_f64().unwrap_or(f64::NAN));
                }
            }
            rep.add(s);
        }
        if self.wants("B2") {
            for n in [8usize, 64, 128] {
                let mut agg =
                    Series::new(&format!("B2 ×{n}"), &format!("{n} parallel flows, aggregate"), "Gbit/s", true);
                let mut jain = Series::new(&format!("B2 ×{n} fairness"), "Jain index over per-flow rates", "", true);
                let mut min = Series::new(&format!("B2 ×{n} slowest"), "slowest flow", "Mbit/s", true);
                for _ in 0..self.o.reps {
                    for (arm, a) in self.arms(&all) {
                        let v = self.sample("B2", arm, "parallel", a, &["--n", &n.to_string(), "--secs", &self.secs()]);
                        agg.push(arm, v["gbps"].as_f64().unwrap_or(f64::NAN));
                        jain.push(arm, v["jain"].as_f64().unwrap_or(f64::NAN));
                        min.push(arm, v["min_flow_mbps"].as_f64().unwrap_or(f64::NAN));
                    }
                }
                rep.add(agg);
                rep.add(jain);
                rep.add(min);
            }
        }
        if self.wants("B3") {
            for size in [64usize, 1024] {
                let mut p = BTreeMap::new();
                for q in ["p50", "p99", "p999"] {
                    p.insert(q, Series::new(&format!("B3 {size} B {q}"), "request/response latency", "µs", false));
                }
                for _ in 0..self.o.reps {
                    for (arm, a) in self.arms(&all) {
                        let v = self.sample("B3", arm, "rr", a, &["--size", &size.to_string(), "--secs", &self.secs()]);
                        for (q, s) in p.iter_mut() {
                            s.push(arm, v[format!("{q}_us")].as_f64().unwrap_or(f64::NAN));
                        }
                    }
                }
                for (_, s) in p {
                    rep.add_latency(s);
                }
            }
        }
        if self.wants("B5") {
            for clients in [1usize, 32] {
                let mut s = Series::new(&format!("B5 ×{clients}"), "new flows per second", "flows/s", true);
                let mut failed = 0.0;
                for _ in 0..self.o.reps {
                    for (arm, a) in self.arms(&all) {
                        let v = self.sample(
                            "B5",
                            arm,
                            "newflows",
                            a,
                            &["--n", &clients.to_string(), "--secs", &self.secs()],
                        );
                        s.push(arm, v["per_sec"].as_f64().unwrap_or(f64::NAN));
                        failed += v["failed"].as_f64().unwrap_or(f64::NAN);
                    }
                }
                s.note = format!("{failed} failed flows across all arms");
                rep.add(s);
            }
        }
        if self.wants("B10") {
            let mut s = Series::new("B10", "echo p99 beside one bulk flow ÷ idle p99", "×", false);
            let mut bulk = Series::new("B10 bulk", "the bulk flow's rate meanwhile", "Gbit/s", true);
            for _ in 0..self.o.reps {
                for (arm, a) in self.arms(&proxies) {
                    let v = self.sample("B10", arm, "hol", a, &["--secs", &self.secs()]);
                    s.push(arm, v["ratio"].as_f64().unwrap_or(f64::NAN));
                    bulk.push(arm, v["bulk_gbps"].as_f64().unwrap_or(f64::NAN));
                }
            }
            rep.add(s);
            rep.add(bulk);
        }
        if self.wants("B11") {
            self.b11(&mut rep)?;
        }
        if self.wants("B1r") {
            self.b1r(&mut rep)?;
        }
        if self.wants("B4") {
            self.b4(&mut rep)?;
        }
        if self.wants("B8") {
            self.b8(&mut rep)?;
        }
        Ok(rep)
    }

    fn b1r(&mut self, rep: &mut Report) -> anyhow::Result<()> {
        let arms: Vec<(&'static str, SocketAddr)> =
            self.arms.iter().filter(|a| self.runs(a.name)).filter_map(|a| a.wire.map(|w| (a.name, w))).collect();
        for rtt in [0u64, 10, 50] {
            if let Some(w) = &self.wire {
                w.set_rtt(Duration::from_millis(rtt));
            }
            // Long enough for slow start to finish at 50 ms.
            let secs = if rtt > 0 && !self.o.smoke { self.o.secs.max(5.0) } else { self.o.secs };
            let mut s = Series::new(&format!("B1r {rtt} ms"), "single flow through the delay line", "Gbit/s", true);
            for _ in 0..self.o.reps {
                for (arm, a) in &arms {
                    let v = self.sample("B1r", arm, "bulk", *a, &["--secs", &secs.to_string()]);
                    s.push(arm, v["gbps"].as_f64().unwrap_or(f64::NAN));
                }
            }
            rep.add(s);
        }
        if let Some(w) = &self.wire {
            w.set_rtt(Duration::ZERO);
        }
        Ok(())
    }

    /// B11: HTTP/1.1 keep-alive requests/s and p99 with wrk (same threads and connections for
    /// every arm) over the veth link.
    fn b11(&mut self, rep: &mut Report) -> anyhow::Result<()> {
        let mut rps = Series::new("B11 rps", "HTTP/1.1 keep-alive requests/s (wrk -t1 -c32)", "req/s", true);
        let mut p99 = Series::new("B11 p99", "HTTP/1.1 request latency p99 (wrk)", "ms", false);
        for _ in 0..self.o.reps {
            for (arm, veth, _) in HTTP_ARMS {
                if !self.runs(arm) {
                    continue;
                }
                match self.wrk(veth) {
                    Ok((r, p)) => {
                        rps.push(arm, r);
                        p99.push(arm, p);
                    }
                    Err(e) => {
                        let msg = format!("B11 {arm}: {e:#}");
                        eprintln!("failed: {msg}");
                        self.failures.borrow_mut().push(msg);
                        rps.push(arm, f64::NAN);
                        p99.push(arm, f64::NAN);
                    }
                }
            }
        }
        rep.add(rps);
        rep.add(p99);
        Ok(())
    }

    /// One wrk run from the client namespace: (requests/s, p99 in ms). Any socket error or
    /// non-2xx answer fails the run.
    fn wrk(&self, target: &str) -> anyhow::Result<(f64, f64)> {
        let secs = format!("{}s", self.o.secs.max(1.0).round());
        let url = format!("http://{target}/");
        let out = self.c.output(&["wrk", "-t1", "-c32", "-d", &secs, "--latency", &url])?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() || text.contains("Socket errors") || text.contains("Non-2xx") {
            bail!("wrk {url}: {text}{}", String::from_utf8_lossy(&out.stderr));
        }
        let rps = text
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("no Requests/sec in {text}"))?;
        let p99 = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("99%"))
            .and_then(|v| wrk_ms(v.trim()))
            .with_context(|| format!("no 99% latency in {text}"))?;
        Ok((rps, p99))
    }

    /// B4: time to the first response byte of a new flow (TCP) and of a new HTTP request on a new
    /// connection, with 50 ms RTT between the zones (the delay line), in RTTs.
    fn b4(&mut self, rep: &mut Report) -> anyhow::Result<()> {
        const RTT_MS: f64 = 50.0;
        if let Some(w) = &self.wire {
            w.set_rtt(Duration::from_millis(RTT_MS as u64));
        }
        let n = if self.o.smoke { "2" } else { "10" };
        let tcp_arms: Vec<(&'static str, SocketAddr)> = self
            .arms
            .iter()
            .filter(|a| ["direct", "haproxy", "causeway"].contains(&a.name) && self.runs(a.name))
            .filter_map(|a| a.wire.map(|w| (a.name, w)))
            .collect();
        let http_arms: Vec<(&'static str, SocketAddr)> =
            HTTP_ARMS.iter().filter(|a| self.runs(a.0)).map(|(name, _, wire)| (*name, addr(wire))).collect();
        for (id, kind, arms) in [("B4 tcp", "ttfb", tcp_arms), ("B4 http", "ttfb-http", http_arms)] {
            let label = format!("first response byte of a new {} at 50 ms RTT, in RTTs (median of {n})", &id[3..]);
            let mut s = Series::new(id, &label, "RTT", false);
            for _ in 0..self.o.reps {
                for (arm, a) in &arms {
                    let v = self.sample(id, arm, kind, *a, &["--n", n]);
                    s.push(arm, v["p50_ms"].as_f64().unwrap_or(f64::NAN) / RTT_MS);
                }
            }
            rep.add(s);
        }
        if let Some(w) = &self.wire {
            w.set_rtt(Duration::ZERO);
        }
        Ok(())
    }

    fn b6(&mut self, rep: &mut Report, arms: &[&str]) -> anyhow::Result<()> {
        let n = self.o.idle_flows;
        let hap_n = n.min(hap_max_flows()?);
        let mut s = Series::new(
            "B6",
            &format!("memory per idle flow at {n} flows (RSS delta of the arm's processes ÷ N)"),
            "KiB",
            false,
        );
        if hap_n < n {
            s.note = format!("haproxy held {hap_n} flows: two sockets per flow and the descriptor limit allow no more");
        }
        let arms: Vec<&str> = arms.iter().copied().filter(|a| self.runs(a)).collect();
        for _ in 0..self.o.reps {
            for arm in &arms {
                let (procs, a) = {
                    let arm = self.arms.iter().find(|x| x.name == *arm).context("arm")?;
                    (arm.procs, arm.veth)
                };
                for p in procs {
                    self.spawn(p)?;
                }
                self.load("ready", a, &["--secs", "30"])?;
                // A warm-up flow so connections, routes and caches exist before the baseline.
                self.load("rr", a, &["--secs", "0.2"])?;
                std::thread::sleep(Duration::from_millis(300));
                let n = if *arm == "haproxy" { hap_n } else { n };
                let before = self.rss_kib(procs)?;
                let mut child = self
                    .load_cmd("hold", a, &["--n", &n.to_string()])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()?;
                let mut line = String::new();
                BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
                if !line.starts_with("ready") {
                    let _ = child.kill();
                    bail!("{arm}: {n} idle flows did not open ({line:?})");
                }
                std::thread::sleep(Duration::from_millis(500));
                let after = self.rss_kib(procs)?;
                if let Some(mut stdin) = child.stdin.take() {
                    let _ = stdin.write_all(b"\n");
                }
                let _ = child.wait();
                s.push(arm, after.saturating_sub(before) as f64 / n as f64);
            }
        }
        // Leave every process fresh for what follows.
        for p in ["gw-a", "gw-b", "redirector"] {
            self.spawn(p)?;
        }
        for arm in &arms {
            let a = self.arms.iter().find(|x| x.name == *arm).context("arm")?.veth;
            self.load("ready", a, &["--secs", "30"])?;
        }
        rep.add(s);
        Ok(())
    }

    /// kill -9 of the serving gateway; time until a new flow is answered by the other zone, taken
    /// from the probe's own timestamps.
    fn b8(&mut self, rep: &mut Report) -> anyhow::Result<()> {
        let mut s =
            Series::new("B8", "kill -9 of the serving gateway → first flow served by another zone", "ms", false);
        let a = self.arms.iter().find(|x| x.name == "causeway").context("arm")?.veth;
        for _ in 0..self.o.reps {
            self.load("ready", a, &["--secs", "30"])?;
            let mut probe = self.load_cmd("probe", a, &[]).stdout(Stdio::piped()).spawn()?;
            let (tx, rx) = std::sync::mpsc::channel::<(u128, String)>();
            let out = probe.stdout.take().context("stdout")?;
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let mut it = line.split(' ');
                    if let (Some(t), Some(n)) = (it.next().and_then(|t| t.parse().ok()), it.next()) {
                        if tx.send((t, n.to_string())).is_err() {
                            return;
                        }
                    }
                }
            });
            let wait_for = |name: &str, after: u128| -> Option<u128> {
                let end = Instant::now() + Duration::from_secs(30);
                while Instant::now() < end {
                    if let Ok((t, n)) = rx.recv_timeout(Duration::from_secs(1)) {
                        if t > after && n == name {
                            return Some(t);
                        }
                    }
                }
                None
            };
            let res = (|| {
                wait_for("b", 0).context("the probe never reached zone b")?;
                let t0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
                self.procs.get_mut("gw-b").context("gw-b")?.signal("KILL");
                let t1 = wait_for("c", t0).context("no flow reached zone c within 30 s")?;
                anyhow::Ok((t1 - t0) as f64 / 1e6)
            })();
            let _ = probe.kill();
            let _ = probe.wait();
            s.push("causeway", res?);
            self.spawn("gw-b")?;
        }
        rep.add(s);
        Ok(())
    }
}

/// Flows the near HAProxy can hold: each costs it two sockets (client side and TLS side), and a
/// process without CAP_SYS_RESOURCE cannot raise its descriptor limit above the hard limit.
/// A wrk latency figure (`850.00us`, `1.23ms`, `2.01s`) in milliseconds.
fn wrk_ms(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(x) = v.strip_suffix("us") {
        (x, 0.001)
    } else if let Some(x) = v.strip_suffix("ms") {
        (x, 1.0)
    } else if let Some(x) = v.strip_suffix('s') {
        (x, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

fn hap_max_flows() -> anyhow::Result<usize> {
    let out = Command::new("sh").args(["-c", "ulimit -Hn"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let limit = match text.trim() {
        "unlimited" => 1 << 20,
        n => n.parse::<usize>().context("ulimit -Hn")?,
    };
    Ok(limit.saturating_sub(200) / 2)
}

/// The VIP the redirector gives `service` (the same deterministic assignment it uses).
fn vip(service: &str) -> anyhow::Result<std::net::Ipv4Addr> {
    let name = ServiceName::new(service)?;
    let range = causeway_protocol::vip::VipRange::parse("240.240.0.0/16")?;
    let table = causeway_protocol::vip::VipTable::assign(range, [&name]);
    table.vip(&name).context("no VIP")
}
