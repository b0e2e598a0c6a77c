"""Descriptor passing on the agent's sockets (a real socketpair): what arrives is bounded by
`max_fds`, the excess is never installed, and a bad frame closes every descriptor it carried."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from kvtier.agent.api import protocol

pytestmark = pytest.mark.unit


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def test_descriptors_arrive_with_their_frame(pair):
    a, b = pair
    r, w = os.pipe()
    protocol.send(a, {"op": "hello"}, [r, w])
    os.close(r)
    os.close(w)
    message, fds = protocol.recv(b)
    assert message == {"op": "hello"} and len(fds) == 2
    os.write(fds[1], b"x")
    assert os.read(fds[0], 1) == b"x", "the received descriptors are the pipe that was sent"
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("max_fds", [0, 1, 3])
def test_descriptors_beyond_max_fds_are_never_installed(pair, max_fds):
    a, b = pair
    sent = [fd for _ in range(3) for fd in os.pipe()]  # six descriptors
    before = _open_fds() - len(sent)
    protocol.send(a, {"op": "x"}, sent)
    for fd in sent:
        os.close(fd)
    _, fds = protocol.recv(b, max_fds=max_fds)
    assert len(fds) == max_fds
    assert _open_fds() == before + max_fds, "the excess was dropped by the kernel, not leaked"
    for fd in fds:
        os.close(fd)


def test_a_bad_frame_closes_every_descriptor_it_carried(pair):
    a, b = pair
    r, w = os.pipe()
    before = _open_fds() - 2
    socket.send_fds(a, [struct.pack(">I", 5) + b"nope!"], [r, w])
    os.close(r)
    os.close(w)
    with pytest.raises(protocol.BadMessage):
        protocol.recv(b, max_fds=4)
    assert _open_fds() == before
