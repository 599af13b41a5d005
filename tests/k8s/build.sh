#!/usr/bin/env bash
# Builds a real kube-apiserver and etcd from the Go module proxy, once per machine, for the
# Kubernetes tests (no package of either exists in the registries these machines reach). The
# binaries go to a cache outside the clone: $CAUSEWAY_K8S_DIR, default
# /var/cache/causeway-ci/k8s-<version>. A first build takes several minutes on 2 cores.
# Usage: bash tests/k8s/build.sh   (prints the directory holding kube-apiserver and etcd)
set -euo pipefail
K8S=v1.34.2       # k8s.io/kubernetes
STAGING=v0.34.2   # the k8s.io/* staging modules of that release
ETCD=v3.6.13      # go.etcd.io/etcd/server/v3 (Kubernetes 1.34 runs etcd 3.6)
out=${CAUSEWAY_K8S_DIR:-/var/cache/causeway-ci/k8s-$K8S}
if [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ]; then
  echo "$out"
  exit 0
fi
command -v go >/dev/null || { echo "go is needed to build kube-apiserver and etcd" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export GOFLAGS=-mod=mod CGO_ENABLED=0
mkdir -p "$work/apiserver" "$work/etcd" "$out.tmp"

# kube-apiserver: k8s.io/kubernetes replaces its staging modules with local paths, so a module of
# our own requires it and pins each staging module to the release instead.
cd "$work/apiserver"
go mod init causeway.test/apiserver >/dev/null 2>&1
gomod=$(go mod download -json "k8s.io/kubernetes@$K8S" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
{
  echo "require k8s.io/kubernetes $K8S"
  grep -E '^\s*k8s\.io/[A-Za-z0-9._-]+ => \./staging/' "$gomod" | awk -v v="$STAGING" '{print "replace " $1 " => " $1 " " v}'
} >> go.mod
printf '//go:build tools\n\npackage tools\n\nimport _ "k8s.io/kubernetes/cmd/kube-apiserver/app"\n' > tools.go
go mod tidy -e >/dev/null 2>&1 || true
go build -trimpath -ldflags=-s -o "$out.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver

# etcd: its server module's root package is the etcd command.
cd "$work/etcd"
go mod init causeway.test/etcd >/dev/null 2>&1
go get "go.etcd.io/etcd/server/v3@$ETCD" >/dev/null 2>&1
go build -trimpath -ldflags=-s -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3

rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"
