"""The sweep launcher: grid expansion, skip / resume, SLURM scripts, aggregation (no training)."""
import dataclasses
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from launch import aggregate, grid, pack, run_grid, slurm
from sphere_jax.runner import RunConfig

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)


# --------------------------------------------------------------------------- helpers

SEG_METRICS = dict(pixel_accuracy=0.9, per_class_iou=[0.9] + [0.1] * 10, miou=0.2, miou_digits=0.1,
                   area_miou=0.21, area_miou_digits=0.11, n=10)


def fake_workdir(workdir, cfg: RunConfig, score: float | None, task: str, seconds: float = 10.0, steps: int = 100):
    """A run's workdir as the runner leaves it: config.json, training records, and (if ``score`` is
    not None) a final test record with that accuracy / mIoU."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1, sort_keys=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        hold = {"accuracy": 0.5, "n": 10} if task == "classify" else dict(SEG_METRICS)
        f.write(json.dumps({"step": steps, "epoch": 0, "train_loss": 1.0, "holdout": hold, "seconds": seconds}) + "\n")
        if score is not None:
            m = {"accuracy": score, "n": 10} if task == "classify" else dict(SEG_METRICS, miou=score)
            f.write(json.dumps({"test": m, "checkpoint": "best", "checkpoint_step": steps,
                                "test_rotate": cfg.test_rotate, "stopped_early": False, "final_step": steps}) + "\n")


class FakeExecutor:
    """Stands in for training: writes a finished workdir, or fails / is interrupted at chosen calls."""

    def __init__(self, fail_at=(), interrupt_at=None):
        self.calls = []
        self.envs = []
        self.fail_at, self.interrupt_at = set(fail_at), interrupt_at

    def __call__(self, run, root, env):
        self.calls.append(run.index)
        self.envs.append(dict(env))
        n = len(self.calls)
        if n == self.interrupt_at:
            fake_workdir(run.workdir(root), run.config, None, run.task)  # started, then killed
            raise KeyboardInterrupt
        if n in self.fail_at:
            fake_workdir(run.workdir(root), run.config, None, run.task)
            return 1
        fake_workdir(run.workdir(root), run.config, 0.5 + 0.01 * run.index, run.task)
        return 0


SMALL = [
    grid.Block("classify", ("s2cnn_cls",), (1,), "NR", "R").with_overrides(L=10, steps=5),
    grid.Block("classify", ("cnn_cls_68k", "cnn_cls_250k"), (1, 4, "fresh"), "R", "R", seeds=(0, 1)).with_overrides(L=15, steps=5),
    grid.Block("segment", ("cnn_218k",), (2,), "R", "R", data=(("mnist", 1), ("fashion_mnist", 3))).with_overrides(L=12),
]


# --------------------------------------------------------------------------- grid


def test_grid_expands_to_the_expected_runs():
    runs = grid.expand(SMALL)
    assert len(runs) == 1 + 2 * 3 * 2 + 2
    assert [r.index for r in runs] == list(range(len(runs)))
    assert len({r.name for r in runs}) == len(runs)
    s2 = runs[0]
    assert s2.name == "classify/mnist-d1-L10/s2cnn_cls/NR-R-aug1-seed0"
    assert s2.task == "classify" and not s2.config.train_rotate and s2.config.test_rotate and s2.config.steps == 5
    # order: model, augmentation, seed
    assert [(r.config.model, grid.aug_label(r.config.copies), r.config.seed) for r in runs[1:5]] == [
        ("cnn_cls_68k", "1", 0), ("cnn_cls_68k", "1", 1), ("cnn_cls_68k", "4", 0), ("cnn_cls_68k", "4", 1)]
    fresh = runs[6]
    assert fresh.config.copies is None and fresh.augmentation == "fresh"
    assert fresh.name == "classify/mnist-d1-L15/cnn_cls_68k/R-R-augfresh-seed1"
    seg = runs[-1]
    assert seg.name == "segment/fashion_mnist-d3-L12/cnn_218k/R-R-aug2-seed0"
    assert (seg.config.dataset, seg.config.digits_per_image, seg.config.copies, seg.config.L) == ("fashion_mnist", 3, 2, 12)
    # the command trains this run in its workdir
    argv = seg.argv("/sweep", python="py")
    assert argv[:3] == ["py", "-m", "experiments.segment"]
    assert "--augmentation=2" in argv and "--train_rotation=so3" in argv and "--digits_per_image=3" in argv
    assert argv[-1] == "--workdir=/sweep/segment/fashion_mnist-d3-L12/cnn_218k/R-R-aug2-seed0"
    assert grid.expand(SMALL) == runs  # deterministic


def test_grid_errors():
    with pytest.raises(grid.GridError, match="take no augmentation"):
        grid.expand([grid.Block("segment", ("s2cnn_204k",), (1, 4), "NR", "R")])
    with pytest.raises(grid.GridError, match="is a segment model"):
        grid.expand([grid.Block("classify", ("cnn_218k",))])
    with pytest.raises(grid.GridError, match="unknown model"):
        grid.expand([grid.Block("classify", ("nope",))])
    with pytest.raises(grid.GridError, match="share the workdir"):
        grid.expand([grid.Block("classify", ("cnn_cls_68k",)), grid.Block("classify", ("cnn_cls_68k",))])
    with pytest.raises(grid.GridError, match="positive integer"):
        grid.expand([grid.Block("classify", ("cnn_cls_68k",), (0,))])
    with pytest.raises(grid.GridError, match="unknown RunConfig"):
        grid.expand([grid.Block("classify", ("cnn_cls_68k",)).with_overrides(stepz=3)])


def test_named_grids():
    seg = grid.get_grid("paper_segmentation")
    assert len(seg) == 53
    # the order: the headline pair first, then the other CNN runs, seeds, FashionMNIST, scenes
    assert [(r.config.model, r.augmentation, r.config.seed) for r in seg[:3]] == [
        ("s2cnn_204k", "1", 0), ("cnn_5_5m", "fresh", 0), ("cnn_5_5m", "1", 0)]
    s2 = [r for r in seg if r.config.model == "s2cnn_204k"]
    assert len(s2) == 8 and all(r.config.test_rotate and r.config.L == 50 for r in s2)
    assert sum(not r.config.train_rotate for r in s2) == 5  # NR: 3 seeds on MNIST, FashionMNIST, scenes
    assert all(r.config.train_rotate and r.config.test_rotate for r in seg if r.config.model.startswith("cnn"))
    scenes = [r for r in seg if r.config.digits_per_image == 3]
    assert len(scenes) == 6 and all(r.config.digit_scale == 0.75 and r.config.min_separation_deg == 90 for r in scenes)
    assert {r.config.dataset for r in seg} == {"mnist", "fashion_mnist"}
    cls = grid.get_grid("paper_classification")
    assert len(cls) == 98 and {r.config.dataset for r in cls} == {"mnist", "fashion_mnist"}
    assert {r.config.model for r in cls} == {"s2cnn_cls", "s2cnn_cls_deep", "cnn_cls_68k", "cnn_cls_250k",
                                             "cnn_cls_1m", "cnn_cls_4m"}
    assert all(r.task == "classify" and r.config.L == 30 and r.config.n_test == 0 for r in cls)
    assert [r.config.dataset for r in cls] == ["mnist"] * 49 + ["fashion_mnist"] * 49
    # 3 seeds for every S2CNN row and for the largest CNN at each augmentation level
    for model, train in (("s2cnn_cls", False), ("s2cnn_cls", True), ("s2cnn_cls_deep", False), ("cnn_cls_4m", True)):
        seeds = sorted(r.config.seed for r in cls[:49] if r.config.model == model and r.config.train_rotate == train
                       and (r.augmentation in ("1", "fresh") if model.startswith("s2") else r.augmentation == "2"))
        assert seeds == [0, 1, 2], (model, train, seeds)
    # the deep S2CNN trains the reference's 20 epochs (no early stop); everything else patience 4;
    # run indices are the ones results and window scripts name (1 and 3: the deep S2CNN, seed 0)
    assert {r.index for r in cls if r.config.patience == 0} == {
        r.index for r in cls if r.config.model == "s2cnn_cls_deep"}
    assert {r.config.patience for r in cls if r.config.model != "s2cnn_cls_deep"} == {4}
    named = {  # the runs that results/ and launch/gpu_window_seg.sh name by index
        1: "mnist-d1-L30/s2cnn_cls_deep/NR-R-aug1-seed0", 3: "mnist-d1-L30/s2cnn_cls_deep/R-R-augfresh-seed0",
        4: "mnist-d1-L30/cnn_cls_68k/NR-NR-aug1-seed0", 18: "mnist-d1-L30/cnn_cls_1m/R-R-aug2-seed0",
        21: "mnist-d1-L30/cnn_cls_1m/R-R-aug16-seed0", 24: "mnist-d1-L30/cnn_cls_4m/R-R-aug2-seed0",
        28: "mnist-d1-L30/cnn_cls_4m/R-R-augfresh-seed0", 31: "mnist-d1-L30/s2cnn_cls_deep/NR-R-aug1-seed1",
        32: "mnist-d1-L30/s2cnn_cls_deep/NR-R-aug1-seed2", 33: "mnist-d1-L30/s2cnn_cls/R-R-augfresh-seed1",
        35: "mnist-d1-L30/s2cnn_cls_deep/R-R-augfresh-seed1", 36: "mnist-d1-L30/s2cnn_cls_deep/R-R-augfresh-seed2",
        50: "fashion_mnist-d1-L30/s2cnn_cls_deep/NR-R-aug1-seed0",
        52: "fashion_mnist-d1-L30/s2cnn_cls_deep/R-R-augfresh-seed0",
        61: "fashion_mnist-d1-L30/cnn_cls_250k/R-R-aug2-seed0", 62: "fashion_mnist-d1-L30/cnn_cls_250k/R-R-aug4-seed0",
    }
    assert {i: cls[i].name for i in named} == {i: "classify/" + n for i, n in named.items()}
    first = grid.get_grid("gpu_classification_first")
    assert {r.name for r in first} <= {r.name for r in cls}  # the same runs, so a window's results count
    red = grid.get_grid("reduced_cpu")
    assert [(r.task, r.config.model, r.augmentation) for r in red] == [
        ("classify", "s2cnn_cls", "1"),
        ("classify", "cnn_cls_68k", "1"), ("classify", "cnn_cls_68k", "4"), ("classify", "cnn_cls_68k", "fresh"),
        ("classify", "cnn_cls_250k", "1"), ("classify", "cnn_cls_250k", "4"), ("classify", "cnn_cls_250k", "fresh"),
        ("segment", "s2cnn_204k", "1"),
        ("segment", "cnn_218k", "1"), ("segment", "cnn_218k", "4"), ("segment", "cnn_218k", "fresh"),
    ]
    assert all(r.config.source == "tfds" and r.config.dataset == "mnist" and r.config.L <= 16 for r in red)
    with pytest.raises(grid.GridError, match="unknown grid"):
        grid.get_grid("nope")


@pytest.mark.parametrize("task", ["classify", "segment"])
def test_run_flags_reproduce_the_config(task):
    """The flags a run is launched with give back exactly its RunConfig (else the runner would see
    a conflict in the workdir)."""
    runs = [r for r in grid.expand(SMALL) + grid.get_grid("reduced_cpu") if r.task == task]
    runs += grid.with_overrides(runs[:1], {"test_every_eval": True})
    code = (
        "import sys, json, dataclasses\n"
        f"import experiments.{task}\n"
        "from experiments import common\n"
        "runs = json.loads(sys.argv[1])\n"
        "out = []\n"
        "for argv in runs:\n"
        "    common.FLAGS.unparse_flags()\n"
        "    common.FLAGS(['x'] + argv)\n"
        "    out.append(dataclasses.asdict(common.config()))\n"
        "print(json.dumps(out))\n"
    )
    argvs = [r.argv("/w")[3:-1] for r in runs]
    p = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got == [dataclasses.asdict(r.config) for r in runs]


# --------------------------------------------------------------------------- runner


def test_runner_skips_finished_runs_and_reruns_unfinished(tmp_path):
    root = str(tmp_path)
    runs = grid.expand(SMALL)
    fake_workdir(runs[0].workdir(root), runs[0].config, 0.9, "classify")  # finished
    fake_workdir(runs[1].workdir(root), runs[1].config, None, "classify")  # started, not finished
    with open(os.path.join(runs[1].workdir(root), "metrics.jsonl"), "a") as f:  # an interim evaluation of it
        f.write(json.dumps({"test": {"accuracy": 0.3, "n": 10}, "checkpoint": "best", "checkpoint_step": 100,
                            "test_rotate": runs[1].config.test_rotate}) + "\n")
    # a test record of another rotation (extra evaluation) does not finish the run
    fake_workdir(runs[2].workdir(root), runs[2].config, None, "classify")
    with open(os.path.join(runs[2].workdir(root), "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"test": {"accuracy": 0.1, "n": 1}, "test_rotate": False}) + "\n")
        f.write('{"test": {"accu')  # a line cut short by a kill
    # a workdir holding another configuration is reported, never touched
    other = dataclasses.replace(runs[3].config, steps=999)
    fake_workdir(runs[3].workdir(root), other, 0.9, "classify")
    assert [run_grid.run_state(r, root) for r in runs[:5]] == ["done", "partial", "partial", "conflict", "new"]
    ex = FakeExecutor()
    res = run_grid.execute(runs, root, ex, devices=[], log=lambda s: None)
    assert ex.calls == [r.index for r in runs if r.index not in (0, 3)]
    assert res.skipped == [0] and res.conflicts == [3] and res.done == ex.calls and not res.failed
    assert not res.ok  # the conflict needs a human
    assert json.load(open(os.path.join(runs[3].workdir(root), "config.json")))["steps"] == 999
    # everything finished: a second sweep runs nothing
    ex2 = FakeExecutor()
    res2 = run_grid.execute(runs, root, ex2, devices=[], log=lambda s: None)
    assert ex2.calls == [] and len(res2.skipped) == len(runs) - 1
    events = [json.loads(l) for l in open(os.path.join(root, "sweep.jsonl"))]
    assert sum(e["event"] == "end" for e in events) == len(ex.calls)


def test_interrupted_sweep_resumes(tmp_path):
    root = str(tmp_path)
    runs = grid.expand(SMALL)
    ex = FakeExecutor(interrupt_at=2)  # Ctrl-C / SIGTERM while the 2nd run trains
    res = run_grid.execute(runs, root, ex, devices=[], log=lambda s: None)
    assert res.interrupted and ex.calls == [0, 1] and res.done == [0]
    assert [run_grid.run_state(r, root) for r in runs[:3]] == ["done", "partial", "new"]
    ex2 = FakeExecutor()
    res2 = run_grid.execute(runs, root, ex2, devices=[], log=lambda s: None)
    assert ex2.calls == list(range(1, len(runs))) and res2.skipped == [0] and res2.ok


def test_failed_run_is_retried_on_restart(tmp_path):
    root = str(tmp_path)
    runs = grid.expand(SMALL)
    ex = FakeExecutor(fail_at={2})  # the 2nd run exits with an error; the sweep goes on
    res = run_grid.execute(runs, root, ex, devices=[], log=lambda s: None)
    assert ex.calls == list(range(len(runs))) and res.failed == [1] and not res.ok
    ex2 = FakeExecutor()
    res2 = run_grid.execute(runs, root, ex2, devices=[], log=lambda s: None)
    assert ex2.calls == [1] and res2.done == [1] and res2.ok
    # --stop_on_failure stops dispatching after the failure
    root3 = str(tmp_path / "b")
    ex3 = FakeExecutor(fail_at={2})
    res3 = run_grid.execute(runs, root3, ex3, devices=[], stop_on_failure=True, log=lambda s: None)
    assert ex3.calls == [0, 1] and res3.failed == [1]


def test_one_run_per_gpu(tmp_path):
    runs = grid.expand(SMALL)
    ex = FakeExecutor()
    res = run_grid.execute(runs, str(tmp_path), ex, devices=["0", "1", "2"], log=lambda s: None)
    assert sorted(ex.calls) == list(range(len(runs))) and res.ok
    used = [e["CUDA_VISIBLE_DEVICES"] for e in ex.envs]
    assert set(used) <= {"0", "1", "2"}
    assert all(len(e) == 1 for e in ex.envs)


def test_gpus_of_a_single_run(tmp_path):
    """Fewer runs than GPUs (--index, multi-host): the run gets a power-of-two group of them."""
    runs = grid.expand(SMALL)[:1]
    ex = FakeExecutor()
    run_grid.execute(runs, str(tmp_path / "a"), ex, devices=["0", "1", "2", "3"], log=lambda s: None)
    assert ex.envs == [{"CUDA_VISIBLE_DEVICES": "0,1,2,3"}]
    assert run_grid.device_slots(["0", "1", "2"], 1) == ["0,1"]
    assert run_grid.device_slots(["0", "1", "2", "3", "4", "5", "6", "7"], 3) == ["0,1", "2,3", "4,5"]
    assert run_grid.device_slots(["0"], 2) == ["0", "0"]


def test_subprocess_executor_and_index(tmp_path, monkeypatch):
    """The real executor runs the run's command (a stand-in python here) with the workdir's log."""
    stub = tmp_path / "stub_python"
    stub.write_text("#!/bin/sh\necho \"ran $@\"\nexit 3\n")
    stub.chmod(0o755)
    runs = grid.get_grid("reduced_cpu")
    root = str(tmp_path / "sweep")
    rc = run_grid.main(["--grid=reduced_cpu", f"--root={root}", "--index=2", f"--python={stub}"])
    assert rc == 1  # the stub exits 3: a failure
    log = open(os.path.join(runs[2].workdir(root), "run.log")).read()
    assert "ran -m experiments.classify" in log and "--augmentation=4" in log
    assert os.path.exists(os.path.join(root, "grid_reduced_cpu.json"))
    assert run_grid.main(["--grid=reduced_cpu", f"--root={root}", "--index=11"]) == 2


def test_only_keeps_the_given_order(tmp_path, capsys):
    """``--only=5,0,3`` runs 5, then 0, then 3 (a window's priorities), not the grid's order."""
    root = str(tmp_path / "sweep")
    assert run_grid.main(["--grid=reduced_cpu", f"--root={root}", "--only=5,0,3,0", "--list"]) == 0
    listed = [int(line.split()[0]) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert listed == [5, 0, 3]
    assert run_grid.main(["--grid=reduced_cpu", f"--root={root}", "--only=1,99", "--list"]) == 2
    assert "[99]" in capsys.readouterr().err
    assert run_grid.main(["--grid=reduced_cpu", f"--root={root}", "--only=,", "--list"]) == 2
    assert "names no run" in capsys.readouterr().err
    assert run_grid.main(["--grid=reduced_cpu", f"--root={root}", "--index=2", "--only=3", "--list"]) == 2
    assert "the run --index=2 selects: [3]" in capsys.readouterr().err
    assert run_grid.main(["--grid=reduced_cpu", f"--root={root}", "--index=2", "--only=2", "--list"]) == 0
    assert capsys.readouterr().out.split()[0] == "2"


# --------------------------------------------------------------------------- SLURM


def test_slurm_scripts(tmp_path, capsys):
    root = str(tmp_path / "sweep")
    n = len(grid.get_grid("reduced_cpu"))
    assert slurm.main(["--grid=reduced_cpu", f"--root={root}", "--partition=gpu"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("#!/bin/bash\n")
    assert f"#SBATCH --array=0-{n - 1}\n" in text
    assert "#SBATCH --partition=gpu\n" in text and "#SBATCH --gpus-per-task=1\n" in text
    assert f"python -m launch.run_grid --grid=reduced_cpu --root={root} --index=$SLURM_ARRAY_TASK_ID\n" in text
    assert f"cd {ROOT}\n" in text and os.path.isdir(os.path.join(root, "slurm"))
    out = tmp_path / "multi.sh"
    assert slurm.main(["--grid=paper_segmentation", f"--root={root}", "--multi_host", "--nodes=4",
                       "--max_parallel=2", f"--out={out}"]) == 0
    text = out.read_text()
    m = len(grid.get_grid("paper_segmentation"))
    assert f"#SBATCH --array=0-{m - 1}%2\n" in text and "#SBATCH --nodes=4\n" in text
    assert "srun --ntasks=4 --ntasks-per-node=1" in text
    for flag in ("--index=$SLURM_ARRAY_TASK_ID", "--coordinator_address=$COORD:$PORT",
                 "--num_processes=$SLURM_NTASKS", "--process_id=$SLURM_PROCID"):
        assert flag in text
    assert 'COORD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in text
    assert "export COORD PORT" in text
    p = subprocess.run(["bash", "-n", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_multi_host_flags_are_passed_to_the_run(tmp_path):
    stub = tmp_path / "stub_python"
    stub.write_text("#!/bin/sh\necho \"ran $@\"\n")
    stub.chmod(0o755)
    root = str(tmp_path / "sweep")
    run_grid.main(["--grid=reduced_cpu", f"--root={root}", "--index=0", f"--python={stub}",
                   "--coordinator_address=h:1", "--num_processes=2", "--process_id=1"])
    run = grid.get_grid("reduced_cpu")[0]
    log = open(os.path.join(run.workdir(root), "run.log")).read()
    assert "--coordinator_address=h:1 --num_processes=2 --process_id=1" in log


# --------------------------------------------------------------------------- aggregation


def _hand_made_sweep(root):
    base = RunConfig(source="tfds", dataset="mnist", L=12)
    seg = dict(L=12)
    cls = [
        # (model, train, test, copies, seed, accuracy)
        ("s2cnn_cls", False, True, 1, 0, 0.91),
        ("cnn_cls_68k", True, True, 1, 0, 0.40),
        ("cnn_cls_68k", True, True, 1, 1, 0.50),
        ("cnn_cls_68k", True, True, 4, 0, 0.70),
        ("cnn_cls_68k", True, True, None, 0, 0.85),
        ("cnn_cls_250k", True, True, 1, 0, 0.45),
        ("cnn_cls_250k", True, True, None, 0, 0.93),
    ]
    for model, tr, te, copies, seed, acc in cls:
        cfg = dataclasses.replace(base, model=model, train_rotate=tr, test_rotate=te, copies=copies, seed=seed)
        fake_workdir(os.path.join(root, grid.run_name("classify", cfg)), cfg, acc, "classify", seconds=20.0, steps=100)
    for model, tr, copies, miou in [("s2cnn_204k", False, 1, 0.61), ("cnn_218k", True, 1, 0.30), ("cnn_218k", True, 4, 0.42)]:
        cfg = dataclasses.replace(base, model=model, train_rotate=tr, copies=copies, **seg)
        fake_workdir(os.path.join(root, grid.run_name("segment", cfg)), cfg, miou, "segment")
    # unfinished: no test record
    cfg = dataclasses.replace(base, model="cnn_218k", train_rotate=True, copies=None)
    fake_workdir(os.path.join(root, grid.run_name("segment", cfg)), cfg, None, "segment")


def test_aggregation_of_hand_made_workdirs(tmp_path):
    root = str(tmp_path / "sweep")
    _hand_made_sweep(root)
    bench = tmp_path / "benchmark.json"
    bench.write_text(json.dumps([
        {"model": "s2cnn_cls", "L": 12, "params": 29390, "infer_s": {"1": 0.01, "8": 0.05}, "train_batch": 16,
         "train_step_s": 0.2, "device": "cpu"},
        {"model": "cnn_cls_68k", "L": 12, "params": 52746, "infer_s": {"1": 0.001}, "train_batch": 16,
         "train_step_s": 0.01, "device": "cpu"},
        {"model": "cnn_218k", "L": 12, "error": ["boom"]},
    ]))
    s = aggregate.aggregate(root, benchmark=str(bench))
    md = open(os.path.join(root, "aggregate", "results.md")).read()
    expected_cls = (
        "| model | aug 1 | aug 4 | aug fresh |\n"
        "|---|---|---|---|\n"
        "| s2cnn_cls (NR -> R) | 91.00 | - | - |\n"
        "| cnn_cls_68k (R -> R) | 45.00 ± 7.07 (2) | 70.00 | 85.00 |\n"
        "| cnn_cls_250k (R -> R) | 45.00 | - | 93.00 |\n"
    )
    expected_seg = (
        "| model | aug 1 | aug 4 |\n"
        "|---|---|---|\n"
        "| s2cnn_204k (NR -> R) | 0.6100 | - |\n"
        "| cnn_218k (R -> R) | 0.3000 | 0.4200 |\n"
    )
    assert expected_cls in md and expected_seg in md
    assert "| classify/mnist-d1-L12/s2cnn_cls/NR-R-aug1-seed0 | rotated (R) | 91.00 |" in md  # every run: its test digits
    assert "## classification, mnist, 1 digit per image, L=12" in md
    assert "## segmentation, mnist, 1 digit per image, L=12" in md
    assert "segment/mnist-d1-L12/cnn_218k/R-R-augfresh-seed0" in s["unfinished"] and "## Unfinished" in md
    assert len(s["runs"]) == 10
    t = {(x["group"]["task"]): x for x in s["tables"]}
    rows = {r["model"]: r for r in t["classify"]["rows"]}
    assert rows["cnn_cls_68k"]["cells"]["1"] == pytest.approx(0.45) and rows["cnn_cls_68k"]["n"]["1"] == 2
    assert t["segment"]["columns"] == ["1", "4"]
    names = sorted(os.path.basename(f) for f in s["figures"])
    assert names == ["score_vs_aug_classify_mnist_d1_L12.png", "score_vs_aug_segment_mnist_d1_L12.png",
                     "tradeoff_classify_mnist_d1_L12.png"]  # no benchmark row for the segmenters
    for f in s["figures"]:
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # without a benchmark the trade-off uses the runs' own seconds per step
    s2 = aggregate.aggregate(root, out=str(tmp_path / "agg2"))
    assert "tradeoff_segment_mnist_d1_L12.png" in [os.path.basename(f) for f in s2["figures"]]
    r0 = [r for r in s2["runs"] if r["model"] == "s2cnn_cls"][0]
    assert r0["step_seconds"] == pytest.approx(0.2) and r0["aug"] == "1" and r0["train"] == "NR"


def test_aggregate_command_line(tmp_path):
    root = str(tmp_path / "sweep")
    _hand_made_sweep(root)
    code = ("import sys\nfrom launch import aggregate\nrc = aggregate.main(sys.argv[1:])\n"
            "assert 'jax' not in sys.modules, 'aggregation must not need jax'\nsys.exit(rc)\n")
    p = subprocess.run([sys.executable, "-c", code, f"--root={root}", f"--out={tmp_path / 'o'}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| cnn_218k (R -> R) | 0.3000 | 0.4200 |" in p.stdout
    assert os.path.exists(tmp_path / "o" / "results.json")


def test_sigterm_stops_the_sweep_and_its_run(tmp_path):
    """SIGTERM (SLURM preemption, kill) ends the sweep with status 130 and takes the training
    process down with it; the run is left unfinished, to resume at the next start."""
    import signal
    import time

    pidfile = tmp_path / "child.pid"
    stub = tmp_path / "stub_python"
    stub.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    stub.chmod(0o755)
    root = str(tmp_path / "sweep")
    p = subprocess.Popen([sys.executable, "-m", "launch.run_grid", "--grid=reduced_cpu", f"--root={root}",
                          f"--python={stub}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            time.sleep(0.05)
        child = int(pidfile.read_text())
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, out
    assert "INTERRUPTED" in out
    for _ in range(100):  # the child is gone (reaped by the sweep)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the training process outlived the sweep")
    run = grid.get_grid("reduced_cpu")[0]
    assert run_grid.run_state(run, root) == "new"  # the stub wrote nothing: not finished


def test_pack_keeps_metadata_and_the_checkpoints_asked_for(tmp_path):
    import tarfile

    sweep, out = tmp_path / "sweep", tmp_path / "out"
    s2 = sweep / "segment/mnist-d1-L8/s2cnn_204k/NR-R-aug1-seed0"
    big = sweep / "segment/mnist-d1-L8/cnn_5_5m/R-R-augfresh-seed0"
    for d, params in ((s2, 204_073), (big, 5_519_335)):
        fake_workdir(str(d), RunConfig(), 0.5, "segment")
        with open(d / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"info": {"params": params}}) + "\n")
        for sub in ("best/10", "checkpoints/12"):
            os.makedirs(d / sub)
            (d / sub / "weights").write_text("w")
    (s2 / "scratch.bin").write_text("not packed")
    names = lambda p: sorted(tarfile.open(p).getnames())
    assert pack.main(["--sweep", str(sweep), "--out", str(out), "--checkpoints", "state"]) == 0
    meta = names(out / "sweep_meta.tgz")
    assert "segment/mnist-d1-L8/s2cnn_204k/NR-R-aug1-seed0/config.json" in meta
    assert not any("scratch" in n or "weights" in n for n in meta)
    state = names(out / "sweep_state.tgz")
    # a finished S2CNN run: its best checkpoint only (to ship or evaluate); no CNN run
    assert any(n.endswith("s2cnn_204k/NR-R-aug1-seed0/best/10/weights") for n in state)
    assert not any("NR-R-aug1-seed0/checkpoints" in n for n in state)
    assert not any("cnn_5_5m" in n for n in state)
    # an unfinished one: best and latest (to resume it), packed first, within the size budget
    cut = sweep / "segment/mnist-d1-L8/s2cnn_204k/R-R-augfresh-seed0"
    fake_workdir(str(cut), RunConfig(), None, "segment")
    for sub in ("best/5", "checkpoints/6"):
        os.makedirs(cut / sub)
        (cut / sub / "weights").write_text("w" * 1000)
    assert pack.main(["--sweep", str(sweep), "--out", str(out), "--checkpoints", "state"]) == 0
    state = names(out / "sweep_state.tgz")
    assert any(n.endswith("R-R-augfresh-seed0/checkpoints/6/weights") for n in state)
    assert any(n.endswith("NR-R-aug1-seed0/best/10/weights") for n in state)
    # the cut run alone, with its metadata: one archive to resume it from on a new machine
    assert pack.main(["--sweep", str(sweep), "--out", str(out), "--checkpoints", "inflight"]) == 0
    cut_files = {n.split("R-R-augfresh-seed0/")[1] for n in names(out / "inflight.tgz") if "/weights" in n or "." in n}
    assert cut_files == {"config.json", "metrics.jsonl", "best/5/weights", "checkpoints/6/weights"}
    assert not any("NR-R-aug1-seed0" in n or "cnn_5_5m" in n for n in names(out / "inflight.tgz"))
    fake_workdir(str(sweep / "segment/mnist-d1-L8/s2cnn_204k/R-R-augfresh-seed1"), RunConfig(), None, "segment")
    pack.main(["--sweep", str(sweep), "--out", str(out), "--checkpoints", "inflight"])
    assert not any("seed1" in n for n in names(out / "inflight.tgz"))  # no checkpoint yet: nothing to resume
    pack.pack_state(str(sweep), str(out), budget_bytes=2000)  # room for the cut run (2,000 bytes) alone
    state = names(out / "sweep_state.tgz")
    assert any(n.endswith("R-R-augfresh-seed0/best/5/weights") for n in state)
    assert not any("NR-R-aug1-seed0" in n for n in state)
    assert pack.main(["--sweep", str(sweep), "--out", str(out), "--checkpoints", "best"]) == 0
    best = names(out / "sweep_best.tgz")
    assert any(n.endswith("s2cnn_204k/NR-R-aug1-seed0/best/10/weights") for n in best)
    assert not any("cnn_5_5m" in n or "checkpoints" in n for n in best)  # 5.5M parameters: too big to ship
    assert pack.main(["--sweep", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_pack_cache_keeps_the_newest_compiled_programs_within_its_budget(tmp_path):
    """launch.pack --cache: the compilation cache's files, newest first, under the size budget
    (a file too big for what is left is skipped, an older smaller one still goes in); paths
    relative to the cache, so the archive unpacks into .whl/xla; nothing written for an empty
    cache."""
    import tarfile

    cache, out = tmp_path / "xla", tmp_path / "out"
    os.makedirs(cache / "xla_gpu_per_fusion_autotune_cache_dir")
    files = {"jit_step-a-cache": 600, "jit_predict-b-cache": 500, "jit_init-c-cache": 300,
             "xla_gpu_per_fusion_autotune_cache_dir/d": 100}
    for age, (name, size) in enumerate(files.items()):  # the first is the newest
        (cache / name).write_bytes(b"x" * size)
        os.utime(cache / name, (1e9 - age * 100, 1e9 - age * 100))
    path = pack.pack_cache(str(cache), str(out), budget_bytes=1000)
    assert sorted(tarfile.open(path).getnames()) == ["jit_init-c-cache", "jit_step-a-cache",
                                                     "xla_gpu_per_fusion_autotune_cache_dir/d"]
    path = pack.pack_cache(str(cache), str(out), budget_bytes=1500)
    assert sorted(tarfile.open(path).getnames()) == sorted(files)
    os.remove(path)
    assert pack.main(["--sweep", str(tmp_path), "--out", str(out), "--cache", str(cache)]) == 0
    assert len(tarfile.open(out / "xla_cache.tgz").getnames()) == 4
    os.remove(out / "xla_cache.tgz")
    os.makedirs(tmp_path / "empty")
    assert pack.pack_cache(str(tmp_path / "empty"), str(out)) is None
    assert not (out / "xla_cache.tgz").exists()


def test_share_check_runs_processes_together_and_sums_their_rates(capsys):
    """launch.share_check: K workers released at once; the total is the sum of their rates, the
    K=1 row is the reference (vs_one 1.0), a members row counts member-steps; a worker that fails
    gives an error row, bad --procs a usage error."""
    from launch import share_check

    assert share_check.main(["--model=cnn_cls_68k", "--L=15", "--procs=1,2", "--members=2", "--seconds=0.3"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [(r["procs"], r["members"]) for r in rows] == [(1, 0), (2, 0), (1, 2)]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert len(r["per_proc_steps_per_s"]) == r["procs"]
        assert min(r["per_proc_steps_per_s"]) > 0
        assert r["steps_per_s"] == pytest.approx(sum(r["per_proc_steps_per_s"]), abs=0.02)
        assert r["device"] == "cpu"
    assert rows[0]["vs_one"] == 1.0
    for r in rows[1:]:
        assert r["vs_one"] == pytest.approx(r["steps_per_s"] / rows[0]["steps_per_s"], abs=1e-3)
    bad = share_check.measure("no_such_model", 15, 4, 1, 0.1)
    assert "no_such_model" in bad["error"] and "steps_per_s" not in bad
    with pytest.raises(SystemExit):
        share_check.main(["--procs=0"])


def test_tradeoff_timings_come_from_one_device():
    """Run-timed trade-off figure: the device with most timed runs of the group, so that CPU
    runs of a grid never share an axis with its GPU runs."""
    g = ("classify", "mnist", 1, 30)
    base = dict(task="classify", dataset="mnist", digits_per_image=1, L=30)
    runs = ([dict(base, device="H200", step_seconds=0.004)] * 3 + [dict(base, device="cpu", step_seconds=0.01)] * 2
            + [dict(base, L=12, device="cpu", step_seconds=0.01)] * 5 + [dict(base, device="cpu", step_seconds=None)] * 4)
    assert aggregate.timing_device(runs, g) == "H200"
    assert aggregate.timing_device(runs, ("classify", "mnist", 1, 12)) == "cpu"
    assert aggregate.timing_device(runs, ("segment", "mnist", 1, 30)) is None
    tie = [dict(base, device="b", step_seconds=1.0), dict(base, device="a", step_seconds=1.0)]
    assert aggregate.timing_device(tie, g) == aggregate.timing_device(tie[::-1], g) == "a"


def test_steps_per_call_check_times_each_k_of_the_run_loop(capsys):
    """launch.steps_per_call_check: one row per K, K=1 the reference (vs_one 1.0, the others
    its time over theirs); steps that no K divides, or a bad model, give an error row."""
    from launch import steps_per_call_check as spc

    assert spc.main(["--model=cnn_cls_68k", "--L=15", "--ks=1,2", "--steps=4", "--rounds=1", "--n_train=200",
                     "--label=t"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["steps_per_call"] for r in rows] == [1, 2]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["ms_per_step"] > 0 and r["compile_s"] > 0 and r["steps"] == 4 and r["label"] == "t"
        assert r["device"] == "cpu"
    assert rows[0]["vs_one"] == 1.0
    assert rows[1]["vs_one"] == pytest.approx(rows[0]["ms_per_step"] / rows[1]["ms_per_step"], rel=1e-2)
    with pytest.raises(ValueError, match="not a multiple"):
        spc.measure("cnn_cls_68k", 15, [1, 2], steps=3)
    assert spc.main(["--model=no_such_model", "--ks=1,2"]) == 1
    assert "no_such_model" in json.loads(capsys.readouterr().out)["error"]


def test_sweeps_started_at_once_write_the_manifest_without_failing(tmp_path):
    # a SLURM array starts many `run_grid --index=I` on one root at once; each writes the manifest
    runs = grid.get_grid("reduced_cpu")
    root = str(tmp_path / "sweep")
    os.makedirs(root)
    errors = []
    barrier = threading.Barrier(8)

    def write():
        barrier.wait()
        for _ in range(25):
            try:
                grid.write_manifest(runs, root, "reduced_cpu")
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(e))

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    manifest = json.load(open(os.path.join(root, "grid_reduced_cpu.json")))
    assert len(manifest["runs"]) == len(runs)
    assert sorted(os.listdir(root)) == ["grid_reduced_cpu.json"]  # no temporary file left behind


def test_collect_copies_finished_runs_without_checkpoints(tmp_path, capsys):
    """launch.collect: finished grid runs' small files go to the results tree; unfinished runs,
    checkpoints and runs outside the task folders (SWEEP/extra) stay behind; a finished run
    already there is kept unless --replace; an unfinished one there is replaced."""
    from launch import collect

    sweep, into = tmp_path / "sweep", tmp_path / "results"
    done = "classify/mnist-d1-L30/s2cnn_cls/NR-R-aug1-seed0"
    cut = "classify/mnist-d1-L30/s2cnn_cls/R-R-augfresh-seed0"
    extra = "extra/classify/mnist-d1-L30/s2cnn_cls/NR-R-aug1-seed0"
    fake_workdir(str(sweep / done), RunConfig(), 0.9, "classify")
    fake_workdir(str(sweep / cut), RunConfig(), None, "classify")
    fake_workdir(str(sweep / extra), RunConfig(), 0.8, "classify")
    (sweep / done / "summary.md").write_text("accuracy: 90.00 %\n")
    os.makedirs(sweep / done / "best" / "7")
    (sweep / done / "best" / "7" / "weights").write_text("w")
    assert collect.main(["--sweep", str(sweep), "--into", str(into), "--dry_run"]) == 0
    assert not into.exists()
    assert collect.main(["--sweep", str(sweep), "--into", str(into)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"copied     {done}" in lines and f"unfinished {cut}" in lines
    assert not any("extra" in l for l in lines)
    assert sorted(os.listdir(into / done)) == ["config.json", "metrics.jsonl", "summary.md"]
    assert not (into / cut).exists() and not (into / "extra").exists()
    # a second collect keeps what is there; --replace copies it again
    (into / done / "summary.md").write_text("edited")
    assert collect.collect(str(sweep), str(into)) == [(done, "kept"), (cut, "unfinished")]
    assert (into / done / "summary.md").read_text() == "edited"
    assert collect.collect(str(sweep), str(into), replace=True)[0] == (done, "replaced")
    assert (into / done / "summary.md").read_text() == "accuracy: 90.00 %\n"
    # an unfinished copy in the results tree is replaced by the finished run
    fake_workdir(str(into / cut), RunConfig(), None, "classify")
    fake_workdir(str(sweep / cut), RunConfig(), 0.7, "classify")
    assert (cut, "replaced") in collect.collect(str(sweep), str(into))
    assert collect.finished(str(into / cut))
    assert collect.main(["--sweep", str(tmp_path / "none"), "--into", str(into)]) == 2


def test_carry_writes_the_npz_the_runs_read(tmp_path):
    """launch.carry's digits file: the keys, dtypes and shapes ``--source=npz`` reads."""
    from launch import carry
    from sphere_jax import runner

    rng = np.random.default_rng(0)
    fake = {"train": (rng.integers(0, 256, (12, 28, 28)), np.arange(12) % 10),
            "test": (rng.integers(0, 256, (5, 28, 28)), np.arange(5) % 10)}
    path = str(tmp_path / "data" / "mnist.npz")
    shapes = carry.write_npz("mnist", path, load=lambda d, split: fake[split])
    assert shapes == {"train_images": [12, 28, 28], "train_labels": [12], "test_images": [5, 28, 28], "test_labels": [5]}
    with np.load(path) as z:
        assert z["train_images"].dtype == np.uint8 and z["test_labels"].dtype == np.int32
        np.testing.assert_array_equal(z["train_images"], fake["train"][0])
    assert not os.path.exists(path + ".tmp.npz")
    runner.RunConfig(source="npz", digits_npz=str(tmp_path / "data" / "{dataset}.npz")).validate()
    with pytest.raises(ValueError, match=r"not \[n, 28, 28\]"):
        carry.write_npz("mnist", path, load=lambda d, split: (np.zeros((3, 28, 27)), np.zeros(3)))
    assert carry.main(["--datasets=emnist", "--no_wheel", f"--out={tmp_path}"]) == 2


def test_together_trains_runs_that_differ_only_in_seed_and_augmentation_as_one_process(tmp_path):
    """``--together``: one process per group of unfinished runs that differ only in their seed and
    augmentation level (every level with every seed); each run is still done or failed on its
    own, and a finished run leaves its group."""
    root = str(tmp_path)
    runs = grid.expand(SMALL)

    class GroupFake(FakeExecutor):
        def __call__(self, unit, root, env):
            self.calls.append(sorted(r.index for r in getattr(unit, "runs", (unit,))))
            self.envs.append(dict(env))
            for r in getattr(unit, "runs", (unit,)):
                fake_workdir(r.workdir(root), r.config, 0.5, r.task)
            return 0

    cnn68 = [r for r in runs if r.config.model == "cnn_cls_68k"]  # levels 1, 4, fresh x seeds 0, 1
    assert len(cnn68) == 6
    done_before = [r for r in cnn68 if r.config.copies == 4 and r.config.seed == 1][0]
    fake_workdir(done_before.workdir(root), done_before.config, 0.9, done_before.task)
    cnn250 = [r for r in runs if r.config.model == "cnn_cls_250k"]
    fake_workdir(cnn250[0].workdir(root), cnn250[0].config, None, "classify")  # a group's first run, started
    ex = GroupFake()
    logged = []
    res = run_grid.execute(runs, root, ex, devices=[], log=logged.append, together=0)
    assert sum(run_grid.CPU_TOGETHER_NOTE in line for line in logged) == 1  # no GPU: the CPU's measurement is said
    idx = lambda rs: sorted(r.index for r in rs)
    # 68k: levels 1 and fresh have both seeds left (one group), level 4 only seed 0 (alone);
    # 250k: all six together; the NR Cohen run and the two segmenters (other data) alone
    assert sorted(ex.calls) == sorted([idx(r for r in cnn68 if r.config.copies != 4),
                                       [r.index for r in cnn68 if r.config.copies == 4 and r.config.seed == 0],
                                       idx(r for r in runs if r.config.model == "cnn_cls_250k"),
                                       [runs[0].index]] + [[r.index] for r in runs if r.task == "segment"])
    assert res.skipped == [done_before.index] and res.done == [r.index for r in runs if r is not done_before]
    # a group's command: --seeds, --augmentations and a workdir pattern giving each run its own
    group = grid.RunGroup(tuple(r for r in cnn68 if r.config.copies != 4))
    argv = group.argv(root, "python")
    assert "--seeds=0,1" in argv and "--augmentations=1,fresh" in argv
    assert not any(a.startswith(("--seed=", "--augmentation=")) for a in argv)
    pattern = [a for a in argv if a.startswith("--workdir=")][0][len("--workdir="):]
    assert sorted(pattern.replace("{aug}", r.augmentation).replace("{seed}", str(r.config.seed)) for r in group.runs) \
        == sorted(r.workdir(root) for r in group.runs)
    same = lambda flags: [f for f in flags if not f.startswith(("--seed", "--augmentation", "--workdir"))]
    assert same(argv) == same(group.runs[0].argv(root, "python"))
    # at most N runs per group: every level of a group with every seed of it
    parts = grid.group_runs(cnn250, 2)
    assert [sorted((r.augmentation, r.config.seed) for r in u.runs) for u in parts] == [
        [(a, 0), (a, 1)] for a in ("1", "4", "fresh")]
    assert [len(u.runs) for u in grid.group_runs(cnn250, 5)] == [4, 2] and grid.group_runs(cnn250, 1) == cnn250
    with pytest.raises(grid.GridError, match="differ in more than their seed and augmentation"):
        grid.RunGroup((runs[0], cnn68[0]))
    # on GPUs each worker gets one: runs trained together use one device
    ex = GroupFake()
    logged = []
    run_grid.execute(runs, str(tmp_path / "gpus"), ex, devices=["0", "1", "2", "3"], log=logged.append, together=0)
    assert not any(run_grid.CPU_TOGETHER_NOTE in line for line in logged)
    assert len(ex.envs) == 5 and all(e["CUDA_VISIBLE_DEVICES"] in ("0", "1", "2", "3") for e in ex.envs)  # 1 + 6 + 6 + 1 + 1 runs
    with pytest.raises(grid.GridError, match="not every augmentation level with every seed"):
        grid.RunGroup(tuple(cnn68[:3]))  # level 1 seeds 0, 1 and level 4 seed 0
