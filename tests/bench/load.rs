//! The backend server and the load generator. Both run in their own processes (and network
//! namespaces), so the gateways under test never share a runtime with the load.
//!
//! Server protocol: the client's first byte picks the mode.
//! - `S` sink: read to EOF, answer the byte count (u64, big endian). Bulk throughput is measured to
//!   that answer, so bytes still buffered in the gateways are not counted as delivered.
//! - `E` echo until EOF (request/response latency, new-flow rate).
//! - `H` hold: answer `k` and then wait for EOF (idle flows).
//! - `Z` answer the server's name and close (which zone served a flow).
//!
//! The HTTP backend (`http-serve`) answers every HTTP/1.1 request with `200` and its name.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub async fn serve(listen: SocketAddr, name: String) -> anyhow::Result<()> {
    let sock = if listen.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    sock.bind(listen)?;
    let l: TcpListener = sock.listen(4096)?;
    loop {
        let (s, _) = l.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let _ = handle(s, &name).await;
        });
    }
}

async fn handle(mut s: TcpStream, name: &str) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut mode = [0u8];
    s.read_exact(&mut mode).await?;
    match mode[0] {
        b'S' => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf).await? {
                    0 => break,
                    k => n += k as u64,
                }
            }
            s.write_all(&n.to_be_bytes()).await?;
            s.shutdown().await
        }
        b'E' => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match s.read(&mut buf).await? {
                    0 => return s.shutdown().await,
                    k => s.write_all(&buf[..k]).await?,
                }
            }
        }
        b'H' => {
            s.write_all(b"k").await?;
            let mut buf = [0u8; 64];
            while s.read(&mut buf).await? > 0 {}
            Ok(())
        }
        b'Z' => {
            s.write_all(name.as_bytes()).await?;
            s.shutdown().await
        }
        _ => Ok(()),
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .context("connect timed out")?
        .with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One bulk upload for `dur`; returns (bytes the server received, seconds until it said so).
pub async fn bulk(addr: SocketAddr, dur: Duration) -> anyhow::Result<(u64, f64)> {
    let mut s = connect(addr).await?;
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    s.write_all(b"S").await?;
    while start.elapsed() < dur {
        s.write_all(&chunk).await?;
    }
    s.shutdown().await?;
    let mut n = [0u8; 8];
    // What the sockets and proxies buffered still has to drain at this flow's share of the path:
    // with 128 flows through the redirector in a debug build (the CI smoke run) the slowest flow
    // ran at 0.7 Mbit/s and needed more than 30 s. Past 2 minutes the flow has stalled.
    tokio::time::timeout(Duration::from_secs(120), s.read_exact(&mut n)).await.context("sink answer timed out")??;
    Ok((u64::from_be_bytes(n), start.elapsed().as_secs_f64()))
}

#[derive(Serialize)]
pub struct Parallel {
    pub gbps: f64,
    pub jain: f64,
    pub min_flow_mbps: f64,
    pub flows: usize,
}

/// `n` bulk uploads at once: aggregate rate and Jain's fairness index over the per-flow rates.
pub async fn parallel(addr: SocketAddr, n: usize, dur: Duration) -> anyhow::Result<Parallel> {
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(bulk(addr, dur))).collect();
    let mut rates = Vec::with_capacity(n);
    let mut total = 0u64;
    let mut longest = 0f64;
    for t in tasks {
        let (bytes, secs) = t.await??;
        total += bytes;
        longest = longest.max(secs);
        rates.push(bytes as f64 / secs);
    }
    let sum: f64 = rates.iter().sum();
    let sq: f64 = rates.iter().map(|r| r * r).sum();
    let jain = if sq > 0.0 { sum * sum / (n as f64 * sq) } else { 0.0 };
    let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(Parallel { gbps: total as f64 * 8.0 / longest / 1e9, jain, min_flow_mbps: min * 8.0 / 1e6, flows: n })
}

#[derive(Serialize, Clone, Copy)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub samples: u64,
}

fn latency(h: &Histogram<u64>) -> Latency {
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    Latency { p50_us: q(0.5), p99_us: q(0.99), p999_us: q(0.999), samples: h.len() }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s in nanoseconds, 3 significant digits.
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

/// Request/response on one persistent flow: `size` bytes out, the same back, for `dur`.
pub async fn rr(addr: SocketAddr, size: usize, dur: Duration) -> anyhow::Result<Latency> {
    let mut s = connect(addr).await?;
    s.write_all(b"E").await?;
    let msg = vec![0x42u8; size];
    let mut back = vec![0u8; size];
    let mut h = histogram();
    // Warm-up: the first round trips pay for window growth and route lookups.
    for _ in 0..50 {
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
    }
    let end = Instant::now() + dur;
    while Instant::now() < end {
        let t = Instant::now();
        s.write_all(&msg).await?;
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back)).await.context("echo timed out")??;
        let _ = h.record(t.elapsed().as_nanos() as u64);
    }
    Ok(latency(&h))
}

#[derive(Serialize)]
pub struct Rate {
    pub per_sec: f64,
    pub failed: u64,
}

/// New flows: connect, one 64-byte request/response, close — by `clients` loops at once.
pub async fn new_flows(addr: SocketAddr, clients: usize, dur: Duration) -> anyhow::Result<Rate> {
    let start = Instant::now();
    let end = start + dur;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut msg = vec![0x42u8; 65];
                msg[0] = b'E';
                let mut back = [0u8; 64];
                while Instant::now() < end {
                    let one = async {
                        let mut s = connect(addr).await?;
                        s.write_all(&msg).await?;
                        s.read_exact(&mut back).await?;
                        anyhow::Ok(())
                    };
                    match tokio::time::timeout(Duration::from_secs(5), one).await {
                        Ok(Ok(())) => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for t in tasks {
        let (o, f) = t.await?;
        ok += o;
        failed += f;
    }
    Ok(Rate { per_sec: ok as f64 / start.elapsed().as_secs_f64(), failed })
}

#[derive(Serialize)]
pub struct Hol {
    pub idle_p99_us: f64,
    pub loaded_p99_us: f64,
    pub ratio: f64,
    pub bulk_gbps: f64,
}

/// Head-of-line isolation: request/response p99 alone, then while one bulk flow shares the path.
pub async fn hol(addr: SocketAddr, dur: Duration) -> anyhow::Result<Hol> {
    let idle = rr(addr, 64, dur).await?;
    let bulk = tokio::spawn(bulk(addr, dur + Duration::from_millis(600)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let loaded = rr(addr, 64, dur).await?;
    let (bytes, secs) = bulk.await??;
    Ok(Hol {
        idle_p99_us: idle.p99_us,
        loaded_p99_us: loaded.p99_us,
        ratio: loaded.p99_us / idle.p99_us,
        bulk_gbps: bytes as f64 * 8.0 / secs / 1e9,
    })
}

/// Opens `n` idle flows (each confirmed by the server), prints `ready`, and holds them until stdin
/// closes or gives a line.
pub async fn hold(addr: SocketAddr, n: usize) -> anyhow::Result<()> {
    let mut flows = Vec::with_capacity(n);
    let mut pending = tokio::task::JoinSet::new();
    let mut started = 0;
    while flows.len() < n {
        while started < n && pending.len() < 200 {
            started += 1;
            pending.spawn(async move {
                let mut s = connect(addr).await?;
                s.write_all(b"H").await?;
                let mut k = [0u8];
                tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut k)).await.context("hold answer")??;
                anyhow::Ok(s)
            });
        }
        match pending.join_next().await {
            Some(r) => flows.push(r??),
            None => bail!("flows ended early"),
        }
    }
    println!("ready {}", flows.len());
    let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await;
    drop(flows);
    Ok(())
}

/// Asks which server answers, once; `None` on any failure within `timeout`.
pub async fn whoami(addr: SocketAddr, timeout: Duration) -> Option<String> {
    let one = async {
        let mut s = connect(addr).await?;
        s.write_all(b"Z").await?;
        let mut name = String::new();
        s.read_to_string(&mut name).await?;
        anyhow::Ok(name)
    };
    match tokio::time::timeout(timeout, one).await {
        Ok(Ok(n)) if !n.is_empty() => Some(n),
        _ => None,
    }
}

/// Prints `<unix ns> <server name or ->` for back-to-back flows until killed.
pub async fn probe(addr: SocketAddr) -> anyhow::Result<()> {
    use std::io::Write as _;
    loop {
        let name = whoami(addr, Duration::from_millis(500)).await;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        let mut out = std::io::stdout().lock();
        writeln!(out, "{now} {}", name.as_deref().unwrap_or("-"))?;
        out.flush()?;
        if name.is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The HTTP/1.1 backend (B11, B4 HTTP): every request gets `200` and the server's name, on
/// kept-alive connections.
pub async fn http_serve(listen: SocketAddr, name: String) -> anyhow::Result<()> {
    use http_body_util::Full;
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(listen)?;
    let l: TcpListener = sock.listen(4096)?;
    let body = bytes::Bytes::from(format!("{name}\n"));
    loop {
        let (s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                let b = body.clone();
                async move { Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(b))) }
            });
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(s), svc).await;
        });
    }
}

/// Time to the first response byte of new flows, one after another (B4).
#[derive(Serialize)]
pub struct FirstByte {
    pub p50_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub samples: usize,
}

/// `n` new connections in turn: each sends its request at once (`Z`, or an HTTP/1.1 GET when
/// `http`) and is timed from the start of its connect to the first byte of the answer.
pub async fn first_byte(addr: SocketAddr, n: usize, http: bool) -> anyhow::Result<FirstByte> {
    let req: &[u8] = if http { b"GET / HTTP/1.1\r\nHost: web.svc\r\n\r\n" } else { b"Z" };
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut s = connect(addr).await?;
        s.write_all(req).await?;
        let mut b = [0u8; 1];
        let got =
            tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await.context("no answer in 10 s")??;
        if got == 0 {
            bail!("{addr} closed without answering");
        }
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    let p50 = ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN);
    Ok(FirstByte {
        p50_ms: p50,
        min_ms: ms.first().copied().unwrap_or(f64::NAN),
        max_ms: ms.last().copied().unwrap_or(f64::NAN),
        samples: ms.len(),
    })
}

/// Waits until `addr` answers an HTTP GET with 200.
pub async fn http_ready(addr: SocketAddr, dur: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + dur;
    loop {
        let one = async {
            let mut s = connect(addr).await?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: web.svc\r\nConnection: close\r\n\r\n").await?;
            let mut text = String::new();
            s.read_to_string(&mut text).await?;
            anyhow::Ok(text.starts_with("HTTP/1.1 200"))
        };
        if matches!(tokio::time::timeout(Duration::from_secs(1), one).await, Ok(Ok(true))) {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("{addr} did not answer 200 within {dur:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
