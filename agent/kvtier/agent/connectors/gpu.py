"""Moving KV blocks between the agent's arena and GPU memory, fast. Needs torch (engine side).

The arena's segments are mapped in this process and registered with CUDA (cudaHostRegister), so
a copy is one DMA straight from the arena: no bounce buffer, no pageable-memory slowdown.
Blocks are 0.5-15 MB each and usually adjacent in a segment; adjacent ones are merged into one copy
(small copies are launch-bound). On the GPU, blocks are staged contiguously and scattered into the
engine's layout with one strided copy per layer and K/V (device memory moves ~4 TB/s), while the next
group's DMA runs on a second stream.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import torch

from kvtier.agent.client import AgentConnection, Client
from kvtier.agent.connectors.runs import GROUP_BYTES, HostRun, groups, runs, runs_in

log = logging.getLogger("kvtier.gpu")
_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly
_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice


class GpuArena:
    """The client's segments as CUDA-registered host tensors."""

    def __init__(self, client: Client, pin: bool = True) -> None:
        self.client = client
        self.pin = pin  # False for CPU-only processes (tests, CPU tensor-parallel ranks): no CUDA calls
        self.host: dict[int, torch.Tensor] = {}

    def sync(self) -> None:
        """Register segments the agent has handed over since the last call (engine start-up, mostly)."""
        for seg_id, mm in self.client.segments.items():
            if seg_id in self.host:
                continue
            tensor = torch.frombuffer(mm, dtype=torch.uint8)
            if self.pin:
                readonly = seg_id in self.client.readonly  # a shared pool's sealed blocks
                err = torch.cuda.cudart().cudaHostRegister(
                    tensor.data_ptr(), tensor.numel(), _REGISTER_READ_ONLY if readonly else 0
                )
                if int(err) != 0:
                    _clear_cuda_error()  # else the next kernel launch anywhere reports it
                    raise RuntimeError(f"cudaHostRegister failed ({int(err)}) for segment {seg_id}")
            self.host[seg_id] = tensor

    def close(self) -> None:
        if self.pin:
            for tensor in self.host.values():
                torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
        self.host.clear()

    def view(self, run: HostRun, block_bytes: int) -> torch.Tensor:
        return self.host[run.segment][run.offset : run.offset + run.count * block_bytes]


class ArenaConnection(AgentConnection):
    """An AgentConnection and its arena: the arena belongs to the connection and is unregistered
    before the connection unmaps it (a restarted agent's memory is new, under the same segment ids)."""

    def __init__(self, *args, pin: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pin = pin  # False for CPU-only processes: no CUDA calls
        self._arena: GpuArena | None = None

    def arena(self) -> GpuArena:
        """The current connection's segments, registered up to the last reply (call after `get()`)."""
        if self._arena is None:
            assert self.client is not None, "arena() needs a connection"
            self._arena = GpuArena(self.client, pin=self.pin)
        self._arena.sync()
        return self._arena

    def arena_for(self, client: Client) -> GpuArena | None:
        """The arena of `client` while it is still this connection's; None once another thread has
        lost it (and maybe connected again: the locations `client` handed out name other memory in
        the new arena, and the extents they named went back to the agent with the old connection)."""
        with self._lock:
            return self.arena() if self.client is client else None

    def release_arena(self) -> None:
        """Unregister the arena from CUDA (it registers again on the next use): before the memory it
        covers can be unmapped, a registration over unmapped memory makes the next one there fail."""
        with self._lock:
            self._release()

    def _release(self) -> None:
        if self._arena is not None:
            self._arena.close()
            self._arena = None


class Staging:
    """Two reusable GPU staging buffers and a copy stream (allocated once per engine, not per request)."""

    def __init__(self, device: torch.device, group_bytes: int = GROUP_BYTES) -> None:
        self.device = device
        self.group_bytes = group_bytes
        on_gpu = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if on_gpu else None
        self.buffers = (
            [torch.empty(group_bytes, dtype=torch.uint8, device=device) for _ in range(2)] if on_gpu else []
        )


def host_to_gpu(
    arena: GpuArena,
    locations: list[tuple[int, int]],
    block_bytes: int,
    scatter,  # callable(first_block, staging uint8 tensor [g*block_bytes]) run on the compute stream
    staging: Staging,
) -> None:
    """DMA blocks group by group into a staging buffer and hand each group to `scatter`, with the
    next group's DMA overlapping the current scatter (two buffers, two streams)."""
    device = staging.device
    if device.type != "cuda":  # CPU: the arena is already host memory; scatter straight from it
        all_runs = runs(locations, block_bytes)
        for run in all_runs:
            scatter(run.first, arena.view(run, block_bytes))
        return
    copy_stream = staging.stream
    compute = torch.cuda.current_stream(device)
    buffers = staging.buffers
    free = [torch.cuda.Event() for _ in range(2)]
    for e in free:
        e.record(compute)
    all_runs = runs(locations, block_bytes)
    for gi, (start, end) in enumerate(groups(len(locations), block_bytes, staging.group_bytes)):
        buf = buffers[gi % 2]
        copy_stream.wait_event(free[gi % 2])
        with torch.cuda.stream(copy_stream):
            for run in runs_in(all_runs, start, end):
                lo, hi = max(run.first, start), min(run.first + run.count, end)
                src = arena.view(run, block_bytes)[
                    (lo - run.first) * block_bytes : (hi - run.first) * block_bytes
                ]
                buf[(lo - start) * block_bytes : (hi - start) * block_bytes].copy_(src, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(copy_stream)
        compute.wait_event(ready)
        scatter(start, buf[: (end - start) * block_bytes])
        free[gi % 2].record(compute)


def gpu_to_host(
    arena: GpuArena,
    locations: list[tuple[int, int]],
    block_bytes: int,
    gather,  # callable(first_block, last_block) -> uint8 tensor [(last-first)*block_bytes] on the GPU
) -> None:
    """The reverse: gather groups of blocks into staging on the GPU, DMA each run into the arena."""
    all_runs = runs(locations, block_bytes)
    for start, end in groups(len(locations), block_bytes):
        staged = gather(start, end)
        for run in runs_in(all_runs, start, end):
            lo, hi = max(run.first, start), min(run.first + run.count, end)
            dst = arena.view(run, block_bytes)[
                (lo - run.first) * block_bytes : (hi - run.first) * block_bytes
            ]
            dst.copy_(staged[(lo - start) * block_bytes : (hi - start) * block_bytes], non_blocking=True)
        if staged.is_cuda:
            torch.cuda.current_stream().synchronize()  # staging is reused by the next group


_cudart_fns: dict[str, Any] = {}  # functions of the CUDA runtime torch loaded; False where not found


def _cudart(name: str, argtypes: list[Any]) -> Any:
    """A function of the CUDA runtime library torch loaded (torch does not expose every one)."""
    if name not in _cudart_fns:
        _cudart_fns[name] = False
        try:
            with open("/proc/self/maps") as maps:
                paths = [line.split()[-1] for line in maps if "/libcudart.so" in line]
            if paths:
                fn = getattr(ctypes.CDLL(paths[0]), name)
                fn.argtypes = argtypes
                fn.restype = ctypes.c_int
                _cudart_fns[name] = fn
        except (OSError, AttributeError):
            pass
    return _cudart_fns[name]


def _memcpy2d() -> Any:
    size = ctypes.c_size_t
    return _cudart(
        "cudaMemcpy2DAsync",
        [ctypes.c_void_p, size, ctypes.c_void_p, size, size, size, ctypes.c_int, ctypes.c_void_p],
    )


def _clear_cuda_error() -> None:
    """A failed runtime call leaves its error to be reported by the next kernel launch: clear it."""
    fn = _cudart("cudaGetLastError", [])
    if fn:
        fn()


def host_rows_available() -> bool:
    return bool(_memcpy2d())


def host_rows_to_gpu(
    dst: torch.Tensor, src_address: int, src_pitch: int, width: int, rows: int, stream: torch.cuda.Stream
) -> bool:
    """`rows` rows of `width` bytes, `src_pitch` apart in registered host memory, into the contiguous
    rows of `dst` (uint8, on the GPU), as one DMA on `stream`. False where the CUDA runtime's 2-D
    copy is not reachable (the caller copies row by row)."""
    fn = _memcpy2d()
    if not fn:
        return False
    err = fn(dst.data_ptr(), width, src_address, src_pitch, width, rows, _HOST_TO_DEVICE, stream.cuda_stream)
    if err != 0:  # an argument the runtime refuses (nothing was copied): copies row by row from now on
        _cudart_fns["cudaMemcpy2DAsync"] = False
        log.warning("cudaMemcpy2DAsync refused a copy (error %d): layer-wise loads copy block by block", err)
        return False
    return True


def measure_h2d(arena: GpuArena, nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Host->GPU bandwidth (bytes/s) from the registered arena: the ceiling restores are judged by."""
    return measure_h2d_from(max(arena.host.values(), key=lambda t: t.numel()), nbytes, device, repeats)


def measure_h2d_from(source: torch.Tensor, nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Host->GPU bandwidth (bytes/s) of the best of `repeats` copies of `nbytes` from `source`
    (registered host memory: one segment of an arena)."""
    nbytes = min(nbytes, source.numel())
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(source[:nbytes], non_blocking=True)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = 0.0
    for _ in range(repeats):
        start.record()
        dst.copy_(source[:nbytes], non_blocking=True)
        end.record()
        end.synchronize()
        best = max(best, nbytes / (start.elapsed_time(end) / 1e3))
    return best
