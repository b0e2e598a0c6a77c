#!/usr/bin/env bash
# The GPU benchmark runs behind docs/benchmarks (two H200s of one host), in the order they ran.
# GPU0: the single-GPU table (16k-410k: every recompute mode, kvtier DRAM/NVMe, file peers up to 256k),
#       then whatever GPU0_AFTER names (the short GPU checks of the other benchmarks).
# GPU1 at the same time: the 1.01M-token row (chunked prefill, DRAM and NVMe restores).
# The two processes share the host: --io-lock serialises their restores and disk reads, so neither
# is measured while the other copies or reads the disk. Then both GPUs: the 70B and Qwen2.5-7B TP=2
# groups (their TP=1 counterpart is the table's rows of the same shape, run on this machine above).
# Usage: run-h200x2.sh OUTDIR  (from the repository root, PYTHONPATH holding kvtier)
set -u
out=${1:?output folder}
lock=/tmp/kvtier-bench-io.lock
. "$(dirname "$0")/run-common.sh"
ttft="$kv bench ttft"

{ nvidia-smi -L; df -h / /tmp /dev/shm; free -g; nproc; python3 -c 'import torch, transformers, safetensors; print(torch.__version__, transformers.__version__, safetensors.__version__, torch.backends.cudnn.version())'; } >"$out/machine.log" 2>&1

stage "1.01M on GPU1, table on GPU0"
CUDA_VISIBLE_DEVICES=1 $ttft --tokens 1015808 --no-peers --io-lock $lock \
    --out "$out/ttft-h200-1m.json" >"$out/1m.log" 2>&1 &
million=$!
CUDA_VISIBLE_DEVICES=0 $ttft --tokens 16384,65536,131072,262144,419840 --chunked-upto 419840 \
    --peers-upto 262144 --io-lock $lock --out "$out/ttft-h200-16k-410k.json" >"$out/table.log" 2>&1
stage "table rc=$?"
if [ -n "${GPU0_AFTER:-}" ]; then
    CUDA_VISIBLE_DEVICES=0 flock $lock bash -c "$GPU0_AFTER" >"$out/gpu0-after.log" 2>&1
    stage "gpu0-after rc=$?"
fi
wait $million
stage "1.01M rc=$?"
$ttft --tp 2 --shape llama3-70b --tokens 131072 --nvme-tokens 0 --out "$out/ttft-h200-tp2-70b-131k.json" \
    >"$out/tp2-70b.log" 2>&1
stage "tp2 70b rc=$?"
$ttft --tp 2 --shape qwen2.5-7b --tokens 131072,262144,419840 --nvme-tokens 262144 \
    --out "$out/ttft-h200-tp2-qwen7b.json" >"$out/tp2-qwen.log" 2>&1
stage "tp2 qwen rc=$?"
stage ALLDONE
