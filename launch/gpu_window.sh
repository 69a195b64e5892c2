#!/usr/bin/env bash
# One short GPU window (a lent H100/H200, minutes long): check that the models compile, time them,
# then train as much of a grid as fits, and bring back small results.
#
#   bash launch/gpu_window.sh GRID BUDGET_S [JOBS] [MODELS_TO_BENCHMARK]
#
# EXTRA="--set steps=100 ..." adds overrides (give the same again to resume); PYTHON and
# SKIP_INSTALL=1 run it off the GPU host (a CPU smoke test). Carry .whl/ (the s2fft wheel and .whl/data/{mnist,fashion_mnist}.npz written from
# sphere_jax.data.digits.load_digits). Writes under $OUT (default /tmp/out):
#   env.txt                       GPU, jax, the transform variant used
#   benchmark.json                one row per model (compile + step time + cost analysis)
#   sweep.log                     the grid runner's and the aggregation's log
#   results.md / results.json     aggregate of the finished runs (launch.aggregate)
# (seven files: the device tool brings back at most eight)
#   sweep_meta.tgz                every run's config.json, metrics.jsonl, run.log, summary.md
#   sweep_best.tgz                best checkpoints of the S2CNNs and other small models (to ship)
# The grid resumes: run the same command again with the archives unpacked into $SWEEP.
set -u
GRID=${1:?grid name}; BUDGET=${2:?seconds for the sweep}; JOBS=${3:-8}; BENCH=${4:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SWEEP=${SWEEP:-/tmp/sweep}
PY=${PYTHON:-python3}
if [ -z "${SKIP_INSTALL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; $PY -c "import jax; print(jax.__version__, jax.devices())"; } \
  > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. compile and time each model of BENCH (comma-separated) at the study's band-limit
if [ -n "$BENCH" ]; then
  $PY - "$BENCH" <<'PY' 2>&1
import json, os, sys
from sphere_jax import benchmark as b
out = os.environ["OUT"]
rows = []
for name in sys.argv[1].split(","):
    case = dict(model=name, L=b.study_L(name), infer_batches=[32], train_batch=32, repeats=5)
    rows.append(b.run_in_subprocess(case, timeout=240))
    print(json.dumps(rows[-1]), flush=True)
    json.dump(rows, open(os.path.join(out, "benchmark.json"), "w"), indent=1)
print(b.markdown_table(rows))
PY
fi
echo "benchmarks done after $(( $(date +%s) - T0 )) s"
# a model that failed to compile with the default transforms: train with the FFT ones and say so
if [ -f "$OUT/benchmark.json" ] && [ -z "${SPHERE_JAX_TRANSFORMS:-}" ] && $PY - <<'PY'
import json, os, sys
rows = json.load(open(os.path.join(os.environ["OUT"], "benchmark.json")))
sys.exit(0 if any("error" in r and r.get("model", "").startswith("s2cnn") for r in rows) else 1)
PY
then
  export SPHERE_JAX_TRANSFORMS=fft
  echo "an S2CNN failed with the default transforms: SPHERE_JAX_TRANSFORMS=fft for the sweep" | tee -a "$OUT/env.txt"
fi

# 2. the grid, as much as fits; SIGTERM at the budget stops it cleanly (runs resume later)
mkdir -p "$SWEEP"
# shellcheck disable=SC2086
timeout -s TERM "$BUDGET" $PY -m launch.run_grid --grid="$GRID" --root="$SWEEP" --jobs="$JOBS" --python="$PY" \
  --set source=npz --set digits_npz="$PWD/.whl/data/{dataset}.npz" ${EXTRA:-} 2>&1 | tee "$OUT/sweep.log"
echo "sweep stopped after $(( $(date +%s) - T0 )) s"

# 3. results: aggregate, and pack the small files
$PY -m launch.aggregate --root="$SWEEP" --out="$SWEEP/aggregate" > /dev/null 2>>"$OUT/sweep.log"
cp "$SWEEP/aggregate/results.md" "$SWEEP/aggregate/results.json" "$OUT/" 2>/dev/null
$PY -m launch.pack --sweep="$SWEEP" --out="$OUT" --checkpoints=best
echo "done after $(( $(date +%s) - T0 )) s"
