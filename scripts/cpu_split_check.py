"""One CPU device against the cores split into two, for any model (a measurement, not library code).

    python scripts/cpu_split_check.py MODEL L BATCH [ROUNDS]

Splits the CPU into 2 JAX devices, then times the model's training step (forward, loss,
backward, Adam) and inference on one of them (every core used inside each operation) and
data-parallel over both: "spmd" (``train.make_train_step`` on a sharded batch; XLA's all-reduce
between the devices, which can deadlock in long runs) and "split" (``train.make_split_train_step``,
what runs on a split CPU use; not for models with BatchNorm). Each step and inference is
waited for, alternating in one process after a warm-up. Prints the medians in ms and the
median per-round ratios to one device. Random inputs and labels. Whole training runs are the
better guide (``results/cpu_cnn/README.md``, ``sphere_jax.models.registry.CPU_SPLIT``).
Run it with nothing else on the machine.
"""
import sys
import time

import jax
import numpy as np
import optax

from sphere_jax import benchmark, harmonics, train
from sphere_jax.models import registry


def contender(model, task, tables, x, y, devices, split=False):
    mesh = train.make_mesh(devices)
    params, model_state = train.split_variables(jax.jit(model.init)(jax.random.key(0), x[:1], tables))
    state = train.TrainState.create(jax.tree.map(np.array, params), optax.adam(1e-3), jax.tree.map(np.array, model_state))
    variables = train.replicate(mesh, state.variables)  # inference: placed once, as an evaluation does
    if split:
        held, step = {"state": jax.device_put(state, devices[0])}, train.make_split_train_step(model, task, mesh)
    else:  # own buffers: the step donates its state
        held, step = {"state": train.replicate(mesh, state)}, train.make_train_step(model, task)
    tables = train.replicate(mesh, tables)
    xs, ys = train.shard_batch(mesh, (x, y))
    predict = train.make_predict(model)

    def train_once():
        held["state"], loss = step(held["state"], tables, xs, ys)
        jax.block_until_ready(loss)

    def infer_once():
        jax.block_until_ready(predict(variables, tables, xs))

    return train_once, infer_once


def main(name, L, batch, rounds=9):
    if train.split_cpu(2) != 2:
        raise SystemExit("needs 2 CPU devices (drop --xla_force_host_platform_device_count from XLA_FLAGS)")
    model, task = registry.make_model(name, L_in=L)
    tables = harmonics.build_tables(model.table_specs())
    x, y = (np.asarray(a) for a in benchmark._random_batch(task, L, batch, jax.random.key(0)))
    runs = {"one": contender(model, task, tables, x, y, jax.devices()[:1]),
            "spmd": contender(model, task, tables, x, y, jax.devices())}
    if not model.init(jax.random.key(0), x[:1], tables).keys() - {"params"}:  # no BatchNorm
        runs["split"] = contender(model, task, tables, x, y, jax.devices(), split=True)
    for fns in runs.values():  # compile and warm up
        for f in fns + fns:
            f()
    times = {who: ([], []) for who in runs}
    for r in range(rounds):
        names = list(runs)
        for kind in (0, 1):
            for who in names[r % len(names):] + names[:r % len(names)]:
                time.sleep(0.05)
                t = time.perf_counter()
                runs[who][kind]()
                times[who][kind].append(time.perf_counter() - t)
    for who, ts in times.items():
        ms = [round(float(np.median(t)) * 1e3, 2) for t in ts]
        ratio = [round(float(np.median(np.asarray(ts[k]) / np.asarray(times["one"][k]))), 3) for k in (0, 1)]
        print(f"{name} L={L} batch={batch} {who}: train {ms[0]} ms ({ratio[0]} of one device), "
              f"inference {ms[1]} ms ({ratio[1]})")


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        raise SystemExit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *(int(a) for a in sys.argv[4:]))
