#!/usr/bin/env bash
# Build LMCache from its source distribution against the torch already installed (its PyPI wheels are
# built against another torch, and their CUDA ops then do not load), for the TTFT benchmark's LMCache
# peer. No network needed: the sdist and the wheels of the runtime dependencies the machine lacks lie
# in one folder.
#
#   bench/lmcache-build.sh build WHEELS OUT   build in the foreground (a few minutes with nvcc, sm_90)
#   bench/lmcache-build.sh start WHEELS OUT   the same, detached (its own session), log in OUT/build.log
#   bench/lmcache-build.sh status OUT         running / ok / failed, and the log's tail
#   bench/lmcache-build.sh check OUT          does lmcache import, and do its CUDA ops load?
#   bench/lmcache-build.sh pack OUT TARBALL   the built package and its dependencies in one file (debug
#                                             symbols stripped), to unpack into OUT on another machine
#                                             with the same torch: tar xzf TARBALL -C OUT
#
# Afterwards: PYTHONPATH=OUT/site:OUT/deps (the built package, and the dependencies it imports).
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default: cores).
set -euo pipefail

# The interpreter that holds torch, by its path: PATH changes below must not swap it for another
# python3 (a virtualenv's python3 links to the system's, which has no torch)
PYTHON=$(command -v "${PYTHON:-python3}")
PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" # absolute, links kept: the build cds
cmd=${1:?usage: $0 build|start|status|check|pack ...}

abs() { mkdir -p "$1" && cd "$1" && pwd; }

# the first file matching a pattern in the nvidia/ folder that pip's CUDA wheels install next to torch
# (empty when none): nvidia/cu13/bin/nvcc, nvidia/cu13/lib/libcudart.so.13
next_to_torch() {
    "$PYTHON" -c 'import glob, site, sys; print(([f for p in site.getsitepackages() for f in glob.glob(p + "/nvidia/" + sys.argv[1])] or [""])[0])' "$1"
}

check() {
    local out=$1
    PYTHONPATH="$out/site:$out/deps${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - <<'EOF'
import json, sys
import torch
report = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
import lmcache
report["lmcache"] = getattr(lmcache, "__version__", "?")
report["lmcache_file"] = lmcache.__file__
import lmcache.cuda_ops as ops  # the compiled CUDA extension; raises if it does not load
report["cuda_ops"] = ops.__file__
report["cuda_ops_functions"] = len([n for n in dir(ops) if not n.startswith("_")])
import lmcache.lmcache_native as native
report["lmcache_native"] = native.__file__
from lmcache.v1.cache_engine import LMCacheEngineBuilder  # the path the benchmark uses
from lmcache.v1.gpu_connector.gpu_connectors import VLLMPagedMemGPUConnectorV2
print(json.dumps(report, indent=1))
print("LMCACHE CHECK OK")
EOF
}

case $cmd in
build)
    wheels=$(abs "${2:?wheels folder}")
    out=$(abs "${3:?output folder}")
    sdist=$(ls "$wheels"/lmcache-*.tar.gz | head -1)
    echo "== $(date -u +%FT%TZ) building $(basename "$sdist") into $out"
    "$PYTHON" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
    # nvcc from the CUDA toolkit; ninja (parallel compiles) from the Python environment's own bin
    for d in /usr/local/cuda/bin /usr/local/cuda-13*/bin; do [ -x "$d/nvcc" ] && PATH="$PATH:$d"; done
    if ! command -v nvcc >/dev/null; then # a toolkit from pip (nvidia/cu13/bin/nvcc next to torch)
        d=$(next_to_torch "*/bin/nvcc")
        [ -n "$d" ] && PATH="$PATH:$(dirname "$d")"
    fi
    PATH="$(dirname "$PYTHON"):$PATH"
    export PATH
    echo "ninja: $(command -v ninja || echo 'not found: compiles run one at a time')"
    if [ "${NO_GPU_EXT:-0}" != 1 ]; then # NO_GPU_EXT=1: LMCache's C++ extensions only (no CUDA ops)
        command -v nvcc >/dev/null || { echo "nvcc not found: LMCache's CUDA profile needs it"; exit 1; }
        nvcc --version | tail -2
        export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
        export BUILD_WITH_CUDA=1
    fi
    rm -rf "$out/src" "$out/site" "$out/deps" "$out/buildtools" "$out/cudalink"
    mkdir -p "$out/src" "$out/site" "$out/deps" "$out/buildtools"
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    if [ "${NO_GPU_EXT:-0}" != 1 ]; then
        # fail in a second, not after minutes of compiling: a toolkit assembled from pip wheels can pair
        # nvcc with a newer nvvm whose PTX its ptxas rejects ("Unsupported .version")
        mkdir -p "$out/cudalink"
        echo '__global__ void probe(int *p) { *p = 1; }' >"$out/cudalink/probe.cu"
        for arch in ${TORCH_CUDA_ARCH_LIST//;/ }; do
            arch=${arch%+PTX}
            arch=${arch//./}
            nvcc -c "$out/cudalink/probe.cu" -o "$out/cudalink/probe.o" -gencode="arch=compute_$arch,code=sm_$arch" || {
                echo "nvcc cannot compile a trivial kernel for sm_$arch: fix the CUDA toolkit first"
                exit 1
            }
        done
        # the extension links with -lcudart; pip's CUDA runtime wheel ships only libcudart.so.13
        # (no development symlink), so give the linker one (the built module still needs .so.13,
        # which torch loads first); the toolkit's own, else the one next to torch
        if ! ls "$CUDA_HOME"/lib64/libcudart.so "$CUDA_HOME"/lib/libcudart.so >/dev/null 2>&1; then
            cudart=$(ls "$CUDA_HOME"/lib*/libcudart.so.[0-9]* 2>/dev/null | head -1 || true)
            [ -n "$cudart" ] || cudart=$(next_to_torch "*/lib/libcudart.so.[0-9]*")
            [ -n "$cudart" ] || { echo "no libcudart.so under $CUDA_HOME/lib64, $CUDA_HOME/lib or next to torch"; exit 1; }
            ln -s "$cudart" "$out/cudalink/libcudart.so"
            export LDFLAGS="-L$out/cudalink${LDFLAGS:+ $LDFLAGS}"
            echo "linking against $cudart"
        fi
    fi
    tar xzf "$sdist" -C "$out/src"
    src=$(ls -d "$out"/src/lmcache-*)
    # build-only tools the machine lacks (setuptools_scm reads the version from the sdist's PKG-INFO),
    # and setuptools itself where the machine's is outside the range LMCache builds with (>=77,<81)
    tools=("$wheels"/setuptools_scm-*.whl "$wheels"/vcs_versioning-*.whl)
    if ! "$PYTHON" -c 'import setuptools, sys; v = tuple(int(x) for x in setuptools.__version__.split(".")[:2]); sys.exit(not (77, 0) <= v < (81, 0))'; then
        tools+=("$wheels"/setuptools-*.whl)
    fi
    "$PYTHON" -m pip install -q --no-deps --no-index --target "$out/buildtools" "${tools[@]}"
    PYTHONPATH="$out/buildtools" "$PYTHON" -c 'import setuptools, setuptools_scm; print("setuptools", setuptools.__version__, setuptools.__file__)'
    # the runtime dependencies LMCache imports that the machine lacks
    deps=$(ls "$wheels"/*.whl | grep -v -e setuptools_scm- -e vcs_versioning- -e /setuptools- || true)
    [ -z "$deps" ] || "$PYTHON" -m pip install -q --no-deps --no-index --target "$out/deps" $deps
    # `build_ext --inplace` compiles the extensions (lmcache.cuda_ops, lmcache_native, lmcache_fs,
    # lmcache_redis) without the wheel's build_py step, which generates gRPC stubs for the
    # multi-process server (grpc_tools) that the in-process engine does not use.
    cd "$src"
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    export ENABLE_CXX11_ABI=1
    echo "== TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-}"
    t0=$(date +%s)
    PYTHONPATH="$out/buildtools" "$PYTHON" setup.py build_ext --inplace
    echo "== compiled in $(($(date +%s) - t0)) s"
    cp -r "$src/lmcache" "$out/site/"
    ls -la "$out/site" "$out/site/lmcache"/*.so
    check "$out"
    echo ok >"$out/build.status"
    ;;
start)
    wheels=$(abs "${2:?wheels folder}")
    out=$(abs "${3:?output folder}")
    echo running >"$out/build.status"
    setsid nohup bash -c "'$0' build '$wheels' '$out' || echo failed >'$out/build.status'" \
        >"$out/build.log" 2>&1 </dev/null &
    echo "building in the background (pid $!): $0 status $out"
    ;;
status)
    out=${2:?output folder}
    echo "status: $(cat "$out/build.status" 2>/dev/null || echo none)"
    tail -n "${TAIL:-30}" "$out/build.log" 2>/dev/null || true
    ;;
check)
    check "$(abs "${2:?output folder}")"
    ;;
pack)
    out=$(abs "${2:?output folder}")
    tarball=${3:?tarball}
    find "$out/site" "$out/deps" -name '*.so' -exec strip --strip-debug {} +
    tar czf "$tarball" -C "$out" site deps
    ls -la "$tarball"
    ;;
*)
    echo "usage: $0 build|start|status|check|pack ..." >&2
    exit 2
    ;;
esac
