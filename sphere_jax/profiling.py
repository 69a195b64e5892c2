"""Where a compiled training step spends its time, per layer and per operation, from a trace.

``profile_case({"profile": MODEL, "L": L, "batch": B, "steps": 3})`` compiles the model's
training step (:func:`sphere_jax.train.make_train_step`), runs ``steps`` of them under
``jax.profiler.trace`` and reads the trace back with ``jax.profiler.ProfileData``: every event
that names an HLO instruction of the step (the ``hlo_op`` and ``hlo_module`` stats) is
attributed, through that instruction's ``op_name`` metadata in the compiled HLO, to

- a **layer**: the model's submodule (``s2_conv``, ``so3_conv_0``, ..., ``enc_conv_0``);
  ``(model)`` for the model's own operations between them (ReLU, pooling); ``(step)`` for what
  lies outside the model (loss, optimizer); ``?`` for instructions without metadata;
- a **direction**: ``forward`` (inside ``jvp(...)``), ``backward`` (inside ``transpose(...)``)
  or ``other``;
- an **operation**: the primitive (``dot_general``, ``transpose``, ...), with the einsum spec
  when there is one.

On a GPU the events are the kernels on the device's streams; on a CPU, the runtime's thunks
(their times overlap across threads, so their sum can exceed the wall time). Kernels that XLA
launches inside a CUDA graph (a command buffer) carry the graph's annotation, not their own:
profile with ``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` to see each one (the window script
does; the result records ``xla_flags``). The result holds the wall time per step, the traced
time per step, the rows per (layer, direction) and per operation (with the bytes of each
operation's operands and results, and that rate), and the trace's lines (names, event counts,
stat keys), so that a new trace format shows itself. A fusion counts wholly for the layer and
operation of its root's ``op_name``. Run by ``python -m experiments.benchmark --profile=MODEL`` (``profile.json`` / ``profile.md``).
"""
from __future__ import annotations

import collections
import glob
import gzip
import os
import re
import shutil
import tempfile

import numpy as np

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name=\"([^\"]*)\"", re.M)
_MODULE = re.compile(r"^HloModule\s+([\w.\-]+)", re.M)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its ``op_name`` metadata, for every instruction of an HLO text
    (``compiled.as_text()``) that carries one."""
    return {m.group(1): m.group(2) for m in _INSTR.finditer(hlo_text)}


_SHAPE = re.compile(r"\b(pred|[su](?:2|4|8|16|32|64)|bf16|f16|f32|f64|c64|c128|f8\w*|f4\w*)\[([\d,]*)\]")
_ITEM = {"pred": 1, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}
_COMMENT = re.compile(r"/\*.*?\*/")  # XLA writes /*index=5*/ before every fifth operand
_ENTRY_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^)]*\)|\S+)\s+([\w\-]+)\(([^)]*)\)")


def _item_bytes(dtype: str) -> int:
    if dtype in _ITEM:
        return _ITEM[dtype]
    if dtype.startswith(("f8", "f4")):  # fp8 / fp4 variants (f8e4m3fn, ...): a byte or less
        return 1
    return max(int(dtype[1:]), 8) // 8  # s2 .. u64 (sub-byte integers as a byte)


def _shapes(text: str) -> list[tuple[str, int]]:
    return [(dtype, int(np.prod([int(d) for d in dims.split(",") if d] or [1]))) for dtype, dims in _SHAPE.findall(text)]


def _type_bytes(text: str, opcode: str = "") -> int:
    shapes = _shapes(text)
    if opcode == "custom-call" and len(shapes) > 1 and shapes[-1][0] in ("s8", "u8") and text.count("[") >= 2:
        # a library call's result tuple ends with its scratch buffer (cuBLAS, cuDNN workspace)
        last = re.findall(r"[su]8\[([\d,]*)\]", text)[-1]
        if "," not in last:
            shapes = shapes[:-1]
    return sum(_item_bytes(dtype) * n for dtype, n in shapes)


def hlo_op_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes each instruction of the ENTRY computation reads and writes: its result plus its
    operands (their results), the way a kernel that streams them once would move them; a
    ``slice``, ``dynamic-slice`` or ``gather`` reads only what it writes, and a library
    custom-call's scratch buffer (the last, 1-D ``s8``/``u8`` element of its result tuple) is
    left out. A proxy per kernel: caches and repeated reads are not seen, and a fusion that
    reads part of an operand (a slice fused in, as compiled HLO mostly has them) or updates one
    in place counts all of it. Empty if the text has no ENTRY block."""
    m = re.search(r"^ENTRY [^\n]*\{\n(.*?)^\}", hlo_text, re.M | re.S)
    if not m:
        return {}
    result, operands = {}, {}
    for line in m.group(1).splitlines():
        i = _ENTRY_INSTR.match(line)
        if i:
            name, rtype, opcode, args = i.groups()
            result[name] = _type_bytes(rtype, opcode)
            operands[name] = [a.strip().lstrip("%") for a in _COMMENT.sub("", args).split(",") if a.strip()]
            if opcode in ("slice", "dynamic-slice", "gather"):
                operands[name] = [name]
    return {n: result[n] + sum(result.get(a, 0) for a in operands[n]) for n in result}


def hlo_module_name(hlo_text: str) -> str | None:
    m = _MODULE.search(hlo_text)
    return m.group(1) if m else None


def split_op_name(op_name: str, model_class: str) -> tuple[str, str, str]:
    """``op_name`` (e.g. ``jit(step)/transpose(jvp(S2CNNSegmenter))/so3_conv_5/so3_conv_5._call/
    nmzl,nmlt->nmzt/dot_general``) -> ``(layer, direction, operation)``: the component after the
    model's own (``so3_conv_5``; ``(model)`` for ops of the model's top level; ``(step)`` outside
    the model; wrappers such as ``jit(relu)`` and einsum specs are skipped), ``forward`` /
    ``backward`` / ``other``, and the last component with an einsum spec before it when there is
    one (``nmzl,nmlt->nmzt dot_general``)."""
    parts = [p for p in op_name.split("/") if p]
    direction = "backward" if any(p.startswith("transpose(") for p in parts) else (
        "forward" if any("jvp(" in p for p in parts) else "other")
    layer = "(step)"
    for i, p in enumerate(parts):
        if model_class and re.search(rf"(^|\(){re.escape(model_class)}\)*$", p):
            inner = [q for q in parts[i + 1 : -1] if not q.startswith("jit(") and "->" not in q]
            layer = inner[0] if inner else "(model)"
            break
    op = parts[-1] if parts else "?"
    if len(parts) >= 2 and "->" in parts[-2]:
        op = f"{parts[-2]} {op}"
    return layer, direction, op


def trace_events(path: str, module: str | None) -> tuple[list[tuple[str, float]], list[dict], str]:
    """:func:`profile_events` of a trace file (``*.xplane.pb``)."""
    from jax.profiler import ProfileData

    return profile_events(ProfileData.from_file(path), module)


def profile_events(pd, module: str | None) -> tuple[list[tuple[str, float]], list[dict], str]:
    """``(events, lines, source)`` of a trace (``jax.profiler.ProfileData``, or anything with its
    ``planes -> lines -> events`` of ``name``, ``duration_ns``, ``stats``): ``events`` =
    ``[(hlo_op, duration_ns)]`` of the events of HLO module ``module`` (of every module if None
    or if none matches). Device planes (``/device:...``) are read when there are any, else the
    host's. On a device plane, kernels on the stream lines are counted, not other lines (derived
    per-op lines would count them twice), unless there are no stream lines. An ``hlo_op`` is
    read as an instruction name (a ``%`` prefix dropped; of a comma-separated list, the last).
    ``lines``: every line read, with its events and time in all (``all_events``, ``all_ms``),
    those that name an HLO op (``events``, ``ms``), the stat keys of its first event, whether it
    was counted, and how many of its events belong to ``module`` (``module_events``), so that an
    unexpected trace format shows itself; ``source``: ``device`` or ``host``."""
    planes = list(pd.planes)
    device = [p for p in planes if p.name.startswith("/device:")]
    source = "device" if device else "host"
    chosen = device or [p for p in planes if p.name.startswith("/host:")]
    per_line, lines = [], []
    for plane in chosen:
        for line in plane.lines:
            evs, n_all, ns_all, keys = [], 0, 0.0, None
            for e in line.events:
                st = dict(e.stats)
                n_all, ns_all = n_all + 1, ns_all + float(e.duration_ns)
                if keys is None:
                    keys = sorted(st)
                if "hlo_op" in st:
                    op = str(st["hlo_op"]).split(",")[-1].strip().lstrip("%")
                    evs.append((op, str(st.get("hlo_module", "")), float(e.duration_ns)))
            lines.append({"plane": plane.name, "line": line.name, "all_events": n_all, "all_ms": round(ns_all / 1e6, 3),
                          "events": len(evs), "ms": round(sum(d for *_, d in evs) / 1e6, 3), "stat_keys": keys or [],
                          "module_events": sum(1 for _, mod, _ in evs if _is_module(mod, module))})
            per_line.append((line.name, evs))
    counted = [name for name, _ in per_line]
    if device:
        streams = [(name, evs) for name, evs in per_line if name.lower().startswith("stream")]
        if any(evs for _, evs in streams):
            per_line, counted = streams, [name for name, _ in streams]
    for row in lines:
        row["counted"] = row["line"] in counted
    flat = [ev for _, evs in per_line for ev in evs]
    mine = [(op, d) for op, mod, d in flat if _is_module(mod, module)]
    return (mine or [(op, d) for op, _, d in flat]), lines, source


def _is_module(mod: str, module: str | None) -> bool:
    return bool(module) and (mod == module or mod.startswith(module + "."))


def aggregate(events, op_names: dict[str, str], model_class: str, steps: int,
              op_bytes: dict[str, int] | None = None) -> dict:
    """Per-step milliseconds by (layer, direction) and by (layer, direction, operation), from
    ``[(hlo_op, duration_ns)]``. Instructions without ``op_name`` metadata count under layer
    ``?`` with their HLO name (less its ``.N`` suffix) as the operation. With ``op_bytes`` (:func:`hlo_op_bytes`), each
    operation row also gets ``gb`` (each traced instruction once per step, as a step runs it
    once) and ``gbps`` (that over its time), and each layer its ``gb``."""
    by_layer = collections.defaultdict(float)
    by_op = collections.defaultdict(float)
    calls = collections.Counter()
    instrs = collections.defaultdict(set)
    for hlo_op, ns in events:
        name = op_names.get(hlo_op)
        if name is None:
            layer, direction, op = "?", "other", re.sub(r"\.\d+$", "", hlo_op)
        else:
            layer, direction, op = split_op_name(name, model_class)
        ms = ns / 1e6 / steps
        by_layer[(layer, direction)] += ms
        by_op[(layer, direction, op)] += ms
        calls[(layer, direction, op)] += 1
        instrs[(layer, direction, op)].add(hlo_op)
    layers = {}
    for (layer, direction), ms in by_layer.items():
        layers.setdefault(layer, {"forward": 0.0, "backward": 0.0, "other": 0.0})[direction] += ms
    layers = {k: {d: round(v, 3) for d, v in row.items()} for k, row in layers.items()}
    ops = []
    for key, ms in sorted(by_op.items(), key=lambda kv: -kv[1]):
        row = {"layer": key[0], "direction": key[1], "op": key[2], "ms": round(ms, 4), "calls_per_step": calls[key] / steps}
        if op_bytes is not None:
            gb = sum(op_bytes.get(i, 0) for i in instrs[key]) / 1e9
            row.update(gb=round(gb, 4), gbps=round(gb / (ms / 1e3), 2) if ms > 0 else None)
            layers[key[0]]["gb"] = round(layers[key[0]].get("gb", 0.0) + gb, 4)
        ops.append(row)
    return {"traced_ms": round(sum(by_layer.values()), 3), "layers": layers, "ops": ops}


def profile_case(case: dict) -> dict:
    """Trace ``case["steps"]`` (default 3) training steps of ``case["profile"]`` (a model name) at
    band-limit ``case["L"]`` and batch ``case["batch"]``; random inputs ``[batch, 2L, 2L-1, 1]``.
    Before the trace, ``2 + steps`` untraced steps run: ``step_s`` is the median wall time of the
    last ``steps`` of them, under the process's own ``XLA_FLAGS`` (with command buffers off, not
    comparable with the benchmark's ``train_step_s``). Returns ``model, L, batch, steps, device,
    step_s``, ``traced_ms`` and ``traced_gb`` (per step), ``source``,
    ``module``, ``xla_flags``, ``layers``, ``ops`` (see :func:`aggregate`), ``lines`` and
    ``unattributed_ms`` (events without metadata). With
    ``case["keep_trace"]`` = a directory, the trace is copied there, gzipped, as
    ``profile_{model}_L{L}_b{batch}.xplane.pb.gz``."""
    import jax

    from sphere_jax.benchmark import TrainLoop

    name, L, B = case["profile"], int(case["L"]), int(case["batch"])
    steps = int(case.get("steps", 3))
    if B < 1 or steps < 1:
        raise ValueError(f"batch and steps must be >= 1, got {B}, {steps}")
    loop = TrainLoop(name, L, B, warmup=0)  # the benchmark's step: Adam, random inputs, seed 0
    hlo = loop.step.lower(loop.state, loop.tables, loop.x, loop.y).compile().as_text()
    op_names, module, op_bytes = hlo_op_names(hlo), hlo_module_name(hlo), hlo_op_bytes(hlo)
    walls = [loop.run(1) for _ in range(2 + steps)]
    tmp = tempfile.mkdtemp(prefix="sphere_jax_profile_")
    try:
        with jax.profiler.trace(tmp):
            loop.run(steps)
        files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {tmp}")
        if case.get("keep_trace"):  # before reading it: a trace that cannot be read is kept too
            os.makedirs(case["keep_trace"], exist_ok=True)
            dst = os.path.join(case["keep_trace"], f"profile_{name}_L{L}_b{B}.xplane.pb.gz")
            with open(files[0], "rb") as src, gzip.open(dst, "wb") as out:
                shutil.copyfileobj(src, out)
        events, lines, source = trace_events(files[0], module)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    agg = aggregate(events, op_names, type(loop.model).__name__, steps, op_bytes)
    return {
        "model": name, "L": L, "batch": B, "steps": steps, "device": jax.devices()[0].device_kind,
        "step_s": float(np.median(walls[2:])), "module": module, "source": source,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "unattributed_ms": round(agg["layers"].get("?", {}).get("other", 0.0), 3),
        "traced_gb": round(sum(o.get("gb", 0.0) for o in agg["ops"]), 3),
        **agg, "lines": lines,
    }


def profile_markdown(r: dict, top: int = 20) -> str:
    """A per-layer table (forward, backward, share of the traced time) and the ``top`` operations."""
    if "error" in r:
        return f"{r.get('model')}: error: {r['error']}\n"
    tot = r["traced_ms"] or 1.0
    out = [f"### {r['model']}, L={r['L']}, batch {r['batch']}, {r['device']}: wall {r['step_s'] * 1e3:.1f} ms per step, "
           f"traced {r['traced_ms']:.1f} ms per step ({r['source']} events)\n",
           "| layer | forward ms | backward ms | other ms | share | GB (operands + results) |",
           "|---|---|---|---|---|---|"]
    ms_of = lambda row: row["forward"] + row["backward"] + row["other"]  # noqa: E731
    for layer, row in sorted(r["layers"].items(), key=lambda kv: -ms_of(kv[1])):
        out.append(f"| {layer} | {row['forward']:.2f} | {row['backward']:.2f} | {row['other']:.2f} | "
                   f"{100 * ms_of(row) / tot:.1f} % | {row.get('gb', 0.0):.2f} |")
    out += ["", f"Top {top} operations (per step; GB/s = the operation's operands + results over its time):", "",
            "| layer | direction | operation | ms | calls | GB | GB/s |", "|---|---|---|---|---|---|---|"]
    for o in r["ops"][:top]:
        out.append(f"| {o['layer']} | {o['direction']} | `{o['op']}` | {o['ms']:.3f} | {o['calls_per_step']:g} | "
                   f"{o.get('gb', 0.0):.3f} | {o.get('gbps') or '-'} |")
    return "\n".join(out) + "\n"
