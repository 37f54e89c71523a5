#!/usr/bin/env bash
# The GPU benchmarks of docs/packed.md in one call (bf16, batch 64, 224 and 518px):
# the packed-attention kernels, packed vs padded vs ToMe on DINOv2-S/14 (real weights) and
# on the ViT-B/14 and ViT-L/14 geometries (random weights), and the DINOv2-S sweep
# (SAINT+, saint_match, ToMe constant and decreasing, each selecting between attention and
# MLP and before attention; fidelity on the carried photos).
#
# Prepare here first:  python benchmarks/gpu_prepare.py        (packs .gpu/, git-ignored)
# Run there:           bash benchmarks/gpu_run.sh              (carry .gpu)
# Results: $OUT/gpu_results.tar.gz (every JSON/Markdown/PNG, each with its exact command)
# and $OUT/gpu_run.log. Each step has its own time limit, so one failure or overrun
# still leaves the others' results, and the archive is rewritten after every step, so a
# call cut off by its own limit still returns what finished; the whole script stays under
# ~8.5 minutes. SAINT_GPU_STEPS (default "kernels packed sweep") runs only the steps named,
# in that order, e.g. to rerun what failed in a second, shorter call; "latency" (not in the
# default) times one photo per call (packed_speed.py --one-at-a-time) on DINOv2-S/14.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/saint-gpu-out}
mkdir -p "$OUT"
RESULTS=$(mktemp -d)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export SAINT_CACHE=${SAINT_CACHE:-/tmp/saint-cache} SAINT_SHARED_DATA="$PWD/.gpu"
PY=${PYTHON:-python3}
DEVICE=${SAINT_GPU_DEVICE:-cuda}   # SAINT_GPU_DEVICE=cpu rehearses the script on a CPU machine
QUICK=${SAINT_GPU_QUICK:-}         # non-empty: one round, small batches (a rehearsal, not a result)
STEPS=" ${SAINT_GPU_STEPS:-kernels packed sweep} "

exec > >(tee "$OUT/gpu_run.log") 2>&1
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
  timeout "$limit" "$@"
  local rc=$?
  [ $rc -eq 0 ] || echo "!! $name: exit $rc (124 = over its time limit)"
  tar czf "$OUT/gpu_results.tar.gz" -C "$RESULTS" .
}
wanted() { [[ "$STEPS" == *" $1 "* ]]; }

if compgen -G ".gpu/wheels/*.whl" > /dev/null; then  # the timm the tests ran against (gpu_prepare.py)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/saint-site .gpu/wheels/*.whl \
    && export PYTHONPATH="/tmp/saint-site:$PYTHONPATH"
fi
"$PY" benchmarks/gpu_prepare.py --restore || exit 1
"$PY" - <<'EOF'
import torch, timm
import saint
print("torch", torch.__version__, "timm", timm.__version__, "saint", saint.__version__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
EOF

if [ -n "$QUICK" ]; then
  BATCH=4; ROUNDS="--warmup 0 --repeats 1"; SIZES=224; PHOTOS=12; MODELS=vit_base_patch14_dinov2; LATENCY_PHOTOS=2
  KERNEL_CASES=(--lengths 20-60,60-250 --rounds 1); TARGETS=saint_plus@2; SCALE=5
  SWEEP=(--tome-r 13 --tome-select-at mlp,attention --calibrated saint_match
         --calibrated saint_match:guard=0.1,select_at=attention --calibrated saint_match:target=measured,at=1.5
         --speedups 2)
else
  BATCH=64; ROUNDS="--warmup 2 --repeats 10"; SIZES=224,518; PHOTOS=48; KERNEL_CASES=(); LATENCY_PHOTOS=16
  TARGETS=saint_plus@2,saint_plus@3; SCALE=1
  SWEEP=(--calibrated saint_plus --calibrated saint_match:inflection=-0.5,guard=0.1
         --calibrated saint_match:inflection=-0.5,guard=0.1,select_at=attention
         --calibrated saint_match:target=measured,at=2 --tome-select-at mlp,attention --speedups 1.5,2,3)
  MODELS="vit_base_patch14_dinov2 vit_large_patch14_dinov2"
fi
COMMON=(--device "$DEVICE" --dtype bf16 --out-dir "$RESULTS")

if wanted kernels; then
  step kernels 50 "$PY" benchmarks/packed_attention_kernels.py "${COMMON[@]}" --batch "$BATCH" "${KERNEL_CASES[@]}"
fi
if wanted packed; then
  step packed-dinov2-s14 90 "$PY" benchmarks/packed_speed.py "${COMMON[@]}" --batch-size "$BATCH" \
    --sizes "$SIZES" --overhead-sizes "$SIZES" --targets "saint@1.5,$TARGETS" --tome-r auto $ROUNDS
  for model in $MODELS; do
    step "packed-$model" 90 "$PY" benchmarks/packed_speed.py "${COMMON[@]}" --batch-size "$BATCH" \
      --sizes "$SIZES" --overhead-sizes "" --targets "$TARGETS" --tome-r auto $ROUNDS \
      --model "$model"
  done
fi
if wanted latency; then
  step latency-dinov2-s14 120 "$PY" benchmarks/packed_speed.py "${COMMON[@]}" --one-at-a-time \
    --batch-size "$LATENCY_PHOTOS" --sizes "$SIZES" --overhead-sizes "$SIZES" --targets "$TARGETS" --tome-r auto \
    $ROUNDS --name "packed_speed_${DEVICE}_1x${LATENCY_PHOTOS}"
fi
if wanted sweep; then
  step sweep 160 "$PY" benchmarks/run_dinov2_cpu.py "${COMMON[@]}" --batch-size "$BATCH" --eval-batch "$BATCH" \
    --sizes "$SIZES" --photos "$PHOTOS" --taus "" --matched none --tome-inflection=-0.5 "${SWEEP[@]}" \
    $ROUNDS --tag gpu --no-progress
fi

echo "== done ($(date -u +%H:%M:%S)): $OUT/gpu_results.tar.gz"
ls -la "$RESULTS"
