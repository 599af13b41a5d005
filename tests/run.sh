#!/usr/bin/env bash
# Runs every test of the project, installing what the tests need first.
# Usage: bash tests/run.sh            (from the repository root; root or sudo for package installs)
# Order: unit and property tests, then the loopback meshes and gateway processes.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the suites use (network namespaces, iptables capture, real clients and servers).
# Installed only when missing. Chromium (headless) loads the admin topology page.
debs=(iproute2 procps iptables curl redis-server redis-tools python3 haproxy wrk chromium)
missing=()
for p in "${debs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

# Debian's prometheus package, for promtool and a real Prometheus in the metrics tests: unpacked
# (dpkg -x), not installed — installing it would start a service — into a per-machine cache outside
# the clone (CAUSEWAY_PROMETHEUS_DIR overrides where the tests look).
prom_cache=/var/cache/causeway-ci
export CAUSEWAY_PROMETHEUS_DIR="${CAUSEWAY_PROMETHEUS_DIR:-$prom_cache/prometheus}"
if [ ! -x "$CAUSEWAY_PROMETHEUS_DIR/usr/bin/promtool" ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo mkdir -p "$prom_cache"
  fetch() { (cd "$prom_cache" && $sudo apt-get download -qq prometheus 2>/dev/null); }
  fetch || { $sudo apt-get update -qq && fetch; }
  $sudo rm -rf "$prom_cache/prometheus.tmp"
  $sudo dpkg -x "$(ls -t "$prom_cache"/prometheus_*.deb | head -1)" "$prom_cache/prometheus.tmp"
  $sudo mv "$prom_cache/prometheus.tmp" "$CAUSEWAY_PROMETHEUS_DIR"
fi

# PyPI tools: offline Kubernetes schema validation of deploy/kubernetes; real gRPC and WebSocket
# programs (grpcio, websockets) at both ends of the HTTP tests; aioquic, an independent HTTP/3
# client.
command -v kubernetes-validate >/dev/null 2>&1 || python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
python3 -c "import grpc, websockets, aioquic" 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check grpcio websockets aioquic
# A real OTLP receiver for the trace-export test: oteltest's sink decodes the protobuf requests
# with the OpenTelemetry project's generated types.
python3 -c "import oteltest.sink" 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check oteltest

# A real kube-apiserver and etcd for the Kubernetes tests: built from the Go module proxy once per
# machine (about 5 minutes on 2 cores) into a cache outside the clone (CAUSEWAY_K8S_DIR overrides).
CAUSEWAY_K8S_DIR="$(bash tests/k8s/build.sh | tail -1)"
export CAUSEWAY_K8S_DIR

# The process-level tests (kill -9, CLI) run the real binary.
cargo build --bins
echo "== unit and property tests"
cargo test --workspace --lib --bins
cargo test -p causeway-protocol --test vectors
echo "== integration tests (loopback meshes, gateway processes)"
cargo test -p causeway-tests --test cli --test control --test failover --test flows --test identity --test redirect --test hardening --test faults --test rotation --test reload --test control_plane --test kubernetes --test http --test http_protocols --test policy --test observability --test readme --test sim
echo "== network-namespace tests (iptables capture, mesh DNS, curl, redis-benchmark)"
cargo test -p causeway-tests --test netns
echo "== fault suite (loss, bursts, reordering, duplication, corruption through the impairment relay)"
cargo test -p causeway-tests --test impair
echo "== benchmark harness, one short repetition (the figures are not checked: see BENCHMARKS.md)"
bash tests/bench.sh --smoke --out target/bench-smoke
