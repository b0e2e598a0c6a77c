"""vLLM V1 KV connector: prompts' KV is saved to the node's kvtier pool as their blocks complete and
loaded back into the paged KV cache when the same prefix returns (this or another replica).

Enable it (the webhook does this for injected pods):

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.agent.connectors.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute"}'

- `keys.py`: block keys from vLLM's own `request.block_hashes` (cache_salt, LoRA and multimodal
  inputs included), one scheme for saves and lookups; pure.
- `plan.py`: the scheduler side's bookkeeping (which pages load or save which blocks); pure.
- `worker.py`: loads (layer by layer) and saves (after the step) through the agent's arena.
- `events.py`: KV events, the worker's save reports, stats for vLLM's log and Prometheus.
- `connector.py`: `KVTierConnector`, vLLM's `KVConnectorBase_V1` for both roles.
The copies between blocks and vLLM's page layouts are `connectors/paged.py`'s.
"""

from typing import Any

__all__ = ["KVTierConnector", "KVTierConnectorMetadata", "Transfer"]


def __getattr__(name: str) -> Any:
    """vLLM loads `KVTierConnector` from here; the pure modules (keys, plan) import without vLLM."""
    if name in ("KVTierConnector", "KVTierConnectorMetadata"):
        from kvtier.agent.connectors.vllm import connector

        return getattr(connector, name)
    if name == "Transfer":
        from kvtier.agent.connectors.vllm.plan import Transfer

        return Transfer
    raise AttributeError(name)
