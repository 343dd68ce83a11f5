"""Optimization profiles and engine precision, decided without TensorRT (attn_export/backends/tensorrt_profiles.py,
tensorrt_precision.py)."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from attn_export.backends import tensorrt_precision as precision
from attn_export.backends import tensorrt_profiles as profiles
from attn_export.errors import UserError


def model_with_inputs(*inputs, initializers=()):
    values = [helper.make_tensor_value_info(name, elem, dims) for name, elem, dims in inputs]
    graph = helper.make_graph([], "g", values, [], initializer=list(initializers))
    return helper.make_model(graph)


TOKENS = {"input_ids": ("batch", "seq")}
TOKENS_AND_MASK = {"input_ids": ("batch", "seq"), "attention_mask": ("batch", "seq")}


# ------------------------------------------------------------------------------------------------ model inputs
def test_model_inputs_reads_fixed_and_symbolic_dims():
    model = model_with_inputs(("input_ids", TensorProto.INT64, ["batch", "seq"]),
                              ("pixels", TensorProto.FLOAT, [None, 3, 224, 224]),
                              initializers=[numpy_helper.from_array(np.zeros(2, np.float32), "w")])
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]))
    assert profiles.model_inputs(model) == {"input_ids": ("batch", "seq"), "pixels": ("?", 3, 224, 224)}
    assert profiles.dynamic_inputs(profiles.model_inputs(model)) == ["input_ids", "pixels"]


# ------------------------------------------------------------------------------------------------ trtexec lists
def test_parse_shapes_trtexec_syntax():
    assert profiles.parse_shapes("input_ids:1x128,attention_mask:1x128", "--opt-shapes") == \
        {"input_ids": (1, 128), "attention_mask": (1, 128)}
    assert profiles.parse_shapes(["a:1x2", "b:3"], "--min-shapes") == {"a": (1, 2), "b": (3,)}
    assert profiles.parse_shapes("'in:0':2x4", "--max-shapes") == {"in:0": (2, 4)}
    assert profiles.parse_shapes(None, "--min-shapes") == {}


@pytest.mark.parametrize("text, message", [
    ("input_ids", "expects NAME:DIMS"),
    (":1x2", "expects NAME:DIMS"),
    ("input_ids:1x", "positive integers joined by 'x'"),
    ("input_ids:1*128", "positive integers joined by 'x'"),
    ("input_ids:-1x128", "positive integers joined by 'x'"),
    ("a:1,a:2", "gives 'a' twice"),
])
def test_parse_shapes_errors_are_one_line(text, message):
    with pytest.raises(UserError, match=message) as info:
        profiles.parse_shapes(text, "--opt-shapes")
    assert "\n" not in str(info.value)


def test_profile_from_shapes_fills_min_and_max_from_opt():
    profile = profiles.profile_from_shapes(TOKENS, {"input_ids": (1, 16)}, {"input_ids": (2, 128)},
                                           {"input_ids": (4, 512)})
    assert profile == {"input_ids": ((1, 16), (2, 128), (4, 512))}
    fixed = profiles.profile_from_shapes(TOKENS, {}, {"input_ids": (1, 128)}, {})
    assert fixed == {"input_ids": ((1, 128), (1, 128), (1, 128))}


@pytest.mark.parametrize("mins, opts, maxs, message", [
    ({"input_ids": (1, 1)}, {}, {"input_ids": (1, 9)}, "need --opt-shapes too"),
    ({"mask": (1, 1)}, {"input_ids": (1, 8)}, {}, "--min-shapes names mask without an --opt-shapes entry"),
    ({}, {"input_ids": (1, 8)}, {"input_ids": (1, 4)}, "needs min <= opt <= max"),
    ({}, {"input_ids": (1, 8, 1)}, {}, "'input_ids' has rank 2"),
    ({}, {"token_ids": (1, 8)}, {}, "no shape for dynamic input 'input_ids'"),
])
def test_profile_from_shapes_errors(mins, opts, maxs, message):
    with pytest.raises(UserError, match=message):
        profiles.profile_from_shapes(TOKENS, mins, opts, maxs)


def test_profile_keeps_fixed_dims_fixed():
    inputs = {"pixels": ("batch", 3, 224, 224)}
    ok = profiles.profile_from_shapes(inputs, {"pixels": (1, 3, 224, 224)}, {"pixels": (8, 3, 224, 224)}, {})
    assert ok["pixels"][0] == (1, 3, 224, 224)
    with pytest.raises(UserError, match="axis 2 is fixed at 224"):
        profiles.profile_from_shapes(inputs, {}, {"pixels": (8, 3, 256, 224)}, {})
    with pytest.raises(UserError, match="names 'image', which is not a model input"):
        profiles.check_profile(inputs, {"pixels": ((1, 3, 224, 224),) * 3, "image": ((1,), (1,), (1,))}, 0)


# ------------------------------------------------------------------------------------------------ buckets
def test_parse_seq_lens():
    assert profiles.parse_seq_lens("512,128, 2048") == [128, 512, 2048]
    assert profiles.parse_seq_lens(None) is None
    for bad, message in (("128,x", "comma-separated integers"), ("0,128", "positive"), ("128,128", "twice"),
                         ("", "positive")):
        with pytest.raises(UserError, match=message):
            profiles.parse_seq_lens(bad)


def test_seq_len_buckets_one_profile_each():
    got = profiles.seq_len_profiles(TOKENS_AND_MASK, [128, 512, 2048], batch=4)
    assert got == [
        {"input_ids": ((1, 1), (4, 128), (4, 128)), "attention_mask": ((1, 1), (4, 128), (4, 128))},
        {"input_ids": ((1, 129), (4, 512), (4, 512)), "attention_mask": ((1, 129), (4, 512), (4, 512))},
        {"input_ids": ((1, 513), (4, 2048), (4, 2048)), "attention_mask": ((1, 513), (4, 2048), (4, 2048))},
    ]
    profiles.check_profiles(TOKENS_AND_MASK, got)
    # every length up to the last bucket falls in exactly one profile, the one of its bucket
    for length, index in ((1, 0), (128, 0), (129, 1), (512, 1), (513, 2), (2048, 2)):
        assert profiles.select_profile(got, {"input_ids": (2, length), "attention_mask": (2, length)}) == index
    assert profiles.select_profile(got, {"input_ids": (2, 4096), "attention_mask": (2, 4096)}) is None
    assert profiles.select_profile(got, {"input_ids": (8, 128), "attention_mask": (8, 128)}) is None


def test_seq_len_buckets_use_the_model_axis_names():
    inputs = {"x": ("s", "batch", 64)}  # a sequence-first layout
    got = profiles.seq_len_profiles(inputs, [256], batch=2, dynamic_axes={"x": {0: "seq", 1: "batch"}})
    assert got == [{"x": ((1, 1, 64), (256, 2, 64), (256, 2, 64))}]
    # without names, axis 0 is the batch
    assert profiles.axis_roles(inputs) == {"x": {0: "batch", 1: "seq"}}


def test_seq_len_buckets_need_a_sequence_axis():
    with pytest.raises(UserError, match="needs a dynamic sequence axis, and this model has none"):
        profiles.seq_len_profiles({"pixels": ("batch", 3, 224, 224)}, [128], dynamic_axes={"pixels": {0: "batch"}})
    with pytest.raises(UserError, match="--batch must be at least 1"):
        profiles.seq_len_profiles(TOKENS, [128], batch=0)


def test_covering_profile_is_elementwise():
    got = profiles.covering_profile([{"x": (2, 128)}, {"x": (1, 512)}, {"x": (4, 256)}])
    assert got == {"x": ((1, 128), (2, 128), (4, 512))}


def test_select_profile_prefers_the_narrowest():
    wide = {"x": ((1, 1), (1, 512), (1, 4096))}
    narrow = {"x": ((1, 1), (1, 128), (1, 512))}
    assert profiles.select_profile([wide, narrow], {"x": (1, 300)}) == 1
    assert profiles.select_profile([wide, narrow], {"x": (1, 1000)}) == 0
    assert profiles.select_profile([wide], {"y": (1, 10)}) is None


def test_profiles_json_round_trip():
    got = profiles.seq_len_profiles(TOKENS, [64, 256])
    assert profiles.profiles_from_json(profiles.profiles_to_json(got)) == got
    with pytest.raises(UserError, match="malformed optimization profiles"):
        profiles.profiles_from_json([{"input_ids": {"min": [1]}}])
    assert profiles.describe_profiles(got) == \
        "input_ids 1x1..1x64 (opt 1x64) | input_ids 1x65..1x256 (opt 1x256)"


def test_check_profiles_needs_one_for_dynamic_inputs():
    with pytest.raises(UserError, match="dynamic inputs \\(input_ids\\) but no optimization profile"):
        profiles.check_profiles(TOKENS, [])
    profiles.check_profiles({"x": (1, 3)}, [])  # a static model needs none


# ------------------------------------------------------------------------------------------------ precision
def test_precision_flags_on_weakly_typed_tensorrt():
    flags = {"FP16", "BF16", "TF32"}
    assert precision.builder_flags("fp32", tensorrt_version="10.3.0", available_flags=flags, graph_types=set()) == []
    assert precision.builder_flags("fp16", tensorrt_version="10.3.0", available_flags=flags,
                                   graph_types={"float32"}) == ["FP16"]
    assert precision.builder_flags("bf16", tensorrt_version="10.3.0", available_flags=flags,
                                   graph_types={"float32"}) == ["BF16"]


def test_precision_on_strongly_typed_tensorrt_follows_the_graph():
    assert precision.builder_flags("fp16", tensorrt_version="11.1.0", available_flags={"TF32"},
                                   graph_types={"float16"}) == []
    with pytest.raises(UserError, match="strongly typed .* export the model in float16 for a fp16 engine") as info:
        precision.builder_flags("fp16", tensorrt_version="11.1.0", available_flags={"TF32"}, graph_types={"float32"})
    assert "TensorRT 11.1.0" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserError, match="precision must be one of fp32, fp16, bf16"):
        precision.builder_flags("int8", tensorrt_version="10.3.0", available_flags=set(), graph_types=set())


def test_graph_float_types():
    model = model_with_inputs(("x", TensorProto.FLOAT16, [1, 4]), ("ids", TensorProto.INT64, [1, 4]),
                              initializers=[numpy_helper.from_array(np.zeros(2, np.float32), "w")])
    assert precision.graph_float_types(model) == {"float16", "float32"}


def test_parity_tolerances_by_precision():
    assert precision.parity_tolerances("fp32") == (1e-4, 1e-3)
    assert precision.parity_tolerances("fp16") == (1e-2, 1e-2)
    assert precision.parity_tolerances("bf16") == (5e-2, 5e-2)
