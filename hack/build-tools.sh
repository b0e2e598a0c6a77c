#!/usr/bin/env bash
# Builds the local control plane's binaries (etcd, kube-apiserver, kubectl, helm) from their Go
# modules into a cache folder keyed by version, and reuses them when present. Nothing is downloaded
# but Go modules. Prints the bin folder on its last line.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.34.4}"    # one pinned Kubernetes release
ETCD_VERSION="${ETCD_VERSION:-v3.6.4}"   # the etcd that release's go.mod requires
HELM_VERSION="${HELM_VERSION:-v3.19.0}"
CSI_TEST_VERSION="${CSI_TEST_VERSION:-v5.3.1}"  # csi-sanity, the CSI conformance suite
CACHE="${KVTIER_CACHE_DIR:-$HOME/.cache/kvtier}"
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
  for cmd in kube-apiserver kubectl; do
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

build_etcd
build_helm
build_kubernetes
build_csi_sanity
say "tools ready in $BIN"
echo "$BIN"
