"""The prefetch sidecar as a hostile client meets it, over real HTTP against a real agent: hints are
answered on the pod's loopback only, the cross-pod endpoint needs a token and says nothing about the
cache, and every malformed request gets a 4xx with a short reason (never a dropped connection)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from kvtier.agent.client import Client
from tests.integration.test_agent import FP, blobs, chain
from tests.support import agent_config, eventually

pytestmark = pytest.mark.integration
TOKEN = "s3cret-token-of-the-gateway-0123456789"


@pytest.fixture
def sidecar(agent, tmp_path):
    """A real agent with 2 committed blocks of team-a (evicted to NVMe) and a sidecar for team-a
    with all three listeners: hints (loopback), probes and the token-authenticated public one."""
    a = agent(agent_config(tmp_path, dram="16Mi", nvme="64Mi"))
    keys = chain(2)
    with Client(a.tenant("team-a")) as c:
        c.put(FP, keys, blobs(2), sync=True)
        a.admin("evict_dram", timeout=60)
    (tmp_path / "token").write_text(TOKEN + "\n")
    log = tmp_path / "sidecar.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvtier.cli", "sidecar", "--pool", "p", "--socket", str(a.tenant("team-a")),
         "--port", "0", "--probe-port", "0", "--public-port", "0", "--token-file", str(tmp_path / "token")],
        stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )  # fmt: skip
    line = eventually(lambda: "ready" in log.read_text() and log.read_text(), message="sidecar ready")
    hints, probes, public = line.split("http=")[1].split()
    yield {
        "hints": hints,
        "probes": probes,
        "public": public,
        "keys": keys,
        "agent": a,
        "proc": proc,
        "log": log,
    }
    proc.terminate()
    proc.wait(timeout=10)


def raw(address: str, request: bytes, timeout: float = 15) -> tuple[int, dict]:
    """Send bytes as they are; the status and the JSON reason that come back."""
    port = address.rsplit(":", 1)[1]
    with socket.create_connection(("127.0.0.1", int(port)), timeout=timeout) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data, "the connection was closed without an HTTP answer"
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body or b"{}")


def post(address: str, body: bytes | str, headers: str = "") -> tuple[int, dict]:
    body = body.encode() if isinstance(body, str) else body
    return raw(
        address,
        f"POST /v1/hints HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body,
    )


def test_listeners_are_where_they_should_be(sidecar):
    assert sidecar["hints"].startswith("127.0.0.1:"), "hints only on the pod's loopback"
    assert sidecar["probes"].startswith("0.0.0.0:") and sidecar["public"].startswith("0.0.0.0:")
    health = urllib.request.urlopen(f"http://127.0.0.1:{sidecar['probes'].split(':')[1]}/healthz", timeout=10)
    assert health.status == 200
    hint = json.dumps({"fingerprint": FP, "keys": [k.hex() for k in sidecar["keys"]]})
    assert post(sidecar["probes"], hint)[0] == 404, "the probe port takes no hints"
    plain = subprocess.Popen(  # no listener flags: the defaults
        [sys.executable, "-m", "kvtier.cli", "sidecar", "--pool", "p", "--socket", "/nonexistent", "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        listening = plain.stdout.readline().split("http=")[1].split()
    finally:
        plain.terminate()
        plain.wait(timeout=10)
    assert len(listening) == 1 and listening[0].startswith("127.0.0.1:"), "loopback only, nothing else open"


def test_the_public_endpoint_needs_the_token_and_reveals_nothing(sidecar):
    keys = sidecar["keys"]
    cached = json.dumps({"fingerprint": FP, "keys": [k.hex() for k in keys], "deadline_ms": 5000})
    uncached = json.dumps(
        {"fingerprint": FP, "keys": [k.hex() for k in chain(2, seed="never-cached")], "deadline_ms": 5000}
    )
    assert post(sidecar["public"], cached)[0] == 401
    assert post(sidecar["public"], cached, "Authorization: Bearer wrong\r\n")[0] == 401
    assert post(sidecar["public"], cached, f"Authorization: Basic {TOKEN}\r\n")[0] == 401
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    replies = [post(sidecar["public"], body, auth) for body in (cached, uncached)]
    assert replies[0] == replies[1] == (202, {"accepted": True}), "cached or not, the same answer"
    with Client(sidecar["agent"].tenant("team-a")) as c:
        eventually(
            lambda: c.call("lookup", fingerprint=FP, keys=[k.hex() for k in keys])["tiers"] == ["dram"] * 2,
            message="the hint was carried out in the background",
        )
    probes = f"http://127.0.0.1:{sidecar['probes'].split(':')[1]}/metrics"
    metrics = eventually(
        lambda: (
            (m := urllib.request.urlopen(probes, timeout=10).read().decode())
            and 'kvtier_sidecar_hints_total{result="public"} 2.0' in m
            and m
        ),
        message="both public hints done",
    )
    assert 'how="already_in_dram"' not in metrics and 'how="promoted"' not in metrics, (
        "no result in the metrics"
    )
    # the pod's own engine, on the loopback, gets the details
    status, reply = post(sidecar["hints"], cached)
    assert status == 200 and reply["dram"] == 2


BAD = {
    "a JSON list": ("[1, 2]", 400, "JSON object"),
    "not JSON": ("{nope", 400, "not JSON"),
    "NaN deadline": ('{"fingerprint": "f", "keys": ["' + "ab" * 32 + '"], "deadline_ms": NaN}', 400, "deadline_ms"),
    "huge deadline": ('{"fingerprint": "f", "keys": ["' + "ab" * 32 + '"], "deadline_ms": 1e308}', 400, "deadline_ms"),
    "bool deadline": ('{"fingerprint": "f", "keys": ["' + "ab" * 32 + '"], "deadline_ms": true}', 400, "deadline_ms"),
    "70,000 keys": (json.dumps({"fingerprint": "f", "keys": ["ab" * 32] * 70000}), 400, "'keys'"),
    "600-character fingerprint": (json.dumps({"fingerprint": "f" * 600, "keys": ["ab" * 32]}), 400, "fingerprint"),
    "short key": (json.dumps({"fingerprint": "f", "keys": ["abcd"]}), 400, "hex"),
    "string tokens": (json.dumps({"fingerprint": "f", "token_ids": ["1"]}), 400, "token_ids"),
    "negative tokens": (json.dumps({"fingerprint": "f", "token_ids": [-1]}), 400, "token_ids"),
    "both keys and tokens": (json.dumps({"fingerprint": "f", "keys": [], "token_ids": []}), 400, "exactly one"),
    "unknown field": (json.dumps({"fingerprint": "f", "keys": ["ab" * 32], "x": 1}), 400, "unknown"),
    "deep nesting": ("[" * 100000 + "]" * 100000, 400, "JSON"),
    "too few tokens for a block": (json.dumps({"fingerprint": "f", "token_ids": [1, 2]}), 400, "block"),
}  # fmt: skip


def test_malformed_hints_get_a_4xx_with_a_short_reason(sidecar):
    for case, (body, status, reason) in BAD.items():
        got, reply = post(sidecar["hints"], body)
        assert got == status and reason in reply["error"] and len(reply["error"]) < 300, (case, got, reply)


def test_malformed_http_gets_a_4xx_and_the_sidecar_lives_on(sidecar):
    h = sidecar["hints"]
    cases = [
        (b"POST /v1/hints HTTP/1.1\r\nContent-Length: abc\r\n\r\n{}", 400),
        (b"POST /v1/hints HTTP/1.1\r\nContent-Length: -5\r\n\r\n{}", 400),
        (b"POST /v1/hints HTTP/1.1\r\n\r\n{}", 411),
        (b"POST /v1/hints HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n{}", 413),
        (b"POST /v1/hints HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}", 400),  # shorter than announced
        (b"BREW /v1/hints HTTP/1.1\r\n\r\n", 405),
        (b"PUT /v1/hints HTTP/1.1\r\n\r\n", 405),
        (b"GET /v1/hints HTTP/2.0\r\n\r\n", 400),
        (b"garbage\r\n\r\n", 400),
        (b"POST /elsewhere HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 404),
    ]
    for request, status in cases:
        assert raw(h, request)[0] == status, request
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", int(h.split(":")[1])), timeout=30) as s:
        s.sendall(b"POST /v1/hints HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")  # then silence
        s.recv(100)
    assert time.monotonic() - t0 < 20, "a stalled client is dropped after the read timeout"
    ok = post(
        h, json.dumps({"fingerprint": FP, "keys": [k.hex() for k in sidecar["keys"]], "deadline_ms": 5000})
    )
    assert ok[0] == 200 and sidecar["proc"].poll() is None
    assert "Traceback" not in sidecar["log"].read_text()
