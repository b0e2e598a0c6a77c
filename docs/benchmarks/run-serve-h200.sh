#!/usr/bin/env bash
# `kvtier bench serve` on one H200. Usage: run-serve-h200.sh probe|full OUTDIR
#   probe: under a minute; decode ms/step at batch 1/4/8/16 and 16k-128k tokens against the HBM read
#          floor, one-shot prefill (warm, and at lengths never seen), restore from DRAM, write-behind.
#   full:  the three policies (recompute, kvtier, kvtier+prefetch) on the default workload, about
#          6-7 minutes; JSON and PNG in OUTDIR, written after each policy (a cut run keeps its part).
set -u
mode=${1:?probe or full}
out=${2:?output folder}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
serve="python3 -m kvtier.cli bench serve"
{ nvidia-smi -L; df -h / /tmp; free -g; nproc; python3 -c 'import torch; print(torch.__version__)'; } >"$out/machine.log" 2>&1
case $mode in
probe) timeout 300 $serve --probe --nvme-path /tmp --out "$out/serve-h200-probe.json" 2>&1 | tee "$out/probe.log" ;;
full) timeout 600 $serve --nvme-path /tmp --out "$out/serve-h200.json" --plot "$out/serve-h200.png" 2>&1 | tee "$out/full.log" ;;
*) echo "mode: probe or full" >&2; exit 2 ;;
esac
