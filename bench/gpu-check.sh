#!/usr/bin/env bash
# The GPU check, on a GPU host with the repository and .gpu/ (bench/gpu-prepare.sh) beside it:
# no Rust toolchain and no internet needed. Run from the repository root:
#
#   bash bench/gpu-check.sh [OUT_DIR]          # default $OUT, else /tmp/gpu-check
#
# In order, each step bounded in time, all within about 8 minutes on an H100:
#   1. the GPU, driver and libraries (nvidia-smi);
#   2. vqclip selftest --device cuda:0: the parity cases in f32 (strict tolerances, TF32 off),
#      then with CLIP in f16 (tolerances x200);
#   3. vqclip bench --device cuda:0 at 512x512/32 cutouts with CLIP in f16 (the reference's GPU
#      setting) and f32, at 256x256/32 in f16 alone and as a batch of 4 latents (images per hour
#      against the single runs'), and at 512 in f16 without TF32 (and, when
#      .gpu/vqclip-cudnn.xz was packed, the cuDNN build at 512 and 256 in f16); 2 warm-up and 10
#      timed iterations each; peak GPU memory sampled with nvidia-smi every 50 ms (above the
#      idle level, the CUDA context included);
#   4. the PyTorch reference on the same GPU (../shared/reference/gpu_ref.sh: CLIP in f16) at
#      256/32 and 512/32 with --tf32 conv (PyTorch's default, what generate.py gets, matching
#      our TF32 setting) and at 512/32 with --tf32 off, sampled the same way;
#   5. one JSON file, OUT_DIR/gpu-check.json: every result, and our it/s over the reference's
#      for each matching case. The full log is OUT_DIR/gpu-check.log.
#
# Knobs: GPU_DIR (.gpu), PY (python3, the one with torch), ITERS (10), WARMUP (2), DEVICE
# (cuda:0).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:-${OUT:-/tmp/gpu-check}}
GPU_DIR=${GPU_DIR:-.gpu}
PY=${PY:-python3}
ITERS=${ITERS:-10}
WARMUP=${WARMUP:-2}
DEVICE=${DEVICE:-cuda:0}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu-check.log") 2>&1
START=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - START )) s] $*"; }

step "setup"
# Unpacked with Python's lzma (the host may lack xz).
unpack() {
    "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$1" "$2" && chmod +x "$2"
}
BINS=$(mktemp -d)
BIN=$BINS/vqclip
unpack "$GPU_DIR/vqclip.xz" "$BIN" || { echo "no $GPU_DIR/vqclip.xz (bench/gpu-prepare.sh)"; exit 1; }
CUDNN_BIN=
if [ -f "$GPU_DIR/vqclip-cudnn.xz" ]; then
    CUDNN_BIN=$BINS/vqclip-cudnn
    unpack "$GPU_DIR/vqclip-cudnn.xz" "$CUDNN_BIN" || CUDNN_BIN=
fi
# cuBLAS, cuRAND, NVRTC and the CUDA runtime from PyTorch's CUDA 13 wheels; the driver's
# libcuda is on the system path.
SITE=$("$PY" -c 'import site; print(site.getsitepackages()[0])')
for d in "$SITE"/nvidia/cu13/lib "$SITE"/nvidia/*/lib; do
    [ -d "$d" ] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
    | tee "$OUT_DIR/gpu.csv"
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' \
    | tee "$OUT_DIR/torch.txt"
missing=$(ldd "$BIN" | grep "not found" || true)
[ -z "$missing" ] || { echo "libraries not found: $missing"; exit 1; }

# Runs "$@" while sampling the GPU's memory; appends {"peak_gpu_smi_mib": …} to each JSON line
# the command prints (a line that is not an object passes through).
sampled() {
    local samples idle pid out rc
    samples=$(mktemp)
    idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 50 > "$samples" &
    pid=$!
    out=$(timeout 300 "$@"); rc=$?
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    local peak
    peak=$(sort -n "$samples" | tail -1)
    echo "$out" | "$PY" -c '
import json, sys
idle, peak = float(sys.argv[1] or 0), float(sys.argv[2] or 0)
for line in sys.stdin:
    line = line.strip()
    try:
        obj = json.loads(line)
    except ValueError:
        if line: print(line)
        continue
    if isinstance(obj, dict):
        obj["peak_gpu_smi_mib"] = peak - idle
        obj["idle_gpu_smi_mib"] = idle
    print(json.dumps(obj))
' "$idle" "$peak"
    rm -f "$samples"
    return $rc
}

step "selftest, f32"
timeout 240 "$BIN" selftest --device "$DEVICE" -v 2>&1 | tee "$OUT_DIR/selftest-f32.txt"
echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT_DIR/selftest-f32.txt"
step "selftest, CLIP in f16"
timeout 240 "$BIN" selftest --device "$DEVICE" --precision f16 -v 2>&1 |
    tee "$OUT_DIR/selftest-f16.txt"
echo "exit ${PIPESTATUS[0]}" | tee -a "$OUT_DIR/selftest-f16.txt"

: > "$OUT_DIR/ours.jsonl"
cases=("512 f16" "512 f32" "256 f16" "256 f16 --batch 4" "512 f16 --no-tf32")
# The cuDNN build, when packed: its convolutions instead of im2col + cuBLAS.
[ -n "$CUDNN_BIN" ] && cases+=("512 f16 cudnn" "256 f16 cudnn")
for c in "${cases[@]}"; do
    set -- $c
    bin=$BIN flags="${*:3}" label=cuda
    if [ "${3:-}" = cudnn ]; then bin=$CUDNN_BIN flags= label=cudnn; fi
    step "vqclip bench ${1}x${1}/32, CLIP in $2 ${*:3}"
    sampled "$bin" bench --device "$DEVICE" --size "${1}x${1}" --cutn 32 --clip-precision "$2" \
        $flags --warmup "$WARMUP" --iters "$ITERS" --json |
        "$PY" -c '
import json, sys
for line in sys.stdin:
    try:
        obj = json.loads(line)
    except ValueError:
        print(line, end="")
        continue
    obj["build"] = sys.argv[1]
    print(json.dumps(obj))
' "$label" | tee -a "$OUT_DIR/ours.jsonl"
done

: > "$OUT_DIR/reference.jsonl"
for c in "256/32 conv" "512/32 conv" "512/32 off"; do
    set -- $c
    step "reference $1, CLIP in f16, --tf32 $2"
    REF_DIR="$GPU_DIR/reference" REF_PY="$PY" REF_CASES="$1" REF_TF32="$2" \
        REF_WARMUP="$WARMUP" REF_ITERS="$ITERS" \
        sampled bash "$GPU_DIR/reference/gpu_ref.sh" | tee -a "$OUT_DIR/reference.jsonl"
done

step "summary"
"$PY" - "$OUT_DIR" <<'PY'
import json, os, sys
out = sys.argv[1]
def lines(name):
    rows = []
    for line in open(os.path.join(out, name)):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows
def text(name):
    path = os.path.join(out, name)
    return open(path).read() if os.path.exists(path) else None
ours, ref = lines("ours.jsonl"), lines("reference.jsonl")
ratios = []
for o in ours:
    if o.get("clip_precision") != "f16" or o.get("batch", 1) != 1:
        continue
    mode = "conv" if o.get("tf32") else "off"
    build = o.get("build", "cuda")
    for r in ref:
        if r.get("size") == o["width"] and r.get("cutn") == o["cutn"] and r.get("tf32") == mode \
                and r.get("median_s"):
            ratios.append({
                "size": o["width"], "cutn": o["cutn"], "tf32": mode, "build": build,
                "ours_it_s": 1 / o["median_s"], "reference_it_s": 1 / r["median_s"],
                "speedup": r["median_s"] / o["median_s"],
                "ours_peak_gpu_smi_mib": o.get("peak_gpu_smi_mib"),
                "reference_peak_gpu_smi_mib": r.get("peak_gpu_smi_mib"),
                "reference_peak_gpu_mib": r.get("peak_gpu_mib"),
            })
# A batch of latents against single runs of the same case: images per hour (goal: a batch of 4
# at 2.5x the single runs' at 256²/32).
batches = []
for o in ours:
    if o.get("batch", 1) == 1:
        continue
    for s in ours:
        if s.get("batch", 1) == 1 and s.get("build") == o.get("build") \
                and (s["width"], s["cutn"], s["clip_precision"], s["tf32"]) \
                == (o["width"], o["cutn"], o["clip_precision"], o["tf32"]):
            batches.append({
                "size": o["width"], "cutn": o["cutn"], "batch": o["batch"],
                "images_per_hour": o["images_per_hour"],
                "single_images_per_hour": s["images_per_hour"],
                "gain": o["images_per_hour"] / s["images_per_hour"],
                "peak_gpu_smi_mib": o.get("peak_gpu_smi_mib"),
            })
summary = {
    "gpu": text("gpu.csv"), "torch": text("torch.txt"),
    "selftest_f32": text("selftest-f32.txt"), "selftest_f16": text("selftest-f16.txt"),
    "ours": ours, "reference": ref, "ratios": ratios, "batches": batches,
}
json.dump(summary, open(os.path.join(out, "gpu-check.json"), "w"), indent=1)
for r in ratios:
    print(f"{r['size']}²/{r['cutn']} TF32 {r['tf32']} ({r['build']}): ours {r['ours_it_s']:.2f} it/s, "
          f"reference {r['reference_it_s']:.2f} it/s: {r['speedup']:.2f}x; peak GPU memory "
          f"(nvidia-smi) {r['ours_peak_gpu_smi_mib']} vs {r['reference_peak_gpu_smi_mib']} MiB")
for b in batches:
    print(f"{b['size']}²/{b['cutn']} batch of {b['batch']}: {b['images_per_hour']:.0f} images/h, "
          f"single runs {b['single_images_per_hour']:.0f}: {b['gain']:.2f}x")
PY
step "done"
