"""A vLLM engine without a model, for the connector's tests: vLLM's real v1 Scheduler and KV cache
configuration (from the model's config and vLLM's own planning), the real KV cache tensors (vLLM's
`allocate_kv_cache`, in the layout asked for), the connector built by vLLM's factory for both roles,
and a fake model runner in place of the forward.

The fake forward behaves like attention where it matters here: layer by layer it waits for the
connector's load of that layer, reads the KV of every earlier position of the request, and writes
the KV of the scheduled positions. The KV of a position is a function of the request's extra inputs
(LoRA, multimodal) and all tokens up to it, so the KV of another prefix or adapter is wrong KV. A
request that read wrong KV writes poison from that layer on (what a real model computes over wrong
KV), so a connector that stores such KV, or serves it, is caught when the KV is next read.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MODEL = str(Path(__file__).parent / "tiny-llama")  # config.json only: 3 layers, 2 KV heads, head dim 16
PAGE = 16  # vLLM block size (tokens)
B = 64  # kvtier block (tokens): 4 pages
EOS = 2
POISON = 255.0


def _version() -> tuple[int, ...]:
    import vllm

    return tuple(int(x) for x in vllm.__version__.split(".")[:2])


def vllm_config(
    socket: str, *, batched: int = 256, v2: bool = False, layout: str = "LBNHC", max_len: int = 1024, **extra
):
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if v2 else "0"
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVTransferConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )

    model = ModelConfig(
        model=MODEL, skip_tokenizer_init=True, dtype="bfloat16", seed=0, max_model_len=max_len
    )
    try:
        config = VllmConfig(
            model_config=model,
            scheduler_config=SchedulerConfig(
                max_num_seqs=16,
                max_num_batched_tokens=batched,
                max_model_len=max_len,
                enable_chunked_prefill=True,
                is_encoder_decoder=False,
            ),
            cache_config=CacheConfig(block_size=PAGE, enable_prefix_caching=True),
            kv_transfer_config=KVTransferConfig(
                kv_connector="KVTierConnector",
                kv_connector_module_path="kvtier.agent.connectors.vllm",
                kv_role="kv_both",
                kv_load_failure_policy="recompute",
                kv_connector_extra_config={"socket": socket, "block_tokens": B, **extra},
            ),
            device_config=DeviceConfig("cpu"),
        )
    except Exception as exc:
        if v2 and "requires Triton" in str(exc):
            import pytest

            pytest.skip(f"this vLLM release refuses Model Runner V2 without Triton (CPU): {exc}")
        raise
    config.cache_config.kv_cache_layout = layout  # what the engine core resolves before connectors exist
    return config


def layer_names(n: int = 3) -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(n)]


def kv_cache_configs(config, num_blocks: int, mla: bool = False):
    """(worker's, scheduler's) KVCacheConfig, planned by vLLM from the layers' specs."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    if mla:
        spec = MLAAttentionSpec(block_size=PAGE, num_kv_heads=1, head_size=48, dtype=torch.bfloat16)
    else:
        spec = FullAttentionSpec(block_size=PAGE, num_kv_heads=2, head_size=16, dtype=torch.bfloat16)
    specs = {name: spec for name in layer_names()}
    memory = num_blocks * spec.page_size_bytes * len(specs)
    config.cache_config.num_gpu_blocks_override = num_blocks
    config.cache_config.num_gpu_blocks = num_blocks
    try:  # vLLM >= 0.33
        from vllm.v1.core.kv_cache_planning import get_global_kv_cache_groups, get_kv_cache_configs

        configs = get_kv_cache_configs(config, [specs], [memory], get_global_kv_cache_groups(config, [specs]))
    except ImportError:
        from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

        configs = get_kv_cache_configs(config, [specs], [memory])
    from vllm.v1.core.kv_cache_utils import generate_scheduler_kv_cache_config

    return configs[0], generate_scheduler_kv_cache_config(configs)


def allocate(config, worker_cfg) -> dict[str, torch.Tensor]:
    """The KV cache exactly as vLLM's worker allocates it (CPU)."""
    from vllm.v1.worker.utils import allocate_kv_cache

    return allocate_kv_cache(
        worker_cfg, torch.device("cpu"), config.cache_config.get_resolved_kv_cache_layout()
    )


# ------------------------------------------------------------------------------- the fake model


def kv_values(request, upto: int, layer: int, shape: tuple[int, int]) -> torch.Tensor:
    """The KV [positions, heads, C] the model computes for positions 0..upto-1 of `request`."""
    extra = repr(
        (getattr(request.lora_request, "lora_name", None), [f.identifier for f in request.mm_features or []])
    )
    h = hashlib.blake2b(f"{extra}|{layer}".encode(), digest_size=8)
    out = torch.empty(upto, *shape, dtype=torch.bfloat16)
    base = torch.arange(shape[0] * shape[1], dtype=torch.float32).view(shape)
    for p, tok in enumerate(request.all_token_ids[:upto]):
        h.update(int(tok).to_bytes(8, "little", signed=True))
        seed = int.from_bytes(h.digest()[:2], "little") % 200
        out[p] = ((base + seed) % 250).to(torch.bfloat16)  # integers < 256: exact in bf16
    return out


@dataclass
class Engine:
    socket: str
    num_blocks: int = 64
    batched: int = 256
    v2: bool = False  # vLLM's V1 model runner (the V2 runner gets resumed requests as new ones)
    layout: str = "LBNHC"
    mla: bool = False
    asynchronous: bool = False  # vLLM's AsyncScheduler (its default in 0.33); `step` still runs one at a time
    extra: dict = field(default_factory=dict)
    wrong_reads: list = field(default_factory=list)  # (step, req_id, layer): read wrong KV, not reported
    reported: set = field(default_factory=set)
    sent: set = field(default_factory=set)  # requests whose saves the worker reported done

    def __post_init__(self) -> None:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.structured_output import StructuredOutputManager

        self.config = vllm_config(
            self.socket,
            batched=self.batched,
            v2=self.v2,
            layout=self.layout,
            max_len=(self.num_blocks - 1) * PAGE,
            **self.extra,
        )
        worker_cfg, sched_cfg = kv_cache_configs(self.config, self.num_blocks, self.mla)
        self.scheduler = (AsyncScheduler if self.asynchronous else Scheduler)(
            vllm_config=self.config,
            kv_cache_config=sched_cfg,
            structured_output_manager=StructuredOutputManager(self.config),
            block_size=PAGE,
            log_stats=True,
        )
        self.connector = self.scheduler.connector
        self.worker = KVConnectorFactory.create_connector(self.config, KVConnectorRole.WORKER, worker_cfg)
        self.caches = allocate(self.config, worker_cfg)
        self.worker.register_kv_caches(self.caches)
        self.names = layer_names()
        self.steps = 0
        self.events: list = []
        self.stats: list = []
        self.finished: set[str] = set()
        take = self.connector.take_events

        def record_events():
            events = list(take())
            self.events += events
            return events

        self.connector.take_events = record_events

    def request(self, req_id: str, tokens: list[int], max_tokens: int = 2, **kw):
        from vllm import SamplingParams
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.request import Request

        init_none_hash(sha256)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        return Request(
            request_id=req_id,
            prompt_token_ids=list(tokens),
            sampling_params=params,
            pooling_params=None,
            block_hasher=get_request_block_hasher(PAGE, sha256),
            **kw,
        )

    def add(self, request) -> None:
        self.scheduler.add_request(request)

    def pages(self, req_id: str) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(req_id)[0])

    def _cell_shape(self) -> tuple[int, int]:
        t = self.caches[self.names[0]]
        return (t.shape[1], t.shape[3])  # [B, H, N, C]

    def read(self, req_id: str, upto: int, layer: int) -> torch.Tensor:
        """KV of positions 0..upto-1 of a request, from its pages ([positions, H, C])."""
        pages, t = self.pages(req_id), self.caches[self.names[layer]]
        rows = [t[pages[p // PAGE], :, p % PAGE, :] for p in range(upto)]
        return torch.stack(rows) if rows else torch.empty(0, *self._cell_shape(), dtype=t.dtype)

    @staticmethod
    def computed_before(out) -> dict[str, int]:
        """Tokens each scheduled request had computed before this step (vLLM advances its own
        counter when it schedules)."""
        before = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        before.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        return before

    def _forward(self, request, start: int, scheduled: int, before_layer) -> None:
        end = start + scheduled
        pages = self.pages(request.request_id)
        wrong_before = False
        for li, name in enumerate(self.names):
            before_layer(name)
            want = kv_values(request, end, li, self._cell_shape())
            seen = self.read(request.request_id, start, li)
            wrong = wrong_before or not torch.equal(seen, want[:start])
            if wrong and not wrong_before:
                self.wrong_reads.append((self.steps, request.request_id, li))
            wrong_before = wrong
            t = self.caches[name]
            for p in range(start, end):
                t[pages[p // PAGE], :, p % PAGE, :] = POISON if wrong else want[p]

    def step(self, between=None):
        """One engine step: schedule, the worker's connector calls around the fake forward, update."""
        self.steps += 1
        out = self.scheduler.schedule()
        if between is not None:
            between(out)
        self.update(out, self.execute(out))
        return out

    def execute(self, out):
        """The worker's side of a scheduled step: its connector calls around the fake forward; the
        model runner's output."""
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

        meta = out.kv_connector_metadata
        w = self.worker
        w.handle_preemptions(meta)
        w.bind_connector_metadata(meta)
        w.start_load_kv(None)
        requests = [self.scheduler.requests[r] for r in out.num_scheduled_tokens]
        before = self.computed_before(out)
        for request in requests:
            n = out.num_scheduled_tokens[request.request_id]
            self._forward(request, before[request.request_id], n, w.wait_for_layer_load)
        w.wait_for_save()
        invalid = w.get_block_ids_with_load_errors()
        if invalid:
            self.reported.add(self.steps)
        sending, recving = w.get_finished(set(out.finished_req_ids))
        self.sent |= sending or set()
        connector_output = KVConnectorOutput(
            finished_sending=sending,
            finished_recving=recving,
            invalid_block_ids=invalid,
            kv_connector_stats=w.get_kv_connector_stats(),
            kv_connector_worker_meta=w.build_connector_worker_meta(),
        )
        w.clear_connector_metadata()
        sampled = []
        for request in requests:
            done = before[request.request_id] + out.num_scheduled_tokens[request.request_id]
            sampled.append([7] if done >= request.num_tokens else [])
        ids = [r.request_id for r in requests]
        return ModelRunnerOutput(
            req_ids=ids,
            req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=sampled,
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=None,
            kv_connector_output=connector_output,
        )

    def update(self, out, mro) -> None:
        """The scheduler takes a step's output (finished requests and stats are recorded)."""
        engine_outputs = self.scheduler.update_from_output(out, mro)
        for eo in engine_outputs.values():
            for o in eo.outputs:
                if o.finish_reason is not None:
                    self.finished.add(o.request_id)
            stats = eo.scheduler_stats
            if stats is not None and stats.kv_connector_stats:
                self.stats.append(stats.kv_connector_stats)

    def run(self, between=None, timeout: float = 120.0) -> int:
        """Steps until every request finished and its pages are back; returns the steps taken. An
        engine with nothing to compute keeps stepping (saves finish in the background meanwhile)."""
        deadline = time.monotonic() + timeout
        steps = 0
        while self.scheduler.requests:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"requests still running after {timeout}s: {list(self.scheduler.requests)}"
                )
            if not self.step(between).num_scheduled_tokens:
                time.sleep(0.005)
            steps += 1
        self.worker.worker.drain(timeout=10)
        return steps

    def wrong_kv_unreported(self) -> list:
        """Reads of wrong KV in a step where the connector reported no load error."""
        return [w for w in self.wrong_reads if w[0] not in self.reported]

    def close(self) -> None:
        self.worker.shutdown()
        self.connector.shutdown()


def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 30000, (n,), generator=g).tolist()


def connector_stats(engine: Engine) -> dict[str, int]:
    total: dict[str, int] = {}
    for s in engine.stats:
        data: Any = s if isinstance(s, dict) else getattr(s, "data", s)
        for k, v in data.items():
            if isinstance(v, int):
                total[k] = total.get(k, 0) + v
    return total
