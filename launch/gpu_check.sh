#!/usr/bin/env bash
# Real-scale check on a lent GPU. Carry .whl/ (s2fft wheel + data/mnist.npz, made with
# sphere_jax.data.digits.load_digits). Writes results under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# 1. speed at the study's sizes
python3 - <<'PY' 2>&1 | tee "$OUT/gpu_benchmark.log"
import json, os
from sphere_jax import benchmark as b
out = os.environ.get("OUT", "/tmp/out")
cases = [
    dict(model="s2cnn_204k", L=50, infer_batches=[1, 8, 32, 64], train_batch=32, repeats=5, roofline=False),
    dict(model="s2cnn_cls", L=30, infer_batches=[1, 32], train_batch=32, repeats=5, roofline=True),
    dict(model="cnn_218k", L=50, infer_batches=[1, 32], train_batch=32, repeats=5, roofline=False),
    dict(model="cnn_5_5m", L=50, infer_batches=[1, 32], train_batch=32, repeats=5, roofline=False),
]
rows = [b.run_in_subprocess(c, timeout=200) for c in cases]
for r in rows:
    print(json.dumps(r))
json.dump(rows, open(os.path.join(out, "gpu_benchmark.json"), "w"), indent=1)
open(os.path.join(out, "gpu_benchmark.md"), "w").write(b.markdown_table(rows))
print(b.markdown_table(rows))
PY
# 2. the bandwidth-50 segmentation comparison, as many steps as fit
common="--source=npz --digits_npz=.whl/data/mnist.npz --L=50 --batch_size=32 --n_train=0 --n_holdout=500 --n_test=1000 --test_rotation=so3"
python3 -m experiments.segment --model=s2cnn_204k --train_rotation=none --learning_rate=1e-3 --steps=1000 \
  --eval_every=500 --checkpoint_every=500 --workdir=/tmp/w/s2cnn $common 2>&1 | grep -v "step/s" | tail -12
python3 -m experiments.segment --model=cnn_5_5m --train_rotation=so3 --augmentation=fresh --learning_rate=1e-3 --steps=3000 \
  --eval_every=1000 --checkpoint_every=1000 --workdir=/tmp/w/cnn $common 2>&1 | grep -v "step/s" | tail -12
for d in s2cnn cnn; do cp /tmp/w/$d/metrics.jsonl "$OUT/seg50_$d.jsonl"; cp /tmp/w/$d/predictions_R.png "$OUT/seg50_$d.png" 2>/dev/null; done
