#!/usr/bin/env bash
# Packs what bench/gpu-check.sh needs on a GPU host that has no Rust toolchain and no internet
# into .gpu/ (ignored by git; carry it along with the repository, 64 MiB at most):
#
#   .gpu/vqclip.xz        the CUDA build (bench/build-cuda.sh), stripped and xz-compressed
#                         (about 88 MB stripped, 14 MB compressed; gzip made 26)
#   .gpu/vqclip-cudnn.xz  with CUDNN_BINARY=path: a FEATURES=cudnn build too, measured beside
#   .gpu/reference/       the PyTorch reference (../shared/reference: bench.py, vqclip_ref.py,
#                         gpu_ref.sh) and, in pydeps/, the two pure-Python packages it needs
#                         that such a host lacks (taming-transformers' modules, einops)
#
#   bench/gpu-prepare.sh [BINARY]     # default target-cuda/release/vqclip
#   CUDNN_BINARY=target-cuda/vqclip-cudnn bench/gpu-prepare.sh target-cuda/vqclip-cuda
#
# The parity cases travel with the repository (tests/fixtures/parity).
set -euo pipefail
cd "$(dirname "$0")/.."

BINARY=${1:-target-cuda/release/vqclip}
REFERENCE=${REFERENCE:-../shared/reference}
PIP=${PIP:-pip3}
[ -x "$BINARY" ] || { echo "no CUDA build at $BINARY: run bench/build-cuda.sh first" >&2; exit 1; }
for f in bench.py vqclip_ref.py gpu_ref.sh; do
    [ -f "$REFERENCE/$f" ] || { echo "no $REFERENCE/$f (set REFERENCE)" >&2; exit 1; }
done

rm -rf .gpu && mkdir -p .gpu/reference/pydeps
pack() {
    strip -o ".gpu/$2" "$1"
    xz -9e -T0 ".gpu/$2"
}
pack "$BINARY" vqclip
if [ -n "${CUDNN_BINARY:-}" ]; then
    pack "$CUDNN_BINARY" vqclip-cudnn
fi
cp "$REFERENCE"/bench.py "$REFERENCE"/vqclip_ref.py "$REFERENCE"/gpu_ref.sh .gpu/reference/

wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
"$PIP" download -q --no-deps taming-transformers-rom1504==0.0.6 einops==0.8.2 -d "$wheels"
for w in "$wheels"/*.whl; do python3 -m zipfile -e "$w" .gpu/reference/pydeps/; done

size=$(du -sm .gpu | cut -f1)
echo "packed .gpu/ (${size} MiB): run bench/gpu-check.sh on the GPU host with .gpu carried"
[ "$size" -lt 60 ] || { echo "warning: .gpu/ is ${size} MiB; at most 64 MiB travels" >&2; exit 1; }
