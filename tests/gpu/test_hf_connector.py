"""The engine side on a real GPU: arena registered with CUDA, KV saved from and restored into a
transformers DynamicCache, next-token logits equal to a full recompute. Runs on the GPU machine."""

from __future__ import annotations

import pytest

from kvtier.agent.client import Client
from kvtier.agent.keys import KVLayout
from tests.support import agent_config

pytestmark = pytest.mark.gpu


def _model():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(
        hidden_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=1376,
        vocab_size=4096,
        max_position_embeddings=65536,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16, attn_implementation="sdpa"
        ).eval(), cfg


def test_save_restore_dynamic_cache_gives_recompute_logits(agent, tmp_path):
    import torch
    from transformers import DynamicCache

    from kvtier.agent.connectors.hf import HFKVCache

    model, cfg = _model()
    a = agent(agent_config(tmp_path, dram="256Mi", nvme="512Mi"))
    kv = HFKVCache(Client(a.tenant("team-a")), KVLayout.from_hf_config(cfg, block_tokens=256))
    ids = torch.randint(0, cfg.vocab_size, (1, 256 * 12 + 1), device="cuda")
    tokens = ids[0].tolist()
    with torch.inference_mode():
        cache = DynamicCache()
        ref = (
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            .logits[0, -1]
            .float()
        )
        assert kv.save(tokens, cache, sync=True) == 12
        assert kv.save(tokens, cache) == 0, "saving the same prefix again stores nothing"
        restored, n = kv.restore(tokens, device="cuda")
        assert n == 256 * 12
        for li in range(cfg.num_hidden_layers):
            assert torch.equal(restored.layers[li].keys, cache.layers[li].keys[:, :, :n])
            assert torch.equal(restored.layers[li].values, cache.layers[li].values[:, :, :n])
        out = model(input_ids=ids[:, n:], past_key_values=restored, use_cache=True, logits_to_keep=1)
        diff = (out.logits[0, -1].float() - ref).abs().max().item()
        assert diff < 0.05, diff  # bf16, one-token decode vs a full-prompt kernel
        # from the NVMe tier: same bytes after promotion
        a.admin("evict_dram")
        again, n2 = kv.restore(tokens, device="cuda")
        assert n2 == n and torch.equal(again.layers[0].keys, cache.layers[0].keys[:, :, :n])
        # another namespace sees nothing
        other = HFKVCache(Client(a.tenant("team-b")), kv.layout)
        assert other.restore(tokens, device="cuda") == (None, 0)


def test_nvml_inventory_finds_the_gpu_and_its_numa_node():
    from kvtier.agent.devices import gpu_inventory, numa_for_gpus

    gpus, reason = gpu_inventory()
    assert gpus and reason is None
    assert gpus[0].memoryBytes > 10 << 30 and gpus[0].pciBusId
    numa_for_gpus(gpus)  # may be None on a single-socket VM; must not fail
