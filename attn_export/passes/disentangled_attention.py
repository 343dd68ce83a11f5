"""Fuse DeBERTa's disentangled attention (content + relative-position terms) into DisentangledAttention.

What the layer computes, however it is written (bmm on [B*H, N, D] or matmul on [B, H, N, D], reshapes between the
sum and the softmax, a Where mask with a finite fill):
  S = c * (q k^T + gather(q rel_key^T, delta) + gather(k rel_query^T, delta^T)^T),  softmax(S + bias) v
match   a softmax whose scores are a sum of terms, each a product walked up (layouts, scalar scalings, a gather along
        the last axis) to a MatMul: one of q and k (the content term), the others of q or k with a static table of
        2*span rows (c2p, p2c). What lies between that sum and the softmax is applied to a zero score and becomes
        the op's bias (a padding mask stays computed in the graph; it may read nothing but the mask).
identify span from the table rows; max_position from the bucket constants the graph computes its index with (or
        the index table it slices), kept only where the op's relative_index equals every gather index at every probe.
verify  the op's reference on the graph's own q, k, v, tables and bias reproduces the layer's output at every probe.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import helper

from ..ops import DISENTANGLED_ATTENTION
from ..ops.disentangled_attention import default_scale, log_bucket, log_denominator, relative_index
from .framework import (LAYOUT_OPS, FamilyPass, Match, NotFused, Rewrite, closed_region, constant, find_output,
                        register, run_nodes, scalar_value, unsqueeze_to_rank, verify_numerically)
from .graph import GraphIndex
from .probe import Probe
from .score_chain import score_chain
from .softmax_core import axis_is_last, softmax_nodes, value_product

OP = DISENTANGLED_ATTENTION
GATHERS = {"GatherElements", "Gather"}
# a static bias built only from these reads the shape through sizes, never through positions: zero at the probes
# means zero at every length (a window or causal mask needs a Range, a Trilu or a table)
POSITIONAL_OPS = {"Range", "Trilu", "EyeLike", "Pad", "ScatterND", "ScatterElements", "OneHot", "CumSum"}


def _score_ancestry(index: GraphIndex, scores: str, limit: int = 80):
    """Dynamic nodes above the softmax input up to (and including) the first MatMuls: a bounded breadth-first walk."""
    seen, order, todo = set(), [], [scores]
    while todo and len(order) < limit:
        node = index.producer.get(todo.pop(0))
        if node is None or id(node) in seen or all(o in index.static for o in node.output if o):
            continue
        seen.add(id(node))
        order.append(node)
        if node.op_type != "MatMul":
            todo.extend(index.dynamic_inputs(node))
    return order


def _is_position_product(index: GraphIndex, node: onnx.NodeProto) -> bool:
    return node.op_type == "MatMul" and len(index.dynamic_inputs(node)) == 1


def _value_product(index: GraphIndex, softmax: onnx.NodeProto) -> onnx.NodeProto | None:
    """MatMul(weights, v), through the NaN guard of masked rows or through layouts (HF's bmm on [B*H, N, N])."""
    pv = value_product(index, softmax)
    tensor = softmax.output[0]
    while pv is None:
        users = [u for u in index.consumers.get(tensor, []) if not all(o in index.static for o in u.output if o)]
        if len(users) != 1:  # a Shape of the weights is no reader
            return None
        if users[0].op_type == "MatMul" and users[0].input[0] == tensor:
            return users[0]
        if users[0].op_type not in LAYOUT_OPS:
            return None
        tensor = users[0].output[0]
    return pv


def candidates(index: GraphIndex, probe: Probe):
    """Softmax attention whose scores add a gathered product of the data with a static table (a relative term)."""
    for softmax in softmax_nodes(index):
        if not axis_is_last(softmax, probe) or _value_product(index, softmax) is None:
            continue
        if any(_gathers_a_position_product(index, probe, n) for n in _score_ancestry(index, softmax.input[0])):
            yield softmax


def _gathers_a_position_product(index: GraphIndex, probe: Probe, node: onnx.NodeProto) -> bool:
    """A GatherElements along the last axis of a product of the data with a static tensor: a relative term (not
    BigBird's gather of key blocks, which picks whole blocks along another axis)."""
    if node.op_type != "GatherElements" or not index.dynamic_inputs(node) or node.input[0] in index.static:
        return False
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if axis not in (-1, len(probe.shape(node.input[0]) or ()) - 1):
        return False
    source, _, _ = _walk(index, probe, node.input[0], through_gather=False)
    product = index.producer.get(source)
    return product is not None and _is_position_product(index, product)


class _Term:
    """One summand of the scores: the MatMul it walks up to, the scalar factor on the way, the gather it passed."""

    def __init__(self, product: onnx.NodeProto, factor: float, gather: onnx.NodeProto | None):
        self.product, self.factor, self.gather = product, factor, gather


def _walk(index: GraphIndex, probe: Probe, tensor: str, through_gather: bool):
    """Up from `tensor` through layouts, scalar Mul/Div and (with `through_gather`) one gather of the data along the
    last axis: (tensor reached, factor, gather passed or None)."""
    factor, gather = 1.0, None
    while True:
        node = index.producer.get(tensor)
        if node is None:
            return tensor, factor, gather
        dynamic = index.dynamic_inputs(node)
        if node.op_type in GATHERS and through_gather and gather is None and node.input[0] in dynamic:
            gather = node  # its index may be data-dependent: the caller says so, rather than "not a product"
            tensor = node.input[0]
            continue
        if len(dynamic) != 1 or (node.input[0] != dynamic[0] and node.op_type not in ("Mul", "Add")):
            return tensor, factor, gather
        if node.op_type in ("Mul", "Div"):
            value = scalar_value(index, probe, [i for i in node.input if i != dynamic[0]][0])
            if value is None or value == 0 or (node.op_type == "Div" and node.input[0] != dynamic[0]):
                return tensor, factor, gather
            factor *= value if node.op_type == "Mul" else 1.0 / value
        elif node.op_type in ("Add", "Sub"):  # TorchScript keeps the 0 that `score = 0; score += ...` starts from
            if scalar_value(index, probe, [i for i in node.input if i != dynamic[0]][0]) != 0.0:
                return tensor, factor, gather
        elif node.op_type not in LAYOUT_OPS:
            return tensor, factor, gather
        tensor = dynamic[0]


def _holds_a_position_product(index: GraphIndex, tensor: str) -> bool:
    """Whether `tensor` is computed from a product of the data with a static table (a relative term), not a mask."""
    return any(_is_position_product(index, n) for n in _score_ancestry(index, tensor))


def _scaling(index: GraphIndex, probe: Probe, node: onnx.NodeProto) -> float:
    """The factor a chain step scales the scores by (score_chain has checked it is a constant scalar): 1 if none."""
    if node.op_type not in ("Mul", "Div"):
        return 1.0
    value = scalar_value(index, probe, next(i for i in node.input if index.is_static(i)))
    return value if node.op_type == "Mul" else 1.0 / value


def _terms(index: GraphIndex, probe: Probe, total: str) -> list[_Term]:
    """The summands of the score sum (a tree of Adds), each walked up to its product."""
    node = index.producer.get(total)
    if node is not None and node.op_type == "Add" and len(index.dynamic_inputs(node)) == 2:
        return _terms(index, probe, node.input[0]) + _terms(index, probe, node.input[1])
    tensor, factor, gather = _walk(index, probe, total, through_gather=True)
    product = index.producer.get(tensor)
    if product is None or product.op_type != "MatMul":
        what = product.op_type if product is not None else "a graph input"
        raise NotFused(f"a score term is not a product (it comes from {what})")
    return [_Term(product, factor, gather)]


def _boundary(index: GraphIndex, probe: Probe, tensor: str) -> tuple[str, float]:
    reached, factor, _ = _walk(index, probe, tensor, through_gather=False)
    return reached, factor


def _table(index: GraphIndex, probe: Probe, tensor: str, heads: int, head_dim: int):
    """The static relative table behind a product's static operand, as [2*span, H*D]: walked up through layouts
    (the per-head split, a Tile or Expand over the batch) to the first tensor of [..1.., R, H*D] or [..1.., H, R, D].
    Returns (tensor, rows, per_head) or None."""
    while True:
        shapes = [probe.shape(tensor, r) for r in range(len(probe.runs))]
        if shapes[0] is not None and all(s == shapes[0] for s in shapes):
            dims = list(shapes[0])
            while len(dims) > 2 and dims[0] == 1:
                dims = dims[1:]
            if len(dims) == 2 and dims[1] == heads * head_dim:
                return tensor, dims[0], False
            if len(dims) == 3 and dims[0] == heads and dims[2] == head_dim:
                return tensor, dims[1], True
        node = index.producer.get(tensor)
        if node is None or node.op_type not in LAYOUT_OPS | {"Tile"}:
            return None
        tensor = node.input[0]


def _table_input(probe: Probe, tensor: str, per_head: bool, heads: int, head_dim: int, name: str,
                 rewrite: Rewrite):
    """The op's [2*span, H*D] table from the graph's static table: (name, value per run)."""
    value = np.asarray(probe.runs[0][tensor])
    source = tensor
    if per_head:  # [.., H, R, D] -> [R, H, D]
        value = value.reshape(heads, -1, head_dim).transpose(1, 0, 2)
        split = rewrite.node("Reshape", [tensor, rewrite.constant(f"{name}_heads", np.array(
            [heads, -1, head_dim], np.int64))], f"{name}_split", name=f"{name}/split")
        source = rewrite.node("Transpose", [split], f"{name}_rows", name=f"{name}/rows_first", perm=[1, 0, 2])
    value = np.ascontiguousarray(value.reshape(-1, heads * head_dim))
    rewrite.node("Reshape", [source, rewrite.constant(f"{name}_shape", np.array([-1, heads * head_dim], np.int64))],
                 name, name=f"{name}/reshape")
    return name, (lambda run: value)


def _index_values(probe: Probe, gather: onnx.NodeProto, run: int) -> np.ndarray | None:
    """The [N, N] index a gather along the last axis reads (every leading slice the same), else None."""
    axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
    rank = len(probe.shape(gather.input[0], run) or ())
    if gather.op_type != "GatherElements" or axis not in (-1, rank - 1):
        return None
    value = np.asarray(probe.runs[run][gather.input[1]])
    if value.ndim < 2:
        return None
    flat = value.reshape(-1, *value.shape[-2:])
    return flat[0] if np.all(flat == flat[:1]) else None


def _max_position_candidates(index: GraphIndex, probe: Probe, gathers: list[onnx.NodeProto], span: int) -> list[int]:
    """max_position values the graph's index computation names: a float constant equal to transformers'
    log((L - 1) / mid) or to (L - 1) / mid, or an integer [L, L] index table it slices; then 0 (no buckets)."""
    mid, found = span // 2, []
    if mid < 1:
        return [0]
    for gather in gathers:
        # only the static computation of the index: a Shape is where it stops reading the graph
        for node in index.ancestors(gather.input[1], stop=set(index.graph_inputs) | _dynamic(index)):
            for t in [*node.input, *node.output]:
                value = probe.runs[0].get(t) if t in index.static else None
                if value is None:
                    continue
                value = np.asarray(value)
                if value.size == 1 and np.issubdtype(value.dtype, np.floating) and 0 < float(value) < 1e6:
                    c = np.float32(value.reshape(()))
                    named = {round(float(c) * mid) + 1} | ({round(mid * math.exp(float(c))) + 1} if c < 30 else set())
                    for mp in named:
                        if mp > mid + 1 and (abs(log_denominator(span, mp) - c) <= 4 * np.spacing(c)
                                             or np.float32((mp - 1) / mid) == c):
                            found.append(mp)
                elif (t in index.initializers and np.issubdtype(value.dtype, np.integer) and value.ndim >= 2
                      and value.shape[-1] == value.shape[-2] > mid):
                    found += _max_positions_of_table(value.reshape(-1, *value.shape[-2:])[0], span)
    return list(dict.fromkeys(found)) + [0]


def _dynamic(index: GraphIndex) -> set[str]:
    return {o for n in index.nodes for o in n.output if o and o not in index.static}


def _max_positions_of_table(table: np.ndarray, span: int) -> list[int]:
    """The smallest L whose relative index is this [L', L'] table (delta or its transpose): no longer sequence reads
    it, so every L that reproduces the whole table is the same layer."""
    n = table.shape[-1]
    relative = torch.arange(-(n - 1), n)
    want = np.concatenate([table[0, ::-1][:-1], table[:, 0]])  # the table's row for i - j = -(n-1) .. n-1
    for wanted, transposed in ((want, False), (want[::-1], True)):
        for mp in range(span // 2 + 2, 4 * n + 2 * span):  # compared on the differences first: one row, not n^2
            bucket = (log_bucket(relative, span, mp) + span).clamp(0, 2 * span - 1).numpy()
            if np.array_equal(bucket, wanted):
                delta = relative_index(n, n, span, mp).numpy()
                return [mp] if np.array_equal(table, delta.T if transposed else delta) else []
    return []


def _reads_relative_index(probe: Probe, gathers: list[tuple[onnx.NodeProto, bool]], n_of_run, span: int,
                          max_position: int) -> bool:
    for run in range(len(probe.runs)):
        delta = relative_index(n_of_run(run), n_of_run(run), span, max_position).numpy()
        for gather, transposed in gathers:
            got = _index_values(probe, gather, run)
            if got is None or not np.array_equal(got, delta.T if transposed else delta):
                return False
    return True


def _bias(index: GraphIndex, probe: Probe, steps: list, sides: list[str], name: str, rewrite: Rewrite):
    """The chain's steps that add no position term, applied to a zero score (its layout steps and scalings dropped:
    a zero has none, and the scalings are the op's scale), rank 4, its nodes added to `rewrite`. Returns (bias or
    None, values)."""
    nodes = []
    zero = f"{name}/zero_scores"
    carrier = zero
    for node, slot in steps:
        if node.op_type in (LAYOUT_OPS - {"Cast"}) | {"Mul", "Div"}:
            continue
        inputs = [carrier if i == slot else t for i, t in enumerate(node.input)]  # the mask stays the graph's
        copy = helper.make_node(node.op_type, inputs, [f"{name}/bias/{node.output[0]}"],
                                name=f"{name}/bias/{node.name}")
        copy.attribute.extend(node.attribute)
        carrier = copy.output[0]
        nodes.append(copy)
    if not any(n.op_type in ("Add", "Sub", "Where") for n in nodes):
        return None, []
    dtype = np.asarray(probe.runs[0][steps[0][0].input[steps[0][1]]]).dtype
    inits = [constant(zero, np.zeros((), dtype))]
    values = [run_nodes(nodes, carrier, run, index.model.opset_import, inits) for run in probe.runs]
    rank = np.ndim(values[0])
    if rank > 4:
        raise NotFused(f"the score bias has rank {rank}, more than [B, H, Nq, Nk]")
    if _absent(index, nodes, sides, values):
        return None, []
    rewrite.nodes.extend(nodes)
    rewrite.initializers.extend(inits)
    bias = unsqueeze_to_rank(carrier, rank, name, rewrite)
    return bias, [np.asarray(v).reshape((1,) * (4 - rank) + np.shape(v)) for v in values]


def _absent(index: GraphIndex, nodes: list, sides: list[str], values: list) -> bool:
    """A bias computed from shapes and scalars only (HF's all-ones mask when none is given) that is zero at every
    probe: zero at every length, so the op needs none."""
    if sides or any(np.any(v != 0) for v in values):
        return False
    produced = {o for n in nodes for o in n.output}
    reads = {i for n in nodes for i in n.input if i and i not in produced}
    for tensor in reads:
        for node in index.ancestors(tensor, stop=set()):
            if node.op_type in POSITIONAL_OPS:
                return False
            if any(i in index.initializers and len(index.initializers[i].dims) > 1 for i in node.input):
                return False  # a table (a window, a causal mask) may be zero only where the probes looked
        if tensor in index.initializers and len(index.initializers[tensor].dims) > 1:
            return False
    return True


def match(index: GraphIndex, probe: Probe, softmax: onnx.NodeProto, name: str) -> Match:
    pv = _value_product(index, softmax)
    # the scores are affine in the content product q k^T; the position terms are data added on the way
    chain = score_chain(index, probe, softmax.input[0], through_layouts=True)
    if isinstance(chain, str):
        raise NotFused(chain)
    content = chain.qk
    q, q_factor = _boundary(index, probe, content.input[0])
    k, k_factor = _boundary(index, probe, content.input[1])
    v, _ = _boundary(index, probe, pv.input[1])
    per_head = probe.shape(content.input[0])
    q_shape = probe.shape(q)
    if per_head is None or q_shape is None or len(q_shape) != 3 or q_shape[2] % per_head[-1]:
        raise NotFused(f"queries {q_shape} are not [B, N, H*D] over per-head {per_head}")
    head_dim = per_head[-1]
    heads = q_shape[2] // head_dim
    for what, t in (("key", k), ("value", v)):
        if probe.shape(t) != q_shape:
            raise NotFused(f"{what} {probe.shape(t)} is not [B, N, H*D] like the query {q_shape}")

    scale = chain.scale * q_factor * k_factor
    # every data tensor the chain adds is a sum of position terms, or the mask (the bias, computed from it alone)
    terms, bias_steps = [], []
    for at, (node, slot) in enumerate(chain.steps):
        side = [t for i, t in enumerate(node.input) if i != slot and t and not index.is_static(t)]
        if node.op_type == "Add" and len(side) == 1 and _holds_a_position_product(index, side[0]):
            # a term added here is scaled by every scaling after it, as the content is by the whole chain
            later = math.prod(_scaling(index, probe, n) for n, _ in chain.steps[at + 1:])
            terms += [(term, later) for term in _terms(index, probe, side[0])]
        else:
            bias_steps.append((node, slot))
    rel = {}  # "c2p" / "p2c" -> (table tensor, rows, per_head, gather)
    for term, later in terms:
        if not _is_position_product(index, term.product):
            raise NotFused(f"score term '{term.product.name}' is neither q k^T nor a product with a static table")
        data = index.dynamic_inputs(term.product)[0]
        side, factor = _boundary(index, probe, data)
        role = {q: "c2p", k: "p2c"}.get(side)
        if role is None or role in rel:
            raise NotFused(f"position term '{term.product.name}' reads neither the queries nor the keys once each")
        if term.gather is None:
            raise NotFused(f"position term '{term.product.name}' is not gathered by a relative index")
        if not index.is_static(term.gather.input[1]):
            raise NotFused(f"the relative index of the {role} term ({term.gather.op_type} '{term.gather.name}') is "
                           "computed from the input data, not from the sequence length", final=True)
        if not math.isclose(term.factor * factor * later, scale, rel_tol=1e-5):
            raise NotFused(f"the {role} term is scaled by {term.factor * factor * later:.6g}, the content term by "
                           f"{scale:.6g}")
        static = [i for i in term.product.input if index.is_static(i)][0]
        table = _table(index, probe, static, heads, head_dim)
        if table is None:
            raise NotFused(f"no [2*span, {heads}*{head_dim}] relative table behind the {role} product")
        rel[role] = (*table, term.gather)
    rows = {r[1] for r in rel.values()}
    if len(rows) != 1 or next(iter(rows)) % 2:
        raise NotFused(f"the relative tables have {sorted(rows)} rows, not one even count 2*span")
    span = next(iter(rows)) // 2

    gathers = [(g, role == "p2c") for role, (*_, g) in rel.items()]
    n_of_run = lambda run: probe.shape(q, run)[1]  # noqa: E731
    max_position = next((mp for mp in _max_position_candidates(index, probe, [g for g, _ in gathers], span)
                         if _reads_relative_index(probe, gathers, n_of_run, span, mp)), None)
    if max_position is None:
        raise NotFused(f"the relative index is not DeBERTa's for span {span} (no max_position the graph names "
                       "reproduces it)", final=True)

    output = find_output(index, probe, [pv.output[0]], like=q)
    if output is None:
        raise NotFused("no [B, N, H*D] output where the heads merge back")
    sides = [t for node, slot in bias_steps for i, t in enumerate(node.input)
             if i != slot and t and not index.is_static(t)]
    for side in sides:
        if any(o in (q, k, v) for n in index.ancestors(side, stop=set()) for o in n.output):
            raise NotFused(f"the score bias '{side}' is computed from the queries, keys or values, not from a mask")
    rewrite = Rewrite()
    bias, bias_values = _bias(index, probe, bias_steps, sides, name, rewrite)
    region_nodes = closed_region(index, [q, k, v, *sides], output)

    inputs, values = [q, k, v], [q, k, v]
    for role in ("c2p", "p2c"):
        tensor, _, per_head_table, _ = rel.get(role, rel.get("p2c" if role == "c2p" else "c2p"))
        t_name, t_value = _table_input(probe, tensor, per_head_table, heads, head_dim,
                                       f"{name}/rel_{'key' if role == 'c2p' else 'query'}", rewrite)
        inputs.append(t_name)
        values.append(t_value)
    terms_on = {"c2p": int("c2p" in rel), "p2c": int("p2c" in rel)}
    default = default_scale(head_dim, terms_on["c2p"], terms_on["p2c"])
    attrs = {"num_heads": heads, "span": span, "max_position": max_position,
             "scale": 0.0 if math.isclose(scale, default, rel_tol=1e-6) else scale, **terms_on}
    if bias is not None:
        # a finite fill (finfo.min) leaves no row at -inf in float32, but fp16 turns it into -inf: "mean" keeps the
        # uniform average the model computes there
        attrs["masked_rows"] = "zeros" if any(np.isneginf(b).any() for b in bias_values) else "mean"
        inputs.append(bias)
        values.append(lambda run: bias_values[run])
    why = verify_numerically(OP, probe, values, output, attrs)
    if why:
        raise NotFused(f"the op's reference does not reproduce the graph: {why}")
    return rewrite.match(OP, name, inputs, output, attrs, region_nodes)


FAMILY = register(FamilyPass("disentangled_attention", 30, OP, candidates, match))
