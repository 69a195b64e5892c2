"""One CPU device against the cores split into two, for any model (a measurement, not library code).

    python scripts/cpu_split_check.py MODEL L BATCH [ROUNDS]

Splits the CPU into 2 JAX devices, then times the model's training step (forward, loss,
backward, Adam) and inference on one of them (every core used inside each operation) and
data-parallel over both, alternating in one process, after a warm-up. Prints the medians in ms
and the median per-round ratio two / one. Random inputs and labels. Result and reading
(2026-11-28): ``results/cpu_cnn/README.md`` and ``sphere_jax.models.registry.cpu_devices``.
Run it with nothing else on the machine.
"""
import sys
import time

import jax
import numpy as np
import optax

from sphere_jax import benchmark, harmonics, train
from sphere_jax.models import registry


def contender(model, task, tables, x, y, devices):
    mesh = train.make_mesh(devices)
    params, model_state = train.split_variables(jax.jit(model.init)(jax.random.key(0), x[:1], tables))
    state = train.TrainState.create(jax.tree.map(np.array, params), optax.adam(1e-3), jax.tree.map(np.array, model_state))
    held = {"state": train.replicate(mesh, state)}  # own buffers: the step donates its state
    tables = train.replicate(mesh, tables)
    xs, ys = train.shard_batch(mesh, (x, y))
    step, predict = train.make_train_step(model, task), train.make_predict(model)

    def train_once():
        held["state"], loss = step(held["state"], tables, xs, ys)
        jax.block_until_ready(loss)

    def infer_once():
        jax.block_until_ready(predict(held["state"].variables, tables, xs))

    return train_once, infer_once


def main(name, L, batch, rounds=9):
    if train.split_cpu(2) != 2:
        raise SystemExit("needs 2 CPU devices (drop --xla_force_host_platform_device_count from XLA_FLAGS)")
    model, task = registry.make_model(name, L_in=L)
    tables = harmonics.build_tables(model.table_specs())
    x, y = (np.asarray(a) for a in benchmark._random_batch(task, L, batch, jax.random.key(0)))
    runs = {"one": contender(model, task, tables, x, y, jax.devices()[:1]),
            "two": contender(model, task, tables, x, y, jax.devices())}
    for fns in runs.values():  # compile and warm up
        for f in fns + fns:
            f()
    times = {who: ([], []) for who in runs}
    for r in range(rounds):
        for kind in (0, 1):
            for who in (["one", "two"] if r % 2 == 0 else ["two", "one"]):
                time.sleep(0.05)
                t = time.perf_counter()
                runs[who][kind]()
                times[who][kind].append(time.perf_counter() - t)
    ms = {who: [round(float(np.median(t)) * 1e3, 2) for t in ts] for who, ts in times.items()}
    ratio = [round(float(np.median(np.asarray(times["two"][k]) / np.asarray(times["one"][k]))), 3) for k in (0, 1)]
    print(f"{name} L={L} batch={batch}: train one {ms['one'][0]} ms, two {ms['two'][0]} ms, two/one {ratio[0]}; "
          f"inference one {ms['one'][1]} ms, two {ms['two'][1]} ms, two/one {ratio[1]}")


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        raise SystemExit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *(int(a) for a in sys.argv[4:]))
