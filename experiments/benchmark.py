"""Benchmark the study's models: python -m experiments.benchmark [--reduced] [--out=DIR].

Writes DIR/benchmark.json and DIR/benchmark.md. --reduced uses small band-limits for CPU.
"""
import json
import os

from absl import app, flags

from sphere_jax import benchmark

FLAGS = flags.FLAGS
flags.DEFINE_bool("reduced", False, "small band-limits (CPU smoke run) instead of the study's 30 / 50")
flags.DEFINE_list("models", ["s2cnn_cls", "s2cnn_204k", "cnn_cls_68k", "cnn_218k", "cnn_5_5m"], "models to measure")
flags.DEFINE_list("infer_batches", ["1", "8", "32"], "batch sizes for inference latency")
flags.DEFINE_integer("train_batch", 32, "batch size of the measured training step (0: skip)")
flags.DEFINE_integer("seg_train_batch", 1, "training batch for segmenters (the reference was timed at 1)")
flags.DEFINE_integer("repeats", 3, "timed repetitions after warm-up (median)")
flags.DEFINE_string("out", "benchmark_results", "output directory")


def main(_):
    os.makedirs(FLAGS.out, exist_ok=True)
    rows = []
    for name in FLAGS.models:
        seg = name.startswith("s2cnn_2") or name in ("cnn_218k", "cnn_1m", "cnn_5_5m")
        L = (12 if seg else 10) if FLAGS.reduced else (50 if seg else 30)
        case = dict(
            model=name, L=L, infer_batches=[int(b) for b in FLAGS.infer_batches],
            train_batch=FLAGS.seg_train_batch if name.startswith("s2cnn_2") else FLAGS.train_batch,
            repeats=FLAGS.repeats, roofline=(name == "s2cnn_cls"),
        )
        rows.append(benchmark.run_in_subprocess(case))
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(FLAGS.out, "benchmark.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(FLAGS.out, "benchmark.md"), "w") as f:
        f.write(benchmark.markdown_table(rows))
    print(benchmark.markdown_table(rows))


if __name__ == "__main__":
    app.run(main)
