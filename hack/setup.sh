#!/usr/bin/env bash
# Everything a fresh machine needs for the demo and the tests: a virtualenv with kvtier and its test
# tools, and the control plane's binaries (built once from Go modules into ~/.cache/kvtier).
# As root on Debian it also prepares the real node (the `node` test tier and `make demo` on pods):
# containerd, runc, the CNI plugins, iptables and mmdebstrap from Debian, and kubelet, kube-proxy,
# kube-controller-manager, kube-scheduler, the CSI registrar and pause built like the API server.
# KVTIER_NO_NODE=1 skips that (the node tier and the demo then fall back to processes).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '[setup] %s\n' "$*" >&2; }

PY="${PYTHON:-python3}"
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "kvtier needs Python 3.11+"'
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
stamp=".venv/.kvtier-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing kvtier and its test tools into .venv (pip)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q 'grpcio-tools>=1.60'
  say "generating the CSI gRPC stubs from the CSI spec's proto"
  bash hack/gen-csi.sh
  .venv/bin/python -m pip install -q -e '.[test,helm,kind,gpu]'
  say "installing torch and transformers for the torch test tier (about 5 GB, a minute)"
  .venv/bin/python -m pip install -q -e '.[torch-tier]'
  say "installing NIXL, the agents' peer data path (without the torch its wheel declares)"
  .venv/bin/python -m pip install -q --no-deps $(.venv/bin/python hack/extra.py nixl)
  touch "$stamp"
fi
NODE_PACKAGES="containerd runc containernetworking-plugins iptables conntrack socat ethtool mmdebstrap gcc libc6-dev"
node=0
if [ -z "${KVTIER_NO_NODE:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  node=1
  missing=$(for p in $NODE_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || printf '%s ' "$p"; done)
  if [ -n "$missing" ]; then
    say "installing the real node's Debian packages: $missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi
if [ "$node" = 1 ]; then
  say "control-plane and node binaries (etcd, kube-apiserver, kubectl, helm, kubelet, kube-proxy, ...)"
  bash hack/build-tools.sh --node >/dev/null
else
  say "control-plane binaries (etcd, kube-apiserver, kubectl, helm)"
  bash hack/build-tools.sh >/dev/null
fi
say "ready"
