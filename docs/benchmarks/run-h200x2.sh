#!/usr/bin/env bash
# The GPU benchmark runs behind docs/benchmarks (two H200s of one host), in the order they ran.
# GPU0: the single-GPU table (16k-410k: recompute modes, kvtier DRAM/NVMe, file peers up to 128k).
# GPU1 at the same time: Qwen2.5-7B at TP=1 in the tensor-parallel model (for TP=1 vs TP=2). The two
# processes share the host: --io-lock serialises their restores and disk reads, so neither is measured
# while the other copies or reads the disk. Then both GPUs: the 70B and Qwen2.5-7B TP=2 groups.
# Usage: run-h200x2.sh OUTDIR
set -u
out=${1:?output folder}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
ttft="python3 -m kvtier.cli bench ttft"
lock=/tmp/kvtier-bench-io.lock
start=$(date +%s)
stage() { echo "[$(($(date +%s) - start))s] $*" >>"$out/stages.log"; }

{ nvidia-smi -L; df -h / /tmp /dev/shm; free -g; nproc; python3 -c 'import torch, transformers, safetensors; print(torch.__version__, transformers.__version__, safetensors.__version__, torch.backends.cudnn.version())'; } >"$out/machine.log" 2>&1

stage "TP=1 on GPU1, table on GPU0"
CUDA_VISIBLE_DEVICES=1 $ttft --tp 1 --shape qwen2.5-7b --tokens 131072,262144,419840 --nvme-tokens 262144 \
    --io-lock $lock --out "$out/ttft-h200-tp1-qwen7b.json" >"$out/tp1.log" 2>&1 &
tp1=$!
CUDA_VISIBLE_DEVICES=0 $ttft --tokens 16384,65536,131072,262144,419840 --peers-upto 131072 --io-lock $lock \
    --out "$out/ttft-h200-16k-410k.json" >"$out/table.log" 2>&1
stage "table rc=$?"
wait $tp1
stage "tp1 rc=$?"
$ttft --tp 2 --shape llama3-70b --tokens 131072 --nvme-tokens 0 --out "$out/ttft-h200-tp2-70b-131k.json" \
    >"$out/tp2-70b.log" 2>&1
stage "tp2 70b rc=$?"
$ttft --tp 2 --shape qwen2.5-7b --tokens 131072,262144,419840 --nvme-tokens 262144 \
    --out "$out/ttft-h200-tp2-qwen7b.json" >"$out/tp2-qwen.log" 2>&1
stage "tp2 qwen rc=$?"
stage ALLDONE
