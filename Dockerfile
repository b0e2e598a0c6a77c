# One image for the operator, the node agent, the CSI node plugin and the prefetch sidecar.
# The same layout as `kvtier image build` (which needs no Docker): Debian bookworm's python3,
# nvme-cli and util-linux; a virtualenv at /opt/kvtier holding the kvtier wheel (CSI stubs
# generated) without pip; the user kvtier (65532) with a passwd entry; no build tools.
FROM golang:1.24-bookworm AS proto
RUN GOFLAGS=-mod=mod go mod download -json github.com/container-storage-interface/spec@v1.11.0 \
    && cp /go/pkg/mod/github.com/container-storage-interface/spec@v1.11.0/csi.proto /csi.proto

FROM debian:bookworm-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY operator ./operator
COPY agent ./agent
COPY bench ./bench
COPY hack/gen-csi.sh hack/extra.py ./hack/
COPY --from=proto /csi.proto /proto/csi.proto
RUN python3 -m venv /tools && /tools/bin/pip install --no-cache-dir "grpcio-tools>=1.60" \
    && CSI_PROTO_DIR=/proto PYTHON=/tools/bin/python bash hack/gen-csi.sh \
    && python3 -m venv /opt/kvtier \
    && /opt/kvtier/bin/pip install --no-cache-dir ".[gpu]" \
    && /opt/kvtier/bin/pip install --no-cache-dir --no-deps $(python3 hack/extra.py nixl) \
    && /opt/kvtier/bin/pip uninstall -y pip setuptools \
    && find /opt/kvtier -name __pycache__ -prune -exec rm -rf {} +

FROM debian:bookworm-slim
# ibverbs-utils: ibv_devinfo for RDMA discovery; ibverbs-providers: the verbs drivers (mlx5, ...)
# that the UCX inside the NIXL wheel loads for its RDMA transports
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates nvme-cli util-linux ibverbs-utils ibverbs-providers \
    && rm -rf /var/lib/apt/lists/* \
    && echo 'kvtier:x:65532:65532:kvtier:/home/kvtier:/usr/sbin/nologin' >> /etc/passwd \
    && echo 'kvtier:x:65532:' >> /etc/group \
    && install -d -o 65532 -g 65532 /home/kvtier
COPY --from=build /opt/kvtier /opt/kvtier
ENV PATH=/opt/kvtier/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
# the operator, the sidecar and the agent (file mode) run as 65532; the CSI plugin as root
USER 65532:65532
ENTRYPOINT ["kvtier"]
CMD ["--help"]
