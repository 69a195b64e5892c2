"""Several seeds trained together in one program: runner.fit_members, --seeds."""
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


def test_seeds_trained_together_follow_their_separate_runs(tmp_path):
    cfgs = [dataclasses.replace(TINY_SEG, seed=s) for s in (0, 1)]
    alone = [runner.fit(c, str(tmp_path / f"alone{c.seed}"), progress=False) for c in cfgs]
    # together, two steps per call: each member ends where its separate run ends (measured:
    # parameters within 2e-6 of their largest entry; the bound leaves 50x margin)
    wds = [str(tmp_path / f"together{c.seed}") for c in cfgs]
    together = runner.fit_members(cfgs, wds, progress=False, steps_per_call=2)
    for c, a, t, wd in zip(cfgs, alone, together, wds):
        _assert_close(_leaves(tmp_path / f"alone{c.seed}", 8), _leaves(wd, 8), 1e-4)
        assert t["test"]["miou"] == pytest.approx(a["test"]["miou"], abs=0.01)
        recs = _records(wd)
        assert [r["step"] for r in recs if "holdout" in r] == [4, 8]
        assert [r["info"]["members"] for r in recs if "info" in r] == [{"seeds": [0, 1], "index": c.seed}]
        assert [(r["test_rotate"], r["final_step"]) for r in recs if "test" in r] == [(True, 8), (False, 8)]
    # the two seeds did train differently
    assert not np.allclose(_leaves(wds[0], 8)[0], _leaves(wds[1], 8)[0])

    # seed 1 alone is preempted after step 3; then both train together: seed 0 from step 0 while
    # seed 1 waits, its state untouched, until step 3; the group is preempted after step 5 and
    # the same call resumes it. Both end where their uninterrupted runs end.
    wds = [str(tmp_path / f"resumed{c.seed}") for c in cfgs]
    with pytest.raises(runner.Preempted, match="after step 3 of 8"):
        runner.fit(cfgs[1], wds[1], progress=False, _term_at_step=3)
    with pytest.raises(runner.Preempted, match="after step 5 of 8"):
        runner.fit_members(cfgs, wds, progress=False, _term_at_step=5)
    assert [r["preempted"]["step"] for r in _records(wds[1]) if "preempted" in r] == [3, 5]
    assert [r["preempted"]["step"] for r in _records(wds[0]) if "preempted" in r] == [5]
    runner.fit_members(cfgs, wds, progress=False)
    for c, wd in zip(cfgs, wds):
        _assert_close(_leaves(tmp_path / f"alone{c.seed}", 8), _leaves(wd, 8), 1e-4)
        assert [r["step"] for r in _records(wd) if "holdout" in r] == [4, 8]


def test_a_member_that_stops_early_leaves_the_others_training(tmp_path, monkeypatch):
    cfg = runner.RunConfig(model="s2cnn_cls_small", source="synthetic", L=8, n_train=64, n_holdout=8, n_test=16,
                           batch_size=8, steps=8, eval_every=2, checkpoint_every=4, patience=1, learning_rate=3e-3)
    cfgs = [dataclasses.replace(cfg, seed=s) for s in (10, 20)]
    real = runner.evaluate_params
    calls = {11: 0, 21: 0}

    def scripted(predict, task, variables, tables, images, labels, stream_cfg, seed):
        m = real(predict, task, variables, tables, images, labels, stream_cfg, seed)
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


def test_members_refuse_what_cannot_train_together(tmp_path):
    a = dataclasses.replace(TINY_SEG, seed=0)
    with pytest.raises(runner.RunError, match=r"differ only in their seed; these differ in \['learning_rate'\]"):
        runner.fit_members([a, dataclasses.replace(a, seed=1, learning_rate=1e-2)], [str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(runner.RunError, match="distinct seeds"):
        runner.fit_members([a, a], [str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(runner.RunError, match="one workdir per config"):
        runner.fit_members([a], [str(tmp_path / "a"), str(tmp_path / "b")])
    assert not os.path.exists(tmp_path / "a")


def test_seeds_flag_trains_each_seed_in_its_workdir(tmp_path):
    base = [sys.executable, "-m", "experiments.classify", "--model=s2cnn_cls_small", "--source=synthetic", "--L=8",
            "--n_train=64", "--n_holdout=8", "--n_test=16", "--batch_size=8", "--steps=2", "--eval_every=2",
            "--checkpoint_every=2", "--compilation_cache="]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run(base + ["--seeds=3,4", f"--workdir={tmp_path}/run-seed{{seed}}"], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for s in (3, 4):
        assert json.load(open(tmp_path / f"run-seed{s}" / "config.json"))["seed"] == s
        assert (tmp_path / f"run-seed{s}" / "summary.md").exists()
    assert r.stdout.count("accuracy:") == 2
    r = subprocess.run(base + ["--seeds=3,x", f"--workdir={tmp_path}/bad"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=600)
    assert r.returncode == 1 and "--seeds takes comma-separated integers" in r.stderr and "Traceback" not in r.stderr
