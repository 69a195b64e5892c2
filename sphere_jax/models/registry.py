"""One name space for every model of the study: S2CNNs and planar CNNs."""
from __future__ import annotations

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
