"""Compiled training loops: several steps per call against one step per call."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sphere_jax import train


class _BatchNormNet(nn.Module):
    """Dense -> BatchNorm -> ReLU -> Dense: a model with a ``batch_stats`` state."""

    @nn.compact
    def __call__(self, x, tables, train: bool = False):
        x = nn.Dense(16)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(10)(nn.relu(x))


def _fresh_state(params, model_state, learning_rate):
    """A train state on copies: the steps donate (delete) their input state."""
    copy = lambda t: jax.tree_util.tree_map(jnp.array, t)
    return train.TrainState.create(copy(params), optax.adam(learning_rate), copy(model_state))


def _flat(tree):
    return np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(tree)])


def _batch_of(data, step, order):
    """A stream-like pure batch function: rows ``order[8 * step : 8 * step + 8]`` of the data."""
    idx = jax.lax.dynamic_slice_in_dim(order, step * 8, 8)
    labels = data[1][idx]
    return data[0][idx], labels[:, None], jnp.zeros((8, 1, 1), jnp.int32)


def test_chunk_of_steps_follows_single_steps_with_model_state():
    model = _BatchNormNet()
    rng = np.random.default_rng(0)
    data = (jnp.asarray(rng.normal(size=(64, 6, 5, 1)).astype(np.float32) * 3 + 1),
            jnp.asarray(rng.integers(0, 10, 64).astype(np.int32)))
    order = jnp.asarray(rng.permutation(64).astype(np.int32))
    params, model_state = train.split_variables(model.init(jax.random.key(0), data[0][:8], None, train=False))
    assert "batch_stats" in model_state

    fresh = lambda: _fresh_state(params, model_state, 1e-2)

    step = train.make_train_step(model, "classify")
    a, losses_a = fresh(), []
    for s in range(6):
        x, labels, mask = _batch_of(data, s, order)
        a, loss = step(a, None, x, train.targets((x, labels, mask), "classify"))
        losses_a.append(float(loss))

    chunk = train.make_train_chunk(model, "classify", _batch_of)
    b, losses_b = fresh(), []
    for s0 in (0, 3):  # two calls of 3 steps
        b, losses = chunk(b, None, data, order, jnp.arange(s0, s0 + 3, dtype=jnp.int32))
        assert losses.shape == (3,)
        losses_b += [float(v) for v in losses]
    assert int(b.step) == 6
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5)
    np.testing.assert_allclose(_flat(b.params), _flat(a.params), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_flat(b.model_state), _flat(a.model_state), rtol=1e-5, atol=1e-6)
    # the statistics moved: the chunk carries the model state from step to step
    assert not np.allclose(_flat(b.model_state), _flat(model_state))


def test_chunk_makes_the_stream_batches_of_its_steps():
    """The chunk with the real pipeline (DigitStream.batch_of: fixed rotated copies) trains like
    single steps on stream.batch(step), a classifier from the registry."""
    from sphere_jax import harmonics as hm
    from sphere_jax.data import pipeline
    from sphere_jax.models import registry

    model, task = registry.make_model("cnn_cls_68k", L_in=15)
    tables = hm.build_tables(model.table_specs())
    images, labels = pipeline.synthetic_digits(96, seed=1)
    stream = pipeline.DigitStream(images, labels, pipeline.StreamConfig(L=15, batch_size=8, copies=2), seed=3)
    params, model_state = train.split_variables(
        jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 30, 29, 1)), tables))

    fresh = lambda: _fresh_state(params, model_state, 1e-3)

    step = train.make_train_step(model, task)
    a, losses_a = fresh(), []
    for s in range(4, 8):
        batch = stream.batch(s)
        a, loss = step(a, tables, batch[0], train.targets(batch, task))
        losses_a.append(float(loss))
    chunk = train.make_train_chunk(model, task, stream.batch_of)
    b, losses_b = chunk(fresh(), tables, stream.data, stream.epoch_order(4), jnp.arange(4, 8, dtype=jnp.int32))
    np.testing.assert_allclose(np.asarray(losses_b), losses_a, rtol=1e-5)
    np.testing.assert_allclose(_flat(b.params), _flat(a.params), rtol=1e-4, atol=1e-6)
