"""A fused node's floating inputs share input 0's float type (issue 14, item 7): the plugins require one float
type per node and TensorRT 11 builds strongly typed, so an fp16 graph must not feed float32 constants."""
import numpy as np
from onnx import TensorProto, numpy_helper

from attn_export.ops import OPS
from attn_export.passes.framework import Match, match_float_types


def _match(projection_dtype):
    projection = numpy_helper.from_array(np.ones((8, 4), projection_dtype), "layer/projection")
    return Match(OPS["KernelizedAttention"], "layer", ["q", "k", "v", "layer/projection"], "out",
                 {"num_heads": 1}, [], [projection])


def test_fp16_graph_gets_fp16_projection_and_casts_for_other_inputs():
    m = _match(np.float32)
    types = {"q": np.dtype(np.float16), "k": np.dtype(np.float16), "v": np.dtype(np.float32)}
    match_float_types(m, types.get)
    assert m.new_initializers[0].data_type == TensorProto.FLOAT16
    assert numpy_helper.to_array(m.new_initializers[0]).dtype == np.float16
    assert m.inputs[:2] == ["q", "k"]  # already fp16: untouched
    cast = [n for n in m.new_nodes if n.op_type == "Cast"]
    assert len(cast) == 1 and cast[0].input == ["v"] and m.inputs[2] == cast[0].output[0]
    assert cast[0].attribute[0].i == TensorProto.FLOAT16


def test_unknown_type_in_fp16_graph_is_cast_and_fp32_graph_is_left_alone():
    m = _match(np.float32)
    match_float_types(m, {"q": np.dtype(np.float16)}.get)  # k, v computed by the pass: type not probed
    assert [n.input[0] for n in m.new_nodes] == ["k", "v"]
    m = _match(np.float32)
    match_float_types(m, {"q": np.dtype(np.float32)}.get)
    assert m.new_nodes == [] and m.inputs == ["q", "k", "v", "layer/projection"]
    assert m.new_initializers[0].data_type == TensorProto.FLOAT


def test_integer_tables_keep_their_type():
    table = numpy_helper.from_array(np.zeros((1, 2, 1), np.int32), "layer/table")
    m = Match(OPS["BlockSparseAttention"], "layer", ["q", "k", "v", "layer/table"], "out", {"num_heads": 1}, [],
              [table])
    match_float_types(m, {"q": np.dtype(np.float16), "k": np.dtype(np.float16), "v": np.dtype(np.float16)}.get)
    assert m.new_nodes == [] and m.new_initializers[0].data_type == TensorProto.INT32
