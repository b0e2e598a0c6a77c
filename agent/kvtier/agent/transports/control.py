"""The peer control channel: small authenticated messages between agents over TCP (no block bytes).

Both ends prove they belong to the pool: each sends a fresh nonce, and each answers with an HMAC
of both nonces under the pool's secret (the same secret tenant salts come from, so only pool
members can name keys at all), labelled by its side so one side's proof is never the other's. The
session key derived from both nonces then signs every frame with its direction and sequence number:
a listener without the secret gets nothing past the handshake (it cannot pass for an owner and
serve forged blocks), and whoever relays a connection can neither inject, alter, replay nor reorder
a request or an answer. Frames are not encrypted. After the handshake, each request is one frame
and one reply; the data itself moves over NIXL (see `nixl.py`).

A connection is one reader's session with this agent: whatever the handler holds for it (pinned
blocks) is released when the reader says so, when it goes quiet for `idle_s` (longer than the
longest prefetch deadline), or when it goes away.
"""

from __future__ import annotations

import hashlib
import hmac
import json
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


NONCE_BYTES = 16
# Handshakes one address may have under way at once. Before authentication every source shares the
# peer port's `connectionsPerTenant` slots: a host that opens them all and never answers would keep
# pool members out for `readTimeout` at a time; this way it holds at most a few of them.
HANDSHAKES_PER_SOURCE = 4


def _mac(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"kvtier-peer\0" + label + b"\0" + b"".join(parts), hashlib.sha256).digest()


def _nonce(message: dict[str, Any]) -> bytes:
    """The other side's nonce; ValueError unless it is NONCE_BYTES of hex."""
    nonce = bytes.fromhex(str(message.get("nonce", "")))
    if len(nonce) != NONCE_BYTES:
        raise ValueError("a nonce must be 16 bytes of hex")
    return nonce


def _proved(message: dict[str, Any], expected: bytes) -> bool:
    return hmac.compare_digest(str(message.get("mac", "")), expected.hex())


class Channel:
    """The frames of one authenticated session. Each is {"body": JSON text, "mac": HMAC under the
    session key of its direction, its sequence number and that text}; a frame that fails the check
    ends the session (ProtocolError)."""

    def __init__(
        self, sock: socket.socket, secret: bytes, server_nonce: bytes, client_nonce: bytes, server: bool
    ):
        self.sock = sock
        self.key = _mac(secret, b"session", server_nonce, client_nonce)
        self.sending, self.receiving = (b"server", b"client") if server else (b"client", b"server")
        self.sent = self.received = 0

    def _tag(self, direction: bytes, seq: int, body: str) -> str:
        return hmac.new(
            self.key, direction + seq.to_bytes(8, "big") + body.encode(), hashlib.sha256
        ).hexdigest()

    def send(self, message: dict[str, Any]) -> None:
        body = json.dumps(message, separators=(",", ":"))
        protocol.send(self.sock, {"body": body, "mac": self._tag(self.sending, self.sent, body)})
        self.sent += 1

    def open(self, frame: dict[str, Any]) -> dict[str, Any]:
        """The message a received frame carries, once its MAC checks out."""
        body, tag = frame.get("body"), frame.get("mac")
        if not (
            isinstance(body, str)
            and isinstance(tag, str)
            and hmac.compare_digest(tag, self._tag(self.receiving, self.received, body))
        ):
            raise protocol.ProtocolError("a frame that does not carry this session's MAC")
        self.received += 1
        try:
            message = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise protocol.ProtocolError(f"frame is not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise protocol.ProtocolError("frame is not a JSON object")
        return message


def accept(sock: socket.socket, secret: bytes, limits: ServerLimits) -> Channel | None:
    """The listening side of the handshake: the session, or None once the other side has been
    refused (it did not prove membership). OSError/ProtocolError when it broke off."""
    nonce = os.urandom(NONCE_BYTES)
    protocol.send(sock, {"nonce": nonce.hex()})
    # before the MAC is checked: a tiny frame, and it must come promptly
    auth, _ = limits.recv(sock, limits.peer_pre_auth_frame_bytes, idle=limits.read_timeout)
    try:
        theirs = _nonce(auth)
    except ValueError:
        theirs = b""
    if not theirs or not _proved(auth, _mac(secret, b"client", nonce, theirs)):
        protocol.send(sock, {"ok": False, "error": "not a member of this pool"})
        return None
    protocol.send(sock, {"ok": True, "mac": _mac(secret, b"server", nonce, theirs).hex()})
    return Channel(sock, secret, nonce, theirs, server=True)


class Session(Protocol):
    """What the control server runs per authenticated connection."""

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]: ...

    def close(self) -> None: ...


class _Handler(socketserver.BaseRequestHandler):
    server: ControlServer

    def handle(self) -> None:
        sock, server = self.request, self.server
        limits = server.limits
        source = str(self.client_address[0])
        refused = server.handshakes.enter(source)
        if refused:
            server.refuse(sock, refused)
            return
        try:
            channel = accept(sock, server.secret, limits)
        except (OSError, protocol.ProtocolError):
            return
        finally:
            server.handshakes.leave(source)
        if channel is None:
            return
        session = server.new_session()
        try:
            while True:
                frame, _ = limits.recv(sock, limits.frame_bytes, idle=server.idle_s)
                channel.send(session.handle(channel.open(frame)))
        except (OSError, protocol.ProtocolError):
            pass  # gone, silent past idle_s, a frame not of this session: its session ends
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
        self.handshakes = Gate(self.limits.connections, HANDSHAKES_PER_SOURCE)  # by source address
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
            theirs, mine = _nonce(hello), os.urandom(NONCE_BYTES)
            protocol.send(
                self.sock, {"nonce": mine.hex(), "mac": _mac(secret, b"client", theirs, mine).hex()}
            )
            ok, _ = protocol.recv(self.sock)
            if not ok.get("ok"):
                raise PermissionError(ok.get("error", "peer refused"))
            if not _proved(ok, _mac(secret, b"server", theirs, mine)):
                raise PermissionError(f"{peer} did not prove membership of this pool")
            self.channel = Channel(self.sock, secret, theirs, mine, server=False)
        except (protocol.ProtocolError, ValueError) as exc:
            self.sock.close()
            raise ConnectionError(f"{peer} does not speak the peer protocol: {exc}") from exc
        except BaseException:
            self.sock.close()
            raise

    def call(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            self.channel.send(msg)
            frame, _ = protocol.recv(self.sock)
            return self.channel.open(frame)
        except protocol.ProtocolError as exc:
            raise ConnectionError(f"peer broke the protocol: {exc}") from exc

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
