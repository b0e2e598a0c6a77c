"""kvtier.io/v1alpha1: KVCachePool and KVCacheNode.

These pydantic models are the single source of truth. `kvtier crds` renders the CRDs in crds/ and
charts/kvtier/crds/ from them (tests fail when the checked-in YAML drifts), the operator parses
custom objects with them, and the agent's configuration (kvtier.api.agentconfig) embeds them.

Every invariant the API server must enforce is written next to its field as a CEL rule whose
message tells the user what to fix. pydantic checks the same invariants where a Python caller
could get them wrong (the operator never trusts that a spec passed the API server's validation).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from kvtier.api.quantity import MAX_BYTES, MAX_QUANTITY, parse_quantity

GROUP = "kvtier.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DEFAULT_AGENT_IMAGE = "ghcr.io/kvtier/kvtier:0.1.0"


def cel(rule: str, message: str, **extra: str) -> dict[str, str]:
    """One x-kubernetes-validations entry."""
    return {"rule": rule, "message": message, **extra}


def _cel_string(text: str) -> str:
    """The body of a single-quoted CEL string literal holding `text`."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def rules(*entries: dict[str, str], **schema: Any) -> dict[str, Any]:
    """json_schema_extra carrying CEL rules (and any other schema keys) for a model or field."""
    return {"x-kubernetes-validations": list(entries), **schema} if entries else dict(schema)


class Model(BaseModel):
    """Base: camelCase field names as on the wire, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# A quantity is an int or a string such as "64Gi"; the API server checks it with CEL's quantity library
# and pydantic with parse_quantity: the same grammar (no spaces), positive, at most 1Ei.
QUANTITY_MESSAGE = (
    f"must be a positive quantity of at most {MAX_QUANTITY} such as 64Gi or 500G, without spaces"
)
_POSITIVE_QUANTITY = cel(
    f"type(self) == int ? (self > 0 && self <= {MAX_BYTES}) : (isQuantity(self) && "
    f"quantity(self).isGreaterThan(quantity('0')) && quantity(self).compareTo(quantity('{MAX_QUANTITY}')) <= 0)",
    QUANTITY_MESSAGE,
)


def _positive_quantity(value: int | str) -> int | str:
    try:
        positive = parse_quantity(value) > 0
    except ValueError as exc:
        raise ValueError(f"{QUANTITY_MESSAGE} ({exc})") from None
    if not positive:
        raise ValueError(f"{QUANTITY_MESSAGE} (got {value!r})")
    return value


Quantity = Annotated[
    int | str,
    Field(
        json_schema_extra=rules(_POSITIVE_QUANTITY, **{"x-kubernetes-int-or-string": True, "maxLength": 64})
    ),
    AfterValidator(_positive_quantity),
]


def sized(minimum: str, why: str) -> Any:
    """A quantity of at least `minimum` (a tier that cannot hold one block is a mistake, not a pool)."""
    floor = parse_quantity(minimum)
    message = f"must be at least {minimum}: {why}"

    def at_least(value: int | str) -> int | str:
        if parse_quantity(value) < floor:
            raise ValueError(f"{message} (got {value!r})")
        return value

    rule = cel(
        f"type(self) == int ? self >= {floor} : "
        f"(!isQuantity(self) || quantity(self).compareTo(quantity('{minimum}')) >= 0)",
        message,
    )
    return Annotated[
        Quantity, Field(json_schema_extra=rules(_POSITIVE_QUANTITY, rule)), AfterValidator(at_least)
    ]


MIN_TIER = "16Mi"
DramSize = sized(MIN_TIER, "the DRAM arena must hold at least one KV block")
NvmeSize = sized(MIN_TIER, "the NVMe tier must hold at least one KV block")


_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$")


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration ("2s", "1m30s", "250ms")."""
    if not _DURATION.match(text):
        raise ValueError(f"not a duration: {text!r} (examples: 2s, 500ms, 1m)")
    unit = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * unit[u] for n, _, u in re.findall(r"([0-9]+(\.[0-9]+)?)(ms|s|m|h)", text))


# ---------------------------------------------------------------------------------------- spec


def _defaults_of(model: type[BaseModel]) -> dict[str, Any]:
    """An optional object's default in the CRD: all its own defaults, so CEL rules see every field."""
    return {"default": model().model_dump(mode="json", exclude_none=True)}


class DramTier(Model):
    """Host DRAM per node: the arena engines map and DMA from."""

    size: DramSize = Field(description="DRAM per node for this pool, e.g. 64Gi (at least 16Mi).")
    hugepages: Literal["none", "2Mi", "1Gi"] = Field(
        "none", description="Back the arena with hugepages of this size (the agent requests them)."
    )
    numa: int | Literal["auto"] = Field(
        "auto",
        description="NUMA node for the arena: auto (the node of the GPUs) or an index.",
        json_schema_extra=rules(
            cel(
                "type(self) == int ? self >= 0 : self == 'auto'",
                "numa must be auto or a NUMA node index >= 0",
            ),
            **{"x-kubernetes-int-or-string": True},
        ),
    )


class DeviceSelector(Model):
    """Which NVMe devices a pool may use (shell-style patterns; all given must match)."""

    model: list[Annotated[str, Field(max_length=128)]] | None = Field(None, max_length=16)
    serial: list[Annotated[str, Field(max_length=128)]] | None = Field(None, max_length=16)
    path: list[Annotated[str, Field(max_length=256)]] | None = Field(None, max_length=16)


# Where a cache file may never go: each rule (an RE2/Python regex that must NOT match) and its fix-it message,
# checked alike by the API server (CEL) and pydantic.
SYSTEM_FOLDERS = (
    "proc",
    "sys",
    "dev",
    "etc",
    "boot",
    "bin",
    "sbin",
    "lib",
    "lib32",
    "lib64",
    "usr",
    "run",
    "var/run",
    "var/lib/kubelet",
    "root",
)
_PATH_RULES = (
    ("^[^/]|/$", "path must be an absolute path to a file, such as /mnt/nvme0/kvtier.img"),
    ("(^|/)[.][.]?(/|$)", "path must not contain '.' or '..' segments: write the folder out"),
    ("//", "path must not contain empty segments ('//')"),
    ("[\\x00-\\x1f\\x7f]", "path must not contain control characters"),
    (
        f"^/({'|'.join(SYSTEM_FOLDERS)})(/|$)",
        f"path must not be in a system folder (/{', /'.join(SYSTEM_FOLDERS)}): "
        "use a folder on the NVMe filesystem, such as /mnt/nvme0/kvtier.img",
    ),
)


class NvmeTier(Model):
    """Local NVMe per node: direct-I/O extents on a namespace, a partition or a file."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "self.mode != 'file' || has(self.path)",
                "path is required when mode is file",
                fieldPath=".path",
            ),
            cel(
                "self.mode == 'file' || !has(self.path)",
                "path is only for mode file; namespace and partition modes choose devices with deviceSelector",
                fieldPath=".path",
            ),
            cel(
                "self.mode == oldSelf.mode",
                "nvme.mode is immutable: changing it would orphan the cached data; create a new pool instead",
                fieldPath=".mode",
            ),
            cel(
                "has(self.path) == has(oldSelf.path) && (!has(self.path) || self.path == oldSelf.path)",
                "nvme.path is immutable: changing it would orphan the cached data; create a new pool instead",
                fieldPath=".path",
            ),
        )
    )

    size: NvmeSize = Field(description="NVMe capacity per node for this pool, e.g. 1Ti (at least 16Mi).")
    mode: Literal["namespace", "partition", "file"] = Field(
        description="namespace: NVMe namespaces created for the pool; partition: a partition; file: a file on a mounted filesystem."
    )
    deviceSelector: DeviceSelector | None = Field(
        None, description="Devices to use (namespace and partition modes)."
    )
    path: str | None = Field(
        None,
        max_length=512,
        description="Absolute path of the cache file on each node (mode file); the agent creates it.",
        json_schema_extra=rules(
            *(cel(f"!self.matches('{_cel_string(regex)}')", message) for regex, message in _PATH_RULES)
        ),
    )
    allowInUse: bool = Field(
        False,
        description="Use a device that holds a filesystem or is mounted, or a file at path that kvtier "
        "did not create (destroys their data).",
    )

    @field_validator("path")
    @classmethod
    def _safe_path(cls, path: str | None) -> str | None:
        for regex, message in _PATH_RULES:
            if path is not None and re.search(regex, path):
                raise ValueError(message)
        return path

    @model_validator(mode="after")
    def _path_matches_mode(self) -> NvmeTier:
        if self.mode == "file" and not self.path:
            raise ValueError("path is required when mode is file")
        if self.mode != "file" and self.path:
            raise ValueError("path is only for mode file")
        return self


class Tiers(Model):
    dram: DramTier
    nvme: NvmeTier | None = None


class Eviction(Model):
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "self.lowWatermark < self.highWatermark",
                "lowWatermark must be below highWatermark (e.g. 0.8 and 0.9)",
                fieldPath=".lowWatermark",
            )
        )
    )

    policy: Literal["lru", "s3fifo"] = Field(
        "s3fifo", description="s3fifo resists one-off scans (a long prompt seen once); lru is plain recency."
    )
    highWatermark: float = Field(
        0.9, gt=0, le=1, description="Demotion starts above this fraction of a tier."
    )
    lowWatermark: float = Field(0.8, gt=0, lt=1, description="Demotion stops below this fraction.")

    @model_validator(mode="after")
    def _ordered(self) -> Eviction:
        if not self.lowWatermark < self.highWatermark:
            raise ValueError("lowWatermark must be below highWatermark")
        return self


class Prefetch(Model):
    enabled: bool = True
    deadline: str = Field(
        "2s",
        pattern=_DURATION.pattern,
        max_length=32,
        description="Prefetches not done by then are counted late and abandoned.",
    )
    transport: Literal["auto", "rdma", "tcp"] = "auto"


OFFER_NEEDS_DRAIN = "offerBytes needs enabled: true (blocks are offered to peers during a drain)"


class Drain(Model):
    """What an agent does when its node is cordoned or leaves the pool's nodeSelector."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "!has(self.offerBytes) || !has(self.enabled) || self.enabled",
                OFFER_NEEDS_DRAIN,
                fieldPath=".offerBytes",
            )
        )
    )

    enabled: bool = Field(
        True, description="Stop taking new blocks and write DRAM-only blocks to NVMe, hottest first."
    )
    maxBytes: Quantity | None = Field(
        None,
        description="At most this much is written to NVMe by one drain (the hottest blocks); the rest "
        "stays in DRAM only until the agent stops. Unset: every DRAM-only block.",
    )

    offerBytes: Quantity | None = Field(
        None,
        description="At most this much of the hottest blocks (any tier, most recently used first) is "
        "offered to the pool's other agents by one drain; each takes the blocks of tenants it serves, "
        "pulled over the peer transport and checksummed. The same bound caps what an agent accepts "
        "from one offer. Unset: nothing is offered.",
    )

    @field_validator("maxBytes", "offerBytes")
    @classmethod
    def _max_positive(cls, value: int | str | None) -> int | str | None:
        return None if value is None else _positive_quantity(value)

    @model_validator(mode="after")
    def _offer_needs_drain(self) -> Drain:
        if self.offerBytes is not None and not self.enabled:
            raise ValueError(OFFER_NEEDS_DRAIN)
        return self


class LabelSelectorRequirement(Model):
    key: str = Field(max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[Annotated[str, Field(max_length=63)]] | None = Field(None, max_length=64)


class LabelSelector(Model):
    matchLabels: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(None, max_length=64)
    matchExpressions: list[LabelSelectorRequirement] | None = Field(None, max_length=32)

    def matches(self, labels: dict[str, str]) -> bool:
        for key, value in (self.matchLabels or {}).items():
            if labels.get(key) != value:
                return False
        for req in self.matchExpressions or []:
            present = req.key in labels
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
            if req.operator == "In" and labels.get(req.key) not in (req.values or []):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in (req.values or []):
                return False
        return True


class Tenancy(Model):
    # Blocks on NVMe outlive a change: under the other isolation the namespace called `shared` and
    # the shared key space are one, so a namespace's private blocks would be read by all (or the
    # other way round).
    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "self.isolation == oldSelf.isolation",
                "tenancy.isolation is immutable: blocks stored under one isolation would be read under "
                "the other; create a new pool instead",
                fieldPath=".isolation",
            )
        )
    )

    namespaceSelector: LabelSelector | None = Field(
        None, description="Namespaces whose pods may attach; empty admits every namespace."
    )
    isolation: Literal["namespace", "shared"] = Field(
        "namespace",
        description="namespace: each namespace has its own key space and memory; shared: one key space for all admitted namespaces.",
    )
    dramShare: float = Field(
        0.5,
        gt=0,
        le=1,
        description="The largest fraction of a node's DRAM arena one tenant may hold (1: no limit). "
        "A tenant at its share evicts its own blocks, never another tenant's.",
    )
    nvmeShare: float = Field(
        0.5,
        gt=0,
        le=1,
        description="The largest fraction of a node's NVMe tier one tenant's blocks may hold (1: no limit).",
    )


def _duration(default: str, description: str) -> Any:
    return Field(default, pattern=_DURATION.pattern, max_length=32, description=description)


class Limits(Model):
    """What one client, tenant or peer can take from a node's agent. The defaults suit tens of engine
    pods per node; every limit holds whatever a client sends."""

    connectionsPerTenant: int = Field(
        64, ge=1, le=4096, description="Open connections per tenant socket; more are refused."
    )
    connections: int = Field(
        512, ge=1, le=65536, description="Open connections over all tenant sockets and the peer port."
    )
    descriptorsPerMessage: int = Field(
        0,
        ge=0,
        le=64,
        description="File descriptors accepted beside one request. Clients never need to send any: the "
        "ones that fit are closed unread, the kernel drops the rest.",
    )
    frameBytes: int = Field(
        4 << 20, ge=64 << 10, le=64 << 20, description="Largest request on a tenant socket after its hello."
    )
    preAuthFrameBytes: int = Field(
        64 << 10,
        ge=1 << 10,
        le=1 << 20,
        description="Largest request before a connection has said hello (tenant sockets).",
    )
    peerPreAuthFrameBytes: int = Field(
        1 << 10,
        ge=256,
        le=64 << 10,
        description="Largest frame on the peer port before the peer proved pool membership.",
    )
    readTimeout: str = _duration("10s", "A request must arrive whole within this once it has started.")
    idleTimeout: str = _duration("1h", "A connection with no request for this long is closed.")
    syncTimeout: str = _duration(
        "10s", "A synchronous put fails after this long without its NVMe copy (below clients' own timeouts)."
    )


class Toleration(Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None


class Resources(Model):
    requests: dict[str, Quantity] | None = Field(None, max_length=16)
    limits: dict[str, Quantity] | None = Field(None, max_length=16)


class AgentSpec(Model):
    image: str = Field(DEFAULT_AGENT_IMAGE, max_length=512)
    resources: Resources | None = Field(
        None, description="Extra resources for the agent; the arena's memory is added by the operator."
    )
    priorityClassName: str | None = Field("system-node-critical", max_length=253)


class KVCachePoolSpec(Model):
    nodeSelector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        None, max_length=32, description="Nodes that run the pool's agent."
    )
    tolerations: list[Toleration] | None = Field(None, max_length=32)
    tiers: Tiers
    blockTokens: int = Field(
        256,
        ge=16,
        le=4096,
        description="Tokens per KV block; a multiple of 16 (the engines' page size).",
        json_schema_extra=rules(cel("self % 16 == 0", "blockTokens must be a multiple of 16, e.g. 256")),
    )
    eviction: Eviction = Field(default_factory=Eviction, json_schema_extra=_defaults_of(Eviction))
    prefetch: Prefetch = Field(default_factory=Prefetch, json_schema_extra=_defaults_of(Prefetch))
    tenancy: Tenancy = Field(default_factory=Tenancy, json_schema_extra=_defaults_of(Tenancy))
    limits: Limits = Field(default_factory=Limits, json_schema_extra=_defaults_of(Limits))
    agent: AgentSpec = Field(default_factory=AgentSpec, json_schema_extra=_defaults_of(AgentSpec))
    drain: Drain = Field(default_factory=Drain, json_schema_extra=_defaults_of(Drain))

    @field_validator("blockTokens")
    @classmethod
    def _multiple_of_16(cls, value: int) -> int:
        if value % 16:
            raise ValueError("blockTokens must be a multiple of 16")
        return value


# -------------------------------------------------------------------------------------- status


class Condition(Model):
    """metav1.Condition."""

    type: str = Field(max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=1024)
    message: str = Field("", max_length=32768)
    observedGeneration: int | None = None
    lastTransitionTime: str = Field(json_schema_extra={"format": "date-time"})


class NodeCounts(Model):
    desired: int = 0
    ready: int = 0
    draining: int = Field(0, description="Agents draining (node cordoned or leaving the nodeSelector).")


class TierUsage(Model):
    capacityBytes: int = 0
    usedBytes: int = 0
    blocks: int | None = None


class TierUsages(Model):
    dram: TierUsage = Field(default_factory=TierUsage)
    nvme: TierUsage | None = None


class PoolDisplay(Model):
    """Pre-formatted text for `kubectl get kvp` columns."""

    nodes: str = "0/0"
    dram: str = ""
    nvme: str = ""
    hit: str = ""


class KVCachePoolStatus(Model):
    model_config = ConfigDict(extra="ignore")

    observedGeneration: int | None = None
    conditions: list[Condition] | None = Field(
        None,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    nodes: NodeCounts | None = None
    tiers: TierUsages | None = None
    hitRatio: float | None = None
    lastUpdated: str | None = Field(None, json_schema_extra={"format": "date-time"})
    display: PoolDisplay | None = None


class ObjectMeta(Model):
    model_config = ConfigDict(extra="allow")
    name: str


# Children are named kvtier-agent-<pool> (DaemonSet, Service, ConfigMap): a DNS label of at most 63.
MAX_POOL_NAME = 50
POOL_NAME = f"^[a-z0-9]([-a-z0-9]{{0,{MAX_POOL_NAME - 2}}}[a-z0-9])?$"
POOL_NAME_MESSAGE = (
    f"a KVCachePool name must be at most {MAX_POOL_NAME} characters of a-z, 0-9 and '-' (no dots), "
    "starting and ending with a letter or digit: its agents' DaemonSet and Service are named "
    "kvtier-agent-<name>"
)


def check_pool_name(name: str) -> str:
    if not re.match(POOL_NAME, name):
        raise ValueError(POOL_NAME_MESSAGE)
    return name


class KVCachePool(Model):
    model_config = ConfigDict(extra="ignore")

    apiVersion: Literal["kvtier.io/v1alpha1"] = API_VERSION
    kind: Literal["KVCachePool"] = "KVCachePool"
    metadata: ObjectMeta
    spec: KVCachePoolSpec
    status: KVCachePoolStatus | None = None

    @field_validator("metadata")
    @classmethod
    def _name_fits_children(cls, metadata: ObjectMeta) -> ObjectMeta:
        check_pool_name(metadata.name)
        return metadata


# ------------------------------------------------------------------------------- KVCacheNode


class NvmeDevice(Model):
    path: str
    model: str | None = None
    serial: str | None = None
    namespaceId: int | None = None
    sizeBytes: int | None = None
    state: str | None = Field(None, description="adopted, created, formatted, refused, ...")
    reason: str | None = None


class GpuDevice(Model):
    index: int
    name: str
    uuid: str | None = None
    pciBusId: str | None = None
    memoryBytes: int | None = None
    numaNode: int | None = None


class NodeDevices(Model):
    nvme: list[NvmeDevice] = Field(default_factory=list)
    gpus: list[GpuDevice] = Field(default_factory=list)
    gpuReason: str | None = Field(None, description="Why the GPU list is empty (no driver, no NVML).")


class RdmaPort(Model):
    device: str = Field(description="RDMA device (HCA) name, e.g. mlx5_0.")
    port: int
    state: str = Field(description="Port state: ACTIVE, DOWN, INIT, ARMED, ...")
    linkLayer: str = Field(description="InfiniBand or Ethernet (RoCE).")
    activeMtu: int | None = Field(None, description="Active MTU in bytes.")
    gids: list[str] = Field(default_factory=list, description="Non-zero GID table entries.")


class NodeTransport(Model):
    """How this agent moves blocks to and from peer agents, and why."""

    requested: Literal["auto", "rdma", "tcp"] = "auto"
    library: str | None = Field(None, description="The data path library, e.g. 'nixl 1.5.1 (UCX)'.")
    ucxTransports: str | None = Field(None, description="UCX_TLS the agent runs with.")
    rdma: bool = Field(False, description="Whether RDMA transports were selected.")
    reason: str | None = Field(None, description="Why this choice (or why peers cannot be reached).")
    rdmaPorts: list[RdmaPort] = Field(default_factory=list, description="RDMA ports found on the node.")
    rdmaReason: str | None = Field(None, description="Why no RDMA port is listed.")


class KVCacheNodeSpec(Model):
    pool: str = Field(max_length=253)
    node: str = Field(max_length=253)


class DrainOffer(Model):
    """The drain's offer of its hottest blocks to the pool's other agents."""

    state: Literal["Offering", "Offered"] = "Offering"
    plannedBytes: int = Field(0, description="The hottest blocks chosen, up to drain.offerBytes.")
    takenBytes: int = Field(0, description="Bytes peers pulled, verified and now hold.")
    declinedBytes: int = Field(
        0, description="Offered bytes no peer took (a tenant it does not serve, no room, unreachable)."
    )
    peers: int = Field(0, description="Peers that took at least one block.")
    progress: str = Field("0%", max_length=8, description="(taken + declined) of planned, for kubectl.")


class DrainProgress(Model):
    """The agent's drain: what it planned to write to NVMe and how far it got."""

    reason: Literal["Cordoned", "LeftSelector"]
    state: Literal["Flushing", "Flushed"] = "Flushing"
    startedAt: str = Field(json_schema_extra={"format": "date-time"})
    plannedBytes: int = Field(
        0, description="DRAM-only bytes chosen to move (hottest first, up to maxBytes)."
    )
    movedBytes: int = 0
    failedBytes: int = Field(0, description="Planned bytes that found no room or failed to write.")
    skippedBytes: int = Field(0, description="DRAM-only bytes over the pool's drain.maxBytes.")
    progress: str = Field("0%", max_length=8, description="movedBytes of plannedBytes, for kubectl.")
    offer: DrainOffer | None = Field(
        None, description="The hottest blocks offered to peer agents (when the pool sets drain.offerBytes)."
    )


class KVCacheNodeStatus(Model):
    model_config = ConfigDict(extra="ignore")

    tiers: TierUsages = Field(default_factory=TierUsages)
    devices: NodeDevices = Field(default_factory=NodeDevices)
    hits: int = 0
    misses: int = 0
    health: Literal["Healthy", "Degraded", "Unknown"] = "Unknown"
    reason: str | None = None
    agentVersion: str | None = None
    numaNode: int | None = Field(None, description="NUMA node the DRAM arena was placed on.")
    peerAddress: str | None = Field(None, description="host:port of the agent's peer control port.")
    transport: NodeTransport | None = None
    heartbeat: str | None = Field(None, json_schema_extra={"format": "date-time"})
    heartbeatSeconds: float | None = Field(
        None, description="The agent's heartbeat interval; the operator calls it stale after a few missed."
    )
    conditions: list[Condition] | None = Field(
        None,
        max_length=8,
        description="Draining: True while the node is cordoned or leaving the pool.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    drain: DrainProgress | None = None


class KVCacheNode(Model):
    model_config = ConfigDict(extra="ignore")

    apiVersion: Literal["kvtier.io/v1alpha1"] = API_VERSION
    kind: Literal["KVCacheNode"] = "KVCacheNode"
    metadata: ObjectMeta
    spec: KVCacheNodeSpec
    status: KVCacheNodeStatus | None = None


def kvcachenode_name(pool: str, node: str) -> str:
    """`<pool>.<node>`: sorts by pool in `kubectl get kvn`, and is a valid DNS subdomain."""
    return f"{pool}.{node}"
