//! A seeded, deterministic user-space UDP relay that impairs what it forwards: per-direction delay
//! and jitter (so reordering), random and bursty loss, duplication, corruption, blackhole windows
//! and an MTU cap. The kernel here has no netem; this stands between two gateways instead.
//!
//! Each client address gets its own upstream socket (like a NAT), so many connections can share
//! one relay. [`Stats`] counts what was done, per direction, so tests can assert on it.

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// Impairments of one direction.
#[derive(Debug, Clone, Default)]
pub struct Impairment {
    pub delay: Duration,
    /// Extra delay, uniform in [0, jitter]: packets overtake each other.
    pub jitter: Duration,
    /// Probability that a loss event starts at a packet.
    pub loss: f64,
    /// Packets dropped per loss event (1: random loss; 3: bursts of three).
    pub burst: u32,
    pub duplicate: f64,
    /// Probability of flipping one random byte.
    pub corrupt: f64,
    /// Every `period`, drop everything for `duration`.
    pub blackhole: Option<(Duration, Duration)>,
    /// Larger datagrams are dropped.
    pub mtu: Option<usize>,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub corrupted: AtomicU64,
}

impl Stats {
    pub fn get(&self) -> (u64, u64, u64, u64) {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (l(&self.forwarded), l(&self.dropped), l(&self.duplicated), l(&self.corrupted))
    }
}

struct Dir {
    imp: Impairment,
    rng: StdRng,
    burst_left: u32,
    start: Instant,
    stats: Arc<Stats>,
}

impl Dir {
    fn due(&mut self, now: Instant) -> Instant {
        let jitter = self.imp.jitter.as_micros() as u64;
        let j = if jitter == 0 { 0 } else { self.rng.random_range(0..=jitter) };
        now + self.imp.delay + Duration::from_micros(j)
    }

    /// What to send for one datagram: zero, one or two (data, due time) pairs.
    fn apply(&mut self, mut data: Vec<u8>) -> Vec<(Vec<u8>, Instant)> {
        let now = Instant::now();
        let too_big = self.imp.mtu.is_some_and(|m| data.len() > m);
        let in_blackhole = self.imp.blackhole.is_some_and(|(period, dur)| {
            // Before `start` (a first dark window set in the future), nothing is dark.
            now.checked_duration_since(self.start)
                .is_some_and(|t| t.as_nanos() % period.as_nanos().max(1) < dur.as_nanos())
        });
        let drop = if too_big || in_blackhole {
            true
        } else if self.burst_left > 0 {
            self.burst_left -= 1;
            true
        } else if self.imp.loss > 0.0 && self.rng.random_bool(self.imp.loss.min(1.0)) {
            self.burst_left = self.imp.burst.max(1) - 1;
            true
        } else {
            false
        };
        if drop {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return vec![];
        }
        if self.imp.corrupt > 0.0 && self.rng.random_bool(self.imp.corrupt.min(1.0)) && !data.is_empty() {
            let i = self.rng.random_range(0..data.len());
            data[i] ^= 1 << self.rng.random_range(0..8);
            self.stats.corrupted.fetch_add(1, Ordering::Relaxed);
        }
        let first = self.due(now);
        let mut out = vec![(data.clone(), first)];
        if self.imp.duplicate > 0.0 && self.rng.random_bool(self.imp.duplicate.min(1.0)) {
            let second = self.due(now);
            out.push((data, second));
            self.stats.duplicated.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        out
    }
}

/// Packets waiting for their due time, earliest first.
struct Queued(Instant, u64, Vec<u8>, SocketAddr, Arc<UdpSocket>);

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.0, o.1).cmp(&(self.0, self.1))
    }
}

/// A running relay: clients send to [`Relay::addr`], it forwards to `target`.
pub struct Relay {
    pub addr: SocketAddr,
    pub up: Arc<Stats>,
    pub down: Arc<Stats>,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    up: Dir,
    down: Dir,
    queue: BinaryHeap<Queued>,
    seq: u64,
}

/// Socket buffers as large as the gateways' own (`transport::SOCKET_BUFFER`): with the kernel's
/// default (208 KiB) a burst of a full congestion window overflows the relay's socket, and the
/// path loses far more than the impairment says.
fn big_buffers(sock: &UdpSocket) {
    let s = socket2::SockRef::from(sock);
    let _ = s.set_recv_buffer_size(causeway_overlay::transport::SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(causeway_overlay::transport::SOCKET_BUFFER);
}

impl Relay {
    /// Starts a relay to `target`; `up` impairs client→target, `down` target→client.
    pub async fn start(target: SocketAddr, up: Impairment, down: Impairment, seed: u64) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target, up, down, seed).await
    }

    /// Like [`Relay::start`], clients sending to `front` (e.g. an address in a network namespace).
    pub async fn start_on(
        front: SocketAddr,
        target: SocketAddr,
        up: Impairment,
        down: Impairment,
        seed: u64,
    ) -> std::io::Result<Self> {
        let front = UdpSocket::bind(front).await?;
        big_buffers(&front);
        let front = Arc::new(front);
        let addr = front.local_addr()?;
        let (up_stats, down_stats) = (Arc::new(Stats::default()), Arc::new(Stats::default()));
        let start = Instant::now();
        let shared = Arc::new(Mutex::new(Shared {
            up: Dir { imp: up, rng: StdRng::seed_from_u64(seed), burst_left: 0, start, stats: up_stats.clone() },
            down: Dir {
                imp: down,
                rng: StdRng::seed_from_u64(seed ^ 0x5eed),
                burst_left: 0,
                start,
                stats: down_stats.clone(),
            },
            queue: BinaryHeap::new(),
            seq: 0,
        }));
        let wake = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(run(front, target, shared.clone(), wake));
        Ok(Self { addr, up: up_stats, down: down_stats, shared, task })
    }

    /// Starts blackholes in both directions: dark for `duration` at the start of every `period`,
    /// the first one `first_in` from now.
    pub fn set_blackhole(&self, period: Duration, duration: Duration, first_in: Duration) {
        let mut guard = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        let start = Instant::now() + first_in;
        for d in [&mut s.up, &mut s.down] {
            d.imp.blackhole = Some((period, duration));
            d.start = start;
        }
    }

    /// Changes the one-way delay of both directions from now on (the path got longer or shorter).
    pub fn set_delay(&self, delay: Duration) {
        let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        s.up.imp.delay = delay;
        s.down.imp.delay = delay;
    }
}

fn enqueue(shared: &Mutex<Shared>, upward: bool, data: Vec<u8>, to: SocketAddr, via: &Arc<UdpSocket>) {
    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
    let out = if upward { s.up.apply(data) } else { s.down.apply(data) };
    for (d, due) in out {
        s.seq += 1;
        let seq = s.seq;
        s.queue.push(Queued(due, seq, d, to, via.clone()));
    }
}

async fn run(front: Arc<UdpSocket>, target: SocketAddr, shared: Arc<Mutex<Shared>>, wake: Arc<tokio::sync::Notify>) {
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    // The sender: delivers queued packets at their due time.
    let sender = {
        let (shared, wake) = (shared.clone(), wake.clone());
        tokio::spawn(async move {
            loop {
                let next = {
                    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                    match s.queue.peek() {
                        Some(q) if q.0 <= Instant::now() => s.queue.pop().map(Ok),
                        Some(q) => Some(Err(q.0)),
                        None => None,
                    }
                };
                match next {
                    Some(Ok(Queued(_, _, data, to, via))) => {
                        let _ = via.send_to(&data, to).await;
                    }
                    Some(Err(due)) => {
                        tokio::select! {
                            _ = tokio::time::sleep_until(due) => {}
                            _ = wake.notified() => {}
                        }
                    }
                    None => wake.notified().await,
                }
            }
        })
    };
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else { break };
        let upstream = match clients.get(&client) {
            Some(s) => s.clone(),
            None => {
                // A new client (or a rebinding one): its own upstream socket, and a task that
                // relays the target's answers back to it.
                let Ok(sock) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                big_buffers(&sock);
                let sock = Arc::new(sock);
                clients.insert(client, sock.clone());
                let (sock2, front2, shared2, wake2) = (sock.clone(), front.clone(), shared.clone(), wake.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok((n, _)) = sock2.recv_from(&mut buf).await {
                        enqueue(&shared2, false, buf[..n].to_vec(), client, &front2);
                        wake2.notify_one();
                    }
                });
                sock
            }
        };
        enqueue(&shared, true, buf[..n].to_vec(), target, &upstream);
        wake.notify_one();
    }
    sender.abort();
}
