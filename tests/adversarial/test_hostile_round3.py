"""Third round of attacks: surfaces the first two rounds (test_hostile.py, test_hostile_2026_11_30.py)
did not try. The HF connector shared by several threads, an authenticated pool member that fuzzes
the peer control channel, and a tenant flooding prefetches. Each test is an attack and what the
agent's other users (or the engine) see."""

from __future__ import annotations

import os
import random
import threading

import pytest

from kvtier.agent.client import Client
from kvtier.bench.chaos import FP, block_of, key_of
from tests.support import agent_config, eventually, lying_agent

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


@pytest.mark.torch
def test_hf_two_threads_saving_and_restoring_through_one_cache_get_their_own_kv(agent, tmp_path):
    """Two generate() loops share one HFKVCache (one Client, one connection): their calls
    interleave on the socket and each releases its own pins. Every restore is its own prompt's KV."""
    torch, _, kv, _ = _hf(agent, tmp_path)
    from transformers import DynamicCache

    def cache_for(seed: int):
        g = torch.Generator().manual_seed(seed)
        cache = DynamicCache()
        for layer in range(LAYERS):
            kvs = [torch.randn(1, HEADS, T, D, generator=g).bfloat16() for _ in range(2)]
            cache.update(*kvs, layer)
        return cache

    wrong: list = []

    def loop(worker: int) -> None:
        try:
            for i in range(8):
                seed = 100 * worker + i
                tokens = [seed, *range(T)]
                saved = cache_for(seed)
                kv.save(tokens, saved)
                restored, n = kv.restore(tokens, device="cpu")
                if n != T or not torch.equal(restored.layers[1].values, saved.layers[1].values[:, :, :T]):
                    wrong.append((worker, i, n))
        except Exception as exc:  # an exception into the model's code is a failure too
            wrong.append((worker, repr(exc)))

    threads = [threading.Thread(target=loop, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert wrong == []
    client = kv.client
    assert client is not None  # write-behind to NVMe pins a block while it copies it: waited out
    eventually(lambda: client.stats()["pinned"] == 0, timeout=10, message="no pin left")
    kv.close()


@pytest.mark.torch
@pytest.mark.parametrize(
    "lie",
    [
        {"blocks": [[7, 0, 4096, "ab"]] * 9},  # a segment it never sent
        {"blocks": [[7, 0]]},
        {"blocks": "none"},
        {},
    ],
    ids=["unsent-segment", "short-entry", "not-a-list", "missing"],
)
def test_hf_an_agent_whose_replies_lie_is_a_miss_not_an_exception(tmp_path, lie):
    """An agent (or whatever answers on the socket) that names segments it never sent, or answers
    reads and allocations in the wrong shape: the model's code gets a miss, never an exception."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import DynamicCache

    from kvtier.agent.connectors.hf import HFKVCache
    from kvtier.agent.keys import KVLayout

    def answer(msg):
        if msg["op"] == "lookup":
            return {"hits": 0}
        if msg["op"] == "allocate":
            return {"extents": lie.get("blocks", "none")}
        return lie

    cache = DynamicCache()
    for layer in range(LAYERS):
        cache.update(torch.zeros(1, HEADS, T, D).bfloat16(), torch.zeros(1, HEADS, T, D).bfloat16(), layer)
    with lying_agent(tmp_path / "liar.sock", answer, block_tokens=B) as path:
        kv = HFKVCache(Client(path), KVLayout("tiny-hf", "bfloat16", LAYERS, HEADS, D, B), "cpu")
        tokens = list(range(T + 1))
        assert kv.restore(tokens, device="cpu") == (None, 0)
        assert kv.save(tokens, cache) == 0
        kv.close()


@pytest.mark.parametrize(
    "hello",
    [{}, {"namespace": "a", "blockTokens": "many"}, {"namespace": "a", "blockTokens": 16, "frameBytes": []}],
)
def test_a_hello_that_lies_leaves_the_connector_unconnected_not_raising(tmp_path, hello):
    """What connectors connect with (`AgentConnection.get`, on the scheduler's and the worker's
    path) answers None for an agent whose hello is malformed, as for one that is down."""
    from kvtier.agent.client import AgentConnection

    with lying_agent(tmp_path / "liar.sock", lambda msg: {}, hello=hello) as path:
        conn = AgentConnection(path, timeout=2)
        assert conn.get() is None


# ------------------------------------------- an authenticated pool member on the peer control port


def _member_agent(agent, tmp_path):
    secret = os.urandom(32)
    (tmp_path / "secret").write_bytes(secret)
    cfg = agent_config(tmp_path, nvme=None, prefetch={"transport": "tcp"})
    owner = agent(cfg.model_copy(update={"secretFile": str(tmp_path / "secret")}))
    return secret, owner


def _hostile_messages(ikeys: list[bytes], other: list[bytes]) -> list:
    """Requests a pool member can sign: wrong types, absurd counts, other tenants' keys, nesting."""
    hexes = [k.hex() for k in ikeys]
    return [
        {},
        {"op": None},
        {"op": ["fetch"]},
        {"op": "fetch"},
        {"op": "fetch", "tenant": 5, "keys": hexes},
        {"op": "fetch", "tenant": "team-a", "keys": "ab" * 40},
        {"op": "fetch", "tenant": "team-a", "keys": {"a": 1}},
        {"op": "fetch", "tenant": "team-a", "keys": [1, 2.5, None, [], {}]},
        {"op": "fetch", "tenant": "team-a", "keys": ["zz"]},
        {"op": "fetch", "tenant": "team-a", "keys": [""] * 4096},
        {"op": "fetch", "tenant": "team-a", "keys": hexes * 1025},  # 4100: past the cap
        {"op": "fetch", "tenant": "team-a", "keys": [hexes[0]] * 4096},  # one block pinned 4096 times
        {"op": "fetch", "tenant": "team-a", "keys": [k.hex() for k in other]},  # team-b's keys
        {"op": "fetch", "tenant": "team-b", "keys": hexes},  # team-a's keys as team-b's
        {"op": "fetch", "tenant": "x" * 100_000, "keys": hexes},
        {"op": "fetch", "tenant": "team-a", "keys": [hexes[0] * 1000]},
        {"op": "done", "pins": hexes},
        {"op": "release", "handles": hexes},
        {"op": "offer", "from": 1, "tenant": [], "keys": None, "sizes": "x"},
        {"op": "offer", "from": "127.0.0.1:1", "tenant": "team-a", "keys": hexes, "sizes": [-1] * 4},
        '{"op":"fetch","nested":' + "[" * 200_000 + "]" * 200_000 + "}",  # signed, but not parsable
        '{"op":"fetch","tenant":"team-a","keys":["' + "1" * 100_000 + '"]}',
        "[1, 2, 3]",
        '{"op":"fetch","tenant":"team-a","keys":' + "9" * 10_000 + "}",
    ]


def test_an_authenticated_member_fuzzing_the_control_channel_crashes_and_leaks_nothing(agent, tmp_path):
    """A pool member (it holds the secret, so every frame it sends is signed) sends malformed,
    huge, wrong-typed and deeply nested requests, fetches of absurd counts, releases of pins it
    does not hold, and keeps many sessions open with blocks pinned. Afterwards: the agent lives,
    no pin is left, another tenant's blocks were never in an answer, descriptors are back."""
    from kvtier.agent.api import protocol
    from kvtier.agent.store.index import Store
    from kvtier.agent.tiers.dram import DramTier
    from kvtier.agent.transports.control import ControlClient

    secret, owner = _member_agent(agent, tmp_path)
    mine, theirs = _keys(4, "a-prompt"), _keys(4, "b-prompt")
    with Client(owner.tenant("team-a")) as a, Client(owner.tenant("team-b")) as b:
        assert a.put(FP, mine, [block_of(k) for k in mine]) == 4
        assert b.put(FP, theirs, [block_of(k) for k in theirs]) == 4
    store = Store(secret, DramTier("p", 4 * MiB, 4 * MiB), None)
    ikeys = [store.index_key("team-a", FP, k) for k in mine]
    other = [store.index_key("team-b", FP, k) for k in theirs]
    store.close()
    fds = _fds(owner.proc.pid)
    answers = []
    for msg in _hostile_messages(ikeys, other):
        try:
            with ControlClient(owner.peer, secret, timeout=5) as member:
                if isinstance(msg, str):  # a body json.dumps would not write: signed by hand
                    ch = member.channel
                    protocol.send(member.sock, {"body": msg, "mac": ch._tag(ch.sending, ch.sent, msg)})
                    ch.sent += 1
                    answers.append(ch.open(protocol.recv(member.sock)[0]))
                else:
                    answers.append(member.call(msg, 5))
                answers.append(member.call({"op": "fetch", "tenant": "team-a", "keys": [ikeys[0].hex()]}, 5))
        except (OSError, protocol.ProtocolError):
            answers.append({"closed": True})  # the agent ended that session: allowed
    served = {blk["key"] for ans in answers for blk in ans.get("blocks") or []}
    assert served <= {k.hex() for k in ikeys}, (
        "a fetch as team-a (or team-b) was answered with team-b's blocks"
    )
    assert {ikeys[0].hex()} <= served, "the member's well-formed fetches were answered"
    # many sessions at once, each with team-a's chain pinned, dropped without "done"
    sessions = [ControlClient(owner.peer, secret, timeout=5) for _ in range(12)]
    for s in sessions:
        assert (
            len(s.call({"op": "fetch", "tenant": "team-a", "keys": [k.hex() for k in ikeys]}, 5)["blocks"])
            == 4
        )
    with Client(owner.tenant("team-a")) as a:
        assert a.stats()["pinned"] == 4
        for s in sessions:
            s.close()
        eventually(
            lambda: a.stats()["pinned"] == 0, timeout=5, message="the members' pins ended with their sessions"
        )
        assert a.get(FP, mine) == [block_of(k) for k in mine]
    assert owner.proc.poll() is None
    eventually(lambda: _fds(owner.proc.pid) <= fds + 2, timeout=5, message="descriptors back")


# ------------------------------------------------------------------- prefetch hints from a hostile pod


def test_prefetch_floods_and_other_tenants_keys_move_only_the_senders_blocks(agent, tmp_path):
    """A pod's sidecar (or anything on its tenant socket) sends prefetch hints: another tenant's
    keys (the agent salts them into the sender's key space: nothing to promote), and floods of
    hints for more of its own NVMe blocks than its DRAM share holds, from several connections.
    The other tenant's blocks stay in DRAM and read back bit-exact."""
    a = agent(agent_config(tmp_path, dram="32Mi", nvme="256Mi"))
    victim = _keys(6, "victim")
    with Client(a.tenant("team-a")) as c:
        assert c.put(FP, victim, [os.urandom(MiB) for _ in victim]) == 6
        want = c.get(FP, victim)
        assert c.call("lookup", fingerprint=FP, keys=[k.hex() for k in victim])["tiers"] == ["dram"] * 6
    hog = _keys(48, "hog")  # 48 MiB: three times its 16 MiB share, so most of it lives on NVMe
    with Client(a.tenant("team-b")) as b:
        for i in range(0, len(hog), 8):
            b.put(FP, hog[i : i + 8], [os.urandom(MiB) for _ in hog[i : i + 8]], sync=True)
        stolen = b.call("prefetch", fingerprint=FP, keys=[k.hex() for k in victim], deadline=2)["result"]
        assert stolen["dram"] == stolen["promoted"] == 0, "team-b's hint reached team-a's blocks"

    promoted: list[int] = []

    def flood(seed: int) -> None:
        order = random.Random(seed)
        with Client(a.tenant("team-b")) as b:
            for _ in range(6):
                start = order.randrange(len(hog))
                got = b.call("prefetch", fingerprint=FP, keys=[k.hex() for k in hog[start:]], deadline=5)
                promoted.append(got["result"]["promoted"])

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(promoted) >= 8, f"the flood promoted team-b's own NVMe blocks: {promoted}"
    with Client(a.tenant("team-a")) as c:
        assert c.call("lookup", fingerprint=FP, keys=[k.hex() for k in victim])["tiers"] == ["dram"] * 6, (
            "team-b's prefetches evicted team-a's DRAM blocks"
        )
        assert c.get(FP, victim) == want
        eventually(lambda: c.stats()["pinned"] == 0, timeout=10, message="no pin left")
    assert a.proc.poll() is None


# ------------------------------------------------------------------------ huge prompts, one frame


def test_a_chain_longer_than_a_frame_is_stored_looked_up_and_read_on_the_same_connection(agent, tmp_path):
    """A huge prompt (a million tokens in blocks of 16 is 62500 keys; 64 Ki frames hold under a
    thousand) must not make a lookup or read frame the agent hangs up on: the engine would lose its
    connection, and with it every other request's hits for `retry_after_s`."""
    a = agent(agent_config(tmp_path, nvme=None, limits={"frameBytes": 65536}))
    keys = _keys(1500, "long")
    with Client(a.tenant("team-a")) as c:
        assert c.put(FP, keys, [block_of(k)[:512] for k in keys]) == 1500  # a commit in parts too
        sock = c.sock
        assert c.lookup(FP, keys + _keys(3, "past")) == 1500
        assert c.lookup(FP, _keys(3, "nothing") + keys) == 0
        with c.read(FP, keys) as blocks:
            assert [bytes(b.view) for b in blocks] == [block_of(k)[:512] for k in keys]
        assert c.stats()["pinned"] == 0
        assert c.sock is sock and sock.fileno() != -1, "the connection was lost"


def test_a_hung_agent_costs_callers_one_short_wait_now_and_then(agent, tmp_path):
    """The agent stops answering (SIGSTOP) and stays so. After the call that found it hung, each new
    attempt to connect waits at most the hello timeout (not the long I/O timeout a read from NVMe
    needs), and the pause between attempts doubles, so an engine's steps are rarely held up; once
    the agent runs again the next attempt connects."""
    import signal
    import time

    from kvtier.agent.client import AgentConnection

    a = agent(agent_config(tmp_path, nvme=None))
    conn = AgentConnection(a.tenant("team-a"), timeout=60, retry_after=0.2, hello_timeout=0.3)
    assert conn.get() is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        conn.lost(TimeoutError("a call found the agent hung"))
        waits = []
        for pause in (0.25, 0.45, 0.85):  # 0.2, 0.4, 0.8 s between attempts
            assert conn.get() is None  # within the pause: no attempt, no wait
            time.sleep(pause)
            t0 = time.monotonic()
            assert conn.get() is None
            waits.append(time.monotonic() - t0)
        assert all(w < 1.0 for w in waits), f"each attempt waits the hello timeout at most: {waits}"
    finally:
        a.proc.send_signal(signal.SIGCONT)
    time.sleep(1.7)  # the pause after the third failed attempt
    # the resumed agent answers the connections it missed first; on a loaded machine its hello can
    # miss the short timeout once more, and the attempt after the next pause connects
    eventually(lambda: conn.get() is not None, timeout=15, interval=0.1, message="connected again")
    conn.close()
