#!/usr/bin/env bash
# The second two-H200 run behind docs/benchmarks, in one command:
# GPU1: `kvtier bench serve` (the three policies on the default workload).
# GPU0, one after another: the vLLM connector's worker-side loads (`bench vllm-worker`), NIXL
#       DRAM->VRAM against the connectors' copy (`bench nixl-gpu`), then the TTFT benchmark with
#       LMCache as a peer once LMCache has been built from source on the host's CPUs (started first,
#       detached), then the CUDA tests of the paged copies and of the LMCache peer.
# The two GPUs' work shares the host (memory bandwidth, CPUs): every ratio below is against a floor
# measured in the same process at the same time, and the docs say where sharing may have cost.
# Usage: run-h200x2-checks.sh OUTDIR WHEELS (WHEELS/15: LMCache's sdist and the wheels it lacks;
# WHEELS/17: the NIXL wheel), from the repository root with kvtier importable.
set -u
out=${1:?output folder}
wheels=$(cd "${2:?wheels folder}" && pwd)
. "$(dirname "$0")/run-common.sh"
left() { echo $((${BUDGET_S:-450} - ($(date +%s) - start))); }

{ nvidia-smi -L; df -h / /tmp; free -g; nproc; python3 -c 'import torch; print(torch.__version__)'; } >"$out/machine.log" 2>&1
stage "lmcache build started; serve on GPU1"
MAX_JOBS=${LMCACHE_JOBS:-20} bash bench/lmcache-build.sh start "$wheels/15" /tmp/lmcache >"$out/lmcache-start.log" 2>&1
CUDA_VISIBLE_DEVICES=1 timeout $(($(left) - 15)) $kv bench serve --nvme-path /tmp ${SERVE_ARGS:-} \
    --out "$out/serve-h200.json" --plot "$out/serve-h200.png" >"$out/serve.log" 2>&1 &
serve=$!

CUDA_VISIBLE_DEVICES=0 timeout 150 $kv bench vllm-worker "$out" --tokens 16384,65536,131072 >"$out/vllm-worker.log" 2>&1
stage "vllm-worker rc=$?"
CUDA_VISIBLE_DEVICES=0 timeout 150 $kv bench nixl-gpu "$out" --wheels "$wheels/17" --gib 1,4 --minutes 2 >"$out/nixl-gpu.log" 2>&1
stage "nixl-gpu rc=$?"
for _ in $(seq 1 60); do
    bash bench/lmcache-build.sh status /tmp/lmcache 2>/dev/null | head -1 | grep -q -E 'status: (ok|failed)' && break
    sleep 3
done
bash bench/lmcache-build.sh status /tmp/lmcache >"$out/lmcache-status.log" 2>&1
cp /tmp/lmcache/build.log "$out/lmcache-build.log" 2>/dev/null
stage "lmcache build: $(head -1 "$out/lmcache-status.log")"
CUDA_VISIBLE_DEVICES=0 PYTHONPATH="/tmp/lmcache/site:/tmp/lmcache/deps:${PYTHONPATH:-}" timeout $(($(left) - 40)) \
    $kv bench ttft --tokens 16384,131072 --prefill one-shot \
    --out "$out/ttft-h200-lmcache.json" >"$out/ttft-lmcache.log" 2>&1
stage "ttft with lmcache rc=$?"
CUDA_VISIBLE_DEVICES=0 PYTHONPATH="/tmp/lmcache/site:/tmp/lmcache/deps:${PYTHONPATH:-}" timeout $(($(left) - 10)) \
    python3 -m pytest -q -p no:cacheprovider tests/torch/test_paged_copies.py tests/torch/test_lmcache_peer.py >"$out/gpu-tests.log" 2>&1
stage "gpu tests rc=$?"
wait $serve
stage "serve rc=$?"
stage ALLDONE
