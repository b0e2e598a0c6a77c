"""The Hugging Face connector on the CPU with a real agent: a DynamicCache saved and restored bit for
bit; the agent killed is a miss for both save and restore (no exception reaches the model code); the
agent restarted, the connector reconnects to the new agent's arena and works again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support import agent_config

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

LAYERS, HEADS, T, D, B = 2, 2, 256, 16, 64


def kv_cache(seed: int):
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for layer in range(LAYERS):
        k = torch.randn(1, HEADS, T, D, generator=g).bfloat16()
        v = torch.randn(1, HEADS, T, D, generator=g).bfloat16()
        cache.update(k, v, layer)
    return cache


def same(a, b, tokens: int) -> bool:
    return all(
        torch.equal(x.keys[:, :, :tokens], y.keys[:, :, :tokens])
        and torch.equal(x.values[:, :, :tokens], y.values[:, :, :tokens])
        for x, y in zip(a.layers, b.layers, strict=True)
    )


def evict_when_unpinned(a, blocks: int, within: float = 5.0) -> None:
    """Evicts DRAM until all `blocks` have gone: the agent drops a closed connection's pins only
    when it next runs, and an eviction before that takes the unpinned blocks alone, so the drops
    are summed."""
    deadline = time.monotonic() + within
    dropped = a.admin("evict_dram")["dropped"]
    while dropped < blocks:
        assert time.monotonic() < deadline, f"pins outlived their connection ({dropped} dropped)"
        time.sleep(0.05)
        dropped += a.admin("evict_dram")["dropped"]
    assert dropped == blocks


def test_save_restore_and_an_agent_restart(agent, tmp_path):
    from kvtier.agent.client import Client
    from kvtier.agent.connectors.hf import HFKVCache
    from kvtier.agent.keys import KVLayout

    cfg = agent_config(tmp_path, nvme=None)
    a = agent(cfg)
    layout = KVLayout("tiny-hf", "bfloat16", LAYERS, HEADS, D, B)
    kv = HFKVCache(Client(a.tenant("team-a")), layout, device="cpu")
    tokens = list(range(T + 1))
    first = kv_cache(1)
    assert kv.save(tokens, first) == T // B
    restored, n = kv.restore(tokens, device="cpu")
    assert n == T and same(restored, first, T)

    a.kill()
    assert kv.restore(tokens, device="cpu") == (None, 0), "agent down: a miss"
    assert kv.save(tokens, first) == 0, "agent down: nothing stored, nothing raised"
    assert kv.restore(tokens, device="cpu") == (None, 0), "still down"

    b = agent(cfg, name="agent-restarted")
    assert b.tenant("team-a") == a.tenant("team-a")
    assert kv.restore(tokens, device="cpu") == (None, 0), "the new agent holds nothing yet"
    second = kv_cache(2)
    assert kv.save(tokens, second) == T // B
    restored, n = kv.restore(tokens, device="cpu")
    assert n == T and same(restored, second, T), "the new agent's KV"


def test_a_long_restore_pins_chunk_by_chunk_and_ends_where_the_pool_does(agent, tmp_path):
    """A restore of many blocks pins and copies them in chunks: bit for bit, nothing left pinned
    after it (every block can be dropped at once), and blocks dropped mid-restore end the prefix
    there: the restore returns the blocks it copied, in a cache of that length, never a hole."""
    from kvtier.agent.client import Client
    from kvtier.agent.connectors.hf import HFKVCache, dynamic_cache
    from kvtier.agent.connectors.runs import READ_FIRST
    from kvtier.agent.keys import KVLayout

    a = agent(agent_config(tmp_path, nvme=None))
    blocks, b = 128, 16  # two chunks: READ_FIRST blocks, then the rest
    layout = KVLayout("tiny-hf-long", "bfloat16", LAYERS, HEADS, D, b)
    kv = HFKVCache(Client(a.tenant("team-a")), layout, device="cpu")
    g = torch.Generator().manual_seed(3)
    layers = [
        tuple(torch.randn(1, HEADS, blocks * b, D, generator=g).bfloat16() for _ in "kv")
        for _ in range(LAYERS)
    ]
    original = dynamic_cache(layers)
    tokens = list(range(blocks * b + 1))
    assert kv.save(tokens, original) == blocks

    restored, n = kv.restore(tokens, device="cpu")
    assert n == blocks * b and same(restored, original, n)
    assert a.admin("evict_dram")["dropped"] == blocks  # no NVMe tier: dropped, unless still pinned
    assert kv.restore(tokens, device="cpu") == (None, 0), "nothing stayed pinned: every block was dropped"

    assert kv.save(tokens, original) == blocks
    reads = []
    real_read = kv.client.read

    def read_then_drop(fingerprint, keys):
        reads.append(len(keys))
        if len(reads) == 2:  # the pool loses its blocks after the first chunk was copied
            a.admin("evict_dram")
        return real_read(fingerprint, keys)

    kv.client.read = read_then_drop
    restored, n = kv.restore(tokens, device="cpu")
    assert reads == [READ_FIRST, blocks - READ_FIRST]
    assert n == READ_FIRST * b and same(restored, original, n)
    assert restored.layers[0].keys.shape[2] == n and restored.layers[0].keys.is_contiguous()


# ------------------------------------------------------------------ restores under attack


def random_cache(tokens: int, seed: int):
    from kvtier.agent.connectors.hf import dynamic_cache

    g = torch.Generator().manual_seed(seed)
    return dynamic_cache(
        [tuple(torch.randn(1, HEADS, tokens, D, generator=g).bfloat16() for _ in "kv") for _ in range(LAYERS)]
    )


def hf_cache(a, model: str, b: int = 16):
    from kvtier.agent.client import Client
    from kvtier.agent.connectors.hf import HFKVCache
    from kvtier.agent.keys import KVLayout

    return HFKVCache(
        Client(a.tenant("team-a")), KVLayout(model, "bfloat16", LAYERS, HEADS, D, b), device="cpu"
    )


def exact(restored, original, n: int) -> bool:
    """The restored cache holds n tokens, every layer, bit for bit."""
    return (
        restored.get_seq_length() == n
        and all(x.keys.shape[2] == x.values.shape[2] == n for x in restored.layers)
        and same(restored, original, n)
    )


@pytest.mark.parametrize(
    ("prompt", "keep_last", "extra"),
    [
        (40 * 16 + 1, 1, None),  # every saved block, over two chunks
        (40 * 16, 1, "salt"),  # a multiple of the block size: the last block is left to compute
        (40 * 16, 0, "salt"),  # keep_last=0: every block
        (40 * 16 + 7, 7, None),
        (33 * 16 + 3, 20, "salt"),  # keep_last reaching into a block: 32 blocks
        (17, 1, None),  # one block
        (16, 1, None),  # less than one block usable: no read at all
        (15, 0, None),
        (0, 1, None),
        (40 * 16, 40 * 16 + 5, None),  # keep_last longer than the prompt
        (60 * 16 + 9, 1, "salt"),  # longer than what was saved: the 40 saved blocks
        (40 * 16, -1000, None),  # a negative keep_last is keep_last=0
    ],
)
def test_every_prefix_shape_restores_bit_for_bit(agent, tmp_path, prompt, keep_last, extra):
    """The restored length is the saved full blocks the prompt may skip, the cache that long, its
    bytes those saved; keys chained chunk by chunk (with a salt) are the keys the save used."""
    a = agent(agent_config(tmp_path, nvme=None))
    kv = hf_cache(a, "tiny-hf-shapes")
    saved = 40
    tokens = [7 * i + 3 for i in range(60 * 16 + 9)]
    original = random_cache(saved * 16, 11)
    assert kv.save(tokens[: saved * 16], original, extra=extra) == saved
    want = min(saved, max(0, prompt - max(keep_last, 0)) // 16) * 16
    restored, n = kv.restore(tokens[:prompt], device="cpu", extra=extra, keep_last=keep_last)
    assert n == want
    assert restored is None if n == 0 else exact(restored, original, n)
    if want:
        assert kv.restore(tokens[:prompt], device="cpu", extra="other", keep_last=keep_last) == (None, 0)
    assert a.admin("evict_dram")["dropped"] == saved, "nothing left pinned"


@pytest.mark.parametrize("size", [100, 2 * LAYERS * 2 * HEADS * 16 * D * 2])
def test_a_block_of_another_size_under_the_fingerprint_ends_the_prefix(agent, tmp_path, size):
    """Another client of the namespace commits a block of another size under the layout's
    fingerprint, chained after saved blocks: the restore ends before it (never bytes read from
    beyond a block), a miss where it is the first block; nothing stays pinned."""
    from kvtier.agent.client import Client
    from kvtier.agent.keys import block_keys

    a = agent(agent_config(tmp_path, nvme=None))
    kv = hf_cache(a, "tiny-hf-sizes")
    tokens = list(range(40 * 16 + 1))
    original = random_cache(2 * 16, 5)
    assert kv.save(tokens[: 2 * 16], original) == 2
    keys = block_keys(tokens, 16)
    alone = block_keys([10**6 + t for t in tokens], 16)
    with Client(kv.client.path) as rogue:  # a third block, then one of its own chain, wrongly sized
        assert rogue.put(kv.layout.fingerprint, [keys[2], alone[0]], [b"\xff" * size] * 2) == 2
    restored, n = kv.restore(tokens, device="cpu")
    assert n == 2 * 16 and exact(restored, original, n), "ends before the block of another size"
    assert kv.restore([10**6 + t for t in tokens], device="cpu") == (None, 0)
    assert a.admin("evict_dram")["dropped"] == 4, "nothing left pinned"


def test_a_reply_cut_short_by_the_segment_limit_goes_on_where_it_stopped(agent, tmp_path):
    """One block per segment, more segments than one reply may carry: reads come back shorter than
    asked and the restore goes on from there; the cache is whole and nothing stays pinned."""
    cfg = agent_config(tmp_path, dram="16Mi", nvme=None, tenancy={"dramShare": 1})
    kv_bytes = LAYERS * 2 * HEADS * 16 * D * 2
    a = agent(cfg.model_copy(update={"segmentBytes": kv_bytes}))
    blocks = 800
    saver = hf_cache(a, "tiny-hf-segments")
    assert saver.layout.block_bytes == kv_bytes
    original = random_cache(blocks * 16, 9)
    tokens = list(range(blocks * 16 + 1))
    for upto in range(200, blocks + 1, 200):  # an allocate reply carries so many new segments too
        assert saver.save(tokens[: upto * 16], original) == 200
    kv = hf_cache(a, "tiny-hf-segments")  # a new connection: hello carries only the first segments
    answers = []
    real_read = kv.client.read

    def counted(fingerprint, keys):
        got = real_read(fingerprint, keys)
        answers.append((len(keys), len(got)))
        return got

    kv.client.read = counted
    restored, n = kv.restore(tokens, device="cpu")
    assert any(0 < got < asked for asked, got in answers), answers
    assert n == blocks * 16 and exact(restored, original, n)
    assert a.admin("evict_dram")["dropped"] == blocks, "nothing left pinned"


def test_blocks_promoted_from_nvme_during_the_restore(agent, tmp_path):
    """Blocks on the NVMe tier only, some of them demoted between two chunks' reads: every one is
    promoted on its read and restored bit for bit, and all are unpinned after."""
    a = agent(agent_config(tmp_path))
    kv = hf_cache(a, "tiny-hf-nvme")
    blocks = 170  # chunks of 32, 128, 10
    original = random_cache(blocks * 16, 13)
    tokens = list(range(blocks * 16 + 1))
    assert kv.save(tokens, original, sync=True) == blocks
    assert a.admin("evict_dram")["dropped"] == blocks
    restored, n = kv.restore(tokens, device="cpu")
    assert n == blocks * 16 and exact(restored, original, n)

    reads = []
    real_read = kv.client.read

    def read_after_demoting(fingerprint, keys):
        reads.append(len(keys))
        if len(reads) > 1:
            assert a.admin("evict_dram")["dropped"] > 0
        return real_read(fingerprint, keys)

    kv.client.read = read_after_demoting
    restored, n = kv.restore(tokens, device="cpu")
    assert reads == [32, 128, 10]
    assert n == blocks * 16 and exact(restored, original, n)
    assert a.admin("evict_dram")["dropped"] == 10, "the last chunk's blocks, not pinned"
    kv.client.read = real_read
    restored, n = kv.restore(tokens, device="cpu")
    assert n == blocks * 16 and exact(restored, original, n)
    assert a.admin("evict_dram")["dropped"] == blocks, "nothing left pinned"


@pytest.mark.parametrize("when", ["read", "release"])
def test_the_agent_killed_mid_restore_is_a_miss_and_a_restarted_one_serves(agent, tmp_path, when):
    cfg = agent_config(tmp_path, nvme=None)
    a = agent(cfg)
    kv = hf_cache(a, "tiny-hf-killed")
    blocks = 100
    original = random_cache(blocks * 16, 17)
    tokens = list(range(blocks * 16 + 1))
    assert kv.save(tokens, original) == blocks
    calls = []
    client = kv.client
    real = getattr(client, when)

    def kill_on_the_second(*args):
        calls.append(1)
        if len(calls) == 2:
            a.kill()
        return real(*args)

    setattr(client, when, kill_on_the_second)
    assert kv.restore(tokens, device="cpu") == (None, 0), "a miss, nothing raised"
    assert len(calls) == 2
    assert kv.restore(tokens, device="cpu") == (None, 0), "still down"
    b = agent(cfg, name="agent-restarted")
    b.tenant("team-a")
    assert kv.client is not client
    assert kv.restore(tokens, device="cpu") == (None, 0), "the new agent holds nothing yet"
    assert kv.save(tokens, original) == blocks
    restored, n = kv.restore(tokens, device="cpu")
    assert n == blocks * 16 and exact(restored, original, n)
    assert b.admin("evict_dram")["dropped"] == blocks


def test_a_failure_mid_restore_leaves_nothing_pinned(agent, tmp_path):
    """A copy that fails in the second chunk, and a connection lost on a release: the first raises
    (a bug is not hidden), the second is a miss; neither leaves a block pinned."""
    a = agent(agent_config(tmp_path, nvme=None))
    kv = hf_cache(a, "tiny-hf-failing")
    blocks = 100
    original = random_cache(blocks * 16, 19)
    tokens = list(range(blocks * 16 + 1))
    assert kv.save(tokens, original) == blocks
    real_joint = kv._joint_blocks
    scatters = []

    def failing(*args):
        scatters.append(1)
        if len(scatters) == 2:
            raise RuntimeError("copy failed")
        return real_joint(*args)

    kv._joint_blocks = failing
    with pytest.raises(RuntimeError, match="copy failed"):
        kv.restore(tokens, device="cpu")
    del kv._joint_blocks
    assert a.admin("evict_dram")["dropped"] == blocks, "the failed restore's pins were released"

    assert kv.save(tokens, original) == blocks
    client = kv.client

    def lost(handles):
        raise ConnectionResetError("connection lost on a release")

    client.release = lost
    assert kv.restore(tokens, device="cpu") == (None, 0)
    assert kv.client is not client, "the lost connection was closed"
    evict_when_unpinned(a, blocks)


def test_an_agent_hung_mid_restore_costs_one_timeout_and_keeps_no_pins(agent, tmp_path):
    """The agent stops answering between two chunks (SIGSTOP): the restore is a miss after the
    client's timeout; once the agent runs again it drops the abandoned connection's pins, and the
    next restore connects again and is whole."""
    import signal

    from kvtier.agent.client import Client
    from kvtier.agent.connectors.hf import HFKVCache

    a = agent(agent_config(tmp_path, nvme=None))
    kv = hf_cache(a, "tiny-hf-hung")
    kv = HFKVCache(Client(kv.client.path, timeout=1.0), kv.layout, device="cpu")
    blocks = 100
    original = random_cache(blocks * 16, 23)
    tokens = list(range(blocks * 16 + 1))
    assert kv.save(tokens, original) == blocks
    real_read = kv.client.read
    reads = []

    def read_from_a_hung_agent(fingerprint, keys):
        reads.append(len(keys))
        if len(reads) == 2:
            a.proc.send_signal(signal.SIGSTOP)
            status = Path(f"/proc/{a.proc.pid}/status")
            while "stopped" not in status.read_text():  # the signal is delivered asynchronously
                time.sleep(0.01)
        return real_read(fingerprint, keys)

    kv.client.read = read_from_a_hung_agent
    try:
        t0 = time.monotonic()
        assert kv.restore(tokens, device="cpu") == (None, 0)
        assert time.monotonic() - t0 < 5
    finally:
        a.proc.send_signal(signal.SIGCONT)
    assert reads == [32, 68], reads
    evict_when_unpinned(a, blocks)
    assert kv.save(tokens, original) == blocks
    restored, n = kv.restore(tokens, device="cpu")
    assert n == blocks * 16 and exact(restored, original, n)


def test_blocks_on_nvme_restore_bit_for_bit_after_the_agent_is_killed_mid_restore(agent, tmp_path):
    """The agent is killed while a restore promotes its blocks: a miss; the restarted agent finds
    the blocks on its NVMe tier and the next restore of the same prompt is whole."""
    cfg = agent_config(tmp_path)
    a = agent(cfg)
    kv = hf_cache(a, "tiny-hf-nvme-restart")
    blocks = 170
    original = random_cache(blocks * 16, 29)
    tokens = list(range(blocks * 16 + 1))
    assert kv.save(tokens, original, sync=True) == blocks
    assert a.admin("evict_dram")["dropped"] == blocks
    real_read = kv.client.read
    reads = []

    def read_then_die(fingerprint, keys):
        reads.append(len(keys))
        if len(reads) == 3:
            a.kill()
        return real_read(fingerprint, keys)

    kv.client.read = read_then_die
    assert kv.restore(tokens, device="cpu") == (None, 0)
    assert reads == [32, 128, 10]
    b = agent(cfg, name="agent-restarted")
    b.tenant("team-a")
    restored, n = kv.restore(tokens, device="cpu")
    assert n == blocks * 16 and exact(restored, original, n), "from the NVMe tier the new agent found"


def test_a_connection_the_agent_refuses_is_a_miss(agent, tmp_path):
    """The tenant's connections are at the pool's limit when the connector reconnects: the agent
    refuses it, and the restore and save are a miss (nothing raised); with a slot free they work."""
    from kvtier.agent.client import Client

    a = agent(agent_config(tmp_path, nvme=None, limits={"connectionsPerTenant": 1}))
    kv = hf_cache(a, "tiny-hf-refused")
    original = random_cache(2 * 16, 31)
    tokens = list(range(2 * 16 + 1))
    assert kv.save(tokens, original) == 2
    kv.conn.lost(ConnectionResetError("the previous connection broke"))
    deadline = time.monotonic() + 5
    while True:  # the agent frees the slot once it sees the close
        try:
            other = Client(kv.conn.path)
            break
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert kv.restore(tokens, device="cpu") == (None, 0), "refused: a miss"
    assert kv.save(tokens, original) == 0, "refused: nothing stored, nothing raised"
    other.close()
    deadline = time.monotonic() + 5
    while kv.restore(tokens, device="cpu")[1] != 32:
        assert time.monotonic() < deadline, "the connector connects again once a slot is free"
        time.sleep(0.05)


def test_a_block_corrupted_on_nvme_ends_the_restore_before_it(agent, tmp_path):
    """One block's bytes rot on the NVMe tier (in the second chunk): its promotion fails its
    checksum, and the restore is the blocks before it, bit for bit: never wrong KV."""
    from kvtier.agent.keys import block_keys

    a = agent(agent_config(tmp_path))
    kv = hf_cache(a, "tiny-hf-rot")
    blocks, bad = 100, 45
    original = random_cache(blocks * 16, 37)
    tokens = list(range(blocks * 16 + 1))
    assert kv.save(tokens, original, sync=True) == blocks
    blob = kv.client.get(kv.layout.fingerprint, block_keys(tokens, 16)[bad : bad + 1])[0]
    assert a.admin("evict_dram")["dropped"] == blocks
    image = tmp_path / "nvme.img"
    data = image.read_bytes()
    at = data.find(blob)
    assert at >= 0 and data.find(blob, at + 1) < 0
    with open(image, "r+b") as f:
        f.seek(at + len(blob) // 2)
        f.write(bytes([data[at + len(blob) // 2] ^ 0x01]))
    restored, n = kv.restore(tokens, device="cpu")
    assert n == bad * 16 and exact(restored, original, n)
    # the chunk's other blocks were promoted beside it; the rotten one is gone
    assert a.admin("evict_dram")["dropped"] == blocks - 1, "nothing left pinned"


def test_an_interrupt_while_a_reply_is_awaited_never_serves_that_reply_to_another_prompt(agent, tmp_path):
    """Ctrl-C (or any exception) lands while a restore waits for its read's reply: the reply is
    still on its way. The next restore, of another prompt, must not take it for its own (it names
    the first prompt's blocks: wrong KV); it gets its own KV on a new connection, no pin is left."""
    from kvtier.agent.api import protocol
    from kvtier.agent.client import Client
    from kvtier.agent.keys import block_keys

    a = agent(agent_config(tmp_path, nvme=None))
    kv = hf_cache(a, "tiny-hf-interrupted")
    first, second = random_cache(20 * 16, 41), random_cache(20 * 16, 43)
    tokens_a, tokens_b = list(range(20 * 16 + 1)), list(range(10**5, 10**5 + 20 * 16 + 1))
    assert kv.save(tokens_a, first) == kv.save(tokens_b, second) == 20
    real_recv = protocol.recv

    def interrupted(*args, **kw):
        protocol.recv = real_recv
        raise KeyboardInterrupt

    protocol.recv = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            kv.restore(tokens_a, device="cpu")
    finally:
        protocol.recv = real_recv
    restored, n = kv.restore(tokens_b, device="cpu")  # on a new connection
    assert n == 20 * 16 and exact(restored, second, n), "the other prompt's own KV"
    other = Client(kv.conn.path)
    pinned = other.read(kv.layout.fingerprint, block_keys(tokens_b, 16))
    other.sock.close()  # as an interrupted call leaves it
    pinned.release()  # nothing to release on a closed connection, nothing raised over the interrupt
    evict_when_unpinned(a, 40)


def test_a_save_the_agent_refuses_is_skipped_not_raised(agent, tmp_path):
    """A context larger than the pool's DRAM: the agent refuses room for it; the save stores nothing
    and the model code sees no exception (and a restore of it is a plain miss)."""
    from kvtier.agent.client import Client
    from kvtier.agent.connectors.hf import HFKVCache, dynamic_cache
    from kvtier.agent.keys import KVLayout

    a = agent(agent_config(tmp_path, dram="16Mi", nvme=None))
    heads, dim, b, blocks = 8, 128, 64, 24  # 1 MiB blocks, 24 MiB of KV
    layout = KVLayout("tiny-hf-big", "bfloat16", LAYERS, heads, dim, b)
    kv = HFKVCache(Client(a.tenant("team-a")), layout, device="cpu")
    layers = [tuple(torch.zeros(1, heads, blocks * b, dim).bfloat16() for _ in "kv") for _ in range(LAYERS)]
    tokens = list(range(blocks * b + 1))
    assert kv.save(tokens, dynamic_cache(layers)) == 0
    assert kv.restore(tokens, device="cpu") == (None, 0)
