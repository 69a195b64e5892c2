"""GPU programs compiled without a GPU (sphere_jax.aot): the cost counters on hand-made cases, and
the deviceless compilation itself where JAX's CUDA plugin is installed (skipped elsewhere: CI does
not install it)."""
import importlib.util

import jax
import jax.numpy as jnp
import pytest

from sphere_jax import aot

HAVE_CUDA_PLUGIN = (importlib.util.find_spec("jax_plugins") is not None
                    and any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)))


def test_hlo_cost_counts_a_matmul_and_its_bytes():
    n = 256
    c = jax.jit(lambda a, b: a @ b).lower(jnp.ones((n, 2 * n)), jnp.ones((2 * n, n))).compile()
    cost = aot.hlo_cost(c)
    assert cost["gflop"] == pytest.approx(2 * n * 2 * n * n / 1e9, rel=1e-3)
    # reads both operands and writes the product once: (2 n^2 + 2 n^2 + n^2) floats
    assert cost["gb"] == pytest.approx(5 * n * n * 4 / 1e9, rel=1e-3)


HLO = """HloModule jit_f, entry_computation_layout={(f32[1024]{0}, f32[1024]{0})->f32[1024]{0}}

%fused_add (param_0: f32[1024], param_1: f32[1024]) -> f32[1024] {
  %param_0 = f32[1024]{0} parameter(0)
  %param_1 = f32[1024]{0} parameter(1)
  ROOT %add.0 = f32[1024]{0} add(%param_0, %param_1)
}

ENTRY %main.9 (p0: f32[1024], p1: f32[1024]) -> f32[1024] {
  %p0 = f32[1024]{0} parameter(0)
  %p1 = f32[1024]{0} parameter(1)
  %loop_add_fusion = f32[1024]{0} fusion(%p0, %p1), kind=kLoop, calls=%fused_add
  %loop_add_fusion.1.2 = f32[1024]{0} fusion(%loop_add_fusion, %p1), kind=kLoop, calls=%fused_add
  %custom-call.3 = (f32[256]{0}, s8[4096]{0}) custom-call(%loop_add_fusion.1.2, %p1), custom_call_target="__cublas$lt$matmul"
  %get-tuple-element.4 = f32[256]{0} get-tuple-element(%custom-call.3), index=0
  ROOT %slice.5 = f32[128]{0} slice(%get-tuple-element.4), slice={[0:128]}
}
"""


def test_kernel_bytes_groups_kernels_by_kind():
    kinds = aot.kernel_bytes(HLO)
    assert list(kinds) == ["loop_add_fusion", "__cublas$lt$matmul", "slice"]  # largest first
    assert kinds["loop_add_fusion"] == {"count": 2, "gb": 2 * 3 * 4096 / 1e9}
    # the cuBLAS call: its result without the scratch buffer, plus two operands
    assert kinds["__cublas$lt$matmul"] == {"count": 1, "gb": (1024 + 4096 + 4096) / 1e9}
    assert kinds["slice"] == {"count": 1, "gb": 2 * 512 / 1e9}  # reads only what it writes


def test_targets_and_their_errors(tmp_path):
    assert "core_count: 132" in aot.target_config("h200")
    assert "memory_bandwidth: 4800000000000" in aot.target_config("h200")
    assert "memory_bandwidth: 3352320000000" in aot.target_config("h100")
    with pytest.raises(ValueError, match="h100"):
        aot.target_config("h300")
    bad = tmp_path / "t.txtpb"
    bad.write_text("platform_name: CUDA\n")
    with pytest.raises(ValueError, match="not a GpuTargetConfig"):
        aot.target_config(str(bad))
    good = tmp_path / "g.txtpb"
    good.write_text(aot.TARGETS["h100"])
    assert aot.target_config(str(good)) == aot.TARGETS["h100"]


@pytest.mark.skipif(HAVE_CUDA_PLUGIN, reason="JAX's CUDA plugin is installed")
def test_without_the_cuda_plugin_the_error_says_what_to_install():
    with pytest.raises(RuntimeError, match="CUDA plugin"):
        aot.gpu_mesh("h200")


@pytest.mark.skipif(not HAVE_CUDA_PLUGIN, reason="needs JAX's CUDA plugin (pip install 'jax[cuda13]'), not a GPU")
def test_a_training_step_compiles_for_a_gpu_without_one():
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = aot.gpu_mesh("h200")
    assert mesh.devices.flat[0].platform in ("cuda", "gpu")
    n = 512
    spec = jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    c = jax.jit(lambda a: a @ a).lower(spec).compile()
    assert aot.hlo_cost(c)["gflop"] == pytest.approx(2 * n**3 / 1e9, rel=1e-2)  # + a fused epilogue
    assert any("cublas" in k or "gemm" in k for k in aot.kernel_bytes(c.as_text()))

    row = aot.program_cost("s2cnn_seg_small", 8, 2, "h200")
    assert row["gflop"] > 0 and row["gb"] > 0 and row["kernels"] > 10
    assert any("gemm" in k or "cublas" in k for k in row["by_kind"])
    cnn = aot.program_cost("cnn_cls_68k", 10, 2, "h100")
    assert any("conv" in k or "cudnn" in k for k in cnn["by_kind"]), list(cnn["by_kind"])
    infer = aot.program_cost("s2cnn_seg_small", 8, 2, "h200", what="infer")
    assert infer["what"] == "infer" and 0 < infer["gflop"] < row["gflop"] / 2 and 0 < infer["gb"] < row["gb"] / 2
    with pytest.raises(ValueError, match="what"):
        aot.program_cost("s2cnn_seg_small", 8, 2, "h200", what="backward")
