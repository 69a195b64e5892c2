#!/usr/bin/env bash
# One short GPU window for the segmentation study and the S2CNN's speed (a lent H100/H200):
#   1. times the 204k segmenter's batch-32 training step at band-limit 50 with each SO(3)
#      transform variant (TRANSFORMS[/SO3_LAYOUT[/GRID_DTYPE]], default gamma_first, float32; a
#      bfloat16 variant, if listed, is timed but never chosen for training), and with the code
#      of BEFORE (a copy of an earlier sphere_jax, if given); the deep classifier's step at
#      band-limit 30 with dft, gamma-first (recorded, not acted on);
#      the two SO(3) layouts' logits compared at the GPU's precision (layouts-check);
#      then each of its layers alone with the fastest variant (time, GFLOP, GB, layout copies);
#   2. with SEG_MODE=input_scale (the default): issue 13's open question before any long
#      segmentation run, the 204k segmenter at band-limit 50 with inputs as they are (none1) and
#      RMS-normalised to 60 (rms60, the library's default), SCALE_STEPS steps each, two
#      processes at once (experiments.input_scale, lr 1e-3, curves in input_scale.log), then
#      CLS_ONLY runs of paper_classification (SO(3) transforms at the default, dft) in the rest
#      of TRAIN_S; with SEG_MODE=run0: run 0 of paper_segmentation (the S2CNN trained NR on
#      MNIST) beside the CLS_ONLY runs, until TRAIN_S; the S2CNN with the fastest variant;
#   3. evaluates the runs that were cut (latest best checkpoint) on all test digits, both
#      rotations: interim scores, marked as such by launch.aggregate;
#   4. aggregates and packs small files (at most 8 come back).
#
#   bash launch/gpu_window_seg.sh TRAIN_S
#
# A device command may run 10 minutes at most and a window has about 15 in all, start-up
# included. One call with DEADLINE_S=530 (training ends 530 s after the start, whatever came
# before it; packing takes seconds) and EVAL_CUT=0 (score cut runs elsewhere) fits; if the
# machine is still warm after it (30 s), a second call can go on training (SWEEP persists there).
# On an H200 (2026-11-27) one 204k variant took 40-100 s to bench, compiles included (the
# gamma-first training step alone compiles in 43 s). results/gpu/README.md has the commands.
# Env: STAGES ("bench train"; "transforms" adds experiments.benchmark --transforms_L; "profile" adds a
# traced training step per PROFILE_MODELS, time per layer and operation, in profile.tgz; "fused" adds
# experiments.fused_boundary_check (a Pallas layer-boundary kernel against XLA); "variants" adds the 204k's step
# under VARIANT_ENVS (XLA against the Pallas boundary and bfloat16 grids, one process); "share" adds launch.share_check: 1 vs 4 processes vs 4 vmapped copies
# of the small classification models, SHARE_MODELS, SHARE_PROCS, SHARE_MEMBERS, and with MPS=1 the
# processes under the MPS daemon), BEST_VARIANT (TRANSFORMS/SO3_LAYOUT to train with, instead of the
# fastest float32 "after-" row of this call's benchmarks; with no benchmarks and no BEST_VARIANT:
# dft/gamma_first, the fastest on an H200), SEG_MODE (input_scale | dtype | run0 | grid | none), SCALE_STEPS (default 600), CLS_ONLY (comma-separated run indices of paper_classification, "" for none), CLS_JOBS,
# BEFORE (a folder holding an earlier sphere_jax/; put first on PYTHONPATH, so it only works where
# sphere_jax is not pip-installed, as on the GPU host: an editable install shadows it), VARIANTS (default "dft dft/gamma_first/bfloat16": the open question after the 2026-11-27 window, where
# dft/channels_last took 108.1 ms and gamma-first 64.3; "" times none),
# DEEP_VARIANTS (the deep classifier timed at L=30, default "dft"), CALLS_MODELS / CALLS_KS (the
# run loop timed with K training steps per compiled call, default "s2cnn_cls cnn_cls_68k
# s2cnn_cls_deep" / "1,16"), STEPS_PER_CALL (K for the train stage's runs, default 1), PYTHON,
# DEADLINE_S (the train stage ends this many seconds after the script's start, whatever the
# benchmarks took; replaces TRAIN_S), SEG_MODE=none (no segmentation training), CLS_BENCH_MODELS
# (classifiers timed with DEEP_VARIANTS, default s2cnn_cls_deep; s2cnn_cls too: rows "cohen-..."),
# NOTRITON=0 (no retry without Triton GEMMs), EVAL_CUT=0 (cut runs not scored here),
# CLS_EXTRA_ONLY / CLS_EXTRA_SET (runs of paper_classification trained first with other settings,
# space-separated KEY=VALUE, in $SWEEP/extra),
# SKIP_INSTALL=1 and SMOKE=1 (CPU smoke test: tiny band-limit and steps), XLA_CACHE (the train
# stage's compilation cache, default .whl/xla). Carry .whl/ (s2fft wheel,
# .whl/data/{mnist,fashion_mnist}.npz, .whl/xla: the last window's xla_cache.tgz unpacked, at most
# 15 MB), TOGETHER (classification runs that differ only in seed and augmentation level train
# together, at most this many per process, launch.run_grid --together; default 0: no limit; ""
# each run alone), SEG_MODE=grid with SEG_ONLY (runs of paper_segmentation, default the MNIST
# CNNs 1-15) and SEG_TOGETHER (default 5: each CNN size's five levels in one program). Runs resume: unpack
# sweep_state.tgz into $SWEEP first, or let INFLIGHT (default results/inflight/inflight.tgz, a
# tracked file, so it travels with every call: launch.pack --checkpoints=inflight) be unpacked
# into an empty $SWEEP; INFLIGHT= skips it.
set -u
TRAIN_S=${1:?seconds of training}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SWEEP=${SWEEP:-/tmp/sweep}; mkdir -p "$SWEEP"
INFLIGHT=${INFLIGHT-results/inflight/inflight.tgz}
if [ -n "$INFLIGHT" ] && [ -f "$INFLIGHT" ] && [ -z "$(ls -A "$SWEEP")" ]; then
  tar xzf "$INFLIGHT" -C "$SWEEP" && echo "resuming the runs of $INFLIGHT in $SWEEP"
fi
PY=${PYTHON:-python3}
# default: the runs of paper_classification still missing, in the issue's order (after the
# second 2026-11-27 H200 window), run in this order (launch.run_grid --only keeps it): the deep
# S2CNN's MNIST runs with its 20-epoch schedule (seeds 1, 2 trained R; seed 2 NR; runs 1 and 31
# again), its FashionMNIST seed 0 (R, NR), then the 4M CNN's MNIST levels 2, 8, 16 and its two
# cut runs (4 copies, fresh), then the 1M CNN's FashionMNIST levels 8, 4, 2, 1 (runs 69-66: about
# 7 hours each on 2 CPU cores, more than a session, whose machine may be new the next time; 172 s
# on an H100 for its fresh level). The 68k and 250k CNNs' levels, and the 1M's MNIST levels, ran on
# CPU (results/classification/README.md).
CLS_ONLY=${CLS_ONLY-35,36,32,1,31,52,50,24,26,27,25,28,69,68,67,66}
CLS_JOBS=${CLS_JOBS:-2}
SEG_MODE=${SEG_MODE:-input_scale}
SCALE_STEPS=${SCALE_STEPS:-600}
STAGES=${STAGES:-bench train}
VARIANTS=${VARIANTS-dft dft/gamma_first/bfloat16}  # fft: 1.4x slower than dft on an H100 (2026-11-26)
if [ -z "${SKIP_INSTALL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
  $PY -c "import jax; print(jax.__version__, jax.devices())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# the chip's exact description, for compiling its programs on a CPU afterwards (sphere_jax.aot):
# cut it out of env.txt between the markers into a file and pass that file as --aot=FILE
{ echo "--- GpuTargetConfig begin"
  $PY -c "from sphere_jax import aot; print(aot.device_target_config())" 2>&1 | tail -60
  echo "--- GpuTargetConfig end"; } >> "$OUT/env.txt"
if [ -n "${SMOKE:-}" ]; then
  L=12; CLS_L=30; SEG_SET=(--set steps=${SMOKE_STEPS:-6} --set eval_every=3 --set checkpoint_every=3 --set n_holdout=32 --set L=8 --set n_test=64)
  CLS_SET=(--set steps=${SMOKE_STEPS:-6} --set eval_every=3 --set checkpoint_every=3 --set n_holdout=32 --set L=30 --set n_test=64)
  EVAL_N=64; SCALE_STEPS=${SMOKE_STEPS:-6}; CALLS_SET=(--steps=4 --rounds=1); CALLS_KS=${CALLS_KS:-1,2}
  CALLS_MODELS=${CALLS_MODELS-cnn_cls_68k}
else
  L=50; CLS_L=30; SEG_SET=(); CLS_SET=(); EVAL_N=0; CALLS_SET=()
fi
export SPHERE_JAX_STEPS_PER_CALL=${STEPS_PER_CALL:-1}  # every training run of the train stage

# 1. the segmenter's training step per variant (and before), one process each, nothing else running
bench() {  # bench LABEL PYTHONPATH TRANSFORMS[/SO3_LAYOUT[/GRID_DTYPE]] COST [MODEL L]
  local tr lay dt; IFS=/ read -r tr lay dt <<< "$3"
  SPHERE_JAX_TRANSFORMS=$tr SPHERE_JAX_SO3_LAYOUT=${lay:-gamma_first} SPHERE_JAX_GRID_DTYPE=${dt:-float32} \
    PYTHONPATH=$2 $PY - "$1" "${6:-$L}" "$4" "${5:-s2cnn_204k}" <<'PY' > "$OUT/.bench.out" 2>&1
import json, os, sys
from sphere_jax import benchmark as b
case = dict(model=sys.argv[4], L=int(sys.argv[2]), infer_batches=[32], train_batch=32, repeats=5,
            cost=sys.argv[3] == "1")
try:
    row = b.run_case(case)
except Exception as e:  # a variant that does not compile is a result too
    row = dict(model=case["model"], L=case["L"], error=f"{type(e).__name__}: {str(e)[:300]}")
from sphere_jax import harmonics as hm
row.update(label=sys.argv[1], transforms=os.environ["SPHERE_JAX_TRANSFORMS"],
           so3_layout=getattr(hm, "so3_layout", lambda: "channels_last")(),  # in effect (fft: channels_last)
           grid_dtype=os.environ["SPHERE_JAX_GRID_DTYPE"], xla_flags=os.environ.get("XLA_FLAGS", ""))
print(json.dumps(row), flush=True)
PY
  if grep -q '^{' "$OUT/.bench.out"; then grep '^{' "$OUT/.bench.out" >> "$OUT/benchmark.jsonl"
  else  # the process died before its JSON line (a crash outside the try, a kill): a row all the same
    $PY -c 'import json, sys; print(json.dumps({"label": sys.argv[1], "model": sys.argv[2], "variant": sys.argv[3],
            "error": "no result: " + open(sys.argv[4]).read()[-300:]}))' "$1" "${5:-s2cnn_204k}" "$3" "$OUT/.bench.out" \
      >> "$OUT/benchmark.jsonl"
  fi
  rm -f "$OUT/.bench.out"
  tail -1 "$OUT/benchmark.jsonl" | cut -c1-400
}
failed() {  # failed LABEL: did the row of LABEL end in an error (or not appear at all)?
  $PY - "$OUT/benchmark.jsonl" "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if r.get("label") == sys.argv[2]]
sys.exit(0 if not rows or "error" in rows[-1] else 1)
PY
}
# a dft variant that does not compile (XLA's Triton GEMM autotuner failed on the classifiers'
# older dft dots) is tried once more without Triton GEMMs: rows "...-notriton", recorded only
notriton() {  # notriton LABEL ARGS...: bench again with --xla_gpu_enable_triton_gemm=false if LABEL failed
  local label=$1; shift
  if [ "${NOTRITON:-1}" != 0 ] && failed "$label"; then
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" bench "$label-notriton" "$@"
  fi
}
: > "$OUT/benchmark.jsonl"
BASE=${PYTHONPATH:-}
stage() { [[ " $STAGES " == *" $1 "* ]]; }
if stage bench; then
for v in $VARIANTS; do bench "after-$v" "$BASE" "$v" 1; [ "${v%%/*}" = dft ] && notriton "after-$v" "$BASE" "$v" 1; done
if [ -n "${BEFORE:-}" ]; then bench "before-dft" "$(cd "$BEFORE" && pwd):$BASE" dft 0; fi
# the deep classifier (the classification grid's costliest model): gamma-first dft compiled for it
# on an H200 (2026-11-27, 4.60 ms per step; the Triton GEMM autotuner failed on the older
# channels-last dft dots). Recorded only (label "deep-..."); DEEP_VARIANTS="" skips
for m in ${CLS_BENCH_MODELS:-s2cnn_cls_deep}; do
  case $m in s2cnn_cls_deep) p=deep ;; s2cnn_cls) p=cohen ;; *) p=$m ;; esac
  for v in ${DEEP_VARIANTS-dft}; do  # fft: 13.0 ms per step on the H200 (results/classification)
    bench "$p-$v" "$BASE" "$v" 1 "$m" "$CLS_L"
    [ "${v%%/*}" = dft ] && notriton "$p-$v" "$BASE" "$v" 1 "$m" "$CLS_L"
  done
done
# the run loop with 1 and with 16 training steps per compiled call (batches made inside the call):
# how much of a small classifier's run loop is the host's work (batch, dispatch) rather than its
# step (1.06 ms for the Cohen classifier alone on the H200)? Rows "steps-per-call"
# (launch.steps_per_call_check); the train stage uses STEPS_PER_CALL. CALLS_MODELS="" skips it
for m in ${CALLS_MODELS-s2cnn_cls cnn_cls_68k s2cnn_cls_deep}; do
  $PY -m launch.steps_per_call_check --model="$m" --L="$CLS_L" --ks="${CALLS_KS:-1,16}" "${CALLS_SET[@]}" \
    --source=npz --digits_npz="$PWD/.whl/data/mnist.npz" --n_train=0 --label=steps-per-call 2>&1 \
    | grep '^{' >> "$OUT/benchmark.jsonl"
  grep '"label": "steps-per-call"' "$OUT/benchmark.jsonl" | tail -2 | cut -c1-300
done
# the two SO(3) layouts at the GPU's default precision: the same logits? (label "layouts-check";
# if they differ by 1e-2 of their scale or more, or the check fails, training stays channels-last;
# LAYOUT_CHECK=0 skips it, about half a minute)
if [ "${LAYOUT_CHECK:-1}" != 0 ]; then
  SPHERE_JAX_TRANSFORMS=dft $PY - "$L" <<'PY' 2>&1 | grep '^{' >> "$OUT/benchmark.jsonl"
import json, sys
from sphere_jax import benchmark as b
case = dict(layout_model="s2cnn_204k", L=int(sys.argv[1]), batch=4, rounds=1, what="infer")
try:
    row = b.layout_case(case)
except Exception as e:
    row = dict(model=case["layout_model"], error=f"{type(e).__name__}: {str(e)[:300]}")
row.update(label="layouts-check")
print(json.dumps(row), flush=True)
PY
  tail -1 "$OUT/benchmark.jsonl" | cut -c1-400
fi
fi  # stage bench
BEST=$($PY - "$OUT/benchmark.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
check = [r for r in rows if r["label"] == "layouts-check"]
gf_ok = not check or ("error" not in check[-1] and check[-1]["max_rel_diff"] < 1e-2)  # else: train channels-last
ok = [r for r in rows if r["label"].startswith("after-") and "train_step_s" in r
      and not r["label"].endswith("-notriton")  # needs an XLA flag that training does not get
      and r.get("grid_dtype", "float32") == "float32"  # bfloat16 grids are timed, not trained with
      and (gf_ok or r.get("so3_layout") != "gamma_first")]
best = min(ok, key=lambda r: r["train_step_s"]) if ok else {"transforms": "dft", "so3_layout": "gamma_first"}  # H200, 2026-11-27
print(best["transforms"] + " " + best.get("so3_layout", "channels_last"))
PY
)
read -r BEST BEST_LAYOUT <<< "$BEST"
if [ -n "${BEST_VARIANT:-}" ]; then IFS=/ read -r BEST BEST_LAYOUT <<< "$BEST_VARIANT"; BEST_LAYOUT=${BEST_LAYOUT:-gamma_first}; fi
export SPHERE_JAX_SO3_LAYOUT=$BEST_LAYOUT SPHERE_JAX_GRID_DTYPE=float32 SPHERE_JAX_COEFF_DTYPE=float32  # layout: read with "dft" only
# where the step's time and bytes go: each layer's forward + backward alone (one more line of
# benchmark.jsonl, label "layers-$BEST"); LAYERS=0 skips it (about a minute)
if stage bench && [ "${LAYERS:-1}" != 0 ]; then
  SPHERE_JAX_TRANSFORMS=$BEST $PY - "$BEST" "$L" <<'PY' 2>&1 | grep '^{' >> "$OUT/benchmark.jsonl"
import json, sys
from sphere_jax import benchmark as b
try:
    row = b.layer_case(dict(layers="s2cnn_204k", L=int(sys.argv[2]), batch=32, repeats=5))
except Exception as e:
    row = dict(model="s2cnn_204k", error=f"{type(e).__name__}: {str(e)[:300]}")
row.update(label=f"layers-{sys.argv[1]}", transforms=sys.argv[1])
print(json.dumps(row), flush=True)
PY
fi
echo "benchmarks done after $(( $(date +%s) - T0 )) s; the segmenter trains with SPHERE_JAX_TRANSFORMS=$BEST SPHERE_JAX_SO3_LAYOUT=$BEST_LAYOUT" | tee -a "$OUT/env.txt"

# 1a. (STAGES with "transforms") issue 10's side-by-side of the transform implementations (dft,
# fft, s2fft) at TRANSFORMS_L (default 10,30,50): first use, S2 / SO(3) forward and inverse
# times, peak device memory; $OUT/transforms/transforms.{json,md}
if stage transforms; then
  $PY -m experiments.benchmark --transforms_L="${TRANSFORMS_L:-10,30,50}" --out="$OUT/transforms" 2>&1 \
    | grep '^|' | tee -a "$OUT/env.txt"
fi

# 1b. (STAGES with "share") do several runs on the GPU add throughput for the small models of the
# classification grid? launch.share_check with 1 and 4 processes, and 4 vmapped copies in one
# process (rows "share" in benchmark.jsonl); with MPS=1 the processes again under the MPS daemon
# (rows "share-mps"), stopped right after.
share_L() {  # a model's band-limit here: the segmentation one for segmenters (the registry says which)
  $PY -c 'import sys; from sphere_jax.models import cnn, s2cnn
print(sys.argv[2] if sys.argv[1] in {**s2cnn.SEGMENTERS, **cnn.SEGMENTERS} else sys.argv[3])' "$1" "$L" "$CLS_L"
}
if stage share; then
  # the segmentation CNNs (SHARE_MODELS="cnn_218k cnn_5_5m") at the segmentation band-limit
  for m in ${SHARE_MODELS:-s2cnn_cls cnn_cls_4m}; do
    $PY -m launch.share_check --model="$m" --L="$(share_L "$m")" --procs="${SHARE_PROCS:-1,4}" --members="${SHARE_MEMBERS-4}" \
      --seconds=5 --label=share \
      2>&1 | grep '^{' >> "$OUT/benchmark.jsonl"
  done
  if [ -n "${MPS:-}" ] && command -v nvidia-cuda-mps-control > /dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d; then
      for m in ${SHARE_MODELS:-s2cnn_cls cnn_cls_4m}; do
        $PY -m launch.share_check --model="$m" --L="$(share_L "$m")" --procs="${SHARE_PROCS:-1,4}" --seconds=5 --label=share-mps \
          2>&1 | grep '^{' >> "$OUT/benchmark.jsonl"
      done
      echo quit | nvidia-cuda-mps-control
    fi
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  elif [ -n "${MPS:-}" ]; then
    echo "MPS=1: nvidia-cuda-mps-control not found" | tee -a "$OUT/env.txt"
  fi
  grep '"label": "share' "$OUT/benchmark.jsonl" | cut -c1-300
fi

# 1c. (STAGES with "profile") issue 10: where the step's time goes on this GPU, per layer,
# forward / backward and operation: PROFILE_MODELS (default "s2cnn_204k cnn_218k s2cnn_cls_deep", each at
# its study band-limit, batch 32) traced for 3 steps with the best variant; profile.tgz holds
# profile.json, profile.md, profile.log and the gzipped traces (read them with
# jax.profiler.ProfileData).
# About a minute per model, compiles included.
# Kernels in CUDA graphs carry the graph's annotation, not their own op: command buffers are off
# for the trace (PROFILE_XLA_FLAGS), and the profile runs again without that flag if no model
# gave a result. At most 240 s per model (a compile of the 204k step takes 43 s on an H200).
if stage profile; then
  prof_L=(); [ -n "${SMOKE:-}" ] && prof_L=(--reduced)  # CPU: small band-limits, each model's minimum
  : > "$OUT/.profile.log"
  profile_run() {
    local flags; flags=$(echo ${XLA_FLAGS:-} $1)  # no stray space: XLA reads " " as a file name
    echo "== XLA_FLAGS='$flags'" >> "$OUT/.profile.log"
    SPHERE_JAX_TRANSFORMS=$BEST XLA_FLAGS="$flags" $PY -m experiments.benchmark \
      --profile="$(echo ${PROFILE_MODELS:-s2cnn_204k cnn_218k s2cnn_cls_deep} | tr ' ' ,)" "${prof_L[@]}" --train_batch=32 \
      --profile_steps=3 --profile_keep_trace --timeout=240 --out="$OUT/profile" >> "$OUT/.profile.log" 2>&1
  }
  profile_run "${PROFILE_XLA_FLAGS---xla_gpu_enable_command_buffer=}"
  if ! grep -q '"traced_ms"' "$OUT/profile/profile.json" 2>/dev/null; then
    echo "profile with '${PROFILE_XLA_FLAGS---xla_gpu_enable_command_buffer=}' gave no result; again without it" | tee -a "$OUT/env.txt"
    profile_run ""
  fi
  grep -E '^(###|\||wrote|.*error)' "$OUT/.profile.log" | head -120 | tee -a "$OUT/env.txt"
  mkdir -p "$OUT/profile" && mv "$OUT/.profile.log" "$OUT/profile/profile.log"
  # a file over 16 MB would not come back: traces over 4 MB stay here, so that three of them and
  # profile.json (which has the numbers) fit in profile.tgz
  find "$OUT/profile" -name '*.xplane.pb.gz' -size +4M -print -delete | sed 's/^/dropped (too big): /' | tee -a "$OUT/env.txt"
  tar czf "$OUT/profile.tgz" -C "$OUT" profile && rm -rf "$OUT/profile"
fi

# 1d. (STAGES with "fused") issue 10: can one Pallas kernel beat XLA at a layer boundary (the
# inverse transform's last matmul, bias, ReLU and the next layer's first matmul, the grid kept on
# chip; sphere_jax.boundary)? experiments.fused_boundary_check at the 204k's first SO(3) boundary,
# batch 32, at DEFAULT (TF32) and TF32x3 precision, FUSED_BLOCKS columns per program (default
# "64 128 256"): rows "fused-boundary" in benchmark.jsonl. At most FUSED_TIMEOUT s per block (default
# 80). On 2026-11-28 both blocks timed out at 200 s on an H200 with HIGHEST (IEEE float32 dots,
# no tensor cores) tried first, which Triton unrolls into a very long kernel: left out now; a run
# that still hangs prints every thread's Python stack after FUSED_TIMEOUT - 20 s into env.txt.
if stage fused; then
  fused_args=(--repeats=10); [ -n "${SMOKE:-}" ] && fused_args=(--interpret --Z=3000)
  ft=${FUSED_TIMEOUT:-80}
  for blk in ${FUSED_BLOCKS:-64 128 256}; do  # columns per program: register pressure against parallelism
    timeout "$ft" $PY -m experiments.fused_boundary_check "${fused_args[@]}" --block="$blk" --hang_s=$(( ft - 20 )) \
      > "$OUT/fused_$blk.log" 2>&1
    echo "fused_boundary_check --block=$blk: exit $?" | tee -a "$OUT/env.txt"
    grep '^{' "$OUT/fused_$blk.log" >> "$OUT/benchmark.jsonl"
    grep -v '^{' "$OUT/fused_$blk.log" | tail -40 >> "$OUT/env.txt"
    rm -f "$OUT/fused_$blk.log"
  done
  grep '"label": "fused-boundary"' "$OUT/benchmark.jsonl" | cut -c1-400 | tee -a "$OUT/env.txt"
fi

# 1e. (STAGES with "variants") issue 10: the training steps of VARIANT_MODELS (default the 204k at
# L=50 and the deep classifier at L=30) and the inference of VARIANT_INFER_MODELS (the 204k), batch 32
# (VARIANT_WHAT, default "train infer"), under each setting of VARIANT_ENVS in one process, timed
# alternately against the first (experiments.benchmark --variants): XLA's boundaries, the Pallas
# boundary kernel (SPHERE_JAX_BOUNDARY=pallas) with the block of columns that was fastest in the
# fused stage (forward + backward, TF32), and bfloat16 grids. The Pallas variant is left out
# unless the fused stage ran in this call and its kernel gave a row without an error (a kernel
# that hangs in its compile would take the whole process with it). Rows "variants-train" /
# "variants-infer" in benchmark.jsonl, tables in env.txt; at most VARIANT_TIMEOUT s per model and
# what (default 240).
if stage variants; then
  best_block=$($PY - "$OUT/benchmark.jsonl" <<'PY'
import json, sys
try:
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
except OSError:
    rows = []
ok = [r for r in rows if r.get("label") == "fused-boundary" and "error" not in r and r.get("precision") == "default"
      and "rel_out" in r and r["rel_out"] < 1e-2]
timed = [r for r in ok if r.get("fused_fwd_bwd_s")]
print(min(timed, key=lambda r: r["fused_fwd_bwd_s"])["block"] if timed else (ok[0]["block"] if ok else ""))
PY
)
  pallas=""; [ -n "$best_block" ] && pallas=",pallas$best_block:SPHERE_JAX_BOUNDARY=pallas+SPHERE_JAX_BOUNDARY_BLOCK=$best_block"
  envs=${VARIANT_ENVS:-xla:SPHERE_JAX_BOUNDARY=xla$pallas,bf16:SPHERE_JAX_GRID_DTYPE=bfloat16}
  echo "variants: $envs (fused stage's best block: ${best_block:-none})" | tee -a "$OUT/env.txt"
  var_args=(--train_batch=32 --infer_batches=32 --repeats=${VARIANT_ROUNDS:-6})  # each model at its study band-limit
  [ -n "${SMOKE:-}" ] && var_args=(--L=12 --train_batch=2 --infer_batches=2 --repeats=2)
  for what in ${VARIANT_WHAT:-train infer}; do
    if [ "$what" = train ]; then models=${VARIANT_MODELS:-s2cnn_204k s2cnn_cls_deep}; else models=${VARIANT_INFER_MODELS:-s2cnn_204k}; fi
    [ -n "${SMOKE:-}" ] && models=s2cnn_204k  # the deep classifier needs L >= 30
    SPHERE_JAX_TRANSFORMS=dft SPHERE_JAX_SO3_LAYOUT=gamma_first $PY -m experiments.benchmark \
      --variants="$(echo $models | tr ' ' ,)" --env_variants="$envs" --layouts_what="$what" \
      "${var_args[@]}" --timeout="${VARIANT_TIMEOUT:-240}" --out="$OUT/variants_$what" > "$OUT/.variants.log" 2>&1
    echo "variants ($what): exit $?" | tee -a "$OUT/env.txt"
    grep '^{' "$OUT/.variants.log" | $PY -c 'import json, sys
for l in sys.stdin:
    r = json.loads(l); r["label"] = "variants-" + sys.argv[1]; print(json.dumps(r))' "$what" >> "$OUT/benchmark.jsonl"
    grep -v '^{' "$OUT/.variants.log" | tail -20 | tee -a "$OUT/env.txt"
    rm -rf "$OUT/.variants.log" "$OUT/variants_$what"
  done
fi

# 2. training: the S2CNN segmenter (run 0) beside classification runs, until TRAIN_S
if stage train; then
T_TRAIN=$(date +%s)
# the runs' compiled programs: loaded from, and added to, the cache carried in .whl/xla (XLA_CACHE
# overrides), which comes back as xla_cache.tgz; a bare machine otherwise compiles every model
# again (the 204k segmenter's training step: 43 s on an H200). The benchmarks above never use it.
if [ -n "${SMOKE:-}" ]; then XLA_CACHE=${XLA_CACHE:-$SWEEP/xla}; fi  # CPU programs stay out of .whl
export SPHERE_JAX_COMPILATION_CACHE=${XLA_CACHE:-$PWD/.whl/xla}
mkdir -p "$SPHERE_JAX_COMPILATION_CACHE"
echo "compilation cache $SPHERE_JAX_COMPILATION_CACHE: $(find "$SPHERE_JAX_COMPILATION_CACHE" -type f | wc -l) files carried" \
  | tee -a "$OUT/env.txt"
if [ -n "${DEADLINE_S:-}" ]; then  # training ends DEADLINE_S seconds after the script's start
  TRAIN_S=$(( DEADLINE_S - (T_TRAIN - T0) ))
  echo "training for $TRAIN_S s (deadline $DEADLINE_S s after the start)" | tee -a "$OUT/env.txt"
fi
data_flags=(--python="$PY" --set source=npz --set "digits_npz=$PWD/.whl/data/{dataset}.npz")
common=(--root="$SWEEP" "${data_flags[@]}")
SEG_PIDS=()
if [ "$SEG_MODE" = run0 ]; then
  SPHERE_JAX_TRANSFORMS=$BEST timeout -s TERM "$TRAIN_S" $PY -m launch.run_grid --grid=paper_segmentation --only=0 \
    --jobs=1 "${common[@]}" "${SEG_SET[@]}" > "$OUT/sweep_seg.log" 2>&1 &
  SEG_PIDS+=($!)
elif [ "$SEG_MODE" = grid ]; then  # the segmentation CNNs, several runs per program, beside the classification runs
  seg_group=(); [ -n "${SEG_TOGETHER-5}" ] && seg_group=(--together="${SEG_TOGETHER-5}")
  cnn_L=(); [ -n "${SMOKE:-}" ] && cnn_L=(--set L=12)  # the CNNs' valid convolutions need L >= 12
  timeout -s TERM "$TRAIN_S" $PY -m launch.run_grid --grid=paper_segmentation --only="${SEG_ONLY:-1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}" \
    --jobs=1 "${seg_group[@]}" "${common[@]}" "${SEG_SET[@]}" "${cnn_L[@]}" > "$OUT/sweep_seg.log" 2>&1 &
  SEG_PIDS+=($!)
elif [ "$SEG_MODE" != none ]; then  # one process per variant, alone on the GPU (the S2CNN trains 2.8x slower beside other
      # runs); each line of input_scale.log starts with its variant. The classification runs
      # get what is left of TRAIN_S. SEG_MODE=dtype: issue 10's question whether bfloat16 grids
      # (0.67x the float32 step on an H200) learn as well: the same run (rms60, the library's
      # input scale, seed 0) under each of DTYPES (default "float32 bfloat16/bfloat16": GRID[/COEFF],
      # SPHERE_JAX_GRID_DTYPE and SPHERE_JAX_COEFF_DTYPE); lines start with that token, e.g.
      # "float32 rms60" or "bfloat16/bfloat16 rms60".
  mkdir -p "$SWEEP/input_scale"; : > "$OUT/input_scale.log"
  if [ "$SEG_MODE" = dtype ]; then runs=""; for d in ${DTYPES:-float32 bfloat16/bfloat16}; do runs="$runs $d:rms60"; done
  else runs="float32:none1 float32:rms60"; fi
  for dv in $runs; do
    dd=${dv%%:*}; v=${dv#*:}; tag=""; [ "$SEG_MODE" = dtype ] && tag="$dd "
    dt=${dd%%/*}; ct=float32; [ "$dd" != "$dt" ] && ct=${dd#*/}
    SPHERE_JAX_GRID_DTYPE=$dt SPHERE_JAX_COEFF_DTYPE=$ct SPHERE_JAX_TRANSFORMS=$BEST timeout -s TERM "$TRAIN_S" $PY -m experiments.input_scale --model=s2cnn_204k \
      --L="$L" --steps="$SCALE_STEPS" --eval_every=$(( SCALE_STEPS / 4 > 0 ? SCALE_STEPS / 4 : 1 )) \
      --learning_rate=1e-3 --variants=$v --n_test=$(( EVAL_N > 0 ? EVAL_N : 1000 )) \
      --digits_npz="$PWD/.whl/data/mnist.npz" --out="$SWEEP/input_scale/seg_L${L}_$v${tag:+_${dd//\//_}}" 2>&1 \
      | sed -u "s|^|$tag|" >> "$OUT/input_scale.log" &
    SEG_PIDS+=($!)
  done
  wait "${SEG_PIDS[@]}"; SEG_PIDS=()
  echo "input-scale runs stopped after $(( $(date +%s) - T_TRAIN )) s of training time" | tee -a "$OUT/env.txt"
fi
CLS_S=$(( TRAIN_S - ($(date +%s) - T_TRAIN) ))
: > "$OUT/sweep_cls.log"
# extra runs first: runs of paper_classification with other settings (CLS_EXTRA_SET, e.g.
# "patience=0" for the reference's 20 epochs), in their own root $SWEEP/extra since their configs
# differ from the grid's; one at a time
if [ -n "${CLS_EXTRA_ONLY:-}" ] && [ "$CLS_S" -gt 30 ]; then
  extra=(); for kv in ${CLS_EXTRA_SET:-}; do extra+=(--set "$kv"); done
  echo "== extra runs $CLS_EXTRA_ONLY (${CLS_EXTRA_SET:-}) in $SWEEP/extra" >> "$OUT/sweep_cls.log"
  timeout -s TERM "$CLS_S" $PY -m launch.run_grid --grid=paper_classification --only="$CLS_EXTRA_ONLY" \
    --jobs=1 --root="$SWEEP/extra" "${data_flags[@]}" "${CLS_SET[@]}" "${extra[@]}" >> "$OUT/sweep_cls.log" 2>&1
  CLS_S=$(( TRAIN_S - ($(date +%s) - T_TRAIN) ))
fi
if [ -n "$CLS_ONLY" ] && [ "$CLS_S" -gt 30 ]; then
  # TOGETHER=N (default 0, no limit; "" turns it off): runs that differ only in their seed and
  # augmentation level train together, at most N in one program (runner.fit_members; by default
  # the deep S2CNN's 35+36 and 32+1+31, the 4M CNN's levels 24+26+27+25+28)
  group=(); [ -n "${TOGETHER-0}" ] && group=(--together="${TOGETHER-0}")
  timeout -s TERM "$CLS_S" $PY -m launch.run_grid --grid=paper_classification --only="$CLS_ONLY" \
    --jobs="$CLS_JOBS" "${group[@]}" "${common[@]}" "${CLS_SET[@]}" >> "$OUT/sweep_cls.log" 2>&1
  rc=$?
  CLS_S=$(( TRAIN_S - ($(date +%s) - T_TRAIN) ))
  # a run that failed with K > 1 steps per call or trained together with others (new code on this
  # jax) is retried alone with K = 1 in the time left; rc 124: the timeout stopped the sweep,
  # nothing failed
  if [ "$rc" != 0 ] && [ "$rc" != 124 ] && { [ "$SPHERE_JAX_STEPS_PER_CALL" != 1 ] || [ ${#group[@]} -gt 0 ]; } \
      && [ "$CLS_S" -gt 60 ]; then
    echo "run_grid exited $rc with K=$SPHERE_JAX_STEPS_PER_CALL ${group[*]}; retrying with K=1, one run per process, for $CLS_S s" | tee -a "$OUT/env.txt"
    SPHERE_JAX_STEPS_PER_CALL=1 timeout -s TERM "$CLS_S" $PY -m launch.run_grid --grid=paper_classification \
      --only="$CLS_ONLY" --jobs="$CLS_JOBS" "${common[@]}" "${CLS_SET[@]}" >> "$OUT/sweep_cls.log" 2>&1
  fi
fi
[ ${#SEG_PIDS[@]} -gt 0 ] && wait "${SEG_PIDS[@]}"
echo "training stopped after $(( $(date +%s) - T0 )) s" | tee -a "$OUT/env.txt"

# 3. interim scores of the runs that were cut: best checkpoint, all test digits, both rotations
# (EVAL_CUT=0 skips it: score them from sweep_state.tgz on another machine)
[ "${EVAL_CUT:-1}" = 0 ] && : > "$SWEEP/cut_runs.txt" || $PY - "$SWEEP" <<'PY' > "$SWEEP/cut_runs.txt"
import json, os, sys
from launch.run_grid import final_test, read_records
for d, _, files in os.walk(sys.argv[1]):
    if "config.json" in files and os.path.isdir(os.path.join(d, "best")) and not final_test(read_records(d)):
        print(d)
PY
while read -r wd; do
  [ -z "$wd" ] && continue
  case "$wd" in */segment/*) export SPHERE_JAX_TRANSFORMS=$BEST ;; *) unset SPHERE_JAX_TRANSFORMS ;; esac
  for rot in so3 none; do
    $PY -m experiments.evaluate --workdir="$wd" --test_rotation=$rot --n_test=$EVAL_N 2>&1 | tail -6
  done
done < "$SWEEP/cut_runs.txt" > "$OUT/interim.log"
unset SPHERE_JAX_TRANSFORMS
echo "interim evaluations done after $(( $(date +%s) - T0 )) s" | tee -a "$OUT/env.txt"
fi  # stage train

# 4. aggregate and pack (at most 7 files in $OUT, of the 8 that may come back: env.txt,
#    benchmark.jsonl (left out when no benchmark ran), profile.tgz (with the profile stage),
#    logs.tgz (sweep_seg.log or input_scale.log, sweep_cls.log, interim.log), sweep_meta.tgz
#    with every run's metadata and the aggregate, sweep_state.tgz with the S2CNN runs' best and
#    latest checkpoints, xla_cache.tgz; the caller's own tee makes 8)
[ -s "$OUT/benchmark.jsonl" ] || rm -f "$OUT/benchmark.jsonl"
$PY -m launch.aggregate --root="$SWEEP" --out="$SWEEP/aggregate" > /dev/null 2>> "$OUT/env.txt"
$PY -m launch.pack --sweep="$SWEEP" --out="$OUT" --checkpoints=state --cache="${SPHERE_JAX_COMPILATION_CACHE:-}"
logs=(); for f in sweep_seg.log input_scale.log sweep_cls.log interim.log; do [ -f "$OUT/$f" ] && logs+=("$f"); done
if [ ${#logs[@]} -gt 0 ] && tar czf "$OUT/logs.tgz" -C "$OUT" "${logs[@]}"; then (cd "$OUT" && rm -f "${logs[@]}"); fi
echo "done after $(( $(date +%s) - T0 )) s"
