"""Peers whose READs never finish, against a real agent's fetching NIXL agent (`<name>.fetch`, no
progress thread: only the waiting fetch moves its bytes). The owner answers the control channel
with real NIXL metadata for memory its own NIXL agent never serves (no progress thread, never
progressed: the READ hangs), or is SIGKILLed right after answering. Every such fetch must end as a
miss by its deadline, the agent must keep serving, and many failures must not leak descriptors,
registrations or memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from kvtier.agent.client import Client
from kvtier.bench.chaos import usage
from tests.support import agent_config

pytestmark = pytest.mark.adversarial
MiB = 1 << 20
FP = "model=test;dtype=bf16;layers=2;kv_heads=2;head_dim=64;block=256;tp=0/1"

# A stand-in owner, run as its own process so it can be SIGKILLed: prints its control address,
# answers each fetch for up to 4 keys, and (with "die") kills itself 50 ms after answering.
OWNER = r"""
import base64, ctypes, mmap, os, signal, sys, threading
from kvtier.agent.transports.control import ControlServer
from kvtier.agent.transports.nixl import load_nixl
module, _ = load_nixl()
mm = mmap.mmap(-1, 8 << 20)
addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
region = [(addr, 8 << 20, 0, "")]
agents = []  # every NIXL agent made stays alive (and never progressed)


def new_agent():
    name = f"stuck-owner-{os.getpid()}-{len(agents)}"
    nixl = module.nixl_agent(name, module.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    nixl.register_memory(region, "DRAM")
    agents.append(nixl)
    descs = nixl.get_reg_descs(region, "DRAM")
    return name, base64.b64encode(nixl.get_partial_agent_metadata(descs, True, ["UCX"])).decode()


name, meta = new_agent()
die, fresh = sys.argv[2] == "die", sys.argv[2] == "fresh"

class Stuck:
    def handle(self, msg):
        if msg.get("op") != "fetch":
            return {"ok": True}
        global name, meta
        if die:
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGKILL)).start()
        if fresh:  # a new NIXL agent (name) for every answer
            name, meta = new_agent()
        blocks = [
            {"key": k, "size": 1 << 20, "checksum": 1, "addr": addr + i * (1 << 20)}
            for i, k in enumerate(msg["keys"][:4])
        ]
        return {"ok": True, "agent": name, "metadata": meta, "blocks": blocks}

    def close(self):
        pass

server = ControlServer(bytes.fromhex(sys.argv[1]), "127.0.0.1", int(sys.argv[3]), Stuck)
print(server.address, flush=True)
sys.stdout = open(os.devnull, "w")
threading.Event().wait()
"""


def _owner(secret: bytes, mode: str, port: int = 0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, secret.hex(), mode, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stdout:  # NIXL logs to stdout too
        if line.startswith("127.0.0.1:"):
            return proc, line.strip()
    raise RuntimeError("the stand-in owner did not start")


def _grown(pid: int, baseline: dict[str, int]) -> dict[str, int]:
    return {k: v - baseline[k] for k, v in usage(pid).items()}


@pytest.fixture
def stood_up(agent, tmp_path):
    """start(mode): a stand-in owner in `mode` and a real agent whose only peer it is, plus a
    `miss(deadline)` that prefetches 4 unknown keys through a tenant and returns how long it took."""
    made: list[subprocess.Popen] = []
    clients: list[Client] = []

    def start(mode: str):
        secret = os.urandom(32)
        (tmp_path / "secret").write_bytes(secret)
        owner, address = _owner(secret, mode)
        made.append(owner)
        cfg = agent_config(tmp_path, nvme=None, prefetch={"transport": "tcp"}).model_copy(
            update={"secretFile": str(tmp_path / "secret"), "peers": [address]}
        )
        reader = agent(cfg)
        victim = Client(reader.tenant("team-a"))
        clients.append(victim)

        def miss(deadline: float) -> float:
            began = time.monotonic()
            keys = [os.urandom(32).hex() for _ in range(4)]
            got = victim.call("prefetch", fingerprint=FP, keys=keys, deadline=deadline)
            assert got["result"]["fetched"] == 0 and got["result"]["missing"] == 4, got
            return time.monotonic() - began

        return secret, address, owner, reader, miss

    yield start, made
    for client in clients:
        client.close()
    for proc in made:
        proc.kill()
        proc.wait()


def test_reads_that_never_finish_end_by_the_deadline_and_leak_nothing(stood_up):
    start, _ = stood_up
    _, _, _, reader, miss = start("hang")
    with Client(reader.tenant("bystander")) as bystander:
        mine = [os.urandom(32) for _ in range(2)]
        assert bystander.put(FP, mine, [b"x" * MiB, b"y" * MiB]) == 2
        miss(0.1)  # warm: the first READ sets up the UCX worker's connections
        baseline = usage(reader.proc.pid)
        worst = max(miss(0.1) for _ in range(50))
        assert worst < 1.0, f"a stuck READ held a fetch for {worst:.2f} s past its 0.1 s deadline"
        assert bystander.get(FP, mine) == [b"x" * MiB, b"y" * MiB], "other tenants are served"
        grown = _grown(reader.proc.pid, baseline)
        assert reader.stats()["dram"]["usedBytes"] == 2 * MiB, "no extent stays reserved"
    assert grown["fds"] <= 8, f"descriptors leaked over 50 stuck READs: {grown}"
    assert grown["rss_kib"] < 32 * 1024, f"memory grew over 50 stuck READs: {grown}"


def test_an_owner_sigkilled_mid_read_is_a_miss_by_the_deadline_and_leaks_nothing(stood_up):
    """Owner after owner (one address, as a restarted pod) answers and is SIGKILLed 50 ms later,
    while the reader's fetching agent waits on the READ."""
    start, made = stood_up
    secret, address, owner, reader, miss = start("die")
    with Client(reader.tenant("bystander")) as bystander:
        mine = [os.urandom(32)]
        assert bystander.put(FP, mine, [b"z" * MiB]) == 1
        took, baseline = [], usage(reader.proc.pid)
        for i in range(6):
            if i:
                owner, _ = _owner(secret, "die", int(address.rsplit(":", 1)[1]))
                made.append(owner)
            took.append(miss(1.0))
            assert owner.wait(5) == -signal.SIGKILL
            assert bystander.get(FP, mine) == [b"z" * MiB], "other tenants are served"
            if i == 0:
                baseline = usage(reader.proc.pid)
        assert max(took) < 1.5, f"a fetch from a killed owner took {max(took):.2f} s (deadline 1 s)"
        grown = _grown(reader.proc.pid, baseline)
        assert grown["fds"] <= 4, f"descriptors leaked over 5 killed owners: {grown}"
        assert reader.stats()["dram"]["usedBytes"] == MiB, "no extent stays reserved"
        assert reader.proc.poll() is None


def test_a_peer_with_a_new_nixl_agent_for_every_answer_cannot_pile_up_stuck_sockets(stood_up):
    """The owner answers each fetch with a fresh NIXL agent (a new name) and serves none of the
    READs. Unloading a silent agent leaves its sockets behind, so after one READ is left unanswered
    the peer's new agents are not loaded (for RELOAD_AFTER_LATE_S): misses at once, no growth."""
    start, _ = stood_up
    _, _, _, reader, miss = start("fresh")
    miss(0.1)
    baseline = usage(reader.proc.pid)
    worst = max(miss(0.1) for _ in range(12))
    grown = _grown(reader.proc.pid, baseline)
    assert worst < 1.0, worst
    assert grown["fds"] <= 2, f"descriptors grew with each new NIXL agent: {grown}"
    assert reader.stats()["dram"]["usedBytes"] == 0
