#!/usr/bin/env bash
# Every GPU check of one device session, in one command (device time is scarce): run from the repo
# root on a CUDA machine; results go to $OUT (default /tmp/gpu-out).
#   1. tests/test_gpu.py (engine eager + CUDA graphs vs the reference decoder, demo model GPU = CPU,
#      quantized layers and training steps on CUDA);
#   2. the demo model trained on the GPU: two vision variants in parallel, each sized to
#      $TRAIN_BUDGET seconds by scripts/make_demo_model.py --time-budget, packaged as float16;
#   3. `fastvlm bench` on the 0.5B shape in $DTYPE against transformers in the same run, then the
#      same engine without CUDA graphs.
# Optional: .whl/*.whl (e.g. transformers) are installed into /tmp/site first (no network there).
# Dry run on a CPU: DEVICE=cpu TRAIN_BUDGET=20 SHAPE=tiny DTYPE=float32 bash scripts/gpu_checks.sh
set -u
OUT=${OUT:-/tmp/gpu-out}
DEVICE=${DEVICE:-cuda}
TRAIN_BUDGET=${TRAIN_BUDGET:-200}
SHAPE=${SHAPE:-0.5b}
DTYPE=${DTYPE:-bfloat16}
WORKERS=${WORKERS:-7}
BATCH=${BATCH:-64}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
t0=$(date +%s)
stamp() { echo "[gpu_checks +$(( $(date +%s) - t0 ))s] $*"; }

stamp "environment"
nvidia-smi -L 2>/dev/null
$PY -c "import torch, transformers, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
nproc

stamp "1. tests/test_gpu.py"
timeout 90 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -40 > "$OUT/gpu-tests.log"
tail -5 "$OUT/gpu-tests.log"

stamp "2. demo model training (variants wide@256, wide@384, ${TRAIN_BUDGET}s each, in parallel)"
train() {  # name variant size
  local w=/tmp/demo-$1
  mkdir -p "$w"
  [ -f .gpu/tokenizer.json ] && cp .gpu/tokenizer.json "$w/"
  timeout $(( TRAIN_BUDGET + 90 )) $PY scripts/make_demo_model.py --work "$w" --out "$w/out" \
    --variant "$2" --image-size "$3" --device "$DEVICE" --workers "$WORKERS" --batch-size "$BATCH" \
    --lr 1e-3 --warmup 200 --save-every 1000 --log-every 100 --time-budget "$TRAIN_BUDGET" \
    > "$OUT/train-$1.log" 2>&1
  echo "exit $?" >> "$OUT/train-$1.log"
  (cd "$w/out" 2>/dev/null && tar czf "$OUT/model-$1.tgz" .)
}
train w256 wide 256 &
train w384 wide 384 &
wait
for n in w256 w384; do tr '\r' '\n' < "$OUT/train-$n.log" | grep -v "^train:" | tail -6; done
ls -la "$OUT"

stamp "3. bench ($SHAPE, $DTYPE, vs transformers)"
timeout 150 $PY -m fastvlm bench --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
  --image-size 1024,512 --concurrency 1,4,8 --vision-batch 1,8 --max-tokens 64 \
  --compare transformers --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "exit $?" >> "$OUT/bench.log"
grep -v '^{' "$OUT/bench.log" | tail -45
timeout 60 $PY -m fastvlm bench --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
  --image-size 1024 --concurrency 1,4 --vision-batch 1 --max-tokens 64 --no-cuda-graphs \
  --json "$OUT/bench-eager.json" 2>&1 | grep -v '^{' | tail -25
stamp "done"
