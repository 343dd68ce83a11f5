"""The pass framework: every pass matches a candidate, verifies it, and only then replaces it.

match   a family pass finds an anchor (a softmax core, a feature-map product) and walks to the layer's boundary:
        the q/k/v tensors in [B, N, H*D] where the heads are split off, and the output where they are merged.
verify  the region between them must read nothing but q/k/v and static tensors (constants, shapes), must not
        leak an internal tensor, and the op's torch reference on the probe values of q/k/v must reproduce the
        probe value of the output at every probe shape.
replace the region's nodes are detached and one custom node (plus small static helpers) is inserted.
"""
from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..ops import OpContract
from .graph import GraphIndex
from .probe import Probe

# ops that only move data: walking through them from q/k/v keeps the same values
LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast", "Flatten", "Expand"}
GATHER_OPS = {"Gather", "GatherND", "GatherElements", "Slice", "Concat", "Pad", "Tile"}


class NotFused(Exception):
    """A candidate that is attention but cannot be fused; the message is the report's reason. `final`: no later
    family may fuse the layer either (e.g. a block layout computed from the data must not become another op)."""

    def __init__(self, reason: str, final: bool = False):
        super().__init__(reason)
        self.final = final


@dataclass(frozen=True)
class FamilyPass:
    """One fusion family: `candidates(index, probe)` yields anchors, `match(index, probe, candidate, prefix)` returns
    a verified Match or raises NotFused. Families run by ascending `priority`: a more specific family first, dense
    attention last, since it takes the softmax attention no other family claimed."""
    name: str
    priority: int
    op: OpContract
    candidates: Callable
    match: Callable
    anchor: Callable = lambda candidate: candidate  # the node a candidate is reported on (its softmax, ...)


FAMILY_PASSES: list[FamilyPass] = []


def register(family: FamilyPass) -> FamilyPass:
    FAMILY_PASSES.append(family)
    FAMILY_PASSES.sort(key=lambda f: f.priority)
    return family


@dataclass
class Match:
    """A verified region, ready to be replaced."""
    contract: OpContract
    name: str
    inputs: list[str]  # q, k, v (+ extra tensors created by the pass)
    output: str
    attrs: dict[str, Any]
    nodes: list[onnx.NodeProto]
    new_initializers: list[onnx.TensorProto] = field(default_factory=list)
    new_nodes: list[onnx.NodeProto] = field(default_factory=list)
    # nodes of the layer left in the graph on purpose (the QK^T product of materialised logits)
    kept: list[onnx.NodeProto] = field(default_factory=list)


@dataclass
class Rewrite:
    """What a match adds to the graph beside its custom node: helper nodes (layouts into and out of the op, a bias
    made from the score chain) and their constants. Builders append here instead of handing back node and
    initializer lists for the caller to thread through."""
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def node(self, op_type: str, inputs: list[str], output: str, name: str, **attrs) -> str:
        """Adds one single-output node; returns its output."""
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(constant(name, value))
        return name

    def evaluate(self, probe: Probe, outputs: list[str], opset_imports) -> None:
        """Runs what was added so far on every probe, so later steps can read the new tensors' values."""
        probe.evaluate(self.nodes, outputs, opset_imports, self.initializers)

    def match(self, contract: OpContract, name: str, inputs: list[str], output: str, attrs: dict[str, Any],
              nodes: list[onnx.NodeProto], kept: list[onnx.NodeProto] = ()) -> Match:
        return Match(contract, name, inputs, output, attrs, nodes, self.initializers, self.nodes, list(kept))


def scalar_value(index: GraphIndex, probe: Probe, name: str) -> float | None:
    """The value of a static scalar tensor that is the same at every probe shape, else None (a factor computed
    from the shape, such as 1/N, is not a constant)."""
    if not index.is_static(name):
        return None
    values = [run.get(name) for run in probe.runs]
    if any(v is None or np.size(v) != 1 for v in values):
        return None
    value = float(np.asarray(values[0]).reshape(()))
    return value if all(float(np.asarray(v).reshape(())) == value for v in values) else None


def walk_to_boundary(index: GraphIndex, probe: Probe, tensor: str, through: set[str] = frozenset()):
    """Walk up from `tensor` through layout ops (and `through`, e.g. gathers with static indices) and scalar
    scalings. Returns (boundary tensor, product of scalings, names of ops passed)."""
    factor, passed = 1.0, []
    while True:
        node = index.producer.get(tensor)
        if node is None:
            return tensor, factor, passed
        dynamic = index.dynamic_inputs(node)
        if len(dynamic) != 1:
            return tensor, factor, passed
        if node.op_type in ("Mul", "Div"):
            other = [i for i in node.input if i != dynamic[0]]
            value = scalar_value(index, probe, other[0]) if len(other) == 1 else None
            if value is None or (node.op_type == "Div" and node.input[0] != dynamic[0]) or value == 0:
                return tensor, factor, passed
            factor *= value if node.op_type == "Mul" else 1.0 / value
        elif node.op_type not in LAYOUT_OPS and node.op_type not in through:
            return tensor, factor, passed
        elif node.input[0] != dynamic[0] and node.op_type not in ("Concat",):
            return tensor, factor, passed
        passed.append(node.op_type)
        tensor = dynamic[0]


def untransposed(index: GraphIndex, probe: Probe, kt: str) -> tuple[str, bool]:
    """(k, False) when `kt` is a Transpose of k swapping only the last two axes; else (kt, True)."""
    node = index.producer.get(kt)
    if node is not None and node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        rank = len(probe.shape(kt) or ())
        if perm == [*range(rank - 2), rank - 1, rank - 2]:
            return node.input[0], False
    return kt, True


def find_output(index: GraphIndex, probe: Probe, starts: list[str], like: str, limit: int = 60) -> str | None:
    """The first tensor downstream of every start whose shape equals `like`'s at every probe: where heads merge."""
    descendant_sets = []
    for start in starts:
        nodes = index.descendants({start})[:limit]
        descendant_sets.append({o for n in nodes for o in n.output})
    common = set.intersection(*descendant_sets) if descendant_sets else set()
    for node in index.descendants(set(starts))[:limit]:
        for out in node.output:
            if out in common and probe.same_shape_in_all(out, like):
                return out
    return None


def region(index: GraphIndex, boundary: list[str], output: str) -> tuple[list[onnx.NodeProto], list[str]]:
    """Nodes between the boundary tensors and the output, and the dynamic tensors they read from outside."""
    stop = set(boundary)
    upstream = {id(n) for n in index.ancestors(output, stop)}
    # static nodes (shape arithmetic, layouts) stay in the graph: they only read shapes and constants
    nodes = [n for n in index.descendants(stop)
             if id(n) in upstream and not all(o in index.static for o in n.output if o)]
    produced = {o for n in nodes for o in n.output}
    outside = sorted({i for n in nodes for i in n.input
                      if i and i not in produced and i not in stop and not index.is_static(i)})
    return nodes, outside


def closed_region(index: GraphIndex, boundary: list[str], output: str, what: str = "attention"):
    """The region's nodes, refused unless it reads only the boundary and static tensors and leaks nothing."""
    nodes, outside = region(index, boundary, output)
    if outside:
        raise NotFused(f"the {what} also reads data-dependent tensor '{outside[0]}'")
    check_no_escape(index, nodes, output)
    return nodes


def keep_shared_layouts(index: GraphIndex, nodes: list[onnx.NodeProto], inputs: list[str]) -> list[onnx.NodeProto]:
    """Leave in the graph the layout nodes on the way to `inputs` (e.g. the per-head split of q) whose results are
    also read elsewhere (e.g. by Treeformer's routing): they compute the same thing whether fused or not."""
    ids = {id(n) for n in nodes}
    kept: set[int] = set()
    for tensor in inputs:
        for node in index.ancestors(tensor, stop=set()):
            if id(node) not in ids or node.op_type not in LAYOUT_OPS:
                continue
            used_outside = any(id(c) not in ids for o in node.output for c in index.consumers.get(o, []))
            if used_outside:
                kept.update(id(a) for a in index.ancestors(node.output[0], stop=set()) if id(a) in ids)
    return [n for n in nodes if id(n) not in kept]


def escaping_tensor(index: GraphIndex, nodes: list[onnx.NodeProto], output: str):
    """The first tensor made inside `nodes` (other than `output`) that is read outside them, with its outside
    reader (None for a graph output); None when nothing escapes."""
    ids = {id(n) for n in nodes}
    for node in nodes:
        for out in node.output:
            if not out or out == output:
                continue
            if out in index.graph_outputs:
                return out, None
            users = [c for c in index.consumers.get(out, []) if id(c) not in ids and not _only_feeds(index, c, ids)]
            if users:
                return out, users[0]
    return None


def check_no_escape(index: GraphIndex, nodes: list[onnx.NodeProto], output: str) -> None:
    leak = escaping_tensor(index, nodes, output)
    if leak is None:
        return
    tensor, user = leak
    if user is None:
        raise NotFused(f"intermediate tensor '{tensor}' is a graph output")
    raise NotFused(f"intermediate tensor '{tensor}' is also used outside the attention ({user.op_type} '{user.name}')")


def _only_feeds(index: GraphIndex, node: onnx.NodeProto, ids: set[int]) -> bool:
    """True for a shape computation whose results reach only the region: it disappears with the region."""
    if not all(o in index.static for o in node.output if o):
        return False
    todo, seen = list(node.output), set()
    while todo:
        t = todo.pop()
        if t in index.graph_outputs:
            return False
        for user in index.consumers.get(t, []):
            if id(user) in ids or id(user) in seen:
                continue
            if not all(o in index.static for o in user.output if o):
                return False
            seen.add(id(user))
            todo.extend(user.output)
    return True


def verify_numerically(contract: OpContract, probe: Probe, inputs: list, output, attrs: dict,
                       atol: float = 1e-4, rtol: float = 1e-3) -> str:
    """Empty string when the op's reference reproduces the graph's output at every probe; else why not.
    `inputs` and `output` hold tensor names (values read from the probe) or callables run -> array."""
    for run in range(len(probe.runs)):
        values = probe.runs[run]
        args = [torch.from_numpy(np.array(x(run) if callable(x) else values[x])) for x in inputs]
        expected = output(run) if callable(output) else values[output]
        try:
            got = contract.reference(*args, **attrs).numpy()
        except Exception as e:  # a wrong guess of attributes or roles; report it as a mismatch
            return f"reference failed ({str(e).splitlines()[0]})"
        if got.shape != expected.shape:
            return f"shape {got.shape} vs {expected.shape}"
        err = np.abs(got - expected)
        # plus a float32 rounding floor at the tensor's own scale: a sum of large terms (relu^2 weights of a deep
        # layer reach 1e5) may end small, and two summation orders then differ by more than rtol of that small value
        defined = np.isfinite(expected)
        bound = atol + rtol * np.abs(expected) + 1e-6 * float(np.abs(expected[defined]).max(initial=0.0))
        # where the graph itself gives NaN (softmax over a row masked with -inf) the op's zeros are the answer
        if not np.all((err <= bound) | np.isnan(expected)):
            worst = float(np.nanmax(np.where(np.isnan(expected), 0.0, err)))
            return f"max abs error {worst:.3g} at probe {run} (shape {expected.shape})"
    return ""


_FLOAT_PROTO = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float16): onnx.TensorProto.FLOAT16,
                np.dtype(np.float64): onnx.TensorProto.DOUBLE}


def match_float_types(m: Match, dtype_of: Callable[[str], np.dtype | None]) -> None:
    """Give every floating input of the custom node the float type of its input 0, in place.

    The plugins take one float type across a node's floating inputs, and TensorRT 11 builds strongly typed (an fp16
    engine is an fp16 graph), while the passes emit their constants (a feature projection, mask fill values) in
    float32: such an initializer is converted, any other floating input whose type differs or is not known (a bias
    the pass computes) gets a Cast. A float32 graph is left as it is."""
    want = dtype_of(m.inputs[0])
    if want is None or want not in _FLOAT_PROTO or want == np.float32:
        return
    target = _FLOAT_PROTO[want]
    inits = {t.name: t for t in m.new_initializers}
    for i, name in enumerate(m.inputs[1:], start=1):
        spec = m.contract.inputs[i] if i < len(m.contract.inputs) else None
        if not name or spec is None or "int32" in spec.dtypes:
            continue
        if name in inits:
            t = inits[name]
            if t.data_type in _FLOAT_PROTO.values() and t.data_type != target:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(want), t.name))
            continue
        have = dtype_of(name)
        if have is not None and have == want:
            continue
        cast = f"{m.name}/{spec.name}_as_{want.name}"
        m.new_nodes.append(helper.make_node("Cast", [name], [cast], name=f"{cast}/cast", to=target))
        m.inputs[i] = cast


def replace_all(model: onnx.ModelProto, matches: list[Match], static: set[str],
                dtype_of: Callable[[str], np.dtype | None] | None = None) -> None:
    """Detach exactly the matched nodes and insert each match's custom node and static helpers (floating inputs
    brought to one type where `dtype_of` tells the probed types)."""
    if dtype_of is not None:
        for m in matches:
            match_float_types(m, dtype_of)
    removed = {id(n) for m in matches for n in m.nodes}
    # a kept shape computation may still read a region tensor (e.g. a layout sized from the split queries):
    # keep the region nodes that produce it
    producer = {o: n for n in model.graph.node for o in n.output}
    todo = [i for n in model.graph.node if id(n) not in removed and all(
        o in static for o in n.output if o) for i in n.input]
    while todo:
        node = producer.get(todo.pop())
        if node is not None and id(node) in removed:
            removed.discard(id(node))
            todo.extend(node.input)
    new_nodes = [n for n in model.graph.node if id(n) not in removed]
    for m in matches:
        new_nodes += m.new_nodes + [m.contract.make_node(m.inputs, [m.output], m.name, m.attrs)]
        model.graph.initializer.extend(m.new_initializers)
        if not any(o.domain == m.contract.domain for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(m.contract.domain, 1))
    copies = []
    for node in new_nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copies.append(copy)
    del model.graph.node[:]
    model.graph.node.extend(copies)


def run_nodes(nodes: list[onnx.NodeProto], output: str, values: Mapping[str, np.ndarray], opset_imports,
              initializers: list[onnx.TensorProto] = (), ir_version: int | None = None) -> np.ndarray:
    """Evaluate `output` from `nodes` (in topological order) on onnxruntime; every other tensor they read comes
    from `values`."""
    return run_nodes_many(nodes, [output], values, opset_imports, initializers, ir_version)[0]


def run_nodes_many(nodes: list[onnx.NodeProto], outputs: list[str], values: Mapping[str, np.ndarray], opset_imports,
                   initializers: list[onnx.TensorProto] = (), ir_version: int | None = None) -> list[np.ndarray]:
    """run_nodes for several outputs, in one session."""
    import onnxruntime as ort

    produced = {o for n in nodes for o in n.output} | {t.name for t in initializers}
    needed = sorted({i for n in nodes for i in n.input if i and i not in produced})
    feeds = {name: np.asarray(values[name]) for name in needed}
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), None)
              for name, v in feeds.items()]
    graph = helper.make_graph(nodes, "subgraph", inputs, [onnx.ValueInfoProto(name=o) for o in outputs],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=opset_imports)
    if ir_version is not None:
        model.ir_version = ir_version
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def run_subgraph(index: GraphIndex, feeds: dict[str, np.ndarray], output: str, values: dict) -> np.ndarray:
    """Evaluate `output` with some tensors replaced by `feeds`; everything else it needs comes from `values`."""
    nodes = sorted(index.ancestors(output, stop=set(feeds)), key=lambda n: index.position[id(n)])
    return run_nodes(nodes, output, ChainMap(feeds, values), index.model.opset_import,
                     ir_version=index.model.ir_version)


def unsqueeze_to_rank(tensor: str, rank: int, name: str, rewrite: Rewrite, target: int = 4) -> str:
    """A bias of lower rank broadcasts as [.., Nq, Nk]: gives it rank `target` (4, or the rank of chunked scores)."""
    if rank == target:
        return tensor
    axes = rewrite.constant(f"{name}/bias_axes", np.arange(target - rank, dtype=np.int64))
    return rewrite.node("Unsqueeze", [tensor, axes], f"{name}/bias", name=f"{name}/bias_rank{target}")


def constant(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(value), name)


def has_dynamic_shapes(model: onnx.ModelProto) -> bool:
    return any(not d.HasField("dim_value") for i in model.graph.input for d in i.type.tensor_type.shape.dim)


def static_tensor_matching(index: GraphIndex, probe: Probe, expected: list[np.ndarray], ignore_rows: list,
                           before: str) -> str | None:
    """A static integer tensor whose values equal `expected[run]` at every probe (negative entries mean "none",
    rows in ignore_rows[run] are not compared). Used to keep a shape-dependent layout computed in the graph.
    Only tensors that do not depend on `before` (the fused layer's output) qualify: another layer's identical table,
    computed from the shape of a later tensor, would make the fused graph a cycle. The earliest match is taken."""
    downstream = {o for n in index.descendants({before}) for o in n.output}
    producer_position = {name: index.position[id(index.producer[name])] if name in index.producer else -1
                         for name in index.static}
    for name in sorted(index.static - downstream, key=lambda t: (producer_position[t], t)):
        if name in index.initializers and not index.consumers.get(name):
            continue
        ok = True
        for run, want in enumerate(expected):
            value = probe.runs[run].get(name)
            if value is None or not np.issubdtype(np.asarray(value).dtype, np.integer) or value.ndim != want.ndim:
                ok = False
                break
            if value.shape[1:] != want.shape[1:] or value.shape[0] not in (1, want.shape[0]):
                ok = False
                break
            got = np.where(np.broadcast_to(value, want.shape) >= 0, np.broadcast_to(value, want.shape), -1)
            rows = [r for r in range(want.shape[1]) if r not in ignore_rows[run]]
            if not np.array_equal(got[:, rows], want[:, rows]):
                ok = False
                break
        if ok:
            return name
    return None
