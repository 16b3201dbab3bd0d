#!/usr/bin/env bash
# Builds `vqclip` with the `cuda` feature on a machine without the CUDA toolkit (no GPU needed),
# from PyPI's CUDA 13.0 wheels, into target-cuda/release/vqclip (about 17 minutes on 2 cores);
# bench/gpu-prepare.sh then packs it for a GPU host and bench/gpu-check.sh runs there.
#
#   bench/build-cuda.sh                   # compute capability 90 (H100/H200)
#   CUDA_COMPUTE_CAP=80 bench/build-cuda.sh
#   FEATURES=cudnn bench/build-cuda.sh    # convolutions by cuDNN 9 (linked; the host needs it)
#
# Environment: NVCC_ENV (virtualenv for the wheels, default /work/nvcc-env), CUDA_COMPUTE_CAP,
# FEATURES (cuda or cudnn, default cuda), CARGO_TARGET_DIR (default target-cuda).
#
# Why each step: candle-kernels compiles its kernels with nvcc (nvidia-cuda-nvcc, with the
# runtime and CCCL headers); cudarc 0.19 knows toolkits up to 13.4, so a newer nvcc is declared
# as 13.4 (CUDARC_CUDA_VERSION; the driver API is backwards compatible); the binary links
# against libcuda (the driver, which no wheel ships: a stub with cudarc's driver symbols stands
# in, as the toolkit's lib64/stubs would), cuBLAS, cuRAND, NVRTC and the runtime. At run time
# the GPU host's driver and those libraries (PyTorch's CUDA wheels carry them) must be on
# LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC_ENV=${NVCC_ENV:-/work/nvcc-env}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
FEATURES=${FEATURES:-cuda}

if [ ! -x "$NVCC_ENV/bin/pip" ]; then
    python3 -m venv "$NVCC_ENV"
fi
# Every compiler-side wheel pinned to CUDA 13.0, the GPU hosts' driver (580): candle-kernels
# ships PTX that the driver compiles when it loads it, and a driver takes PTX only from
# toolkits up to its own version. Left unpinned, pip mixes in newer nvvm and crt wheels whose
# PTX ptxas 13.0 (and driver 580) reject. CUDA_WHEELS overrides the pins for a newer driver.
CUDA_WHEELS=${CUDA_WHEELS:-"nvidia-cuda-nvcc==13.0.* nvidia-nvvm==13.0.* nvidia-cuda-crt==13.0.*
    nvidia-cuda-cccl==13.0.* nvidia-cuda-runtime==13.0.* nvidia-cuda-nvrtc==13.0.*
    nvidia-cublas==13.0.* nvidia-curand==10.4.0.*"}
# cuDNN 9 for CUDA 13 (what PyTorch's CUDA 13 wheels use); linked, not loaded, by cudarc.
[ "$FEATURES" = cudnn ] && CUDA_WHEELS="$CUDA_WHEELS nvidia-cudnn-cu13==9.*"
# shellcheck disable=SC2086 # the list splits into one argument per wheel
"$NVCC_ENV/bin/pip" install -q $CUDA_WHEELS
CUDA=$(echo "$NVCC_ENV"/lib/python3*/site-packages/nvidia/cu13)
export PATH="$CUDA/bin:$PATH"
case "$(nvcc --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')" in
    13.[5-9]*|1[4-9].*) export CUDARC_CUDA_VERSION=13040 ;;
esac

# Link directory: unversioned names for the wheels' libraries, and the libcuda stub.
LINK="$CARGO_TARGET_DIR/cuda-link"
mkdir -p "$LINK"
CUDARC=$(cargo metadata --format-version 1 --features cuda |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
grep -ohE "fn cu[A-Za-z0-9_]+\(" "$(dirname "$CUDARC")/src/driver/sys/mod.rs" | sed 's/fn //; s/(//' |
    sort -u | awk '{print "void "$1"(void) {}"}' > "$LINK/cuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/cuda_stub.c"
for lib in cublas cublasLt cudart nvrtc; do ln -sf "$CUDA/lib/lib$lib.so.13" "$LINK/lib$lib.so"; done
ln -sf "$(ls "$CUDA"/lib/libcurand.so.* | head -1)" "$LINK/libcurand.so"
if [ "$FEATURES" = cudnn ]; then
    ln -sf "$(ls "$NVCC_ENV"/lib/python3*/site-packages/nvidia/cudnn/lib/libcudnn.so.9 | head -1)" \
        "$LINK/libcudnn.so"
fi
export LIBRARY_PATH="$(realpath "$LINK")${LIBRARY_PATH:+:$LIBRARY_PATH}"

cargo build --release --features "$FEATURES"
echo "built $CARGO_TARGET_DIR/release/vqclip ($FEATURES, compute capability $CUDA_COMPUTE_CAP); next: bench/gpu-prepare.sh"
