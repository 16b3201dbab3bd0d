#!/usr/bin/env bash
# Runs the PyTorch reference (../shared/reference/bench.py) and `vqclip bench` alternately on
# this machine, case by case, and prints the ratios ours / reference (time and peak memory; below
# 1.0 means vqclip is faster or smaller). Both do the same step: see src/bench.rs.
#
#   bench/compare.sh                          # 256/8, 256/32, 512/32; 1 warm-up + 3 timed each
#   CASES="256:32" ROUNDS=2 bench/compare.sh  # one case, twice each, alternating
#   VQCLIP_B=/tmp/vqclip-lever bench/compare.sh   # a second build, alternating with the first
#
# Environment: REFENV (the reference's virtualenv, default /work/refenv), REFDIR (the reference's
# folder, default ../shared/reference), VQCLIP (a built binary; default: cargo build --release),
# VQCLIP_B (another build to time in the same run, each round after VQCLIP: a lever measured
# against the unchanged build), CASES, ITERS, WARMUP, ROUNDS, OUT (where the JSON lines go;
# default a temporary file; VQCLIP_B's go to "$OUT.b").
set -euo pipefail
cd "$(dirname "$0")/.."

REFENV=${REFENV:-/work/refenv}
REFDIR=${REFDIR:-../shared/reference}
CASES=${CASES:-"256:8 256:32 512:32"}
ITERS=${ITERS:-3}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-1}
OUT=${OUT:-$(mktemp /tmp/vqclip-compare.XXXXXX.jsonl)}

if [ ! -x "$REFENV/bin/python" ] || ! "$REFENV/bin/python" -c "import torch, transformers, taming" 2>/dev/null; then
    cat >&2 <<MSG
error: no reference virtualenv at $REFENV (set REFENV to use another). Create it (about 6 GB):
    python3 -m venv "$REFENV"
    "$REFENV/bin/pip" install torch==2.15.0 transformers==5.24.0 safetensors==0.8.0 numpy==2.4.6 einops==0.8.2
    "$REFENV/bin/pip" install --no-deps taming-transformers-rom1504==0.0.6
MSG
    exit 2
fi
if [ ! -f "$REFDIR/bench.py" ]; then
    echo "error: no reference at $REFDIR (set REFDIR)" >&2
    exit 2
fi
if [ -z "${VQCLIP:-}" ]; then
    cargo build --release --quiet
    VQCLIP=target/release/vqclip
fi

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); results in $OUT" >&2
for case in $CASES; do
    size=${case%%:*}
    cutn=${case##*:}
    for round in $(seq "$ROUNDS"); do
        echo "case ${size}x${size} cutn $cutn, round $round: reference…" >&2
        (cd "$REFDIR" && "$REFENV/bin/python" bench.py --size "$size" --cutn "$cutn" \
            --warmup "$WARMUP" --iters "$ITERS" --json 2>/dev/null | tail -n 1) >> "$OUT"
        echo "case ${size}x${size} cutn $cutn, round $round: vqclip…" >&2
        "$VQCLIP" bench --size "${size}x${size}" --cutn "$cutn" \
            --warmup "$WARMUP" --iters "$ITERS" --json >> "$OUT"
        if [ -n "${VQCLIP_B:-}" ]; then
            echo "case ${size}x${size} cutn $cutn, round $round: vqclip B ($VQCLIP_B)…" >&2
            "$VQCLIP_B" bench --size "${size}x${size}" --cutn "$cutn" \
                --warmup "$WARMUP" --iters "$ITERS" --json >> "$OUT.b"
        fi
    done
done

summarise() {
python3 - "$1" <<'PY'
import json, statistics, sys
ref, ours = {}, {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("implementation") == "vqclip":
        ours.setdefault((r["width"], r["cutn"]), []).append(r)
    else:
        ref.setdefault((r["size"], r["cutn"]), []).append(r)
print("| case | reference s/iter | vqclip s/iter | time ratio | reference peak | vqclip peak | memory ratio |")
print("|---|---|---|---|---|---|---|")
for key in sorted(ours):
    if key not in ref:
        continue
    rt = statistics.median(r["median_s"] for r in ref[key])
    ot = statistics.median(r["median_s"] for r in ours[key])
    rm = max(r["peak_rss_mib"] for r in ref[key])
    om = max(r["peak_rss_mib"] for r in ours[key])
    print(f"| {key[0]}², cutn {key[1]} | {rt:.2f} | {ot:.2f} | **{ot / rt:.2f}** | {rm:.0f} MiB | {om:.0f} MiB | **{om / rm:.2f}** |")
print()
print("| case | phase | reference s | vqclip s | ratio |")
print("|---|---|---|---|---|")
names = [("synth_fwd", "synth_fwd"), ("clip_fwd", "clip_fwd"), ("backward", "backward"), ("opt_step", "optimiser")]
for key in sorted(ours):
    if key not in ref:
        continue
    for rname, oname in names:
        rv = statistics.median(r["median_parts_s"][rname] for r in ref[key])
        ov = statistics.median(r["median_parts_s"][oname] for r in ours[key])
        ratio = f"{ov / rv:.2f}" if rv > 0 else "-"
        print(f"| {key[0]}², cutn {key[1]} | {oname} | {rv:.3f} | {ov:.3f} | {ratio} |")
PY
}

summarise "$OUT"
if [ -n "${VQCLIP_B:-}" ]; then
    echo
    echo "Build B ($VQCLIP_B), against the same reference runs:"
    echo
    grep -v '"implementation": *"vqclip"' "$OUT" > "$OUT.ref-b"
    cat "$OUT.b" >> "$OUT.ref-b"
    summarise "$OUT.ref-b"
fi
