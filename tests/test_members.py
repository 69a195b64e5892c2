"""Runs of several seeds and augmentation levels trained together in one program:
runner.fit_members, --seeds, --augmentations."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sphere_jax import runner

from test_runner import ROOT, TINY_SEG, _records


def _leaves(workdir, step):
    params, _, got = runner.restore_params(str(workdir), which="latest")
    assert got == step
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(params)]


def _assert_close(a, b, rel):
    for x, y in zip(a, b):
        assert np.max(np.abs(x - y)) <= rel * np.max(np.abs(x)), (np.max(np.abs(x - y)), np.max(np.abs(x)))


def test_runs_trained_together_follow_their_separate_runs(tmp_path):
    """Two seeds, fixed copies (1 and 2) and fresh rotations in one program: their epochs end at
    different steps (4 and 8 steps of 32 digits), and with 3 steps per call every call stops at
    the nearest one (step 4 is no evaluation or checkpoint here). Each run ends where it ends
    alone: parameters within 2e-6 of their largest entry (measured; the bound leaves 50x)."""
    base = dataclasses.replace(TINY_SEG, n_train=32, eval_every=8, checkpoint_every=8)
    # the longest epoch first: calls must stop at the others' epoch ends too
    cfgs = [dataclasses.replace(base, seed=0, copies=2), dataclasses.replace(base, seed=0, copies=1),
            dataclasses.replace(base, seed=1, copies=None)]
    wds = [str(tmp_path / f"together{i}") for i in range(3)]
    together = runner.fit_members(cfgs, wds, progress=False, steps_per_call=3)
    alone = [str(tmp_path / f"alone{i}") for i in range(3)]
    for i, (c, t, wd) in enumerate(zip(cfgs, together, wds)):
        a = runner.fit(c, alone[i], progress=False)
        _assert_close(_leaves(alone[i], 8), _leaves(wd, 8), 1e-4)
        assert t["test"]["miou"] == pytest.approx(a["test"]["miou"], abs=0.01)
        recs = _records(wd)
        info = [r["info"] for r in recs if "info" in r][0]
        assert info["steps_per_epoch"] == (8 if c.copies == 2 else 4)
        assert info["members"] == {"seeds": [0, 0, 1], "copies": [2, 1, None], "index": i}
        assert [(r["test_rotate"], r["final_step"]) for r in recs if "test" in r] == [(True, 8), (False, 8)]
    assert not np.allclose(_leaves(wds[0], 8)[0], _leaves(wds[2], 8)[0])  # the runs did differ

    # the fresh run alone is preempted after step 3; then all train together: the others from
    # step 0 while it waits, its state untouched, until step 3; the group is preempted after
    # step 5 and the same call resumes it. All end where their uninterrupted runs end.
    # A preemption before it joins (step 2) leaves the waiting run's records and clock alone.
    wds = [str(tmp_path / f"resumed{i}") for i in range(3)]
    with pytest.raises(runner.Preempted, match="after step 3 of 8"):
        runner.fit(cfgs[2], wds[2], progress=False, _term_at_step=3)
    with pytest.raises(runner.Preempted, match="after step 2 of 8"):
        runner.fit_members(cfgs, wds, progress=False, _term_at_step=2)
    assert [r["preempted"]["step"] for r in _records(wds[2]) if "preempted" in r] == [3]
    with pytest.raises(runner.Preempted, match="after step 5 of 8"):
        runner.fit_members(cfgs, wds, progress=False, _term_at_step=5)
    assert [r["preempted"]["step"] for r in _records(wds[2]) if "preempted" in r] == [3, 5]
    assert [r["preempted"]["step"] for r in _records(wds[0]) if "preempted" in r] == [2, 5]
    runner.fit_members(cfgs, wds, progress=False)
    for i, wd in enumerate(wds):
        _assert_close(_leaves(alone[i], 8), _leaves(wd, 8), 1e-4)
        assert [r["step"] for r in _records(wd) if "holdout" in r] == [8]


def test_a_member_that_stops_early_leaves_the_others_training(tmp_path, monkeypatch):
    cfg = runner.RunConfig(model="s2cnn_cls_small", source="synthetic", L=8, n_train=64, n_holdout=8, n_test=16,
                           batch_size=8, steps=8, eval_every=2, checkpoint_every=4, patience=1, learning_rate=3e-3)
    cfgs = [dataclasses.replace(cfg, seed=s) for s in (10, 20)]
    real = runner.evaluate_params
    calls = {11: 0, 21: 0}

    def scripted(predict, task, variables, tables, images, labels, stream_cfg, seed, mesh=None):
        m = real(predict, task, variables, tables, images, labels, stream_cfg, seed, mesh)
        if seed in calls:  # the members' hold-outs (seed + 1): 10's gets worse, 20's better
            calls[seed] += 1
            m["accuracy"] = 1.0 / calls[seed] if seed == 11 else calls[seed] / 10
        return m

    monkeypatch.setattr(runner, "evaluate_params", scripted)
    wds = [str(tmp_path / f"m{c.seed}") for c in cfgs]
    out = runner.fit_members(cfgs, wds, progress=False)
    assert [(r["stopped_early"], r["final_step"]) for r in out] == [(True, 4), (False, 8)]
    assert [r["step"] for r in _records(wds[0]) if "holdout" in r] == [2, 4]
    assert [r["step"] for r in _records(wds[1]) if "holdout" in r] == [2, 4, 6, 8]
    assert runner.restore_params(wds[0], which="latest")[2] == 4  # saved when it stopped
    assert runner.restore_params(wds[0], which="best")[2] == 2
    # resuming the finished group trains nothing more: seed 10 stays stopped, 20 is done
    out2 = runner.fit_members(cfgs, wds, progress=False)
    assert [(r["stopped_early"], r["final_step"]) for r in out2] == [(True, 4), (False, 8)]
    # every run stops in the call after which a SIGTERM comes: they finish (no preemption)
    both = [dataclasses.replace(cfg, seed=s) for s in (30, 40)]
    worse_calls = {31: 0, 41: 0}

    def worse(predict, task, variables, tables, images, labels, stream_cfg, seed, mesh=None):
        m = real(predict, task, variables, tables, images, labels, stream_cfg, seed, mesh)
        if seed in worse_calls:  # both hold-outs get worse after the first evaluation
            worse_calls[seed] += 1
            m["accuracy"] = 1.0 / worse_calls[seed]
        return m

    monkeypatch.setattr(runner, "evaluate_params", worse)
    out3 = runner.fit_members(both, [str(tmp_path / f"b{c.seed}") for c in both], progress=False, _term_at_step=4)
    assert [(r["stopped_early"], r["final_step"]) for r in out3] == [(True, 4), (True, 4)]


def test_members_refuse_what_cannot_train_together(tmp_path):
    a = dataclasses.replace(TINY_SEG, seed=0)
    with pytest.raises(runner.RunError, match=r"differ only in their seed and augmentation; these differ in \['learning_rate'\]"):
        runner.fit_members([a, dataclasses.replace(a, seed=1, learning_rate=1e-2)], [str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(runner.RunError, match=r"distinct \(seed, augmentation\)"):
        runner.fit_members([a, a], [str(tmp_path / "a"), str(tmp_path / "b")])
    nr = dataclasses.replace(a, train_rotate=False, copies=1)
    with pytest.raises(runner.RunError, match="canonical digits"):
        runner.fit_members([nr, dataclasses.replace(nr, copies=4)], [str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(runner.RunError, match="one workdir per config"):
        runner.fit_members([a], [str(tmp_path / "a"), str(tmp_path / "b")])
    assert not os.path.exists(tmp_path / "a")


def test_seeds_and_augmentations_flags_train_each_run_in_its_workdir(tmp_path):
    base = [sys.executable, "-m", "experiments.classify", "--model=s2cnn_cls_small", "--source=synthetic", "--L=8",
            "--n_train=64", "--n_holdout=8", "--n_test=16", "--batch_size=8", "--steps=2", "--eval_every=2",
            "--checkpoint_every=2", "--compilation_cache="]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # every level with every seed; {seed} in --workdir, and no {aug}: WORKDIR/aug<level> is added
    r = subprocess.run(base + ["--train_rotation=so3", "--seeds=3,4", "--augmentations=2,fresh",
                               f"--workdir={tmp_path}/run-seed{{seed}}"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for a, copies in (("2", 2), ("fresh", None)):
        for s in (3, 4):
            wd = tmp_path / f"run-seed{s}" / f"aug{a}"
            assert [json.load(open(wd / "config.json"))[k] for k in ("seed", "copies")] == [s, copies]
            assert (wd / "summary.md").exists()
    assert r.stdout.count("accuracy:") == 4
    r = subprocess.run(base + ["--seeds=3,x", f"--workdir={tmp_path}/bad"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=600)
    assert r.returncode == 1 and "--seeds takes comma-separated integers" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(base + ["--seeds=3,4", "--seed=5", f"--workdir={tmp_path}/bad"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 1 and "--seeds replaces --seed" in r.stderr and not os.path.exists(tmp_path / "bad")
