"""Latency, training-step time, first-use time and peak memory of the study's models.

Each case runs in a fresh subprocess (``python -m sphere_jax.benchmark CASE_JSON``) so that
its peak RSS and first-use time are its own. Times are medians after one warm-up call;
compare numbers only within one run (the machines are noisy).

Per model (one JSON row): ``params``, ``tables_s`` / ``first_use_s`` (tables + init + first
batch-1 call), ``compile_s`` and ``infer_s`` per inference batch size, ``train_compile_s`` /
``train_step_s`` at ``train_batch``, ``peak_rss_gb``. With ``roofline`` (S2CNN classifiers by
default): the measured dense matmul rate ``matmul_gflops``, the S2 and SO(3) transforms'
rates ``s2_*_gflops`` / ``so3_*_gflops`` and ``roofline_fraction`` = transform rate / matmul rate.
"""
from __future__ import annotations

import json
import os
import re
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


def _matmul_gflops(jax, jnp, n: int | None = None):
    """Measured float32 matmul rate (GFLOP/s) at default precision: n x n (default 8192 on an
    accelerator, 1024 on CPU)."""
    if n is None:
        n = 1024 if jax.devices()[0].platform == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t = _median_time(lambda: f(a).block_until_ready(), 5)
    return 2 * n**3 / t / 1e9


def _copy_gbps(jax, jnp):
    """Measured memory bandwidth (GB/s, bytes read + written) of a large float32 copy-like
    elementwise op (256 MB on CPU, 4 GB on an accelerator)."""
    n = (1 << 26) if jax.devices()[0].platform == "cpu" else (1 << 30)
    a = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    f(a).block_until_ready()
    t = _median_time(lambda: f(a).block_until_ready(), 5)
    return 2 * 4 * n / t / 1e9


def cost_of(compiled) -> dict:
    """``{"gflop": ..., "gb": ...}`` from XLA's cost analysis of a compiled function (``None``
    where the backend reports nothing)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning nothing
        return {"gflop": None, "gb": None}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    ca = ca or {}
    flops, nbytes = ca.get("flops"), ca.get("bytes accessed")
    return {"gflop": round(flops / 1e9, 3) if flops else None, "gb": round(nbytes / 1e9, 3) if nbytes else None}


_DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "c64": 8, "c128": 16, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}


def copy_gb(hlo_text: str) -> float:
    """GB moved by layout copies in a compiled module's entry computation: every instruction
    whose name contains ``copy`` or ``transpose`` (XLA's layout changes, on CPU and GPU),
    counted as its output written once and read once. An estimate from the HLO text, to set
    beside the cost analysis' total bytes."""
    start = hlo_text.find("ENTRY")
    total = 0
    for line in hlo_text[start:].splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if not m or not re.search(r"copy|transpose", m.group(1)):
            continue
        for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(2)):
            if dt in _DTYPE_BYTES:
                total += _DTYPE_BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return round(2 * total / 1e9, 3)


def layer_case(case: dict) -> dict:
    """Per-layer accounting of an S2CNN's training step: for each equivariant layer (and the
    ReLU after it), its forward + backward pass at ``case["batch"]`` compiled alone.

    ``case``: ``layers`` (an S2CNN model name), ``L`` (input band-limit), ``batch``, ``repeats``
    (0: cost analysis only, no timing). Returns ``{"model", "L", "batch", "device", "so3_layout",
    "layers": [row, ...]}``, one row per layer: ``layer, kind, L_in, L_out, c_in, c_out, layout``
    (of its SO(3) signals), ``gflop, gb, copy_gb`` (see :func:`copy_gb`), ``fwd_bwd_s`` (median of
    ``repeats``, when timed) and ``compile_s``. The rows' sums leave out only the loss, the input
    scaling and the optimizer.
    """
    import jax
    import jax.numpy as jnp

    from sphere_jax import harmonics as hm
    from sphere_jax.models import registry, s2cnn

    model, _ = registry.make_model(case["layers"], L_in=case["L"])
    if not isinstance(model, (s2cnn.S2CNNSegmenter, s2cnn.S2CNNClassifier)):
        raise ValueError(f"per-layer accounting covers S2CNN models, not {case['layers']!r}")
    mods = s2cnn.layer_modules(model)
    tables = hm.build_tables(model.table_specs())
    B, key = case["batch"], jax.random.key(0)
    c_in = model.config.in_channels
    rows = []
    for i, m in enumerate(mods):
        L = m.L_in
        if i == 0:
            shape = (B, 2 * L, 2 * L - 1, c_in)
        elif getattr(m, "layout", "channels_last") == "gamma_first":
            shape = (2 * L - 1, 2 * L - 1, B, c_in, 2 * L)
        else:
            shape = (B, 2 * L - 1, 2 * L, 2 * L - 1, c_in)
        x = jax.random.normal(key, shape, jnp.float32)
        params = jax.jit(m.init)(key, x, tables)
        relu = i < len(mods) - 1 or isinstance(model, s2cnn.S2CNNClassifier)

        def f(v, x, m=m, relu=relu):
            fwd = lambda v, x: (hm.relu if relu else (lambda y: y))(m.apply(v, x, tables))
            y, vjp = jax.vjp(fwd, v, x)
            return vjp(y)

        t = time.perf_counter()
        compiled = jax.jit(f).lower(params, x).compile()
        row = {"layer": m.name, "kind": type(m).__name__, "L_in": m.L_in, "L_out": m.L_out, "c_in": c_in,
               "c_out": m.features, "layout": getattr(m, "layout", "-"), **cost_of(compiled),
               "copy_gb": copy_gb(compiled.as_text())}
        if case.get("repeats", 0):
            jax.block_until_ready(compiled(params, x))
            row["compile_s"] = round(time.perf_counter() - t, 2)
            row["fwd_bwd_s"] = _median_time(lambda: jax.block_until_ready(compiled(params, x)), case["repeats"])
        rows.append(row)
        c_in = m.features
        del params, x, compiled
    return {"model": case["layers"], "L": case["L"], "batch": B, "device": jax.devices()[0].device_kind,
            "so3_layout": hm.so3_layout(), "layers": rows}


def layout_case(case: dict) -> dict:
    """One S2CNN built under each SO(3) layout (:func:`sphere_jax.harmonics.so3_layout`) in one
    process, its training step (``what="train"``) or inference (``"infer"``) timed alternately.

    ``case``: ``layout_model`` (name), ``L``, ``batch``, ``rounds``, ``what``. Returns per layout
    the median time ``s``, XLA's temporary bytes ``temp_mb`` and the tables' ``tables_mb``; the
    median of the per-round ratios ``gamma_first / channels_last`` (``ratio``) and the largest
    difference of the two layouts' outputs relative to their scale (``max_rel_diff``).
    """
    variants = {layout: {"SPHERE_JAX_SO3_LAYOUT": layout} for layout in ("channels_last", "gamma_first")}
    res = variants_case({**case, "variants_model": case["layout_model"], "variants": variants})
    v = res.pop("variants")
    out = {k: res[k] for k in ("model", "L", "batch", "what", "rounds", "device")}
    for layout in variants:
        out[layout] = {k: v[layout][k] for k in ("s", "temp_mb", "tables_mb")}
    out["ratio"] = v["gamma_first"]["ratio"]
    out["max_rel_diff"] = v["gamma_first"]["max_rel_diff"]
    return out


def variants_case(case: dict) -> dict:
    """One model built under several settings of environment variables in one process (e.g.
    ``SPHERE_JAX_BOUNDARY``, ``SPHERE_JAX_GRID_DTYPE``, ``SPHERE_JAX_SO3_LAYOUT``), its training
    step (``what="train"``) or inference (``"infer"``) timed alternately, round by round.

    ``case``: ``variants_model`` (name), ``L``, ``batch``, ``rounds``, ``what`` and ``variants``
    ``{name: {VAR: value}}`` (the first is the reference). Returns per variant: the median time
    ``s``; ``ratio``, the median of the per-round ratios to the reference; the compiled
    function's cost analysis (``gflop``, ``gb``), XLA's temporaries ``temp_mb``, the tables'
    ``tables_mb``, ``compile_s``; ``max_rel_diff``, the largest difference of its outputs from
    the reference's relative to their scale (same parameters, same input); and for ``"train"``
    ``loss_rel_diff``, the same for the first step's loss. A variant that fails to build or
    compile gets ``error`` and is left out of the timing.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from sphere_jax import harmonics as hm
    from sphere_jax import train
    from sphere_jax.models import registry

    name, L, B = case["variants_model"], case["L"], case["batch"]
    variants = case["variants"]
    names = list(variants)
    keys = sorted({k for env in variants.values() for k in env})
    old = {k: os.environ.get(k) for k in keys}
    runs, outs, losses, errors = {}, {}, {}, {}
    key = jax.random.key(0)
    x = jax.random.uniform(key, (B, 2 * L, 2 * L - 1, 1))
    variables = None
    try:
        for v in names:
            for k in keys:  # each variant from the same baseline: its own settings, the rest as they were
                if k in variants[v]:
                    os.environ[k] = str(variants[v][k])
                elif old[k] is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = old[k]
            try:
                t0 = time.perf_counter()
                model, task = registry.make_model(name, L_in=L)
                tables = hm.build_tables(model.table_specs())
                if variables is None:  # the same parameters for every variant
                    variables = jax.jit(model.init)(key, x, tables)
                predict = train.make_predict(model).lower(variables, tables, x).compile()
                outs[v] = np.asarray(predict(variables, tables, x))
                if case["what"] == "train":
                    y = jax.random.randint(key, (B,) if task == "classify" else (B, 2 * L, 2 * L - 1), 0, 10)
                    # the step donates its state: each variant trains its own copy of the parameters
                    params, model_state = jax.tree.map(jnp.copy, train.split_variables(variables))
                    state = train.TrainState.create(params, optax.adam(1e-3), model_state)
                    fn = train.make_train_step(model, task).lower(state, tables, x, y).compile()
                    state, loss = fn(state, tables, x, y)
                    losses[v] = float(loss)
                    holder = {"s": state}

                    def call(fn=fn, holder=holder, tables=tables, x=x, y=y):
                        holder["s"], loss = fn(holder["s"], tables, x, y)
                        jax.block_until_ready(loss)
                else:
                    fn = predict
                    call = lambda fn=fn, v=variables, t=tables, x=x: jax.block_until_ready(fn(v, t, x))  # noqa: E731
                mem = fn.memory_analysis()
                runs[v] = {"call": call, "temp_mb": round(mem.temp_size_in_bytes / 1e6, 1) if mem else None,
                           "tables_mb": round(sum(t.nbytes for t in tables.values()) / 1e6, 1),
                           "compile_s": round(time.perf_counter() - t0, 2), **cost_of(fn), "t": []}
            except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
                errors[v] = f"{type(e).__name__}: {str(e)[:400]}"
    finally:
        for k, val in old.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val
    timed = [v for v in names if v in runs]
    for r in range(case["rounds"] + 1):  # round 0 warms up
        for v in (timed if r % 2 else timed[::-1]):
            time.sleep(0.05)
            t = time.perf_counter()
            runs[v]["call"]()
            if r:
                runs[v]["t"].append(time.perf_counter() - t)
    ref = names[0]
    rel = lambda a, b: float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))  # noqa: E731
    rows = {}
    for v in names:
        if v in errors:
            rows[v] = {"env": variants[v], "error": errors[v]}
            continue
        t = np.asarray(runs[v]["t"])
        row = {"env": variants[v], **{k: runs[v][k] for k in ("temp_mb", "tables_mb", "compile_s", "gflop", "gb")},
               "s": round(float(np.median(t)), 5) if t.size else None}
        if ref in runs and t.size:
            row["ratio"] = round(float(np.median(t / np.asarray(runs[ref]["t"]))), 3)
        if ref in outs:
            row["max_rel_diff"] = rel(outs[v], outs[ref])
        if ref in losses and v in losses:
            row["loss_rel_diff"] = abs(losses[v] - losses[ref]) / max(abs(losses[ref]), 1e-30)
        rows[v] = row
    return {"model": name, "L": L, "batch": B, "what": case["what"], "rounds": case["rounds"],
            "device": jax.devices()[0].device_kind, "reference": ref, "variants": rows}


def layers_markdown(result: dict) -> str:
    """Table of :func:`layer_case`'s rows with a total line."""
    rows = result["layers"]
    timed = all("fwd_bwd_s" in r for r in rows)
    head = (f"{result['model']}, L={result['L']}, batch {result['batch']}, {result['device']}, SO(3) layout "
            f"{result.get('so3_layout', 'channels_last')}: each layer's "
            f"forward + backward compiled alone\n\n"
            "| layer | kind | L in -> out | channels | GFLOP | GB | of which layout copies GB |"
            + (" fwd+bwd s |" if timed else "") + "\n|---|---|---|---|---|---|---|" + ("---|" if timed else "") + "\n")
    body = ""
    for r in rows:
        body += (f"| {r['layer']} | {r['kind']} | {r['L_in']} -> {r['L_out']} | {r['c_in']} -> {r['c_out']} | "
                 f"{r['gflop']} | {r['gb']} | {r['copy_gb']} |" + (f" {_fmt_s(r['fwd_bwd_s'])} |" if timed else "") + "\n")
    tot = lambda k: round(sum(r[k] or 0 for r in rows), 3)
    body += (f"| total | | | | {tot('gflop')} | {tot('gb')} | {tot('copy_gb')} |"
             + (f" {_fmt_s(tot('fwd_bwd_s'))} |" if timed else "") + "\n")
    return head + body


def model_task(name: str) -> str:
    """"classify" or "segment" for a model name (without building it)."""
    from sphere_jax.models import cnn, s2cnn

    if name in s2cnn.SEGMENTERS or name in cnn.SEGMENTERS:
        return "segment"
    if name in s2cnn.CLASSIFIERS or name in cnn.CLASSIFIERS:
        return "classify"
    from sphere_jax.models import registry

    raise ValueError(f"unknown model {name!r}; choose one of {registry.model_names()}")


def study_L(name: str, reduced: bool = False) -> int:
    """The band-limit a model is benchmarked at: the study's 50 (segmentation) / 30 (classification),
    or with ``reduced`` 12 / 10 raised to the model's minimum (:func:`sphere_jax.models.registry.min_L`)."""
    from sphere_jax.models.registry import min_L

    seg = model_task(name) == "segment"
    if not reduced:
        return max(50 if seg else 30, min_L(name))
    return max(12 if seg else 10, min_L(name))


def _random_batch(task: str, L: int, batch: int, key):
    """Random inputs ``[batch, 2L, 2L-1, 1]`` and labels (``[batch]`` classes, or
    ``[batch, 2L, 2L-1]`` pixel classes) to time a training step with."""
    import jax

    x = jax.random.uniform(key, (batch, 2 * L, 2 * L - 1, 1))
    y = (jax.random.randint(key, (batch,), 0, 10) if task == "classify"
         else jax.random.randint(key, (batch, 2 * L, 2 * L - 1), 0, 11))
    return x, y


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
    variables = jax.jit(model.init)(key, x1, tables)
    params, model_state = train.split_variables(variables)
    predict = train.make_predict(model)
    jax.block_until_ready(predict(variables, tables, x1))
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
        jax.block_until_ready(predict(variables, tables, x))
        out.setdefault("compile_s", {})[str(b)] = round(time.perf_counter() - t, 2)
        out["infer_s"][str(b)] = _median_time(lambda: jax.block_until_ready(predict(variables, tables, x)), case["repeats"])
    tb = case["train_batch"]
    if tb:
        step = train.make_train_step(model, task)
        state = train.TrainState.create(params, optax.adam(1e-3), model_state)
        x, y = _random_batch(task, L, tb, key)
        holder = {"s": state}

        def one():
            holder["s"], loss = step(holder["s"], tables, x, y)
            jax.block_until_ready(loss)

        t = time.perf_counter()
        one()
        out["train_compile_s"] = round(time.perf_counter() - t, 2)
        out["train_batch"] = tb
        out["train_step_s"] = _median_time(one, case["repeats"])
        if case.get("cost", True):
            cost = cost_of(step.lower(holder["s"], tables, x, y).compile())
            out["step_gflop"], out["step_gb"] = cost["gflop"], cost["gb"]
            if cost["gflop"]:
                out["achieved_tflops"] = round(cost["gflop"] / out["train_step_s"] / 1e3, 3)
            if cost["gb"]:
                out["achieved_gbps"] = round(cost["gb"] / out["train_step_s"], 1)
            out["matmul_gflops"] = round(_matmul_gflops(jax, jnp), 1)
            out["copy_gbps"] = round(_copy_gbps(jax, jnp), 1)
            if cost["gflop"]:
                out["flops_fraction"] = round(out["achieved_tflops"] * 1e3 / out["matmul_gflops"], 4)
            if cost["gb"]:
                out["bandwidth_fraction"] = round(out["achieved_gbps"] / out["copy_gbps"], 4)
    if case.get("roofline"):
        out.setdefault("matmul_gflops", round(_matmul_gflops(jax, jnp), 1))
        out.update(_transform_rates(case["L"], jax, jnp, hm))
        out.update(_s2_rates(case["L"], jax, jnp, hm))
        out["roofline_fraction"] = {
            k: round(out[f"{k}_gflops"] / out["matmul_gflops"], 4) for k in ("s2_fwd", "s2_inv", "so3_fwd", "so3_inv")
        }
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)
    return out


class TrainLoop:
    """One model's training step, compiled and warmed up, ready to be timed as training runs it:
    ``steps`` dispatched back to back (JAX's asynchronous dispatch pipelines them) and one wait
    at the end. Random inputs of shape ``[batch, 2L, 2L-1, 1]``; labels ``[batch]`` (classify)
    or ``[batch, 2L, 2L-1]`` (segment).

    ``members=K`` trains K independent copies of the model (initialised from K keys) in one
    program, ``jax.vmap`` over a leading member axis of the state, the inputs
    (``[K, batch, 2L, 2L-1, 1]``) and the labels (``[K, ...]``): the way several seeds or
    augmentation levels of one architecture could share a device. ``members=0``: the plain step.

    ``TrainLoop(name, L, batch, warmup=3, members=0)``; ``loop.run(steps) -> seconds``; ``loop.model``,
    ``loop.step`` (jitted, the state donated), ``loop.state``, ``loop.tables``, ``loop.x``, ``loop.y``.
    """

    def __init__(self, name: str, L: int, batch: int, warmup: int = 3, members: int = 0):
        import jax
        import jax.numpy as jnp
        import optax

        from sphere_jax import harmonics as hm
        from sphere_jax import train
        from sphere_jax.models import registry

        if batch < 1 or warmup < 0 or members < 0:
            raise ValueError(f"batch must be >= 1, warmup and members >= 0, got {batch}, {warmup}, {members}")
        self._jax = jax
        model, task = registry.make_model(name, L_in=L)
        self.model = model
        self.tables = hm.build_tables(model.table_specs())
        k = jax.random.key(0)
        x, y = _random_batch(task, L, batch, k)
        tx = optax.adam(1e-3)
        init = jax.jit(model.init)  # compiled once for all members

        def state_of(key):
            params, model_state = train.split_variables(init(key, x[:1], self.tables))
            return train.TrainState.create(params, tx, model_state)

        if members:
            states = [state_of(key) for key in jax.random.split(k, members)]
            self.state = train.stack_trees(states)
            self.x, self.y = jnp.stack([x] * members), jnp.stack([y] * members)
            self.step = train.jit_for(model, jax.vmap(train._train_step(model, task), in_axes=(0, None, 0, 0)),
                                      donate_argnums=(0,))
        else:
            self.state, self.x, self.y, self.step = state_of(k), x, y, train.make_train_step(model, task)
        if warmup:
            self.run(warmup)

    def run(self, steps: int) -> float:
        t = time.perf_counter()
        loss = None
        for _ in range(steps):
            self.state, loss = self.step(self.state, self.tables, self.x, self.y)
        self._jax.block_until_ready((self.state, loss))
        return time.perf_counter() - t


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


def _s2_rates(L, jax, jnp, hm, B=16, C=16):
    """S2 transform throughput at band-limit ``L`` (batch 16, 16 channels) as GFLOP/s of its contraction."""
    fwd = jnp.asarray(hm.s2_table(L, True))
    inv = jnp.asarray(hm.s2_table(L, False))
    x = jnp.ones((B, 2 * L, 2 * L - 1, C), jnp.float32)
    f = jax.jit(lambda x: hm.s2_forward_half(x, fwd))
    g = jax.jit(lambda c: hm.s2_inverse_half(c, inv))
    c = f(x)
    g(c).block_until_ready()
    tf = _median_time(lambda: f(x).block_until_ready(), 3)
    ti = _median_time(lambda: g(c).block_until_ready(), 3)
    # complex x real contraction over theta (resp. l): B*2L*L*L*C complex MACs
    flops = 4 * B * 2 * L * L * L * C
    return {"s2_fwd_s": tf, "s2_inv_s": ti, "s2_fwd_gflops": round(flops / tf / 1e9, 2), "s2_inv_gflops": round(flops / ti / 1e9, 2)}


def transforms_case(case: dict) -> dict:
    """Time one transform implementation (``case["transforms"]``: "dft", "fft" or "s2fft", see
    :func:`sphere_jax.harmonics.transforms`) at band-limit ``case["L"]`` on ``batch x channels``
    real signals: first use (tables + compile + first call of the four transforms), then medians
    of the S2 and SO(3) forward / inverse transforms, and the peak memory (device memory on an
    accelerator, RSS on CPU)."""
    os.environ["SPHERE_JAX_TRANSFORMS"] = case["transforms"]
    import jax
    import jax.numpy as jnp

    from sphere_jax import harmonics as hm

    L, B, C = case["L"], case.get("batch", 4), case.get("channels", 4)
    t0 = time.perf_counter()
    specs = {**hm.table_specs("s2", L, True), **hm.table_specs("s2", L, False),
             **hm.table_specs("so3", L, True), **hm.table_specs("so3", L, False)}
    t = hm.build_tables(specs)
    jax.block_until_ready(t)
    tables_s = time.perf_counter() - t0
    key = jax.random.key(0)
    x2 = jax.random.uniform(key, (B, 2 * L, 2 * L - 1, C))
    x3 = jax.random.uniform(key, (B, 2 * L - 1, 2 * L, 2 * L - 1, C))
    s2f = jax.jit(lambda x, k: hm.s2_forward_half(x, k))
    s2i = jax.jit(lambda c, k: hm.s2_inverse_half(c, k))
    so3f = jax.jit(lambda x, k: hm.so3_forward_half(x, k))
    so3i = jax.jit(lambda c, k: hm.so3_inverse_half(c, k))
    c2 = s2f(x2, t[hm.s2_key(L, True)])
    jax.block_until_ready(s2i(c2, t[hm.s2_key(L, False)]))
    c3 = so3f(x3, t[hm.so3_key(L, True)])
    jax.block_until_ready(so3i(c3, t[hm.so3_key(L, False)]))
    out = {"transforms": case["transforms"], "L": L, "batch": B, "channels": C, "tables_s": round(tables_s, 2),
           "first_use_s": round(time.perf_counter() - t0, 2), "device": jax.devices()[0].device_kind}
    r = case.get("repeats", 3)
    out["s2_fwd_s"] = _median_time(lambda: jax.block_until_ready(s2f(x2, t[hm.s2_key(L, True)])), r)
    out["s2_inv_s"] = _median_time(lambda: jax.block_until_ready(s2i(c2, t[hm.s2_key(L, False)])), r)
    out["so3_fwd_s"] = _median_time(lambda: jax.block_until_ready(so3f(x3, t[hm.so3_key(L, True)])), r)
    out["so3_inv_s"] = _median_time(lambda: jax.block_until_ready(so3i(c3, t[hm.so3_key(L, False)])), r)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        out["peak_device_gb"] = round(stats["peak_bytes_in_use"] / 1e9, 3)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)
    return out


def transforms_markdown(rows: list[dict]) -> str:
    """Side-by-side table of :func:`transforms_case` rows."""
    head = ("| transforms | L | signals | tables s | first use s | S2 fwd / inv s | SO(3) fwd / inv s | peak memory GB | "
            "device |\n|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        if "error" in r:
            body += f"| {r.get('transforms')} | {r['L']} | error: {r['error']} | | | | | | |\n"
            continue
        mem = r.get("peak_device_gb", r["peak_rss_gb"])
        body += (f"| {r['transforms']} | {r['L']} | {r['batch']} x {r['channels']} | {r['tables_s']} | {r['first_use_s']} | "
                 f"{_fmt_s(r['s2_fwd_s'])} / {_fmt_s(r['s2_inv_s'])} | {_fmt_s(r['so3_fwd_s'])} / {_fmt_s(r['so3_inv_s'])} | "
                 f"{mem} | {r['device']} |\n")
    return head + body


def _case_model(case: dict):
    return next((case[k] for k in ("model", "layers", "layout_model", "variants_model", "profile", "aot_model")
                 if case.get(k)), None)


def aot_case(case: dict) -> dict:
    """``{"aot_model": NAME, "L", "batch", "target", "what", "env"}`` -> :func:`sphere_jax.aot.
    program_cost` (compiled for that GPU without one; ``what``: ``"train"``, the default, or
    ``"infer"``), with ``env`` (the settings it ran under) added. Run it through
    :func:`run_in_subprocess`, which applies ``env`` to the subprocess."""
    from sphere_jax import aot

    row = aot.program_cost(case["aot_model"], int(case["L"]), int(case["batch"]), case.get("target", "h200"),
                              case.get("what", "train"))
    return {**row, "env": case.get("env", {})}


def run_in_subprocess(case: dict, timeout: float = 1800) -> dict:
    """Run one case in a fresh ``python -m sphere_jax.benchmark CASE_JSON`` and return its row
    (``{"model", "L", "error": [last error line]}`` if it failed or timed out). An ``aot_model``
    case runs on JAX's CPU platform, with its ``env`` settings added to the environment."""
    env = dict(os.environ)
    if "aot_model" in case:
        env.update({"JAX_PLATFORMS": "cpu", **case.get("env", {})})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sphere_jax.benchmark", json.dumps(case)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )
    except subprocess.TimeoutExpired:
        return {"model": _case_model(case), "transforms": case.get("transforms"), "L": case["L"],
                "error": [f"timed out after {timeout} s"]}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        text = (proc.stderr or proc.stdout).strip().splitlines()
        # the exception line, not JAX's "removed its internal frames" notice
        errs = [l for l in text if "Error" in l or "Exception" in l] or text[-1:]
        return {"model": _case_model(case), "transforms": case.get("transforms"), "L": case["L"], "error": errs[-1:]}
    return json.loads(lines[-1])


def _fmt_s(v: float) -> str:
    return f"{v:.3f}" if v >= 0.01 else f"{v:.2g}"


def markdown_table(rows: list[dict]) -> str:
    """One table row per benchmark row (one per model unless a model was measured twice)."""
    head = ("| model | L | params | first use s | infer s (batch) | train step s (batch) | step GFLOP / GB | "
            "FLOP/s, bytes/s (fraction of matmul, copy) | peak RSS GB | transform / matmul rate | device |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        if "error" in r:
            body += f"| {r['model']} | {r['L']} | error: {r['error']} | | | | | | | | |\n"
            continue
        inf = ", ".join(f"{_fmt_s(v)} ({b})" for b, v in r["infer_s"].items())
        tr = f"{_fmt_s(r['train_step_s'])} ({r['train_batch']})" if "train_step_s" in r else "-"
        roof = "-"
        if "roofline_fraction" in r:
            roof = ", ".join(f"{k} {v:.3f}" for k, v in r["roofline_fraction"].items()) + f" of {r['matmul_gflops']} GFLOP/s"
        cost = f"{r['step_gflop']} / {r['step_gb']}" if r.get("step_gflop") is not None else "-"
        rate = "-"
        if r.get("achieved_tflops") is not None:
            rate = (f"{r['achieved_tflops']} TFLOP/s ({r.get('flops_fraction', 0):.3f}), "
                    f"{r.get('achieved_gbps', '-')} GB/s ({r.get('bandwidth_fraction', 0):.3f})")
        body += (f"| {r['model']} | {r['L']} | {r['params']:,} | {r['first_use_s']} | {inf} | {tr} | {cost} | {rate} | "
                 f"{r['peak_rss_gb']} | {roof} | {r['device']} |\n")
    return head + body


def plot_latency(rows: list[dict], path: str) -> str:
    """PNG of inference latency against batch size (left) and per image (right), one curve per model.

    Rows of the same model and band-limit (measured in several cases) are merged.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves: dict = {}
    device = "?"
    for r in rows:
        if "error" in r or not r.get("infer_s"):
            continue
        device = r.get("device", device)
        curves.setdefault((r["model"], r["L"], r.get("params")), {}).update({int(b): float(v) for b, v in r["infer_s"].items()})
    fig = Figure(figsize=(11.0, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for (model, L, params), pts in curves.items():
        b = sorted(pts)
        t = [pts[k] for k in b]
        style = dict(marker="*" if model.startswith("s2cnn") else "o", ls="-" if model.startswith("s2cnn") else "--")
        label = f"{model} (L={L}, {params:,} params)" if params else f"{model} (L={L})"
        ax1.plot(b, t, label=label, **style)
        ax2.plot(b, [ti / bi for ti, bi in zip(t, b)], label=label, **style)
    ticks = sorted({b for pts in curves.values() for b in pts})
    for ax, ylabel in ((ax1, "latency per batch (s)"), (ax2, "latency per image (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(b) for b in ticks])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("inference batch size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7)
    fig.suptitle(f"inference latency vs batch size ({device})", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    _case = json.loads(sys.argv[1])
    if "profile" in _case:
        from sphere_jax.profiling import profile_case as _profile_case
    _run = (_profile_case if "profile" in _case else transforms_case if "transforms" in _case else layer_case if "layers" in _case
            else layout_case if "layout_model" in _case else variants_case if "variants_model" in _case
            else aot_case if "aot_model" in _case else run_case)
    print(json.dumps(_run(_case)))
