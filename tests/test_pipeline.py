"""Digit streams: determinism in (seed, step), augmentation by copies, NR, evaluation sets, splits.

Streams are built on a handful of synthetic digits with distinct labels, so that every item of
a batch can be traced back to its digit by its label, and every rotation copy by its image.
"""
import matplotlib.image
import jax.numpy as jnp
import numpy as np
import pytest

from sphere_jax import rotations
from sphere_jax.data import pipeline, sphere
from sphere_jax.data.pipeline import DigitStream, StreamConfig

L = 6  # tiny grid (12 x 11): the stream logic does not depend on L


@pytest.fixture(scope="module")
def tiny():
    """8 distinct digit images, label i for digit i (labels identify digits)."""
    images = pipeline.synthetic_digits(8, seed=0)[0]
    return images, np.arange(8, dtype=np.int32)


FRESH = StreamConfig(L=L, batch_size=4, copies=None)
MULTI = StreamConfig(L=L, batch_size=4, digits_per_image=2, copies=2)


@pytest.fixture(scope="module")
def streams(tiny):
    """Streams shared by several tests (each instance compiles its own batch function, ~1.5 s):
    two independent instances with the same seed, and one with another seed."""
    return {
        "fresh": (DigitStream(*tiny, FRESH, seed=1), DigitStream(*tiny, FRESH, seed=1), DigitStream(*tiny, FRESH, seed=2)),
        "multi": (DigitStream(*tiny, MULTI, seed=3), DigitStream(*tiny, MULTI, seed=3)),
    }


def epoch_items(stream, steps):
    """{label: [image bytes, ...]} over the given steps of a single-digit stream."""
    seen = {}
    for s in steps:
        x, labels, _ = stream.batch(s)
        x, labels = np.asarray(x), np.asarray(labels)
        for i in range(len(labels)):
            seen.setdefault(int(labels[i, 0]), []).append(x[i].tobytes())
    return seen


def same(a, b):
    return all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(a, b))


# ------------------------------------------------------------------ determinism


def test_same_seed_same_batches_other_seed_other_rotations(streams):
    a, b, c = streams["fresh"]
    for step in (0, 5):
        assert same(a.batch(step), b.batch(step))  # bitwise
        x, labels, mask = a.batch(step)
        assert x.shape == (4, 2 * L, 2 * L - 1, 1) and x.dtype == jnp.float32
        assert labels.shape == (4, 1) and labels.dtype == jnp.int32
        assert mask.shape == (4, 2 * L, 2 * L - 1) and mask.dtype == jnp.int32
    # another seed: for every digit the image differs (another rotation), over a whole epoch
    ia, ic = epoch_items(a, range(2)), epoch_items(c, range(2))
    assert sorted(ia) == sorted(ic) == list(range(8))
    assert all(ia[d][0] != ic[d][0] for d in range(8))


def test_batch_is_order_independent(streams):
    a, b = streams["multi"]
    a3, a7 = a.batch(3), a.batch(7)
    b7, b3 = b.batch(7), b.batch(3)
    assert same(a3, b3) and same(a7, b7) and same(a.batch(3), a3)
    assert not same(a3, a7)
    assert a.steps_per_epoch == 8 * 2 // (4 * 2) and a.epoch_of(7) == 3


# ------------------------------------------------------------------ augmentation


@pytest.mark.parametrize("digits", [1, 2])
def test_one_streams_batch_of_makes_other_streams_batches_in_a_vmap(tiny, digits):
    """Runs trained together (runner.fit_members) make every run's batch with the first run's
    ``batch_of`` in one vmap, given each run's data, order (padded to the longest) and
    ``member()``: seeds, fixed copies and fresh rotations mixed, single digits and scenes."""
    import jax

    kinds = [(1, 1), (2, 4), (3, None)]  # (seed, copies)
    streams = [DigitStream(*tiny, StreamConfig(L=L, batch_size=4, digits_per_image=digits, copies=c), seed=s)
               for s, c in kinds]
    assert len({st.steps_per_epoch for st in streams}) == 2  # 4 copies: a longer epoch
    longest = max(st.items_per_epoch for st in streams)
    data = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[st.data for st in streams])
    members = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[st.member() for st in streams])
    together = jax.jit(jax.vmap(streams[0].batch_of, in_axes=(0, None, 0, 0)))
    for step in (0, 1, 2, 5):  # later epochs of the short streams, and of the 4-copy one for scenes
        orders = jnp.stack([jnp.pad(st.epoch_order(step), (0, longest - st.items_per_epoch)) for st in streams])
        x, labels, mask = together(data, jnp.int32(step), orders, members)
        for i, st in enumerate(streams):
            ex, el, em = st.batch(step)
            np.testing.assert_array_equal(labels[i], el)
            np.testing.assert_allclose(x[i], ex, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(ex))))
            assert float(jnp.mean(mask[i] != em)) < 1e-3
    # and the streams differ from each other (else the check above proves nothing)
    assert not np.allclose(np.asarray(streams[0].batch(5)[0]), np.asarray(streams[2].batch(5)[0]))


def test_fixed_copies_give_exactly_A_rotations_per_digit(tiny):
    """copies = A: an epoch visits each digit exactly A times, under A distinct rotations, and
    the next epoch reuses exactly these A rotations (in another order)."""
    copies = 3
    s = DigitStream(*tiny, StreamConfig(L=L, batch_size=4, copies=copies), seed=4)
    spe = s.steps_per_epoch
    assert s.items_per_epoch == 8 * copies and spe == 2 * copies
    e0, e1 = epoch_items(s, range(spe)), epoch_items(s, range(spe, 2 * spe))
    for d in range(8):
        assert len(e0[d]) == copies and len(set(e0[d])) == copies
        assert set(e1[d]) == set(e0[d])
    orders = [np.asarray(s.batch(t)[1])[:, 0] for t in range(2 * spe)]
    assert not np.array_equal(np.concatenate(orders[:spe]), np.concatenate(orders[spe:]))


def test_fixed_copies_count_digits_in_multi_digit_scenes(streams):
    s = streams["multi"][0]  # 8 digits x 2 copies, scenes of 2, batches of 4 scenes
    assert s.steps_per_epoch == 2
    for epoch in range(2):
        labels = np.concatenate([np.asarray(s.batch(t)[1]).ravel() for t in (2 * epoch, 2 * epoch + 1)])
        assert np.array_equal(np.bincount(labels, minlength=8), np.full(8, 2))


def test_fresh_rotations_every_draw(streams):
    """copies = None: a digit is seen once per epoch, each time under a new rotation."""
    s = streams["fresh"][0]
    assert s.steps_per_epoch == 2
    seen = epoch_items(s, range(3 * s.steps_per_epoch))
    for d in range(8):
        assert len(seen[d]) == 3 and len(set(seen[d])) == 3


def test_NR_single_digit_batches_are_the_canonical_projection(tiny):
    images, labels = tiny
    s = DigitStream(images, labels, StreamConfig(L=L, batch_size=4, rotate=False, copies=3), seed=7)
    assert s.steps_per_epoch == 2  # copies are irrelevant without rotations
    canon_x, canon_mask = (np.asarray(a) for a in sphere.spherical_batch(
        jnp.asarray(images[:, None]), jnp.asarray(labels[:, None]), rotations.identity_rotations((8, 1)), L=L))
    for step in range(4):
        x, lab, mask = (np.asarray(a) for a in s.batch(step))
        d = lab[:, 0]
        # the stream's batch and one batch of all 8 digits are different programs: equal up to float
        # rounding (and so masks up to pixels right at the threshold)
        np.testing.assert_allclose(x, canon_x[d], rtol=0, atol=1e-6)
        assert (mask != canon_mask[d]).mean() <= 1e-3
    # same digit, same image in every epoch
    e0, e1 = epoch_items(s, range(2)), epoch_items(s, range(2, 4))
    assert e0 == e1


# ------------------------------------------------------------------ evaluation sets


def test_eval_batches_are_fixed_and_complete():
    images = pipeline.synthetic_digits(10, seed=1)[0]
    labels = np.arange(10, dtype=np.int32)
    cfg = StreamConfig(L=L, batch_size=4, copies=5)
    first, second = list(pipeline.eval_batches(images, labels, cfg, seed=0)), list(pipeline.eval_batches(images, labels, cfg, seed=0))
    assert [len(b[1]) for b in first] == [4, 4, 2]  # ceil(10 / 4) batches, the last one smaller
    assert all(same(a, b) for a, b in zip(first, second))
    assert np.array_equal(np.concatenate([np.asarray(b[1]) for b in first])[:, 0], labels)  # in order
    # rotations are keyed by the scene index, not by the batching
    other = list(pipeline.eval_batches(images, labels, StreamConfig(L=L, batch_size=5), seed=0))
    assert len(other) == 2
    xa = np.concatenate([np.asarray(b[0]) for b in first])
    xb = np.concatenate([np.asarray(b[0]) for b in other])
    # batches of 4 and of 5 are different XLA programs: equal up to float rounding, not bitwise
    np.testing.assert_allclose(xa, xb, rtol=0, atol=1e-6)
    xc = np.concatenate([np.asarray(b[0]) for b in pipeline.eval_batches(images, labels, cfg, seed=1)])
    assert not np.allclose(xa, xc)
    # k = 2: scene i holds digits 2i and 2i + 1; a leftover digit is dropped
    cfg2 = StreamConfig(L=L, batch_size=2, digits_per_image=2)
    two = list(pipeline.eval_batches(images[:9], labels[:9], cfg2, seed=0))
    assert [b[1].shape for b in two] == [(2, 2), (2, 2)]
    assert np.array_equal(np.concatenate([np.asarray(b[1]) for b in two]), labels[:8].reshape(4, 2))
    # NR single digits: the canonical projections
    nr = list(pipeline.eval_batches(images[:4], labels[:4], StreamConfig(L=L, batch_size=4, rotate=False), seed=0))
    P = sphere.projection_points(L)
    for i in range(4):
        canon = np.asarray(sphere.project_digit(jnp.asarray(images[i]), jnp.eye(3), P))
        assert np.abs(np.asarray(nr[0][0])[i, ..., 0] - canon).max() < 1e-5  # eager canon: not bitwise


# ------------------------------------------------------------------ hold-out split


def test_split_holdout():
    images = np.arange(20 * 28 * 28, dtype=np.uint32).reshape(20, 28, 28).astype(np.uint8)
    images[:, 0, 0] = np.arange(20)  # identifies each example
    labels = np.arange(20, dtype=np.int32)
    for holdout, h in ((5, 5), (0.25, 5), (0, 0), (0.1, 2)):
        (ti, tl), (hi, hl) = pipeline.split_holdout(images, labels, holdout, seed=0)
        assert len(ti) == len(tl) == 20 - h and len(hi) == len(hl) == h
        assert set(tl).isdisjoint(hl) and set(tl) | set(hl) == set(range(20))
        assert np.array_equal(ti[:, 0, 0], tl) and np.array_equal(hi[:, 0, 0], hl)  # pairs kept together
    a = pipeline.split_holdout(images, labels, 5, seed=0)[1][1]
    assert np.array_equal(a, pipeline.split_holdout(images, labels, 5, seed=0)[1][1])
    assert not np.array_equal(np.sort(a), np.sort(pipeline.split_holdout(images, labels, 5, seed=1)[1][1]))
    for bad in (20, 25, -1):
        with pytest.raises(ValueError):
            pipeline.split_holdout(images, labels, bad, seed=0)


# ------------------------------------------------------------------ bad input


def test_bad_input_is_rejected(tiny):
    images, labels = tiny
    cfg = StreamConfig(L=L, batch_size=4)
    with pytest.raises(ValueError, match="uint8"):
        DigitStream(images.astype(np.float32), labels, cfg, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        DigitStream(images[:, :, :27], labels, cfg, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        DigitStream(images[..., None], labels, cfg, seed=0)
    with pytest.raises(ValueError, match="labels"):
        DigitStream(images, labels[:5], cfg, seed=0)
    for kwargs in ({"copies": 0}, {"copies": -2}, {"batch_size": 0}, {"digits_per_image": 0}):
        with pytest.raises(ValueError):
            StreamConfig(**kwargs)
    # too few digits (x copies) for one batch of batch_size x digits_per_image
    with pytest.raises(ValueError, match="cannot fill"):
        DigitStream(images[:3], labels[:3], cfg, seed=0)
    with pytest.raises(ValueError, match="cannot fill"):
        DigitStream(images, labels, StreamConfig(L=L, batch_size=3, digits_per_image=3), seed=0)
    with pytest.raises(ValueError, match="cannot fill"):  # copies are ignored without rotation
        DigitStream(images[:3], labels[:3], StreamConfig(L=L, batch_size=4, rotate=False, copies=2), seed=0)
    DigitStream(images[:3], labels[:3], StreamConfig(L=L, batch_size=4, copies=2), seed=0)  # 6 items fill it
    with pytest.raises(ValueError):
        sphere.spherical_batch(jnp.zeros((2, 28, 28), jnp.uint8), jnp.zeros((2,), jnp.int32),
                               rotations.identity_rotations(2), L=L)
    with pytest.raises(ValueError):
        sphere.spherical_batch(jnp.zeros((2, 1, 28, 28), jnp.uint8), jnp.zeros((2, 2), jnp.int32),
                               rotations.identity_rotations((2, 1)), L=L)


# ------------------------------------------------------------------ plots of batches


def test_plot_samples_writes_a_png_and_the_globe_is_not_mirrored(tmp_path, streams):
    from sphere_jax import plotting

    x, lab, mask = (np.asarray(a)[:2] for a in streams["multi"][0].batch(0))
    path = tmp_path / "samples.png"
    assert plotting.plot_samples(x, mask, path, labels=lab, globe_size=64) == path
    png = matplotlib.image.imread(path)
    assert png.ndim == 3 and png.shape[0] > 200 and png.shape[1] > 600
    # without the channel axis, the same picture
    path2 = tmp_path / "samples2.png"
    plotting.plot_samples(x[..., 0], mask, path2, globe_size=64)
    assert matplotlib.image.imread(path2).shape == png.shape
    with pytest.raises(ValueError):
        plotting.plot_samples(x, mask[:, :-1], path2)
    # an asymmetric canonical digit, seen on the globe from the south pole, reads as on the plane
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 9:13] = 255  # vertical bar, left of centre
    img[6:10, 9:20] = 255  # top bar: a mirrored "L" / a "Gamma"
    f = np.asarray(sphere.project_digit(jnp.asarray(img), jnp.eye(3), sphere.projection_points(40)))
    size = 56
    globe = plotting.render_globe(f, view=(0.0, 0.0, -1.0), size=size)
    assert globe.shape == (size, size)
    # the globe's central square (plane coordinates in [-1, 1] ~ image pixels 5..23) vs the image
    c = np.nan_to_num(globe)
    quad = lambda a: np.array([a[: a.shape[0] // 2, : a.shape[1] // 2].mean(), a[: a.shape[0] // 2, a.shape[1] // 2:].mean(),
                               a[a.shape[0] // 2:, : a.shape[1] // 2].mean(), a[a.shape[0] // 2:, a.shape[1] // 2:].mean()])
    q_img, q_globe = quad(img / 255.0), quad(c)
    assert np.argmax(q_globe) == np.argmax(q_img) == 0  # top-left quadrant brightest in both
    assert np.corrcoef(q_img, q_globe)[0, 1] > 0.9


def test_digits_name_the_batch_digits_and_show_data_draws_scenes(tiny, streams, tmp_path):
    """``DigitStream.digits(step)`` names the digits of a batch, in its labels' order (labels
    identify digits here), across an epoch boundary; ``experiments.show_data`` uses it for the
    overlap line of ``make demo``'s first command (scenes of 3 digits)."""
    import os
    import re
    import subprocess
    import sys

    s = streams["multi"][0]
    for step in (0, s.steps_per_epoch - 1, s.steps_per_epoch):
        d = np.asarray(s.digits(step))
        assert d.shape == (4, 2) and d.dtype == np.int32
        np.testing.assert_array_equal(np.asarray(tiny[1])[d], np.asarray(s.batch(step)[1]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "scenes.png"
    r = subprocess.run([sys.executable, "-m", "experiments.show_data", "--source=synthetic", "--digits_per_image=3",
                        "--L=8", "--num=2", f"--out={out}"], capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"([\d.]+) % of digit pixels hidden .* closest centres ([\d.]+) degrees apart", r.stdout)
    assert m, r.stdout
    assert 0 <= float(m.group(1)) <= 100 and float(m.group(2)) >= 90.0 - 1e-3  # the default separation
    assert matplotlib.image.imread(str(out)).ndim == 3
