"""One name space for every model of the study: S2CNNs and planar CNNs."""
from __future__ import annotations

import os

import flax.linen as nn

from sphere_jax.models import s2cnn


# What ``--model=s2cnn`` / ``--model=cnn`` mean in each task: the study's headline models (the
# 204k S2CNN segmenter and the largest CNN segmenter; Cohen's S2CNN classifier and its planar
# baseline).
ALIASES = {
    "segment": {"s2cnn": "s2cnn_204k", "cnn": "cnn_5_5m"},
    "classify": {"s2cnn": "s2cnn_cls", "cnn": "cnn_cls_68k"},
}


def resolve(name: str, task: str) -> str:
    """A model name with the task's aliases (``s2cnn``, ``cnn``) replaced by the named model."""
    return ALIASES.get(task, {}).get(name, name)


def model_names() -> list[str]:
    names = sorted(s2cnn.SEGMENTERS) + sorted(s2cnn.CLASSIFIERS)
    try:
        from sphere_jax.models import cnn

        names += sorted(cnn.SEGMENTERS) + sorted(cnn.CLASSIFIERS)
    except ImportError:
        pass
    return names


def make_model(name: str, L_in: int, num_classes: int | None = None) -> tuple[nn.Module, str]:
    """``(model, task)`` for a model name at input band-limit ``L_in``; task is "classify" or "segment".

    Every model is called as ``model.apply(variables, x [B, 2L, 2L-1, 1], tables)``.
    """
    if name in s2cnn.SEGMENTERS:
        return s2cnn.make_s2cnn(name, L_in=L_in, num_classes=num_classes), "segment"
    if name in s2cnn.CLASSIFIERS:
        return s2cnn.make_s2cnn(name, L_in=L_in, num_classes=num_classes), "classify"
    from sphere_jax.models import cnn

    if name in cnn.SEGMENTERS:
        return cnn.make_cnn(name, num_classes=num_classes), "segment"
    if name in cnn.CLASSIFIERS:
        return cnn.make_cnn(name, num_classes=num_classes), "classify"
    raise ValueError(f"unknown model {name!r}; choose one of {model_names()}")


def min_L(name: str) -> int:
    """Smallest input band-limit a model accepts (grid ``2L x (2L-1)``): a Cohen / deep S2CNN
    classifier's first band-limit, the smallest grid a planar CNN's VALID convolutions fit in, else 1."""
    if name in s2cnn.CLASSIFIERS:
        return int(s2cnn.CLASSIFIERS[name].bandlimits[0])
    from sphere_jax.models import cnn

    for table in (cnn.SEGMENTERS, cnn.CLASSIFIERS):
        if name in table:
            return (table[name].min_input_size() + 2) // 2  # 2L - 1 >= the conv stack's minimum
    return 1


# Models whose CPU runs train faster data-parallel over the cores split into JAX devices
# (train.split_cpu, train.make_split_train_step) than on one device using every core inside each
# operation. Measured 2026-11-28 on 2 cores, batch 32, L = 30, whole training runs of
# ``experiments.classify`` (300-1,200 steps, 2 devices / 1 device, with the split step as it is
# now): cnn_cls_250k 0.68x the time (0.81x with two runs sharing the cores, earlier step);
# cnn_cls_68k 1.14x, cnn_cls_1m 0.96x (noise), cnn_cls_4m 1.04x: they keep one device. CNN-218k
# at L = 50 took 0.97x per split step (noise), and the S2CNNs ran 1.75x slower on an SPMD split
# (results/cpu_cnn/README.md). The 1M and 4M classifiers joined on 2026-11-28 (late), from paired
# rounds against PyTorch in one process (experiments.torch_twin --cpu_devices=2
# --variants=one_device; results/cpu_cnn/epyc_20261128/split_vs_one_device.jsonl): inference at
# batch 32 split / one device 0.91-0.93 (4M) and 0.91 (1M), training 0.97-1.00; 200-step whole
# runs of the 4M then took 0.96-0.99x the time split (the 1.04x above was within the noise).
# The 5.5M segmenter's inference lost split (1.04).
CPU_SPLIT = frozenset({"cnn_cls_250k", "cnn_cls_1m", "cnn_cls_4m"})


def cpu_devices(name: str, batch_size: int, cores: int | None = None) -> int:
    """How many JAX devices a CPU run of model ``name`` at ``batch_size`` should split the cores
    into (data parallelism over them; see :func:`sphere_jax.train.split_cpu`).

    ``name`` is a model name, not a task's alias (see :func:`resolve`). The models of
    :data:`CPU_SPLIT` get one device per core (``cores``, default: the cores this process may
    use) with at least 8 examples each: the largest such count that divides ``batch_size``.
    Every other model gets 1. A run on a split CPU trains with
    :func:`sphere_jax.train.make_split_train_step` (no collectives between the CPU devices).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if name not in CPU_SPLIT:
        return 1
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return max(n for n in range(1, max(1, min(cores, batch_size // 8)) + 1) if batch_size % n == 0)
