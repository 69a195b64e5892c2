"""S2CNN classifiers and segmenters of the study, with its named configurations.

All models share one calling convention::

    tables = sphere_jax.harmonics.build_tables(model.table_specs())   # once, outside jit
    variables = model.init(key, x, tables)
    logits = model.apply(variables, x, tables)

Inputs are S2 signals ``x float32 [B, 2L, 2L-1, C]`` on the dh grid (``[batch, theta, phi,
channel]``). Classifiers return logits ``[B, num_classes]`` (rotation invariant);
segmenters return per-pixel logits ``[B, 2L_out, 2L_out-1, num_classes]`` (rotation
equivariant).

Filter radii (``max_betas``, radians) follow the reference's rule of about 6.19 grid steps of
the layer's input band-limit: ``max_beta = 6.19 pi / L_in`` (e.g. ``0.1238 pi`` at 50).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sphere_jax import harmonics as hm, layers

RADIUS_GRID_STEPS = 6.19


def default_max_beta(L_in: int) -> float:
    """Filter radius of the reference (in radians) for a layer of input band-limit ``L_in``,
    capped at ``pi / 2`` (a hemisphere) for very small band-limits."""
    return float(min(np.round(RADIUS_GRID_STEPS / L_in, 4), 0.5) * np.pi)


INPUT_NORMS = ("rms", "none")
# Every classifier input is scaled to this area-weighted RMS over the sphere (input_norm="rms"):
# the reference's operating point. Its digits are 0..255 floats, and canonical MNIST digits in that
# range have an area-weighted RMS of 59.4 on the sphere (measured on 1,000 training digits at
# L = 12, 30 and 50; 30 to 99 per digit). At our [0, 1] scale the S2CNN classifiers learn far more slowly
# (Adam's steps are absolute: zero-initialised biases and the dense output layer must grow by
# orders of magnitude); measured on the Cohen classifier at L=12, 1,000 steps: hold-out 48 % at
# [0, 1], 64 % at unit RMS, 68 % at RMS 40, 66 % with the reference's x255 (see the
# classification results' README).
REFERENCE_INPUT_RMS = 60.0
# The segmenters take their inputs as they are (digits in [0, 1]): normalised to RMS 60 the 204k
# segmenter starts with saturated logits (initial loss 64 against chance 2.40) and learns more
# slowly. Measured at L = 50 on an H200 (600 steps, batch 32, Adam 1e-3, seed 0): hold-out mIoU
# 0.393 as they are against 0.232 at RMS 60, test mIoU on 1,000 rotated digits 0.347 against 0.204
# (results/input_scale/seg_L50.json).
SEGMENTER_INPUT_NORM = "none"


def input_norm_of(model) -> str | None:
    """A model's input normalisation, ``"rms"`` or ``"none"`` for an S2CNN; ``None`` for models
    without one (the planar CNNs). Runs and model cards record it, so that a checkpoint is not
    restored into a model that normalises differently."""
    return getattr(getattr(model, "config", None), "input_norm", None)


def _check_norm(v):
    if v not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {v!r}")


def _normalize_input(x, how, target):
    return layers.rms_normalize(x, target) if how == "rms" else x


@dataclasses.dataclass(frozen=True)
class S2CNNSegmenterConfig:
    """S2 conv -> SO(3) convs -> SO3ToS2, ReLU between layers, no norm, no skips.

    ``so3_features[i]`` / ``so3_bandlimits[i]`` are the output channels / band-limit of the
    i-th SO(3) conv; ``max_betas`` has one radius per layer (S2, SO(3)..., SO3ToS2).
    """

    L_in: int = 50
    in_channels: int = 1
    s2_features: int = 11
    s2_bandlimit: int = 42
    so3_features: tuple[int, ...] = (12, 13, 14, 13, 12, 11)
    so3_bandlimits: tuple[int, ...] = (35, 27, 20, 27, 35, 42)
    L_out: int = 50
    num_classes: int = 11
    max_betas: tuple[float, ...] | None = None
    n_alpha: int = 8
    n_beta: int = 3
    n_gamma: int = 8
    max_gamma: float | None = None
    input_norm: str = SEGMENTER_INPUT_NORM
    input_rms: float = REFERENCE_INPUT_RMS

    def __post_init__(self):
        _check_norm(self.input_norm)
        if len(self.so3_features) != len(self.so3_bandlimits):
            raise ValueError("so3_features and so3_bandlimits must have the same length")
        if self.max_betas is not None and len(self.max_betas) != len(self.so3_features) + 2:
            raise ValueError(f"max_betas needs {len(self.so3_features) + 2} radii (one per layer)")

    def radii(self) -> tuple[float, ...]:
        if self.max_betas is not None:
            return tuple(self.max_betas)
        ins = (self.L_in, self.s2_bandlimit) + tuple(self.so3_bandlimits)
        return tuple(default_max_beta(L) for L in ins)


@dataclasses.dataclass(frozen=True)
class S2CNNClassifierConfig:
    """S2 conv -> SO(3) convs -> Haar integration -> dense.

    ``features[0]`` / ``bandlimits[0]`` belong to the S2 conv, the rest to SO(3) convs.
    """

    L_in: int = 30
    in_channels: int = 1
    features: tuple[int, ...] = (20, 40)
    bandlimits: tuple[int, ...] = (10, 6)
    num_classes: int = 10
    max_betas: tuple[float, ...] | None = None
    n_alpha: int = 6
    n_beta: int = 1
    n_gamma: int = 6
    max_gamma: float | None = None
    input_norm: str = "rms"
    input_rms: float = REFERENCE_INPUT_RMS
    mlp: tuple[int, ...] = ()
    batchnorm: bool = False

    def __post_init__(self):
        _check_norm(self.input_norm)
        if len(self.features) != len(self.bandlimits) or not self.features:
            raise ValueError("features and bandlimits must be non-empty and of equal length")
        if self.max_betas is not None and len(self.max_betas) != len(self.features):
            raise ValueError(f"max_betas needs {len(self.features)} radii (one per layer)")

    def radii(self) -> tuple[float, ...]:
        if self.max_betas is not None:
            return tuple(self.max_betas)
        return tuple(np.pi / 16 for _ in self.features)


def _seg_layers(cfg: S2CNNSegmenterConfig, layout: str | None = None, **kw):
    r = cfg.radii()
    layout = layout or hm.so3_layout()
    out = [layers.S2Conv(cfg.s2_features, cfg.L_in, cfg.s2_bandlimit, r[0], cfg.n_alpha, cfg.n_beta,
                         layout=layout, name="s2_conv", **kw)]
    L_prev = cfg.s2_bandlimit
    for i, (c, L) in enumerate(zip(cfg.so3_features, cfg.so3_bandlimits)):
        out.append(layers.SO3Conv(c, L_prev, L, r[i + 1], cfg.n_alpha, cfg.n_beta, cfg.n_gamma, cfg.max_gamma,
                                  layout=layout, name=f"so3_conv_{i}", **kw))
        L_prev = L
    out.append(layers.SO3ToS2(cfg.num_classes, L_prev, cfg.L_out, r[-1], cfg.n_alpha, cfg.n_beta, cfg.n_gamma,
                              cfg.max_gamma, layout=layout, name="so3_to_s2", **kw))
    return out


def _cls_layers(cfg: S2CNNClassifierConfig, layout: str | None = None, **kw):
    r = cfg.radii()
    layout = layout or hm.so3_layout()
    out = [layers.S2Conv(cfg.features[0], cfg.L_in, cfg.bandlimits[0], r[0], cfg.n_alpha, cfg.n_beta,
                         layout=layout, name="s2_conv", **kw)]
    for i in range(1, len(cfg.features)):
        out.append(
            layers.SO3Conv(
                cfg.features[i], cfg.bandlimits[i - 1], cfg.bandlimits[i], r[i],
                cfg.n_alpha, cfg.n_beta, cfg.n_gamma, cfg.max_gamma, layout=layout, name=f"so3_conv_{i - 1}", **kw,
            )
        )
    return out


def layer_modules(model: nn.Module) -> list[nn.Module]:
    """The equivariant layers of an S2CNN in call order (unbound, ``parent=None``): ``S2Conv``,
    ``SO3Conv``..., and for segmenters ``SO3ToS2``. Each is applied as
    ``layer.apply({"params": params[layer.name]}, x, tables)``: the first takes the input
    ``[B, 2L_in, 2L_in-1, C]``, the others the previous layer's output (a ReLU in between), an
    SO(3) signal in the layers' ``layout``: ``[B, 2L-1, 2L, 2L-1, C]`` (``"channels_last"``) or
    ``[2L-1, 2L-1, B, C, 2L]`` (``"gamma_first"``). For per-layer accounting
    (``sphere_jax.benchmark.layer_case``)."""
    cfg = model.config
    if isinstance(model, S2CNNSegmenter):
        return _seg_layers(cfg, parent=None)
    if isinstance(model, S2CNNClassifier):
        return _cls_layers(cfg, parent=None)
    raise TypeError(f"layer_modules takes an S2CNN segmenter or classifier, got {type(model).__name__}")


def _apply_layers(mods, x, tables, relu_last: bool):
    """Apply layers in order with ReLUs between (and after the last if ``relu_last``). The
    layers share one ``layout``, so SO(3) signals pass between them as they are."""
    for i, m in enumerate(mods):
        x = m(x, tables)
        if i < len(mods) - 1 or relu_last:
            x = hm.relu(x)  # a PendingGrid too (SPHERE_JAX_BOUNDARY=pallas)
    return x


def _merge_specs(mods):
    specs = {}
    for m in mods:
        specs.update(m.table_specs())
    return specs


def _check_input(x, L, C, name):
    if x.ndim != 4 or x.shape[1:] != (2 * L, 2 * L - 1, C):
        raise ValueError(
            f"{name} expects x of shape [batch, {2 * L}, {2 * L - 1}, {C}] (band-limit {L}), got {tuple(x.shape)}"
        )


class S2CNNSegmenter(nn.Module):
    """Equivariant segmenter: ``[B, 2L_in, 2L_in-1, C] -> [B, 2L_out, 2L_out-1, num_classes]``.

    With the default ``input_norm="none"`` it is scale-dependent: it expects the pipeline's digits
    in [0, 1] (0..255 inputs saturate its untrained logits; see ``SEGMENTER_INPUT_NORM``)."""

    config: S2CNNSegmenterConfig = S2CNNSegmenterConfig()

    def table_specs(self) -> dict:
        return _merge_specs(_seg_layers(self.config, parent=None))

    @nn.compact
    def __call__(self, x: jax.Array, tables) -> jax.Array:
        cfg = self.config
        _check_input(x, cfg.L_in, cfg.in_channels, "S2CNNSegmenter")
        x = _normalize_input(x, cfg.input_norm, cfg.input_rms)
        x = _apply_layers(_seg_layers(cfg), x, tables, relu_last=False)
        return x


class S2CNNClassifier(nn.Module):
    """Invariant classifier: ``[B, 2L_in, 2L_in-1, C] -> [B, num_classes]``.

    Convolutions with ReLU, Haar integration over SO(3), then the head: for each width in
    ``config.mlp`` an optional BatchNorm, a dense layer and ReLU; then an optional BatchNorm
    and the output dense layer. With ``config.batchnorm`` the model has a ``batch_stats``
    collection: call it with ``train=True, mutable=["batch_stats"]`` while training (batch
    statistics, running averages updated with PyTorch's momentum 0.1) and ``train=False``
    (running averages) to evaluate.
    """

    config: S2CNNClassifierConfig = S2CNNClassifierConfig()

    def table_specs(self) -> dict:
        return _merge_specs(_cls_layers(self.config, parent=None))

    @nn.compact
    def __call__(self, x: jax.Array, tables, train: bool = False) -> jax.Array:
        cfg = self.config
        _check_input(x, cfg.L_in, cfg.in_channels, "S2CNNClassifier")
        x = _normalize_input(x, cfg.input_norm, cfg.input_rms)
        mods = _cls_layers(cfg)
        x = _apply_layers(mods, x, tables, relu_last=True)
        x = layers.so3_integrate(x, mods[-1].layout)
        # two-pass variance, as PyTorch's BatchNorm1d: the features reaching bn_0 have mean/std up
        # to about 60 across a batch, and flax's default E[x^2] - E[x]^2 then loses about 1 % of
        # the normalised values to round-off (tests/test_benchmark.py, vmapped members)
        bn = lambda h, i: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                       use_fast_variance=False, name=f"bn_{i}")(h)
        for i, width in enumerate(cfg.mlp):
            if cfg.batchnorm:
                x = bn(x, i)
            x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
        if cfg.batchnorm:
            x = bn(x, len(cfg.mlp))
        return nn.Dense(cfg.num_classes, name="dense")(x)


# ---------------------------------------------------------------------------------------
# Named configurations


def scale_segmenter(L_in: int, cfg: S2CNNSegmenterConfig = S2CNNSegmenterConfig()) -> S2CNNSegmenterConfig:
    """The same architecture with every band-limit scaled by ``L_in / cfg.L_in`` (min 2) and
    radii recomputed by the reference's rule: for CPU runs at small band-limits."""
    s = L_in / cfg.L_in
    sc = lambda L: max(2, int(round(L * s)))
    return dataclasses.replace(
        cfg,
        L_in=L_in,
        s2_bandlimit=sc(cfg.s2_bandlimit),
        so3_bandlimits=tuple(sc(L) for L in cfg.so3_bandlimits),
        L_out=L_in,
        max_betas=None,
    )


SEGMENTERS: dict[str, S2CNNSegmenterConfig] = {
    # The study's 204,073-parameter segmenter at bandwidth 50 (sem_seg_s2cnn's models.py): the
    # reference's default grids (3 rings x 8 azimuths; SO(3): x 8 gammas in linspace(-2pi, 2pi, 8)).
    "s2cnn_204k": S2CNNSegmenterConfig(
        max_betas=tuple(b * np.pi for b in (0.1238, 0.1474, 0.1768, 0.2292, 0.3095, 0.2292, 0.1768, 0.1474)),
        max_gamma=2 * np.pi,
    ),
}

# Small members of the same families, for CPU runs, tests and the notebook.
SEGMENTERS["s2cnn_seg_small"] = S2CNNSegmenterConfig(
    s2_features=8, s2_bandlimit=42, so3_features=(10, 10), so3_bandlimits=(35, 42)
)

CLASSIFIERS: dict[str, S2CNNClassifierConfig] = {
    # Cohen et al. 2018, spherical MNIST: jonkhler/s2cnn examples/mnist/run.py S2ConvNet_original,
    # with s2cnn's default near-identity grids (S2: 3 rings up to pi/8 x 8 azimuths; SO(3): the
    # same x 8 pre-gammas in linspace(-2pi, 2pi, 8)); 154,550 parameters.
    "s2cnn_cls": S2CNNClassifierConfig(
        features=(20, 40), bandlimits=(10, 6), max_betas=(np.pi / 8, np.pi / 8),
        n_alpha=8, n_beta=3, n_gamma=8, max_gamma=2 * np.pi,
    ),
    # The same file's S2ConvNet_deep (~99.2 % R/R reported): one ring of 6 azimuths x 6
    # pre-gammas per layer, radii pi/16, pi/16, pi/8, pi/8, pi/4, pi/4, pi/2; then BatchNorm +
    # MLP head 64 -> 64 -> 32 -> 10; 156,882 parameters.
    "s2cnn_cls_deep": S2CNNClassifierConfig(
        features=(8, 16, 16, 24, 24, 32, 64),
        bandlimits=(30, 15, 15, 7, 7, 3, 3),
        max_betas=tuple(np.pi / d for d in (16, 16, 8, 8, 4, 4, 2)),
        n_alpha=6, n_beta=1, n_gamma=6, max_gamma=2 * np.pi,
        mlp=(64, 32), batchnorm=True,
    ),
    # The project's earlier deep variant: the reference's channels and band-limits with 3 rings
    # x 8 azimuths x 8 gammas, radii of 6.19 grid steps, and a plain dense output (no MLP head).
    "s2cnn_cls_deep_rings": S2CNNClassifierConfig(
        features=(8, 16, 16, 24, 24, 32, 64),
        bandlimits=(30, 15, 15, 7, 7, 3, 3),
        max_betas=tuple(default_max_beta(L) for L in (30, 30, 15, 15, 7, 7, 3)),
        n_alpha=8, n_beta=3, n_gamma=8,
    ),
    # A narrow two-layer classifier whose band-limits fit inputs down to L = 6.
    "s2cnn_cls_small": S2CNNClassifierConfig(features=(8, 16), bandlimits=(6, 4)),
}

def make_s2cnn(name: str, L_in: int | None = None, num_classes: int | None = None) -> nn.Module:
    """A named S2CNN, optionally rescaled to input band-limit ``L_in`` (segmenters: all
    band-limits scaled; classifiers: only the input band-limit changes)."""
    if name in SEGMENTERS:
        cfg = SEGMENTERS[name]
        if L_in is not None and L_in != cfg.L_in:
            cfg = scale_segmenter(L_in, cfg)
        if num_classes is not None:
            cfg = dataclasses.replace(cfg, num_classes=num_classes)
        return S2CNNSegmenter(cfg)
    if name in CLASSIFIERS:
        cfg = CLASSIFIERS[name]
        if L_in is not None:
            if L_in < cfg.bandlimits[0]:
                raise ValueError(f"{name}: input band-limit {L_in} is below the first layer's {cfg.bandlimits[0]}")
            cfg = dataclasses.replace(cfg, L_in=L_in)
        if num_classes is not None:
            cfg = dataclasses.replace(cfg, num_classes=num_classes)
        return S2CNNClassifier(cfg)
    raise ValueError(f"unknown S2CNN {name!r}; choose one of {sorted(SEGMENTERS) + sorted(CLASSIFIERS)}")


def count_params(params) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def param_shapes(model: nn.Module):
    """Parameter shapes without building tables or computing anything (``jax.eval_shape``)."""
    cfg = model.config
    x = jax.ShapeDtypeStruct((1, 2 * cfg.L_in, 2 * cfg.L_in - 1, cfg.in_channels), jnp.float32)
    specs = model.table_specs()
    abstract_tables = {k: jax.ShapeDtypeStruct(hm.table_shape(k), jnp.float32) for k in specs}
    return jax.eval_shape(lambda t: model.init(jax.random.key(0), jnp.zeros(x.shape), t), abstract_tables)["params"]
