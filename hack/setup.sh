#!/usr/bin/env bash
# Everything a fresh machine needs for the demo and the tests: a virtualenv with kvtier and its test
# tools, and the control plane's binaries (built once from Go modules into ~/.cache/kvtier).
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
  say "installing NIXL, the agents' peer data path (without the torch its wheel declares)"
  .venv/bin/python -m pip install -q --no-deps $(.venv/bin/python hack/extra.py nixl)
  touch "$stamp"
fi
say "control-plane binaries (etcd, kube-apiserver, kubectl, helm)"
bash hack/build-tools.sh >/dev/null
say "ready"
