#!/usr/bin/env bash
# Builds the local control plane's binaries (etcd, kube-apiserver, kubectl, helm) from their Go
# modules into a cache folder keyed by version, and reuses them when present. Nothing is downloaded
# but Go modules. Prints the bin folder on its last line.
# With --node it also builds what a real one-node cluster needs: kubelet, kube-controller-manager,
# kube-scheduler and kube-proxy (the same wrapper module as kube-apiserver), the CSI
# node-driver-registrar (from the source archive in ../shared/third_party beside the checkout; the
# module proxy does not serve it) and a static `pause` for the sandbox image.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.34.4}"    # one pinned Kubernetes release
ETCD_VERSION="${ETCD_VERSION:-v3.6.4}"   # the etcd that release's go.mod requires
HELM_VERSION="${HELM_VERSION:-v3.19.0}"
CSI_TEST_VERSION="${CSI_TEST_VERSION:-v5.3.1}"  # csi-sanity, the CSI conformance suite
REGISTRAR_SRC="${REGISTRAR_SRC:-node-driver-registrar-3482d44}"  # after v2.13.0, with vendor/
CACHE="${KVTIER_CACHE_DIR:-$HOME/.cache/kvtier}"
NODE=0
[ "${1:-}" = "--node" ] && NODE=1
BIN="$CACHE/tools/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION-csitest-$CSI_TEST_VERSION/bin"
WORK="$CACHE/tools/src"
export GOFLAGS="-mod=mod" GOTOOLCHAIN=local CGO_ENABLED=0
mkdir -p "$BIN" "$WORK"

say() { printf '[build-tools] %s\n' "$*" >&2; }
have() { [ -x "$BIN/$1" ]; }
elapsed() { printf '%ss' "$(( $(date +%s) - $1 ))"; }

# Kubernetes: a wrapper module that requires k8s.io/kubernetes and replaces every staging module
# (the `=> ./staging/...` lines of that release's go.mod) with its published v0.N.P twin.
build_kubernetes() {
  local mod="$WORK/k8s-$K8S_VERSION" minor="${K8S_VERSION#v1.}"
  mkdir -p "$mod"
  if [ ! -f "$mod/go.mod" ]; then
    say "resolving k8s.io/kubernetes@$K8S_VERSION"
    local dir; dir=$(cd "$WORK" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
    {
      printf 'module kvtier.local/k8stools\n\ngo 1.24.0\n\nrequire k8s.io/kubernetes %s\n\n' "$K8S_VERSION"
      grep -E '=> \./staging/' "$dir/go.mod" | awk -v v="v0.$minor" '{printf "replace %s => %s %s\n", $1, $1, v}'
    } > "$mod/go.mod.tmp"
    mv "$mod/go.mod.tmp" "$mod/go.mod"
    printf 'package main\n' > "$mod/doc.go"
  fi
  local major=1 ver_minor; ver_minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  local ld="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$ver_minor -X $pkg.gitTreeState=clean"
  done
  local cmds="kube-apiserver kubectl"
  [ "$NODE" = 1 ] && cmds="$cmds kubelet kube-controller-manager kube-scheduler kube-proxy"
  for cmd in $cmds; do
    have "$cmd" && continue
    local t; t=$(date +%s)
    say "building $cmd $K8S_VERSION from its Go module (first time only; several minutes on 2 cores)"
    (cd "$mod" && go build -trimpath -ldflags "$ld" -o "$BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
    mv "$BIN/$cmd.tmp" "$BIN/$cmd"
    say "built $cmd in $(elapsed "$t")"
  done
}

# etcd: its main lives in a module with replace directives, so a two-line main calls etcdmain.
build_etcd() {
  have etcd && return
  local mod="$WORK/etcd-$ETCD_VERSION" t; t=$(date +%s)
  mkdir -p "$mod"
  printf 'module kvtier.local/etcd\n\ngo 1.24.0\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > "$mod/go.mod"
  cat > "$mod/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  say "building etcd $ETCD_VERSION from its Go module"
  (cd "$mod" && go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" .)
  mv "$BIN/etcd.tmp" "$BIN/etcd"
  say "built etcd in $(elapsed "$t")"
}

build_helm() {
  have helm && return
  local mod="$WORK/helm-$HELM_VERSION" t; t=$(date +%s)
  mkdir -p "$mod"
  printf 'module kvtier.local/helm\n\ngo 1.24.0\n\nrequire helm.sh/helm/v3 %s\n' "$HELM_VERSION" > "$mod/go.mod"
  printf 'package main\n' > "$mod/doc.go"
  say "building helm $HELM_VERSION from its Go module"
  (cd "$mod" && go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" -o "$BIN/helm.tmp" helm.sh/helm/v3/cmd/helm)
  mv "$BIN/helm.tmp" "$BIN/helm"
  say "built helm in $(elapsed "$t")"
}

build_csi_sanity() {
  have csi-sanity && return
  local mod="$WORK/csi-test-$CSI_TEST_VERSION" t; t=$(date +%s)
  mkdir -p "$mod"
  printf 'module kvtier.local/csisanity\n\ngo 1.24.0\n\nrequire github.com/kubernetes-csi/csi-test/v5 %s\n' "$CSI_TEST_VERSION" > "$mod/go.mod"
  printf 'package main\n' > "$mod/doc.go"
  say "building csi-sanity $CSI_TEST_VERSION from its Go module"
  (cd "$mod" && go build -trimpath -ldflags "-s -w" -o "$BIN/csi-sanity.tmp" github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity)
  mv "$BIN/csi-sanity.tmp" "$BIN/csi-sanity"
  say "built csi-sanity in $(elapsed "$t")"
}

build_registrar() {
  have csi-node-driver-registrar && return
  local archive; archive="$(cd "$(dirname "$0")/.." && pwd)/../shared/third_party/$REGISTRAR_SRC-src.tar.gz"
  [ -f "$archive" ] || { say "missing $archive (the registrar's source with vendor/)"; exit 1; }
  local t; t=$(date +%s)
  rm -rf "$WORK/$REGISTRAR_SRC" && tar xzf "$archive" -C "$WORK"
  say "building csi-node-driver-registrar ($REGISTRAR_SRC) from its vendored source"
  (cd "$WORK/$REGISTRAR_SRC" && GOFLAGS=-mod=vendor go build -trimpath -ldflags "-s -w" \
    -o "$BIN/csi-node-driver-registrar.tmp" ./cmd/csi-node-driver-registrar)
  mv "$BIN/csi-node-driver-registrar.tmp" "$BIN/csi-node-driver-registrar"
  say "built csi-node-driver-registrar in $(elapsed "$t")"
}

# The sandbox ("pause") container's process: sleeps, exits on SIGINT/SIGTERM, reaps orphans.
build_pause() {
  have pause && return
  local src="$WORK/pause.c"
  cat > "$src" <<'C'
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  signal(SIGINT, quit);
  signal(SIGTERM, quit);
  signal(SIGCHLD, reap);
  for (;;) pause();
}
C
  cc -static -Os -s -o "$BIN/pause.tmp" "$src"
  mv "$BIN/pause.tmp" "$BIN/pause"
  say "built pause"
}

build_etcd
build_helm
build_kubernetes
build_csi_sanity
if [ "$NODE" = 1 ]; then
  build_registrar
  build_pause
fi
say "tools ready in $BIN"
echo "$BIN"
