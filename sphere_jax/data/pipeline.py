"""Training and evaluation streams of spherical digits, generated on device from a seed.

The raw digits live on the device once (``uint8 [n, 28, 28]``); every batch is a pure
function of ``(seed, step)``: which digits, which rotation copies and the rotations
themselves. A run therefore resumes at any step without saving data-loader state, and two
runs with the same seed see the same batches.

Augmentation as a number (``copies``):

* ``copies = A`` (1, 2, 4, ...): each training digit has ``A`` fixed random rotations; an
  epoch is a fresh random order of the ``n * A`` (digit, copy) pairs, cut to whole batches
  (the last ``(n * A) mod (batch * k)`` items of each order are skipped, a different set
  each epoch).
* ``copies = None``: a fresh Haar-random rotation every time a digit is drawn.
* ``rotate = False`` (NR): single digits stay canonical; ``copies`` is then irrelevant.

Scenes of ``digits_per_image = k`` digits take ``k`` consecutive items of the epoch's order and
are placed with a minimum angular separation between digit centres (``min_separation_deg``, see
:func:`sphere_jax.data.sphere.separated_rotations`), optionally with smaller digits
(``digit_scale``); their rotations are keyed by the scene (fresh: ``(step, scene)``; fixed
copies: the ``(digit, copy)`` of the scene's first item), so a scene's placement is reproducible.

Batches: ``(x float32 [B, 2L, 2L-1, 1], labels int32 [B, k], mask int32 [B, 2L, 2L-1])``.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sphere_jax import rotations
from sphere_jax.data import sphere


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """What a stream produces. ``copies=None`` means a fresh rotation at every draw."""

    L: int = 30
    batch_size: int = 32
    digits_per_image: int = 1
    rotate: bool = True
    copies: int | None = None
    threshold: float = sphere.DEFAULT_THRESHOLD
    min_separation_deg: float = 90.0  # scenes of several digits: smallest angle between centres
    digit_scale: float = 1.0  # digit size on the plane (1: the study's projection)

    def __post_init__(self):
        if self.batch_size < 1 or self.digits_per_image < 1:
            raise ValueError("batch_size and digits_per_image must be >= 1")
        if self.copies is not None and self.copies < 1:
            raise ValueError(f"copies must be >= 1 or None (fresh), got {self.copies}")
        if not 0 < self.digit_scale <= 4:
            raise ValueError(f"digit_scale must lie in (0, 4], got {self.digit_scale}")
        if self.digits_per_image > 1:
            sphere.separated_rotations(jax.random.key(0), self.digits_per_image, np.radians(self.min_separation_deg), 1)


def split_holdout(images: np.ndarray, labels: np.ndarray, holdout: int | float, seed: int):
    """Split a training set into (train, hold-out) by a seeded permutation.

    ``holdout`` is a count (an integer) or a fraction in ``[0, 1)`` (a float).
    Returns ``((images, labels), (images, labels))``.
    """
    n = len(images)
    if isinstance(holdout, (float, np.floating)):
        if not 0 <= holdout < 1:
            raise ValueError(f"a fractional hold-out must lie in [0, 1), got {holdout}")
        h = int(round(float(holdout) * n))
    else:
        h = int(holdout)
    if not 0 <= h < n:
        raise ValueError(f"hold-out size {h} must lie in [0, {n})")
    perm = np.random.default_rng(seed).permutation(n)
    tr, ho = perm[h:], perm[:h]
    return (images[tr], labels[tr]), (images[ho], labels[ho])


class DigitStream:
    """Deterministic, on-device stream of spherical batches.

    Args:
      images: ``uint8 [n, 28, 28]``; labels: ``int [n]``.
      config: :class:`StreamConfig`.
      seed: everything random (order, rotations) derives from it.
    """

    def __init__(self, images, labels, config: StreamConfig, seed: int):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [n, 28, 28], got {images.dtype} {images.shape}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels {labels.shape} do not match images {images.shape}")
        self.config = config
        self.n = len(images)
        k = config.digits_per_image
        copies = 1 if (config.copies is None or not config.rotate) else config.copies
        self.items_per_epoch = self.n * copies
        self.steps_per_epoch = self.items_per_epoch // (config.batch_size * k)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{self.n} digits x {copies} copies cannot fill one batch of {config.batch_size} x {k} digits"
            )
        self.data = (jnp.asarray(images), jnp.asarray(labels, jnp.int32))  # the digits, on device
        # [2] keys: the epochs' orders, the rotations
        self.keys = jax.random.split(jax.random.key(seed))
        self._copies = copies
        self._batch = jax.jit(self.batch_of)
        self._order = jax.jit(
            lambda epoch: jax.random.permutation(jax.random.fold_in(self.keys[0], epoch), self.items_per_epoch)
        )
        self._cached_order = (None, None)  # (epoch, device array): the shuffle is per epoch, not per step

    @property
    def _by_step(self) -> bool:
        """Rotations keyed by (step, position), not by (digit, copy): fresh rotations, or the
        placement of canonical scenes."""
        return self.config.copies is None or not self.config.rotate

    def member(self) -> dict:
        """What sets this stream apart from another of the same images' shape, batch, band-limit
        and rotation (``rotate``): ``{"keys": [2] keys, "steps_per_epoch": int32, "by_step": bool}``,
        arrays, so that :meth:`batch_of` of one stream gives any such stream's batch inside a
        ``vmap`` over streams of other seeds and augmentation levels."""
        return {"keys": self.keys, "steps_per_epoch": jnp.asarray(self.steps_per_epoch, jnp.int32),
                "by_step": jnp.asarray(self._by_step)}

    def _items(self, step, order, steps_per_epoch):
        cfg = self.config
        per_step = cfg.batch_size * cfg.digits_per_image
        within = step % steps_per_epoch
        items = jax.lax.dynamic_slice_in_dim(order, within * per_step, per_step)
        return items % self.n, items // self.n  # digit, copy

    def _rotations(self, step, order, member=None):
        """Rotations ``[B, k, 3, 3]`` of the batch of ``step`` (``member``: see :meth:`batch_of`)."""
        cfg = self.config
        m = member or {"keys": self.keys, "steps_per_epoch": self.steps_per_epoch, "by_step": self._by_step}
        rot_key = m["keys"][1]
        k = cfg.digits_per_image
        per_step = cfg.batch_size * k
        shape = (cfg.batch_size, k)
        digit, copy = self._items(step, order, m["steps_per_epoch"])
        by_step = lambda n: lambda: jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rot_key, step), i))(
            jnp.arange(n))
        by_item = lambda d, c: lambda: jax.vmap(lambda d, c: jax.random.fold_in(jax.random.fold_in(rot_key, d), c))(d, c)
        if k > 1:  # scenes: placement keyed by the scene
            first = lambda a: a.reshape(shape)[:, 0]
            keys = _choose(m["by_step"], by_step(cfg.batch_size), by_item(first(digit), first(copy)))
            sep = np.radians(cfg.min_separation_deg)
            return jax.vmap(lambda kk: sphere.separated_rotations(kk, k, sep))(keys)
        if cfg.rotate:  # fresh: keyed by (step, position); fixed copies: by (digit, copy)
            keys = _choose(m["by_step"], by_step(per_step), by_item(digit, copy))
            return jax.vmap(rotations.random_rotations)(keys).reshape(shape + (3, 3))
        return rotations.identity_rotations(shape)

    def batch_of(self, data, step, order, member=None):
        """Traceable form of :meth:`batch`, for a compiled loop over steps: ``data`` is
        :attr:`data` (``uint8 [n, 28, 28]``, ``int32 [n]``), ``step`` an int32 scalar and ``order``
        ``int32 [n * copies]`` the order of the step's epoch (:meth:`epoch_order`; a step of
        another epoch gets a wrong batch, silently). ``member``: ``None`` (this stream), or
        :meth:`member` of a stream of other seed and copies (same digit count, batch, band-limit
        and ``rotate``), which then gives that stream's batch from its own ``data`` and ``order``
        (an order may be longer than its stream's: the tail is never read). Returns ``(x float32
        [B, 2L, 2L-1, 1], labels int32 [B, k], mask int32 [B, 2L, 2L-1])``."""
        cfg = self.config
        shape = (cfg.batch_size, cfg.digits_per_image)
        digit, _ = self._items(step, order, self.steps_per_epoch if member is None else member["steps_per_epoch"])
        rots = self._rotations(step, order, member)
        imgs = data[0][digit].reshape(shape + (28, 28))
        labs = data[1][digit].reshape(shape)
        x, mask = sphere.spherical_batch(imgs, labs, rots, L=cfg.L, threshold=cfg.threshold,
                                         digit_scale=cfg.digit_scale)
        return x, labs, mask

    def epoch_order(self, step: int) -> jax.Array:
        """``int32 [n * copies]``: the shuffled (digit, copy) items of the epoch of ``step``."""
        epoch = int(step) // self.steps_per_epoch
        if self._cached_order[0] != epoch:
            self._cached_order = (epoch, self._order(jnp.asarray(epoch, jnp.int32)))
        return self._cached_order[1]

    def digits(self, step: int) -> jax.Array:
        """``int32 [B, k]``: which of the stream's digits (indices into :attr:`data`) the batch of
        ``step`` shows, in the order of its labels (``k = digits_per_image``)."""
        cfg = self.config
        digit, _ = self._items(step, self.epoch_order(step), self.steps_per_epoch)
        return digit.reshape(cfg.batch_size, cfg.digits_per_image)

    def rotations(self, step: int) -> jax.Array:
        """The rotations ``[B, k, 3, 3]`` of the batch of ``step`` (digit centres: see
        :func:`sphere_jax.data.sphere.digit_centre`)."""
        return jax.jit(self._rotations)(jnp.asarray(step, jnp.int32), self.epoch_order(step))

    def batch(self, step: int):
        """The batch of global step ``step`` (any order, any number of times, same result)."""
        return self._batch(self.data, jnp.asarray(step, jnp.int32), self.epoch_order(step))

    def epoch_of(self, step: int) -> int:
        return int(step) // self.steps_per_epoch


def _choose(flag, if_true, if_false):
    """``if_true()`` or ``if_false()`` (arrays of PRNG keys): by Python where ``flag`` is a
    bool, else both, selected by the traced ``flag`` (streams of several kinds in one ``vmap``)."""
    if isinstance(flag, (bool, np.bool_)):
        return if_true() if flag else if_false()
    a, b = if_true(), if_false()
    data = jnp.where(flag, jax.random.key_data(a), jax.random.key_data(b))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _scene_rotations(key, scene_ids, k, min_separation):
    """Rotations ``[len(scene_ids), k, 3, 3]`` keyed by ``(key, scene id)``; several digits are
    placed at least ``min_separation`` radians apart."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(scene_ids)
    if k == 1:
        return jax.vmap(lambda kk: rotations.random_rotations(kk, k))(keys)
    return jax.vmap(lambda kk: sphere.separated_rotations(kk, k, min_separation))(keys)


def eval_batches(images, labels, config: StreamConfig, seed: int):
    """A fixed evaluation set: scene ``i`` uses digits ``i*k .. i*k+k-1`` and rotations keyed by
    ``(seed, i)``; identical on every call. Yields batches like :class:`DigitStream`; the last
    batch may be smaller. ``config.copies`` is ignored."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    k = config.digits_per_image
    n_scenes = len(images) // k
    rot_key = jax.random.key(seed)
    for start in range(0, n_scenes, config.batch_size):
        stop = min(start + config.batch_size, n_scenes)
        idx = np.arange(start * k, stop * k)
        imgs = jnp.asarray(images[idx].reshape(stop - start, k, 28, 28))
        labs = jnp.asarray(labels[idx].reshape(stop - start, k), jnp.int32)
        if config.rotate or k > 1:
            rots = _scene_rotations(rot_key, jnp.arange(start, stop), k, float(np.radians(config.min_separation_deg)))
        else:
            rots = rotations.identity_rotations((stop - start, k))
        x, mask = sphere.spherical_batch(imgs, labs, rots, L=config.L, threshold=config.threshold,
                                         digit_scale=config.digit_scale)
        yield x, labs, mask


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digit-like test patterns without any dataset: ``uint8 [n, 28, 28]``, labels ``int32 [n]``.

    Class ``c`` is ``c % 5 + 1`` blobs on a circle at random angles, inside a ring when
    ``c >= 5``. Blob count and ring are rotation-invariant features, so the classes are
    learnable by invariant (S2CNN) and non-invariant (CNN) models alike, offline.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    yy, xx = np.mgrid[0:28, 0:28] - 13.5
    r = np.hypot(yy, xx)
    out = np.zeros((n, 28, 28), np.float32)
    for i, c in enumerate(labels):
        img = np.clip(1.5 - np.abs(r - 11.0), 0, 1) if c >= 5 else np.zeros((28, 28))
        k = c % 5 + 1
        start = rng.uniform(0, 2 * np.pi)
        for j in range(k):
            a = start + 2 * np.pi * j / k + rng.normal(0, 0.1)
            cy, cx = 6.5 * np.sin(a), 6.5 * np.cos(a)
            img = np.maximum(img, np.clip(3.2 - np.hypot(yy - cy, xx - cx), 0, 1))
        out[i] = img
    return (out * 255).round().astype(np.uint8), labels
