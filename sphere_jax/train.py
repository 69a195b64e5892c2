"""Losses, train state and jit-compiled, data-parallel train / eval steps.

Data parallelism: parameters and tables are replicated, the batch is sharded over a 1-D
``Mesh`` of all devices (axis ``"data"``); ``jax.jit`` inserts the gradient all-reduce. A
batch whose size is not a multiple of the device count is rejected with a clear error.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Task = str  # "classify" | "segment"


@struct.dataclass
class TrainState:
    """``step`` (int32 scalar), ``params`` and ``opt_state`` pytrees; the optimizer is static."""

    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(cls, params, tx):
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), tx=tx)


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


def make_train_step(model: nn.Module, task: Task) -> Callable:
    """``step(state, tables, x, y) -> (state, loss)``, jit-compiled; donate the old state."""

    def step(state: TrainState, tables, x, y):
        def loss_of(params):
            return loss_fn(model.apply({"params": params}, x, tables), y, task)

        loss, grads = jax.value_and_grad(loss_of)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss

    return jax.jit(step, donate_argnums=(0,))


def make_predict(model: nn.Module) -> Callable:
    """``predict(params, tables, x) -> logits``, jit-compiled."""
    return jax.jit(lambda params, tables, x: model.apply({"params": params}, x, tables))
