#!/usr/bin/env bash
# Real-scale check on a lent GPU (see BUILD_NOTES.md): s2fft travels as a wheel in .whl/.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 - <<'PY' 2>&1 | tee "$OUT/gpu_check.log"
import json, os
from sphere_jax import benchmark as b
out = os.environ.get("OUT", "/tmp/out")
cases = [
    dict(model="s2cnn_204k", L=50, infer_batches=[1, 8, 32], train_batch=32, repeats=5, roofline=False),
    dict(model="s2cnn_204k", L=50, infer_batches=[64], train_batch=1, repeats=5, roofline=False),
    dict(model="s2cnn_cls", L=30, infer_batches=[1, 32], train_batch=32, repeats=5, roofline=True),
    dict(model="cnn_218k", L=50, infer_batches=[1, 32], train_batch=32, repeats=5, roofline=False),
    dict(model="cnn_5_5m", L=50, infer_batches=[1, 32], train_batch=32, repeats=5, roofline=False),
]
rows = []
for c in cases:
    r = b.run_in_subprocess(c, timeout=240)
    print(json.dumps(r), flush=True)
    rows.append(r)
json.dump(rows, open(os.path.join(out, "gpu_benchmark.json"), "w"), indent=1)
open(os.path.join(out, "gpu_benchmark.md"), "w").write(b.markdown_table(rows))
print(b.markdown_table(rows))
PY
