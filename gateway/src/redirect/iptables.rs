//! The redirector's iptables rules: nat REDIRECT of TCP bound for the VIP range to the capture
//! port, in OUTPUT (the node's own processes) and PREROUTING (pods routed through the node). Every
//! rule carries the comment [`TAG`], so the redirector removes exactly its own rules — on exit, and
//! with `causeway redirect --cleanup` after a crash — and nobody else's.

use std::net::SocketAddr;
use std::process::Command;

use anyhow::{bail, Context};

/// The comment on every rule this redirector installs.
pub const TAG: &str = "causeway-redirect";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chain {
    /// Connections from processes on the node itself.
    Output,
    /// Connections from pods whose traffic the node routes.
    Prerouting,
}

impl Chain {
    pub fn as_str(self) -> &'static str {
        match self {
            Chain::Output => "OUTPUT",
            Chain::Prerouting => "PREROUTING",
        }
    }
}

fn iptables(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .output()
        .context("cannot run iptables (is the iptables package installed?)")?;
    if !out.status.success() {
        bail!("iptables {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails with a clear message when this process may not change the nat table.
pub fn check_privilege() -> anyhow::Result<()> {
    iptables(&["-t", "nat", "-S", "OUTPUT"]).map(|_| ()).map_err(|e| {
        anyhow::anyhow!(
            "causeway redirect needs NET_ADMIN (root, or the CAP_NET_ADMIN capability; in Kubernetes a \
             privileged DaemonSet with hostNetwork) to install its iptables rules: {e:#}"
        )
    })
}

fn rule(chain: Chain, range: &str, port: u16) -> Vec<String> {
    [chain.as_str(), "-p", "tcp", "-d", range, "-m", "comment", "--comment", TAG, "-j", "REDIRECT", "--to-ports"]
        .iter()
        .map(|s| s.to_string())
        .chain([port.to_string()])
        .collect()
}

/// Installs one rule per chain; removes any leftovers of an earlier run first.
pub fn install(chains: &[Chain], range: &str, capture: SocketAddr) -> anyhow::Result<()> {
    cleanup()?;
    for chain in chains {
        let r = rule(*chain, range, capture.port());
        let mut args = vec!["-t", "nat", "-A"];
        args.extend(r.iter().map(String::as_str));
        iptables(&args)?;
    }
    Ok(())
}

/// Removes every nat rule tagged [`TAG`]. Returns how many were removed.
pub fn cleanup() -> anyhow::Result<usize> {
    let save = Command::new("iptables-save").args(["-t", "nat"]).output().context("cannot run iptables-save")?;
    if !save.status.success() {
        bail!("iptables-save: {}", String::from_utf8_lossy(&save.stderr).trim());
    }
    let text = String::from_utf8_lossy(&save.stdout);
    let mut removed = 0;
    for line in text.lines().filter(|l| l.starts_with("-A ")) {
        let words = split(line);
        let tagged = words.windows(2).any(|w| w[0] == "--comment" && w[1] == TAG);
        if !tagged {
            continue;
        }
        let mut args = vec!["-t".to_string(), "nat".to_string(), "-D".to_string()];
        args.extend(words.into_iter().skip(1));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        iptables(&args)?;
        removed += 1;
    }
    Ok(removed)
}

/// Splits an iptables-save rule into words, honouring double quotes (comments may be quoted).
fn split(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_saved_rules_with_quoted_comments() {
        let l = r#"-A OUTPUT -d 240.240.0.0/16 -p tcp -m comment --comment "causeway-redirect" -j REDIRECT --to-ports 15001"#;
        let w = split(l);
        assert_eq!(w[0], "-A");
        assert!(w.windows(2).any(|w| w[0] == "--comment" && w[1] == TAG));
        assert_eq!(w.last().map(String::as_str), Some("15001"));
        assert_eq!(split(r#"-A X -m comment --comment "a \"b\" c""#)[5], r#"a "b" c"#);
    }
}
