"""The benchmark command at a tiny size writes well-formed JSON, markdown and a latency plot."""
import json
import math
import os
import subprocess
import sys

import jax
import pytest
import jax.numpy as jnp

from sphere_jax import benchmark, harmonics
from sphere_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(__file__))
MODELS = ["s2cnn_cls_small", "cnn_cls_68k"]


def _count(name, L):
    model, _ = registry.make_model(name, L_in=L)
    tables = harmonics.build_tables(model.table_specs())
    x = jnp.zeros((1, 2 * L, 2 * L - 1, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, tables)["params"]
    return sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(shapes))


def test_benchmark_reduced(tmp_path):
    out = tmp_path / "bench"
    p = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--reduced", f"--models={','.join(MODELS)}",
         "--infer_batches=1,2", "--repeats=1", f"--out={out}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.load(open(out / "benchmark.json"))
    assert [r["model"] for r in rows] == MODELS
    for r in rows:
        assert "error" not in r, r
        assert r["L"] == benchmark.study_L(r["model"], reduced=True) == 10
        assert r["params"] == _count(r["model"], r["L"])
        assert r["task"] == "classify" and r["device"]
        assert sorted(r["infer_s"]) == ["1", "2"] and all(v > 0 for v in r["infer_s"].values())
        assert sorted(r["compile_s"]) == ["1", "2"]
        for k in ("tables_s", "first_use_s", "train_compile_s", "train_step_s", "peak_rss_gb"):
            assert r[k] > 0 or (k == "tables_s" and r[k] >= 0), (k, r[k])
        assert r["train_batch"] == 32
        # cost analysis of the compiled step and the rates derived from it
        assert r["step_gflop"] > 0 and r["step_gb"] > 0 and r["matmul_gflops"] > 0 and r["copy_gbps"] > 0
        assert abs(r["achieved_tflops"] - r["step_gflop"] / r["train_step_s"] / 1e3) <= 1e-3 + 1e-3 * r["achieved_tflops"]
        assert abs(r["flops_fraction"] - r["achieved_tflops"] * 1e3 / r["matmul_gflops"]) < 1e-3 + 0.01 * r["flops_fraction"]
        assert abs(r["bandwidth_fraction"] - r["achieved_gbps"] / r["copy_gbps"]) < 1e-3 + 0.01 * r["bandwidth_fraction"]
    s2 = rows[0]
    for k in ("matmul_gflops", "so3_fwd_gflops", "so3_inv_gflops", "s2_fwd_gflops", "s2_inv_gflops"):
        assert s2[k] > 0
    frac = s2["roofline_fraction"]
    assert sorted(frac) == ["s2_fwd", "s2_inv", "so3_fwd", "so3_inv"]
    assert abs(frac["so3_fwd"] - s2["so3_fwd_gflops"] / s2["matmul_gflops"]) < 1e-3
    assert "roofline_fraction" not in rows[1]
    md = (out / "benchmark.md").read_text().strip().splitlines()
    assert md[0].startswith("| model | L | params |") and md[1].startswith("|---")
    body = md[2:]
    assert len(body) == len(MODELS)
    for line, r in zip(body, rows):
        assert line.startswith(f"| {r['model']} | 10 | {r['params']:,} |")
    png = (out / "latency_vs_batch.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_transform_implementations_side_by_side(tmp_path):
    out = tmp_path / "tr"
    p = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--transforms_L=4", "--transforms=dft,s2fft",
         "--transform_signals=2", "--repeats=1", f"--out={out}"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.load(open(out / "transforms.json"))
    assert [(r["transforms"], r["L"]) for r in rows] == [("dft", 4), ("s2fft", 4)]
    for r in rows:
        assert "error" not in r, r
        for k in ("tables_s", "first_use_s", "s2_fwd_s", "s2_inv_s", "so3_fwd_s", "so3_inv_s", "peak_rss_gb"):
            assert r[k] > 0
    md = (out / "transforms.md").read_text().splitlines()
    assert md[0].startswith("| transforms | L |") and len(md) == 4


def test_study_band_limits():
    assert benchmark.study_L("s2cnn_204k") == 50 and benchmark.study_L("cnn_cls_4m") == 30
    assert benchmark.study_L("s2cnn_cls_deep", reduced=True) == 30  # its first layer needs L >= 30
    assert benchmark.study_L("cnn_cls_250k", reduced=True) == 15  # the global-pool family needs 29x29
    assert benchmark.study_L("cnn_218k", reduced=True) == 12


def test_markdown_and_plot_of_saved_rows(tmp_path):
    """The table and the plot of the committed GPU results (two rows of one model are merged;
    a failed case stays a row of its own)."""
    for name in ("benchmark_h100_fft.json", "benchmark_h100.json"):
        rows = json.load(open(os.path.join(ROOT, "results", "gpu", name)))
        md = benchmark.markdown_table(rows)
        assert md.count("\n") == 2 + len(rows)
        path = benchmark.plot_latency(rows, str(tmp_path / f"{name}.png"))
        assert open(path, "rb").read(4) == b"\x89PNG"


def test_torch_table_of_paired_rows():
    """vs_torch.md from hand-made rows: ms below a second, the paired medians and the per-round
    ratios, one column pair per variant; rows without a PyTorch twin are left out."""
    sys.path.insert(0, ROOT)
    from experiments import benchmark as cli

    rows = [
        {"model": "cnn_cls_68k", "L": 30, "train_batch": 32, "torch_rounds": 7, "cpu_devices": 2, "torch_train_step_s": 0.0072,
         "torch_infer_s": 0.0025, "paired_train_step_s": 0.0066, "paired_infer_s": 0.0026, "train_vs_torch": 0.93,
         "infer_vs_torch": 1.01, "conv_train_vs_torch": 1.21, "conv_infer_vs_torch": 1.44},
        {"model": "s2cnn_cls", "L": 30, "train_batch": 32},
        {"model": "cnn_5_5m", "L": 50, "train_batch": 32, "torch_rounds": 5, "torch_train_step_s": 5.3,
         "torch_infer_s": 2.1, "paired_train_step_s": 5.9, "paired_infer_s": 1.6, "train_vs_torch": 1.11,
         "infer_vs_torch": 0.76, "conv_train_vs_torch": 1.2, "conv_infer_vs_torch": 0.9},
    ]
    md = cli.torch_markdown(rows, ["conv"]).splitlines()
    assert md[0].endswith("| conv: train ratio | conv: inference ratio |")
    assert md[2] == "| cnn_cls_68k | 30 | 32 | 2 | 7.2 ms | 6.6 ms | 0.93 | 2.5 ms | 2.6 ms | 1.01 | 1.21 | 1.44 |"
    assert md[3] == "| cnn_5_5m | 50 | 32 | 1 | 5.300 s | 5.900 s | 1.11 | 2.100 s | 1.600 s | 0.76 | 1.2 | 0.9 |"
    assert len([l for l in md if l.startswith("| cnn")]) == 2 and "5, 7 rounds" in md[-1]


def test_aot_markdown_compares_each_program_with_its_own_first_row():
    from experiments import benchmark as cli

    kinds = {"gemm_fusion_dot": {"count": 3, "gb": 6.0}, "loop_transpose_fusion": {"count": 2, "gb": 2.0}}
    row = dict(model="s2cnn_204k", L=50, batch=32, target="h200", jax="0.11.2", gflop=2000.0, copy_gb=1.5,
               temp_gb=3.0, kernels=5, by_kind=kinds, compile_s=60.0)
    rows = [dict(row, what="train", gb=100.0, env={}), dict(row, what="train", gb=50.0, env={"A": "1"}),
            dict(row, what="infer", gb=40.0, env={}), dict(row, what="infer", gb=30.0, env={"A": "1"}),
            {"model": "s2cnn_204k", "L": 50, "error": ["boom"], "env": {"A": "2"}}]
    md = cli.aot_markdown(rows).splitlines()
    body = [l for l in md if l.startswith("| s2cnn_204k")]
    assert [l.split(" | ")[7] for l in body[:4]] == ["1.000", "0.500", "1.000", "0.750"]
    assert [l.split(" | ")[1] for l in body[:4]] == ["train", "train", "infer", "infer"]
    assert "A=1" in body[1] and "(defaults)" in body[0] and "error: ['boom']" in body[4]
    assert "gemm_fusion_dot 6.0, loop_transpose_fusion 2.0" in body[0] and "h200" in md[-1]


def test_copy_gb_counts_copies_and_transposes_only():
    hlo = """HloModule m
ENTRY %main {
  %p = f32[10,20]{1,0} parameter(0)
  %copy.1 = f32[20,10]{0,1} copy(%p)
  %transpose_copy_fusion = c64[5,4]{1,0} fusion(%p), kind=kLoop
  %dot.3 = f32[10,10]{1,0} dot(%p, %copy.1)
  ROOT %t = (f32[10,10]{1,0}) tuple(%dot.3)
}"""
    # copy: 200 floats * 4 B; transpose: 20 complex * 8 B; each written and read once
    assert math.isclose(benchmark.copy_gb(hlo), round(2 * (800 + 160) / 1e9, 3))
    assert benchmark.copy_gb("ENTRY %main {\n  ROOT %copy = f32[1000000,250]{1,0} copy(%p)\n}") == 2.0


def test_layer_accounting_adds_up_to_the_training_step():
    """Per-layer forward+backward costs of a small S2CNN sum to the whole training step's (which
    adds only the loss, the input scaling, the Haar mean, the dense layer and Adam). Measured for
    the Cohen classifier at L=10, batch 2: 0.326 vs 0.328 GFLOP and 0.168 vs 0.174 GB gamma-first,
    0.249 vs 0.253 and 0.179 vs 0.184 channels-last; the 204k segmenter at L=12, batch 2
    (channels-last): 0.389 vs 0.393 GFLOP, 0.307 vs 0.309 GB."""
    import optax

    from sphere_jax import train

    L, B = 10, 2
    res = benchmark.layer_case({"layers": "s2cnn_cls", "L": L, "batch": B, "repeats": 1})
    model, task = registry.make_model("s2cnn_cls", L_in=L)
    assert [r["kind"] for r in res["layers"]] == ["S2Conv", "SO3Conv"]
    assert [(r["c_in"], r["c_out"]) for r in res["layers"]] == [(1, 20), (20, 40)]
    for r in res["layers"]:
        assert r["gflop"] > 0 and r["gb"] > 0 and 0 <= r["copy_gb"] and r["fwd_bwd_s"] > 0
    tables = harmonics.build_tables(model.table_specs())
    x = jnp.ones((B, 2 * L, 2 * L - 1, 1))
    y = jnp.zeros((B,), jnp.int32)
    variables = model.init(jax.random.key(0), x, tables)
    state = train.TrainState.create(variables["params"], optax.adam(1e-3))
    step = benchmark.cost_of(train.make_train_step(model, task).lower(state, tables, x, y).compile())
    gflop = sum(r["gflop"] for r in res["layers"])
    gb = sum(r["gb"] for r in res["layers"])
    assert 0.85 * step["gflop"] <= gflop <= 1.05 * step["gflop"], (gflop, step)
    assert 0.7 * step["gb"] <= gb <= 1.1 * step["gb"], (gb, step)
    md = benchmark.layers_markdown(res)
    assert md.count("| so3_conv_") == 1 and "| total |" in md


def test_layer_accounting_rejects_planar_cnns():
    with pytest.raises(ValueError, match="S2CNN"):
        benchmark.layer_case({"layers": "cnn_218k", "L": 12, "batch": 1})


def test_layout_comparison_times_the_same_function_twice():
    before = os.environ.get("SPHERE_JAX_SO3_LAYOUT")
    res = benchmark.layout_case({"layout_model": "s2cnn_seg_small", "L": 8, "batch": 1, "rounds": 2, "what": "infer"})
    assert res["max_rel_diff"] < 1e-5
    for k in harmonics.SO3_LAYOUTS:
        assert res[k]["s"] > 0 and res[k]["temp_mb"] >= 0 and res[k]["tables_mb"] > 0
    assert res["ratio"] > 0 and os.environ.get("SPHERE_JAX_SO3_LAYOUT") == before


def test_variant_comparison_restores_the_environment_and_reports_differences(monkeypatch):
    """Three variants of one model in one process: the reference, the same settings again
    (outputs equal to it: 0 apart), bfloat16 grids (measured 2.8e-2 from float32 at L=12 for the
    204k; bounds 1e-4 .. 0.2) and one that does not build (an error row, the others timed)."""
    from experiments.benchmark import parse_env_variants

    monkeypatch.setenv("SPHERE_JAX_TRANSFORMS", "dft")
    monkeypatch.setenv("SPHERE_JAX_SO3_LAYOUT", "gamma_first")
    monkeypatch.delenv("SPHERE_JAX_GRID_DTYPE", raising=False)
    variants = parse_env_variants(["ref:SPHERE_JAX_BOUNDARY=xla", "same:", "bf16:SPHERE_JAX_GRID_DTYPE=bfloat16",
                                   "bad:SPHERE_JAX_GRID_DTYPE=float8"])
    assert variants["same"] == {} and variants["bf16"] == {"SPHERE_JAX_GRID_DTYPE": "bfloat16"}
    res = benchmark.variants_case({"variants_model": "s2cnn_seg_small", "L": 8, "batch": 1, "rounds": 2,
                                   "what": "train", "variants": variants})
    v = res["variants"]
    assert res["reference"] == "ref" and "SPHERE_JAX_GRID_DTYPE" not in os.environ
    assert v["same"]["max_rel_diff"] == 0.0 and v["same"]["loss_rel_diff"] < 1e-6
    assert 1e-4 < v["bf16"]["max_rel_diff"] < 0.2
    assert all(v[k]["s"] > 0 and v[k]["ratio"] > 0 and v[k]["gb"] > 0 for k in ("ref", "same", "bf16"))
    assert "SPHERE_JAX_GRID_DTYPE" in v["bad"]["error"]
    for bad in (["onlyone:A=1"], ["x:A=1", "x:B=2"], ["noname"], ["a:A=1", "b:NOTKV"]):
        with pytest.raises(ValueError, match="env_variants"):
            parse_env_variants(bad)


@pytest.mark.parametrize("name, L, steps, rtol", [("cnn_cls_68k", 15, 3, 1e-5), ("s2cnn_cls_deep", 30, 1, 1e-3)])
def test_vmapped_members_train_like_independent_runs(name, L, steps, rtol):
    """TrainLoop(members=K): member i follows the run that a plain step takes from the i-th
    split key on the same batch: the same training losses, step after step. Losses, not
    parameters: Adam moves a parameter whose gradient is round-off by a full step either way,
    and after a few steps the deep classifier's BatchNorm amplifies that, so it is compared on
    its first step only. That step checks its BatchNorm variance: with the one-pass variance
    (flax's default) the two batchings' losses differed by 4e-3 (features at bn_0 have mean/std
    up to 58), with the two-pass variance by about 1e-4."""
    import numpy as np
    import optax

    from sphere_jax import train

    if name == "s2cnn_cls_deep" and os.environ.get("SPHERE_JAX_TRANSFORMS") == "fft":
        pytest.skip("one transform variant is enough for the vmap check")
    K, batch = 2, 8
    loop = benchmark.TrainLoop(name, L, batch, warmup=0, members=K)
    got = []
    for _ in range(steps):
        loop.state, loss = loop.step(loop.state, loop.tables, loop.x, loop.y)
        got.append(np.asarray(loss))
    model, task = registry.make_model(name, L_in=L)
    step = train.make_train_step(model, task)
    for i, key in enumerate(jax.random.split(jax.random.key(0), K)):
        params, model_state = train.split_variables(jax.jit(model.init)(key, loop.x[i, :1], loop.tables))
        state = train.TrainState.create(params, optax.adam(1e-3), model_state)
        for t in range(steps):
            state, loss = step(state, loop.tables, loop.x[i], loop.y[i])
            assert float(got[t][i]) == pytest.approx(float(loss), rel=rtol), (i, t)
        assert int(loop.state.step[i]) == int(state.step) == steps
