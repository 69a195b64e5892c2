"""The step profiler attributes traced time to the right layers, directions and operations."""
import pytest

from sphere_jax import profiling
from sphere_jax.models import registry, s2cnn

SEG = "S2CNNSegmenter"


@pytest.mark.parametrize("op_name, expected", [
    ("jit(step)/jvp(S2CNNSegmenter)/so3_conv_0/so3_conv_0._call_gamma_first/nmzl,nmlt->nmzt/dot_general",
     ("so3_conv_0", "forward", "nmzl,nmlt->nmzt dot_general")),
    ("jit(step)/transpose(jvp(S2CNNSegmenter))/so3_to_s2/reduce_sum", ("so3_to_s2", "backward", "reduce_sum")),
    ("jit(step)/jvp(S2CNNSegmenter)/jit(relu)/max", ("(model)", "forward", "max")),
    ("jit(step)/jvp(S2CNNSegmenter)/kpbct,t->bc/dot_general", ("(model)", "forward", "kpbct,t->bc dot_general")),
    ("jit(step)/add", ("(step)", "other", "add")),
    ("jit(step)/transpose(jvp(softmax_cross_entropy))/mul", ("(step)", "backward", "mul")),
    ("jit(predict)/S2CNNSegmenter/s2_conv/transpose", ("s2_conv", "other", "transpose")),
])
def test_op_names_split_into_layer_direction_and_operation(op_name, expected):
    assert profiling.split_op_name(op_name, SEG) == expected


def test_hlo_metadata_is_read_per_instruction():
    hlo = ('HloModule jit_step, entry_computation_layout={}\n'
           '  %fusion.3 = f32[4]{0} fusion(f32[4]{0} %p), kind=kLoop, calls=%fc, metadata={op_name="jit(step)/add" source_file="a.py"}\n'
           '  ROOT dot.7 = f32[2,2]{1,0} dot(%a, %b), metadata={op_type="dot" op_name="jit(step)/jvp(M)/l/dot_general"}\n'
           '  %copy.1 = f32[4]{0} copy(%fusion.3)\n')
    assert profiling.hlo_module_name(hlo) == "jit_step"
    assert profiling.hlo_op_names(hlo) == {"fusion.3": "jit(step)/add", "dot.7": "jit(step)/jvp(M)/l/dot_general"}


def test_aggregate_sums_per_step_and_keeps_unknown_instructions():
    names = {"dot.1": "jit(step)/jvp(M)/a/dot_general", "dot.2": "jit(step)/transpose(jvp(M))/a/dot_general",
             "fusion.5": "jit(step)/add"}
    events = [("dot.1", 3e6), ("dot.1", 1e6), ("dot.2", 2e6), ("fusion.5", 0.5e6), ("copy.9", 1.5e6)]
    r = profiling.aggregate(events, names, "M", steps=2)
    assert r["layers"]["a"] == {"forward": 2.0, "backward": 1.0, "other": 0.0}
    assert r["layers"]["(step)"]["other"] == 0.25
    assert r["layers"]["?"]["other"] == 0.75
    assert r["traced_ms"] == pytest.approx(4.0)
    assert r["ops"][0] == {"layer": "a", "direction": "forward", "op": "dot_general", "ms": 2.0, "calls_per_step": 1.0}
    assert {o["op"] for o in r["ops"] if o["layer"] == "?"} == {"copy"}


def test_profile_of_a_small_s2cnn_step_covers_every_layer_both_ways(tmp_path):
    L = 8
    r = profiling.profile_case({"profile": "s2cnn_seg_small", "L": L, "batch": 2, "steps": 2, "keep_trace": str(tmp_path)})
    model, _ = registry.make_model("s2cnn_seg_small", L_in=L)
    names = [m.name for m in s2cnn.layer_modules(model)]
    assert len(names) >= 3
    for n in names:  # every equivariant layer runs forward and backward in the step
        assert r["layers"][n]["forward"] > 0 and r["layers"][n]["backward"] > 0, (n, r["layers"])
    ms = lambda row: row["forward"] + row["backward"] + row["other"]  # noqa: E731
    total = sum(ms(row) for row in r["layers"].values())
    assert total == pytest.approx(r["traced_ms"], rel=1e-3, abs=0.01)
    in_layers = sum(ms(r["layers"][n]) for n in names)
    assert r["traced_gb"] > 0 and all(r["layers"][n]["gb"] > 0 for n in names)
    assert in_layers > 0.5 * r["traced_ms"]  # the equivariant layers are most of the step
    assert r["unattributed_ms"] < 0.2 * r["traced_ms"]
    assert r["module"] == "jit_step" and r["step_s"] > 0
    assert (tmp_path / f"profile_s2cnn_seg_small_L{L}_b2.xplane.pb.gz").stat().st_size > 1000
    assert "| layer | forward ms |" in profiling.profile_markdown(r)


def test_entry_instructions_count_their_operands_and_results():
    hlo = ('HloModule m\n\n%fused (p: f32[8]) -> f32[8] {\n  %p = f32[8]{0} parameter(0)\n  ROOT %n = f32[8]{0} negate(%p)\n}\n\n'
           'ENTRY %main (a: f32[64,32], b: f32[32,16]) -> (f32[16], bf16[4]) {\n'
           '  %a = f32[64,32]{1,0} parameter(0), metadata={op_name="a"}\n'
           '  %b = f32[32,16]{1,0} parameter(1)\n'
           '  %dot.1 = f32[64,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%fc, backend_config={"k":[]}\n'
           '  %multi = (f32[16]{0}, bf16[4]{0}) fusion(%dot.1), kind=kInput, calls=%fr\n'
           '  %gte = bf16[4]{0} get-tuple-element(%multi), index=1\n'
           '  %c = f32[] constant(0)\n'
           '  %sl = f32[8,32]{1,0} slice(%a), slice={[0:8], [0:32]}\n'
           '  ROOT %t = (f32[16]{0}, bf16[4]{0}) tuple(%multi)\n}\n')
    b = profiling.hlo_op_bytes(hlo)
    assert b["dot.1"] == 4 * (64 * 16 + 64 * 32 + 32 * 16)
    assert b["multi"] == 4 * 16 + 2 * 4 + 4 * 64 * 16
    assert b["gte"] == 2 * 4 + (4 * 16 + 2 * 4)
    assert b["sl"] == 2 * 4 * 8 * 32  # reads what it writes, not all of %a
    assert b["c"] == 4 and "n" not in b  # scalars count; fused computations' insides do not
    r = profiling.aggregate([("dot.1", 2e3), ("dot.1", 2e3)], {"dot.1": "jit(step)/jvp(M)/l/dot_general"}, "M",
                            steps=2, op_bytes=b)
    assert r["ops"][0]["gb"] == pytest.approx(b["dot.1"] / 1e9, abs=1e-4)  # once per step, not per event
    assert r["ops"][0]["gbps"] == pytest.approx(b["dot.1"] / 1e9 / 2e-6, rel=0.01)
    assert r["layers"]["l"]["gb"] == r["ops"][0]["gb"]


def test_operands_after_index_comments_and_library_scratch_buffers():
    hlo = ('HloModule m\n\nENTRY %main () -> f32[8] {\n'
           + "".join(f'  %p{i} = f32[8]{{0}} parameter({i})\n' for i in range(7))
           + '  %f = f32[8]{0} fusion(%p0, %p1, %p2, %p3, %p4, /*index=5*/%p5, %p6), kind=kLoop, calls=%fc\n'
           '  %g = (f32[64,16]{1,0}, s8[4194304]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$gemm"\n'
           '  ROOT %r = f32[8]{0} negate(%f)\n}\n')
    b = profiling.hlo_op_bytes(hlo)
    assert b["f"] == 8 * 32  # 7 operands and the result, the sixth behind its comment
    assert b["g"] == 4 * 64 * 16 + 2 * 32  # the 4 MiB workspace is not traffic


def test_bytes_of_a_real_compiled_fusion_count_all_its_operands():
    import jax
    import jax.numpy as jnp

    xs = [jnp.full((1024,), float(i)) for i in range(7)]
    hlo = jax.jit(lambda *a: sum(jnp.sin(x) * (i + 1) for i, x in enumerate(a))).lower(*xs).compile().as_text()
    assert "/*index=5*/" in hlo  # the format this guards against
    assert max(profiling.hlo_op_bytes(hlo).values()) >= 8 * 4 * 1024  # 7 inputs + 1 output


class _E:
    def __init__(self, ns, **stats):
        self.duration_ns, self.stats, self.name = ns, list(stats.items()), "k"


class _L:
    def __init__(self, name, events):
        self.name, self.events = name, events


class _P:
    def __init__(self, name, lines):
        self.name, self.lines = name, lines


class _Profile:
    def __init__(self, planes):
        self.planes = planes


def test_device_traces_count_stream_kernels_of_the_step_once():
    mine = dict(hlo_module="jit_step", program_id=3)
    pd = _Profile([
        _P("/host:CPU", [_L("python", [_E(9e9, hlo_op="fusion.9", hlo_module="jit_step")])]),
        _P("/device:GPU:0", [
            _L("Stream #7(Kernel)", [_E(2e6, hlo_op="fusion.1", **mine), _E(1e6, hlo_op="%dot.2", **mine),
                                     _E(5e6, hlo_op="copy.3", hlo_module="jit_other"), _E(4e6)]),
            _L("XLA Ops", [_E(3e6, hlo_op="fusion.1", **mine)]),  # derived: would count twice
            _L("Stream #9(MemcpyH2D)", [_E(7e6)]),
        ]),
    ])
    events, lines, source = profiling.profile_events(pd, "jit_step")
    assert source == "device"
    assert sorted(events) == [("dot.2", 1e6), ("fusion.1", 2e6)]
    by = {row["line"]: row for row in lines}
    assert by["Stream #7(Kernel)"]["all_events"] == 4 and by["Stream #7(Kernel)"]["events"] == 3
    assert by["Stream #7(Kernel)"]["module_events"] == 2 and by["Stream #7(Kernel)"]["counted"]
    assert not by["XLA Ops"]["counted"]
    assert by["Stream #9(MemcpyH2D)"]["all_ms"] == 7.0 and by["Stream #9(MemcpyH2D)"]["events"] == 0
    assert "hlo_op" in by["Stream #7(Kernel)"]["stat_keys"]
    # no event of the module asked for: every HLO event counts, and the lines say so
    events, lines, _ = profiling.profile_events(pd, "jit_missing")
    assert len(events) == 3 and all(row["module_events"] == 0 for row in lines)
    # no device plane: the host's events
    events, _, source = profiling.profile_events(_Profile([pd.planes[0]]), "jit_step")
    assert source == "host" and events == [("fusion.9", 9e9)]
