"""Latency, training-step time, first-use time and peak memory of the study's models.

Each case runs in a fresh subprocess (``python -m sphere_jax.benchmark CASE_JSON``) so that
its peak RSS and first-use time are its own. Times are medians after one warm-up call;
compare numbers only within one run (the machines are noisy).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def _median_time(fn, repeats):
    fn()  # warm-up (compiled already)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def _matmul_gflops(jax, jnp):
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t = _median_time(lambda: f(a).block_until_ready(), 5)
    return 2 * n**3 / t / 1e9


def run_case(case: dict) -> dict:
    """Measure one model. ``case``: name, L, batch sizes for inference, train batch, repeats."""
    import jax
    import jax.numpy as jnp
    import optax

    from sphere_jax import harmonics as hm
    from sphere_jax import train
    from sphere_jax.models import registry

    t0 = time.perf_counter()
    model, task = registry.make_model(case["model"], L_in=case["L"])
    tables = hm.build_tables(model.table_specs())
    jax.block_until_ready(tables)
    t_tables = time.perf_counter() - t0
    L = case["L"]
    key = jax.random.key(0)
    x1 = jax.random.uniform(key, (1, 2 * L, 2 * L - 1, 1))
    params = jax.jit(model.init)(key, x1, tables)["params"]
    predict = train.make_predict(model)
    jax.block_until_ready(predict(params, tables, x1))
    first_use = time.perf_counter() - t0
    out = {
        "model": case["model"],
        "task": task,
        "L": L,
        "params": int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params))),
        "tables_s": round(t_tables, 2),
        "first_use_s": round(first_use, 2),
        "device": jax.devices()[0].device_kind,
        "infer_s": {},
    }
    for b in case["infer_batches"]:
        x = jax.random.uniform(key, (b, 2 * L, 2 * L - 1, 1))
        t = time.perf_counter()
        jax.block_until_ready(predict(params, tables, x))
        out.setdefault("compile_s", {})[str(b)] = round(time.perf_counter() - t, 2)
        out["infer_s"][str(b)] = _median_time(lambda: jax.block_until_ready(predict(params, tables, x)), case["repeats"])
    tb = case["train_batch"]
    if tb:
        step = train.make_train_step(model, task)
        state = train.TrainState.create(params, optax.adam(1e-3))
        x = jax.random.uniform(key, (tb, 2 * L, 2 * L - 1, 1))
        y = (
            jax.random.randint(key, (tb,), 0, 10)
            if task == "classify"
            else jax.random.randint(key, (tb, 2 * L, 2 * L - 1), 0, 11)
        )
        holder = {"s": state}

        def one():
            holder["s"], loss = step(holder["s"], tables, x, y)
            jax.block_until_ready(loss)

        t = time.perf_counter()
        one()
        out["train_compile_s"] = round(time.perf_counter() - t, 2)
        out["train_batch"] = tb
        out["train_step_s"] = _median_time(one, case["repeats"])
    if case.get("roofline"):
        out["matmul_gflops"] = round(_matmul_gflops(jax, jnp), 1)
        out.update(_transform_rates(case["L"], jax, jnp, hm))
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)
    return out


def _transform_rates(L, jax, jnp, hm):
    """SO(3) transform throughput at band-limit ``L``, 16 channels, as GFLOP/s of its contractions."""
    C = 16
    fwd = jnp.asarray(hm.so3_table(L, L, True))
    inv = jnp.asarray(hm.so3_table(L, L, False))
    x = jnp.ones((1, 2 * L - 1, 2 * L, 2 * L - 1, C), jnp.float32)
    f = jax.jit(lambda x: hm.so3_forward_half(x, fwd))
    g = jax.jit(lambda c: hm.so3_inverse_half(c, inv))
    c = f(x)
    g(c).block_until_ready()
    tf = _median_time(lambda: f(x).block_until_ready(), 3)
    ti = _median_time(lambda: g(c).block_until_ready(), 3)
    # dominant cost: complex x real contraction over beta (resp. l): N*2L*L*(2L-1)*C complex MACs
    flops = 4 * L * 2 * L * L * (2 * L - 1) * C
    return {"so3_fwd_s": tf, "so3_inv_s": ti, "so3_fwd_gflops": round(flops / tf / 1e9, 2), "so3_inv_gflops": round(flops / ti / 1e9, 2)}


def run_in_subprocess(case: dict, timeout: float = 1800) -> dict:
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "sphere_jax.benchmark", json.dumps(case)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"model": case["model"], "L": case["L"], "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def markdown_table(rows: list[dict]) -> str:
    head = "| model | L | params | first use s | infer s (batch) | train step s (batch) | peak RSS GB | device |\n|---|---|---|---|---|---|---|---|\n"
    body = ""
    for r in rows:
        if "error" in r:
            body += f"| {r['model']} | {r['L']} | error: {r['error']} | | | | | |\n"
            continue
        inf = ", ".join(f"{v:.3f} ({b})" for b, v in r["infer_s"].items())
        tr = f"{r['train_step_s']:.3f} ({r['train_batch']})" if "train_step_s" in r else "-"
        body += f"| {r['model']} | {r['L']} | {r['params']:,} | {r['first_use_s']} | {inf} | {tr} | {r['peak_rss_gb']} | {r['device']} |\n"
    return head + body


if __name__ == "__main__":
    print(json.dumps(run_case(json.loads(sys.argv[1]))))
