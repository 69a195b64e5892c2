"""Planar CNN baselines on equirectangular (dh-grid) images (Flax linen).

The non-equivariant models of the study "Equivariance versus Augmentation for Spherical
Images" (Gerken et al. 2022). They see a spherical signal as a plain image: the dh grid of
band-limit ``L`` as an array ``[B, 2L, 2L-1, C]`` (batch, theta/rows, phi/columns, channels;
channels last). Nothing here uses the sphere's geometry: borders are not periodic and the
poles are not treated specially.

Two families:

* :class:`CNNSegmenter`: per-pixel logits ``[B, H, W, num_classes]`` for input ``[B, H, W, C]``.
  Encoder of VALID convolutions + ReLU, mirrored decoder of transposed convolutions, and
  residual shortcuts on every layer except the first encoder and the last decoder layer.
  The decoder reproduces each encoder input size exactly (per axis, so ``2L x (2L-1)`` grids
  and odd sizes work), so the output has the input's spatial size. The named configurations
  in :data:`SEGMENTERS` reproduce the reference parameter counts exactly (see
  :class:`CNNSegmenter`).
* :class:`CNNClassifier`: logits ``[B, num_classes]``. VALID conv stack + ReLU, then either
  flatten (the 2018 S2CNN paper's planar baseline, 68,106 parameters at 60x60 and also at
  our 60x59 grid) or global average pooling (the larger members of :data:`CLASSIFIERS`,
  whose parameter count does not depend on the input size), optional hidden dense layers,
  dense output.

Every model is called like the equivariant ones, ``model.apply(variables, x, tables)``; the
planar models ignore ``tables`` (``None`` is fine) and their :meth:`table_specs` is ``{}``.
Build them by name with :func:`make_cnn`; count parameters with :func:`count_params`
(works on ``jax.eval_shape`` output, so no real initialisation is needed).

Weights use Flax's default initialisers (LeCun-normal kernels, zero biases), not PyTorch's
uniform ones used by the reference implementation; parameter counts are unaffected.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sphere_jax.models import conv_cpu

__all__ = [
    "CNNSegmenterConfig",
    "CNNClassifierConfig",
    "CNNSegmenter",
    "CNNClassifier",
    "SEGMENTERS",
    "CLASSIFIERS",
    "make_cnn",
    "count_params",
    "conv_sizes",
    "min_input_size",
    "resolve_conv_impl",
    "cpu_ynn_fusions",
]


# --------------------------------------------------------------------------- size helpers


def conv_sizes(hw: Sequence[int], kernels: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """Spatial sizes through a stack of VALID convolutions (or VALID max-pools).

    Args:
      hw: input ``(H, W)``.
      kernels, strides: per-layer square kernel size and stride.

    Returns:
      ``[(H_0, W_0), (H_1, W_1), ..., (H_n, W_n)]`` with ``(H_0, W_0) = hw`` and
      ``H_{i+1} = floor((H_i - k_i) / s_i) + 1`` (same for ``W``). Sizes are not clipped: a
      value ``< 1`` means the input is too small for the stack.
    """
    out = [(int(hw[0]), int(hw[1]))]
    for k, s in zip(kernels, strides):
        h, w = out[-1]
        out.append(((h - k) // s + 1, (w - k) // s + 1))
    return out


def min_input_size(kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Smallest ``H`` (and ``W``) for which every VALID layer of the stack has output size >= 1."""
    m = 1
    for k, s in zip(reversed(list(kernels)), reversed(list(strides))):
        m = (m - 1) * s + k
    return m


def _check_input(x: jax.Array, who: str, kernels, strides) -> list[tuple[int, int]]:
    if x.ndim != 4:
        raise ValueError(f"{who}: expected input of rank 4 [B, H, W, C], got shape {tuple(x.shape)}")
    sizes = conv_sizes(x.shape[1:3], kernels, strides)
    if min(min(hw) for hw in sizes) < 1:
        raise ValueError(
            f"{who}: input shape {tuple(x.shape)} is too small for the VALID convolutions "
            f"(kernels {tuple(kernels)}, strides {tuple(strides)}): spatial sizes per layer {sizes}; "
            f"need H, W >= {min_input_size(kernels, strides)}"
        )
    return sizes


def _valid_conv(conv: nn.Module, h: jax.Array, k: int, s: int) -> jax.Array:
    """A VALID convolution computed as ``conv`` (padded by ``s`` on every side) then cropped.

    Same parameters and result as ``padding="VALID"``; XLA's CPU backend runs a padded
    convolution and its gradients 2.5-3x faster than an unpadded one (measured: a 9x9 conv,
    22 -> 15 channels, batch 32 at 92x91, forward + gradients 3.3 s VALID, 1.3 s padded; the
    whole CNN-218k training step at bandwidth 50 went from 21.1 s to 18.6 s on 2 cores, where
    the weight gradients of the transposed convolutions now dominate).
    """
    Hv, Wv = (h.shape[1] - k) // s + 1, (h.shape[2] - k) // s + 1
    return conv(h)[:, 1 : 1 + Hv, 1 : 1 + Wv]


def _nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of ``[B, h, w, C]`` to ``[B, H, W, C]``.

    Source index ``floor(i * h / H)`` per axis (the convention of PyTorch's ``nearest``
    upsampling used by the reference), computed statically.
    """
    for axis, (cur, tgt) in zip((1, 2), ((x.shape[1], size[0]), (x.shape[2], size[1]))):
        if cur != tgt:
            idx = (np.arange(tgt) * cur) // tgt
            x = jnp.take(x, jnp.asarray(idx), axis=axis)
    return x


CONV_IMPLS = ("auto", "lax", "cpu")


def resolve_conv_impl(requested: str = "auto") -> str:
    """The convolution implementation a CNN uses: ``"lax"`` (Flax / ``lax`` convolutions, XLA's
    own gradients) or ``"cpu"`` (:mod:`sphere_jax.models.conv_cpu`: hand-written gradients, several
    times faster on XLA:CPU). ``"auto"`` reads ``$SPHERE_JAX_CNN_CONV`` if set, else picks ``"cpu"``
    on the CPU backend and ``"lax"`` elsewhere. Both give the same parameters and, to float32
    round-off, the same values and gradients."""
    impl = requested
    if impl == "auto":
        impl = os.environ.get("SPHERE_JAX_CNN_CONV", "auto")
    if impl == "auto":
        impl = "cpu" if jax.default_backend() == "cpu" else "lax"
    if impl not in CONV_IMPLS[1:]:
        raise ValueError(f"unknown CNN convolution implementation {impl!r}; choose one of {CONV_IMPLS}")
    return impl


def cpu_ynn_fusions(model) -> str | None:
    """The YNNPACK fusion types that ``model``'s programs compile with on the CPU path
    (:func:`conv_cpu.jit`, unpadded convolutions), or ``None`` (plain ``jax.jit``: not a CNN, or
    the ``lax`` path). Measured per family (results/cpu_cnn/README.md): the segmenters run best
    with none (:data:`conv_cpu.YNN_NONE`), the classifiers with YNNPACK's dots and reductions
    (:data:`conv_cpu.YNN_DOTS_AND_REDUCES`), which run their patch and tap matmuls."""
    if isinstance(model, (CNNSegmenter, CNNClassifier)) and resolve_conv_impl(model.conv_impl) == "cpu":
        return conv_cpu.YNN_NONE if isinstance(model, CNNSegmenter) else conv_cpu.YNN_DOTS_AND_REDUCES
    return None


class _CpuConv(nn.Module):
    """``nn.Conv(features, (k, k), strides=s, padding="VALID")`` on :mod:`conv_cpu` (same parameters:
    ``kernel [k, k, Cin, features]`` LeCun-normal, ``bias [features]`` zeros)."""

    features: int
    k: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(), (self.k, self.k, x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return conv_cpu.conv2d(x, w, b, self.stride)


class _CpuConvT(nn.Module):
    """The decoder's ``nn.ConvTranspose`` (output padded to ``out_hw``) on :mod:`conv_cpu`."""

    features: int
    k: int
    stride: int
    out_hw: tuple

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(), (self.k, self.k, x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return conv_cpu.conv_transpose2d(x, w, b, self.stride, self.out_hw)


def _check_layers(who: str, channels, kernels, strides):
    if not (len(channels) == len(kernels) == len(strides)) or len(channels) == 0:
        raise ValueError(
            f"{who}: channels, kernels and strides must be non-empty and of equal length, got "
            f"{len(channels)}, {len(kernels)}, {len(strides)}"
        )
    for v in (*channels, *kernels, *strides):
        if int(v) != v or v < 1:
            raise ValueError(f"{who}: channels, kernels and strides must be positive integers, got "
                             f"{tuple(channels)}, {tuple(kernels)}, {tuple(strides)}")


# --------------------------------------------------------------------------- segmenter


class CNNSegmenter(nn.Module):
    """Encoder-decoder CNN with residual shortcuts for per-pixel classification.

    Input ``x``: ``[B, H, W, C]`` (channels last; for a dh grid ``H = 2L``, ``W = 2L - 1``).
    Output: logits ``[B, H, W, num_classes]`` (same ``H, W`` as the input, no softmax).

    With ``n = len(channels)``, ``c_i = channels[i]``, ``k_i``, ``s_i`` and ``(H_i, W_i)`` the
    input size of encoder layer ``i`` (``(H_0, W_0) = (H, W)``):

    * encoder layer ``i`` (``0 <= i < n``): ``h <- relu(conv_i(h) + skip_i(h))`` where
      ``conv_i`` is a VALID ``k_i x k_i`` convolution, stride ``s_i``, ``c_{i-1} -> c_i``
      (``c_{-1} = C``), and for ``i >= 1`` ``skip_i = conv1x1(maxpool_{k_i, s_i}(h))``
      (VALID max-pool with the conv's window and stride, so the sizes agree; 1x1 conv
      ``c_{i-1} -> c_i`` with bias). Layer 0 has no shortcut.
    * decoder layer ``i`` (``i = n-1, ..., 1``): ``h <- relu(convT_i(h) + skip'_i(h))``,
      ``convT_i`` a ``k_i x k_i`` transposed convolution, stride ``s_i``, ``c_i -> c_{i-1}``,
      whose output is padded at the bottom/right by ``0..s_i-1`` rows/columns (PyTorch's
      ``output_padding``, applied per axis) to exactly ``(H_i, W_i)``, and
      ``skip'_i = upsample_nearest(conv1x1(h), (H_i, W_i))`` (1x1 conv ``c_i -> c_{i-1}``).
    * output layer: transposed convolution ``k_0``, stride ``s_0``, ``c_0 -> num_classes``, to
      exactly ``(H, W)``; no shortcut, no ReLU.

    With ``use_skips=False`` all shortcuts are dropped. Every convolution has a bias, so with
    ``c_{-1} = C`` the parameter count is ``sum_{i<n} (k_i^2 c_{i-1} c_i + c_i)`` (encoder)
    ``+ sum_{1<=i<n} (k_i^2 c_i c_{i-1} + c_{i-1}) + k_0^2 c_0 K + K`` (decoder, ``K =
    num_classes``) ``+ sum_{1<=i<n} (c_{i-1} c_i + c_i) + (c_i c_{i-1} + c_{i-1})`` (shortcuts),
    independent of ``H, W``. This is the reference implementation's layout (shortcuts on the inner layers
    only), and it gives exactly 218,144 / 1,042,013 / 5,519,335 parameters for the three
    named configurations of :data:`SEGMENTERS` with ``C = 1`` and 11 classes.

    Attributes:
      channels: encoder output channels ``(c_0, ..., c_{n-1})``.
      kernels: square kernel size per encoder layer (mirrored in the decoder).
      strides: stride per encoder layer (mirrored in the decoder).
      num_classes: output channels (logits).
      use_skips: add the residual shortcuts.
      conv_impl: ``"auto"`` (default), ``"lax"`` or ``"cpu"`` (see :func:`resolve_conv_impl`).

    ``__call__(x, tables=None)``: ``tables`` is ignored (uniform model signature). Raises
    ``ValueError`` for inputs of rank != 4 or smaller than :func:`min_input_size`.
    """

    channels: Sequence[int]
    kernels: Sequence[int]
    strides: Sequence[int]
    num_classes: int = 11
    use_skips: bool = True
    conv_impl: str = "auto"

    def table_specs(self) -> dict:
        """Harmonic tables this model needs: none (``{}``)."""
        return {}

    @nn.compact
    def __call__(self, x: jax.Array, tables: Mapping[str, jax.Array] | None = None) -> jax.Array:
        ch, ks, ss = tuple(self.channels), tuple(self.kernels), tuple(self.strides)
        _check_layers("CNNSegmenter", ch, ks, ss)
        sizes = _check_input(x, "CNNSegmenter", ks, ss)
        n = len(ch)
        cpu = resolve_conv_impl(self.conv_impl) == "cpu"

        h = x
        for i in range(n):
            k, s = ks[i], ss[i]
            if cpu:
                y = _CpuConv(ch[i], k, s, name=f"enc_conv_{i}")(h)
            else:
                y = _valid_conv(nn.Conv(ch[i], (k, k), strides=(s, s), padding=((s, s), (s, s)), name=f"enc_conv_{i}"), h, k, s)
            if self.use_skips and i > 0:
                if cpu:
                    y = y + _CpuConv(ch[i], 1, name=f"enc_skip_{i}")(conv_cpu.max_pool_valid(h, k, s))
                else:
                    p = nn.max_pool(h, (k, k), strides=(s, s), padding="VALID")
                    y = y + nn.Conv(ch[i], (1, 1), name=f"enc_skip_{i}")(p)
            h = nn.relu(y)

        for i in range(n - 1, -1, -1):
            k, s = ks[i], ss[i]
            out_ch = ch[i - 1] if i > 0 else self.num_classes
            target = sizes[i]
            # Transposed-conv output is (in - 1) * s + k + extra; extra in [0, s - 1] reaches the
            # encoder input size exactly (explicit padding of the dilated input, PyTorch's
            # output_padding; padded rows/columns get the bias like in PyTorch).
            extra = [target[a] - k - (h.shape[1 + a] - 1) * s for a in (0, 1)]
            assert all(0 <= e < s for e in extra), (extra, target, h.shape)
            name = f"dec_conv_{i}" if i > 0 else "out_conv"
            if cpu:
                y = _CpuConvT(out_ch, k, s, tuple(target), name=name)(h)
            else:
                y = nn.ConvTranspose(
                    out_ch,
                    (k, k),
                    strides=(s, s),
                    padding=((k - 1, k - 1 + extra[0]), (k - 1, k - 1 + extra[1])),
                    name=name,
                )(h)
            if i == 0:
                return y
            if self.use_skips:
                if cpu:
                    y = y + conv_cpu.nearest_resize(_CpuConv(out_ch, 1, name=f"dec_skip_{i}")(h), target)
                else:
                    z = nn.Conv(out_ch, (1, 1), name=f"dec_skip_{i}")(h)
                    y = y + _nearest_resize(z, target)
            h = nn.relu(y)
        raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class CNNSegmenterConfig:
    """Named hyper-parameters of a :class:`CNNSegmenter`.

    Attributes:
      channels, kernels, strides: per encoder layer (see :class:`CNNSegmenter`).
      num_classes: default number of output classes (11: background + 10 digits).
      use_skips: residual shortcuts.
      reference_params: parameter count reported by the study (1 input channel, 11 classes),
        or ``None``. Our models match it exactly; it does not depend on the input size.
    """

    channels: tuple[int, ...]
    kernels: tuple[int, ...]
    strides: tuple[int, ...]
    num_classes: int = 11
    use_skips: bool = True
    reference_params: int | None = None

    def __post_init__(self):
        _check_layers("CNNSegmenterConfig", self.channels, self.kernels, self.strides)

    def make(self, num_classes: int | None = None) -> CNNSegmenter:
        """The module; input ``[B, H, W, C]`` -> logits ``[B, H, W, num_classes]``."""
        return CNNSegmenter(
            channels=tuple(self.channels),
            kernels=tuple(self.kernels),
            strides=tuple(self.strides),
            num_classes=self.num_classes if num_classes is None else int(num_classes),
            use_skips=self.use_skips,
        )

    def min_input_size(self) -> int:
        """Smallest ``H`` and ``W`` the encoder accepts."""
        return min_input_size(self.kernels, self.strides)


# --------------------------------------------------------------------------- classifier


class CNNClassifier(nn.Module):
    """VALID conv stack + ReLU, then flatten or global average pool, dense layers -> logits.

    Input ``x``: ``[B, H, W, C]`` (channels last). Output: logits ``[B, num_classes]``.

    Layers: for each ``i``, ``relu(conv_i(h))`` with a VALID ``k_i x k_i`` convolution of stride
    ``s_i`` to ``channels[i]``; then ``global_pool`` ? mean over ``(H, W)`` -> ``[B, c_last]``
    : flatten in ``(H, W, C)`` order -> ``[B, H_n W_n c_last]``; then ``relu(dense)`` for each
    width in ``hidden``; then a dense layer to ``num_classes``.

    With ``global_pool=False`` the parameter count depends on the input size (through the
    flatten), and a model initialised at one size can only be applied at that size.

    Attributes:
      channels, kernels, strides: per conv layer.
      num_classes: number of logits.
      global_pool: average over space instead of flattening.
      hidden: widths of hidden dense layers (ReLU) before the output layer.
      conv_impl: ``"auto"`` (default), ``"lax"`` or ``"cpu"`` (see :func:`resolve_conv_impl`).

    ``__call__(x, tables=None)``: ``tables`` is ignored. Raises ``ValueError`` for inputs of
    rank != 4 or smaller than :func:`min_input_size`.
    """

    channels: Sequence[int]
    kernels: Sequence[int]
    strides: Sequence[int]
    num_classes: int = 10
    global_pool: bool = False
    hidden: Sequence[int] = ()
    conv_impl: str = "auto"

    def table_specs(self) -> dict:
        """Harmonic tables this model needs: none (``{}``)."""
        return {}

    @nn.compact
    def __call__(self, x: jax.Array, tables: Mapping[str, jax.Array] | None = None) -> jax.Array:
        ch, ks, ss = tuple(self.channels), tuple(self.kernels), tuple(self.strides)
        _check_layers("CNNClassifier", ch, ks, ss)
        _check_input(x, "CNNClassifier", ks, ss)
        cpu = resolve_conv_impl(self.conv_impl) == "cpu"
        h = x
        for i, (c, k, s) in enumerate(zip(ch, ks, ss)):
            if cpu:
                h = nn.relu(_CpuConv(c, k, s, name=f"conv_{i}")(h))
            else:
                h = nn.relu(_valid_conv(nn.Conv(c, (k, k), strides=(s, s), padding=((s, s), (s, s)), name=f"conv_{i}"), h, k, s))
        if self.global_pool:
            h = jnp.mean(h, axis=(1, 2))
        else:
            h = h.reshape(h.shape[0], -1)
        for j, w in enumerate(self.hidden):
            h = nn.relu(nn.Dense(int(w), name=f"hidden_{j}")(h))
        return nn.Dense(self.num_classes, name="out")(h)


@dataclasses.dataclass(frozen=True)
class CNNClassifierConfig:
    """Named hyper-parameters of a :class:`CNNClassifier`.

    Attributes:
      channels, kernels, strides, global_pool, hidden: see :class:`CNNClassifier`.
      num_classes: default number of classes (10).
      reference_params: parameter count at the reference input (1 channel, 60x60, 10
        classes) -- for the 2018 baseline the published 68,106; for our larger models our own
        count (they have global pooling, so it is the same at every input size).
    """

    channels: tuple[int, ...]
    kernels: tuple[int, ...]
    strides: tuple[int, ...]
    global_pool: bool = False
    hidden: tuple[int, ...] = ()
    num_classes: int = 10
    reference_params: int | None = None

    def __post_init__(self):
        _check_layers("CNNClassifierConfig", self.channels, self.kernels, self.strides)

    def make(self, num_classes: int | None = None) -> CNNClassifier:
        """The module; input ``[B, H, W, C]`` -> logits ``[B, num_classes]``."""
        return CNNClassifier(
            channels=tuple(self.channels),
            kernels=tuple(self.kernels),
            strides=tuple(self.strides),
            num_classes=self.num_classes if num_classes is None else int(num_classes),
            global_pool=self.global_pool,
            hidden=tuple(self.hidden),
        )

    def min_input_size(self) -> int:
        """Smallest ``H`` and ``W`` the conv stack accepts."""
        return min_input_size(self.kernels, self.strides)


# --------------------------------------------------------------------------- registry


SEGMENTERS: dict[str, CNNSegmenterConfig] = {
    "cnn_218k": CNNSegmenterConfig(
        channels=(13, 15, 22, 31, 141), kernels=(5, 3, 9, 7, 3), strides=(1, 1, 1, 1, 2),
        reference_params=218_144,
    ),
    "cnn_1m": CNNSegmenterConfig(
        channels=(12, 13, 16, 77, 96, 163), kernels=(3, 3, 5, 5, 3, 5), strides=(1, 1, 1, 2, 1, 1),
        reference_params=1_042_013,
    ),
    "cnn_5_5m": CNNSegmenterConfig(
        channels=(12, 15, 16, 85, 141, 191, 1100), kernels=(3, 5, 3, 7, 5, 3, 3),
        strides=(1, 1, 1, 2, 1, 1, 2), reference_params=5_519_335,
    ),
}
"""Segmentation CNNs of the study by name (1 input channel, 11 classes, any input size >= the
encoder's minimum). ``{name: CNNSegmenterConfig}``."""


def _width_family(w: int, params: int) -> CNNClassifierConfig:
    # Five VALID convs, channels (w, 2w, 2w, 4w, 4w), kernels 5,3,3,3,3, strides 2,1,2,1,1,
    # global average pool, dense -> 10: 270 w^2 + 78 w + 10 parameters (1 input channel).
    return CNNClassifierConfig(
        channels=(w, 2 * w, 2 * w, 4 * w, 4 * w), kernels=(5, 3, 3, 3, 3), strides=(2, 1, 2, 1, 1),
        global_pool=True, reference_params=params,
    )


CLASSIFIERS: dict[str, CNNClassifierConfig] = {
    # The 2018 S2CNN paper's planar baseline (60 -> 19 -> 5 per axis, flatten 5*5*64 -> 10).
    "cnn_cls_68k": CNNClassifierConfig(
        channels=(32, 64), kernels=(5, 5), strides=(3, 3), global_pool=False, reference_params=68_106,
    ),
    "cnn_cls_250k": _width_family(30, 245_350),
    "cnn_cls_500k": _width_family(43, 502_594),
    "cnn_cls_1m": _width_family(61, 1_009_438),
    "cnn_cls_4m": _width_family(122, 4_028_206),
}
"""Classification CNNs by name (1 input channel, 10 classes): the 68k planar baseline and a
family of wider global-pooling networks for the "larger network + more augmentation" curve.
Minimum input 17x17 (baseline) / 29x29 (family). ``{name: CNNClassifierConfig}``."""


def make_cnn(name: str, num_classes: int | None = None) -> nn.Module:
    """Build a planar CNN by name.

    Args:
      name: a key of :data:`SEGMENTERS` (-> :class:`CNNSegmenter`, ``[B, H, W, C]`` ->
        ``[B, H, W, num_classes]``) or of :data:`CLASSIFIERS` (-> :class:`CNNClassifier`,
        ``[B, H, W, C]`` -> ``[B, num_classes]``).
      num_classes: overrides the configuration's default (11 for segmenters, 10 for
        classifiers).

    Raises:
      ValueError: unknown name (the message lists the valid ones).
    """
    if name in SEGMENTERS:
        return SEGMENTERS[name].make(num_classes)
    if name in CLASSIFIERS:
        return CLASSIFIERS[name].make(num_classes)
    raise ValueError(
        f"unknown CNN {name!r}; segmenters: {sorted(SEGMENTERS)}, classifiers: {sorted(CLASSIFIERS)}"
    )


def count_params(params: Any) -> int:
    """Total number of scalars in a pytree of arrays.

    Accepts ``params`` or the whole ``variables`` dict, with real arrays or the
    ``jax.ShapeDtypeStruct`` leaves of ``jax.eval_shape(model.init, ...)``.
    """
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params)))
