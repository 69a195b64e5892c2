"""Training steps per compiled call: how fast does a run train with K = 1, 8, 32, ...?

    python -m launch.steps_per_call_check --model=s2cnn_cls --L=30 --ks=1,16 [--source=npz --digits_npz=F]

Times the training loop as ``sphere_jax.runner.fit`` runs it, batches from the real data
pipeline included (rotated digits, one fixed rotated copy each, as the grid's R runs with
augmentation 1): ``K = 1`` makes each batch with ``DigitStream.batch`` and calls the compiled
step (one host round per step); ``K > 1`` calls ``train.make_train_chunk`` once per ``K`` steps,
the batches made inside the compiled loop. No evaluations, no checkpoints. Each K is compiled
and warmed up, then the Ks are timed in turn, ``--rounds`` times, ``--steps`` steps each (a
multiple of every K). Prints one JSON line per K:

``{"model", "L", "batch", "steps_per_call", "device", "ms_per_step"`` (median over rounds),
``"compile_s"`` (first call, compile included), ``"vs_one"`` (``ms_per_step`` of K = 1 over
this one: above 1, K is faster)``}``, or ``"error"``.

Use the fastest K for a grid's runs of that model on that device:
``SPHERE_JAX_STEPS_PER_CALL=K python -m launch.run_grid ...`` (or ``--steps_per_call=K``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def measure(model: str, L: int, ks: list[int], batch: int = 32, steps: int = 0, rounds: int = 3,
            source: str = "synthetic", digits_npz: str | None = None, n_train: int = 4000) -> list[dict]:
    """Rows (see the module doc) for each K of ``ks``; ``steps`` 0: the least common multiple
    of the Ks, at least 64."""
    import math

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from sphere_jax import runner, train
    from sphere_jax.data import pipeline

    if not ks or any(k < 1 for k in ks) or rounds < 1:
        raise ValueError(f"ks must be >= 1 and rounds >= 1, got {ks}, {rounds}")
    lcm = math.lcm(*ks)
    steps = steps or lcm * max(1, -(-64 // lcm))
    if steps % lcm:
        raise ValueError(f"--steps={steps} is not a multiple of every K in {ks}")
    cfg = runner.RunConfig(model=model, source=source, digits_npz=digits_npz, L=L, n_train=n_train,
                           n_holdout=0, batch_size=batch, train_rotate=True, copies=1)
    cfg.validate()
    setup = runner.RunSetup.build(cfg)
    images, labels = runner._load(cfg)[0]
    stream = pipeline.DigitStream(images, labels, cfg.stream_config(True, 1), seed=0)
    if steps > stream.steps_per_epoch:
        raise ValueError(f"{steps} steps do not fit in one epoch of {stream.steps_per_epoch}; give more digits")
    params, model_state = train.split_variables(setup.init_variables(jax.random.key(0)))
    state = train.replicate(setup.mesh, train.TrainState.create(params, optax.adam(1e-3), model_state))
    step_fn = train.make_train_step(setup.model, setup.task)
    chunk_fn = train.make_train_chunk(setup.model, setup.task, stream.batch_of, setup.mesh)
    data = train.replicate(setup.mesh, stream.data)  # as fit does
    order = train.replicate(setup.mesh, stream.epoch_order(0))

    def run(state, k):
        loss = None
        for s in range(0, steps, k):
            if k == 1:
                b = stream.batch(s)
                x, y = train.shard_batch(setup.mesh, (b[0], train.targets(b, setup.task)))
                state, loss = step_fn(state, setup.tables, x, y)
            else:
                state, loss = chunk_fn(state, setup.tables, data, order, jnp.arange(s, s + k, dtype=jnp.int32))
        jax.block_until_ready((state, loss))
        return state

    first = {}
    for k in ks:
        t = time.perf_counter()
        state = run(state, k)
        first[k] = time.perf_counter() - t
    times = {k: [] for k in ks}
    for _ in range(rounds):
        for k in ks:
            t = time.perf_counter()
            state = run(state, k)
            times[k].append((time.perf_counter() - t) / steps)
    ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    rows = []
    for k in ks:
        row = {"model": model, "L": L, "batch": batch, "steps_per_call": k, "device": jax.devices()[0].device_kind,
               "ms_per_step": round(ms[k], 4), "compile_s": round(first[k], 2), "steps": steps, "rounds": rounds}
        if 1 in ms:
            row["vs_one"] = round(ms[1] / ms[k], 3)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="s2cnn_cls")
    ap.add_argument("--L", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ks", default="1,16", help="comma-separated steps per call")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per round (0: a multiple of every K, >= 64)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--source", default="synthetic", choices=["synthetic", "npz", "tfds"])
    ap.add_argument("--digits_npz", default=None)
    ap.add_argument("--n_train", type=int, default=4000, help="training digits the stream draws from (0: all); "
                    "the timed steps must fit in one epoch")
    ap.add_argument("--label", default="", help="recorded in each row")
    args = ap.parse_args(argv)
    try:
        ks = [int(k) for k in args.ks.split(",") if k]
    except ValueError:
        ap.error(f"--ks must be comma-separated integers, got {args.ks!r}")
    try:
        rows = measure(args.model, args.L, ks, args.batch, args.steps, args.rounds, args.source, args.digits_npz,
                       args.n_train)
    except Exception as e:  # a result too: the window records it and goes on
        rows = [{"model": args.model, "L": args.L, "error": f"{type(e).__name__}: {str(e)[:300]}"}]
    for row in rows:
        row["label"] = args.label
        print(json.dumps(row), flush=True)
    return 1 if "error" in rows[0] else 0


if __name__ == "__main__":
    sys.exit(main())
