"""TCP transport: each agent serves its blocks on a peer data port; peers fetch by index key.

Peers prove they belong to the pool with an HMAC of a fresh nonce under the pool's secret (the
same secret tenant salts come from, so only pool members can name keys at all). A reply is a JSON
header, then the blocks' bytes back to back; the receiver checks every checksum.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import socket
import socketserver
import threading
from collections.abc import Iterator

from kvtier.agent.api import protocol
from kvtier.agent.api.server import Gate, LimitedServer, ServerLimits
from kvtier.agent.store.index import Store, checksum
from kvtier.agent.transports.base import FetchedBlock

log = logging.getLogger("kvtier.agent.peer")
MAX_FETCH = 4096
MAX_BLOCK_BYTES = 1 << 30  # no KV block is larger; a peer claiming more is refused before allocating


def _mac(secret: bytes, nonce: bytes) -> str:
    return hmac.new(secret, b"kvtier-peer\0" + nonce, hashlib.sha256).hexdigest()


class _PeerHandler(socketserver.BaseRequestHandler):
    server: TcpPeerServer

    def handle(self) -> None:
        sock, store, limits = self.request, self.server.store, self.server.limits
        nonce = os.urandom(16)
        try:
            protocol.send(sock, {"nonce": nonce.hex()})
            # before the MAC is checked: a tiny frame, and it must come promptly
            auth, _ = limits.recv(sock, limits.peer_pre_auth_frame_bytes, idle=limits.read_timeout)
            if not hmac.compare_digest(str(auth.get("mac", "")), _mac(self.server.secret, nonce)):
                protocol.send(sock, {"ok": False, "error": "not a member of this pool"})
                return
            protocol.send(sock, {"ok": True})
            while True:
                msg, _ = limits.recv(sock, limits.frame_bytes)
                keys = msg.get("keys")
                if msg.get("op") != "fetch" or not isinstance(keys, list) or len(keys) > MAX_FETCH:
                    protocol.send(
                        sock, {"ok": False, "error": f"expected fetch with at most {MAX_FETCH} keys"}
                    )
                    continue
                self._serve(sock, store, [bytes.fromhex(k) for k in keys])
        except (ConnectionError, OSError, protocol.ProtocolError, ValueError, TypeError):
            pass

    def _serve(self, sock: socket.socket, store: Store, keys: list[bytes]) -> None:
        pinned = store.pin_for_peer(keys)
        try:
            header = [
                {"key": b.key.hex(), "tenant": b.tenant, "size": b.size, "checksum": b.checksum}
                for b, _ in pinned
            ]
            protocol.send(sock, {"ok": True, "blocks": header})
            for block, view in pinned:
                sock.sendall(view[: block.size])
                store.metrics.peer_bytes.labels("served").inc(block.size)
        finally:
            store.unpin_for_peer([b for b, _ in pinned])


def _plausible(info: object) -> bool:
    """A block header from a peer we can act on without trusting it (no absurd allocation)."""
    return (
        isinstance(info, dict)
        and isinstance(info.get("size"), int)
        and 0 < info["size"] <= MAX_BLOCK_BYTES
        and isinstance(info.get("checksum"), int)
        and isinstance(info.get("key"), str)
        and re.fullmatch(r"(?:[0-9a-f]{2}){1,64}", info["key"]) is not None
        and isinstance(info.get("tenant"), str)
    )


class TcpPeerServer(LimitedServer, socketserver.TCPServer):
    allow_reuse_address = True
    gate_key = "peer"

    def __init__(
        self,
        store: Store,
        secret: bytes,
        host: str,
        port: int,
        limits: ServerLimits | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.store = store
        self.metrics = store.metrics
        self.secret = secret
        self.limits = limits or ServerLimits()
        self.gate = gate or Gate(self.limits.connections, self.limits.connections_per_tenant)
        super().__init__((host, port), _PeerHandler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class TcpTransport:
    name = "tcp"

    def __init__(self, secret: bytes, timeout: float = 10.0) -> None:
        self.secret = secret
        self.timeout = timeout
        self.checksum_failures = 0

    def fetch(self, peer: str, keys: list[bytes]) -> Iterator[FetchedBlock]:
        host, port = peer.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=self.timeout) as sock:
            hello, _ = protocol.recv(sock)
            protocol.send(sock, {"mac": _mac(self.secret, bytes.fromhex(hello["nonce"]))})
            ok, _ = protocol.recv(sock)
            if not ok.get("ok"):
                raise PermissionError(ok.get("error", "peer refused"))
            for start in range(0, len(keys), MAX_FETCH):
                protocol.send(
                    sock, {"op": "fetch", "keys": [k.hex() for k in keys[start : start + MAX_FETCH]]}
                )
                reply, _ = protocol.recv(sock)
                blocks = reply.get("blocks", [])
                for info in blocks if isinstance(blocks, list) else []:
                    if not _plausible(info):
                        return  # a peer is untrusted: a header it cannot mean ends the prefix
                    data = memoryview(bytearray(info["size"]))
                    got = 0
                    while got < info["size"]:
                        n = sock.recv_into(data[got:])
                        if not n:
                            raise ConnectionError("peer closed mid-block")
                        got += n
                    if checksum(data) != info["checksum"]:
                        self.checksum_failures += 1
                        return  # a corrupt block ends the prefix: a miss, never wrong data
                    yield FetchedBlock(bytes.fromhex(info["key"]), info["tenant"], info["checksum"], data)
                if len(blocks) < min(MAX_FETCH, len(keys) - start):
                    return
