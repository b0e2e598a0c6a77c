"""The agent's Unix-socket API: one socket per tenant namespace, plus an admin socket.

The tenant of a connection is the socket it came in on (`tenants/<namespace>/kvtier.sock`); no
request names a tenant. The admin socket (mode 0600, node components only: the CSI plugin, the
sidecar's launcher, tests) creates a namespace's socket folder on demand. One thread per
connection; garbage gets an error reply or a closed connection and never touches other clients.

Every socket the agent serves (tenant, admin, the peer port) runs under `ServerLimits`: a cap on
connections per tenant and in all (threads follow), a small frame before a connection has said who
it is and a larger one after, a deadline for each frame once it starts, an idle timeout, and no
descriptors accepted from clients (received ones are closed on every path).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socketserver
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.agent.api import protocol
from kvtier.agent.metrics import LogThrottle, Metrics
from kvtier.agent.store.index import Lease, Store, StoreError
from kvtier.agent.tiers.dram import Segment

log = logging.getLogger("kvtier.agent.api")
_throttled = LogThrottle(log)

NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
MAX_KEYS = 65536
SEGMENTS_PER_REPLY = 250  # the kernel passes at most 253 descriptors in one message (SCM_MAX_FD)


def tenant_socket(socket_dir: Path, namespace: str) -> Path:
    return socket_dir / "tenants" / namespace / "kvtier.sock"


def _keys(msg: dict[str, Any], field: str = "keys") -> list[bytes]:
    raw = msg.get(field)
    if not isinstance(raw, list) or len(raw) > MAX_KEYS:
        raise StoreError(f"'{field}' must be a list of at most {MAX_KEYS} hex strings")
    try:
        return [bytes.fromhex(k) for k in raw]
    except (TypeError, ValueError):
        raise StoreError(f"'{field}' must hold hex strings") from None


def _ints(msg: dict[str, Any], field: str, n: int | None = None) -> list[int]:
    raw = msg.get(field)
    if not isinstance(raw, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        raise StoreError(f"'{field}' must be a list of integers")
    if n is not None and len(raw) != n:
        raise StoreError(f"'{field}' must have {n} entries")
    return raw


def _fingerprint(msg: dict[str, Any]) -> str:
    fp = msg.get("fingerprint")
    if not isinstance(fp, str) or not 0 < len(fp) <= 512:
        raise StoreError("'fingerprint' must be a non-empty string of at most 512 characters")
    return fp


@dataclass(frozen=True)
class ServerLimits:
    """The pool's `limits` (see kvtier.api.v1alpha1.Limits), in the units the servers use."""

    connections_per_tenant: int = 64
    connections: int = 512
    fds_per_message: int = 0
    frame_bytes: int = 4 << 20
    pre_auth_frame_bytes: int = 64 << 10
    peer_pre_auth_frame_bytes: int = 1 << 10
    read_timeout: float = 10.0
    idle_timeout: float = 3600.0

    @classmethod
    def from_spec(cls, limits: Any) -> ServerLimits:
        from kvtier.api.v1alpha1 import parse_duration

        return cls(
            connections_per_tenant=limits.connectionsPerTenant,
            connections=limits.connections,
            fds_per_message=limits.descriptorsPerMessage,
            frame_bytes=limits.frameBytes,
            pre_auth_frame_bytes=limits.preAuthFrameBytes,
            peer_pre_auth_frame_bytes=limits.peerPreAuthFrameBytes,
            read_timeout=parse_duration(limits.readTimeout),
            idle_timeout=parse_duration(limits.idleTimeout),
        )

    def recv(self, sock, max_frame: int, idle: float | None = None) -> tuple[dict[str, Any], list[int]]:
        """One request under these limits; descriptors that came with it are closed unread."""
        msg, fds = protocol.recv(
            sock,
            max_frame=max_frame,
            max_fds=self.fds_per_message,
            idle_timeout=self.idle_timeout if idle is None else idle,
            frame_timeout=self.read_timeout,
        )
        for fd in fds:
            os.close(fd)
        return msg, []


class Gate:
    """Open connections per key (a tenant's namespace, "peer") and in all, against their caps."""

    def __init__(self, total: int, per_key: int) -> None:
        self.total, self.per_key = total, per_key
        self.open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def enter(self, key: str) -> str | None:
        """None when admitted, else why not."""
        with self._lock:
            if self.open[key] >= self.per_key:
                return f"too many connections for {key} (limit {self.per_key})"
            if self.open.total() >= self.total:
                return f"too many connections to this agent (limit {self.total})"
            self.open[key] += 1
        return None

    def leave(self, key: str) -> None:
        with self._lock:
            self.open[key] -= 1
            if self.open[key] <= 0:
                del self.open[key]


class LimitedServer(socketserver.ThreadingMixIn):
    """A threading server whose connections pass a Gate (threads are bounded with them) and whose
    handler failures are logged once in a while, not as one traceback per connection."""

    daemon_threads = True
    request_queue_size = 128  # listen backlog: a burst of connections waits, it is not refused
    gate: Gate
    gate_key: str
    metrics: Metrics

    def process_request(self, request, client_address) -> None:
        refused = self.gate.enter(self.gate_key)
        if refused:
            self.refuse(request, refused)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            self.gate.leave(self.gate_key)
            raise

    def refuse(self, sock, why: str) -> None:
        """Tell a connection past a gate why (briefly: it may not read) and count it."""
        self.metrics.refused_connections.labels(self.gate_key_label).inc()
        with contextlib.suppress(OSError):
            sock.settimeout(0.2)
            protocol.send(sock, {"ok": False, "error": why})

    def process_request_thread(self, request, client_address) -> None:
        self.metrics.connections.labels(self.gate_key_label).inc()
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self.metrics.connections.labels(self.gate_key_label).dec()
            self.gate.leave(self.gate_key)

    @property
    def gate_key_label(self) -> str:
        return "tenant" if self.gate_key not in ("admin", "peer") else self.gate_key

    def handle_error(self, request, client_address) -> None:
        _throttled.exception(self.gate_key_label, "a %s connection failed", self.gate_key_label)


class TenantHandler(socketserver.BaseRequestHandler):
    server: TenantServer

    def handle(self) -> None:
        store, sock, limits = self.server.store, self.request, self.server.limits
        lease = store.lease(self.server.namespace)
        frame = limits.pre_auth_frame_bytes  # until the client says hello
        try:
            while True:
                try:
                    msg, _ = limits.recv(sock, frame)
                except protocol.BadMessage as exc:
                    store.metrics.protocol_errors.inc()
                    protocol.send(sock, {"ok": False, "error": str(exc)})
                    continue
                if msg.get("op") == "hello":
                    frame = limits.frame_bytes
                reply, fds = self._dispatch(store, lease, msg)
                protocol.send(sock, reply, fds)
        except (ConnectionError, protocol.ProtocolError, OSError) as exc:
            if not isinstance(exc, ConnectionError | TimeoutError):
                store.metrics.protocol_errors.inc()
                log.debug("closing a %s connection: %s", self.server.namespace, exc)
        finally:
            store.close_lease(lease)

    def _dispatch(self, store: Store, lease: Lease, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        op, rid = msg.get("op"), msg.get("id")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            store.metrics.protocol_errors.inc()
            return {"id": rid, "ok": False, "error": f"unknown op {op!r}"}, []
        t0 = time.perf_counter()
        try:
            body, segments = handler(store, lease, msg)
        except StoreError as exc:
            return {"id": rid, "ok": False, "error": str(exc)}, []
        except Exception as exc:  # a request we did not foresee: refuse it, keep serving
            store.metrics.protocol_errors.inc()
            _throttled.exception("dispatch", "request %r failed", op)
            return {"id": rid, "ok": False, "error": f"request failed: {type(exc).__name__}"}, []
        finally:
            store.metrics.latency.labels(op).observe(time.perf_counter() - t0)
        new = _unsent(lease, segments)
        if len(new) > SEGMENTS_PER_REPLY:  # hello and read keep within it; anything else is refused
            return {"id": rid, "ok": False, "error": "the reply would span too many new segments"}, []
        lease.segments_sent.update(s.id for s in new)
        reply = {"id": rid, "ok": True, **body}
        if new:
            reply["segments"] = [s.describe() for s in new]
        return reply, [s.fd for s in new]

    # ------------------------------------------------------------------------------ ops

    def op_hello(
        self, store: Store, lease: Lease, msg: dict[str, Any]
    ) -> tuple[dict[str, Any], list[Segment]]:
        lease.segments_sent.clear()  # a second hello re-sends everything
        # the rest, if any, arrive with the first reply that refers to them
        segments = store.segments_for(lease)[:SEGMENTS_PER_REPLY]
        return {
            "namespace": self.server.namespace,
            "isolation": store.isolation,
            "segmentBytes": store.dram.segment_bytes,
            "blockTokens": self.server.block_tokens,
            "frameBytes": self.server.limits.frame_bytes,  # clients split longer chains
        }, segments

    def op_ping(self, store: Store, lease: Lease, msg: dict[str, Any]):
        return {}, []

    def op_stats(self, store: Store, lease: Lease, msg: dict[str, Any]):
        return {"stats": store.stats(lease.tenant)}, []  # this tenant's own numbers only

    def op_lookup(self, store: Store, lease: Lease, msg: dict[str, Any]):
        tiers = store.lookup(lease.tenant, _fingerprint(msg), _keys(msg))
        return {"hits": len(tiers), "tiers": tiers}, []

    def op_allocate(self, store: Store, lease: Lease, msg: dict[str, Any]):
        sizes = _ints(msg, "sizes")
        if len(sizes) > MAX_KEYS or any(s <= 0 for s in sizes):
            raise StoreError("'sizes' must be positive and at most 65536 entries")
        wait = msg.get("wait", 0)
        if not isinstance(wait, int | float) or not 0 <= wait <= 30:
            raise StoreError("'wait' must be a number of seconds between 0 and 30")
        got = store.allocate(lease, sizes, float(wait))
        return {"extents": [[seg.id, ext.offset, ext.length] for seg, ext in got]}, [seg for seg, _ in got]

    def op_commit(self, store: Store, lease: Lease, msg: dict[str, Any]):
        keys = _keys(msg)
        locs = msg.get("extents")
        if not isinstance(locs, list) or len(locs) != len(keys):
            raise StoreError("'extents' must list one [segment, offset] per key")
        locations = []
        for loc in locs:
            if not (isinstance(loc, list) and len(loc) >= 2 and all(isinstance(x, int) for x in loc[:2])):
                raise StoreError("each extent must be [segment, offset]")
            locations.append((loc[0], loc[1]))
        sizes = _ints(msg, "sizes", len(keys))
        checksums = msg.get("checksums")
        if checksums is not None:
            checksums = _ints(msg, "checksums", len(keys))
        new = store.commit(lease, _fingerprint(msg), keys, locations, sizes, checksums, bool(msg.get("sync")))
        return {"new": new}, []

    def op_read(self, store: Store, lease: Lease, msg: dict[str, Any]):
        got = store.read(lease, _fingerprint(msg), _keys(msg))
        fits, new = len(got), set()
        for i, (seg, _, _) in enumerate(got):  # a shorter answer (a miss for the rest), not too many fds
            if seg.id not in lease.segments_sent:
                new.add(seg.id)
            if len(new) > SEGMENTS_PER_REPLY:
                fits = i
                break
        store.release(lease, [block.key for _, _, block in got[fits:]])
        got = got[:fits]
        blocks = [[seg.id, ext.offset, block.size, block.key.hex()] for seg, ext, block in got]
        return {"blocks": blocks, "tiers": []}, [seg for seg, _, _ in got]

    def op_prefetch(self, store: Store, lease: Lease, msg: dict[str, Any]):
        deadline = msg.get("deadline", 2.0)
        if not isinstance(deadline, int | float) or not 0 < deadline <= 60:
            raise StoreError("'deadline' must be seconds between 0 and 60")
        prefetcher = self.server.prefetcher
        if prefetcher is None:
            return {
                "result": store.prefetch_local(
                    lease.tenant, _fingerprint(msg), _keys(msg), time.monotonic() + deadline
                )
            }, []
        return {"result": prefetcher.run(lease.tenant, _fingerprint(msg), _keys(msg), float(deadline))}, []

    def op_release(self, store: Store, lease: Lease, msg: dict[str, Any]):
        store.release(lease, _keys(msg, "handles"))
        return {}, []


def _unsent(lease: Lease, segments: list[Segment]) -> list[Segment]:
    return list({s.id: s for s in segments if s.id not in lease.segments_sent}.values())


class TenantServer(LimitedServer, socketserver.UnixStreamServer):
    allow_reuse_address = True

    def __init__(
        self,
        path: Path,
        namespace: str,
        store: Store,
        block_tokens: int,
        prefetcher=None,
        limits: ServerLimits | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.namespace = namespace
        self.prefetcher = prefetcher
        self.store = store
        self.metrics = store.metrics
        self.block_tokens = block_tokens
        self.limits = limits or ServerLimits()
        self.gate = gate or Gate(self.limits.connections, self.limits.connections_per_tenant)
        self.gate_key = namespace
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o755)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        super().__init__(str(path), TenantHandler)
        path.chmod(0o666)  # who can reach the folder is decided by what is mounted into pods


class AdminHandler(socketserver.BaseRequestHandler):
    server: AdminServer

    def handle(self) -> None:
        limits = self.server.api.limits
        try:
            while True:
                try:
                    msg, _ = limits.recv(self.request, limits.frame_bytes)
                except protocol.BadMessage as exc:
                    protocol.send(self.request, {"ok": False, "error": str(exc)})
                    continue
                try:
                    reply = self.server.api.admin(msg)
                except Exception as exc:  # an admin bug must answer, not hang up on node components
                    _throttled.exception("admin", "admin request %r failed", msg.get("op"))
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                protocol.send(self.request, reply)
        except (ConnectionError, OSError, protocol.ProtocolError):
            pass


class AdminServer(LimitedServer, socketserver.UnixStreamServer):
    gate_key = "admin"

    def __init__(self, path: Path, api: AgentAPI) -> None:
        self.api = api
        self.metrics = api.store.metrics
        self.gate = Gate(64, 64)  # node components only (mode 0600): a few at a time
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old = os.umask(0o077)
        try:
            super().__init__(str(path), AdminHandler)
        finally:
            os.umask(old)


class AgentAPI:
    """Owns the sockets: the admin one, and a tenant one per namespace created on demand."""

    def __init__(
        self,
        socket_dir: Path,
        store: Store,
        block_tokens: int,
        extra_stats=None,
        node=None,
        limits: ServerLimits | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.socket_dir = socket_dir
        self.store = store
        self.limits = limits or ServerLimits()
        # one gate for every tenant socket (and the peer port, which the agent passes the same gate)
        self.gate = gate or Gate(self.limits.connections, self.limits.connections_per_tenant)
        self.block_tokens = block_tokens
        self.extra_stats = extra_stats or (lambda: {})
        self.node = node  # CSI-style node calls (identity, probe, node_info, capacity), read-only
        self.prefetcher = None  # set by the agent once its peer transport is up
        self.tenants: dict[str, TenantServer] = {}
        self._lock = threading.Lock()
        socket_dir.mkdir(parents=True, exist_ok=True)
        self.admin_server = AdminServer(socket_dir / "admin.sock", self)
        self._serve(self.admin_server)
        # Tenants of a previous run (a restarted container): their folders are bind-mounted into
        # running pods, whose clients reconnect to the same path.
        tenants = tenant_socket(socket_dir, "x").parent.parent
        for folder in sorted(tenants.iterdir()) if tenants.is_dir() else []:
            if NAMESPACE.match(folder.name) and tenant_socket(socket_dir, folder.name).exists():
                self.ensure_tenant(folder.name)

    def ensure_tenant(self, namespace: str) -> Path:
        if not NAMESPACE.match(namespace or ""):
            raise StoreError(f"{namespace!r} is not a namespace name")
        with self._lock:
            if namespace not in self.tenants:
                path = tenant_socket(self.socket_dir, namespace)
                server = TenantServer(
                    path, namespace, self.store, self.block_tokens, self.prefetcher, self.limits, self.gate
                )
                self.tenants[namespace] = server
                self._serve(server)
            return Path(self.tenants[namespace].server_address)  # type: ignore[arg-type]

    def admin(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        try:
            if op == "ensure_tenant":
                path = self.ensure_tenant(str(msg.get("namespace", "")))
                return {"ok": True, "socket": str(path), "folder": str(path.parent)}
            if op == "stats":
                return {"ok": True, "stats": {**self.store.stats(), **self.extra_stats()}}
            if op == "ping":
                return {"ok": True}
            if op in ("identity", "probe", "node_info", "capacity") and self.node is not None:
                return {"ok": True, **getattr(self.node, op)()}
            if op == "evict_dram":
                return {"ok": True, "dropped": self.store.evict_dram()}
            return {"ok": False, "error": f"unknown op {op!r}"}
        except StoreError as exc:
            return {"ok": False, "error": str(exc)}

    @staticmethod
    def _serve(server: socketserver.BaseServer) -> None:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()

    def close(self) -> None:
        for server in [self.admin_server, *self.tenants.values()]:
            server.shutdown()
            server.server_close()
