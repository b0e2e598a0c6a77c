#!/usr/bin/env bash
# Builds promtool (Prometheus' rule checker and rule unit-test runner) from its Go module into the
# same cache as the control-plane binaries, and reuses it when present. Prints its path.
set -euo pipefail
PROMETHEUS_MODULE_VERSION="${PROMETHEUS_MODULE_VERSION:-v0.316.0}"  # the Go module of Prometheus 3.x
CACHE="${KVTIER_CACHE_DIR:-$HOME/.cache/kvtier}"
BIN="$CACHE/tools/promtool-$PROMETHEUS_MODULE_VERSION/bin"
if [ ! -x "$BIN/promtool" ]; then
  mkdir -p "$BIN"
  echo "[build-promtool] building promtool $PROMETHEUS_MODULE_VERSION from its Go module (first time only)" >&2
  GOBIN="$BIN" GOTOOLCHAIN=local CGO_ENABLED=0 \
    go install -trimpath -ldflags "-s -w" "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION"
fi
echo "$BIN/promtool"
