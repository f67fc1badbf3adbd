#!/usr/bin/env bash
# One script for a lent GPU (about 15 minutes in all, start-up included): the CUDA tests, the benchmarks on the
# GPU, and a short real training of the paper's NCT-CRC recipe on a generated set of the real layout, to project
# the time of one NCT-CRC-HE-100K epoch. Everything lands under $OUT (at most 8 files: log.txt and 7 JSON).
#
#   OUT=results/device_check DEADLINE=480 bash benchmarks/device_check.sh   # on a machine with a GPU, 8 minutes at most
#   DEVICE=cpu QUICK=1 WHEELS=0 OUT=/tmp/dc bash benchmarks/device_check.sh   # a dry run of every step, small, on the CPU
#
# Packages the device image lacks travel as wheels in .whl/ (see the device tool's README); with no .whl/ the
# installed environment is used.
set -uo pipefail
OUT=${OUT:-results/device_check}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
PY=${PY:-python3}
WORK=${WORK:-/tmp/gmrpath_device_check}
mkdir -p "$WORK"

DEADLINE=${DEADLINE:-3600}   # seconds for the whole script: a step gets at most what is left, and none starts with < 20 s

step() {  # step NAME SECONDS COMMAND...: run one step with a time limit; a failure is logged, the script goes on
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: skipped, ${left}s left of DEADLINE=${DEADLINE}" | tee -a "$LOG"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

if [ "${WHEELS:-1}" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
    echo "=== wheels: installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site" | tee -a "$LOG"
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
    else
        echo "=== wheels: install failed; using the installed environment" | tee -a "$LOG"
    fi
fi
{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"; nproc; } >>"$LOG" 2>&1

if [ "$QUICK" = 1 ]; then
    NCT="200,1000"; PCAM="512,4096"; TILES=180; VAL=90; WORKERS=2; WIDTH=8; BATCHES=4
else
    NCT="1000,10000"; PCAM="4096,32768"; TILES=4800; VAL=960; WORKERS=$(( $(nproc) > 14 ? 14 : $(nproc) )); WIDTH=64; BATCHES=30
fi

step cuda_tests 180 $PY -m pytest -q -ra -p no:cacheprovider tests/test_cuda.py
# A short real training of the paper's recipe on an NCT-CRC-shaped set (real tissue, hard-linked files):
# the time per tile projects one NCT-CRC-HE-100K epoch (100,000 tiles).
$PY - "$WORK/nct" "$TILES" "$VAL" >>"$LOG" 2>&1 <<'EOF'
import sys
from pathlib import Path
from benchmarks.synthetic import demo_slide_path, read_demo_tissue, tissue_tiles, write_tile_folder
root, n, n_val = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if not (root / "CRC-VAL-HE-7K").is_dir():
    tiles = tissue_tiles(read_demo_tissue(demo_slide_path()), 512, 224, seed=0)
    write_tile_folder(root / "NCT-CRC-HE-100K", tiles, n)
    write_tile_folder(root / "CRC-VAL-HE-7K", tiles[::-1], n_val)
print(f"NCT-CRC-shaped set: {n} train / {n_val} val tiles under {root}")
EOF
train_nct() {  # train_nct gmr|resnet: one epoch of the paper's recipe; time per tile -> a projected 100k epoch
    local net=$1
    step "train_nct_$net" 200 $PY -m gmrpath train "configs/train_nct_crc_$net.yaml" --device "$DEVICE" --set epochs=1 \
        --set "data.root=$WORK/nct/NCT-CRC-HE-100K" --set "data.val_root=$WORK/nct/CRC-VAL-HE-7K" \
        --set "num_workers=$WORKERS" --set "out=$WORK/run_$net" --set "model_kwargs.base_channels=$WIDTH"
    $PY - "$WORK/run_$net" "$TILES" "$OUT/train_nct_$net.json" >>"$LOG" 2>&1 <<'EOF'
import csv, json, sys
from pathlib import Path
run, n, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rows = list(csv.DictReader(open(run / "metrics.csv")))
s = float(rows[-1]["train_s"])
res = {"tiles": n, "train_s": s, "tiles_per_s": round(n / s, 1), "projected_nct_crc_100k_epoch_min": round(100_000 / (n / s) / 60, 2),
       "metrics": rows[-1], "summary": json.load(open(run / "summary.json"))}
json.dump(res, open(out, "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "summary"}))
EOF
}
train_nct gmr
step bench_train 240 $PY -m gmrpath benchmark train --device "$DEVICE" --workers "$WORKERS" --options default,contiguous,compile \
    --out "$OUT/benchmark_train.json"
step bench_data 240 $PY -m gmrpath benchmark data --device "$DEVICE" --root "$WORK/data_sets" --nct-sizes "$NCT" --pcam-sizes "$PCAM" \
    --workers "$WORKERS" --batches "$BATCHES" --base-channels "$WIDTH" --out "$OUT/benchmark_data.json"
step bench_segment 180 $PY -m gmrpath benchmark segment --device "$DEVICE" --out "$OUT/benchmark_segment.json"
step bench_pipeline 180 $PY -m gmrpath benchmark pipeline --device "$DEVICE" --no-tiatoolbox --no-memory --out "$OUT/benchmark_pipeline.json"

train_nct resnet
step eval_nct_gmr 180 $PY -m gmrpath evaluate "$WORK/run_gmr/best.pt" --data "$WORK/nct/CRC-VAL-HE-7K" --mpp 0.5 --device "$DEVICE" \
    --workers "$WORKERS" --out "$WORK/eval"
cp "$WORK/eval/evaluation.json" "$OUT/evaluation.json" 2>/dev/null
echo "=== done $(date -u +%T)" | tee -a "$LOG"
