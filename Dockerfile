# One image for the operator, the node agent, the CSI node plugin and the prefetch sidecar.
# Its install steps are the README's (hack/setup.sh): pip install the package from the source tree.
FROM golang:1.24-bookworm AS proto
RUN GOFLAGS=-mod=mod go mod download -json github.com/container-storage-interface/spec@v1.11.0 \
    && cp /go/pkg/mod/github.com/container-storage-interface/spec@v1.11.0/csi.proto /csi.proto

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY operator ./operator
COPY agent ./agent
COPY bench ./bench
COPY hack/gen-csi.sh hack/extra.py ./hack/
COPY --from=proto /csi.proto /proto/csi.proto
RUN python -m pip install --no-cache-dir "grpcio-tools>=1.60" \
    && CSI_PROTO_DIR=/proto PYTHON=python bash hack/gen-csi.sh \
    && python -m pip install --no-cache-dir --prefix=/install ".[gpu]" \
    && python -m pip install --no-cache-dir --prefix=/install --no-deps $(python hack/extra.py nixl)

FROM python:3.12-slim
# ibverbs-utils: ibv_devinfo for RDMA discovery; ibverbs-providers: the verbs drivers (mlx5, ...) that
# the UCX inside the NIXL wheel loads for its RDMA transports
RUN apt-get update && apt-get install -y --no-install-recommends nvme-cli util-linux ibverbs-utils \
    ibverbs-providers \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /install /usr/local
COPY charts/kvtier/files/crds /opt/kvtier/crds
# the node agent runs as root in its DaemonSet (hostPath sockets, devices); everything else as 65532
USER 65532:65532
ENTRYPOINT ["kvtier"]
CMD ["--help"]
