"""The scheduler side's bookkeeping, pure (no vLLM, no torch, no agent): which pages of which request
load which kvtier blocks, and which completed blocks are saved, step by step.

Rules that keep wrong KV out of the pool and out of the engine:
- A load covers the pages after those vLLM already computed (its own prefix hit): the first
  `skip` pages of the first loaded block are not written.
- A block is saved once every one of its tokens has been computed (after the step that computes
  its last token: chunked prefill saves block by block), never a block that came from kvtier.
- A step whose load failed for a request saves nothing of that request (the worker drops it) and the
  scheduler forgets the blocks it planned from the failed pages on, so they are saved after vLLM
  recomputes them. With vLLM's asynchronous scheduling the next step was planned before the
  failure was reported, over the failed pages: every transfer carries the request's `epoch` (load
  failures the scheduler has heard of), and the worker drops saves planned before it heard.
- A preempted request keeps its state; on resume it gets new pages (vLLM's V1 model runner sends
  them in `scheduled_cached_reqs` with the request in `resumed_req_ids`, the V2 runner as a new
  request) and a new load if the pool still holds its blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Transfer:
    req_id: str
    keys: list[bytes]  # one per kvtier block
    page_ids: list[int]  # the vLLM pages those blocks cover, `per` a block, in order
    skip: int = 0  # leading pages not to write on load (vLLM computed them itself)
    first_block: int = 0  # index of keys[0] in the request's chain
    limit: int | None = None  # pages from the start to write on load (None: all): a load vLLM capped
    epoch: int = 0  # the request's load failures the scheduler knew of when it planned this

    @property
    def end(self) -> int:
        """Pages from the start that a load writes (`limit`, else every page)."""
        return len(self.page_ids) if self.limit is None else self.limit


@dataclass
class Step:
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


@dataclass
class RequestState:
    request: Any  # vLLM's Request (its block hashes grow as tokens arrive)
    pages: list[int] = field(default_factory=list)
    planned: int = 0  # kvtier blocks saved, planned for saving, or known to be in the pool
    load: tuple[int, int] | None = None  # tokens [start, end) to load at the next step
    saves: int = 0  # save transfers planned (the worker reports each before the pages may be freed)
    epoch: int = 0  # load failures reported for this request


class Planner:
    def __init__(self, page: int, block_tokens: int, keys_of) -> None:
        self.page, self.block_tokens = page, block_tokens
        self.per = block_tokens // page
        self.keys_of = keys_of  # (request, max_tokens) -> kvtier keys
        self.requests: dict[str, RequestState] = {}

    def allocated(self, request: Any, computed: int, num_external_tokens: int) -> None:
        """After vLLM allocated pages: the tokens after the `computed` ones vLLM holds, up to
        `num_external_tokens` of them, are loaded."""
        state = self.requests.setdefault(request.request_id, RequestState(request))
        state.request = request
        if num_external_tokens > 0:
            state.load = (computed, computed + num_external_tokens)

    def step(self, scheduler_output: Any) -> Step:
        step = Step()
        for new in scheduler_output.scheduled_new_reqs:
            state = self.requests.get(new.req_id)
            if state is not None:
                state.pages = list(new.block_ids[0]) if new.block_ids else []
                self._plan(step, state, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = _resumed(cached)
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                state.pages = list(new_ids[0]) if new_ids else []
            elif new_ids:
                state.pages.extend(new_ids[0])
            self._plan(step, state, cached.num_computed_tokens[i], scheduler_output)
        return step

    def _plan(self, step: Step, state: RequestState, computed: int, out: Any) -> None:
        B, per = self.block_tokens, self.per
        req_id = state.request.request_id
        if state.load is not None:
            start, end = state.load
            state.load = None
            first, hits = start // B, -(-end // B)
            keys = self.keys_of(state.request, hits * B)[first:hits]
            pages = state.pages[first * per : hits * per]
            need = -(-end // self.page) - first * per  # pages holding tokens before `end`
            if len(keys) == hits - first and len(pages) >= need:
                pages += [0] * (len(keys) * per - len(pages))  # never written (beyond `limit`)
                step.loads.append(
                    Transfer(req_id, keys, pages, start // self.page - first * per, first, need, state.epoch)
                )
                state.planned = max(state.planned, hits)
        done = computed + out.num_scheduled_tokens.get(req_id, 0)
        prompt = state.request.num_prompt_tokens
        full = min(done, prompt) // B
        if full > state.planned and len(state.pages) >= full * per:
            keys = self.keys_of(state.request, full * B)[state.planned : full]
            if len(keys) == full - state.planned:
                step.saves.append(
                    Transfer(
                        req_id,
                        keys,
                        state.pages[state.planned * per : full * per],
                        0,
                        state.planned,
                        epoch=state.epoch,
                    )
                )
                state.planned = full
                state.saves += 1

    def load_failed(self, page_ids: set[int]) -> None:
        """vLLM recomputes pages that failed to load: blocks from the first such page are unsaved."""
        for state in self.requests.values():
            bad = [i for i, p in enumerate(state.pages) if p in page_ids]
            if bad:
                state.planned = min(state.planned, bad[0] // self.per)
                state.epoch += 1

    def finished(self, req_id: str) -> RequestState | None:
        return self.requests.pop(req_id, None)


def _resumed(cached: Any) -> set[str]:
    """Requests resumed after preemption in this step (the field's shape differs across releases)."""
    ids = getattr(cached, "resumed_req_ids", None)
    if ids is not None:
        return set(ids)
    flags = getattr(cached, "resumed_from_preemption", None) or []
    return {r for r, f in zip(cached.req_ids, flags, strict=False) if f}
