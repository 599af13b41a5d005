//! The fleet simulator's scenarios (`support/sim.rs`): the overlay's real routing core — route
//! table, liveness, catalog versions and diffs — in every gateway of a fleet on virtual time,
//! checked against a reference model of where each service may be served.
//!
//! CI runs a 12-zone fleet. The 200-zone, 5,000-service figures of BENCHMARKS.md come from
//! `CAUSEWAY_SIM_FULL=1 cargo test --release -p causeway-tests --test sim fleet_report -- --nocapture`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use causeway_tests::sim::{Config, Fleet};

fn config(seed: u64) -> Config {
    if std::env::var_os("CAUSEWAY_SIM_FULL").is_some() {
        Config::full(seed)
    } else {
        Config::small(seed)
    }
}

/// A fleet that has converged (every gateway routes every service by the reference model).
fn converged(seed: u64) -> Fleet {
    let mut f = Fleet::new(config(seed));
    f.run_until(Duration::from_secs(2));
    let t = f.settle(Duration::from_secs(20)).unwrap_or_else(|v| panic!("never converged: {v:#?}"));
    eprintln!("{} zones, {} services: converged {:?} after the first 2 s", f.cfg.zones, f.cfg.services, t);
    f
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Detection bound: silent past peer_timeout, noticed at the next tick, plus what was still in
/// flight when the zone died (a frame sent just before, delayed, maybe retransmitted once).
fn detection_bound(c: &Config) -> Duration {
    c.peer_timeout + c.ping_interval + c.max_delay * 4 + c.jitter
}

#[test]
fn a_lost_zone_is_routed_around_by_every_gateway_within_the_detection_window() {
    for seed in [1, 2, 3] {
        let mut f = converged(seed);
        let dead = (seed as usize * 5) % f.cfg.zones;
        f.kill(dead);
        let t = f.settle(Duration::from_secs(10)).unwrap_or_else(|v| panic!("seed {seed}: {v:#?}"));
        eprintln!("seed {seed}: every gateway routes around zone {} after {:.0} ms", f.zone_of(dead), ms(t));
        assert!(t <= detection_bound(&f.cfg), "seed {seed}: {t:?} > {:?}", detection_bound(&f.cfg));
        // And nothing routes to it for as long as it stays dead (connections closed, redials fail).
        f.run_until(f.now() + Duration::from_secs(8));
        assert_eq!(f.violations(5), Vec::<String>::new());
    }
}

#[test]
fn a_partition_splits_the_routes_and_its_heal_brings_them_back() {
    let mut f = converged(7);
    let n = f.cfg.zones;
    let (left, right): (Vec<usize>, Vec<usize>) = (0..n).partition(|z| z % 2 == 0);
    f.partition(&left, &right, true);
    let t = f.settle(Duration::from_secs(10)).unwrap_or_else(|v| panic!("{v:#?}"));
    eprintln!("partition: both halves route within themselves after {:.0} ms", ms(t));
    assert!(t <= detection_bound(&f.cfg));
    // Long enough for the connections across to be given up (peer_close_timeout).
    f.run_until(f.now() + Duration::from_secs(8));
    assert_eq!(f.violations(5), Vec::<String>::new());
    f.partition(&left, &right, false);
    // Routes return within backoff_max plus a handshake.
    let bound = f.cfg.backoff_max + Duration::from_secs(1);
    let t = f.settle(bound).unwrap_or_else(|v| panic!("never healed: {v:#?}"));
    eprintln!("partition healed: every route back after {:.0} ms (bound {:?})", ms(t), bound);
}

#[test]
fn a_blackhole_shorter_than_the_close_timeout_costs_no_connection() {
    let mut f = converged(11);
    let n = f.cfg.zones;
    let (left, right): (Vec<usize>, Vec<usize>) = (0..n).partition(|z| *z < n / 2);
    let lost = f.report.disconnects;
    f.partition(&left, &right, true);
    f.run_until(f.now() + Duration::from_secs(2));
    f.partition(&left, &right, false);
    // Heard again within a round trip and a retransmission: no redial needed (that would take at
    // least the backoff).
    let t = f.settle(Duration::from_secs(2)).unwrap_or_else(|v| panic!("{v:#?}"));
    eprintln!("2 s blackhole: routes back {:.0} ms after it ended", ms(t));
    assert_eq!(f.report.disconnects, lost, "a connection was given up during a 2 s blackhole");
}

#[test]
fn a_flapping_link_moves_routes_at_most_twice_per_flap() {
    let mut f = converged(5);
    let (a, b) = (0, 1);
    let before = f.report.max_route_changes;
    // Dark 700 ms (past peer_timeout), light 700 ms, ten times.
    for _ in 0..10 {
        f.partition(&[a], &[b], true);
        f.run_until(f.now() + Duration::from_millis(700));
        f.partition(&[a], &[b], false);
        f.run_until(f.now() + Duration::from_millis(700));
    }
    let changes = f.report.max_route_changes - before;
    eprintln!("flapping link (10 flaps): at most {changes} route changes for one (gateway, service)");
    assert!(changes <= 20, "{changes} route changes for 10 flaps");
    assert!(f.settle(Duration::from_secs(2)).is_ok());
}

#[test]
fn catalog_churn_costs_each_peer_bytes_per_change_not_per_catalog() {
    let mut f = converged(9);
    let (bytes0, changes0) = (f.report.catalog_update_bytes, f.report.catalog_changes);
    for _ in 0..10 {
        f.churn(0.05);
        f.run_until(f.now() + Duration::from_secs(1));
    }
    let t = f.settle(Duration::from_secs(2)).unwrap_or_else(|v| panic!("{v:#?}"));
    let changes = f.report.catalog_changes - changes0;
    let bytes = f.report.catalog_update_bytes - bytes0;
    let peers = (f.cfg.zones - 1) as f64;
    let per = bytes as f64 / changes.max(1) as f64 / peers;
    eprintln!("churn: {changes} service changes, {per:.1} bytes per change per peer; settled {:.0} ms after", ms(t));
    assert!(changes > 0);
    assert!(per < 64.0, "{per} bytes per change per peer");
}

#[test]
fn a_restarted_gateway_is_routed_to_again() {
    let mut f = converged(13);
    let z = 3;
    f.kill(z);
    f.run_until(f.now() + Duration::from_secs(7));
    f.restart(z);
    let bound = f.cfg.backoff_max + Duration::from_secs(1);
    let t = f.settle(bound).unwrap_or_else(|v| panic!("{v:#?}"));
    eprintln!("restart: zone {} routed to again after {:.0} ms", f.zone_of(z), ms(t));
    let entries = f.route_entries();
    eprintln!("route entries over the fleet: {entries}");
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = |seed| {
        let mut f = Fleet::new(Config { zones: 6, services: 30, ..Config::small(seed) });
        f.run_until(Duration::from_secs(3));
        f.kill(2);
        f.run_until(Duration::from_secs(5));
        (f.report.frames, f.report.control_bytes)
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// CPU time of this process (user + system), from /proc/self/stat (clock ticks of 10 ms).
fn cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    // Fields after the command: state, ppid, pgrp, session, tty_nr, tpgid, flags, minflt,
    // cminflt, majflt, cmajflt, utime, stime (`proc(5)`).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// The report of BENCHMARKS.md "Fleet simulation": convergence, failover of a lost zone, control
/// bytes per change, route-table memory per (service, zone), CPU per simulated gateway.
#[test]
fn fleet_report() {
    let (rss0, cpu0, wall0) = (rss_bytes(), cpu(), std::time::Instant::now());
    let mut f = converged(21);
    let entries = f.route_entries();
    let rss = rss_bytes().saturating_sub(rss0);
    let virt = f.now();
    let mut lost = Vec::new();
    for k in 0..3 {
        let dead = (k * 7 + 1) % f.cfg.zones;
        f.kill(dead);
        lost.push(f.settle(Duration::from_secs(10)).unwrap_or_else(|v| panic!("{v:#?}")));
        f.run_until(f.now() + Duration::from_secs(6));
        f.restart(dead);
        f.settle(f.cfg.backoff_max + Duration::from_secs(1)).unwrap_or_else(|v| panic!("{v:#?}"));
    }
    let (b0, c0) = (f.report.catalog_update_bytes, f.report.catalog_changes);
    for _ in 0..5 {
        f.churn(0.01);
        f.run_until(f.now() + Duration::from_secs(1));
    }
    let per_change = (f.report.catalog_update_bytes - b0) as f64
        / (f.report.catalog_changes - c0).max(1) as f64
        / (f.cfg.zones - 1) as f64;
    let (cpu, wall) = (cpu().saturating_sub(cpu0), wall0.elapsed());
    let gw_secs = f.cfg.zones as f64 * f.now().as_secs_f64();
    eprintln!(
        "fleet: {} zones, {} services, {} (service, zone) entries in all route tables",
        f.cfg.zones, f.cfg.services, entries
    );
    eprintln!(
        "  converged in {:?} of simulated time; memory after convergence {:.1} MiB ({:.0} B per entry)",
        virt,
        rss as f64 / 1048576.0,
        rss as f64 / entries.max(1) as f64
    );
    eprintln!("  lost zone routed around by every gateway after {:?} (peer_timeout {:?})", lost, f.cfg.peer_timeout);
    eprintln!("  catalog churn: {per_change:.1} bytes per service change per peer");
    eprintln!(
        "  {:.1} s simulated; CPU {:.1} s ({:.2} ms per simulated gateway-second), wall {:.1} s",
        f.now().as_secs_f64(),
        cpu.as_secs_f64(),
        cpu.as_secs_f64() * 1000.0 / gw_secs,
        wall.as_secs_f64()
    );
    eprintln!("  control traffic: {} frames, {:.1} MiB", f.report.frames, f.report.control_bytes as f64 / 1048576.0);
    assert!(lost.iter().all(|t| *t <= detection_bound(&f.cfg)), "{lost:?}");
    assert!(per_change < 64.0);
}
