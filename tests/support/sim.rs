//! A deterministic fleet simulator: hundreds of zone gateways on virtual time, each made of the
//! overlay's real pure core — `RouteTable`, `core::liveness::Liveness`, `core::catalog::LocalCatalog`
//! — exchanging real `protocol::control` frames (encoded, framed and decoded by the protocol crate)
//! over simulated links with latency, jitter, retransmission delay, partitions and gateway death.
//!
//! What is modelled rather than run: QUIC itself (a connection is an in-order, reliable byte stream
//! per direction whose frames arrive after the link's one-way delay; a frame "lost" arrives one
//! retransmission timeout later, as QUIC would resend it), the handshake (one RTT), and the dialer's
//! backoff (exponential from `backoff_min` to `backoff_max`, as the session's). Everything that
//! *decides* — liveness, catalog versions and diffs, route choice — is the production code.
//!
//! Seeded: the same seed gives the same run, event for event.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use causeway_overlay::core::catalog::LocalCatalog;
use causeway_overlay::core::liveness::{self, Counters, Liveness};
use causeway_overlay::core::route_table::{RouteTable, Target};
use causeway_protocol::control::{self, Decoder, Hello, Message, Ping, Protocol, ServiceAd};
use causeway_protocol::{GatewayId, Identity, ServiceName, ZoneName};

/// The fleet's shape and the protocol's timing.
#[derive(Debug, Clone)]
pub struct Config {
    pub zones: usize,
    pub services: usize,
    /// Each service is exported by 1..=max_exporters zones.
    pub max_exporters: usize,
    pub seed: u64,
    pub ping_interval: Duration,
    pub peer_timeout: Duration,
    pub peer_close_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// One-way delay between two zones: from `min_delay` to `max_delay`, fixed per link.
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// Per-frame jitter, up to this.
    pub jitter: Duration,
    /// Share of frames that need a retransmission.
    pub loss: f64,
}

impl Config {
    pub fn small(seed: u64) -> Self {
        Self {
            zones: 12,
            services: 120,
            max_exporters: 4,
            seed,
            ping_interval: Duration::from_millis(100),
            peer_timeout: Duration::from_millis(500),
            peer_close_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            min_delay: Duration::from_millis(2),
            max_delay: Duration::from_millis(60),
            jitter: Duration::from_millis(3),
            loss: 0.01,
        }
    }

    pub fn full(seed: u64) -> Self {
        Self { zones: 200, services: 5_000, max_exporters: 5, ..Self::small(seed) }
    }
}

/// xorshift64*: small, fast, and the same everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
    pub fn duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi.saturating_sub(lo).as_nanos() as u64;
        lo + Duration::from_nanos(self.below(span + 1))
    }
}

/// One direction of a connection: a reliable, in-order byte stream, as QUIC gives the control
/// stream. Frames wait here until their arrival time; across a partition they wait for its end
/// (retransmitted), unless the connection is given up first.
struct Conn {
    /// Generation of the connection between the pair (events of an older one are dropped).
    gen: u64,
    fifo: std::collections::VecDeque<(Duration, Bytes)>,
}

/// How often a sender retransmits into a cut link (QUIC's probe timeout, roughly).
const RETRANSMIT: Duration = Duration::from_millis(200);

/// What one gateway keeps per peer.
struct Session {
    live: Liveness,
    decoder: Decoder,
    sent: Arc<LocalCatalog>,
    hello: bool,
    /// Datagrams received on the connection, as QUIC would count them.
    datagrams: u64,
}

struct Gateway {
    zone: ZoneName,
    id: Identity,
    alive: bool,
    routes: RouteTable,
    catalog: Arc<LocalCatalog>,
    /// Ground truth of what this zone exports: service → healthy endpoints.
    exports: BTreeMap<ServiceName, u32>,
    // Ordered maps wherever the loop iterates: a HashMap's order differs from run to run, and with
    // it the order in which the seeded random numbers are drawn.
    sessions: BTreeMap<usize, Session>,
    /// When to dial each peer that has no connection, and the current backoff.
    redial: BTreeMap<usize, (Duration, Duration)>,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// Frames for `to` from `from` on connection generation `gen` may have arrived.
    Deliver {
        to: usize,
        from: usize,
        gen: u64,
    },
    Tick {
        node: usize,
    },
    /// A handshake between the pair completes (generation `gen`).
    Connected {
        a: usize,
        b: usize,
        gen: u64,
    },
}

/// What the run measured.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub frames: u64,
    pub control_bytes: u64,
    /// Bytes of catalog updates and withdrawals sent, and the service changes that caused them.
    pub catalog_update_bytes: u64,
    pub catalog_changes: u64,
    /// Route changes per (gateway, service), the largest.
    pub max_route_changes: u64,
    /// Connections given up (by liveness or a decode failure), counted once per pair.
    pub disconnects: u64,
}

pub struct Fleet {
    pub cfg: Config,
    rng: Rng,
    now: Duration,
    base: Instant,
    gws: Vec<Gateway>,
    delay: HashMap<(usize, usize), Duration>,
    conns: HashMap<(usize, usize), Conn>,
    gens: HashMap<(usize, usize), u64>,
    /// Links cut in both directions (a partition).
    cut: std::collections::HashSet<(usize, usize)>,
    queue: BinaryHeap<Reverse<(Duration, u64, Ev)>>,
    seq: u64,
    pub report: Report,
    /// Every service's name, and the zones that export it (the ground truth's static part).
    names: Vec<ServiceName>,
    exporters: Vec<Vec<usize>>,
    index: HashMap<Identity, usize>,
    /// Last route (first candidate's zone) per (gateway, service), to count changes.
    last_route: HashMap<(usize, ServiceName), Option<usize>>,
    route_changes: HashMap<(usize, ServiceName), u64>,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Fleet {
    pub fn new(cfg: Config) -> Self {
        let mut rng = Rng::new(cfg.seed);
        let zones: Vec<ZoneName> =
            (0..cfg.zones).map(|i| ZoneName::new(&format!("z{i}")).expect("zone name")).collect();
        let mut exports: Vec<BTreeMap<ServiceName, u32>> = vec![BTreeMap::new(); cfg.zones];
        let names: Vec<ServiceName> =
            (0..cfg.services).map(|s| ServiceName::new(&format!("s{s}.fleet")).expect("service name")).collect();
        let mut exporters = vec![Vec::new(); cfg.services];
        for (s, name) in names.iter().enumerate() {
            let n = 1 + rng.below(cfg.max_exporters as u64) as usize;
            for _ in 0..n {
                let z = rng.below(cfg.zones as u64) as usize;
                if exports[z].insert(name.clone(), 1).is_none() {
                    exporters[s].push(z);
                }
            }
        }
        let gw_id = GatewayId::new("gw-1").expect("gateway id");
        let gws: Vec<Gateway> = zones
            .iter()
            .zip(exports)
            .map(|(z, exports)| {
                let id = Identity::parse(&format!("spiffe://sim.example/zone/{z}/gateway/{gw_id}")).expect("id");
                let catalog = Arc::new(LocalCatalog::new(ads(&exports)));
                let mut routes = RouteTable::new(z.clone(), HashMap::new());
                routes.set_local(catalog.services.values().cloned());
                Gateway {
                    zone: z.clone(),
                    id,
                    alive: true,
                    routes,
                    catalog,
                    exports,
                    sessions: BTreeMap::new(),
                    redial: BTreeMap::new(),
                }
            })
            .collect();
        let mut delay = HashMap::new();
        for a in 0..cfg.zones {
            for b in a + 1..cfg.zones {
                delay.insert((a, b), rng.duration(cfg.min_delay, cfg.max_delay));
            }
        }
        let index = gws.iter().enumerate().map(|(i, g)| (g.id.clone(), i)).collect();
        let mut f = Self {
            names,
            exporters,
            index,
            cfg,
            rng,
            now: Duration::ZERO,
            base: Instant::now(),
            gws,
            delay,
            conns: HashMap::new(),
            gens: HashMap::new(),
            cut: Default::default(),
            queue: BinaryHeap::new(),
            seq: 0,
            report: Report::default(),
            last_route: HashMap::new(),
            route_changes: HashMap::new(),
        };
        let n = f.cfg.zones;
        for a in 0..n {
            // Ticks spread over the interval, as independent gateways' timers are.
            let phase = f.rng.duration(Duration::ZERO, f.cfg.ping_interval);
            f.push(phase, Ev::Tick { node: a });
            for b in 0..n {
                if a != b {
                    // The gateway whose ID sorts lower dials; both would, and keep that one.
                    if f.gws[a].id < f.gws[b].id {
                        f.gws[a].redial.insert(b, (Duration::ZERO, f.cfg.backoff_min));
                    }
                }
            }
        }
        f
    }

    fn push(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, ev)));
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    pub fn zone_of(&self, node: usize) -> &ZoneName {
        &self.gws[node].zone
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.gws[a].alive && self.gws[b].alive && !self.cut.contains(&pair(a, b))
    }

    /// Sends frames from `from` to `to` on their current connection (dropped if there is none).
    fn send(&mut self, from: usize, to: usize, msgs: &[Message]) {
        if !self.conns.contains_key(&(from, to)) {
            return;
        }
        let mut out = BytesMut::new();
        for m in msgs {
            let frame = control::encode(m).expect("frames encode");
            if matches!(m, Message::ServiceUpdate(_) | Message::ServiceWithdraw(_)) {
                self.report.catalog_update_bytes += frame.len() as u64;
            }
            out.extend_from_slice(&frame);
        }
        self.report.frames += msgs.len() as u64;
        self.enqueue(from, to, out.freeze());
    }

    /// Puts bytes on the stream `from` → `to`: they arrive after the link's delay, a jitter, and a
    /// retransmission timeout when "lost", never before the bytes sent ahead of them.
    fn enqueue(&mut self, from: usize, to: usize, bytes: Bytes) {
        self.report.control_bytes += bytes.len() as u64;
        let d = self.delay[&pair(from, to)];
        let jitter = self.rng.duration(Duration::ZERO, self.cfg.jitter);
        // A lost packet arrives one retransmission timeout later (~1.5 RTT).
        let resend = if self.rng.chance(self.cfg.loss) { d * 3 } else { Duration::ZERO };
        let Some(conn) = self.conns.get_mut(&(from, to)) else { return };
        let last = conn.fifo.back().map(|f| f.0).unwrap_or(Duration::ZERO);
        let at = (self.now + d + jitter + resend).max(last);
        conn.fifo.push_back((at, bytes));
        let gen = conn.gen;
        self.push(at, Ev::Deliver { to, from, gen });
    }

    /// Opens (or re-opens) the connection of a pair: both sides start a session and send their
    /// preface, hello and catalog snapshot, as `session::control_inner` does.
    fn connected(&mut self, a: usize, b: usize, gen: u64) {
        if self.gens.get(&pair(a, b)) != Some(&gen) || !self.reachable(a, b) {
            return;
        }
        for (x, y) in [(a, b), (b, a)] {
            self.conns.insert((x, y), Conn { gen, fifo: Default::default() });
            let t = liveness::Thresholds {
                interval: self.cfg.ping_interval,
                silent_after: self.cfg.peer_timeout,
                close_after: self.cfg.peer_close_timeout,
                frames: true,
                frame_deadline: Some(Duration::from_secs(10)),
                hello_within: Some(Duration::from_secs(5)),
            };
            let now = self.instant();
            let g = &mut self.gws[x];
            g.redial.remove(&y);
            let sent = g.catalog.clone();
            g.sessions.insert(
                y,
                Session {
                    live: Liveness::new(t, now, Counters::default()),
                    decoder: Decoder::new(),
                    sent: sent.clone(),
                    hello: false,
                    datagrams: 0,
                },
            );
            let hello = Message::Hello(Hello {
                zone: g.zone.clone(),
                gateway: GatewayId::new("gw-1").expect("id"),
                features: control::features::REVERSE_REQUESTS,
            });
            let mut msgs = vec![hello];
            msgs.extend(sent.snapshot());
            self.send_preface(x, y);
            self.send(x, y, &msgs);
        }
    }

    fn send_preface(&mut self, from: usize, to: usize) {
        self.enqueue(from, to, Bytes::copy_from_slice(&control::preface(control::VERSION)));
    }

    /// Ends the connection of a pair at both sides (a close, or a side that died).
    fn disconnect(&mut self, a: usize, b: usize) {
        if self.conns.contains_key(&(a, b)) || self.conns.contains_key(&(b, a)) {
            self.report.disconnects += 1;
        }
        for (x, y) in [(a, b), (b, a)] {
            self.conns.remove(&(x, y));
            if self.gws[x].sessions.remove(&y).is_some() {
                let id = self.gws[y].id.clone();
                self.gws[x].routes.peer_down(&id);
            }
        }
        // The lower ID redials, with backoff.
        let (d, p) = if self.gws[a].id < self.gws[b].id { (a, b) } else { (b, a) };
        let min = self.cfg.backoff_min;
        let entry = self.gws[d].redial.entry(p).or_insert((Duration::ZERO, min));
        entry.0 = self.now + entry.1;
        entry.1 = (entry.1 * 2).min(self.cfg.backoff_max);
    }

    fn deliver(&mut self, to: usize, from: usize, gen: u64) {
        if self.conns.get(&(from, to)).map(|c| c.gen) != Some(gen) {
            return;
        }
        if !self.reachable(from, to) {
            // A cut link: the sender retransmits until it heals or the connection is given up.
            if self.gws[from].alive && self.gws[to].alive {
                self.push(self.now + RETRANSMIT, Ev::Deliver { to, from, gen });
            }
            return;
        }
        let mut data = BytesMut::new();
        if let Some(conn) = self.conns.get_mut(&(from, to)) {
            while conn.fifo.front().is_some_and(|f| f.0 <= self.now) {
                if let Some((_, b)) = conn.fifo.pop_front() {
                    data.extend_from_slice(&b);
                }
            }
        }
        if data.is_empty() {
            return;
        }
        let now = self.instant();
        let peer_id = self.gws[from].id.clone();
        let mut replies = Vec::new();
        let mut close = false;
        {
            let g = &mut self.gws[to];
            let Some(s) = g.sessions.get_mut(&from) else { return };
            s.datagrams += 1;
            s.live.on_control_data(now);
            if s.decoder.feed(data.freeze()).is_err() {
                close = true;
            }
            let mut completed = false;
            while !close {
                match s.decoder.next_event() {
                    Ok(Some(control::Event::Preface)) => {}
                    Ok(Some(control::Event::Message(m))) => {
                        completed = true;
                        match m {
                            Message::Hello(h) => {
                                s.hello = true;
                                s.live.on_hello();
                                g.routes.peer_up(&peer_id, h.zone, h.gateway);
                            }
                            Message::Ping(p) => replies.push(Message::Pong(p)),
                            Message::Pong(_) => {
                                let rtt = self.delay[&pair(from, to)] * 2;
                                g.routes.set_rtt(&peer_id, rtt);
                            }
                            m @ (Message::Catalog(_) | Message::ServiceUpdate(_) | Message::ServiceWithdraw(_)) => {
                                close = g.routes.apply(&peer_id, &m).is_err();
                            }
                            _ => {}
                        }
                    }
                    Ok(None) => break,
                    Err(_) => close = true,
                }
            }
            s.live.on_decoded(now, false, completed);
        }
        if close {
            self.disconnect(to, from);
            return;
        }
        if !replies.is_empty() {
            self.send(to, from, &replies);
        }
    }

    fn tick(&mut self, node: usize) {
        self.push(self.now + self.cfg.ping_interval, Ev::Tick { node });
        if !self.gws[node].alive {
            return;
        }
        let now = self.instant();
        // Dial the peers due for it; the handshake takes one RTT when the path is there.
        let due: Vec<usize> =
            self.gws[node].redial.iter().filter(|(_, (at, _))| *at <= self.now).map(|(p, _)| *p).collect();
        for p in due {
            if let Some(e) = self.gws[node].redial.get_mut(&p) {
                e.0 = self.now + e.1;
                e.1 = (e.1 * 2).min(self.cfg.backoff_max);
            }
            if self.reachable(node, p) && !self.gws[node].sessions.contains_key(&p) {
                let gen = self.gens.entry(pair(node, p)).or_insert(0);
                *gen += 1;
                let gen = *gen;
                let rtt = self.delay[&pair(node, p)] * 2;
                self.push(self.now + rtt, Ev::Connected { a: node, b: p, gen });
            }
        }
        // Liveness, pings and catalog changes on every session.
        let peers: Vec<usize> = self.gws[node].sessions.keys().copied().collect();
        let catalog = self.gws[node].catalog.clone();
        for p in peers {
            let peer_id = self.gws[p].id.clone();
            let g = &mut self.gws[node];
            let Some(s) = g.sessions.get_mut(&p) else { continue };
            let counters = Counters { datagrams: s.datagrams, app_frames: 0 };
            let ev = s.live.tick(now, counters, s.hello);
            let diff = if s.sent.version != catalog.version { catalog.diff(&s.sent) } else { Vec::new() };
            if !diff.is_empty() || s.sent.version != catalog.version {
                s.sent = catalog.clone();
            }
            match ev {
                Some(liveness::Event::Silent { .. }) => g.routes.peer_silent(&peer_id),
                Some(liveness::Event::Heard { .. }) => g.routes.peer_heard(&peer_id),
                Some(liveness::Event::Close { .. }) => {
                    self.disconnect(node, p);
                    continue;
                }
                None => {}
            }
            let mut msgs = diff;
            msgs.push(Message::Ping(Ping { nonce: self.now.as_millis() as u64 }));
            self.send(node, p, &msgs);
        }
    }

    /// Runs the event loop until `until` (virtual time since the start).
    pub fn run_until(&mut self, until: Duration) {
        while let Some(Reverse((at, _, _))) = self.queue.peek() {
            if *at > until {
                break;
            }
            let Some(Reverse((at, _, ev))) = self.queue.pop() else { break };
            self.now = at;
            match ev {
                Ev::Deliver { to, from, gen } => self.deliver(to, from, gen),
                Ev::Tick { node } => {
                    self.tick(node);
                    self.count_route_changes(node);
                }
                Ev::Connected { a, b, gen } => self.connected(a, b, gen),
            }
        }
        self.now = until;
    }

    pub fn now(&self) -> Duration {
        self.now
    }

    fn first_zone(&self, node: usize, service: &ServiceName) -> Option<usize> {
        match self.gws[node].routes.candidates(service).first()? {
            Target::Local => Some(node),
            Target::Peer(id) => self.index.get(id).copied(),
        }
    }

    fn candidate_zones(&self, node: usize, service: &ServiceName) -> Vec<usize> {
        self.gws[node]
            .routes
            .candidates(service)
            .iter()
            .filter_map(|t| match t {
                Target::Local => Some(node),
                Target::Peer(id) => self.index.get(id).copied(),
            })
            .collect()
    }

    fn count_route_changes(&mut self, node: usize) {
        // Sampled at the node's ticks, for a bounded share of services (all in small fleets).
        for i in 0..self.cfg.services.min(200) {
            let s = self.names[i].clone();
            let r = self.first_zone(node, &s);
            let key = (node, s);
            let prev = self.last_route.insert(key.clone(), r);
            if prev.is_some() && prev != Some(r) {
                let c = self.route_changes.entry(key).or_insert(0);
                *c += 1;
                self.report.max_route_changes = self.report.max_route_changes.max(*c);
            }
        }
    }

    /// Where `service` may be served for `node` now, by the ground truth: zones alive, reachable
    /// from it, exporting it with a healthy endpoint.
    fn valid_zones(&self, node: usize, service: usize) -> Vec<usize> {
        let name = &self.names[service];
        self.exporters[service]
            .iter()
            .copied()
            .filter(|z| {
                (*z == node || self.reachable(node, *z)) && self.gws[*z].exports.get(name).is_some_and(|h| *h > 0)
            })
            .collect()
    }

    /// The reference model's check at this moment: every living gateway routes every service to a
    /// zone that serves it and that it can reach, and finds a route when one exists. Returns the
    /// violations (at most `limit`).
    pub fn violations(&self, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        for node in (0..self.gws.len()).filter(|n| self.gws[*n].alive) {
            for s in 0..self.cfg.services {
                let name = &self.names[s];
                let valid = self.valid_zones(node, s);
                let got = self.first_zone(node, name);
                // Every candidate (the first for new flows, the rest for failover) is valid, and
                // there is one whenever some zone can serve.
                let all = self.candidate_zones(node, name);
                let ok = all.iter().all(|z| valid.contains(z)) && (got.is_some() || valid.is_empty());
                if !ok {
                    out.push(format!(
                        "{}: {name} routed to {:?}, valid {:?}",
                        self.gws[node].zone,
                        got.map(|z| self.gws[z].zone.to_string()),
                        valid.iter().map(|z| self.gws[*z].zone.to_string()).collect::<Vec<_>>()
                    ));
                    if out.len() >= limit {
                        return out;
                    }
                }
            }
        }
        out
    }

    /// Runs until the reference model holds (checked every ping interval) or `limit` passes; the
    /// time it took, or the violations left.
    pub fn settle(&mut self, limit: Duration) -> Result<Duration, Vec<String>> {
        let start = self.now;
        loop {
            if self.violations(1).is_empty() {
                return Ok(self.now - start);
            }
            if self.now - start >= limit {
                return Err(self.violations(10));
            }
            let next = self.now + self.cfg.ping_interval;
            self.run_until(next);
        }
    }

    /// Kills a gateway: it stops sending and answering (its connections stay open at the others,
    /// as for a kill -9, until their liveness gives up).
    pub fn kill(&mut self, node: usize) {
        self.gws[node].alive = false;
        let peers: Vec<usize> = self.gws[node].sessions.keys().copied().collect();
        for p in peers {
            self.conns.remove(&(node, p));
            self.gws[node].sessions.remove(&p);
        }
    }

    /// Restarts a killed gateway with a fresh state (catalog version 1 again); its peers reconnect.
    pub fn restart(&mut self, node: usize) {
        let g = &mut self.gws[node];
        g.alive = true;
        g.catalog = Arc::new(LocalCatalog::new(ads(&g.exports)));
        g.routes = RouteTable::new(g.zone.clone(), HashMap::new());
        g.routes.set_local(g.catalog.services.values().cloned());
        let me = g.id.clone();
        for p in 0..self.gws.len() {
            if p != node {
                let (d, q) = if me < self.gws[p].id { (node, p) } else { (p, node) };
                self.gws[d].redial.insert(q, (self.now, self.cfg.backoff_min));
            }
        }
    }

    /// Cuts (or heals) every link between the two groups.
    pub fn partition(&mut self, left: &[usize], right: &[usize], cut: bool) {
        for a in left {
            for b in right {
                if cut {
                    self.cut.insert(pair(*a, *b));
                } else {
                    self.cut.remove(&pair(*a, *b));
                }
            }
        }
    }

    /// Flips the health of `share` of each zone's exports (the catalog churn of health checks) and
    /// republishes; returns the number of service changes.
    pub fn churn(&mut self, share: f64) -> u64 {
        let mut changes = 0;
        for z in 0..self.gws.len() {
            if !self.gws[z].alive {
                continue;
            }
            let names: Vec<ServiceName> = self.gws[z].exports.keys().cloned().collect();
            let mut changed = false;
            for n in names {
                if self.rng.chance(share) {
                    let h = self.gws[z].exports.get_mut(&n).expect("export");
                    *h = if *h > 0 { 0 } else { 1 };
                    changed = true;
                }
            }
            if changed {
                let g = &mut self.gws[z];
                if let Some(next) = g.catalog.next(ads(&g.exports)) {
                    changes += next.version - g.catalog.version;
                    g.catalog = Arc::new(next);
                    g.routes.set_local(g.catalog.services.values().cloned());
                }
            }
        }
        self.report.catalog_changes += changes;
        changes
    }

    /// Live (service, zone) entries over all route tables.
    pub fn route_entries(&self) -> u64 {
        self.gws
            .iter()
            .map(|g| {
                g.routes.peers().map(|(_, e)| e.services.len() as u64).sum::<u64>() + g.catalog.services.len() as u64
            })
            .sum()
    }
}

fn ads(exports: &BTreeMap<ServiceName, u32>) -> BTreeMap<ServiceName, ServiceAd> {
    exports
        .iter()
        .map(|(n, h)| {
            let ad = ServiceAd {
                name: n.clone(),
                protocol: Protocol::Tcp,
                port: 8080,
                healthy_endpoints: *h,
                labels: vec![],
            };
            (n.clone(), ad)
        })
        .collect()
}
