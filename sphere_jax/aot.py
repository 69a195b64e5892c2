"""GPU programs compiled on a machine without a GPU (XLA's deviceless ahead-of-time compilation).

With JAX's CUDA plugin installed (``pip install "jax[cuda13]"`` or ``"jax[cuda12]"``: no GPU,
no driver needed), JAX compiles for a compile-only CUDA device described by a *target
configuration* (XLA's ``GpuTargetConfig`` in protobuf text format: the chip's SM count,
memory, caches, compute capability). The result is the GPU's own program: its fusions, its
cuBLAS calls, its memory plan. So a CPU session can see what a model change does to the GPU
step before a GPU window: which kernels the step has, how many bytes they move, how much
memory it needs, and whether it compiles at all.

What it lacks against a real device:

* **No autotuning.** XLA takes its default GEMM choices (cuBLAS or Triton, and their tiles); on
  a device the autotuner may pick others, and may fuse differently around them.
* **No GPU cost analysis.** ``compiled.cost_analysis()`` is ``None`` for a compile-only client.
  :func:`hlo_cost` runs XLA's generic HLO cost analysis (through the CPU client) on the GPU
  program's optimized module instead. It counts the same kernels but not the same way as the
  GPU backend's analysis: on the 204k segmenter's step (L=50, batch 32, commit 366a1dd, jax
  0.11.2) it says 118.3 GB where the H200 said 99.0 GB (results/gpu/README.md). Compare its
  numbers with each other (before and after a change), not with the GPU's. Library calls count
  their operands' bytes but no FLOPs: the CNNs' cuDNN convolutions give a step of a few GFLOP.
* No timing, of course.

``python -m experiments.benchmark --aot=h200 --models=s2cnn_204k`` runs :func:`program_cost`
per model (and per ``--env_variants`` setting) and writes ``aot.json`` / ``aot.md``. A GPU
window can record the exact target of its chip with :func:`device_target_config`; pass that
file as the target afterwards.
"""
from __future__ import annotations

import collections
import os
import re
import time

# Target configurations in the form a device reports them (xla_client.get_topology_for_devices
# (jax.devices()).target_config), written from NVIDIA's published figures: 132 SMs, 50 MB L2,
# compute capability 9.0; H100 SXM 80 GB at 3.35 TB/s; H200 at 4.8 TB/s with the 143,771 MiB
# that the lent H200's nvidia-smi reported. cuDNN 9. Not read from a device: replace them with
# the file a GPU window writes (device_target_config) when there is one.
_HOPPER = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 7
}}
device_description_str: "{name}"
"""
TARGETS = {
    "h100": _HOPPER.format(bandwidth=3352320000000, memory=84929347584, name="NVIDIA H100 80GB HBM3"),
    "h200": _HOPPER.format(bandwidth=4800000000000, memory=150754820096, name="NVIDIA H200"),
}
"""Built-in targets by name: ``{name: GpuTargetConfig text}``."""


def target_config(target: str) -> str:
    """The ``GpuTargetConfig`` text of ``target``: a name of :data:`TARGETS` or the path of a
    file that holds one (e.g. written by :func:`device_target_config` on a real GPU)."""
    if target in TARGETS:
        return TARGETS[target]
    if os.path.isfile(target):
        with open(target) as f:
            text = f.read()
        if "gpu_device_info" not in text:
            raise ValueError(f"{target}: not a GpuTargetConfig text (no gpu_device_info)")
        return text
    raise ValueError(f"unknown GPU target {target!r}: use one of {sorted(TARGETS)} or a target-config file")


def device_target_config() -> str:
    """The target configuration of this machine's first GPU, as text (run where a GPU is)."""
    import jax
    from jax._src.lib import xla_client

    devs = [d for d in jax.devices() if d.platform != "cpu"]
    if not devs:
        raise RuntimeError("device_target_config needs a GPU; this process sees only CPU devices")
    return xla_client.get_topology_for_devices(devs[:1]).target_config


def gpu_mesh(target: str = "h200"):
    """A one-device ``Mesh`` of a compile-only CUDA device for ``target`` (see
    :func:`target_config`). Shard inputs with ``NamedSharding(mesh, PartitionSpec())`` in
    ``jax.ShapeDtypeStruct``s and ``jax.jit(f).lower(...).compile()`` compiles for that GPU."""
    from jax.experimental import topologies

    config = target_config(target)
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x1")
    except Exception as e:  # noqa: BLE001 - the plugin's absence shows up as several error types
        raise RuntimeError(
            "compiling for a GPU without one needs JAX's CUDA plugin, matching the installed jax: "
            'pip install "jax[cuda13]==<jax version>" (BUILD_NOTES.md, "GPU programs on a CPU"); '
            f"get_topology_desc failed: {e}") from e
    return topologies.make_mesh(topo, (1,), ("gpu",))


def hlo_cost(compiled) -> dict:
    """``{"gflop": ..., "gb": ...}`` of a compiled function's optimized HLO module, from XLA's
    generic HLO cost analysis run through the CPU client. Works for programs compiled for any
    backend, a compile-only one included; see the module docstring for how it differs from a
    GPU's own cost analysis."""
    import jax
    from jax._src.lib import _jax

    module = compiled.runtime_executable().hlo_modules()[0]
    ca = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    return {"gflop": round(ca.get("flops", 0.0) / 1e9, 6), "gb": round(ca.get("bytes accessed", 0.0) / 1e9, 6)}


_SKIP = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}


def kernel_bytes(hlo_text: str) -> dict[str, dict]:
    """The kernels of a compiled module's ENTRY computation grouped by kind, ``{kind: {"count",
    "gb"}}``, largest first. The kind is the instruction name without its numeric suffixes
    (XLA:GPU names fusions by what they hold: ``loop_transpose_fusion``, ``gemm_fusion_dot``,
    ``input_reduce_fusion``), or the target of a custom call (``__cublas$lt$matmul``); bytes are
    :func:`sphere_jax.profiling.hlo_op_bytes` (operands + result, each read once)."""
    from sphere_jax import profiling

    per_op = profiling.hlo_op_bytes(hlo_text)
    m = re.search(r"^ENTRY [^\n]*\{\n(.*?)^\}", hlo_text, re.M | re.S)
    kinds: dict[str, list] = collections.defaultdict(lambda: [0, 0])
    for line in (m.group(1).splitlines() if m else []):
        i = profiling._ENTRY_INSTR.match(line)
        if not i or i.group(3) in _SKIP:
            continue
        name, opcode = i.group(1), i.group(3)
        if opcode == "custom-call":
            t = re.search(r'custom_call_target="([^"]+)"', line)
            kind = t.group(1) if t else "custom-call"
        else:
            kind = re.sub(r"(\.\d+)+$", "", name)
        kinds[kind][0] += 1
        kinds[kind][1] += per_op.get(name, 0)
    order = sorted(kinds.items(), key=lambda kv: -kv[1][1])
    return {k: {"count": c, "gb": b / 1e9} for k, (c, b) in order}


WHATS = ("train", "infer")


def program_cost(name: str, L: int, batch: int, target: str = "h200", what: str = "train") -> dict:
    """Compile model ``name``'s training step (``what="train"``: Adam, the benchmark's,
    :func:`sphere_jax.train.make_train_step`) or its inference (``"infer"``: :func:`sphere_jax.
    train.make_predict`, what the benchmark times as ``infer_s``) at band-limit ``L`` (inputs
    ``[batch, 2L, 2L-1, 1]``) for GPU ``target`` without a GPU, under this process's environment
    (``SPHERE_JAX_*`` settings apply). CNNs take their GPU formulation (``conv_impl="lax"``).

    Returns ``model, L, batch, target, what, jax``, ``compile_s``, ``gflop`` and ``gb``
    (:func:`hlo_cost`), ``copy_gb`` (layout copies, :func:`sphere_jax.benchmark.copy_gb`),
    ``kernels`` (their number) and ``by_kind`` (:func:`kernel_bytes`), ``temp_gb`` and
    ``argument_gb`` (XLA's memory plan)."""
    import jax
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    from sphere_jax import benchmark
    from sphere_jax import harmonics as hm
    from sphere_jax import train
    from sphere_jax.models import registry

    if batch < 1 or L < 1:
        raise ValueError(f"L and batch must be >= 1, got {L}, {batch}")
    if what not in WHATS:
        raise ValueError(f"what must be one of {WHATS}, got {what!r}")
    sharding = NamedSharding(gpu_mesh(target), PartitionSpec())
    model, task = registry.make_model(name, L_in=L)
    if hasattr(model, "conv_impl"):
        model = model.clone(conv_impl="lax")
    tables = hm.build_tables(model.table_specs())
    x, y = benchmark._random_batch(task, L, batch, jax.random.key(0))
    tx = optax.adam(1e-3)

    def state_of(key):
        params, model_state = train.split_variables(model.init(key, x[:1], tables))
        return train.TrainState.create(params, tx, model_state)

    def spec(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)

    t = time.perf_counter()
    if what == "train":
        state = jax.eval_shape(state_of, jax.random.key(0))
        compiled = train.make_train_step(model, task).lower(spec(state), spec(tables), spec(x), spec(y)).compile()
    else:
        variables = jax.eval_shape(lambda k: model.init(k, x[:1], tables), jax.random.key(0))
        compiled = train.make_predict(model).lower(spec(variables), spec(tables), spec(x)).compile()
    compile_s = time.perf_counter() - t
    text = compiled.as_text()
    kinds = kernel_bytes(text)
    mem = compiled.memory_analysis()
    return {"model": name, "L": L, "batch": batch, "target": target, "what": what, "jax": jax.__version__,
            "compile_s": round(compile_s, 1), **hlo_cost(compiled), "copy_gb": benchmark.copy_gb(text),
            "kernels": sum(v["count"] for v in kinds.values()), "by_kind": kinds,
            "temp_gb": round(mem.temp_size_in_bytes / 1e9, 3), "argument_gb": round(mem.argument_size_in_bytes / 1e9, 3)}
