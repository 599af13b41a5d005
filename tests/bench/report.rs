//! Results: every repetition kept, medians and ranges, ratios taken within each repetition (the
//! arms of one repetition ran back to back, so they saw the same machine), targets checked.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::json;

use crate::Opts;

pub struct Series {
    pub id: String,
    pub label: String,
    pub unit: String,
    pub higher_is_better: bool,
    pub note: String,
    /// Arm → one value per repetition, in order.
    pub by_arm: BTreeMap<String, Vec<f64>>,
}

impl Series {
    pub fn new(id: &str, label: &str, unit: &str, higher_is_better: bool) -> Self {
        Self {
            id: id.into(),
            label: label.into(),
            unit: unit.into(),
            higher_is_better,
            note: String::new(),
            by_arm: BTreeMap::new(),
        }
    }

    pub fn push(&mut self, arm: &str, v: f64) {
        self.by_arm.entry(arm.to_string()).or_default().push(v);
    }

    /// Median, min and max of the samples that did not fail (NaN).
    fn stats(v: &[f64]) -> Option<(f64, f64, f64)> {
        let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        let mid = s.len() / 2;
        let median = if s.len() % 2 == 1 { s[mid] } else { (s[mid - 1] + s[mid]) / 2.0 };
        Some((median, s[0], s[s.len() - 1]))
    }

    /// Per-repetition ratios arm ÷ base, summarised.
    pub fn ratio(&self, arm: &str, base: &str) -> Option<(f64, f64, f64)> {
        let (a, b) = (self.by_arm.get(arm)?, self.by_arm.get(base)?);
        let r: Vec<f64> =
            a.iter().zip(b).filter(|(a, b)| a.is_finite() && b.is_finite() && **b != 0.0).map(|(a, b)| a / b).collect();
        Self::stats(&r)
    }

    pub fn median(&self, arm: &str) -> Option<f64> {
        Self::stats(self.by_arm.get(arm)?).map(|s| s.0)
    }
}

pub struct Report {
    pub series: Vec<Series>,
    /// Samples that failed, with their error (they count as missing, not as zero).
    pub failures: Vec<String>,
    opts: serde_json::Value,
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

impl Report {
    pub fn new(o: &Opts) -> Self {
        let opts = json!({
            "reps": o.reps, "secs": o.secs, "idle_flows": o.idle_flows, "workers": o.workers, "smoke": o.smoke,
        });
        Self { series: vec![], failures: vec![], opts }
    }

    pub fn add(&mut self, s: Series) {
        self.series.push(s);
    }

    /// A latency series plus what each arm adds over direct TCP, repetition by repetition.
    pub fn add_latency(&mut self, s: Series) {
        let mut added = Series::new(&format!("{} added", s.id), "latency added over direct TCP", &s.unit, false);
        if let Some(direct) = s.by_arm.get("direct") {
            for (arm, v) in &s.by_arm {
                if arm != "direct" {
                    for (a, d) in v.iter().zip(direct) {
                        added.push(arm, a - d);
                    }
                }
            }
        }
        self.series.push(s);
        self.series.push(added);
    }

    fn get(&self, id: &str) -> Option<&Series> {
        self.series.iter().find(|s| s.id == id)
    }

    /// (target, measured, met)
    pub fn targets(&self) -> Vec<(String, Option<f64>, bool)> {
        let mut t = vec![];
        let mut check = |name: String, v: Option<f64>, ok: fn(f64) -> bool| {
            let met = v.is_some_and(ok);
            t.push((name, v, met));
        };
        let ratio = |id: &str| self.get(id).and_then(|s| s.ratio("causeway", "haproxy")).map(|r| r.0);
        let med = |id: &str| self.get(id).and_then(|s| s.median("causeway"));
        if self.get("B1").is_some() {
            check("B1 throughput ÷ HAProxy pair ≥ 1.0".into(), ratio("B1"), |v| v >= 1.0);
        }
        if let (Some(r0), Some(r50)) = (ratio("B1r 0 ms"), ratio("B1r 50 ms")) {
            check("B1r ratio at 50 ms ÷ ratio at 0 ms ≥ 0.8".into(), Some(r50 / r0), |v| v >= 0.8);
        }
        for n in [8, 64] {
            if self.get(&format!("B2 ×{n}")).is_some() {
                check(format!("B2 ×{n} aggregate ÷ HAProxy pair ≥ 1.0"), ratio(&format!("B2 ×{n}")), |v| v >= 1.0);
                check(format!("B2 ×{n} fairness ≥ 0.95"), med(&format!("B2 ×{n} fairness")), |v| v >= 0.95);
            }
        }
        if let Some(s) = self.get("B2 ×128 slowest") {
            let min = s.by_arm.get("causeway").and_then(|v| v.iter().copied().reduce(f64::min));
            check("B2 ×128: no stalled flow (slowest > 0 Mbit/s)".into(), min, |v| v > 0.0);
        }
        for size in [64, 1024] {
            for (q, limit) in [("p50", 1.3), ("p99", 2.0)] {
                let id = format!("B3 {size} B {q} added");
                if self.get(&id).is_some() {
                    let f: fn(f64) -> bool = if limit < 1.5 { |v| v <= 1.3 } else { |v| v <= 2.0 };
                    check(format!("B3 {size} B added {q} ÷ HAProxy's ≤ {limit}"), ratio(&id), f);
                }
            }
        }
        for n in [1, 32] {
            if self.get(&format!("B5 ×{n}")).is_some() {
                check(format!("B5 ×{n} new flows ÷ HAProxy pair ≥ 4"), ratio(&format!("B5 ×{n}")), |v| v >= 4.0);
            }
        }
        if self.get("B6").is_some() {
            check("B6 ≤ 12 KiB per idle flow".into(), med("B6"), |v| v <= 12.0);
        }
        if let Some(s) = self.get("B8") {
            let max = s.by_arm.get("causeway").and_then(|v| v.iter().copied().reduce(f64::max));
            check("B8 failover ≤ 1000 ms (worst repetition)".into(), max, |v| v <= 1000.0);
        }
        if self.get("B11 rps").is_some() {
            check("B11 requests/s ÷ HAProxy HTTP pair ≥ 1.0".into(), ratio("B11 rps"), |v| v >= 1.0);
            check("B11 p99 ÷ HAProxy HTTP pair's ≤ 1.5".into(), ratio("B11 p99"), |v| v <= 1.5);
        }
        for id in ["B4 tcp", "B4 http"] {
            if self.get(id).is_some() {
                check(format!("{id}: first byte ≤ 1.2 RTT"), med(id), |v| v <= 1.2);
            }
        }
        if self.get("B10").is_some() {
            check("B10 p99 beside bulk ÷ idle p99 ≤ 2".into(), med("B10"), |v| v <= 2.0);
        }
        t
    }

    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let _ = writeln!(
            m,
            "Medians of {} repetition(s) with [min–max]; ratios are taken within each repetition.\n",
            self.opts["reps"]
        );
        let _ = writeln!(m, "| measurement | arm | median | range | ÷ haproxy | ÷ direct |");
        let _ = writeln!(m, "|---|---|---:|---:|---:|---:|");
        for s in &self.series {
            for (arm, v) in &s.by_arm {
                let Some((med, lo, hi)) = Series::stats(v) else { continue };
                let r = |base: &str| match s.ratio(arm, base) {
                    Some((r, lo, hi)) if arm != base => format!("{} [{}–{}]", fmt(r), fmt(lo), fmt(hi)),
                    _ => String::new(),
                };
                let _ = writeln!(
                    m,
                    "| {} ({}) | {arm} | {} {} | {}–{} | {} | {} |",
                    s.id,
                    s.label,
                    fmt(med),
                    s.unit,
                    fmt(lo),
                    fmt(hi),
                    r("haproxy"),
                    r("direct")
                );
            }
            if !s.note.is_empty() {
                let _ = writeln!(m, "| {} | note: {} | | | | |", s.id, s.note);
            }
        }
        if !self.failures.is_empty() {
            let _ = writeln!(m, "\nFailed samples (left out of the figures above):\n");
            for f in &self.failures {
                let _ = writeln!(m, "- {f}");
            }
        }
        let _ = writeln!(m, "\n| target (Causeway) | measured | met |\n|---|---:|---|");
        for (name, v, met) in self.targets() {
            let _ = writeln!(
                m,
                "| {name} | {} | {} |",
                v.map(fmt).unwrap_or("–".into()),
                if met { "yes" } else { "**no**" }
            );
        }
        m
    }

    pub fn json(&self) -> serde_json::Value {
        let series: Vec<_> = self
            .series
            .iter()
            .map(|s| {
                let arms: serde_json::Map<_, _> = s
                    .by_arm
                    .iter()
                    .map(|(arm, v)| {
                        let st = Series::stats(v).unwrap_or_default();
                        let ratio = |b: &str| s.ratio(arm, b).map(|r| json!({"median": r.0, "min": r.1, "max": r.2}));
                        (
                            arm.clone(),
                            json!({
                                "samples": v, "median": st.0, "min": st.1, "max": st.2,
                                "ratio_vs_haproxy": ratio("haproxy"), "ratio_vs_direct": ratio("direct"),
                            }),
                        )
                    })
                    .collect();
                json!({ "id": s.id, "label": s.label, "unit": s.unit, "higher_is_better": s.higher_is_better,
                        "note": s.note, "arms": arms })
            })
            .collect();
        let targets: Vec<_> =
            self.targets().into_iter().map(|(n, v, met)| json!({"target": n, "measured": v, "met": met})).collect();
        json!({
            "machine": {
                "cpus": sh("nproc"), "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
                "kernel": sh("uname -r"), "memory": sh("grep MemTotal /proc/meminfo"),
            },
            "git": sh("git rev-parse --short HEAD"),
            "date": sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
            "options": self.opts,
            "series": series,
            "failures": self.failures,
            "targets": targets,
        })
    }
}
