"""Trained models shipped with the package: parameters plus a model card.

Each model lives in ``sphere_jax/pretrained_models/<name>/``:

* ``variables.npz``: the model's variables (params, and BatchNorm statistics where the model
  has them), one array per leaf, keyed by its path (``params/s2_conv/kernel``); no optimizer
  state, no pickle.
* ``card.json``: the model card: ``model`` (a name of :mod:`sphere_jax.models.registry`), ``L``,
  ``task``, ``dataset``, ``train_rotation``, ``augmentation``, ``epochs``, ``steps``, ``seed``,
  ``test`` (scores on the full test set, per test rotation), ``command`` (the command that
  trained it) and ``evaluate`` (the command that reproduces the scores).

Use::

    model, variables = sphere_jax.pretrained.load("s2cnn_cls_mnist")
    tables = sphere_jax.harmonics.build_tables(model.table_specs())
    logits = model.apply(variables, x, tables)        # x: [B, 2L, 2L-1, 1] on the dh grid

or ``python -m experiments.evaluate --pretrained=NAME --test_rotation=so3 --n_test=N``.
"""
from __future__ import annotations

import json
import os

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained_models")
CARD_FIELDS = ("model", "L", "task", "dataset", "train_rotation", "augmentation", "epochs", "steps", "seed",
               "test", "command", "evaluate")


def names() -> list[str]:
    """The shipped models' names."""
    if not os.path.isdir(ROOT):
        return []
    return sorted(d for d in os.listdir(ROOT) if os.path.exists(os.path.join(ROOT, d, "card.json")))


def _dir(name: str) -> str:
    if name not in names():
        raise KeyError(f"no pretrained model {name!r}; shipped: {names()}")
    return os.path.join(ROOT, name)


def card(name: str) -> dict:
    """The model card of ``name`` (see the module docstring)."""
    with open(os.path.join(_dir(name), "card.json")) as f:
        return json.load(f)


def flatten(tree, prefix: str = "", leaf=np.asarray) -> dict:
    """``{"a": {"b": x}}`` -> ``{"a/b": leaf(x)}`` (numpy arrays by default)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(flatten(dict(v), key, leaf))
        else:
            out[key] = leaf(v)
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def save(name: str, variables, card_: dict, root: str | None = None) -> str:
    """Write ``variables`` and the model card as a shipped model; returns its folder.

    Refuses a card without the fields of :data:`CARD_FIELDS` or with a model that the
    variables do not fit.
    """
    missing = [f for f in CARD_FIELDS if f not in card_]
    if missing:
        raise ValueError(f"model card of {name!r} lacks {missing}")
    _check_fit(card_, variables)
    d = os.path.join(root or ROOT, name)
    os.makedirs(d, exist_ok=True)
    np.savez(os.path.join(d, "variables.npz"), **flatten(dict(variables)))
    with open(os.path.join(d, "card.json"), "w") as f:
        json.dump(card_, f, indent=1, sort_keys=True)
        f.write("\n")
    return d


def _abstract(card_: dict):
    import jax

    from sphere_jax import harmonics
    from sphere_jax.models import registry

    model, task = registry.make_model(card_["model"], L_in=int(card_["L"]))
    L = int(card_["L"])
    x = jax.ShapeDtypeStruct((1, 2 * L, 2 * L - 1, 1), np.float32)
    tables = {k: jax.ShapeDtypeStruct(harmonics.table_shape(k), np.float32) for k in model.table_specs()}
    shapes = jax.eval_shape(lambda t, x: model.init(jax.random.key(0), x, t), tables, x)
    return model, shapes


def _check_fit(card_: dict, variables) -> None:
    _, shapes = _abstract(card_)
    want = flatten(dict(shapes), leaf=lambda v: tuple(v.shape))
    got = flatten(dict(variables), leaf=np.shape)
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise ValueError(f"variables do not fit {card_['model']} at L={card_['L']}: differences {diff}")


def load(name: str):
    """``(model, variables)`` of a shipped model; ``model.apply(variables, x, tables)`` gives
    its logits. Raises ``KeyError`` for an unknown name and ``ValueError`` for a file that does
    not fit its model (corrupt or edited) or an S2CNN whose card records another input
    normalisation than the model now has."""
    import jax.numpy as jnp

    c = card(name)
    path = os.path.join(_dir(name), "variables.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    variables = unflatten(flat)
    _check_fit(c, variables)
    model, _ = _abstract(c)
    from sphere_jax.models.s2cnn import input_norm_of

    norm = input_norm_of(model)
    if "input_norm" in c and c["input_norm"] != norm:  # cards record it since 2026-11-27
        raise ValueError(f"{name} was trained with input_norm {c['input_norm']!r}, but {c['model']} now has {norm!r}")
    return model, {k: _to_jnp(v, jnp) for k, v in variables.items()}


def _to_jnp(tree, jnp):
    if isinstance(tree, dict):
        return {k: _to_jnp(v, jnp) for k, v in tree.items()}
    return jnp.asarray(tree)
