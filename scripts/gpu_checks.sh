#!/usr/bin/env bash
# Every GPU check of one device session, in one command (device time is scarce): run from the repo
# root on a CUDA machine; results go to $OUT (default $TMPDIR/gpu-out).
#   1. tests/test_gpu.py (engine eager + CUDA graphs vs the reference decoder, demo model GPU = CPU,
#      quantized layers and training steps on CUDA);
#   2. the demo model trained on the GPU: two vision variants in parallel, each sized to
#      $TRAIN_BUDGET seconds by dev/demo_model/make_demo_model.py --time-budget, packaged as float16;
#   3. `fastvlm bench` on the 0.5B shape in $DTYPE against transformers in the same run, then the
#      same engine without CUDA graphs.
# Optional: .whl/*.whl (e.g. transformers) are installed into $TMPDIR/site first (no network there).
# Dry run on a CPU: DEVICE=cpu TRAIN_BUDGET=20 SHAPE=tiny DTYPE=float32 bash scripts/gpu_checks.sh
set -u
SCRATCH=${TMPDIR:-/tmp}
OUT=${OUT:-$SCRATCH/gpu-out}
DEVICE=${DEVICE:-cuda}
TRAIN_BUDGET=${TRAIN_BUDGET:-200}
SHAPE=${SHAPE:-0.5b}
DTYPE=${DTYPE:-bfloat16}
WORKERS=${WORKERS:-7}
BATCH=${BATCH:-64}
PY=${PY:-python3}
PHASES=${PHASES:-tests train bench eager}   # any subset, in this order
MODELS=${MODELS:-w256:wide:256 w384:wide:384}  # name:variant:image size, trained in parallel
STEPS=${STEPS:-0}             # fixed schedule length (0: fit to TRAIN_BUDGET by timing 40 steps)
VISION_PRETRAIN=${VISION_PRETRAIN:-0}  # steps of phase-0 vision pre-training (0: none)
has() { [[ " $PHASES " == *" $1 "* ]]; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SCRATCH/site" .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$SCRATCH/site"
fi
t0=$(date +%s)
stamp() { echo "[gpu_checks +$(( $(date +%s) - t0 ))s] $*"; }

stamp "environment"
nvidia-smi -L 2>/dev/null
$PY -c "import torch, transformers, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
nproc

if has tests; then
stamp "1. tests/test_gpu.py"
timeout 90 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -40 > "$OUT/gpu-tests.log"
tail -5 "$OUT/gpu-tests.log"
fi

if has train; then
stamp "2. demo model training ($MODELS; ${TRAIN_BUDGET}s each, in parallel)"
train() {  # name variant size
  local w=$SCRATCH/demo-$1
  mkdir -p "$w"
  [ -f .gpu/tokenizer.json ] && cp .gpu/tokenizer.json "$w/"
  timeout $(( TRAIN_BUDGET + 90 )) $PY dev/demo_model/make_demo_model.py --work "$w" --out "$w/out" \
    --variant "$2" --image-size "$3" --device "$DEVICE" --workers "$WORKERS" --batch-size "$BATCH" \
    --lr 1e-3 --warmup 200 --save-every 1000 --log-every 100 \
    $( [ "$STEPS" -gt 0 ] && echo "--steps $STEPS --phase1 $(( STEPS / 8 ))" || echo "--time-budget $TRAIN_BUDGET" ) \
    --vision-pretrain "$VISION_PRETRAIN" \
    > "$OUT/train-$1.log" 2>&1
  echo "exit $?" >> "$OUT/train-$1.log"
  (cd "$w/out" 2>/dev/null && tar czf "$OUT/model-$1.tgz" .)
}
for m in $MODELS; do IFS=: read -r n v sz <<< "$m"; train "$n" "$v" "$sz" & done
wait
for m in $MODELS; do n=${m%%:*}; tr '\r' '\n' < "$OUT/train-$n.log" | grep -v "^train:\|^vision:" | tail -6; done
ls -la "$OUT"
fi

if has bench; then
stamp "3. bench ($SHAPE, $DTYPE, vs transformers)"
timeout "${BENCH_TIMEOUT:-150}" $PY -m fastvlm bench --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
  --image-size 1024,512 --concurrency "${BENCH_CONC:-1,4,8}" --vision-batch 1,8 --max-tokens 64 \
  --compare transformers --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "exit $?" >> "$OUT/bench.log"
grep -v '^{' "$OUT/bench.log" | tail -45
fi
if has eager; then
timeout 60 $PY -m fastvlm bench --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
  --image-size 1024 --concurrency 1,4 --vision-batch 1 --max-tokens 64 --no-cuda-graphs \
  --json "$OUT/bench-eager.json" 2>&1 | grep -v '^{' | tail -25
fi
stamp "done"
