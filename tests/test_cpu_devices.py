"""A CPU split into several JAX devices: which models get it, the split itself, evaluation over
it (a last batch that does not split), and the entry points' --cpu_devices."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from sphere_jax.models import registry

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


def test_the_models_that_gain_get_a_device_per_core_with_at_least_8_examples():
    assert registry.CPU_SPLIT == {"cnn_cls_250k", "cnn_cls_1m", "cnn_cls_4m"}  # the measured gains; the others lose split
    assert registry.cpu_devices("cnn_cls_250k", 32, cores=2) == 2
    assert registry.cpu_devices("cnn_cls_250k", 32, cores=16) == 4  # 8 examples each at least
    assert registry.cpu_devices("cnn_cls_250k", 48, cores=16) == 6
    assert registry.cpu_devices("cnn_cls_250k", 7, cores=2) == 1  # 7 does not split
    assert registry.cpu_devices("cnn_cls_250k", 24, cores=5) == 3  # the largest count <= 24 // 8 dividing 24
    assert registry.cpu_devices("cnn_cls_250k", 8, cores=2) == 1
    assert registry.cpu_devices("cnn_cls_250k", 32, cores=1) == 1
    assert registry.cpu_devices("cnn_cls_4m", 32, cores=2) == 2 == registry.cpu_devices("cnn_cls_1m", 32, cores=2)
    for name in ("cnn_cls_68k", "cnn_218k", "cnn_5_5m", "s2cnn_cls", "s2cnn_cls_deep", "s2cnn_204k"):
        assert registry.cpu_devices(name, 32, cores=2) == 1
    with pytest.raises(ValueError, match="batch_size"):
        registry.cpu_devices("cnn_cls_250k", 0)


_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from sphere_jax import harmonics, runner, train
    from sphere_jax.data import pipeline
    from sphere_jax.models import registry

    n = train.split_cpu(2)
    out = {"split": n, "devices": len(jax.devices()), "again": train.split_cpu(3)}
    if n == 2:
        one, two = train.make_mesh(jax.devices()[:1]), train.make_mesh()
        images, labels = pipeline.synthetic_digits(7, seed=1)
        for name, L in (("cnn_cls_68k", 16), ("s2cnn_seg_small", 6)):
            model, task = registry.make_model(name, L_in=L)
            tables = harmonics.build_tables(model.table_specs())
            x0 = np.zeros((1, 2 * L, 2 * L - 1, 1), np.float32)
            variables = model.init(jax.random.key(0), x0, tables)
            predict = train.make_predict(model)
            cfg = pipeline.StreamConfig(L=L, batch_size=4, rotate=True)  # batches of 4 and 3
            got = {}
            for key, mesh in (("one", one), ("two", two)):
                got[key] = runner.evaluate_params(predict, task, train.replicate(mesh, variables),
                                                  train.replicate(mesh, tables), images, labels, cfg, 3, mesh)
            # the logits themselves, for a batch of 3 padded to 4 over the two devices
            x = next(pipeline.eval_batches(images[4:], labels[4:], cfg, 3))[0]
            ref = np.asarray(predict(variables, tables, x))
            split = runner._predict_over(two, predict, train.replicate(two, variables), train.replicate(two, tables), x)
            got["logits_shapes"] = [list(ref.shape), list(split.shape)]
            got["logits_err"] = float(np.abs(split - ref).max() / np.abs(ref).max())
            out[name] = got
    print(json.dumps(out))
""")


def _script(env_extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **env_extra)
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_split_cpu_and_evaluation_over_two_devices():
    out = _script({})
    # the split is fixed once JAX has used a device: a later request returns what there is
    assert (out["split"], out["devices"], out["again"]) == (2, 2, 2)
    cls, seg = out["cnn_cls_68k"], out["s2cnn_seg_small"]
    # every digit scored once (the last batch of 3 padded to 4, the padding dropped), and the
    # same predictions as on one device
    assert cls["one"]["n"] == cls["two"]["n"] == 7 and seg["one"]["n"] == seg["two"]["n"] == 7
    assert abs(cls["one"]["accuracy"] - cls["two"]["accuracy"]) < 1e-9
    for got in (cls, seg):
        assert got["logits_shapes"][0] == got["logits_shapes"][1] and got["logits_shapes"][0][0] == 3
        assert got["logits_err"] < 1e-5
    for k in ("pixel_accuracy", "miou", "miou_digits"):
        assert abs(seg["one"][k] - seg["two"][k]) < 1e-5, k


def test_an_explicit_xla_device_count_wins():
    out = _script({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"})
    assert (out["split"], out["devices"], out["again"]) == (3, 3, 3)


def test_entry_point_splits_the_cpu_for_the_models_that_gain(tmp_path):
    base = [sys.executable, "-m", "experiments.classify", "--model=cnn_cls_250k", "--source=synthetic", "--L=16",
            "--n_train=64", "--n_holdout=8", "--n_test=8", "--batch_size=16", "--steps=2", "--eval_every=2",
            "--checkpoint_every=2", "--compilation_cache="]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run(base + ["--cpu_devices=0"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 1 and "--cpu_devices must be -1 (auto) or >= 1, got 0" in r.stderr
    r = subprocess.run(base + [f"--workdir={tmp_path}/auto"], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    info = [json.loads(l) for l in open(tmp_path / "auto" / "metrics.jsonl") if '"info"' in l][0]["info"]
    assert info["devices"] == registry.cpu_devices("cnn_cls_250k", 16, cores=len(os.sched_getaffinity(0)))
    assert info.get("data_parallel") == ("split" if info["devices"] > 1 else None)
    r = subprocess.run(base + ["--cpu_devices=2", "--steps_per_call=2"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=600)
    assert r.returncode == 1 and "--cpu_devices=2 trains one step per call" in r.stderr
    # several steps per call: one device (a program over several would need collectives)
    r = subprocess.run(base + [f"--workdir={tmp_path}/k2", "--steps_per_call=2"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    info = [json.loads(l) for l in open(tmp_path / "k2" / "metrics.jsonl") if '"info"' in l][0]["info"]
    assert info["devices"] == 1


def test_runs_on_a_split_cpu_train_without_collectives_and_resume(tmp_path):
    """K = 1 on two CPU devices trains with train.make_split_train_step: the trajectory of one
    device (float round-off apart); a kill and a SIGTERM, each resumed, end where the
    uninterrupted run ends."""
    import numpy as np

    import test_runner as tr

    cfg = tr.TINY_SEG
    r1 = tr._run(tmp_path / "one", cfg)
    r2 = tr._run(tmp_path / "two", cfg, devices=2)
    r3 = tr._run(tmp_path / "killed", cfg, devices=2, kill=4)
    assert r1.returncode == 0 and r2.returncode == 0 and r3.returncode == -9, (r1.stderr[-1500:], r2.stderr[-1500:])
    r3 = tr._run(tmp_path / "killed", cfg, devices=2)
    assert r3.returncode == 0, r3.stderr[-1500:]
    r4 = tr._run(tmp_path / "termed", cfg, devices=2, term=5)  # a preemption between checkpoints
    assert r4.returncode == 143 and "stopped by SIGTERM after step 5 of 8" in r4.stdout, r4.stderr[-1500:]
    r4 = tr._run(tmp_path / "termed", cfg, devices=2)
    assert r4.returncode == 0, r4.stderr[-1500:]
    info = [r["info"] for r in tr._records(tmp_path / "two") if "info" in r][0]
    assert info["devices"] == 2 and info["data_parallel"] == "split"
    assert "data_parallel" not in [r["info"] for r in tr._records(tmp_path / "one") if "info" in r][0]
    l1 = [rec["train_loss"] for rec in tr._records(tmp_path / "one") if "train_loss" in rec]
    l2 = [rec["train_loss"] for rec in tr._records(tmp_path / "two") if "train_loss" in rec]
    assert len(l1) == 2
    np.testing.assert_allclose(l1, l2, rtol=1e-4)
    two = tr._params(tmp_path / "two", 8)
    np.testing.assert_allclose(tr._params(tmp_path / "one", 8), two, atol=1e-4)
    for resumed in ("killed", "termed"):  # the same programs: bitwise
        assert np.array_equal(tr._params(tmp_path / resumed, 8), two), resumed
