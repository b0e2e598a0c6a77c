# Sourced by the GPU run scripts here, after they set $out: the environment every run uses and its
# progress log ($out/stages.log, one line per step with the seconds since the start).
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 # no NVLink multicast
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1
kv="python3 -m kvtier.cli"
start=$(date +%s)
stage() { echo "[$(($(date +%s) - start))s] $*" >>"$out/stages.log"; }
