#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 20 s each). Needs the nightly toolchain;
# installs cargo-fuzz when missing. Usage: bash fuzz/ci.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked --quiet cargo-fuzz
for t in control_decoder frame_guard identity certificate config mesh_dns document; do
  echo "== fuzz $t (${secs}s)"
  cargo +nightly fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -3
done
