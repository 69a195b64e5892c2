"""Losses, train state and jit-compiled, data-parallel train / eval steps.

Data parallelism: parameters and tables are replicated, the batch is sharded over a 1-D
``Mesh`` of all devices (axis ``"data"``); ``jax.jit`` inserts the gradient all-reduce. A
batch whose size is not a multiple of the device count is rejected with a clear error.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sphere_jax.models import cnn, conv_cpu

Task = str  # "classify" | "segment"


@struct.dataclass
class TrainState:
    """``step`` (int32 scalar), ``params`` and ``opt_state`` pytrees, and ``model_state``: the
    model's other variable collections (``{"batch_stats": ...}`` for BatchNorm, ``{}`` for most
    models). The optimizer is static."""

    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    model_state: Any = struct.field(default_factory=dict)

    @classmethod
    def create(cls, params, tx, model_state=None):
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx,
                   model_state=dict(model_state or {}))

    @property
    def variables(self) -> dict:
        """``{"params": ..., **model_state}``, what ``model.apply`` takes."""
        return {"params": self.params, **self.model_state}


def split_variables(variables) -> tuple[Any, dict]:
    """``model.init`` output -> ``(params, model_state)`` (every collection but params)."""
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def as_variables(tree) -> dict:
    """Variables for ``model.apply``: a dict with a ``"params"`` key is taken as is, anything
    else is taken as the params alone (parameter trees are keyed by module names)."""
    if isinstance(tree, dict) and "params" in tree:
        return tree
    return {"params": tree}


def loss_fn(logits: jax.Array, batch_labels: jax.Array, task: Task) -> jax.Array:
    """Mean softmax cross-entropy.

    classify: ``logits [B, K]``, labels ``int [B]``. segment: ``logits [B, H, W, K]``, labels
    ``int [B, H, W]`` (every pixel counts equally, as in the reference).
    """
    if task not in ("classify", "segment"):
        raise ValueError(f"unknown task {task!r}")
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()


def targets(batch, task: Task) -> jax.Array:
    """Targets of a stream batch ``(x, labels [B, k], mask [B, H, W])``: ``labels[:, 0]`` or ``mask``."""
    _, labels, mask = batch
    return labels[:, 0] if task == "classify" else mask


def enable_compilation_cache(path: str | None) -> str | None:
    """Keep compiled programs on disk (JAX's persistent compilation cache) so that other
    processes load them instead of compiling again: a resumed run, the next run of a grid with
    the same model and shapes (seeds, augmentation levels), a second evaluation. Programs that
    compile in under a second are not stored (JAX's threshold). The cache is keyed by the
    program, the compiler options, the jax version and the device, so a hit is the same
    executable.

    Call before the first compilation of the process. ``path`` (``~`` expanded): a directory,
    created if missing; ``None`` or ``""``: the cache off, even where ``JAX_COMPILATION_CACHE_DIR``
    is set. Returns the absolute directory in use, or ``None`` (also when it cannot be created:
    the run goes on without the cache, with a warning).
    """
    if path:
        path = os.path.abspath(os.path.expanduser(path))
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            warnings.warn(f"compilation cache off: cannot create {path}: {e}")
            path = None
    jax.config.update("jax_compilation_cache_dir", path or None)
    return path or None


def split_cpu(n: int) -> int:
    """Make the CPU backend ``n`` JAX devices, so that :func:`make_mesh` spreads a batch over a
    CPU's cores (data parallelism) instead of running each operation on all of them.

    It must run before JAX first uses a device. Returns the number of CPU devices this process
    has or will have: ``n``; or the count already fixed, by an initialised backend (0 without a
    CPU backend), by ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` or by
    ``jax_num_cpu_devices`` (``$JAX_NUM_CPU_DEVICES``): an explicit setting wins.
    Harmless on a machine with accelerators: the CPU devices are not the default ones there.
    """
    import re

    from jax._src import xla_bridge

    if n < 1:
        raise ValueError(f"the CPU needs at least 1 device, got {n}")
    forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if xla_bridge.backends_are_initialized():
        try:
            return len(jax.devices("cpu"))
        except RuntimeError:  # no CPU backend (JAX_PLATFORMS without cpu)
            return 0
    if forced:
        return int(forced.group(1))
    if jax.config.jax_num_cpu_devices >= 0:  # set by the user ($JAX_NUM_CPU_DEVICES or jax.config)
        return jax.config.jax_num_cpu_devices
    jax.config.update("jax_num_cpu_devices", n)
    return n


def make_mesh(devices=None) -> Mesh:
    """1-D mesh over ``devices`` (default: all devices of all processes)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices, ("data",))


def shard_batch(mesh: Mesh, arrays):
    """Place arrays ``[B, ...]`` sharded over the mesh's data axis; checks divisibility."""
    n = mesh.devices.size

    def put(a):
        if a.shape[0] % n:
            raise ValueError(f"batch size {a.shape[0]} is not divisible by the {n} devices; choose a multiple of {n}")
        return jax.device_put(a, NamedSharding(mesh, P("data")))

    return jax.tree_util.tree_map(put, arrays)


def replicate(mesh: Mesh, tree):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def _train_step(model: nn.Module, task: Task) -> Callable:
    """The uncompiled ``step(state, tables, x, y) -> (state, loss)`` of :func:`make_train_step`."""

    def step(state: TrainState, tables, x, y):
        def loss_of(params):
            if state.model_state:
                logits, new_state = model.apply({"params": params, **state.model_state}, x, tables, train=True,
                                                mutable=list(state.model_state))
            else:
                logits, new_state = model.apply({"params": params}, x, tables), {}
            return loss_fn(logits, y, task), new_state

        (loss, new_state), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             model_state=dict(new_state)), loss

    return step


def jit_for(model: nn.Module, fn: Callable, **jit_kwargs) -> Callable:
    """``jax.jit(fn, **jit_kwargs)`` for a program that runs ``model``. A CNN on the CPU path
    compiles without YNNPACK's convolutions (segmenters: without YNNPACK at all) and traces its
    convolutions unpadded (:func:`sphere_jax.models.conv_cpu.jit`, :func:`cnn.cpu_ynn_fusions`:
    0.85-0.98x the time on 2 cores); every other model gets plain ``jax.jit``. The programs
    below are made with it; call the result directly, not inside another ``jax.jit`` (whose
    compiler options would apply)."""
    ynn = cnn.cpu_ynn_fusions(model)
    if ynn is not None:
        return conv_cpu.jit(fn, ynn, **jit_kwargs)
    return jax.jit(fn, **jit_kwargs)


def make_train_step(model: nn.Module, task: Task) -> Callable:
    """``step(state, tables, x, y) -> (state, loss)``, jit-compiled; donate the old state.

    A model with a ``model_state`` (BatchNorm statistics) is called with ``train=True`` and its
    state collections mutable; the updated statistics go into the new state.
    """
    return jit_for(model, _train_step(model, task), donate_argnums=(0,))


def make_split_train_step(model: nn.Module, task: Task, mesh: Mesh) -> Callable:
    """``step(state, tables, x, y) -> (state, loss)``: data parallelism over ``mesh`` without
    collectives, for a CPU split into devices (:func:`split_cpu`).

    XLA:CPU's all-reduce between the devices of one process deadlocked (its 40 s rendezvous
    timeout aborted the process) in 4 of 10 runs of 600 steps of :func:`make_train_step` over two
    CPU devices (jaxlib 0.10.2). Here one program computes each device's loss and gradients on
    its part of the batch (``shard_map``, nothing exchanged), the gradients move to the mesh's
    first device (device-to-device copies, not a collective), and a second program there
    averages them and applies the optimizer: the same update as the full batch's (equal parts,
    and the losses are unweighted means), up to float round-off.

    ``state`` lives on the mesh's first device (``jax.device_put(state, mesh.devices.flat[0])``)
    and is donated; ``x [B, ...]`` and ``y`` are sharded over the mesh (:func:`shard_batch`),
    ``tables`` replicated (:func:`replicate`). Models with a ``model_state`` (BatchNorm) are
    refused: their statistics would need the whole batch.
    """
    first = mesh.devices.flat[0]
    everywhere = NamedSharding(mesh, P())

    def part(params, tables, x, y):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(model.apply({"params": p}, x, tables), y, task))(params)
        return loss[None], jax.tree_util.tree_map(lambda g: g[None], grads)

    parts = jit_for(model, jax.shard_map(part, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                                  out_specs=(P("data"), P("data")), check_vma=False))

    def apply(state: TrainState, losses, grads):  # losses, grads: each leaf a list of the devices' pieces
        losses, grads = jax.tree_util.tree_map(lambda pieces: jnp.concatenate(pieces), (losses, grads),
                                               is_leaf=lambda v: isinstance(v, list))
        grads = jax.tree_util.tree_map(lambda g: g.mean(0), grads)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), losses.mean()

    apply = jax.jit(apply, donate_argnums=(0,))

    def step(state: TrainState, tables, x, y):
        if state.model_state:
            raise ValueError(f"make_split_train_step cannot train a model with state {sorted(state.model_state)}")
        losses, grads = parts(jax.device_put(state.params, everywhere), tables, x, y)
        # each device's piece copied to the first device as it is (asynchronous, device to device);
        # a device_put of the sharded array would assemble it on the host and wait for it
        pieces = jax.tree_util.tree_map(
            lambda a: [jax.device_put(sh.data, first) for sh in sorted(a.addressable_shards, key=lambda sh: sh.index[0].start or 0)],
            (losses, grads))
        return apply(state, *pieces)

    return step


def make_train_chunk(model: nn.Module, task: Task, batch_of: Callable, mesh: Mesh | None = None) -> Callable:
    """``chunk(state, tables, data, order, steps) -> (state, losses)``: ``K = len(steps)``
    training steps in one compiled call (a ``lax.scan``), each generating its own batch on device
    with ``batch_of(data, step, order) -> (x, labels, mask)``
    (:meth:`sphere_jax.data.pipeline.DigitStream.batch_of`).

    The same steps as ``K`` calls of :func:`make_train_step` on ``stream.batch(step)``, without
    the host's work between steps (dispatch, data call, transfer), which can be much of a small
    model's step. ``steps``: ``int32 [K]``, all of one epoch (``order`` is that epoch's); ``losses``:
    ``float32 [K]``. With a ``mesh``, each batch is sharded over its data axis. The old state is
    donated; one compilation per ``K``.
    """
    step_fn = _train_step(model, task)
    sharding = None if mesh is None else NamedSharding(mesh, P("data"))

    def chunk(state: TrainState, tables, data, order, steps):
        def body(state, step):
            batch = batch_of(data, step, order)
            x, y = batch[0], targets(batch, task)
            if sharding is not None:
                x, y = jax.lax.with_sharding_constraint((x, y), sharding)
            return step_fn(state, tables, x, y)

        return jax.lax.scan(body, state, steps)

    return jit_for(model, chunk, donate_argnums=(0,))


def make_members_chunk(model: nn.Module, task: Task, batch_of: Callable) -> Callable:
    """``chunk(states, tables, data, orders, members, steps, active) -> (states, losses)``: ``M``
    runs of one model that differ in their seeds and augmentation levels, trained together,
    ``K = len(steps)`` steps in one compiled call: :func:`make_train_chunk`'s chunk ``vmap``-ped
    over the runs (leading axis ``M`` of ``states``, ``data``, ``orders``, ``members``, ``active``).

    ``states``: the runs' :class:`TrainState` stacked leaf by leaf (:func:`stack_trees`);
    ``data``: their digits (``uint8 [M, n, 28, 28]``, ``int32 [M, n]``); ``orders``: ``int32
    [M, items]``, each run's order of its epoch of ``steps`` (padded to the longest); ``members``:
    the runs' :meth:`~sphere_jax.data.pipeline.DigitStream.member` stacked (keys ``[M, 2]``,
    steps per epoch and rotation kind ``[M]``); ``steps``: ``int32 [K]``, shared; ``active``:
    ``bool [M]``, a run with ``False`` keeps its state (it stopped early, or waits for the
    others to reach its step). ``losses``: ``float32 [M, K]``. ``batch_of(data, step, order,
    member)`` is one run's batch (:meth:`DigitStream.batch_of`). One device; the old states are
    donated; one compilation per ``K``.

    Each run computes what its own :func:`make_train_chunk` would, in one program whose matmuls
    and convolutions carry the run axis: more work per kernel launch, which is what small models
    on a GPU lack. Floats may differ from separate runs in the last bits.
    """
    step_fn = _train_step(model, task)

    def one(state: TrainState, tables, data, order, member, steps, active):
        def body(state, step):
            batch = batch_of(data, step, order, member)
            new, loss = step_fn(state, tables, batch[0], targets(batch, task))
            return jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, state), loss

        return jax.lax.scan(body, state, steps)

    return jit_for(model, jax.vmap(one, in_axes=(0, None, 0, 0, 0, None, 0)), donate_argnums=(0,))


def stack_trees(trees: list):
    """Trees of one structure (the runs' :class:`TrainState`\\ s, data, ...) -> one tree whose leaves
    carry a leading run axis."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def member_state(states: TrainState, i: int) -> TrainState:
    """Run ``i`` of :func:`stack_trees`'s result."""
    return jax.tree_util.tree_map(lambda a: a[i], states)


def make_predict(model: nn.Module) -> Callable:
    """``predict(variables, tables, x) -> logits``, jit-compiled (evaluation mode).

    ``variables`` is ``{"params": ..., **model_state}`` or the params alone (see :func:`as_variables`).
    """
    return jit_for(model, lambda variables, tables, x: model.apply(as_variables(variables), x, tables))
