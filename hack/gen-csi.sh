#!/usr/bin/env bash
# Generates the CSI gRPC stubs from the CSI spec's csi.proto (its Go module carries the proto) into
# agent/kvtier/agent/csi/_generated (not checked in). Run by hack/setup.sh and the image build.
set -euo pipefail
cd "$(dirname "$0")/.."
CSI_SPEC_VERSION="${CSI_SPEC_VERSION:-v1.11.0}"
PY="${PYTHON:-.venv/bin/python}"
out=agent/kvtier/agent/csi/_generated
stamp="$out/.spec-$CSI_SPEC_VERSION"
[ -f "$stamp" ] && exit 0
if [ -n "${CSI_PROTO_DIR:-}" ]; then
  dir="$CSI_PROTO_DIR"  # the image build brings csi.proto from a Go stage
else
  dir=$(cd /tmp && GOFLAGS=-mod=mod GOTOOLCHAIN=local go mod download -json "github.com/container-storage-interface/spec@$CSI_SPEC_VERSION" \
    | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
fi
mkdir -p "$out"
"$PY" -m grpc_tools.protoc -I "$dir" --python_out="$out" --grpc_python_out="$out" "$dir/csi.proto"
# the generated service module imports its messages as a top-level module; make it package-relative
sed -i 's/^import csi_pb2 as csi__pb2/from . import csi_pb2 as csi__pb2/' "$out/csi_pb2_grpc.py"
touch "$out/__init__.py" "$stamp"
echo "[gen-csi] CSI $CSI_SPEC_VERSION stubs in $out" >&2
