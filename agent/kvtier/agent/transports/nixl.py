"""Blocks between agents over NIXL: a peer fetch is NIXL READs from the owner's arena into ours.

Each agent registers its DRAM segments with NIXL (UCX backend: RDMA where the node has it, TCP
here): segments it serves with a serving NIXL agent, segments it fetches into with a fetching one.
A reader asks the owner over the authenticated control channel for a chain of index keys on behalf
of a tenant; the owner answers with what its own index authorises for that request:
the leading blocks it holds for that tenant, pinned until the reader is done, their extents and
checksums, and NIXL metadata for only the segments that hold them (partial metadata: a reader never
learns the memory keys of segments outside its answers; a segment holds one tenant's blocks, and a
segment that goes back to the pool is deregistered before its memory is released, so a memory key
never outlives the tenant it was handed out for). The reader reserves local extents in its own
tenant segments, READs the remote extents straight into them (no staging copy of ours on either
side; over TCP, UCX itself emulates a READ by copying through its own send and receive segments),
verifies each checksum in place, and only then indexes the blocks. A failed, corrupt or late
block is a miss: only blocks that arrived whole and verified, in chain order, are indexed.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import importlib.metadata
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kvtier.agent.store.index import Block, Store, checksum
from kvtier.agent.tiers.dram import Segment
from kvtier.agent.transports.control import ControlClient

log = logging.getLogger("kvtier.agent.nixl")
MAX_FETCH = 4096
# A fetch is a pipeline of READs, one per window of consecutive blocks, a couple on the wire at
# once: each window is verified and indexed while the next one moves, and a peer lost mid-fetch
# still leaves the windows that arrived. (Window sizes from 1 MiB to one READ for everything
# measured the same here, within the noise of a shared 2-core machine.)
READ_WINDOW_BYTES = 4 << 20
READS_IN_FLIGHT = 2
# A peer whose loaded NIXL agent left a READ unanswered is not reloaded under a new agent name for
# this long: unloading a silent agent leaves its UCX endpoints waiting for a flush that never comes
# (two sockets each), so a peer answering every fetch with a fresh agent would otherwise cost two
# descriptors a fetch without end. A peer that restarted after a late READ waits this long too.
RELOAD_AFTER_LATE_S = 60.0
WAIT_PAUSE_MAX = 5e-4  # between progress calls of a waiting fetch: ~1 MB at the link's speed here
NIXL_MODULES = ("nixl_cu12._api", "nixl_cu13._api", "nixl._api")
NIXL_DISTRIBUTIONS = ("nixl-cu12", "nixl-cu13", "nixl")


# Over TCP, UCX emulates a READ in software: a request, then the owner's replies in TX segments.
# 8 KiB segments and default socket buffers keep a single stream far below the link; these are
# defaults only (a pod's own UCX_* environment wins). Measured in docs/benchmarks/transport-*.json.
UCX_TCP_DEFAULTS = {
    "UCX_TCP_TX_SEG_SIZE": "1m",
    "UCX_TCP_RX_SEG_SIZE": "1m",
    "UCX_TCP_SNDBUF": "4m",
    "UCX_TCP_RCVBUF": "4m",
}


@contextlib.contextmanager
def _ucx_environment(ucx_tls: str) -> Iterator[None]:
    """UCX reads its configuration from the environment once, when NIXL creates the backend."""
    wanted = {**{k: v for k, v in UCX_TCP_DEFAULTS.items() if k not in os.environ}, "UCX_TLS": ucx_tls}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# NIXL's progress thread sleeps in poll() on UCX's event descriptors and also sweeps every worker
# when poll times out. The Python API fixes that timeout at its minimum (1 ms): an idle agent then
# burned ~40% of a core here. Events still wake the thread at once; the sweep is only a backstop.
PROGRESS_SWEEP_US = 100_000


@contextlib.contextmanager
def _progress_sweep(module: Any, delay_us: int) -> Iterator[None]:
    bind = getattr(module, "nixlBind", None)
    make = getattr(bind, "nixlAgent", None)
    if make is None:
        yield
        return

    def with_sweep(name: str, config: Any) -> Any:
        config.pthrDelay = delay_us
        return make(name, config)

    bind.nixlAgent = with_sweep
    try:
        yield
    finally:
        bind.nixlAgent = make


class PeerError(OSError):
    """The peer refused, broke the protocol or the transfer failed: its blocks are misses."""


@dataclass(frozen=True)
class Landed:
    key: bytes
    size: int
    new: bool  # False: the key was already indexed here by the time the bytes arrived


def load_nixl() -> tuple[Any, str]:
    """NIXL's Python API module and its version; ImportError saying why when it cannot be used."""
    errors = []
    for name in NIXL_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # a wheel for another platform fails with OSError, not ImportError
            errors.append(f"{name}: {exc}")
            continue
        for dist in NIXL_DISTRIBUTIONS:
            try:
                return module, importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        return module, "unknown"
    raise ImportError("NIXL is not importable (" + "; ".join(errors) + ")")


class NixlTransport:
    name = "nixl"

    def __init__(self, store: Store, secret: bytes, agent_name: str, ucx_tls: str) -> None:
        module, self.version = load_nixl()
        self.store, self.secret, self.agent_name = store, secret, agent_name
        # Two NIXL agents. The serving one answers peers' READs, which over TCP UCX emulates in
        # software on the owner: it needs a progress thread. The fetching one posts this agent's
        # READs and is progressed only by the fetch that waits on them: with a progress thread of
        # its own, that thread and the waiting fetch fought over the UCX worker's lock, and the
        # reader spent about twice the CPU per GB moved (docs/benchmarks/transport-*.json).
        sync = module.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
        with _ucx_environment(ucx_tls), _progress_sweep(module, PROGRESS_SWEEP_US):
            self.nixl = module.nixl_agent(
                agent_name, module.nixl_agent_config(backends=["UCX"], sync_mode=sync)
            )
            self.fetcher = module.nixl_agent(
                f"{agent_name}.fetch",
                module.nixl_agent_config(enable_prog_thread=False, backends=["UCX"], sync_mode=sync),
            )
        if "UCX" not in self.nixl.backends or "UCX" not in self.fetcher.backends:
            raise ImportError(f"NIXL {self.version} has no UCX backend plugin")
        self._lock = threading.RLock()
        # (NIXL agent's name, segment id) -> the segment and its registration with that agent
        self._registered: dict[tuple[str, int], tuple[Segment, Any]] = {}
        self._remote: dict[str, str] = {}  # peer address -> NIXL agent name loaded for it
        self._late: dict[str, float] = {}  # peer address -> when its loaded agent left a READ unanswered
        self._stuck: list[tuple[Any, list[tuple[Segment, Any]]]] = []  # transfers NIXL could not cancel
        store.dram.retire_hooks.append(self._forget)

    # ------------------------------------------------------------------------ registrations

    def _register(self, agent: Any, segments: set[Segment]) -> list[tuple[int, int, int, str]]:
        regions = []
        with self._lock:
            for seg in segments:
                region = (seg.address, seg.size, 0, "")
                if (agent.name, seg.id) not in self._registered:
                    self._registered[agent.name, seg.id] = (seg, agent.register_memory([region], "DRAM"))
                regions.append(region)
        return regions

    def _forget(self, seg: Segment) -> None:
        with self._lock:
            for agent in (self.nixl, self.fetcher):
                got = self._registered.pop((agent.name, seg.id), None)
                if got is not None:
                    agent.deregister_memory(got[1])

    def registered_segments(self) -> int:
        with self._lock:
            return len({seg_id for _, seg_id in self._registered})

    # -------------------------------------------------------------------------- owner side

    def new_session(self) -> OwnerSession:
        return OwnerSession(self)

    def authorise(self, tenant: str, ikeys: list[bytes]) -> tuple[list[Block], dict[str, Any]]:
        """Pin the leading blocks of `ikeys` that this agent holds for `tenant`; the answer lets the
        reader READ exactly those (their extents, plus memory keys of only their segments)."""
        pinned = self.store.pin_for_peer(ikeys)
        allowed = 0
        while allowed < len(pinned) and pinned[allowed][0].tenant == tenant:
            allowed += 1
        self.store.unpin_for_peer([b for b, _ in pinned[allowed:]])
        blocks = [b for b, _ in pinned[:allowed]]
        if not blocks:
            return [], {"ok": True, "blocks": []}
        regions = self._register(self.nixl, {b.seg for b in blocks if b.seg})
        metadata = self.nixl.get_partial_agent_metadata(
            self.nixl.get_reg_descs(regions, "DRAM"), True, ["UCX"]
        )
        answer = [
            {
                "key": b.key.hex(),
                "size": b.size,
                "checksum": b.checksum,
                "addr": b.seg.address + b.extent.offset,  # type: ignore[union-attr]
            }
            for b in blocks
        ]
        self.store.metrics.peer_bytes.labels("served").inc(sum(b.size for b in blocks))
        return blocks, {
            "ok": True,
            "agent": self.agent_name,
            "metadata": base64.b64encode(metadata).decode(),
            "blocks": answer,
        }

    # ------------------------------------------------------------------------- reader side

    def fetch(
        self,
        peer: str,
        tenant: str,
        ikeys: list[bytes],
        deadline: float,
        sizes: dict[bytes, int] | None = None,
    ) -> list[Landed]:
        """The leading blocks of `ikeys` that `peer` holds for `tenant`, READ into this agent's arena,
        verified and indexed. Stops at the first block that is absent, corrupt or late, or (given
        `sizes`, a drain offer's) whose size is not the one promised: a peer cannot make this agent
        hold more than it agreed to take."""
        self._retry_stuck()
        landed: list[Landed] = []
        with ControlClient(peer, self.secret, timeout=_left(deadline)) as control:
            for start in range(0, len(ikeys), MAX_FETCH):
                want = ikeys[start : start + MAX_FETCH]
                reply = control.call(
                    {"op": "fetch", "tenant": tenant, "keys": [k.hex() for k in want]}, _left(deadline)
                )
                if not reply.get("ok"):
                    raise PeerError(f"peer refused: {reply.get('error')}")
                try:
                    got = self._read(peer, reply, want, tenant, deadline, sizes)
                finally:
                    try:
                        control.call({"op": "done"}, min(1.0, _left(deadline)))
                    except OSError:
                        pass  # the owner drops the pins when the connection goes anyway
                landed += got
                if len(got) < len(want):
                    break
        return landed

    def _read(
        self,
        peer: str,
        reply: dict[str, Any],
        want: list[bytes],
        tenant: str,
        deadline: float,
        sizes: dict[bytes, int] | None = None,
    ) -> list[Landed]:
        offered = _offered(reply, want, self.store.dram.segment_bytes, sizes)
        reserved: list[tuple[Segment, Any]] = []
        for _, size, _, _ in offered:
            room = self.store.reserve_for_peer(tenant, size)
            if room is None:
                break
            reserved.append(room)
        offered = offered[: len(reserved)]
        if not offered:
            return []
        if self._held_back(peer, str(reply.get("agent", ""))):
            self._unreserve(reserved)
            raise PeerError("a new NIXL agent after a READ left unanswered: not loaded for now")
        try:
            self._register(self.fetcher, {seg for seg, _ in reserved})
            remote_agent = self._load_remote(peer, reply)
        except Exception as exc:
            self._unreserve(reserved)
            self._drop_remote(peer)
            raise PeerError(f"cannot set up the READ: {exc}") from exc
        windows = _windows([size for _, size, _, _ in offered], READ_WINDOW_BYTES)
        in_flight: deque[tuple[int, int, Any]] = deque()
        landed: list[Landed] = []
        posted = 0
        failure = None
        started = time.perf_counter()
        verifying = 0.0
        while failure is None and (in_flight or posted < len(windows)):
            while posted < len(windows) and len(in_flight) < READS_IN_FLIGHT:
                start, end = windows[posted]
                try:
                    handle = self._post(remote_agent, reserved[start:end], offered[start:end])
                except Exception as exc:
                    failure = f"cannot post the READ: {exc}"
                    break
                in_flight.append((start, end, handle))
                posted += 1
            if failure is not None or not in_flight:
                break
            start, end, handle = in_flight[0]
            state = self._wait(handle, deadline)
            if state != "DONE":
                failure = "transfer failed" if state == "ERR" else "transfer missed its deadline"
                break
            in_flight.popleft()
            self.fetcher.release_xfer_handle(handle)
            self._late.pop(peer, None)
            t0 = time.perf_counter()
            got = self._verify_and_adopt(offered[start:end], reserved[start:end], tenant)
            verifying += time.perf_counter() - t0
            landed += got
            if len(got) < end - start:
                failure = "a block failed its checksum"
        log.debug(
            "READ of %d of %d blocks from %s in %.4f s (%.4f s verifying)%s",
            len(landed),
            len(offered),
            peer,
            time.perf_counter() - started,
            verifying,
            f": {failure}" if failure else "",
        )
        if failure is None:
            return landed
        for start, end, handle in in_flight:  # windows still on the wire
            self._give_up(handle, reserved[start:end])
        if posted < len(windows):  # windows never posted
            self._unreserve(reserved[windows[posted][0] :])
        if failure == "a block failed its checksum":
            return landed  # the bytes were there and wrong: a miss, the peer itself is fine
        # A peer that is there but late (or never answers a READ) keeps its loaded agent: unloading
        # it leaves the UCX endpoints waiting for a flush the peer never answers, two sockets per
        # fetch without end. A broken one is reset; a restarted one is reloaded by its new name.
        if failure != "transfer missed its deadline":
            self._drop_remote(peer)
        else:
            self._late[peer] = time.monotonic()
        if landed:
            return landed  # the verified prefix counts; the peer's state is reset for next time
        raise PeerError(failure)

    def _post(self, remote_agent: str, reserved: list[tuple[Segment, Any]], offered: list[Any]) -> Any:
        local = self.fetcher.get_xfer_descs(
            [(seg.address + ext.offset, o[1], 0) for (seg, ext), o in zip(reserved, offered, strict=True)],
            "DRAM",
        )
        remote = self.fetcher.get_xfer_descs([(addr, size, 0) for _, size, _, addr in offered], "DRAM")
        handle = self.fetcher.initialize_xfer("READ", local, remote, remote_agent)
        if self.fetcher.transfer(handle) == "ERR":
            self._give_up(handle, [])
            raise PeerError("the READ was refused")
        return handle

    def _wait(self, handle: Any, deadline: float) -> str:
        """DONE, ERR, or PROC when the deadline came first. NIXL raises for some failures (the
        remote disconnected): those are ERR like the rest. Each check is also what moves the
        fetching agent's bytes (it has no progress thread): the pause stays short."""
        try:
            state = self.fetcher.check_xfer_state(handle)
            pause = 2e-5
            while state == "PROC" and time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, WAIT_PAUSE_MAX)
                state = self.fetcher.check_xfer_state(handle)
        except Exception as exc:
            log.info("transfer failed: %s", exc)
            return "ERR"
        return state

    def _verify_and_adopt(
        self, offered: list[tuple[bytes, int, int, int]], reserved: list[tuple[Segment, Any]], tenant: str
    ) -> list[Landed]:
        landed: list[Landed] = []
        for i, ((key, size, sum_, _), (seg, ext)) in enumerate(zip(offered, reserved, strict=True)):
            if checksum(seg.view(ext, size)) != sum_:
                self.store.metrics.checksum_failures.labels("peer").inc()
                self._unreserve(reserved[i:])  # a corrupt block ends the prefix: a miss, never wrong KV
                break
            landed.append(Landed(key, size, self.store.adopt(key, tenant, seg, ext, size, sum_)))
        return landed

    def _load_remote(self, peer: str, reply: dict[str, Any]) -> str:
        claimed = str(reply.get("agent", ""))
        with self._lock:
            if self._remote.get(peer) not in (None, claimed):
                self._drop_remote(peer)  # the peer restarted under a new NIXL name
            metadata = base64.b64decode(str(reply.get("metadata", "")))
            try:
                loaded = self.fetcher.add_remote_agent(metadata)
            except Exception:  # stale sections of a peer we knew: start over with this answer
                self._remote[peer] = claimed
                self._drop_remote(peer)
                loaded = self.fetcher.add_remote_agent(metadata)
            loaded = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
            if loaded != claimed:
                raise PeerError(f"metadata names agent {loaded!r}, the answer {claimed!r}")
            self._remote[peer] = loaded
            return loaded

    def _held_back(self, peer: str, claimed: str) -> bool:
        with self._lock:
            late = self._late.get(peer)
            loaded = self._remote.get(peer)
        return (
            loaded not in (None, claimed)
            and late is not None
            and time.monotonic() - late < RELOAD_AFTER_LATE_S
        )

    def _drop_remote(self, peer: str) -> None:
        with self._lock:
            self._late.pop(peer, None)
            name = self._remote.pop(peer, None)
            if name is not None:
                try:
                    self.fetcher.remove_remote_agent(name)
                except Exception as exc:
                    log.debug("removing NIXL agent %s: %s", name, exc)

    def _give_up(self, handle: Any, reserved: list[tuple[Segment, Any]]) -> None:
        """A transfer that did not finish may still write into its extents until NIXL cancels it:
        they return to the arena only once the handle is released."""
        try:
            self.fetcher.release_xfer_handle(handle)
        except Exception:
            with self._lock:
                self._stuck.append((handle, reserved))
            return
        self._unreserve(reserved)

    def _retry_stuck(self) -> None:
        with self._lock:
            stuck, self._stuck = self._stuck, []
        for handle, reserved in stuck:
            self._give_up(handle, reserved)

    def _unreserve(self, reserved: list[tuple[Segment, Any]]) -> None:
        for seg, ext in reserved:
            self.store.unreserve(seg, ext)


class OwnerSession:
    """One reader's control session: at most one answered request's blocks pinned at a time."""

    def __init__(self, transport: NixlTransport) -> None:
        self.transport = transport
        self.pinned: list[Block] = []

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.close()
        op = msg.get("op")
        if op == "done":
            return {"ok": True}
        if op != "fetch":
            return {"ok": False, "error": f"unknown op {op!r}"}
        keys, tenant = msg.get("keys"), msg.get("tenant")
        if not isinstance(tenant, str) or not isinstance(keys, list) or len(keys) > MAX_FETCH:
            return {"ok": False, "error": f"fetch needs a tenant and at most {MAX_FETCH} keys"}
        try:
            ikeys = [bytes.fromhex(k) for k in keys]
        except (TypeError, ValueError):
            return {"ok": False, "error": "keys must be hex strings"}
        self.pinned, answer = self.transport.authorise(tenant, ikeys)
        return answer

    def close(self) -> None:
        if self.pinned:
            self.transport.store.unpin_for_peer(self.pinned)
            self.pinned = []


def _offered(
    reply: dict[str, Any], want: list[bytes], max_size: int, sizes: dict[bytes, int] | None = None
) -> list[tuple[bytes, int, int, int]]:
    """The owner's answer as (key, size, checksum, remote address), cut at the first entry that is
    not the next key asked for, is malformed, or is not the size `sizes` expects: a peer's bytes
    and words are untrusted."""
    out = []
    blocks = reply.get("blocks")
    for key, info in zip(want, blocks if isinstance(blocks, list) else [], strict=False):
        try:
            got = (bytes.fromhex(info["key"]), int(info["size"]), int(info["checksum"]), int(info["addr"]))
        except (TypeError, ValueError, KeyError):
            break
        if got[0] != key or not 0 < got[1] <= max_size or got[3] <= 0:
            break
        if sizes is not None and sizes.get(key) != got[1]:
            break
        out.append(got)
    return out


def _windows(sizes: list[int], window: int) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive blocks of about `window` bytes (at least one block each)."""
    out, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total >= window:
            out.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())
