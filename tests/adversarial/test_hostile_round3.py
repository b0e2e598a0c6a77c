"""Third round of attacks: surfaces the first two rounds (test_hostile.py, test_hostile_2026_11_30.py)
did not try. The HF connector shared by several threads, an authenticated pool member that fuzzes
the peer control channel, and a tenant flooding prefetches. Each test is an attack and what the
agent's other users (or the engine) see."""

from __future__ import annotations

import os
import threading

import pytest

from kvtier.agent.client import Client
from kvtier.bench.chaos import FP, key_of
from tests.support import agent_config, eventually

pytestmark = pytest.mark.adversarial
MiB = 1 << 20


def _keys(n: int, prefix: str = "k") -> list[bytes]:
    return [key_of(prefix, i) for i in range(n)]


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ------------------------------------------------------------ the HF connector, several threads

LAYERS, HEADS, T, D, B = 2, 2, 256, 16, 64


def _hf(agent, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import DynamicCache

    from kvtier.agent.connectors.hf import HFKVCache
    from kvtier.agent.keys import KVLayout

    a = agent(agent_config(tmp_path, dram="64Mi", nvme="256Mi"))
    kv = HFKVCache(Client(a.tenant("team-a")), KVLayout("tiny-hf", "bfloat16", LAYERS, HEADS, D, B), "cpu")
    g = torch.Generator().manual_seed(3)
    cache = DynamicCache()
    for layer in range(LAYERS):
        cache.update(
            torch.randn(1, HEADS, T, D, generator=g).bfloat16(),
            torch.randn(1, HEADS, T, D, generator=g).bfloat16(),
            layer,
        )
    return torch, a, kv, cache


def _other_thread_loses_and_reconnects(kv) -> None:
    """What a second generate() sharing this HFKVCache does when one of its calls fails (a timeout,
    an interrupt: Client.call closes the socket), then calls again: a new connection to the same
    agent, whose segments map the same memory under the same ids."""
    thread = threading.Thread(
        target=lambda: (kv.conn.lost(ConnectionError("the other thread's call")), kv.conn.get())
    )
    thread.start()
    thread.join()


@pytest.mark.torch
def test_hf_a_restore_whose_connection_another_thread_replaced_returns_no_wrong_kv(agent, tmp_path):
    """Two threads share one HFKVCache. Thread one's restore has pinned its blocks when thread two
    loses the connection and connects again: the agent dropped thread one's pins with the old
    connection, and another engine of the namespace has since written its own bytes where those
    blocks were. The restore must be a miss (or the saved KV), never those bytes, and never raise."""
    torch, a, kv, saved = _hf(agent, tmp_path)
    tokens = list(range(T + 1))
    assert kv.save(tokens, saved, sync=True) == T // B
    client = kv.client
    real_read = client.read
    overwritten = []

    def read(fingerprint, keys):
        pinned = real_read(fingerprint, keys)
        _other_thread_loses_and_reconnects(kv)
        # the old connection's pins are gone: the DRAM copies can be dropped and the memory reused
        eventually(lambda: a.admin("evict_dram")["dropped"] >= len(pinned), timeout=5)
        with Client(a.tenant("team-a")) as other:
            slots = other.allocate([b.size for b in pinned])
            assert [(s.segment, s.offset) for s in slots] == [(b.segment, b.offset) for b in pinned]
            for s in slots:
                s.view[:] = b"\x7f" * len(s.view)
            other.commit(FP, _keys(len(slots), "other-engine"), slots, [len(s.view) for s in slots])
        overwritten.append(True)
        return pinned

    client.read = read
    restored, n = kv.restore(tokens, device="cpu")
    assert overwritten, "the other engine wrote where the pinned blocks were"
    if n:
        for mine, theirs in zip(restored.layers, saved.layers, strict=True):
            assert torch.equal(mine.keys, theirs.keys[:, :, :n]), "another engine's bytes restored as KV"
    client.read = real_read
    # the connection thread two made works for both threads
    restored, n = kv.restore(tokens, device="cpu")
    assert n == T and torch.equal(restored.layers[0].keys, saved.layers[0].keys[:, :, :T])
    kv.close()


@pytest.mark.torch
def test_hf_a_save_whose_connection_another_thread_replaced_writes_nothing(agent, tmp_path):
    """Thread one's save has allocated its extents when thread two loses the connection and
    connects again: those extents went back to the agent with the old connection. The save must
    not raise into the model's code, nor write where another engine has since stored a block."""
    _, a, kv, saved = _hf(agent, tmp_path)
    tokens = list(range(T + 1))
    client = kv.client
    real_allocate = client.allocate
    theirs: list = []

    def allocate(sizes, wait=0.0):
        slots = real_allocate(sizes, wait)
        _other_thread_loses_and_reconnects(kv)
        with Client(a.tenant("team-a")) as other:

            def stored_there() -> bool:
                got = other.allocate([sizes[0]])
                if (got[0].segment, got[0].offset) != (slots[0].segment, slots[0].offset):
                    return False
                got[0].view[:] = b"\x11" * sizes[0]
                other.commit(FP, [b"o" * 32], got, [sizes[0]])
                return True

            eventually(stored_there, timeout=5, message="the freed extent taken again")
        theirs.append(True)
        return slots

    client.allocate = allocate
    assert kv.save(tokens, saved) == 0, "nothing stored through a connection that is gone"
    assert theirs
    with Client(a.tenant("team-a")) as reader:
        assert reader.get(FP, [b"o" * 32]) == [b"\x11" * kv.layout.block_bytes], "the save wrote over it"
    client.allocate = real_allocate
    assert kv.save(tokens, saved) == T // B, "the new connection saves"
    kv.close()
