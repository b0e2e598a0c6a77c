"""`kvtier bench nixl-gpu`: KV blocks from host DRAM into GPU memory through NIXL (UCX with CUDA
support) against the copy path the engine connectors use today, for the same blocks, on one GPU.

The host side is what an engine sees: an anonymous mapping registered with CUDA (cudaHostRegister,
as `GpuArena` does with the agent's segments), filled with random bytes and cut into equal blocks.
Request block j moves from arena block order[j] to VRAM slot order[j], in two layouts: `adjacent`
(order = identity: the connectors and NIXL merge neighbours into a few large DMAs) and `shuffled`
(order = a permutation: no two neighbours, one DMA per block on the host side, as in a fragmented
arena and a scattered page table). Paths timed, best of --repeats each, bytes checked after each:

- `torch_one_copy`: one copy of the whole buffer (adjacent only): the host->GPU ceiling.
- `connector`: `kvtier.agent.connectors.gpu.host_to_gpu`, the restore path of the HF and vLLM
  connectors (runs merged, 256 MiB staging groups on a copy stream, scattered on the GPU).
- `nixl_write` / `nixl_read`: two NIXL agents in one process, one with the arena registered as DRAM,
  one with the VRAM buffer registered as VRAM; one transfer of one descriptor per block (the lists
  prepared once, `make_prepped_xfer` per repeat), polled to completion. WRITE is posted by the DRAM
  side, READ by the VRAM side (the peer-fetch direction).

NIXL runs in a child process (a crash or hang in native code is a recorded failure, not a lost run;
the connector numbers are measured either way). --wheels unpacks NIXL wheels into a temporary
folder on that child's PYTHONPATH, only when NIXL is not importable. Results: <out>/nixl-gpu.json, rewritten after
every step.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
LAYOUTS = ("adjacent", "shuffled")


# ------------------------------------------------------------------------------- shared parts


def _host_and_device(nbytes: int, seed: int) -> tuple[Any, Any, Any, mmap.mmap]:
    """A CUDA-registered anonymous mapping of random bytes, its tensor, and a VRAM buffer as large."""
    import torch

    mm = mmap.mmap(-1, nbytes)
    host = torch.frombuffer(mm, dtype=torch.uint8)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    chunk = 256 * MiB
    for lo in range(0, nbytes, chunk):  # random bytes made on the GPU, 256 MiB at a time
        hi = min(nbytes, lo + chunk)
        host[lo:hi].copy_(torch.randint(0, 256, (hi - lo,), dtype=torch.uint8, device="cuda", generator=gen))
    err = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed ({err})")
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return host, device, torch.cuda.cudart(), mm


def _slots(nblocks: int, layout: str, seed: int) -> list[int]:
    """slots[j]: the arena block that request block j comes from, and the VRAM slot it goes to."""
    import random

    order = list(range(nblocks))
    if layout == "shuffled":
        random.Random(seed).shuffle(order)
    return order


def _same(host: Any, device: Any) -> bool:
    """Every arena block arrived in the VRAM slot of the same number (compared on the GPU, 256 MiB
    at a time)."""
    import torch

    chunk = 256 * MiB
    for lo in range(0, host.numel(), chunk):
        hi = min(host.numel(), lo + chunk)
        if not torch.equal(device[lo:hi], host[lo:hi].to("cuda")):
            return False
    return True


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2)


# ------------------------------------------------------------------------- today's copy path


def _time_torch(nbytes: int, block: int, repeats: int, seed: int) -> list[dict[str, Any]]:
    import torch

    from kvtier.agent.connectors.gpu import GpuArena, Staging, host_to_gpu

    host, device, cudart, _mm = _host_and_device(nbytes, seed)
    nblocks = nbytes // block
    rows: list[dict[str, Any]] = []
    arena = GpuArena(None, pin=False)  # type: ignore[arg-type]  # registered above, as sync() does
    arena.host[0] = host
    try:
        staging = Staging(torch.device("cuda"))
        best = float("inf")
        for _ in range(repeats):
            device.zero_()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            device.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        rows.append(
            {"path": "torch_one_copy", "layout": "adjacent", "gbps": _gbps(nbytes, best), "seconds": round(best, 4),
             "bytes_ok": _same(host, device)}
        )  # fmt: skip
        for layout in LAYOUTS:
            slots = _slots(nblocks, layout, seed)
            index = torch.tensor(slots, dtype=torch.long, device="cuda")
            locations = [(0, s * block) for s in slots]  # request block j: arena block slots[j]
            dev = device.view(nblocks, block)

            def scatter(first: int, staged: Any, dev: Any = dev, index: Any = index) -> None:
                # request block j -> VRAM slot slots[j] (the engine's page table)
                n = staged.numel() // block
                dev.index_copy_(0, index[first : first + n], staged.view(n, block))

            best = float("inf")
            for _ in range(repeats):
                device.zero_()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                host_to_gpu(arena, locations, block, scatter, staging)
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            rows.append(
                {"path": "connector", "layout": layout, "gbps": _gbps(nbytes, best), "seconds": round(best, 4),
                 "bytes_ok": _same(host, device)}
            )  # fmt: skip
        return rows
    finally:
        cudart.cudaHostUnregister(host.data_ptr())
        arena.host.clear()
        del host, device, arena
        torch.cuda.empty_cache()  # the mapping goes with the last tensor that views it


# ----------------------------------------------------------------------------------- NIXL (child)


def _wait(agent: Any, handle: Any, deadline: float) -> str:
    state = agent.check_xfer_state(handle)
    while state == "PROC" and time.monotonic() < deadline:
        state = agent.check_xfer_state(handle)
    return state


def _time_nixl(nbytes: int, block: int, repeats: int, seed: int, out_path: Path) -> dict[str, Any]:
    """Child process: NIXL DRAM->VRAM for both layouts, WRITE and READ; what it has so far is in
    `out_path` after every step (a crash or a hang later keeps it)."""
    import torch

    from kvtier.agent.transports.nixl import load_nixl

    module, version = load_nixl()
    torch.cuda.set_device(0)
    torch.cuda.init()
    out: dict[str, Any] = {
        "nixl": version,
        "ucx_env": {k: v for k, v in os.environ.items() if k.startswith("UCX_")},
        "stage": "buffers",
    }

    def save(stage: str) -> None:
        out["stage"] = stage
        out_path.write_text(json.dumps(out))

    save("buffers")
    host, device, cudart, _mm = _host_and_device(nbytes, seed)
    nblocks = nbytes // block
    rows: list[dict[str, Any]] = []
    out["rows"] = rows
    config = module.nixl_agent_config(backends=["UCX"])
    save("NIXL agents and registration (DRAM, VRAM)")
    t0 = time.perf_counter()
    dram_side = module.nixl_agent("kvtier-dram", config)
    vram_side = module.nixl_agent("kvtier-vram", config)
    out["plugins"] = list(dram_side.get_plugin_list())
    dram_reg = dram_side.register_memory([(host.data_ptr(), nbytes, 0, "")], "DRAM")
    vram_reg = vram_side.register_memory([(device.data_ptr(), nbytes, 0, "")], "VRAM")
    dram_side.add_remote_agent(vram_side.get_agent_metadata())
    vram_side.add_remote_agent(dram_side.get_agent_metadata())
    out["setup_seconds"] = round(time.perf_counter() - t0, 3)
    try:
        for layout in LAYOUTS:
            slots = _slots(nblocks, layout, seed)
            host_descs = [(host.data_ptr() + s * block, block, 0) for s in slots]
            vram_descs = [(device.data_ptr() + s * block, block, 0) for s in slots]
            for op in ("WRITE", "READ"):
                # WRITE: posted by the DRAM side, its local list is DRAM; READ: posted by the VRAM side
                poster, peer = (dram_side, "kvtier-vram") if op == "WRITE" else (vram_side, "kvtier-dram")
                mine, theirs = (host_descs, vram_descs) if op == "WRITE" else (vram_descs, host_descs)
                mine_t, theirs_t = ("DRAM", "VRAM") if op == "WRITE" else ("VRAM", "DRAM")
                row: dict[str, Any] = {"path": f"nixl_{op.lower()}", "layout": layout}
                save(f"{row['path']} {layout}")
                try:
                    t1 = time.perf_counter()
                    local = poster.prep_xfer_dlist("NIXL_INIT_AGENT", mine, mine_t)
                    remote = poster.prep_xfer_dlist(peer, theirs, theirs_t)
                    indices = list(range(nblocks))
                    row["prep_seconds"] = round(time.perf_counter() - t1, 4)
                    best, post_best = float("inf"), float("inf")
                    for _ in range(repeats):
                        device.zero_()
                        torch.cuda.synchronize()
                        t2 = time.perf_counter()
                        handle = poster.make_prepped_xfer(op, local, indices, remote, indices)
                        state = poster.transfer(handle)
                        t3 = time.perf_counter()
                        if state != "ERR":
                            state = _wait(poster, handle, time.monotonic() + 30)
                        seconds = time.perf_counter() - t2
                        poster.release_xfer_handle(handle)
                        if state != "DONE":
                            raise RuntimeError(f"transfer ended in state {state}")
                        best, post_best = min(best, seconds), min(post_best, t3 - t2)
                        if seconds > 5:  # a slow path is measured once: the run has minutes, not hours
                            break
                    torch.cuda.synchronize()
                    row.update(
                        gbps=_gbps(nbytes, best),
                        seconds=round(best, 4),
                        post_seconds=round(post_best, 4),
                        bytes_ok=_same(host, device),
                    )
                    poster.release_dlist_handle(local)
                    poster.release_dlist_handle(remote)
                except Exception as exc:  # one path failing leaves the others measured
                    row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                save("done" if len(rows) == 2 * len(LAYOUTS) else "between paths")
                print(json.dumps(row), flush=True)
    finally:
        dram_side.deregister_memory(dram_reg)
        vram_side.deregister_memory(vram_reg)
        cudart.cudaHostUnregister(host.data_ptr())
    return out


def _child_main(argv: list[str]) -> int:
    nbytes, block, repeats, seed, out = int(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]), Path(argv[4])
    try:
        result = _time_nixl(nbytes, block, repeats, seed, out)
    except Exception as exc:
        result = json.loads(out.read_text()) if out.exists() else {}
        result["error"] = f"{type(exc).__name__} during {result.get('stage', 'start')}: {exc}"
    out.write_text(json.dumps(result))
    return 0


def _nixl_path(wheels: str | None, scratch: Path) -> tuple[str | None, str]:
    """A PYTHONPATH entry holding NIXL (None: already importable), and how it was found."""
    probe = subprocess.run(
        [sys.executable, "-c", "from kvtier.agent.transports.nixl import load_nixl; print(load_nixl()[1])"],
        capture_output=True,
        text=True,
    )
    if probe.returncode == 0:
        return None, f"installed ({probe.stdout.strip()})"
    if not wheels:
        return None, "not importable and no --wheels given: " + (probe.stderr.strip().splitlines() or ["?"])[
            -1
        ]
    found = sorted(Path(wheels).glob("*.whl"))
    if not found:
        return None, f"not importable and no wheel in {wheels}"
    target = scratch / "site"
    for wheel in found:  # a wheel is a zip of the installed tree: unpacked, it imports (no pip needed)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    return str(target), f"from {', '.join(w.name for w in found)}"


def _run_child(
    nbytes: int, block: int, repeats: int, seed: int, site: str | None, scratch: Path, timeout: float
):
    out = scratch / f"nixl-{nbytes}.json"
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = os.pathsep.join([site, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "kvtier.bench.nixlgpu", "--child", str(nbytes), str(block), str(repeats),
           str(seed), str(out)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        log, failure = proc.stdout + proc.stderr, f"NIXL child died (exit {proc.returncode})"
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed it
        log, failure = _text(exc.stdout) + _text(exc.stderr), f"NIXL child timed out after {timeout:.0f} s"
    result = json.loads(out.read_text()) if out.exists() else {}
    if result.get("stage") != "done" and "error" not in result:
        result["error"] = f"{failure} during {result.get('stage', 'start')}"
    result["log_tail"] = log[-3000:]
    return result


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def main(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError as exc:
        print(f"kvtier bench nixl-gpu: needs torch with CUDA ({exc})", file=sys.stderr)
        return 2
    folder = Path(args.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "nixl-gpu.json"
    if not torch.cuda.is_available():
        print("kvtier bench nixl-gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    block = int(args.block_mib * MiB)
    sizes = [int(float(g) * GiB) // block * block for g in args.gib.split(",")]
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="kvtier-nixl-gpu-"))
    site, nixl_found = _nixl_path(args.wheels, scratch)
    report: dict[str, Any] = {
        "command": "kvtier bench nixl-gpu " + " ".join(getattr(args, "argv_echo", [])),
        "machine": {
            "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "block_bytes": block,
        "nixl_found": nixl_found,
        "sizes": [],
    }
    print(f"NIXL: {nixl_found}", flush=True)

    def save() -> None:
        path.write_text(json.dumps(report, indent=2) + "\n")

    for nbytes in sizes:
        left = args.minutes * 60 - (time.monotonic() - started)
        if left < 30:
            report.setdefault("skipped", []).append(nbytes)
            continue
        entry: dict[str, Any] = {"bytes": nbytes, "blocks": nbytes // block}
        report["sizes"].append(entry)
        try:
            entry["rows"] = _time_torch(nbytes, block, args.repeats, args.seed)
        except Exception as exc:
            entry["rows"] = []
            entry["torch_error"] = f"{type(exc).__name__}: {exc}"
        for row in entry["rows"]:
            print(json.dumps({"bytes": nbytes, **row}), flush=True)
        save()
        nixl = _run_child(nbytes, block, args.repeats, args.seed, site, scratch, min(left - 10, 300))
        entry["nixl"] = {k: v for k, v in nixl.items() if k != "rows"}
        if "error" in nixl:
            print(f"NIXL at {nbytes / GiB:g} GiB failed: {nixl['error']}", flush=True)
        for row in nixl.get("rows", []):
            entry["rows"].append(row)
            print(json.dumps({"bytes": nbytes, **row}), flush=True)
        entry["verdict"] = _verdict(entry["rows"])
        print(f"{nbytes / GiB:g} GiB: {entry['verdict']}", flush=True)
        save()
    report["verdict"] = [e.get("verdict") for e in report["sizes"]]
    save()
    print(f"wrote {path}")
    return 0


def _verdict(rows: list[dict[str, Any]]) -> str:
    """Per layout: the faster of today's connector path and NIXL's best, with the ratio."""
    parts = []
    for layout in LAYOUTS:
        ok = [r for r in rows if r.get("layout") == layout and r.get("bytes_ok") and "gbps" in r]
        ours = [r for r in ok if r["path"] == "connector"]
        nixl = [r for r in ok if r["path"].startswith("nixl")]
        if not ours:
            parts.append(f"{layout}: connector path not measured")
            continue
        if not nixl:
            parts.append(f"{layout}: NIXL did not complete (connector {ours[0]['gbps']} GB/s)")
            continue
        best = max(nixl, key=lambda r: r["gbps"])
        ratio = best["gbps"] / ours[0]["gbps"]
        winner = best["path"] if ratio > 1 else "connector"
        parts.append(
            f"{layout}: {winner} faster (NIXL {best['path']} {best['gbps']} GB/s vs connector "
            f"{ours[0]['gbps']} GB/s, x{ratio:.2f})"
        )
    return "; ".join(parts)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(_child_main(sys.argv[2:]))
    from kvtier.cli import main as cli

    sys.exit(cli(["bench", "nixl-gpu", *sys.argv[1:]]))
