"""Compile one model's batch-32 training step and time it (median of 20), or print why it fails.

    python -m launch.check_step MODEL [L]
    SPHERE_JAX_TRANSFORMS=fft python -m launch.check_step s2cnn_cls
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python -m launch.check_step s2cnn_cls_deep

One JSON line: the model, the transform implementation and XLA flags in force, compile seconds
and the median step in milliseconds, or the compiler's error (first 6,000 characters). Used on
a lent H200 to find which transform variant compiles (results/classification/README.md).
"""
import json
import os
import sys
import time

import jax
import optax

from sphere_jax import harmonics as hm, train
from sphere_jax.models import registry


def main(argv) -> int:
    name = argv[1]
    L = int(argv[2]) if len(argv) > 2 else 30
    model, task = registry.make_model(name, L)
    tables = hm.build_tables(model.table_specs())
    x = jax.random.uniform(jax.random.key(0), (32, 2 * L, 2 * L - 1, 1))
    y = (jax.random.randint(jax.random.key(1), (32,), 0, 10) if task == "classify"
         else jax.random.randint(jax.random.key(1), (32, 2 * L, 2 * L - 1), 0, 11))
    params, model_state = train.split_variables(jax.jit(model.init)(jax.random.key(0), x[:1], tables))
    state = train.TrainState.create(params, optax.adam(1e-3), model_state)
    step = train.make_train_step(model, task)
    head = {"model": name, "L": L, "transforms": hm.transforms(), "xla_flags": os.environ.get("XLA_FLAGS"),
            "device": jax.devices()[0].device_kind}
    try:
        t = time.time()
        state, loss = step(state, tables, x, y)
        jax.block_until_ready(loss)
        compile_s = time.time() - t
        ts = []
        for _ in range(20):
            t = time.perf_counter()
            state, loss = step(state, tables, x, y)
            jax.block_until_ready(loss)
            ts.append(time.perf_counter() - t)
        print(json.dumps({**head, "compile_s": round(compile_s, 1), "step_ms": round(1000 * sorted(ts)[10], 3)}))
        return 0
    except Exception as e:  # noqa: BLE001 - report any compiler failure as data
        print(json.dumps({**head, "error": str(e)[:6000]}))
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
