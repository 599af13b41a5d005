//! Network-namespace topologies for tests: namespaces, veth links, processes inside them. Every
//! namespace and process is removed when its handle drops, pass or fail. Needs root (as CI runs).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use anyhow::{bail, Context};

/// Whether this process can create namespaces (root with `ip`).
pub fn available() -> bool {
    Command::new("ip").args(["netns", "list"]).output().is_ok_and(|o| o.status.success())
        && std::fs::metadata("/proc/self/ns/net").is_ok()
        && unsafe_free_uid() == 0
}

fn unsafe_free_uid() -> u32 {
    // The owner of /proc/self is our effective uid.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX)
}

/// Runs a command, failing with its output when it fails.
pub fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One network namespace.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(&["ip", "netns", "add", name])?;
        let ns = Self { name: name.to_string() };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace and returns its stdout (fails on a non-zero exit).
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Runs a command inside the namespace and returns its whole output, whatever the exit status.
    pub fn output(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new("ip").args(["netns", "exec", &self.name]).args(args).output()?)
    }

    /// Starts a long-running process inside the namespace, its stdout and stderr going to `log`.
    pub fn spawn(&self, args: &[&str], log: &Path) -> anyhow::Result<Proc> {
        let f = std::fs::File::create(log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()?;
        Ok(Proc { child, log: log.to_path_buf() })
    }

    /// Makes processes in this namespace resolve names with `nameserver` (ip netns exec bind-mounts
    /// /etc/netns/<name>/resolv.conf over /etc/resolv.conf).
    pub fn set_resolver(&self, nameserver: &str) -> anyhow::Result<()> {
        let dir = PathBuf::from("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("resolv.conf"), format!("nameserver {nameserver}\noptions timeout:2 attempts:2\n"))?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&self.name));
    }
}

/// A veth pair between two namespaces, with an address on each end (`10.1.2.3/24`).
pub fn link(a: &Netns, a_if: &str, a_ip: &str, b: &Netns, b_if: &str, b_ip: &str) -> anyhow::Result<()> {
    run(&["ip", "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns", &b.name])?;
    for (ns, ifc, ip) in [(a, a_if, a_ip), (b, b_if, b_ip)] {
        ns.exec(&["ip", "addr", "add", ip, "dev", ifc])?;
        ns.exec(&["ip", "link", "set", ifc, "up"])?;
    }
    Ok(())
}

/// A process in a namespace, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (e.g. "TERM", "KILL") and waits for the process to exit.
    pub fn signal(&mut self, sig: &str) -> Option<std::process::ExitStatus> {
        // `ip netns exec` execs the command, so the child's pid is the program's.
        let _ = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).output();
        self.child.wait().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
