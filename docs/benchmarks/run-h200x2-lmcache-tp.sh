#!/usr/bin/env bash
# The third two-H200 run behind docs/benchmarks, in one command:
# 1. LMCache built from its source distribution against the machine's torch (detached, on the host's
#    CPUs), while GPU0 runs the vLLM connector's worker-side loads (`bench vllm-worker`) and GPU1 the
#    CUDA tests of the copy paths (the HF connector's restore, the paged copies).
# 2. Once LMCache is built (or has failed): the TTFT benchmark with LMCache as a peer on GPU0, and
#    LMCache peer's CUDA test on GPU1.
# 3. The TP=2 groups on both GPUs, with nothing else running on the host: the 70B shape at 131k,
#    then Qwen2.5-7B at 131k, 262k and 410k (NVMe at 262k); each times one-shot and chunked prefill.
# Every ratio is against a floor measured in the same process at the same time.
# SKIP_WORKER=1 leaves out the vLLM worker benchmark.
# Usage: run-h200x2-lmcache-tp.sh OUTDIR WHEELS  (WHEELS/15: LMCache's sdist and the wheels it lacks),
# from the repository root with kvtier importable. Progress: OUTDIR/stages.log.
set -u
out=${1:?output folder}
wheels=$(cd "${2:?wheels folder}" && pwd)
lm="/tmp/lmcache"
. "$(dirname "$0")/run-common.sh"

{
    nvidia-smi -L
    nvidia-smi topo -m
    for g in /sys/bus/pci/drivers/nvidia/0000:*; do echo "$(basename "$g") numa_node=$(cat "$g/numa_node")"; done
    lscpu | grep -i -E 'model name|numa|socket'
    df -h / /tmp /dev/shm
    free -g
    python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__)'
} >"$out/machine.log" 2>&1

stage "lmcache build started; vllm-worker on GPU0, CUDA tests on GPU1"
MAX_JOBS=${LMCACHE_JOBS:-24} bash bench/lmcache-build.sh start "$wheels/15" "$lm" >"$out/lmcache-start.log" 2>&1
worker=
if [ "${SKIP_WORKER:-0}" != 1 ]; then
    CUDA_VISIBLE_DEVICES=0 timeout 240 $kv bench vllm-worker "$out" --tokens 16384,65536,131072 \
        >"$out/vllm-worker.log" 2>&1 &
    worker=$!
fi
CUDA_VISIBLE_DEVICES=1 timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu \
    tests/torch/test_paged_copies.py tests/torch/test_hf_connector_cpu.py >"$out/gpu-tests.log" 2>&1
stage "gpu tests rc=$?"
[ -z "$worker" ] || { wait "$worker"; stage "vllm-worker rc=$?"; }

for _ in $(seq 1 "${LMCACHE_WAIT_S:-900}"); do
    bash bench/lmcache-build.sh status "$lm" 2>/dev/null | head -1 | grep -q -E 'status: (ok|failed)' && break
    sleep 1
done
bash bench/lmcache-build.sh status "$lm" >"$out/lmcache-status.log" 2>&1
cp "$lm/build.log" "$out/lmcache-build.log" 2>/dev/null
stage "lmcache build: $(head -1 "$out/lmcache-status.log")"
with_lmcache="$lm/site:$lm/deps:${PYTHONPATH:-}"
CUDA_VISIBLE_DEVICES=1 PYTHONPATH="$with_lmcache" timeout 300 \
    python3 -m pytest -q -p no:cacheprovider tests/torch/test_lmcache_peer.py >"$out/lmcache-tests.log" 2>&1 &
lmtests=$!
CUDA_VISIBLE_DEVICES=0 PYTHONPATH="$with_lmcache" timeout "${TTFT_S:-480}" \
    $kv bench ttft --tokens 16384,131072 --prefill one-shot \
    --out "$out/ttft-h200-lmcache.json" >"$out/ttft-lmcache.log" 2>&1
stage "ttft with lmcache rc=$?"
wait $lmtests
stage "lmcache tests rc=$?"

$kv bench ttft --tp 2 --shape llama3-70b --tokens 131072 --nvme-tokens 0 \
    --out "$out/ttft-h200-tp2-70b-131k.json" >"$out/tp2-70b.log" 2>&1
stage "tp2 70b rc=$?"
$kv bench ttft --tp 2 --shape qwen2.5-7b --tokens 131072,262144,419840 --nvme-tokens 262144 \
    --out "$out/ttft-h200-tp2-qwen7b.json" >"$out/tp2-qwen.log" 2>&1
stage "tp2 qwen rc=$?"
stage ALLDONE
