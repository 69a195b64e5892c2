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
import signal
import threading
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from sphere_jax import harmonics, layers, metrics, train
from sphere_jax.data import pipeline, sphere
from sphere_jax.models import registry, s2cnn

SOURCES = ("tfds", "synthetic", "npz")


class Preempted(RuntimeError):
    """A run stopped by SIGTERM after saving its latest checkpoint (the same command resumes it)."""


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
    init_from: str | None = None  # fine-tune: start from these parameters (a pretrained name or a workdir)
    min_separation_deg: float = 90.0  # scenes of several digits: smallest angle between digit centres
    digit_scale: float = 1.0  # digit size on the sphere (1: the study's projection)
    # also score the test digits at every evaluation (record "test_at_eval"): a learning curve on
    # the test set, as the reference code prints after each epoch; never used to choose a
    # checkpoint or to stop
    test_every_eval: bool = False

    def stream_config(self, rotate: bool, copies: int | None = None):
        """The :class:`~sphere_jax.data.pipeline.StreamConfig` of this run's digits."""
        return pipeline.StreamConfig(L=self.L, batch_size=self.batch_size, digits_per_image=self.digits_per_image,
                                     rotate=rotate, copies=copies, min_separation_deg=self.min_separation_deg,
                                     digit_scale=self.digit_scale)

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
        if self.source == "npz" and not (self.digits_npz and os.path.exists(_npz_path(self))):
            raise RunError(f"--source=npz needs --digits_npz=FILE (an existing .npz; '{{dataset}}' in it is "
                           f"replaced by the dataset), got {self.digits_npz!r}")


def _npz_path(cfg: RunConfig) -> str | None:
    """``digits_npz`` with ``{dataset}`` replaced by the run's dataset (one pattern for a grid)."""
    return cfg.digits_npz.replace("{dataset}", cfg.dataset) if cfg.digits_npz else None


def _npz(cfg: RunConfig, split: str):
    """Digits of a split from a user's ``.npz`` (``{split}_images uint8 [n, 28, 28]``, ``{split}_labels``)."""
    with np.load(_npz_path(cfg)) as z:
        try:
            return np.asarray(z[f"{split}_images"], np.uint8), np.asarray(z[f"{split}_labels"], np.int32)
        except KeyError:
            raise RunError(f"{_npz_path(cfg)} lacks {split}_images / {split}_labels (has {sorted(z.files)})") from None


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


@dataclasses.dataclass
class RunSetup:
    """The pieces of one run that are built once and shared by :func:`fit`,
    :func:`evaluate_workdir` and :func:`restore_variables`: so a run compiles its predict
    function once and builds its transform tables once.

    Attributes:
      cfg: the run's configuration.
      model, task: the model and its task ("classify" | "segment").
      mesh: the 1-D device mesh (axis "data").
      tables: the model's transform tables, replicated over the mesh.
      predict: ``predict(variables, tables, x) -> logits``, jit-compiled.
    """

    cfg: RunConfig
    model: Any
    task: str
    mesh: Any
    tables: dict
    predict: Any
    _test_data: Any = None

    @classmethod
    def build(cls, cfg: RunConfig, mesh=None) -> "RunSetup":
        model, task = _model(cfg)
        mesh = mesh or train.make_mesh()
        tables = train.replicate(mesh, harmonics.build_tables(model.table_specs()))
        return cls(cfg, model, task, mesh, tables, train.make_predict(model))

    def with_config(self, cfg: RunConfig) -> "RunSetup":
        """The same model and compiled functions for a config that differs only in evaluation
        settings (test rotation, test digits); the test digits are kept when they are the same."""
        same_digits = dataclasses.replace(cfg, test_rotate=self.cfg.test_rotate) == self.cfg
        return dataclasses.replace(self, cfg=cfg, _test_data=self._test_data if same_digits else None)

    def sample_input(self) -> jax.Array:
        return jnp.zeros((1, 2 * self.cfg.L, 2 * self.cfg.L - 1, 1))

    def init_variables(self, key) -> dict:
        try:
            return jax.jit(self.model.init)(key, self.sample_input(), self.tables)
        except ValueError as e:  # e.g. an input too small for a CNN's valid convolutions
            L_min = registry.min_L(self.cfg.model)
            hint = f"; use --L={L_min} or more" if L_min > self.cfg.L else ""
            raise RunError(f"{self.cfg.model} cannot take band-limit L={self.cfg.L}: {str(e).splitlines()[0]}{hint}") from None

    def abstract_variables(self) -> dict:
        return jax.eval_shape(lambda: self.model.init(jax.random.key(0), self.sample_input(), self.tables))

    def test_data(self):
        """The run's test digits ``(uint8 [n, 28, 28], int32 [n])``, loaded once."""
        if self._test_data is None:
            self._test_data = _load_test(self.cfg)
        return self._test_data


def _check_input_norm(workdir: str, setup: RunSetup) -> None:
    """Refuse to restore an S2CNN whose checkpoint was trained with another input normalisation
    than the model now has: its predictions would be silently wrong. ``fit`` records the
    normalisation in ``metrics.jsonl``'s info records; segmenter workdirs from before it did were
    trained with "rms" (the segmenters' default until 2026-11-27, "none" since)."""
    want = s2cnn.input_norm_of(setup.model)
    if want is None:
        return
    recorded = None
    for rec in _log_records(workdir):
        info = rec.get("info")
        if isinstance(info, dict) and "input_norm" in info:
            recorded = info["input_norm"]
    if recorded is None and setup.task == "segment" and want != "rms":
        raise RunError(f"{workdir}: this {setup.cfg.model} was trained before the S2CNN segmenters took their inputs "
                       f"as they are (input_norm 'rms' then, {want!r} now; metrics.jsonl records none); "
                       f"its checkpoints do not fit the model any more: train it again")
    if recorded is not None and recorded != want:
        raise RunError(f"{workdir}: trained with input_norm {recorded!r}, but {setup.cfg.model} now has {want!r}")


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
        theirs = {**dataclasses.asdict(RunConfig()), **theirs}  # fields added since: their defaults
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


def _predict_over(mesh, predict, variables, tables, x):
    """``predict`` with the batch ``x [B, ...]`` split over the mesh's devices (padded to a multiple
    of their count), the logits gathered to the host (numpy) and the padding's dropped; without a
    mesh, or with one device, as is. Gathering on the host keeps XLA collectives out of the
    metrics (a sliced or reduced sharded array would need them; on a split CPU they can deadlock,
    :func:`sphere_jax.train.make_split_train_step`)."""
    n = 1 if mesh is None or jax.process_count() > 1 else mesh.devices.size  # multi-host: every batch whole
    if n == 1:
        return predict(variables, tables, x)
    B = x.shape[0]
    pad = -B % n
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    return np.asarray(predict(variables, tables, train.shard_batch(mesh, x)))[:B]


def evaluate_params(predict, task, variables, tables, images, labels, stream_cfg, seed, mesh=None) -> dict:
    """Metrics of a model's ``variables`` (or params alone) on a fixed (rotated or not) set of digits.

    ``predict`` is ``train.make_predict(model)``, made once per run so it compiles once. With a
    ``mesh`` of several devices (``variables`` and ``tables`` replicated over it), each batch is
    split over them; without one, every device holding the variables computes the whole batch.

    classify: ``accuracy``; segment: pixel accuracy, per-class IoU, mIoU (11 and 10 classes)
    and their area-weighted variants.
    """
    if task == "classify":
        correct = total = 0
        for x, labs, _ in pipeline.eval_batches(images, labels, stream_cfg, seed):
            pred = np.asarray(metrics.logits_to_pred(_predict_over(mesh, predict, variables, tables, x)))
            correct += int((pred == np.asarray(labs[:, 0])).sum())
            total += len(pred)
        return {"accuracy": correct / max(total, 1), "n": total}
    acc = metrics.ConfusionAccumulator(sphere.NUM_CLASSES_SEG, weights=metrics.area_weights(stream_cfg.L))
    n = 0
    for x, _, mask in pipeline.eval_batches(images, labels, stream_cfg, seed):
        acc.update(metrics.logits_to_pred(_predict_over(mesh, predict, variables, tables, x)), mask)
        n += x.shape[0]
    out = acc.result()
    out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in out.items()}
    out["n"] = n
    return out


def _score(task, m):
    return m["accuracy"] if task == "classify" else m["miou"]


class _Progress:
    """Training progress that fits where it goes: a live bar on a terminal; otherwise one line
    per evaluation (step, loss, hold-out score, steps/s, ETA), so logs stay a few dozen lines."""

    def __init__(self, enabled: bool, name: str, total: int, start: int, stream=None):
        import sys

        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.total, self.start, self.name = total, start, name
        self.t0 = time.time()
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=f"{name} train", unit="step", dynamic_ncols=True,
                            file=self.stream)

    def step(self, n: int = 1):
        if self.bar:
            self.bar.update(n)

    def evaluated(self, step: int, loss: float, score_name: str, score):
        """``score``: the hold-out score, or a list of them (one per run trained together, in the
        order of the name; ``None``: not evaluated now)."""
        scores = list(score) if isinstance(score, (list, tuple)) else [score]
        shown = "/".join("-" if v is None else f"{v:.{3 if self.bar else 4}f}" for v in scores)
        if self.bar:
            self.bar.set_postfix(loss=f"{loss:.3f}", holdout=shown)
        elif self.enabled:
            rate = (step - self.start) / max(time.time() - self.t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            print(f"{self.name} step {step}/{self.total}  loss {loss:.4f}  hold-out {score_name} {shown}  "
                  f"{rate:.2f} steps/s  ETA {eta / 60:.1f} min", file=self.stream, flush=True)

    def close(self):
        if self.bar:
            self.bar.close()


def _initial_variables(setup: RunSetup, key) -> dict:
    """Fresh variables, or those of ``cfg.init_from`` (a pretrained model's name or a workdir)."""
    cfg = setup.cfg
    variables = setup.init_variables(key)
    if not cfg.init_from:
        return variables
    if os.path.isdir(cfg.init_from):
        try:
            src, _, _ = restore_variables(cfg.init_from)
        except RunError as e:
            raise RunError(f"--init_from={cfg.init_from!r}: {e}") from None
    else:
        from sphere_jax import pretrained

        try:
            card = pretrained.card(cfg.init_from)
            _, src = pretrained.load(cfg.init_from)
        except (KeyError, FileNotFoundError, ValueError) as e:
            raise RunError(f"--init_from={cfg.init_from!r} is neither a run's workdir nor a pretrained model: "
                           f"{str(e).strip(chr(34))}") from None
        if card["model"] != cfg.model or card["L"] != cfg.L:
            raise RunError(f"--init_from={cfg.init_from!r} is {card['model']} at L={card['L']}; "
                           f"this run is {cfg.model} at L={cfg.L}")
    want = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), variables)
    got = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), src)
    if want != got:
        raise RunError(f"--init_from={cfg.init_from!r}: its variables do not fit {cfg.model} at L={cfg.L}")
    return jax.tree_util.tree_map(jnp.asarray, src)


class _Member:
    """One run's share of a training loop (:func:`fit`, :func:`fit_members`): its workdir, data
    stream, hold-out digits, checkpoint managers, early stopping and clock. Builds the run's
    initial (or resumed) :class:`~sphere_jax.train.TrainState` as ``self.state0``."""

    def __init__(self, cfg: RunConfig, workdir: str, setup: RunSetup, tx):
        self.cfg, self.workdir = cfg, os.path.abspath(workdir)
        self.setup = setup if setup.cfg == cfg else setup.with_config(cfg)
        (tri, trl), self.holdout, test = _load(cfg)
        self.setup._test_data = test
        try:
            stream_cfg = cfg.stream_config(cfg.train_rotate, cfg.copies)
            self.stream = pipeline.DigitStream(tri, trl, stream_cfg, seed=cfg.seed)
        except ValueError as e:
            raise RunError(str(e)) from None
        self.hold_cfg = dataclasses.replace(stream_cfg, rotate=cfg.train_rotate)
        resuming = os.path.exists(os.path.join(self.workdir, "config.json"))
        key = jax.random.key(cfg.seed)
        variables = self.setup.init_variables(key) if resuming else _initial_variables(self.setup, key)
        params, model_state = train.split_variables(variables)
        state = train.TrainState.create(params, tx, model_state)
        _check_workdir(self.workdir, cfg)  # only now: a run that cannot start leaves no workdir behind
        self.latest, self.best = _managers(self.workdir)
        self.best_score, self.bad_evals, self.train_seconds = -math.inf, 0, 0.0
        if self.latest.latest_step() is not None:
            _check_input_norm(self.workdir, self.setup)
            restored = _restore(self.latest, self.latest.latest_step(), _ckpt(state), "latest")
            state = state.replace(**restored)
            if self.best.latest_step() is not None:
                self.best_score, self.bad_evals = _best_score_from_log(self.workdir, self.setup.task)
            self.train_seconds = _seconds_from_log(self.workdir, int(restored["step"]))
        self.state0 = state
        self.step = int(state.step)
        self.stopped = bool(cfg.patience and self.bad_evals >= cfg.patience)
        self.improved = False  # did the last evaluation beat the best score so far?

    def log_info(self, n_dev: int, K: int, **extra) -> None:
        state = self.state0
        input_norm = s2cnn.input_norm_of(self.setup.model)  # S2CNNs: recorded, so that a restore can check it
        _append_jsonl(self.workdir, {"info": {
            "params": int(sum(np.size(a) for a in jax.tree_util.tree_leaves(state.params))),
            "device": jax.devices()[0].device_kind, "devices": n_dev, "steps_per_epoch": self.stream.steps_per_epoch,
            "start_step": self.step, "steps_per_call": K,
            **({"input_norm": input_norm, "numerics": layers.numerics()} if input_norm else {}),
            **extra}})

    def evaluated(self, done: int, loss: float, variables, seconds: float, test_every: bool) -> tuple[float, float]:
        """Score the hold-out at step ``done``, log it, keep the best checkpoint's score and the
        patience count. Returns ``(score, seconds spent on the test pass of --test_every_eval)``."""
        cfg, setup = self.cfg, self.setup
        hold = evaluate_params(setup.predict, setup.task, variables, setup.tables, *self.holdout, self.hold_cfg,
                               cfg.seed + 1, setup.mesh)
        score = _score(setup.task, hold)
        rec = {"step": done, "epoch": self.stream.epoch_of(done - 1), "epochs": round(done / self.stream.steps_per_epoch, 3),
               "train_loss": loss, "holdout": hold, "seconds": round(self.train_seconds + seconds, 2)}
        test_s = 0.0
        if test_every:  # not training time: left out of "seconds", now and later
            t_test = time.time()
            rec["test_at_eval"] = evaluate_variables(setup, variables)["test"]
            test_s = time.time() - t_test
        _append_jsonl(self.workdir, rec)
        if score > self.best_score:
            self.best_score, self.bad_evals = score, 0
            self.improved = True
        else:
            self.bad_evals += 1
            self.improved = False
        if cfg.patience and self.bad_evals >= cfg.patience:
            self.stopped = True
        return score, test_s

    def finish(self) -> dict:
        """The best checkpoint's test scores, with the run's test rotation (returned) and the other."""
        end = {"stopped_early": bool(self.stopped), "final_step": int(self.step)}
        result = evaluate_workdir(self.workdir, setup=self.setup, extra=end)
        other = dataclasses.replace(self.cfg, test_rotate=not self.cfg.test_rotate)
        evaluate_workdir(self.workdir, test_rotate=other.test_rotate, setup=self.setup.with_config(other),
                         write_summary=False, extra=end)
        return result


def _train(members: list, state, advance, get, K: int, name: str, progress: bool, kill_at, term_at):
    """The training loop of :func:`fit` and :func:`fit_members`.

    ``state``: what ``advance`` trains; ``advance(state, step, n, active) -> (state, losses
    [M, n])`` trains the ``active`` members (``bool`` per member) for steps ``step .. step+n-1``;
    ``get(state, i)`` is member ``i``'s :class:`~sphere_jax.train.TrainState`. Members train
    together from the earliest step of those not stopped; a member resumed at a later step waits
    (inactive) until the others reach it. Returns the final ``state``.
    """
    cfg = members[0].cfg
    live = [m for m in members if not m.stopped]
    done = min((m.step for m in live), default=cfg.steps)
    bar = _Progress(progress and _is_writer(), name, cfg.steps, min(m.step for m in members))
    test_s = 0.0  # seconds spent on --test_every_eval's test passes
    joined = {}  # member -> (time, test_s) when it first trained in this process: its clock runs from there
    clock = lambda m: time.time() - joined[m][0] - (test_s - joined[m][1])
    pending = []  # (losses [M, n], active) of the calls since the last evaluation
    with _SigtermFlag() as preempted:
        while live and done < cfg.steps:
            step = done
            n = min(_steps_in_call(step, K, cfg, m.stream.steps_per_epoch) for m in live)  # K or 1
            if any(step < m.step < step + n for m in live):
                n = 1  # a member resumed from a later checkpoint joins at its own step
            active = [not m.stopped and m.step == step for m in members]
            for m, a in zip(members, active):
                if a and m not in joined:
                    joined[m] = (time.time(), test_s)
            state, losses = advance(state, step, n, active)
            pending.append((losses, active))
            done = step + n
            for m, a in zip(members, active):
                if a:
                    m.step = done
            bar.step(n)
            evaluated = []
            if done % cfg.eval_every == 0 or done == cfg.steps:
                scores, mean_losses = [], []
                pending = [(np.asarray(l), a) for l, a in pending]  # to the host once
                for i, m in enumerate(members):
                    if not active[i]:
                        scores.append(None)
                        continue
                    own = [l[i] for l, a in pending if a[i]]
                    mean_loss = float(np.mean(np.concatenate(own)))
                    score, t = m.evaluated(done, mean_loss, get(state, i).variables, clock(m), cfg.test_every_eval)
                    test_s += t
                    if m.improved:
                        _save(m.best, done, get(state, i))
                    scores.append(score)
                    mean_losses.append(mean_loss)
                    evaluated.append(m)
                pending = []
                bar.evaluated(done, float(np.mean(mean_losses)),
                              "accuracy" if members[0].setup.task == "classify" else "mIoU", scores)
            stopping = [m for m in evaluated if m.stopped]
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping:
                for i, m in enumerate(members):
                    if active[i] and (m in stopping or done % cfg.checkpoint_every == 0 or done == cfg.steps):
                        _save(m.latest, done, get(state, i))
                if kill_at is not None and done >= kill_at:
                    os.kill(os.getpid(), 9)
            live = [m for m in live if not m.stopped]
            if not live:  # every run stopped early: finish, whatever signal came
                break
            if term_at is not None and step < term_at <= done:
                os.kill(os.getpid(), signal.SIGTERM)  # tests: a preemption right after this step
            if preempted.raised:
                for i, m in enumerate(members):
                    if m in live and m in joined:  # a run still waiting for the others has nothing new
                        if m.latest.latest_step() != m.step:
                            _save(m.latest, m.step, get(state, i))
                        _append_jsonl(m.workdir, {"preempted": {"step": m.step,
                                                                "seconds": round(m.train_seconds + clock(m), 2)}})
                raise Preempted(f"stopped by SIGTERM after step {done} of {cfg.steps}; the latest checkpoint is saved "
                                f"in {', '.join(m.workdir for m in live)}: run the same command to resume")
    bar.close()
    return state


def _steps_per_call(steps_per_call: int | None) -> int:
    K = default_steps_per_call() if steps_per_call is None else int(steps_per_call)
    if K < 1:
        raise RunError(f"--steps_per_call must be >= 1, got {K}" if steps_per_call is not None else
                       f"$SPHERE_JAX_STEPS_PER_CALL must be >= 1, got {K}")
    return K


def fit(cfg: RunConfig, workdir: str, progress: bool = True, steps_per_call: int | None = None,
        _kill_at_step: int | None = None, _term_at_step: int | None = None) -> dict:
    """Train (or resume) the run in ``workdir``; returns the final test metrics.

    ``steps_per_call`` (``K``): training steps per compiled call. ``K > 1`` runs ``K`` steps at a
    time in one program that also makes their batches on device (:func:`train.make_train_chunk`),
    so the host does nothing between them; the steps left before an evaluation, a checkpoint or
    an epoch's end run one at a time (all of them, where ``K`` exceeds ``eval_every``,
    ``checkpoint_every`` or an epoch). Same batches, same updates; floats may differ from
    ``K = 1`` in the last bits (another compiled program, compiled besides the single step).
    ``None``: :func:`default_steps_per_call`. A run resumed with the same ``K`` makes the same
    calls as an uninterrupted one; ``K`` is logged in the ``info`` record. SIGTERM is honoured
    after the current call: keep a call well under ``launch.run_grid``'s 30 s grace period.

    At the end the best checkpoint is evaluated on the test digits with the run's test rotation
    (the returned record) and with the other one (canonical <-> rotated), both appended to
    ``metrics.jsonl``. SIGTERM (a preemption, ``launch.run_grid`` stopping at its budget) ends
    the current step (or call of ``K`` steps), saves the latest checkpoint, logs ``{"preempted": ...}`` and raises
    :class:`Preempted`; the same call resumes from there. ``_kill_at_step`` / ``_term_at_step``
    (tests only) SIGKILL the process right after that step's checkpoint / SIGTERM it after that
    step.
    """
    cfg.validate()
    K = _steps_per_call(steps_per_call)
    if K > 1 and jax.process_count() > 1:
        raise RunError("--steps_per_call > 1 works on one host only (its batches are made from this host's "
                       "digits); use 1 with jax.distributed")
    setup = RunSetup.build(cfg)
    task, mesh = setup.task, setup.mesh
    n_dev = mesh.devices.size
    if cfg.batch_size % n_dev:
        raise RunError(f"--batch_size={cfg.batch_size} is not divisible by the {n_dev} devices; use a multiple of {n_dev}")
    member = _Member(cfg, workdir, setup, optax.adam(cfg.learning_rate))
    stream = member.stream
    # a CPU split into devices (train.split_cpu) trains without collectives: the state on the
    # first device, replicated only to be evaluated or saved
    split = (n_dev > 1 and K == 1 and jax.process_count() == 1 and mesh.devices.flat[0].platform == "cpu"
             and not member.state0.model_state)
    if split:
        state = jax.device_put(member.state0, mesh.devices.flat[0])
        step_fn = train.make_split_train_step(setup.model, task, mesh)
    else:
        if n_dev > 1 and mesh.devices.flat[0].platform == "cpu" and jax.process_count() == 1:
            why = "several steps per call" if K > 1 else "a model with state"
            warnings.warn(f"training over {n_dev} CPU devices with XLA's all-reduce ({why}): it deadlocked in "
                          "long runs (jaxlib 0.10.2); prefer --steps_per_call=1 or one CPU device")
        state = train.replicate(mesh, member.state0)
        step_fn = train.make_train_step(setup.model, task)
    if K > 1:
        chunk_fn = train.make_train_chunk(setup.model, task, stream.batch_of, mesh)
        data = train.replicate(mesh, stream.data)  # the digits on every device, once
    order = [None, None]  # (epoch, its order replicated)

    def advance(state, step, n, active):
        if n > 1:  # K steps in one call, batches made on device
            epoch = stream.epoch_of(step)
            assert stream.epoch_of(step + n - 1) == epoch  # one order per call
            if order[0] != epoch:
                order[:] = epoch, train.replicate(mesh, stream.epoch_order(step))
            state, loss = chunk_fn(state, setup.tables, data, order[1], jnp.arange(step, step + n, dtype=jnp.int32))
        else:
            batch = stream.batch(step)
            x, y = train.shard_batch(mesh, (batch[0], train.targets(batch, task)))
            state, loss = step_fn(state, setup.tables, x, y)
            loss = loss[None]
        return state, loss[None]

    member.log_info(n_dev, K, **({"data_parallel": "split"} if split else {}))
    member.state0 = None  # its buffers may be the first step's (donated): training owns the state now
    get = (lambda s, i: train.replicate(mesh, s)) if split else (lambda s, i: s)
    _train([member], state, advance, get, K, cfg.model, progress, _kill_at_step, _term_at_step)
    return member.finish()


def fit_members(cfgs: list, workdirs: list, progress: bool = True, steps_per_call: int | None = None,
                _kill_at_step: int | None = None, _term_at_step: int | None = None) -> list:
    """Train (or resume) runs that differ only in their seeds and augmentation levels (``copies``)
    together, in one program on one device.

    ``cfgs[i]`` trains in ``workdirs[i]`` exactly as :func:`fit` would train it alone (same
    workdir layout, checkpoints, hold-out, early stopping, final test records; a run can be
    resumed, evaluated or exported alone), but every training step of all runs is one compiled
    call (:func:`train.make_members_chunk`, ``vmap`` over the runs). That gives a small model's
    step more work per kernel launch: on a GPU several runs then cost little more than one. A
    run that stops early keeps its state while the others go on; a run resumed from a later
    checkpoint than the others waits until they reach it. Returns the runs' final test records,
    in order. Floats differ from separate runs in the last bits.

    ``steps_per_call``, SIGTERM and the test hooks as in :func:`fit`. Uses the first device only
    (runs trained together share one device; run one process per device to use more).
    """
    cfgs, workdirs = list(cfgs), [os.path.abspath(w) for w in workdirs]
    if not cfgs or len(cfgs) != len(workdirs):
        raise RunError(f"fit_members needs one workdir per config, got {len(cfgs)} configs and {len(workdirs)} workdirs")
    for cfg in cfgs:
        cfg.validate()
    base = dataclasses.replace(cfgs[0], seed=0, copies=1)
    for cfg in cfgs[1:]:
        if dataclasses.replace(cfg, seed=0, copies=1) != base:
            diff = sorted(k for k, v in dataclasses.asdict(cfg).items()
                          if k not in ("seed", "copies") and getattr(cfgs[0], k) != v)
            raise RunError(f"runs trained together may differ only in their seed and augmentation; these differ in {diff}")
    if not cfgs[0].train_rotate and len({c.copies for c in cfgs}) > 1:
        raise RunError("runs trained on canonical digits (NR) have no augmentation: runs that differ only in it "
                       "would be the same run; train several levels with rotated digits (R)")
    kinds = [(c.seed, c.copies) for c in cfgs]
    if len(set(kinds)) != len(kinds) or len(set(workdirs)) != len(workdirs):
        raise RunError(f"runs trained together need distinct (seed, augmentation) and workdirs, got {kinds}")
    if jax.process_count() > 1:
        raise RunError("runs trained together train on one host; use fit per run with jax.distributed")
    K = _steps_per_call(steps_per_call)
    setup = RunSetup.build(cfgs[0], mesh=train.make_mesh(jax.devices()[:1]))
    tx = optax.adam(cfgs[0].learning_rate)  # one optimizer: the runs' states share its static part
    members = [_Member(cfg, wd, setup, tx) for cfg, wd in zip(cfgs, workdirs)]
    if len({m.stream.n for m in members}) != 1:  # the same counts: only synthetic digits could differ
        raise RunError("runs trained together need the same number of training digits")
    state = train.stack_trees([m.state0 for m in members])
    data = train.stack_trees([m.stream.data for m in members])
    apart = train.stack_trees([m.stream.member() for m in members])  # keys, epoch lengths, rotation kinds
    longest = max(m.stream.items_per_epoch for m in members)
    chunk = train.make_members_chunk(setup.model, setup.task, members[0].stream.batch_of)
    orders = [None, None]  # (each run's epoch, their orders stacked)

    def advance(state, step, n, active):
        epochs = [m.stream.epoch_of(step) for m in members]
        assert all(m.stream.epoch_of(step + n - 1) == e for m, e, a in zip(members, epochs, active) if a)  # one order per call
        if orders[0] != epochs:
            orders[:] = epochs, jnp.stack([jnp.pad(o, (0, longest - o.shape[0])) for o in
                                           (m.stream.epoch_order(step) for m in members)])
        return chunk(state, setup.tables, data, orders[1], apart, jnp.arange(step, step + n, dtype=jnp.int32),
                     jnp.asarray(active))

    together = {"seeds": [c.seed for c in cfgs], "copies": [c.copies for c in cfgs]}
    for i, m in enumerate(members):
        m.log_info(1, K, members={**together, "index": i})
    labels = ", ".join(f"{'fresh' if c.copies is None else c.copies}/{c.seed}" for c in cfgs)
    _train(members, state, advance, train.member_state, K, f"{cfgs[0].model} x{len(members)} (aug/seed {labels})",
           progress, _kill_at_step, _term_at_step)
    return [m.finish() for m in members]


def default_steps_per_call() -> int:
    """Training steps per compiled call when ``fit`` is not told: ``$SPHERE_JAX_STEPS_PER_CALL``
    if set, else 1."""
    value = os.environ.get("SPHERE_JAX_STEPS_PER_CALL", "1")
    try:
        return int(value)
    except ValueError:
        raise RunError(f"$SPHERE_JAX_STEPS_PER_CALL must be an integer >= 1, got {value!r}") from None


def _steps_in_call(step: int, K: int, cfg: RunConfig, steps_per_epoch: int) -> int:
    """How many steps the call starting at ``step`` trains: ``K`` if as many are left before the
    host's next work (an evaluation, a checkpoint, an epoch's end: a new order, the last step),
    else 1. A function of ``step`` alone, so a resumed run makes the same calls."""
    after = lambda every: (step // every + 1) * every
    end = min(after(cfg.eval_every), after(cfg.checkpoint_every), after(steps_per_epoch), cfg.steps)
    return K if end - step >= K else 1


class _SigtermFlag:
    """While active (main thread only), SIGTERM sets ``self.raised`` instead of killing the process."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def _save(manager, step: int, state) -> None:
    """Write ``state`` as checkpoint ``step`` of ``manager`` and wait until it is on disk."""
    manager.save(step, args=ocp.args.StandardSave(_ckpt(state)), force=True)
    manager.wait_until_finished()


def _ckpt(state) -> dict:
    """What a checkpoint holds: step, params, optimizer state (and BatchNorm statistics, if any)."""
    out = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    if state.model_state:
        out["model_state"] = state.model_state
    return out


def _log_records(workdir) -> list[dict]:
    """The records of ``metrics.jsonl`` (none if it is missing), skipping a line cut short by a kill."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _seconds_from_log(workdir, step) -> float:
    """Training seconds logged up to ``step`` (so a resumed run's clock continues)."""
    secs = 0.0
    for rec in _log_records(workdir):
        if "preempted" in rec:  # a SIGTERM between evaluations: its clock counts too
            rec = rec["preempted"]
        elif "train_loss" not in rec:
            continue
        if rec["step"] <= step:
            secs = max(secs, float(rec.get("seconds", 0.0)))
    return secs


def _best_score_from_log(workdir, task):
    """``(best hold-out score, evaluations since it)`` from ``metrics.jsonl``."""
    best, since = -math.inf, 0
    for rec in _log_records(workdir):
        if "holdout" in rec:
            score = _score(task, rec["holdout"])
            if score > best:
                best, since = score, 0
            else:
                since += 1
    return best, since


def evaluate_workdir(workdir: str, test_rotate: bool | None = None, n_test: int | None = None, mesh=None,
                     setup: RunSetup | None = None, write_summary: bool = True, extra: dict | None = None) -> dict:
    """Restore the best (else latest) checkpoint of a run and evaluate it on the test split.

    Appends ``{"test": metrics, "test_rotate": ..., ...}`` to ``metrics.jsonl``, writes the
    predictions figure (segmentation) and, with ``write_summary``, ``summary.md``. ``setup``
    (from :meth:`RunSetup.build`) reuses a run's model, tables and compiled predict; ``extra``
    is merged into the record (``fit`` adds ``stopped_early`` and ``final_step``).
    """
    workdir = os.path.abspath(workdir)
    cfg = load_config(workdir)
    if test_rotate is not None:
        cfg = dataclasses.replace(cfg, test_rotate=test_rotate)
    if n_test is not None:
        cfg = dataclasses.replace(cfg, n_test=n_test)
    setup = RunSetup.build(cfg, mesh) if setup is None else setup.with_config(cfg) if setup.cfg != cfg else setup
    variables, which, step = restore_variables(workdir, setup=setup)
    rec = evaluate_variables(setup, variables, workdir)
    rec.update(checkpoint=which, checkpoint_step=int(step), **(extra or {}))
    _append_jsonl(workdir, rec)
    if write_summary and _is_writer():
        with open(os.path.join(workdir, "summary.md"), "w") as f:
            f.write(summarise(cfg, setup.task, rec))
    return rec


def evaluate_variables(setup: RunSetup, variables, out_dir: str | None = None, name: str | None = None) -> dict:
    """Test metrics of ``variables`` under ``setup.cfg`` (test digits, rotation, seed + 2), and for
    segmentation a predictions figure of the first 4 test digits in ``out_dir``.

    Returns ``{"test": metrics, "test_rotate": bool[, "figure": path]}``.
    """
    cfg = setup.cfg
    images, labels = setup.test_data()
    test_cfg = cfg.stream_config(cfg.test_rotate)
    m = evaluate_params(setup.predict, setup.task, variables, setup.tables, images, labels, test_cfg, cfg.seed + 2,
                        setup.mesh)
    rec = {"test": m, "test_rotate": cfg.test_rotate}
    if setup.task == "segment" and out_dir is not None and _is_writer():
        x, _, mask = next(iter(pipeline.eval_batches(images[:4], labels[:4], test_cfg, cfg.seed + 2)))
        pred = metrics.logits_to_pred(setup.predict(variables, setup.tables, x))
        from sphere_jax import plotting

        rot = "rotated" if cfg.test_rotate else "canonical"
        name = name or cfg.model
        fname = "predictions_R.png" if cfg.test_rotate else "predictions_NR.png"
        rec["figure"] = plotting.plot_predictions(x, mask, pred, os.path.join(out_dir, fname),
                                                  title=f"{name}, {rot} test digits")
    return rec


def restore_variables(workdir: str, which: str = "best", mesh=None, setup: RunSetup | None = None):
    """``(variables, which, step)`` of a run's ``"best"`` (falling back to ``"latest"``) or
    ``"latest"`` checkpoint, replicated over the mesh (default: all devices), whatever topology
    saved it. ``variables`` is ``{"params": ...}`` plus BatchNorm statistics where the model has them."""
    workdir = os.path.abspath(workdir)
    cfg = load_config(workdir)
    setup = setup or RunSetup.build(cfg, mesh)
    latest, best = _managers(workdir)
    if which == "best" and best.latest_step() is not None:
        manager = best
    else:
        manager, which = latest, "latest"
    step = manager.latest_step()
    if step is None:
        raise RunError(f"no checkpoint in {workdir}; train first")
    _check_input_norm(workdir, setup)
    rep = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    with_sharding = lambda t: jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), t)
    params, model_state = train.split_variables(setup.abstract_variables())
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
                "opt_state": jax.eval_shape(lambda p: optax.adam(cfg.learning_rate).init(p), params)}
    if model_state:
        abstract["model_state"] = model_state
    restored = _restore(manager, step, with_sharding(abstract), which)
    return {"params": restored["params"], **restored.get("model_state", {})}, which, step


def restore_params(workdir: str, which: str = "best", mesh=None, setup: RunSetup | None = None):
    """``(params, which, step)``: the parameters alone of :func:`restore_variables` (enough for
    every model without BatchNorm statistics)."""
    variables, which, step = restore_variables(workdir, which, mesh, setup)
    return variables["params"], which, step


def evaluate_pretrained(name: str, test_rotate: bool = True, n_test: int = 0, out_dir: str | None = None,
                        batch_size: int = 32, **data) -> dict:
    """Evaluate a shipped model (:mod:`sphere_jax.pretrained`) on its dataset's test digits.

    Args:
      name: a name of ``sphere_jax.pretrained.names()``.
      test_rotate: Haar-random rotations (R) or canonical digits (NR).
      n_test: the first ``n_test`` test digits (0: all).
      out_dir: where the predictions figure goes (segmenters), or ``None``.
      data: ``source``, ``digits_dir``, ``data_dir``, ``digits_npz`` (as :class:`RunConfig`).

    Returns ``{"test": metrics, "test_rotate": ..., "card": model card[, "figure": path]}``;
    rotations are keyed like a run's test set (seed of the card + 2), so the same ``n_test``
    gives the card's numbers.
    """
    setup, variables, card = pretrained_setup(name, test_rotate, n_test, batch_size, **data)
    rec = evaluate_variables(setup, variables, out_dir, name=name)
    rec["card"] = card
    return rec


def pretrained_setup(name: str, test_rotate: bool = True, n_test: int = 0, batch_size: int = 32, **data):
    """``(setup, variables, card)`` of a shipped model, evaluated as :func:`evaluate_pretrained`
    describes (same arguments)."""
    from sphere_jax import pretrained

    try:
        card = pretrained.card(name)
        _, variables = pretrained.load(name)
    except (KeyError, ValueError) as e:
        raise RunError(str(e).strip('"')) from None
    cfg = RunConfig(model=card["model"], dataset=card["dataset"], L=int(card["L"]),
                    digits_per_image=int(card.get("digits_per_image", 1)), test_rotate=test_rotate,
                    n_test=n_test, batch_size=batch_size, seed=int(card["seed"]), **data)
    cfg.validate()
    return RunSetup.build(cfg), variables, card


def rotation_sensitivity(setup: RunSetup, variables, n: int = 256) -> dict:
    """How far a classifier is from rotation invariance, on the first ``n`` test digits of
    ``setup.cfg``: each digit canonical (NR) and under its Haar-random test rotation (R, keyed
    like a run's rotated test set, seed + 2).

    Returns ``{"n", "accuracy_canonical", "accuracy_rotated", "agreement", "logit_change_median",
    "logit_change_p90"}``: ``agreement`` is the fraction of digits whose predicted class is the
    same in both; the logit change of a digit is ``|y(R x) - y(x)| / |y(x)|`` (Euclidean norms
    over the 10 logits), 0 for an invariant model. Raises :class:`RunError` for a segmenter,
    whose output rotates with its input.
    """
    if setup.task != "classify":
        raise RunError(f"{setup.cfg.model} is a segmenter: its output rotates with the input, so "
                       "invariance is not the question (equivariance is; see tests/test_s2cnn.py)")
    if n < 1:
        raise RunError(f"rotation sensitivity needs n >= 1 test digits, got {n}")
    cfg = setup.cfg
    images, labels = setup.test_data()
    images, labels = np.asarray(images)[:n], np.asarray(labels)[:n]
    logits = {}
    for rotate in (False, True):
        batches = pipeline.eval_batches(images, labels, cfg.stream_config(rotate), cfg.seed + 2)
        logits[rotate] = np.concatenate([np.asarray(setup.predict(variables, setup.tables, x)) for x, _, _ in batches])
    y0, yr = logits[False], logits[True]
    change = np.linalg.norm(yr - y0, axis=1) / np.maximum(np.linalg.norm(y0, axis=1), 1e-30)
    p0, pr = y0.argmax(1), yr.argmax(1)
    return {"n": int(len(labels)), "accuracy_canonical": float((p0 == labels).mean()),
            "accuracy_rotated": float((pr == labels).mean()), "agreement": float((p0 == pr).mean()),
            "logit_change_median": float(np.median(change)), "logit_change_p90": float(np.quantile(change, 0.9))}


def summarise(cfg: RunConfig, task: str, rec: dict) -> str:
    m = rec["test"]
    rot = "rotated (R)" if rec["test_rotate"] else "canonical (NR)"
    data = {"tfds": cfg.dataset, "synthetic": "synthetic digits"}.get(
        cfg.source, f"digits of {os.path.basename(str(_npz_path(cfg)))}"
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
