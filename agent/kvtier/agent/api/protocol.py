"""Wire format of the agent's Unix sockets: length-prefixed JSON frames, file descriptors beside them.

Standard library only: the engine-side client imports this inside a stock vLLM/SGLang image.
A frame is a 4-byte big-endian length and a UTF-8 JSON object. Replies may carry file descriptors
(the tenant's arena segments) as SCM_RIGHTS ancillary data on the same sendmsg call.
"""

from __future__ import annotations

import array
import json
import socket
import struct
from typing import Any

MAX_FRAME = 16 << 20
MAX_FDS = 64
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something that is not a frame; the connection is no longer usable."""


class BadMessage(ProtocolError):
    """A whole frame arrived but is not a JSON object; the stream is still in sync."""


class AgentError(Exception):
    """The agent refused a request (the message says why); the connection is still good."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = encode(message)
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], ancillary)
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    chunks, got = [], 0
    while got < n:
        data, ancdata, _flags, _addr = sock.recvmsg(n - got, socket.CMSG_SPACE(MAX_FDS * 4))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % 4])
                fds.extend(received)
        if not data:
            raise (
                ConnectionError("peer closed the connection")
                if got == 0 and not chunks
                else ProtocolError("connection closed inside a frame")
            )
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One frame and any descriptors that came with it. Raises ConnectionError on a clean close."""
    fds: list[int] = []
    (length,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, fds))
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    body = _recv_exact(sock, length, fds)
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadMessage(f"frame is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise BadMessage("frame is not a JSON object")
    return message, fds
