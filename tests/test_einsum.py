"""Einsum → MatMul normalisation: every equation research code writes attention with is rewritten without Einsum,
and the rewrite computes the Einsum's own values."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attn_export.passes.einsum import normalize_einsums
from attn_export.passes.probe import Probe

# (equation, operand shapes) as performer-pytorch, FLASH-pytorch and others write them
EQUATIONS = [
    ("...id,...jd->...ij", [(2, 3, 5, 4), (2, 3, 6, 4)]),
    ("...nd,...d->...n", [(2, 3, 5, 4), (2, 3, 4)]),
    ("...nd,...ne->...de", [(2, 3, 5, 4), (2, 3, 5, 7)]),
    ("...de,...nd,...n->...ne", [(2, 3, 4, 7), (2, 3, 5, 4), (2, 3, 5)]),
    ("... d, h d -> ... h d", [(2, 5, 4), (3, 4)]),
    ("b g n d, b g n e -> b d e", [(2, 3, 5, 4), (2, 3, 5, 7)]),
    ("b g n d, b d e -> b g n e", [(2, 3, 5, 4), (2, 4, 7)]),
    ("bhid,bhjd->bhij", [(2, 3, 5, 4), (2, 3, 6, 4)]),
    ("bhij,bhjd->bihd", [(2, 3, 5, 6), (2, 3, 6, 4)]),
    ("bid,bjd->bij", [(2, 5, 4), (2, 6, 4)]),
    ("bnd,de->bne", [(2, 5, 4), (4, 7)]),
    ("bhnd,bhn->bhd", [(2, 3, 5, 4), (2, 3, 5)]),
    ("ij,ij->i", [(5, 4), (5, 4)]),
    ("bi,bj->bij", [(2, 5), (2, 4)]),
]


def einsum_model(equation, shapes):
    names = [f"x{i}" for i in range(len(shapes))]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip(names, shapes)]
    node = helper.make_node("Einsum", names, ["y"], equation=equation, name="einsum")
    out_shape = np.einsum(equation.replace(" ", ""), *[np.zeros(s) for s in shapes]).shape
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.mark.parametrize("equation,shapes", EQUATIONS)
def test_einsum_is_rewritten_and_keeps_its_values(equation, shapes):
    model = einsum_model(equation, shapes)
    probe = Probe(model)
    expected = [run["y"].copy() for run in probe.runs]
    np.testing.assert_allclose(expected[0], np.einsum(equation.replace(" ", ""), *[probe.runs[0][f"x{i}"]
                                                                                   for i in range(len(shapes))]),
                               rtol=1e-5, atol=1e-5)
    assert normalize_einsums(model, probe) == 1
    assert "Einsum" not in {n.op_type for n in model.graph.node}
    onnx.checker.check_model(model)
    for values, want in zip(Probe(model).runs, expected):
        np.testing.assert_allclose(values["y"], want, rtol=1e-5, atol=1e-5)


def test_a_diagonal_einsum_is_left_as_it_is():
    model = einsum_model("ii->i", [(4, 4)])
    assert normalize_einsums(model, Probe(model)) == 0
    assert [n.op_type for n in model.graph.node] == ["Einsum"]
