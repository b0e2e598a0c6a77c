"""The closed-loop chat workload behind `kvtier bench serve`: users and their turns, the HBM prefix
cache (an LRU over a fixed number of contexts), the scheduler, and the metrics. No torch here: the
engine that does the GPU work is handed in, and every engine call is timed with the clock handed in.

Each user holds a conversation: a history (already computed in an earlier session, so it returns),
then `turns` turns of `new_tokens` from the user and `output_tokens` from the model, with an
exponential think time between a reply and the next message. The scheduler, one thread:

- a turn that arrives waits in a FIFO queue; one turn is admitted at a time (prefill or restore of
  one request at a time), when the active batch has a free HBM slot;
- admission: a context still in HBM only prefills the new tokens; an evicted one is prefilled again
  from token 0 (recompute) or restored from the agent and its tail prefilled (kvtier);
- every loop iteration after an admission runs one decode step over all active requests (continuous
  batching); a request leaves the batch after its last output token, its context stays in HBM (LRU)
  and, under kvtier, its new full blocks are saved to the agent (what an engine connector does when a
  request finishes);
- kvtier+prefetch: `prefetch_lead_s` before a user's next message arrives, a gateway hint goes to the
  prefetch sidecar, which promotes the context's blocks from NVMe to DRAM.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Protocol

POLICIES = ("recompute", "kvtier", "kvtier+prefetch")
PHASES = ("prefill", "restore", "save", "decode")
EPSILON_S = 1e-6


@dataclass(frozen=True)
class Workload:
    users: int = 12
    contexts: tuple[int, ...] = (16384, 32768, 65536, 131072)  # history lengths, drawn per user
    turns: int = 20  # per user; a user who has had them all stops
    new_tokens: int = 256  # the user's message, per turn
    output_tokens: int = 128  # the model's reply, per turn
    think_s: float = 2.0  # mean of an exponential think time between a reply and the next message
    hbm_contexts: int = 4  # HBM KV budget: contexts resident at once (also the largest decode batch)
    duration_s: float = 90.0  # each policy runs this long (or until every user had every turn)
    prefetch_lead_s: float = 1.0  # kvtier+prefetch: how long before a message its hint goes out
    returning: bool = True  # histories were computed before (False: nobody returns to a cached context)
    vocab: int = 152064
    seed: int = 0

    def check(self) -> None:
        if self.users < 1 or self.turns < 1 or self.hbm_contexts < 1:
            raise ValueError("users, turns and hbm_contexts must be at least 1")
        if self.output_tokens < 1 or self.new_tokens < 1 or not self.contexts or min(self.contexts) < 1:
            raise ValueError("new and output tokens per turn and every context length must be at least 1")
        if self.think_s < 0 or self.duration_s <= 0 or self.prefetch_lead_s < 0:
            raise ValueError("think time and prefetch lead must be >= 0, duration > 0")

    def max_context(self) -> int:
        """The longest a context can grow: its history plus every turn's message and reply."""
        return max(self.contexts) + self.turns * (self.new_tokens + self.output_tokens)


@dataclass
class Script:
    """What one user will send: the same for every policy (only the model's replies differ)."""

    history: list[int]
    messages: list[list[int]]
    think_s: list[float]  # before each message; the first is the offset of the user's first message
    history_tokens: int = 0


def scripts(w: Workload) -> list[Script]:
    """Every user's history, messages and think times, from the seed alone."""
    out = []
    for u in range(w.users):
        rng = random.Random(w.seed * 1_000_003 + u)
        length = rng.choice(w.contexts)
        history = [rng.randrange(w.vocab) for _ in range(length)]
        messages = [[rng.randrange(w.vocab) for _ in range(w.new_tokens)] for _ in range(w.turns)]
        # first messages spread over one think time, so users do not all arrive at t=0
        think = [rng.uniform(0, w.think_s)]
        think += [rng.expovariate(1 / w.think_s) if w.think_s else 0.0 for _ in range(w.turns - 1)]
        out.append(Script(history, messages, think, length))
    return out


# --------------------------------------------------------------------------------- the engine


class Engine(Protocol):
    """The GPU side. Every call returns when its GPU work is done (the scheduler times it)."""

    def prefill(self, slot: int, tokens: list[int], start: int) -> int:
        """Compute KV of tokens[start:] into `slot` after the `start` tokens it holds; the next token."""

    def restore(self, slot: int, tokens: list[int]) -> int:
        """Load the longest cached prefix of `tokens` (at least one token left out) into `slot`."""

    def save(self, slot: int, tokens: list[int], kv_tokens: int) -> None:
        """Save the full blocks of the first `kv_tokens` tokens held in `slot` (new ones only)."""

    def decode(self, batch: list[tuple[int, int, int]]) -> list[int]:
        """One step for (slot, position, token) each: write its KV at position, return next tokens."""

    def hint(self, tokens: list[int]) -> None:
        """A prefetch hint for a context about to return (asynchronous)."""


class Clock(Protocol):
    def now(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


# ------------------------------------------------------------------------------- HBM prefix cache


class HbmCache:
    """Which user's context sits in which HBM slot, least recently used first."""

    def __init__(self, slots: int) -> None:
        self.free = list(range(slots))
        self.resident: OrderedDict[int, int] = OrderedDict()  # user -> slot

    def get(self, user: int) -> int | None:
        slot = self.resident.get(user)
        if slot is not None:
            self.resident.move_to_end(user)
        return slot

    def place(self, user: int, busy: set[int]) -> tuple[int, int | None]:
        """A slot for `user`: a free one, or the least recently used one of a user not in `busy`.
        Returns (slot, evicted user or None)."""
        if self.free:
            slot, evicted = self.free.pop(0), None
        else:
            evicted = next((u for u in self.resident if u not in busy), None)
            if evicted is None:
                raise RuntimeError("every HBM slot holds an active request")
            slot = self.resident.pop(evicted)
        self.resident[user] = slot
        return slot, evicted


# ---------------------------------------------------------------------------------- scheduler


@dataclass
class Turn:
    user: int
    index: int
    arrival: float
    context_tokens: int  # tokens before this message
    source: str = ""  # hbm | restored | recomputed | cold
    restored_tokens: int = 0
    prefilled_tokens: int = 0
    first_token: float | None = None
    finish: float | None = None
    produced: int = 0


@dataclass
class Active:
    turn: Turn
    slot: int
    position: int  # tokens whose KV is in the slot
    last: int  # the newest token, not yet in the KV


@dataclass
class UserState:
    script: Script
    tokens: list[int]
    kv_tokens: int = 0  # tokens of `tokens` whose KV the user's HBM slot holds (when resident)
    turns_done: int = 0
    next_arrival: float | None = None
    hinted: bool = False


@dataclass
class Run:
    policy: str
    elapsed_s: float
    busy_s: dict[str, float]
    turns: list[Turn]
    hints: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # requests summed over decode steps (the mean batch is rows / steps)
    notes: dict[str, object] = field(default_factory=dict)


class Scheduler:
    def __init__(
        self,
        workload: Workload,
        policy: str,
        engine: Engine,
        clock: Clock | None = None,
        user_scripts: list[Script] | None = None,
        resident: int | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: one of {', '.join(POLICIES)}")
        workload.check()
        self.w, self.policy, self.engine = workload, policy, engine
        self.clock = clock or RealClock()
        self.scripts = user_scripts or scripts(workload)
        self.users = [UserState(s, list(s.history)) for s in self.scripts]
        self.hbm = HbmCache(workload.hbm_contexts)
        self.busy = dict.fromkeys(PHASES, 0.0)
        self.turns: list[Turn] = []
        self.queue: deque[Turn] = deque()
        self.active: list[Active] = []
        self.hints = 0
        self.decode_steps = self.decode_rows = 0
        # The first `resident` users' histories start in HBM (the engine was given them already)
        if workload.returning:
            for u in range(min(workload.hbm_contexts if resident is None else resident, workload.users)):
                self.hbm.place(u, set())
                self.users[u].kv_tokens = len(self.users[u].tokens)

    def _timed(self, phase: str, fn, *args):
        t0 = self.clock.now()
        out = fn(*args)
        self.busy[phase] += self.clock.now() - t0
        return out

    def run(self) -> Run:
        w = self.w
        self.t0 = self.clock.now()
        for u in self.users:
            u.next_arrival = u.script.think_s[0]
        while True:
            now = self.clock.now() - self.t0
            due = now + EPSILON_S  # a sleep until an event may land a rounding error short of it
            for i, u in enumerate(self.users):  # before the end check: who arrived while the GPU was busy
                if u.next_arrival is not None and u.next_arrival <= min(due, w.duration_s):
                    self._arrive(i, u.next_arrival)
            if now >= w.duration_s:
                break
            if not self.queue and not self.active and all(u.next_arrival is None for u in self.users):
                break  # every user had every turn
            if self.policy == "kvtier+prefetch":
                for u in self.users:
                    if (
                        u.next_arrival is not None
                        and not u.hinted
                        and u.next_arrival - w.prefetch_lead_s <= due
                    ):
                        u.hinted = True
                        self.hints += 1
                        self.engine.hint(list(u.tokens))
            worked = False
            if self.queue and len(self.active) < w.hbm_contexts:
                self._admit(self.queue.popleft())
                worked = True
            if self.active:
                self._decode()
                worked = True
            if not worked:
                self.clock.sleep(max(EPSILON_S, min(self._next_event() - now, w.duration_s - now)))
        elapsed = self.clock.now() - self.t0
        return Run(
            self.policy, elapsed, dict(self.busy), self.turns, self.hints, self.decode_steps, self.decode_rows
        )

    def _next_event(self) -> float:
        times = [math.inf]
        for u in self.users:
            if u.next_arrival is not None:
                times.append(u.next_arrival)
                if self.policy == "kvtier+prefetch" and not u.hinted:
                    times.append(u.next_arrival - self.w.prefetch_lead_s)
        return min(times)

    def _arrive(self, user: int, at: float) -> None:
        u = self.users[user]
        u.next_arrival, u.hinted = None, False
        turn = Turn(user, u.turns_done, at, len(u.tokens))
        u.tokens.extend(u.script.messages[u.turns_done])
        self.turns.append(turn)
        self.queue.append(turn)

    def _admit(self, turn: Turn) -> None:
        u = self.users[turn.user]
        slot = self.hbm.get(turn.user)
        if slot is not None:
            turn.source, start = "hbm", u.kv_tokens
        else:
            busy = {a.turn.user for a in self.active}
            slot, evicted = self.hbm.place(turn.user, busy)
            if evicted is not None:
                self.users[evicted].kv_tokens = 0
            start = 0
            if self.policy != "recompute":
                start = self._timed("restore", self.engine.restore, slot, u.tokens)
            cached_before = self.w.returning or turn.index > 0
            turn.source = "restored" if start else ("recomputed" if cached_before else "cold")
            turn.restored_tokens = start
        turn.prefilled_tokens = len(u.tokens) - start
        first = self._timed("prefill", self.engine.prefill, slot, u.tokens, start)
        turn.first_token = self.clock.now() - self.t0
        turn.produced = 1
        u.tokens.append(first)
        u.kv_tokens = len(u.tokens) - 1
        self.active.append(Active(turn, slot, u.kv_tokens, first))
        if turn.produced >= self.w.output_tokens:
            self._finish(self.active.pop())

    def _decode(self) -> None:
        batch = [(a.slot, a.position, a.last) for a in self.active]
        nexts = self._timed("decode", self.engine.decode, batch)
        self.decode_steps += 1
        self.decode_rows += len(batch)
        done = []
        for a, token in zip(self.active, nexts, strict=True):
            u = self.users[a.turn.user]
            a.position += 1
            a.last = token
            a.turn.produced += 1
            u.tokens.append(token)
            u.kv_tokens = a.position
            if a.turn.produced >= self.w.output_tokens:
                done.append(a)
        for a in done:
            self.active.remove(a)
            self._finish(a)

    def _finish(self, a: Active) -> None:
        now = self.clock.now() - self.t0
        a.turn.finish = now
        u = self.users[a.turn.user]
        u.turns_done += 1
        if self.policy != "recompute":
            self._timed("save", self.engine.save, a.slot, u.tokens, u.kv_tokens)
        if u.turns_done < self.w.turns:
            u.next_arrival = self.clock.now() - self.t0 + u.script.think_s[u.turns_done]


# ------------------------------------------------------------------------------------ metrics


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(run: Run, gpu_hour_usd: float) -> dict[str, object]:
    """What a user of the numbers checks: turns and tokens per GPU-hour, latency percentiles, where
    the GPU's time went, and dollars per million output tokens at `gpu_hour_usd`."""
    elapsed = run.elapsed_s
    done = [t for t in run.turns if t.finish is not None]
    # A turn still waiting for its first token at the end counts with its wait so far: a lower bound
    # on its TTFT (leaving it out would flatter the policy that left the most turns waiting).
    ttft = [(t.first_token if t.first_token is not None else elapsed) - t.arrival for t in run.turns]
    tpot = [
        (t.finish - t.first_token) / (t.produced - 1)
        for t in done
        if t.first_token is not None and t.produced > 1
    ]
    out_tokens = sum(t.produced for t in run.turns)
    busy = sum(run.busy_s.values())
    hours = elapsed / 3600
    tok_per_hour = out_tokens / hours if hours else 0.0
    sources: dict[str, int] = {}
    for t in run.turns:
        if t.first_token is not None:
            sources[t.source] = sources.get(t.source, 0) + 1

    def rnd(x: float | None, n: int = 4) -> float | None:
        return None if x is None else round(x, n)

    return {
        "policy": run.policy,
        "elapsed_s": round(elapsed, 3),
        "turns_completed": len(done),
        "turns_started": sum(1 for t in run.turns if t.first_token is not None),
        "turns_waiting_at_end": sum(1 for t in run.turns if t.first_token is None),
        "turns_per_gpu_hour": round(len(done) / hours, 1) if hours else 0.0,
        "turns_per_busy_gpu_hour": round(len(done) / (busy / 3600), 1) if busy else 0.0,
        "output_tokens": out_tokens,
        "output_tokens_per_s": round(out_tokens / elapsed, 2) if elapsed else 0.0,
        "ttft_s": {f"p{q}": rnd(percentile(ttft, q)) for q in (50, 95, 99)},
        "tpot_s": {f"p{q}": rnd(percentile(tpot, q), 5) for q in (50, 99)},
        "gpu_time_s": {
            **{k: round(v, 3) for k, v in run.busy_s.items()},
            "idle": round(max(0.0, elapsed - busy), 3),
        },
        "gpu_time_share": {
            **{k: round(v / elapsed, 4) for k, v in run.busy_s.items()},
            "idle": round(max(0.0, elapsed - busy) / elapsed, 4),
        }
        if elapsed
        else {},
        "decode_step_ms_mean": round(run.busy_s["decode"] / run.decode_steps * 1e3, 3)
        if run.decode_steps
        else None,
        "decode_batch_mean": round(run.decode_rows / run.decode_steps, 2) if run.decode_steps else None,
        "usd_per_m_output_tokens": round(gpu_hour_usd / (tok_per_hour / 1e6), 4) if tok_per_hour else None,
        "turn_sources": sources,
        "prefetch_hints": run.hints,
        **({"notes": run.notes} if run.notes else {}),
    }


def ratios(summaries: dict[str, dict], base: str = "recompute") -> dict[str, dict[str, float | None]]:
    """Each kvtier policy against the baseline: the headline numbers."""
    b = summaries[base]
    out = {}
    for name, s in summaries.items():
        if name == base:
            continue

        def div(x, y):
            return round(x / y, 2) if x and y else None

        cost_b, cost_s = b["usd_per_m_output_tokens"], s["usd_per_m_output_tokens"]
        out[f"{name}/{base}"] = {
            "turns_per_gpu_hour": div(s["turns_per_gpu_hour"], b["turns_per_gpu_hour"]),
            "output_tokens_per_s": div(s["output_tokens_per_s"], b["output_tokens_per_s"]),
            "usd_per_m_output_tokens_lower_by": round(1 - cost_s / cost_b, 3) if cost_b and cost_s else None,
            "ttft_p50_lower_by_x": div(b["ttft_s"]["p50"], s["ttft_s"]["p50"]),
            "ttft_p99_lower_by_x": div(b["ttft_s"]["p99"], s["ttft_s"]["p99"]),
        }
    return out


def workload_dict(w: Workload) -> dict[str, object]:
    d = asdict(w)
    d["contexts"] = list(w.contexts)
    return d
