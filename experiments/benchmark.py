"""Benchmark the study's models: python -m experiments.benchmark [--reduced] [--out=DIR].

Writes DIR/benchmark.json (one row per model), DIR/benchmark.md (a table) and
DIR/latency_vs_batch.png (inference latency against batch size); with --torch also
DIR/vs_torch.md: each planar CNN against its PyTorch twin, timed in the same run. Without --reduced (or with
--full): the study's band-limits (50 segmentation, 30 classification) and inference batches
1..64, meant for a GPU; --reduced: small band-limits (12 / 10, raised to what a model needs)
and batches 1, 4, 16 for a CPU. --layers=MODEL,...: instead, each equivariant layer of these S2CNNs
compiled alone (forward + backward at --train_batch) with its cost analysis, the bytes of its
layout copies and (unless --repeats=0) its time: DIR/layers.json and DIR/layers.md.
--layouts=MODEL,...: each S2CNN under both SO(3) layouts in one process, timed alternately
(DIR/layouts.json: times, paired ratio, XLA temporaries, tables, output difference).
--variants=MODEL,... with --env_variants=NAME:VAR=VAL+VAR=VAL,...: each model under each setting of
environment variables in one process, timed alternately against the first (DIR/variants.json and
DIR/variants.md: times, paired ratios, cost analysis, XLA temporaries, output difference); e.g.
SPHERE_JAX_BOUNDARY=xla against pallas, SPHERE_JAX_GRID_DTYPE=float32 against bfloat16.
--aot=TARGET (h200, h100 or a target-config file): instead of timing, compile each --models training
step (--train_batch) for that GPU on this machine, which needs JAX's CUDA plugin but no GPU, and
report its kernels by kind, their bytes (XLA's generic cost analysis), layout copies and memory;
with --env_variants, once per setting (DIR/aot.json, DIR/aot.md; sphere_jax.aot). With
--layouts_what=infer it compiles the inference program instead (batch --train_batch).
--profile=MODEL,...: trace a few training steps of each model and attribute the traced time to
layers, forward / backward and operations (DIR/profile.json, DIR/profile.md; sphere_jax.profiling).
Every model is measured in its own subprocess (peak RSS).
"""
import json
import os

from absl import app, flags

from sphere_jax import benchmark

FLAGS = flags.FLAGS
FULL_MODELS = ["s2cnn_cls", "s2cnn_cls_deep", "s2cnn_204k", "cnn_cls_68k", "cnn_cls_250k", "cnn_cls_500k",
               "cnn_cls_1m", "cnn_cls_4m", "cnn_218k", "cnn_1m", "cnn_5_5m"]
# s2cnn_cls_deep needs L >= 30: left out of the CPU default.
REDUCED_MODELS = [m for m in FULL_MODELS if m != "s2cnn_cls_deep"]
FULL_BATCHES = [1, 2, 4, 8, 16, 32, 64]
REDUCED_BATCHES = [1, 4, 16]

flags.DEFINE_bool("reduced", False, "small band-limits and batches (CPU run) instead of the study's sizes")
flags.DEFINE_bool("full", False, "the study's sizes (the default; an error together with --reduced)")
flags.DEFINE_list("models", None, f"models to measure (default: {','.join(FULL_MODELS)}; without s2cnn_cls_deep when --reduced)")
flags.DEFINE_list("infer_batches", None, f"inference batch sizes (default {FULL_BATCHES}; --reduced: {REDUCED_BATCHES})")
flags.DEFINE_integer("L", None, "band-limit for every model (default: per model, see sphere_jax.benchmark.study_L)")
flags.DEFINE_integer("train_batch", 32, "batch size of the measured training step (0: skip)")
flags.DEFINE_integer("seg_train_batch", 1, "training batch for S2CNN segmenters (the reference was timed at 1)")
flags.DEFINE_integer("repeats", 3, "timed repetitions after warm-up (median)")
flags.DEFINE_list("roofline_models", None, "models that also measure the transform roofline (default: S2CNN classifiers)")
flags.DEFINE_integer("timeout", 1800, "seconds per model before it is reported as an error")
flags.DEFINE_string("out", "benchmark_results", "output directory")
flags.DEFINE_list("transforms_L", None, "instead of models: compare the transform implementations "
                  "(dft, fft, s2fft) at these band-limits, e.g. 10,30,50 (writes transforms.json / .md)")
flags.DEFINE_list("transforms", ["dft", "fft", "s2fft"], "implementations for --transforms_L")
flags.DEFINE_integer("transform_signals", 16, "--transforms_L: batch x channels = this x 1 real signals")
flags.DEFINE_list("layers", None, "instead of whole models: per-layer accounting of these S2CNN models (each "
                  "layer's forward + backward compiled alone at --train_batch: GFLOP, GB, layout-copy GB, and time "
                  "unless --repeats=0); writes layers.json and layers.md")
flags.DEFINE_list("layouts", None, "instead of whole models: these S2CNNs built under each SO(3) layout "
                  "(channels_last, gamma_first) in one process, timed alternately (--layouts_what, --train_batch or "
                  "the first --infer_batches, --repeats rounds); writes layouts.json")
flags.DEFINE_list("profile", None, "instead of whole models: trace --profile_steps training steps of each model "
                  "(--L or its study band-limit, --train_batch) and say where the time goes per layer, direction "
                  "and operation (sphere_jax.profiling); writes profile.json and profile.md")
flags.DEFINE_integer("profile_steps", 3, "--profile: traced steps (after 2 + this many untraced ones, which give "
                     "the wall time per step)")
flags.DEFINE_bool("profile_keep_trace", False, "--profile: also keep each trace in DIR, gzipped "
                  "(profile_MODEL_L.._b...xplane.pb.gz; read it with jax.profiler.ProfileData)")
flags.DEFINE_enum("layouts_what", "train", ["train", "infer"],
                  "--layouts, --variants: time the training step or inference; --aot: compile which of them")
flags.DEFINE_list("variants", None, "instead of whole models: these models under each of --env_variants in one "
                  "process, timed alternately (--layouts_what, --train_batch, --repeats rounds); writes variants.json/.md")
flags.DEFINE_list("env_variants", ["xla:SPHERE_JAX_BOUNDARY=xla", "pallas:SPHERE_JAX_BOUNDARY=pallas"],
                  "--variants: NAME:VAR=VAL+VAR=VAL per variant; the first is the reference")
flags.DEFINE_string("aot", None, "instead of timing: compile each of --models' training step (--train_batch, --L or "
                    "its study band-limit) for this GPU without one: a name of sphere_jax.aot.TARGETS or a "
                    "target-config file (needs JAX's CUDA plugin, not a GPU); once per --env_variants setting "
                    "when that flag is given. Writes aot.json and aot.md")
flags.DEFINE_bool("torch", False, "also time each planar CNN against its PyTorch twin (experiments/torch_twin.py, "
                  "needs pip install -e .[torch]): both in one process, alternately, --torch_rounds rounds; "
                  "report the medians and the median per-round ratio (vs_torch.md)")
flags.DEFINE_integer("torch_rounds", 7, "--torch: alternating rounds (one training step and one inference each)")
flags.DEFINE_list("torch_variants", [], "--torch: also time ours with sphere_jax.models.conv_cpu.FORMULATION set to "
                  "these (e.g. conv: every layer as XLA convolutions, the formulation before the per-shape plan), "
                  "or one_device: ours on one CPU device where a run would split the cores")


def cases():
    from sphere_jax.models import s2cnn

    if FLAGS.reduced and FLAGS.full:
        raise app.UsageError("--reduced and --full exclude each other")
    models = FLAGS.models or (REDUCED_MODELS if FLAGS.reduced else FULL_MODELS)
    batches = [int(b) for b in FLAGS.infer_batches] if FLAGS.infer_batches else (
        REDUCED_BATCHES if FLAGS.reduced else FULL_BATCHES)
    roof = FLAGS.roofline_models if FLAGS.roofline_models is not None else sorted(s2cnn.CLASSIFIERS)
    out = []
    for name in models:
        try:
            benchmark.model_task(name)
        except ValueError as e:
            raise app.UsageError(str(e))
        L = FLAGS.L or benchmark.study_L(name, reduced=FLAGS.reduced)
        out.append(dict(
            model=name, L=L, infer_batches=batches,
            train_batch=FLAGS.seg_train_batch if name in s2cnn.SEGMENTERS else FLAGS.train_batch,
            repeats=FLAGS.repeats, roofline=name in roof,
        ))
    return out


def compare_transforms():
    rows = []
    for L in FLAGS.transforms_L:
        for t in FLAGS.transforms:
            case = dict(transforms=t, L=int(L), batch=FLAGS.transform_signals, channels=1, repeats=FLAGS.repeats)
            rows.append(benchmark.run_in_subprocess(case, timeout=FLAGS.timeout))
            print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(FLAGS.out, "transforms.json"), "w") as f:
        json.dump(rows, f, indent=1)
    table = benchmark.transforms_markdown(rows)
    with open(os.path.join(FLAGS.out, "transforms.md"), "w") as f:
        f.write(table)
    print(table)


def torch_peer(row: dict) -> dict:
    """Add the PyTorch comparison to a CNN row (same band-limit and batch): ours and the twin timed
    alternately in one subprocess (``experiments.torch_twin --paired``). Adds ``torch_train_step_s``,
    ``torch_infer_s``, ours in the same rounds (``paired_train_step_s``, ``paired_infer_s``), the
    medians of the per-round ratios ours / PyTorch (``train_vs_torch``, ``infer_vs_torch``; < 1: we
    are faster), and per ``--torch_variants`` value V ``{V}_train_step_s``, ``{V}_train_vs_torch``, ..."""
    import subprocess
    import sys

    from sphere_jax.models import cnn

    if row["model"] not in cnn.SEGMENTERS and row["model"] not in cnn.CLASSIFIERS or "error" in row:
        return row
    tb = row.get("train_batch") or 32
    cmd = [sys.executable, "-m", "experiments.torch_twin", row["model"], "--paired", f"--L={row['L']}",
           f"--batch={tb}", f"--repeats={FLAGS.torch_rounds}", f"--variants={','.join(FLAGS.torch_variants)}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=FLAGS.timeout)
    if p.returncode != 0:
        return {**row, "torch_error": (p.stderr or p.stdout).strip()[-300:]}
    t = json.loads(p.stdout.strip().splitlines()[-1])
    out = {**row, "torch_version": t["torch"], "torch_threads": t["threads"], "torch_rounds": t["rounds"],
           "cpu_devices": t["devices"],
           "torch_train_step_s": t["torch_train_step_s"], "torch_infer_s": t["torch_infer_s"],
           "paired_train_step_s": t["jax_train_step_s"], "paired_infer_s": t["jax_infer_s"],
           "train_vs_torch": t["jax_train_vs_torch"], "infer_vs_torch": t["jax_infer_vs_torch"]}
    for v in FLAGS.torch_variants:
        for k in ("train_step_s", "infer_s", "train_vs_torch", "infer_vs_torch"):
            out[f"{v}_{k}"] = t[f"jax_{v}_{k}"]
    return out


def _t(v: float) -> str:
    return f"{v:.3f} s" if v >= 1 else f"{v * 1e3:.1f} ms"


def torch_markdown(rows: list[dict], variants=()) -> str:
    head = "| model | L | batch | ours: CPU devices | PyTorch train step | ours | ratio | PyTorch inference | ours | ratio |"
    sep = "|---|---|---|---|---|---|---|---|---|---|"
    for v in variants:
        head += f" {v}: train ratio | {v}: inference ratio |"
        sep += "---|---|"
    lines = [head, sep]
    for r in rows:
        if "torch_train_step_s" not in r:
            continue
        line = (f"| {r['model']} | {r['L']} | {r.get('train_batch') or 32} | {r.get('cpu_devices', 1)} | "
                f"{_t(r['torch_train_step_s'])} | "
                f"{_t(r['paired_train_step_s'])} | {r['train_vs_torch']} | {_t(r['torch_infer_s'])} | "
                f"{_t(r['paired_infer_s'])} | {r['infer_vs_torch']} |")
        for v in variants:
            line += f" {r[v + '_train_vs_torch']} | {r[v + '_infer_vs_torch']} |"
        lines.append(line)
    rounds = {r.get("torch_rounds") for r in rows if "torch_rounds" in r}
    return "\n".join(lines) + (
        "\n\nOurs and PyTorch timed alternately in one process (batch as shown; "
        f"{', '.join(str(n) for n in sorted(rounds))} rounds of one training step and one inference each); "
        "times are medians, ratio = median over rounds of ours / PyTorch's in the same round "
        "(below 1: ours is faster). Ours runs as a training run does, data-parallel over the CPU devices "
        "shown (sphere_jax.models.registry.cpu_devices); PyTorch with one thread per core.\n")


def layer_accounting():
    results, text = [], ""
    for name in FLAGS.layers:
        L = FLAGS.L or benchmark.study_L(name, FLAGS.reduced)
        case = {"layers": name, "L": L, "batch": FLAGS.train_batch or 1, "repeats": FLAGS.repeats}
        results.append(benchmark.run_in_subprocess(case, timeout=FLAGS.timeout))
        text += (benchmark.layers_markdown(results[-1]) if "layers" in results[-1]
                 else f"{name}: error: {results[-1]['error']}\n") + "\n"
        print(json.dumps(results[-1]), flush=True)
    with open(os.path.join(FLAGS.out, "layers.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(FLAGS.out, "layers.md"), "w") as f:
        f.write(text)
    print(text + f"wrote {FLAGS.out}/layers.json, layers.md")


def layout_comparison():
    rows = []
    for name in FLAGS.layouts:
        batch = FLAGS.train_batch if FLAGS.layouts_what == "train" else int((FLAGS.infer_batches or [1])[0])
        case = {"layout_model": name, "L": FLAGS.L or benchmark.study_L(name, FLAGS.reduced), "batch": batch or 1,
                "rounds": FLAGS.repeats, "what": FLAGS.layouts_what}
        rows.append(benchmark.run_in_subprocess(case, timeout=FLAGS.timeout))
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(FLAGS.out, "layouts.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {FLAGS.out}/layouts.json")


def parse_env_variants(items) -> dict:
    """``["name:VAR=VAL+VAR=VAL", ...]`` -> ``{name: {VAR: VAL}}``, with errors that name the bad item."""
    out = {}
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or not name or name in out:
            raise ValueError(f"--env_variants item {item!r}: need a new NAME:VAR=VAL[+VAR=VAL]")
        env = {}
        for kv in filter(None, rest.split("+")):
            k, eq, v = kv.partition("=")
            if not eq or not k.isidentifier():
                raise ValueError(f"--env_variants item {item!r}: {kv!r} is not VAR=VAL")
            env[k] = v
        out[name] = env
    if len(out) < 2:
        raise ValueError(f"--env_variants needs at least two variants, got {items}")
    return out


def variants_markdown(row: dict) -> str:
    if "variants" not in row:
        return f"{row.get('model')}: {row.get('error')}\n"
    lines = [f"### {row['model']}, L={row['L']}, batch {row['batch']}, {row['what']}, {row['rounds']} rounds, {row['device']}",
             "", "| variant | settings | s | ratio to first | GFLOP | GB | temp MB | compile s | max rel diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, v in row["variants"].items():
        env = " ".join(f"{k}={val}" for k, val in v["env"].items())
        if "error" in v:
            lines.append(f"| {name} | {env} | error: {v['error'][:120]} | | | | | | |")
            continue
        lines.append(f"| {name} | {env} | {v['s']} | {v.get('ratio')} | {v['gflop']} | {v['gb']} | {v['temp_mb']} | "
                     f"{v['compile_s']} | {v.get('max_rel_diff', 0):.2e} |")
    return "\n".join(lines) + "\n\n"


def variant_comparison():
    variants = parse_env_variants(FLAGS.env_variants)
    rows, text = [], ""
    for name in FLAGS.variants:
        batch = FLAGS.train_batch if FLAGS.layouts_what == "train" else int((FLAGS.infer_batches or [1])[0])
        case = {"variants_model": name, "L": FLAGS.L or benchmark.study_L(name, FLAGS.reduced), "batch": batch or 1,
                "rounds": FLAGS.repeats, "what": FLAGS.layouts_what, "variants": variants}
        rows.append(benchmark.run_in_subprocess(case, timeout=FLAGS.timeout))
        print(json.dumps(rows[-1]), flush=True)
        text += variants_markdown(rows[-1])
    with open(os.path.join(FLAGS.out, "variants.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(FLAGS.out, "variants.md"), "w") as f:
        f.write(text)
    print(text + f"wrote {FLAGS.out}/variants.json, variants.md")


def aot_markdown(rows: list[dict]) -> str:
    lines = ["| model | program | L | batch | settings | GFLOP | GB | GB / first | layout copies GB | temp GB | kernels | "
             "largest kinds (GB) | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    first = {}
    for r in rows:
        env = " ".join(f"{k}={v}" for k, v in r.get("env", {}).items()) or "(defaults)"
        if "error" in r:
            lines.append(f"| {r['model']} | | {r['L']} | | {env} | error: {r['error']} | | | | | | | |")
            continue
        what = r.get("what", "train")
        ref = first.setdefault((r["model"], what, r["L"], r["batch"]), r["gb"])
        kinds = ", ".join(f"{k} {v['gb']:.1f}" for k, v in list(r["by_kind"].items())[:3])
        lines.append(f"| {r['model']} | {what} | {r['L']} | {r['batch']} | {env} | {r['gflop']:.0f} | {r['gb']:.1f} | "
                     f"{r['gb'] / ref:.3f} | {r['copy_gb']:.1f} | {r['temp_gb']:.2f} | {r['kernels']} | {kinds} | "
                     f"{r['compile_s']} |")
    target = rows[0].get("target", "?") if rows else "?"
    return "\n".join(lines) + (
        f"\n\nCompiled for {target} on a machine without a GPU (sphere_jax.aot, jax {rows[0].get('jax') if rows else '?'}): "
        "no autotuning; bytes from XLA's generic HLO cost analysis of the GPU program, which is not the GPU "
        "backend's own count: compare rows with each other.\n")


def aot_costs():
    variants = parse_env_variants(FLAGS.env_variants) if FLAGS["env_variants"].present else {"defaults": {}}
    rows = []
    for name in FLAGS.models or ["s2cnn_204k"]:
        try:
            benchmark.model_task(name)
        except ValueError as e:
            raise app.UsageError(str(e))
        for env in variants.values():
            case = {"aot_model": name, "L": FLAGS.L or benchmark.study_L(name, FLAGS.reduced),
                    "batch": FLAGS.train_batch or 1, "target": FLAGS.aot, "what": FLAGS.layouts_what, "env": env}
            rows.append(benchmark.run_in_subprocess(case, timeout=FLAGS.timeout))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "by_kind"}), flush=True)
    with open(os.path.join(FLAGS.out, "aot.json"), "w") as f:
        json.dump(rows, f, indent=1)
    text = aot_markdown(rows)
    with open(os.path.join(FLAGS.out, "aot.md"), "w") as f:
        f.write(text)
    print(text + f"wrote {FLAGS.out}/aot.json, aot.md")


def step_profiles():
    from sphere_jax import profiling

    rows, text = [], ""
    for name in FLAGS.profile:
        try:
            benchmark.model_task(name)
        except ValueError as e:
            raise app.UsageError(str(e))
        case = {"profile": name, "L": FLAGS.L or benchmark.study_L(name, FLAGS.reduced),
                "batch": FLAGS.train_batch or 1, "steps": FLAGS.profile_steps}
        if FLAGS.profile_keep_trace:
            case["keep_trace"] = os.path.abspath(FLAGS.out)
        rows.append(benchmark.run_in_subprocess(case, timeout=FLAGS.timeout))
        text += profiling.profile_markdown(rows[-1]) + "\n"
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "ops"}), flush=True)
    with open(os.path.join(FLAGS.out, "profile.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(FLAGS.out, "profile.md"), "w") as f:
        f.write(text)
    print(text + f"wrote {FLAGS.out}/profile.json, profile.md")


def main(_):
    if FLAGS.aot:
        from sphere_jax import aot

        try:
            aot.target_config(FLAGS.aot)
        except ValueError as e:
            raise app.UsageError(str(e))
        os.makedirs(FLAGS.out, exist_ok=True)
        return aot_costs()
    if FLAGS.profile:
        os.makedirs(FLAGS.out, exist_ok=True)
        return step_profiles()
    if FLAGS.transforms_L:
        os.makedirs(FLAGS.out, exist_ok=True)
        return compare_transforms()
    if FLAGS.layers:
        os.makedirs(FLAGS.out, exist_ok=True)
        return layer_accounting()
    if FLAGS.variants:
        os.makedirs(FLAGS.out, exist_ok=True)
        return variant_comparison()
    if FLAGS.layouts:
        os.makedirs(FLAGS.out, exist_ok=True)
        return layout_comparison()
    todo = cases()
    os.makedirs(FLAGS.out, exist_ok=True)
    rows = []
    for case in todo:
        rows.append(benchmark.run_in_subprocess(case, timeout=FLAGS.timeout))
        if FLAGS.torch:
            rows[-1] = torch_peer(rows[-1])
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(FLAGS.out, "benchmark.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(FLAGS.out, "benchmark.md"), "w") as f:
        f.write(benchmark.markdown_table(rows))
    if FLAGS.torch:
        with open(os.path.join(FLAGS.out, "vs_torch.md"), "w") as f:
            f.write(torch_markdown(rows, FLAGS.torch_variants))
        print(torch_markdown(rows, FLAGS.torch_variants))
    png = benchmark.plot_latency(rows, os.path.join(FLAGS.out, "latency_vs_batch.png"))
    print(benchmark.markdown_table(rows))
    print(f"wrote {FLAGS.out}/benchmark.json, benchmark.md, {os.path.basename(png)}")


if __name__ == "__main__":
    app.run(main)
