"""A training run in a workdir: config, data, data-parallel training, orbax checkpoints,
early stopping on a hold-out split, evaluation, JSON-lines metrics.

Workdir layout::

    WORKDIR/config.json        the run's configuration (a different one is refused)
    WORKDIR/checkpoints/<step> latest checkpoints (params, opt_state, step), for resuming
    WORKDIR/best/<step>        the checkpoint with the best hold-out score
    WORKDIR/metrics.jsonl      one JSON object per evaluation (train loss, hold-out, test)
    WORKDIR/summary.md         the latest test evaluation, for humans
    WORKDIR/predictions_R.png  predictions beside targets on rotated (R) / canonical (NR) test digits

Batches are a pure function of ``(seed, step)`` (see :mod:`sphere_jax.data.pipeline`), so a
killed run restarted with the same command resumes from its last checkpoint and ends with the
same parameters as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from sphere_jax import harmonics, metrics, train
from sphere_jax.data import pipeline, sphere
from sphere_jax.models import registry

SOURCES = ("tfds", "synthetic", "npz")


class RunError(RuntimeError):
    """A run cannot proceed; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (and its workdir)."""

    model: str = "s2cnn_204k"
    dataset: str = "mnist"  # mnist | fashion_mnist
    source: str = "tfds"  # tfds | synthetic
    L: int = 12
    digits_per_image: int = 1
    train_rotate: bool = False
    test_rotate: bool = True
    copies: int | None = 1  # rotated copies per digit (None: fresh rotation every draw)
    n_train: int = 2000  # training digits (0: all)
    n_holdout: int = 200
    n_test: int = 500  # test digits (0: all)
    batch_size: int = 16
    learning_rate: float = 1e-3
    steps: int = 300
    eval_every: int = 100
    checkpoint_every: int = 100
    patience: int = 0  # evaluations without hold-out improvement before stopping (0: never)
    seed: int = 0
    digits_dir: str | None = None
    data_dir: str | None = None
    digits_npz: str | None = None  # source="npz": train_images/train_labels/test_images/test_labels

    def validate(self) -> None:
        names = registry.model_names()
        if self.model not in names:
            raise RunError(f"unknown model {self.model!r}; choose one of {names}")
        if self.dataset not in ("mnist", "fashion_mnist"):
            raise RunError(f"unknown dataset {self.dataset!r}; choose mnist or fashion_mnist")
        if self.source not in SOURCES:
            raise RunError(f"unknown source {self.source!r}; choose one of {SOURCES}")
        for field in ("L", "batch_size", "steps", "eval_every", "checkpoint_every", "digits_per_image"):
            if getattr(self, field) < 1:
                raise RunError(f"--{field} must be >= 1, got {getattr(self, field)}")
        if self.copies is not None and self.copies < 1:
            raise RunError("--copies must be >= 1 (or 'fresh')")
        if self.source == "npz" and not (self.digits_npz and os.path.exists(self.digits_npz)):
            raise RunError(f"--source=npz needs --digits_npz=FILE (an existing .npz), got {self.digits_npz!r}")


def _npz(cfg: RunConfig, split: str):
    """Digits of a split from a user's ``.npz`` (``{split}_images uint8 [n, 28, 28]``, ``{split}_labels``)."""
    with np.load(cfg.digits_npz) as z:
        try:
            return np.asarray(z[f"{split}_images"], np.uint8), np.asarray(z[f"{split}_labels"], np.int32)
        except KeyError:
            raise RunError(f"{cfg.digits_npz} lacks {split}_images / {split}_labels (has {sorted(z.files)})") from None


def _load_test(cfg: RunConfig):
    """Only the test digits ``(uint8 [n, 28, 28], int32 [n])`` of a run."""
    if cfg.source == "npz":
        tei, tel = _npz(cfg, "test")
    elif cfg.source == "synthetic":
        tei, tel = pipeline.synthetic_digits(max(cfg.n_test, 1), seed=cfg.seed + 10_000)
    else:
        from sphere_jax.data import digits

        try:
            tei, tel = digits.load_digits(cfg.dataset, "test", data_dir=cfg.data_dir, digits_dir=cfg.digits_dir)
        except digits.DigitsSourceError as e:
            raise RunError(str(e)) from None
    if cfg.n_test:
        tei, tel = tei[: cfg.n_test], tel[: cfg.n_test]
    return tei, tel


def _load(cfg: RunConfig):
    """``(train, hold-out, test)`` digits of a run, each ``(uint8 [n, 28, 28], int32 [n])``."""
    if cfg.source == "npz":
        tr = _npz(cfg, "train")
    elif cfg.source == "synthetic":
        tr = pipeline.synthetic_digits(max(cfg.n_train, 1) + cfg.n_holdout, seed=cfg.seed)
    else:
        from sphere_jax.data import digits

        try:
            tr = digits.load_digits(cfg.dataset, "train", data_dir=cfg.data_dir, digits_dir=cfg.digits_dir)
        except digits.DigitsSourceError as e:
            raise RunError(str(e)) from None
    (tri, trl), (hoi, hol) = pipeline.split_holdout(tr[0], tr[1], cfg.n_holdout, seed=cfg.seed)
    if cfg.n_train:
        tri, trl = tri[: cfg.n_train], trl[: cfg.n_train]
    return (tri, trl), (hoi, hol), _load_test(cfg)


def _model(cfg: RunConfig):
    try:
        model, task = registry.make_model(cfg.model, L_in=cfg.L)
    except ValueError as e:
        raise RunError(str(e)) from None
    return model, task


def _check_workdir(workdir: str, cfg: RunConfig) -> None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    mine = dataclasses.asdict(cfg)
    if os.path.exists(path):
        with open(path) as f:
            try:
                theirs = json.load(f)
            except json.JSONDecodeError:
                raise RunError(f"{path} is not valid JSON; use a new --workdir") from None
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise RunError(
                f"workdir {workdir} holds a run of another configuration ({detail}); "
                f"use a new --workdir or the same flags to resume"
            )
    elif _is_writer():
        with open(path, "w") as f:
            json.dump(mine, f, indent=1, sort_keys=True)


def load_config(workdir: str) -> RunConfig:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise RunError(f"no run in {workdir} (config.json missing)")
    with open(path) as f:
        return RunConfig(**json.load(f))


def _managers(workdir: str):
    opts = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    latest = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=opts)
    best = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "best")), options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    )
    return latest, best


def _restore(manager, step, abstract, what):
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for corrupt / mismatched trees
        raise RunError(
            f"cannot restore {what} checkpoint {step} in {manager.directory}: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}; it is corrupt or from another model: move it away or use a new --workdir"
        ) from None


def _is_writer() -> bool:
    """Only process 0 writes files of a multi-host run (orbax coordinates checkpoints itself)."""
    return jax.process_index() == 0


def _append_jsonl(workdir, record):
    if not _is_writer():
        return
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def evaluate_params(predict, task, params, tables, images, labels, stream_cfg, seed) -> dict:
    """Metrics of ``params`` on a fixed (rotated or not) set of digits.

    ``predict`` is ``train.make_predict(model)``, made once per run so it compiles once.

    classify: ``accuracy``; segment: pixel accuracy, per-class IoU, mIoU (11 and 10 classes)
    and their area-weighted variants.
    """
    if task == "classify":
        correct = total = 0
        for x, labs, _ in pipeline.eval_batches(images, labels, stream_cfg, seed):
            pred = np.asarray(metrics.logits_to_pred(predict(params, tables, x)))
            correct += int((pred == np.asarray(labs[:, 0])).sum())
            total += len(pred)
        return {"accuracy": correct / max(total, 1), "n": total}
    acc = metrics.ConfusionAccumulator(sphere.NUM_CLASSES_SEG, weights=metrics.area_weights(stream_cfg.L))
    n = 0
    for x, _, mask in pipeline.eval_batches(images, labels, stream_cfg, seed):
        acc.update(metrics.logits_to_pred(predict(params, tables, x)), mask)
        n += x.shape[0]
    out = acc.result()
    out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in out.items()}
    out["n"] = n
    return out


def _score(task, m):
    return m["accuracy"] if task == "classify" else m["miou"]


def fit(cfg: RunConfig, workdir: str, progress: bool = True, _kill_at_step: int | None = None) -> dict:
    """Train (or resume) the run in ``workdir``; returns the final test metrics.

    ``_kill_at_step`` (tests only) SIGKILLs the process right after that step's checkpoint.
    """
    cfg.validate()
    workdir = os.path.abspath(workdir)
    model, task = _model(cfg)
    mesh = train.make_mesh()
    n_dev = mesh.devices.size
    if cfg.batch_size % n_dev:
        raise RunError(f"--batch_size={cfg.batch_size} is not divisible by the {n_dev} devices; use a multiple of {n_dev}")
    (tri, trl), (hoi, hol), (tei, tel) = _load(cfg)

    stream_cfg = pipeline.StreamConfig(
        L=cfg.L, batch_size=cfg.batch_size, digits_per_image=cfg.digits_per_image,
        rotate=cfg.train_rotate, copies=cfg.copies,
    )
    try:
        stream = pipeline.DigitStream(tri, trl, stream_cfg, seed=cfg.seed)
    except ValueError as e:
        raise RunError(str(e)) from None
    hold_cfg = dataclasses.replace(stream_cfg, rotate=cfg.train_rotate)

    tables = train.replicate(mesh, harmonics.build_tables(model.table_specs()))
    key = jax.random.key(cfg.seed)
    x0 = jnp.zeros((1, 2 * cfg.L, 2 * cfg.L - 1, 1))
    try:
        params = jax.jit(model.init)(key, x0, tables)["params"]
    except ValueError as e:  # e.g. an input too small for a CNN's valid convolutions
        raise RunError(f"{cfg.model} cannot take band-limit L={cfg.L}: {str(e).splitlines()[0]}") from None
    tx = optax.adam(cfg.learning_rate)
    state = train.TrainState.create(params, tx)
    _check_workdir(workdir, cfg)  # only now: a run that cannot start leaves no workdir behind
    latest, best = _managers(workdir)
    ckpt = lambda s: {"step": s.step, "params": s.params, "opt_state": s.opt_state}
    best_score = -math.inf
    bad_evals = 0
    if latest.latest_step() is not None:
        restored = _restore(latest, latest.latest_step(), ckpt(state), "latest")
        state = state.replace(**restored)
        if best.latest_step() is not None:
            best_score = _best_score_from_log(workdir, task)
    state = train.replicate(mesh, state)
    step_fn = train.make_train_step(model, task)
    predict = train.make_predict(model)

    start = int(state.step)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.model} train", unit="step", dynamic_ncols=True)
    t0 = time.time()
    losses = []
    stopped_early = False
    for step in range(start, cfg.steps):
        batch = stream.batch(step)
        x, y = train.shard_batch(mesh, (batch[0], train.targets(batch, task)))
        state, loss = step_fn(state, tables, x, y)
        losses.append(loss)
        done = step + 1
        if bar:
            bar.update(1)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            mean_loss = float(jnp.mean(jnp.stack(losses)))
            losses = []
            hold = evaluate_params(predict, task, state.params, tables, hoi, hol, hold_cfg, cfg.seed + 1)
            score = _score(task, hold)
            rec = {"step": done, "epoch": stream.epoch_of(step), "train_loss": mean_loss, "holdout": hold,
                   "seconds": round(time.time() - t0, 2)}
            _append_jsonl(workdir, rec)
            if bar:
                bar.set_postfix(loss=f"{mean_loss:.3f}", holdout=f"{score:.3f}")
            if score > best_score:
                best_score, bad_evals = score, 0
                best.save(done, args=ocp.args.StandardSave(ckpt(state)), force=True)
                best.wait_until_finished()
            else:
                bad_evals += 1
            if cfg.patience and bad_evals >= cfg.patience:
                stopped_early = True
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopped_early:
            latest.save(done, args=ocp.args.StandardSave(ckpt(state)), force=True)
            latest.wait_until_finished()
            if _kill_at_step is not None and done >= _kill_at_step:
                os.kill(os.getpid(), 9)
        if stopped_early:
            break
    if bar:
        bar.close()
    result = evaluate_workdir(workdir, mesh=mesh, _model_task=(model, task), _tables=tables, _data=(tei, tel),
                              _predict=predict)
    result["stopped_early"] = stopped_early
    return result


def _best_score_from_log(workdir, task):
    best = -math.inf
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        for line in open(path):
            rec = json.loads(line)
            if "holdout" in rec:
                best = max(best, _score(task, rec["holdout"]))
    return best


def evaluate_workdir(workdir: str, test_rotate: bool | None = None, n_test: int | None = None, mesh=None,
                     _model_task=None, _tables=None, _data=None, _predict=None) -> dict:
    """Restore the best (else latest) checkpoint of a run and evaluate it on the test split.

    Appends ``{"test": metrics, ...}`` to ``metrics.jsonl`` and writes ``summary.md``.
    """
    workdir = os.path.abspath(workdir)
    cfg = load_config(workdir)
    if test_rotate is not None:
        cfg = dataclasses.replace(cfg, test_rotate=test_rotate)
    if n_test is not None:
        cfg = dataclasses.replace(cfg, n_test=n_test)
    model, task = _model_task or _model(cfg)
    mesh = mesh or train.make_mesh()
    tables = _tables if _tables is not None else train.replicate(mesh, harmonics.build_tables(model.table_specs()))
    if _data is None:
        _data = _load_test(cfg)
    params, which, step = restore_params(workdir, mesh=mesh, _model_task=(model, task), _tables=tables)
    test_cfg = pipeline.StreamConfig(L=cfg.L, batch_size=cfg.batch_size, digits_per_image=cfg.digits_per_image,
                                     rotate=cfg.test_rotate)
    predict = _predict or train.make_predict(model)  # fit passes its own: compiled once per run
    m = evaluate_params(predict, task, params, tables, _data[0], _data[1], test_cfg, cfg.seed + 2)
    rec = {"test": m, "checkpoint": which, "checkpoint_step": int(step), "test_rotate": cfg.test_rotate}
    if task == "segment" and _is_writer():
        x, _, mask = next(iter(pipeline.eval_batches(_data[0][:4], _data[1][:4], test_cfg, cfg.seed + 2)))
        pred = metrics.logits_to_pred(predict(params, tables, x))
        from sphere_jax import plotting

        rot = "rotated" if cfg.test_rotate else "canonical"
        name = "predictions_R.png" if cfg.test_rotate else "predictions_NR.png"
        rec["figure"] = plotting.plot_predictions(
            x, mask, pred, os.path.join(workdir, name), title=f"{cfg.model}, {rot} test digits"
        )
    _append_jsonl(workdir, rec)
    if _is_writer():
        with open(os.path.join(workdir, "summary.md"), "w") as f:
            f.write(summarise(cfg, task, rec))
    return rec


def restore_params(workdir: str, which: str = "best", mesh=None, _model_task=None, _tables=None):
    """``(params, which, step)`` of a run's ``"best"`` (falling back to ``"latest"``) or ``"latest"``
    checkpoint, replicated over ``mesh`` (default: all devices), whatever topology saved it."""
    workdir = os.path.abspath(workdir)
    cfg = load_config(workdir)
    model, task = _model_task or _model(cfg)
    mesh = mesh or train.make_mesh()
    tables = _tables if _tables is not None else train.replicate(mesh, harmonics.build_tables(model.table_specs()))
    latest, best = _managers(workdir)
    if which == "best" and best.latest_step() is not None:
        manager = best
    else:
        manager, which = latest, "latest"
    step = manager.latest_step()
    if step is None:
        raise RunError(f"no checkpoint in {workdir}; train first")
    x0 = jnp.zeros((1, 2 * cfg.L, 2 * cfg.L - 1, 1))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with_sharding = lambda t: jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), t)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x0, tables)["params"])
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
                "opt_state": jax.eval_shape(lambda p: optax.adam(cfg.learning_rate).init(p), params)}
    restored = _restore(manager, step, with_sharding(abstract), which)
    return restored["params"], which, step


def summarise(cfg: RunConfig, task: str, rec: dict) -> str:
    m = rec["test"]
    rot = "rotated (R)" if rec["test_rotate"] else "canonical (NR)"
    data = {"tfds": cfg.dataset, "synthetic": "synthetic digits"}.get(
        cfg.source, f"digits of {os.path.basename(str(cfg.digits_npz))}"
    )
    lines = [f"# {cfg.model} on {data}, test digits {rot}", "",
             f"checkpoint: {rec['checkpoint']} at step {rec['checkpoint_step']}, {m['n']} test images", ""]
    if task == "classify":
        lines.append(f"accuracy: {100 * m['accuracy']:.2f} %")
    else:
        lines += [f"pixel accuracy: {100 * m['pixel_accuracy']:.2f} %",
                  f"mIoU (11 classes): {m['miou']:.4f}", f"mIoU (10 digit classes): {m['miou_digits']:.4f}",
                  f"area-weighted mIoU (11 / 10): {m.get('area_miou', float('nan')):.4f} / "
                  f"{m.get('area_miou_digits', float('nan')):.4f}"]
    return "\n".join(lines) + "\n"
