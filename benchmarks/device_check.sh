#!/usr/bin/env bash
# One short GPU check (about 10 minutes on one H100/H200): attention kernels against the
# reference on the GPU, then the train step of tiny, small and base in bf16 with cuDNN
# attention on and off: step time, examples/s, MFU (analytic FLOPs) and peak memory.
#
# Run from the repository root on a GPU machine (through the device tool: carry .whl
# with the wheels the machine lacks, see the device README, and install them first):
#   bash benchmarks/device_check.sh            # writes $OUT/device_check.jsonl if OUT is set
# Batches are chosen to fill one 80-140 GB device at 10.24 s crops.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}/device_check.jsonl"
: > "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9

python3 -c "import jax; print('devices:', jax.devices())"
JAX_PLATFORMS=cuda python3 -m pytest -q -x tests/test_attention_kernels.py 2>&1 | tail -3

run() {  # variant batch attention
  timeout 240 python3 benchmarks/train_step.py --steps 5 \
    --config "experiments/pupujepa.py:variant=$1,batch=$2,bf16" \
    --config.attention="$3" 2>/dev/null | python3 -c "
import json, sys
r = json.load(sys.stdin)
r.update(variant='$1', batch=$2)
print(json.dumps(r))" | tee -a "$out" || echo "{\"variant\": \"$1\", \"attention\": \"$3\", \"failed\": true}" | tee -a "$out"
}
for spec in "tiny 256" "small 192" "base 128"; do
  set -- $spec
  run "$1" "$2" cudnn
  run "$1" "$2" xla
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{'variant':8} {'batch':>5} {'attention':9} {'step_s':>7} {'ex/s':>7} {'MFU':>6}")
for r in rows:
  if r.get("failed"):
    print(f"{r['variant']:8} {'':>5} {r['attention']:9} failed")
    continue
  print(f"{r['variant']:8} {r['batch']:5d} {r['attention']:9} {r['step_s']:7.3f} "
        f"{r['examples_per_s']:7.1f} {r.get('mfu', float('nan')):6.3f}")
PY
