"""Wire format of the agent's Unix sockets: length-prefixed JSON frames, file descriptors beside them.

Standard library only: the engine-side client imports this inside a stock vLLM/SGLang image.
A frame is a 4-byte big-endian length and a UTF-8 JSON object. Replies may carry file descriptors
(the tenant's arena segments) as SCM_RIGHTS ancillary data on the same call (`socket.send_fds`).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Any

MAX_FRAME = 16 << 20
MAX_FDS = 256  # a client receives its tenant's segments in one reply
_HEADER = struct.Struct(">I")
_CHUNK = 256 << 10  # largest single read: a header cannot make the reader allocate more


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
        sent = socket.send_fds(sock, [data], fds)
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _recv_exact(
    sock: socket.socket, n: int, fds: list[int], max_fds: int, deadline: float | None, first: bool = False
) -> bytearray:
    """n bytes, read in bounded chunks: memory grows with what actually arrived, never with what a
    header promised. Descriptors beyond `max_fds` per read are discarded by the kernel (MSG_CTRUNC:
    it never installs them here, so nothing leaks); those that arrive join `fds`, which the caller
    closes on every error path."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtocolError("frame not completed in time")
            sock.settimeout(left)
        try:
            data, received, _flags, _addr = socket.recv_fds(sock, min(n - len(buf), _CHUNK), max_fds)
        except TimeoutError:
            if deadline is None:
                raise  # idle: no frame started
            raise ProtocolError("frame not completed in time") from None
        fds.extend(received)
        if not data:
            raise (
                ConnectionError("peer closed the connection")
                if first
                else ProtocolError("connection closed inside a frame")
            )
        buf += data
    return buf


def recv(
    sock: socket.socket,
    max_frame: int = MAX_FRAME,
    max_fds: int = MAX_FDS,
    idle_timeout: float | None = None,
    frame_timeout: float | None = None,
) -> tuple[dict[str, Any], list[int]]:
    """One frame and any descriptors that came with it. Raises ConnectionError on a clean close
    (and TimeoutError when no frame starts within `idle_timeout`). Once a frame's first byte is in,
    the whole frame must arrive within `frame_timeout`. Whatever goes wrong, the descriptors that
    arrived are closed before the exception leaves: nothing received is ever leaked."""
    fds: list[int] = []
    try:
        if idle_timeout is not None:
            sock.settimeout(idle_timeout)
        first = _recv_exact(sock, 1, fds, max_fds, None, first=True)
        deadline = None if frame_timeout is None else time.monotonic() + frame_timeout
        (length,) = _HEADER.unpack(first + _recv_exact(sock, _HEADER.size - 1, fds, max_fds, deadline))
        if length > max_frame:
            raise ProtocolError(f"frame of {length} bytes exceeds {max_frame}")
        body = _recv_exact(sock, length, fds, max_fds, deadline)
        try:
            message = json.loads(body)
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, absurd numbers or nesting
            raise BadMessage(f"frame is not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise BadMessage("frame is not a JSON object")
    except BaseException:
        _close_all(fds)
        raise
    if frame_timeout is not None:
        sock.settimeout(frame_timeout)  # the reply too: a client that stops reading is dropped
    return message, fds
