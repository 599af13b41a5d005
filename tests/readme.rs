//! The README's commands, run as written: the demo ("Two commands"), the install command ("Build
//! and install"), "Setting up gateways" in a network namespace of its own (its example binds fixed
//! ports), and the two-host quick start on two namespaces linked as 10.0.0.1 and 10.0.0.2.
//!
//! The commands are read from README.md itself, so a README edit that breaks one fails here. The
//! only liberties taken are the ones the README's own text allows: a debug build instead of
//! `--release`, a demo with fewer flows, a gateway that the README runs in the foreground started in
//! the background, and waits for a route before the command that needs it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use causeway_tests::causeway_bin;
use causeway_tests::netns::{available, link, Netns};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The text of the README's `## heading` section.
fn section(heading: &str) -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme.find(&format!("\n## {heading}\n")).unwrap_or_else(|| panic!("no section {heading:?}"));
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map(|i| i + 4).unwrap_or(rest.len());
    rest[..end].to_string()
}

/// The indented code blocks of a Markdown text, each dedented (its smallest indentation removed).
fn blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    let mut prev_blank = true;
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut flush = |cur: &mut Vec<&str>| {
        while cur.last().is_some_and(|l| l.trim().is_empty()) {
            cur.pop();
        }
        if !cur.is_empty() {
            let min = cur.iter().filter(|l| !l.trim().is_empty()).map(|l| indent(l)).min().unwrap_or(0);
            let lines: Vec<&str> = cur.iter().map(|l| if l.len() >= min { &l[min..] } else { "" }).collect();
            out.push(lines.join("\n"));
        }
        cur.clear();
    };
    for line in text.lines() {
        let code = indent(line) >= 4 && !line.trim().is_empty();
        let blank_inside = line.trim().is_empty() && !cur.is_empty();
        if (code && (prev_blank || !cur.is_empty())) || blank_inside {
            cur.push(line);
        } else {
            flush(&mut cur);
        }
        prev_blank = line.trim().is_empty();
    }
    flush(&mut cur);
    out
}

/// `PATH` with the directory of the `causeway` binary built for the tests first.
fn path_with_causeway() -> String {
    let bin = causeway_bin();
    assert!(bin.exists(), "{} is missing: run `cargo build --bins` first", bin.display());
    let dir = bin.parent().unwrap().display().to_string();
    format!("{dir}:{}", std::env::var("PATH").unwrap_or_default())
}

/// Runs `script` with bash (`-e`: the first failing command fails it) in `dir`, inside `ns` if
/// given. Returns (success, stdout, stderr).
fn bash(ns: Option<&Netns>, dir: &Path, script: &str) -> (bool, String, String) {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name, "bash", "-e", "-c", script]);
            c
        }
        None => {
            let mut c = Command::new("bash");
            c.args(["-e", "-c", script]);
            c
        }
    };
    let out = cmd.current_dir(dir).env("PATH", path_with_causeway()).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Kills every process left in a namespace (the README's `&` commands), then the namespace.
struct Host(Netns);

impl Drop for Host {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.0.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).output();
            }
        }
    }
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("causeway-readme-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn netns_or_skip() -> bool {
    if available() {
        return true;
    }
    assert!(std::env::var_os("CAUSEWAY_SKIP_NETNS").is_some(), "the README tests need root and iproute2");
    false
}

/// The log lines at level ERROR, in text or JSON format (not a field that merely contains the
/// word, such as `code=H3_NO_ERROR`).
fn error_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.split_whitespace().nth(1) == Some("ERROR") || l.contains("\"level\":\"ERROR\"")).collect()
}

/// Retries `script` in `ns` until it succeeds with output containing `want`, for up to `timeout`.
fn until(ns: &Netns, dir: &Path, script: &str, want: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (ok, out, err) = bash(Some(ns), dir, script);
        if ok && out.contains(want) {
            return out;
        }
        assert!(Instant::now() < deadline, "{script:?} never printed {want:?}: {out}{err}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_demo_runs_as_written() {
    let b = blocks(&section("Two commands"));
    assert_eq!(b[0], "cargo run --release -p causeway -- demo", "the README's demo command changed");
    // A debug build (already built for the tests) and fewer flows: the same command otherwise.
    let cmd = format!("{} --flows 20", b[0].replace(" --release", ""));
    let (ok, out, err) = bash(None, &repo(), &cmd);
    assert!(ok, "{cmd} failed:\n{out}\n{err}");
    assert!(out.contains("demo: all checks passed"), "{out}");
    let noisy: Vec<&str> =
        out.lines().chain(err.lines()).filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
    assert!(noisy.is_empty(), "the demo printed warnings or errors:\n{}", noisy.join("\n"));
    assert_eq!(b[1], "bash tests/run.sh");
}

#[test]
fn the_install_command_installs_the_binary() {
    let b = blocks(&section("Build and install"));
    assert_eq!(b[0], "cargo build --release -p causeway\ncargo install --locked --path gateway", "{b:?}");
    // The install, as the README allows, as a debug build; into a root of our own.
    let root = tempdir("install");
    let install = b[0].lines().nth(1).unwrap();
    let cmd = format!("{install} --debug --root {}", root.display());
    let (ok, out, err) = bash(None, &repo(), &cmd);
    assert!(ok, "{cmd} failed:\n{out}\n{err}");
    let bin = root.join("bin/causeway");
    let version = Command::new(&bin).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("causeway "), "{version:?}");
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn setting_up_gateways_runs_as_written() {
    if !netns_or_skip() {
        return;
    }
    // The README runs these from a directory inside the repository: a copy of the examples.
    let dir = tempdir("setup");
    std::fs::create_dir_all(dir.join("deploy/examples")).unwrap();
    for f in ["eu-west.yaml", "mesh-document.yaml"] {
        std::fs::copy(repo().join("deploy/examples").join(f), dir.join("deploy/examples").join(f)).unwrap();
    }
    let host = Host(Netns::new(&format!("cwr{}-setup", std::process::id() % 10_000)).unwrap());
    let b = blocks(&section("Setting up gateways"));
    let script = b.join("\n");
    assert!(script.contains("causeway check --config eu-west.yaml"), "{script}");
    let mut lines = Vec::new();
    for line in script.lines() {
        if line.starts_with("causeway gateway ") {
            // The README runs it in the foreground; the next command needs this shell.
            lines.push(format!("{line} > gateway.log 2>&1 &"));
            lines.push(
                "for i in $(seq 100); do curl -sf http://127.0.0.1:9901/ready >/dev/null && break; sleep 0.1; done"
                    .into(),
            );
        } else {
            lines.push(line.to_string());
        }
    }
    let (ok, out, err) = bash(Some(&host.0), &dir, &lines.join("\n"));
    let log = std::fs::read_to_string(dir.join("gw/gateway.log")).unwrap_or_default();
    assert!(ok, "the commands failed:\n{out}\n{err}\ngateway log:\n{log}");
    // Its peers are the example's addresses (203.0.113.x, unreachable here): listed, down.
    assert!(out.contains("eu-west.yaml: ok"), "check did not pass:\n{out}");
    assert!(out.contains("us-east") && out.contains("ap-south"), "status shows no peers:\n{out}");
    // The example document, published and applied here; the unreachable peers are behind.
    assert!(out.contains("published version 1"), "apply did not publish:\n{out}");
    let mine = out.lines().filter(|l| l.starts_with("eu-west ") && l.contains(" applied ")).count();
    assert!(mine >= 2, "eu-west never applied the document (apply's and status's tables):\n{out}");
    assert!(out.lines().any(|l| l.starts_with("us-east ") && l.contains(" behind ")), "{out}");
    assert!(error_lines(&log).is_empty(), "{log}");
    drop(host);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_two_host_quick_start_runs_as_written() {
    if !netns_or_skip() {
        return;
    }
    let id = std::process::id() % 10_000;
    let a = Host(Netns::new(&format!("cwr{id}-hosta")).unwrap());
    let b = Host(Netns::new(&format!("cwr{id}-hostb")).unwrap());
    link(&a.0, &format!("cwr{id}a"), "10.0.0.1/24", &b.0, &format!("cwr{id}b"), "10.0.0.2/24").unwrap();
    let blocks = blocks(&section("Quick start: two hosts"));
    assert_eq!(blocks.len(), 3, "{blocks:?}");
    let (dir_a, dir_b) = (tempdir("hosta"), tempdir("hostb"));
    let (ok, out, err) = bash(Some(&a.0), &dir_a, &blocks[0]);
    assert!(ok, "host A's commands failed:\n{out}\n{err}");
    // "Copy the directory west/ to host B."
    let (ok, _, err) = bash(None, &dir_a, &format!("cp -r west {}", dir_b.display()));
    assert!(ok, "{err}");
    let (ok, out, err) = bash(Some(&b.0), &dir_b, &blocks[1]);
    assert!(ok, "host B's commands failed:\n{out}\n{err}");
    // The gateways peer and exchange catalogs (a person typing takes longer than this).
    let curl = blocks[2].lines().next().unwrap();
    assert!(curl.starts_with("curl "), "{curl}");
    let page = until(&a.0, &dir_a, curl, "Directory listing", Duration::from_secs(30));
    assert!(page.contains("west/"), "the page is not host B's directory:\n{page}");
    let (ok, out, err) = bash(Some(&a.0), &dir_a, &blocks[2]);
    assert!(ok, "host A's check failed:\n{out}\n{err}");
    assert!(out.contains("west") && out.contains("web.demo"), "status shows no peer or route:\n{out}");
    for (dir, log) in [(&dir_a, "east.log"), (&dir_b, "west.log")] {
        let text = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
        assert!(error_lines(&text).is_empty(), "{log}:\n{text}");
    }
    drop((a, b));
    let _ = std::fs::remove_dir_all(dir_a);
    let _ = std::fs::remove_dir_all(dir_b);
}

#[test]
fn blocks_are_read_as_markdown_renders_them() {
    let md = "text\n\n    one\n    two\n\n    three\n\n1. item\n\n       cmd --x\n\n   more\n";
    assert_eq!(blocks(md), vec!["one\ntwo\n\nthree".to_string(), "cmd --x".to_string()]);
}
