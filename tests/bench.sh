#!/usr/bin/env bash
# The benchmark suite (issue 4): Causeway beside direct TCP, an HAProxy TLS gateway pair and raw
# quinn, over network namespaces. Needs root. Writes target/bench/results.{md,json}.
# Usage: bash tests/bench.sh            full run (release build, 5 repetitions; ~25 min on 2 cores)
#        bash tests/bench.sh --smoke    1 repetition of everything, short runs (checks the harness)
#        bash tests/bench.sh --only B1,B3 --reps 7
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for p in haproxy iproute2 coreutils wrk; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
# The delay line uses TUN devices.
[ -c /dev/net/tun ] || { mkdir -p /dev/net && mknod /dev/net/tun c 10 200; }
# Debian starts the packaged HAProxy service on install; the bench runs its own.
systemctl disable --now haproxy >/dev/null 2>&1 || true
profile=release
for a in "$@"; do
  # The smoke run only checks the harness: the debug build CI already has will do.
  [ "$a" = "--smoke" ] && profile=debug
done
if [ "$profile" = release ]; then
  cargo build --release --bins
  exec target/release/causeway-bench run "$@"
else
  cargo build --bins
  exec target/debug/causeway-bench run "$@"
fi
