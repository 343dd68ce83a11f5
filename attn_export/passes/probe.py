"""Run a graph on onnxruntime at two or more valid input shapes and keep every intermediate tensor.

Passes read shapes and values from these runs: a matched subgraph is verified against the op's reference on the
very tensors the graph computes, and layouts are read off the values of static tensors."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper

from ..errors import UserError
from ..export import PROBE_SHAPES_KEY, get_metadata
from ..ops.functions import with_function_bodies

DEFAULT_PROBE_LENGTHS = (128, 256)


def probe_shapes(model: onnx.ModelProto) -> list[dict[str, list[int]]]:
    """Shapes recorded at export, else symbolic axes set to 1 or 2 (axis 0) and 128 or 256 (other axes)."""
    recorded = get_metadata(model, PROBE_SHAPES_KEY)
    if recorded:
        return json.loads(recorded)
    inits = {t.name for t in model.graph.initializer}
    shapes = []
    for batch, length in zip((2, 1), DEFAULT_PROBE_LENGTHS):
        shape_set = {}
        for inp in model.graph.input:
            if inp.name in inits:
                continue
            dims = inp.type.tensor_type.shape.dim
            shape_set[inp.name] = [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else length)
                                   for i, d in enumerate(dims)]
        shapes.append(shape_set)
    return shapes


def random_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int,
                  fully_masked_row: bool = False) -> dict[str, np.ndarray]:
    """Random floats; integer and boolean inputs of rank 2 or more as padding masks (0/1 ids are valid for any
    vocabulary too): batch row 0 full, later rows with a shorter valid prefix, and with `fully_masked_row` the last
    row all padding, so masks with padded and fully masked rows reach the verifier."""
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        shape = shapes[inp.name]
        if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            feeds[inp.name] = (padding_mask(shape, fully_masked_row) if len(shape) >= 2
                               else rng.integers(0, 2, size=shape)).astype(dtype)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def padding_mask(shape: list[int], fully_masked_row: bool = False) -> np.ndarray:
    """1 for the valid prefix of each batch row along the last axis: row b keeps N - b*N/(2B) positions (at least
    one); the last row keeps none with `fully_masked_row`."""
    batch, n = shape[0], shape[-1]
    mask = np.zeros(shape, np.int64)
    for b in range(batch):
        mask[b, ..., :max(1, n - (b * n) // (2 * batch))] = 1
    if fully_masked_row and batch > 1:
        mask[-1] = 0
    return mask


def mask_inputs(model: onnx.ModelProto) -> list[str]:
    """The integer and boolean inputs of rank 2 or more: padding masks (or ids, which take 0/1 as well)."""
    inits = {t.name for t in model.graph.initializer}
    return [inp.name for inp in model.graph.input if inp.name not in inits and len(inp.type.tensor_type.shape.dim) >= 2
            and (np.issubdtype(dtype := helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type), np.integer)
                 or dtype == np.bool_)]


def run_all_tensors(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    probe = with_function_bodies(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for out in node.output:
            if out and out not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=out))
                known.add(out)
    ort.set_default_logger_severity(3)  # graph-optimizer notes are not the user's business
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # errors reach the user as one line of ours
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds)))
    values.update(feeds)
    for init in model.graph.initializer:
        values[init.name] = onnx.numpy_helper.to_array(init)
    return values


class Probe:
    """Values of every tensor at each probe shape set."""

    def __init__(self, model: onnx.ModelProto):
        self.shapes = probe_shapes(model)
        # the exporter's symbolic shapes ("batch", "(seq//8)", 4), where it wrote them: what holds at every shape
        self.symbols = {v.name: tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                                      for d in v.type.tensor_type.shape.dim)
                        for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]
                        if v.type.tensor_type.HasField("shape")}
        self.feeds = [random_inputs(model, s, seed=i) for i, s in enumerate(self.shapes)]
        masks = mask_inputs(model)
        if masks and all(self.shapes[0][name][0] > 1 for name in masks):
            # one more run where a whole batch row is padding: fully masked rows are where -inf and finite
            # fills (finfo.min, -10000) differ, and a fusion must reproduce the graph there too
            self.shapes = [*self.shapes, self.shapes[0]]
            self.feeds.append(random_inputs(model, self.shapes[0], seed=0, fully_masked_row=True))
        try:
            self.runs = [run_all_tensors(model, f) for f in self.feeds]
        except Exception as e:
            reason = str(e).splitlines()[0]
            raise UserError(f"cannot run the graph on onnxruntime to verify fusions: {reason}") from None

    def evaluate(self, nodes: list, outputs: list[str], opset_imports, initializers=()) -> None:
        """Run new nodes (a pass's rewrite) on every probe and keep their `outputs` like the graph's own tensors."""
        from .framework import run_nodes  # framework reads Probe: imported here, not at the top

        for values in self.runs:
            for name in outputs:
                values[name] = run_nodes(nodes, name, values, opset_imports, initializers)

    def shape(self, name: str, run: int = 0) -> tuple | None:
        value = self.runs[run].get(name)
        return None if value is None else tuple(np.shape(value))

    def same_symbolic_dims(self, a: str, b: str, axes) -> bool:
        """Whether `a` and `b` have the same size on `axes` at every input shape, as the exporter's symbolic shapes
        state it (False where it wrote none)."""
        sa, sb = self.symbols.get(a), self.symbols.get(b)
        if sa is None or sb is None or len(sa) != len(sb):
            return False
        return all(sa[i] is not None and sa[i] == sb[i] for i in axes)

    def same_shape_in_all(self, a: str, b: str) -> bool:
        return all(self.shape(a, r) is not None and self.shape(a, r) == self.shape(b, r) for r in range(len(self.runs)))
