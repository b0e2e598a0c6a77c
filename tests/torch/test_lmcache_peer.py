"""The LMCache peer through LMCache's own engine and its local CPU and local disk backends: a
transformers model's DynamicCache stored, retrieved from each backend bit for bit, and the decode
step after it gives the logits of the same step from the original cache.

On the CPU, LMCache's CUDA connector cannot run, so a CPU connector of LMCache's interface moves the
bytes between the paged buffer and LMCache's memory objects; on a GPU (where LMCache's compiled CUDA
ops load) the peer uses LMCache's own connector, as the benchmark does. Skipped where LMCache is not
installed (it is not a dependency of kvtier)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def cpu_connector(layers: int, kv_heads: int, head_dim: int):
    """LMCache's connector interface over an [NL, 2, 1, H, L, D] buffer with slots 0..L-1, on the CPU."""
    from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface

    class CPUConnector(GPUConnectorInterface):
        def _tokens(self, buf, start, end):  # [2, NL, T, H*D] view of the buffer's tokens start..end
            part = buf[:, :, 0, :, start:end, :]  # NL, 2, H, T, D
            return part.permute(1, 0, 3, 2, 4)

        def to_gpu(self, memory_obj, start, end, **kwargs):
            dst = self._tokens(torch.stack(list(kwargs["kvcaches"])), start, end)
            src = memory_obj.tensor.view(2, layers, end - start, kv_heads, head_dim)
            for i, layer in enumerate(kwargs["kvcaches"]):
                layer[:, 0, :, start:end, :].copy_(src[:, i].permute(0, 2, 1, 3))
            del dst

        def from_gpu(self, memory_obj, start, end, **kwargs):
            src = self._tokens(torch.stack(list(kwargs["kvcaches"])), start, end)
            memory_obj.tensor.copy_(src.reshape(memory_obj.tensor.shape))

        def batched_to_gpu(self, memory_objs, starts, ends, **kwargs):
            for m, s, e in zip(memory_objs, starts, ends, strict=True):
                self.to_gpu(m, s, e, **kwargs)

        def batched_from_gpu(self, memory_objs, starts, ends, **kwargs):
            for m, s, e in zip(memory_objs, starts, ends, strict=True):
                self.from_gpu(m, s, e, **kwargs)

        def get_shape(self, num_tokens):
            return torch.Size([2, layers, num_tokens, kv_heads * head_dim])

    return CPUConnector()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_lmcache_stores_and_restores_a_dynamic_cache_from_cpu_and_disk(device, tmp_path):
    pytest.importorskip("lmcache.v1.cache_engine")
    from transformers import AutoModelForCausalLM, Qwen2Config

    from kvtier.bench import lmcache_peer, peers
    from kvtier.bench import prefill as pf

    if device == "cuda" and (why := lmcache_peer.unavailable()):
        pytest.skip(why)
    # the benchmark's head_dim (128) and grouped KV heads, two layers
    kv_heads, head_dim = 2, 128
    config = Qwen2Config(
        hidden_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=1024,
        vocab_size=2048,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    L = 640  # two full 256-token chunks and a partial one
    ids = torch.randint(0, config.vocab_size, (1, L + 1), device=device)
    disk = tmp_path / "disk"
    disk.mkdir()
    with torch.inference_mode():
        _, cache = pf.hf_prefill(model, ids)
        cache.crop(-1)  # the L context tokens
        original = [(la.keys.clone(), la.values.clone()) for la in cache.layers]
        ref = model(input_ids=ids[:, L:], past_key_values=cache, use_cache=True, logits_to_keep=1)
        ref = ref.logits[0, -1].float()
        cache.crop(-1)  # the decode step appended one
        connector = cpu_connector(len(cache.layers), kv_heads, head_dim) if device == "cpu" else None
        stored = lmcache_peer.save(cache, tmp_path, disk, L, connector=connector)
        assert [s["tier"] for s in stored] == ["lmcache:cpu", "lmcache:disk"]
        assert stored[1]["file_bytes"] >= stored[0]["file_bytes"] > 0  # the disk backend holds it all
        if device == "cuda":  # the connector LMCache makes for vLLM, its compiled kernels underneath
            assert stored[0]["row"]["lmcache"]["gpu_connector"] == "VLLMPagedMemGPUConnectorV2"

        def check(rc, out):
            return {
                "diff": (out.logits[0, -1].float() - ref).abs().max().item(),
                "kv_equal": all(
                    torch.equal(la.keys[:, :, :L], k) and torch.equal(la.values[:, :, :L], v)
                    for la, (k, v) in zip(rc.layers, original, strict=True)
                ),
            }

        for s in stored:
            got = peers.restore(s, model, ids, L, torch.device(device), check)
            assert got["retrieved_tokens"] == L and got["kv_equal"] and got["kv_bitwise_equal_all"], s["tier"]
            assert got["diff"] == 0.0
            assert set(got["phases"]) == {"retrieve", "load", "decode"}
        assert got["page_cache"]["cpu_backend_tokens_left"] == 0  # the disk restore read the disk
    peers.remove_all(tmp_path, disk, L)
    assert not any(disk.iterdir())


def test_without_lmcache_the_peer_says_why_and_stores_nothing(tmp_path, monkeypatch):
    import builtins

    from kvtier.bench import lmcache_peer

    real_import = builtins.__import__

    def no_lmcache(name, *args, **kwargs):
        if name == "lmcache" or name.startswith("lmcache."):
            raise ImportError("No module named 'lmcache'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lmcache)
    assert "lmcache does not import" in lmcache_peer.describe()["unavailable"]
    cache = type("Cache", (), {"layers": []})()
    assert lmcache_peer.save(cache, tmp_path, tmp_path, 256) == []
