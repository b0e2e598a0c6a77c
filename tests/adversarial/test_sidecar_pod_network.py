"""The sidecar in a pod's own network namespace (root: two namespaces on a private bridge,
`kvtier.dev.netns`, the second standing for another pod): the hint endpoint answers the pod's own loopback and refuses
the other pod, which reaches only the probes and, with the token, the public endpoint's bare 202."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from kvtier.agent.client import Client
from kvtier.dev.netns import NetnsUnavailable, make_nodes
from tests.integration.test_agent import FP, blobs, chain
from tests.support import agent_config, eventually

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("ip"), reason="network namespaces need root and ip"
    ),
]
TOKEN = "gateway-token-0123456789abcdef"
PROBE = """
import json, socket, sys
host, port, body, auth = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4]
try:
    s = socket.create_connection((host, port), timeout=5)
except OSError as exc:
    print(json.dumps({"refused": type(exc).__name__})); sys.exit()
head = f"POST /v1/hints HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: {len(body)}\\r\\n{auth}\\r\\n".encode()
s.sendall(head + body); s.shutdown(socket.SHUT_WR)
data = b""
while chunk := s.recv(65536):
    data += chunk
head, _, reply = data.partition(b"\\r\\n\\r\\n")
print(json.dumps({"status": int(head.split()[1]), "reply": json.loads(reply or b"{}")}))
"""


@pytest.fixture
def pods():
    """Two namespaces on one private bridge: the engine pod (0) and another pod (1)."""
    try:
        nodes = make_nodes(2)
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    yield nodes
    nodes.close()


def send(netns: str, host: str, port: int, body: dict, auth: str = "") -> dict:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", PROBE, host, str(port), json.dumps(body), auth],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return json.loads(out.stdout)


def test_only_the_pod_itself_gets_hint_replies(pods, agent, tmp_path):
    pod, peer = pods.names
    pod_ip = pods.addresses[0]
    a = agent(agent_config(tmp_path, dram="16Mi", nvme="64Mi"))
    keys = chain(2)
    with Client(a.tenant("team-a")) as c:
        c.put(FP, keys, blobs(2), sync=True)
    (tmp_path / "token").write_text(TOKEN)
    log = tmp_path / "sidecar.log"
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pod, sys.executable, "-m", "kvtier.cli", "sidecar", "--pool", "p",
         "--socket", str(a.tenant("team-a")), "--port", "8765", "--probe-port", "8766",
         "--public-port", "8767", "--token-file", str(tmp_path / "token")],
        stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )  # fmt: skip
    try:
        eventually(lambda: "ready" in log.read_text(), message="sidecar ready")
        hint = {"fingerprint": FP, "keys": [k.hex() for k in keys], "deadline_ms": 5000}
        own = send(pod, "127.0.0.1", 8765, hint)
        assert own["status"] == 200 and own["reply"]["dram"] == 2, "the pod's own engine gets the details"
        assert "refused" in send(peer, pod_ip, 8765, hint), "another pod cannot reach the hint endpoint"
        assert send(peer, pod_ip, 8766, hint)["status"] == 404, "the probe port takes no hints"
        assert send(peer, pod_ip, 8767, hint)["status"] == 401, "the public endpoint needs the token"
        public = send(peer, pod_ip, 8767, hint, f"Authorization: Bearer {TOKEN}\r\n")
        assert public == {"status": 202, "reply": {"accepted": True}}, "and then says nothing about the cache"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
