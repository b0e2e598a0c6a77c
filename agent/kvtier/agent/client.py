"""The engine-side client of a node agent. Standard library only (it runs inside engine images).

    client = Client("/var/run/kvtier/kvtier.sock")
    client.put(fingerprint, keys, blobs)            # allocate, copy into the arena, commit
    n = client.lookup(fingerprint, keys)            # leading keys that hit
    with client.read(fingerprint, keys) as blocks:  # pinned views into the arena (zero copy)
        for b in blocks: use(b.view)

The arena's segments arrive as file descriptors and are mapped here, so reads and writes are plain
memory copies (or DMA, once a GPU runtime registers the mapping); only control messages cross the
socket.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from kvtier.agent.api import protocol
from kvtier.agent.api.protocol import AgentError

DEFAULT_SOCKET = "/var/run/kvtier/kvtier.sock"
log = logging.getLogger("kvtier.client")
# what a lost agent looks like to a caller: the connection is gone (make a new Client), not a refusal
CONNECTION_LOST = (OSError, protocol.ProtocolError)
# A live agent answers hello at once; one that does not is hung (stopped, swapping), and a caller
# on an engine's path must not wait for it as long as for a read that promotes gigabytes from NVMe.
HELLO_TIMEOUT = 5.0
RETRY_MAX = 60.0  # the longest wait between attempts on an agent that keeps failing
FRAME_SLACK = 2048  # a request's bytes besides its keys (op, id, fingerprint of at most 512)


@dataclass(frozen=True)
class Slot:
    """An allocated extent: write a block into `view`, then commit it."""

    segment: int
    offset: int
    length: int
    view: memoryview


@dataclass(frozen=True)
class PinnedBlock:
    handle: bytes
    segment: int
    offset: int
    size: int
    view: memoryview


class Pinned(list):
    """Blocks pinned by a read; released on exit from the `with` block."""

    def __init__(self, client: Client, blocks: list[PinnedBlock]) -> None:
        super().__init__(blocks)
        self._client = client

    def __enter__(self) -> Pinned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def usable(self, size: int) -> int:
        """How many leading blocks are `size` bytes and inside their segment. The rest is a miss:
        another engine's geometry under the same fingerprint (a client of the namespace may commit
        any size), or a reply that lies; copying `size` bytes from it would read past the block."""
        for i, b in enumerate(self):
            if b.size != size:
                log.warning("kvtier block of %d bytes where %d were expected: not loaded", b.size, size)
                return i
            if b.offset < 0 or len(b.view) != size:
                log.warning("kvtier block at %d is not inside segment %d: not loaded", b.offset, b.segment)
                return i
        return len(self)

    def release(self) -> None:
        if self and self._client.sock.fileno() != -1:  # a closed connection's pins went with it
            self._client.release([b.handle for b in self])
        self.clear()


class Client:
    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        timeout: float | None = 30.0,
        hello_timeout: float = HELLO_TIMEOUT,
    ) -> None:
        self.path = str(path or os.environ.get("KVTIER_SOCKET", DEFAULT_SOCKET))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(hello_timeout if timeout is None else min(timeout, hello_timeout))
        self.sock.connect(self.path)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.segments: dict[int, mmap.mmap] = {}
        self.readonly: set[int] = set()  # segments mapped read-only (no client may write them)
        try:
            self.hello = self.call("hello")
            self.sock.settimeout(timeout)
        except BaseException:  # refused or gone: the socket is not left to the garbage collector
            self.sock.close()
            raise
        with self._parsing():
            self.namespace: str = str(self.hello["namespace"])
            self.block_tokens: int = int(self.hello["blockTokens"])
            # the agent hangs up on a longer request (the stream is out of step): longer chains are
            # asked for in parts (agents that do not say have the default of 4 MiB)
            self.frame_bytes: int = int(self.hello.get("frameBytes", 4 << 20))

    # ------------------------------------------------------------------------------ plumbing

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            rid = next(self._ids)
            try:
                protocol.send(self.sock, {"id": rid, "op": op, **fields})
                reply, fds = protocol.recv(self.sock)
                self._map_segments(reply.get("segments", []), fds)
            except BaseException:
                # A request cut off half way (an interrupt, a timeout) leaves its reply on the way,
                # and the next call would take it for its own (another prompt's blocks): the
                # connection is done, and its callers see a lost one (the agent drops its pins).
                self.sock.close()
                raise
        if not reply.get("ok"):
            raise AgentError(reply.get("error", "agent refused the request"))
        return reply

    def _map_segments(self, described: list[dict[str, int]], fds: list[int]) -> None:
        """Map the segments a reply carried; sealed ones (a shared pool's committed blocks) read-only."""
        for i, fd in enumerate(fds):
            try:
                if i < len(described):
                    info = described[i]
                    writable = info.get("writable", True)
                    access = mmap.ACCESS_DEFAULT if writable else mmap.ACCESS_READ
                    self.segments[info["id"]] = mmap.mmap(fd, info["size"], mmap.MAP_SHARED, access=access)
                    if not writable:
                        self.readonly.add(info["id"])
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def _parsing(self):
        """A reply in the wrong shape, or naming a segment never sent: the connection is done (a
        lost one for callers, a miss for engines), never a KeyError in the engine's code."""
        try:
            yield
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            self.sock.close()
            raise protocol.ProtocolError(f"the agent's reply is malformed: {exc!r}") from None

    def segment_view(self, segment: int) -> memoryview:
        return memoryview(self.segments[segment])

    def close(self) -> None:
        self.sock.close()
        for mm in self.segments.values():
            try:
                mm.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes with the process
        self.segments.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- API

    def _parts(self, n: int, width: int) -> list[slice]:
        """`n` items of at most `width` bytes each in JSON, in parts that each fit one request frame
        (one part at least, maybe empty)."""
        per = max(1, (self.frame_bytes - FRAME_SLACK) // max(1, width))
        return [slice(i, i + per) for i in range(0, n, per)] or [slice(0, 0)]

    def _key_parts(self, keys: list[bytes], extra: int = 0) -> list[slice]:
        return self._parts(len(keys), max(map(len, keys), default=0) * 2 + 3 + extra)

    def lookup(self, fingerprint: str, keys: list[bytes]) -> int:
        hits = 0
        for part in self._key_parts(keys):
            want = [k.hex() for k in keys[part]]
            reply = self.call("lookup", fingerprint=fingerprint, keys=want)
            with self._parsing():
                got = int(reply["hits"])
            hits += got
            if got < len(want):
                break
        return hits

    def allocate(self, sizes: list[int], wait: float = 0.0) -> list[Slot]:
        """Room in the arena. `wait`: seconds the agent may wait for write-behind to make room
        (0, the default for engines, means "refuse now and let me skip this save")."""
        reply = self.call("allocate", sizes=sizes, wait=wait)  # one request: all or nothing
        with self._parsing():
            return [
                Slot(seg, off, length, memoryview(self.segments[seg])[off : off + length])
                for seg, off, length in reply["extents"]
            ]

    def commit(
        self, fingerprint: str, keys: list[bytes], slots: list[Slot], sizes: list[int], sync: bool = False
    ) -> int:
        new = 0
        for part in self._key_parts(keys, extra=66):  # [segment, offset] and a size
            reply = self.call(
                "commit",
                fingerprint=fingerprint,
                keys=[k.hex() for k in keys[part]],
                extents=[[s.segment, s.offset] for s in slots[part]],
                sizes=sizes[part],
                sync=sync,
            )
            with self._parsing():
                new += int(reply["new"])
        return new

    def put(
        self,
        fingerprint: str,
        keys: list[bytes],
        blobs: list[bytes | memoryview],
        sync: bool = False,
        wait: float = 0.0,
    ) -> int:
        """Store blocks (copied into the arena); returns how many were new to the agent."""
        sizes = [len(memoryview(b).cast("B")) for b in blobs]
        slots = self.allocate(sizes, wait)
        for slot, blob, size in zip(slots, blobs, sizes, strict=True):
            slot.view[:size] = memoryview(blob).cast("B")
        return self.commit(fingerprint, keys, slots, sizes, sync=sync)

    def read(self, fingerprint: str, keys: list[bytes]) -> Pinned:
        """Pin the leading blocks that hit; views stay valid until released."""
        pinned = Pinned(self, [])
        try:
            for part in self._key_parts(keys):
                want = [k.hex() for k in keys[part]]
                reply = self.call("read", fingerprint=fingerprint, keys=want)
                with self._parsing():
                    blocks = reply["blocks"]
                    pinned += [
                        PinnedBlock(
                            bytes.fromhex(h), seg, off, size, memoryview(self.segments[seg])[off : off + size]
                        )
                        for seg, off, size, h in blocks
                    ]
                if len(blocks) < len(want):
                    break
        except BaseException:
            with contextlib.suppress(*CONNECTION_LOST, AgentError):
                pinned.release()  # the parts pinned before the one that failed
            raise
        return pinned

    def get(self, fingerprint: str, keys: list[bytes]) -> list[bytes]:
        with self.read(fingerprint, keys) as blocks:
            return [bytes(b.view) for b in blocks]

    def release(self, handles: list[bytes]) -> None:
        for part in self._key_parts(handles):
            self.call("release", handles=[h.hex() for h in handles[part]])

    def stats(self) -> dict[str, Any]:
        return self.call("stats")["stats"]


def admin_call(
    socket_dir: str | os.PathLike[str], op: str, timeout: float | None = 10.0, **fields: Any
) -> dict[str, Any]:
    """One request on an agent's admin socket (node components only)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.path.join(socket_dir, "admin.sock"))
        protocol.send(sock, {"op": op, **fields})
        reply, _ = protocol.recv(sock)
    if not reply.get("ok"):
        raise AgentError(reply.get("error", "agent refused the request"))
    return reply


class AgentConnection:
    """A Client that comes back after the agent does (connectors, the sidecar).

    `get()` connects on demand and answers None while the agent cannot be reached; after `lost()`
    every `get()` is None for `retry_after` seconds, so a hung agent costs one timeout, not one per
    call. Subclasses release what they built on a connection (views of its arena) in `_release`,
    before the connection's mappings go: nothing outlives the memory it points at."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        timeout: float | None = 30.0,
        retry_after: float = 0.0,
        client: Client | None = None,
        hello_timeout: float = HELLO_TIMEOUT,
    ) -> None:
        self.path = str(client.path if client else (path or os.environ.get("KVTIER_SOCKET", DEFAULT_SOCKET)))
        self.timeout = timeout
        self.retry_after = retry_after
        self.hello_timeout = hello_timeout
        self.client = client
        self._retry_at = 0.0
        self._failures = 0  # attempts failed in a row: the wait before the next one doubles
        self._lock = threading.Lock()

    def get(self) -> Client | None:
        with self._lock:
            if self.client is not None and self.client.sock.fileno() == -1:  # a call was cut off
                self._close()
            if self.client is None and time.monotonic() >= self._retry_at:
                try:
                    self.client = Client(self.path, timeout=self.timeout, hello_timeout=self.hello_timeout)
                    self._failures = 0
                except (*CONNECTION_LOST, AgentError) as exc:  # down, or refusing (its connection limit)
                    log.warning("kvtier agent not reachable at %s: %s", self.path, exc)
                    self._failed()
            return self.client

    def _failed(self) -> None:
        """Under the lock: no attempt before retry_after, doubled for each failure in a row (to
        RETRY_MAX), so an agent that stays hung costs a caller one short wait now and then."""
        self._failures += 1
        wait = min(self.retry_after * 2 ** (self._failures - 1), max(self.retry_after, RETRY_MAX))
        self._retry_at = time.monotonic() + wait

    def holds(self, client: Client) -> bool:
        """Whether `client` is still this connection's and open: the pins taken on it still hold
        (the agent drops a connection's pins when it closes)."""
        with self._lock:
            return self.client is client and client.sock.fileno() != -1

    def lost(self, exc: BaseException | None = None, client: Client | None = None) -> None:
        """The connection failed: close it (a miss for the caller); connect again after retry_after.
        Given the `client` that failed: nothing, once another thread has replaced it (the new
        connection is not the one that failed)."""
        with self._lock:
            if client is not None and client is not self.client:
                return
            self._close()
            self._failed()
            log.warning(
                "kvtier agent at %s lost: %s (retry in %.1fs)",
                self.path, exc, max(0.0, self._retry_at - time.monotonic()),
            )  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        self._release()
        if self.client is not None:
            self.client.close()
            self.client = None

    def _release(self) -> None:
        """Drop what was built on the current connection (overridden where an arena is mapped)."""
