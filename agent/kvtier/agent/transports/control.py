"""The peer control channel: small authenticated messages between agents over TCP (no block bytes).

A peer proves it belongs to the pool with an HMAC of a fresh nonce under the pool's secret (the
same secret tenant salts come from, so only pool members can name keys at all). After that, each
request is one JSON frame and one reply; the data itself moves over NIXL (see `nixl.py`).

A connection is one reader's session with this agent: whatever the handler holds for it (pinned
blocks) is released when the reader says so, when it goes quiet for `idle_s` (longer than the
longest prefetch deadline), or when it goes away.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from typing import Any, Protocol

from kvtier.agent.api import protocol
from kvtier.agent.api.server import Gate, LimitedServer, ServerLimits
from kvtier.agent.metrics import Metrics

log = logging.getLogger("kvtier.agent.peer")


def _mac(secret: bytes, nonce: bytes) -> str:
    return hmac.new(secret, b"kvtier-peer\0" + nonce, hashlib.sha256).hexdigest()


class Session(Protocol):
    """What the control server runs per authenticated connection."""

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]: ...

    def close(self) -> None: ...


class _Handler(socketserver.BaseRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        sock, server = self.request, self.server
        limits = server.limits
        nonce = os.urandom(16)
        try:
            protocol.send(sock, {"nonce": nonce.hex()})
            # before the MAC is checked: a tiny frame, and it must come promptly
            auth, _ = limits.recv(sock, limits.peer_pre_auth_frame_bytes, idle=limits.read_timeout)
            if not hmac.compare_digest(str(auth.get("mac", "")), _mac(server.secret, nonce)):
                protocol.send(sock, {"ok": False, "error": "not a member of this pool"})
                return
            protocol.send(sock, {"ok": True})
        except (OSError, protocol.ProtocolError):
            return
        session = server.new_session()
        try:
            while True:
                try:
                    msg, _ = limits.recv(sock, limits.frame_bytes, idle=server.idle_s)
                except protocol.BadMessage as exc:
                    protocol.send(sock, {"ok": False, "error": str(exc)})
                    continue
                protocol.send(sock, session.handle(msg))
        except (OSError, protocol.ProtocolError):
            pass  # gone, silent past idle_s, or not speaking the protocol: its session ends
        finally:
            session.close()


class ControlServer(LimitedServer, socketserver.TCPServer):
    """The peer port: its connections count against the agent's connection caps (`Gate`), and
    frames are bounded by the pool's `limits` (tiny before authentication)."""

    allow_reuse_address = True
    gate_key = "peer"

    def __init__(
        self,
        secret: bytes,
        host: str,
        port: int,
        new_session: Callable[[], Session],
        limits: ServerLimits | None = None,
        gate: Gate | None = None,
        metrics: Metrics | None = None,
        idle_s: float = 65.0,
    ) -> None:
        self.secret = secret
        self.new_session = new_session
        self.idle_s = idle_s
        self.limits = limits or ServerLimits()
        self.gate = gate or Gate(self.limits.connections, self.limits.connections_per_tenant)
        self.metrics = metrics or Metrics()
        super().__init__((host, port), _Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class ControlClient:
    """One authenticated session with a peer agent. PermissionError when the peer refuses us."""

    def __init__(self, peer: str, secret: bytes, timeout: float) -> None:
        host, _, port = peer.rpartition(":")
        if not host or not port.isdigit():
            raise ConnectionError(f"{peer!r} is not host:port")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        try:
            hello, _ = protocol.recv(self.sock)
            protocol.send(self.sock, {"mac": _mac(secret, bytes.fromhex(str(hello.get("nonce", ""))))})
            ok, _ = protocol.recv(self.sock)
            if not ok.get("ok"):
                raise PermissionError(ok.get("error", "peer refused"))
        except (protocol.ProtocolError, ValueError) as exc:
            self.sock.close()
            raise ConnectionError(f"{peer} does not speak the peer protocol: {exc}") from exc
        except BaseException:
            self.sock.close()
            raise

    def call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            protocol.send(self.sock, msg)
            reply, _ = protocol.recv(self.sock)
        except protocol.ProtocolError as exc:
            raise ConnectionError(f"peer broke the protocol: {exc}") from exc
        return reply

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
