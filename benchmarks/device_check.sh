#!/usr/bin/env bash
# One short GPU check (about 10 minutes on one H100/H200): attention kernels against the
# reference on the GPU, then the train step of tiny, base, large and small in bf16 with
# cuDNN attention on and off: step time, examples/s, MFU (analytic FLOPs), peak memory.
#
# The device tool's H200 image has JAX with CUDA, flax, optax, orbax and pytest, but not
# every package this repository imports: fetch the missing wheels here once,
#   bash benchmarks/device_wheels.sh           # into .whl/ (git-ignored)
# then run, from the repository root on the GPU machine, with `.whl` carried:
#   bash benchmarks/device_check.sh            # writes $OUT/device_check.jsonl if OUT is set
# Batches (10.24 s crops) are what XLA:CPU's memory analysis of the same bf16 steps says
# fits in ~100 GB (tiny 128: 84 GiB, base 64: 86, large 32: 71, small 128: 97); the
# benchmark halves a batch whose compiled step does not fit the device (its JSON says
# which batch ran).
#
# Anywhere else the same script checks its own plumbing (tests/test_benchmarks.py does,
# on CPUs; the cudnn runs then fall back to blockwise attention, logging why):
#   JAX_PLATFORMS=cpu DEVICE_CHECK_RUNS="tiny:8" DEVICE_CHECK_CONFIG=smoke \
#     DEVICE_CHECK_TESTS="-k blockwise" bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
out="${OUT:-/tmp}/device_check.jsonl"
: > "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
wheels="${DEVICE_CHECK_WHEELS:-.whl}"
if compgen -G "$wheels/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$wheels"/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

"$python" -c "import jax; print('jax', jax.__version__, 'devices:', jax.devices())"
# shellcheck disable=SC2086  # DEVICE_CHECK_TESTS holds pytest arguments
JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}" timeout 150 "$python" -m pytest -q -x -p no:cacheprovider \
  tests/test_attention_kernels.py ${DEVICE_CHECK_TESTS:-} 2>&1 | tail -3

extra="${DEVICE_CHECK_CONFIG:+,$DEVICE_CHECK_CONFIG}"
run() {  # variant batch attention
  timeout "${DEVICE_CHECK_RUN_TIMEOUT:-150}" "$python" benchmarks/train_step.py --steps 5 \
    --config "experiments/pupujepa.py:variant=$1,batch=$2,bf16$extra" \
    --config.attention="$3" 2>/dev/null | "$python" -c "
import json, sys
r = json.load(sys.stdin)
r.update(variant='$1')
print(json.dumps(r))" | tee -a "$out" || echo "{\"variant\": \"$1\", \"attention\": \"$3\", \"failed\": true}" | tee -a "$out"
}
# Every size with cuDNN first, then without: a call cut short by the device tool's limit
# still brings back the rows that matter most ($OUT's file grows row by row). Plain XLA
# attention keeps [batch, heads, N, N] float32 probabilities for the backward pass: it
# runs a quarter of the batch (XLA:CPU's analysis: tiny 32, base 16, large 8, small 32
# need 64-100 GiB), so that no compilation is spent on halving.
for attention in cudnn xla; do
  for spec in ${DEVICE_CHECK_RUNS:-tiny:128 base:64 large:32 small:128}; do
    batch="${spec#*:}"
    if [ "$attention" = xla ] && [ "$batch" -ge 4 ]; then batch=$((batch / 4)); fi
    run "${spec%:*}" "$batch" "$attention"
  done
done
"$python" - "$out" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{'variant':8} {'batch':>5} {'attention':9} {'step_s':>7} {'ex/s':>7} {'MFU':>6} "
      f"{'peak_GB':>7}  ran (encoder/predictor)")
for r in rows:
  if r.get("failed"):
    print(f"{r['variant']:8} {'':>5} {r['attention']:9} failed")
    continue
  print(f"{r['variant']:8} {r['batch']:5d} {r['attention']:9} {r['step_s']:7.3f} "
        f"{r['examples_per_s']:7.1f} {r.get('mfu', float('nan')):6.3f} "
        f"{r.get('peak_device_gb') or float('nan'):7.2f}  "
        f"{r['attention_ran']['encoder']}/{r['attention_ran']['predictor']}")
PY
