"""Fuse kernelized linear attention into KernelizedAttention.

Positive random features (Performer FAVOR+). Anchor: a product of (scaled) queries or keys with a constant [D, M]
feature matrix (or its copies broadcast over batch and heads, as performer-pytorch repeats it) that feeds an Exp.
The two such products of one layer (queries and keys, same matrix) bound the layer; causal or not, normalised or
not, eps and the stabiliser are settled by the numerical check against the op's reference, at the probes and again
with queries and keys scaled up, where eps decides the output and the stabilisers part.

Identity features, no denominator (FLASH's global part): Q (K^T V), anchored on the outer product. Queries or keys
made by an Exp are a feature map this form does not cover (a FAVOR+ layer the first form refused), so they are
left alone. FLASH-pytorch spells it over groups [B, G, C, D]: per-group states summed over G, scaled by 1/n (a
scalar computed from the shape), read by every group's queries; that is the same product over the ungrouped
sequence, the scaling moved onto the queries. Unsummed (reduce_group_non_causal_attn=False), each group reads its
own scaled state: the op per group. Causal, each group reads an exclusive prefix of the group states: refused with
that reason (the op's causal form is per token)."""
from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

from ..ops import KERNELIZED_ATTENTION
from ..ops.kernelized_attention import STABILIZERS
from .chunk_layout import ChunkLayout
from .framework import (GATHER_OPS, FamilyPass, Match, NotFused, Rewrite, closed_region, constant, find_output, region,
                        register, run_subgraph, scalar_value, untransposed, verify_numerically, walk_to_boundary)
from .graph import GraphIndex
from .probe import Probe

OP = KERNELIZED_ATTENTION
EPS_CANDIDATES = (1e-6, 1e-4, 1e-3)
# queries and keys times this: |x'|^2/2 grows 16-fold, so exp(-|x'|^2/2) falls below eps and the stabilisers part
STRESS = 4.0


def _feeds_exp(index: GraphIndex, tensor: str, depth: int = 4) -> bool:
    frontier = [tensor]
    for _ in range(depth):
        users = [u for t in frontier for u in index.consumers.get(t, [])]
        if any(u.op_type == "Exp" for u in users):
            return True
        frontier = [o for u in users for o in u.output]
    return False


def feature_matrix(w) -> np.ndarray | None:
    """The [D, M] matrix of a static feature operand: itself, or the one matrix every leading index repeats."""
    if w is None or np.ndim(w) < 2:
        return None
    copies = np.reshape(w, (-1, *np.shape(w)[-2:]))
    return copies[0] if (copies == copies[:1]).all() else None


def feature_products(index: GraphIndex, probe: Probe):
    """MatMul(x, W) with W a static [D, M] matrix (or its broadcast copies) and x data, feeding an Exp: one per
    query/key feature map."""
    found = []
    for node in index.nodes:
        if node.op_type != "MatMul" or not index.is_static(node.input[1]) or index.is_static(node.input[0]):
            continue
        w = feature_matrix(probe.runs[0].get(node.input[1]))
        if w is not None and _feeds_exp(index, node.output[0]):
            found.append(node)
    return found


class StateProduct(NamedTuple):
    """outer = MatMul(q, inner), inner = MatMul(k^T, v): linear attention with identity features."""
    outer: object
    inner: object


def state_products(index: GraphIndex) -> list[StateProduct]:
    found = []
    for outer in index.nodes:
        inner = index.producer.get(outer.input[1]) if outer.op_type == "MatMul" else None
        if inner is None or inner.op_type != "MatMul":
            continue
        if len(index.dynamic_inputs(outer)) == 2 and len(index.dynamic_inputs(inner)) == 2 and not any(
                n.op_type == "Exp" for t in (outer.input[0], inner.input[0]) for n in index.ancestors(t, set())[:8]):
            found.append(StateProduct(outer, inner))
    return found


class GroupedStateProduct(NamedTuple):
    """outer = MatMul(q, state), state = layouts and scalar scalings of MatMul(k^T, v) over grouped tensors, summed
    over the groups (`summed`, FLASH-pytorch's default) or per group; `prefix`: a CumSum over the groups on the way
    (FLASH's causal global part, each group reading earlier groups' states only)."""
    outer: object
    inner: object
    scalings: tuple  # (Mul or Div, static scalar tensor) between the state and the outer product
    summed: bool
    prefix: bool


def _no_exp_before(index: GraphIndex, tensors) -> bool:
    return not any(n.op_type == "Exp" for t in tensors for n in index.ancestors(t, set())[:8])


def _walk_state(index: GraphIndex, probe: Probe, tensor: str):
    """From an outer product's state operand up to its k^T v product: (inner or None, scalings, summed, prefix)."""
    scalings, summed, prefix = [], False, False
    while (node := index.producer.get(tensor)) is not None and len(index.dynamic_inputs(node)) == 1:
        if node.op_type in ("Mul", "Div"):
            other = next(i for i in node.input if i not in index.dynamic_inputs(node))
            if (node.op_type == "Div" and node.input[0] == other) or np.size(probe.runs[0].get(other, [])) != 1:
                break
            scalings.append((node.op_type, other))
        elif node.op_type in ("ReduceSum", "CumSum"):
            summed, prefix = summed or node.op_type == "ReduceSum", prefix or node.op_type == "CumSum"
        elif node.op_type not in ("Unsqueeze", "Squeeze", "Reshape", "Identity", "Transpose", "Pad"):
            break
        tensor = index.dynamic_inputs(node)[0]
    inner = index.producer.get(tensor)
    if inner is None or inner.op_type != "MatMul" or len(index.dynamic_inputs(inner)) != 2:
        return None, (), False, False
    return inner, tuple(scalings), summed, prefix


def grouped_state_products(index: GraphIndex, probe: Probe) -> list[GroupedStateProduct]:
    """State products that state_products does not see: scaled, summed over groups, or prefix-summed. The state is
    outer.input[1] (q @ S); Einsum may also spell it S^T @ q^T, read only to refuse a prefix with its reason."""
    found = []
    for outer in index.nodes:
        if outer.op_type != "MatMul" or len(index.dynamic_inputs(outer)) != 2:
            continue
        for side in (1, 0):
            inner, scalings, summed, prefix = _walk_state(index, probe, outer.input[side])
            plain = not (scalings or summed or prefix)  # q (k^T v) itself: state_products' candidate
            if inner is None or plain or (side == 0 and not prefix):
                continue
            if _no_exp_before(index, (outer.input[1 - side], inner.input[0])):
                found.append(GroupedStateProduct(outer, inner, scalings, summed, prefix))
            break
    return found


def candidates(index: GraphIndex, probe: Probe):
    """Pairs of feature products sharing one feature matrix (by value), in graph order; then identity-feature state
    products, direct and grouped."""
    yield from _favor_candidates(index, probe)
    yield from state_products(index)
    yield from grouped_state_products(index, probe)


def _favor_candidates(index: GraphIndex, probe: Probe):
    products = feature_products(index, probe)
    used = set()
    for a, b in itertools.combinations(products, 2):
        if id(a) in used or id(b) in used:
            continue
        wa, wb = (feature_matrix(probe.runs[0][n.input[1]]) for n in (a, b))
        if wa.shape == wb.shape and np.array_equal(wa, wb):
            used.update((id(a), id(b)))
            yield (a, b)


def match(index: GraphIndex, probe: Probe, candidate, name: str) -> Match:
    if isinstance(candidate, StateProduct):
        return _match_identity(index, probe, candidate, name)
    if isinstance(candidate, GroupedStateProduct) and candidate.prefix:
        raise NotFused("causal over groups: each group's queries read the summed states of earlier groups only (its "
                       "own group is the local part); KernelizedAttention's causal form is per token")
    if isinstance(candidate, GroupedStateProduct) and not candidate.summed:  # one state per group: chunked layout
        return _match_identity(index, probe, candidate, name)
    if isinstance(candidate, GroupedStateProduct):
        return _match_grouped(index, probe, candidate, name)
    a, b = candidate
    # through Slice too: performer-pytorch takes its global heads as x[:, :heads] (all of them here; a true subset
    # fails the numerical check)
    (qa, fa, _), (qb, fb, _) = (walk_to_boundary(index, probe, n.input[0], through={"Slice"}) for n in candidate)
    if qa == qb:
        raise NotFused("queries and keys are the same tensor")
    x_shape = probe.shape(a.input[0])
    if x_shape is None or len(x_shape) != 4:
        raise NotFused(f"feature-map input has shape {x_shape}, expected [B, H, N, D]")
    heads, head_dim = x_shape[1], x_shape[3]
    if probe.shape(qa) is None or len(probe.shape(qa)) != 3 or probe.shape(qa)[2] != heads * head_dim:
        raise NotFused(f"query {probe.shape(qa)} is not [B, N, {heads}*{head_dim}] (mismatched head count?)")
    output = find_output(index, probe, [a.output[0], b.output[0]], like=qa)
    if output is None:
        raise NotFused("no [B, N, H*D] output where the heads merge back")
    nodes, outside = region(index, [qa, qb], output)
    values = {walk_to_boundary(index, probe, t, through=GATHER_OPS)[0] for t in outside}
    if len(values) != 1:
        raise NotFused(f"expected one value tensor outside q and k, found {len(values)}")
    v = values.pop()
    nodes = closed_region(index, [qa, qb, v], output)

    w = feature_matrix(probe.runs[0][a.input[1]])  # x @ W with W [D, M]; the op takes the projection as [M, D]
    if w.shape[0] != head_dim:
        raise NotFused(f"feature matrix {w.shape} does not match head dim {head_dim}")
    projection = np.ascontiguousarray(w.T.astype(np.float32))
    region_scalars = {scalar_value(index, probe, i) for n in nodes for i in n.input}
    eps_values = sorted({e for e in region_scalars if e is not None and 0 < e <= 1e-2} | set(EPS_CANDIDATES))
    why, stressed_why = "no candidate tried", ""
    for (q, q_factor), (k, k_factor) in (((qa, fa), (qb, fb)), ((qb, fb), (qa, fa))):
        if not np.isclose(q_factor, k_factor):
            continue
        for causal, normalize, eps, stabilizer in itertools.product((0, 1), (1, 0), eps_values, STABILIZERS):
            if causal and stabilizer != "logits":
                continue
            attrs = {"num_heads": heads, "feature_map": "favor_positive", "causal": causal, "normalize": normalize,
                     "scale": float(q_factor) ** 2, "eps": float(eps), "stabilizer": stabilizer}
            why = verify_numerically(OP, probe, [q, k, v, lambda run: projection], output, attrs)
            if why:
                continue
            stressed_why = _verify_stressed(index, probe, q, k, v, projection, output, attrs)
            if not stressed_why:
                init = constant(f"{name}/projection", projection)
                return Match(OP, name, [q, k, v, init.name], output, attrs, nodes, [init])
    if stressed_why:
        raise NotFused("the op's reference reproduces the graph at the probes but not with large-norm queries and "
                       f"keys, where eps and the stabiliser decide: {stressed_why}")
    raise NotFused(f"the op's reference does not reproduce the graph: {why}")


def _verify_stressed(index: GraphIndex, probe: Probe, q: str, k: str, v: str, projection: np.ndarray, output: str,
                     attrs: dict) -> str:
    """Empty when the op's reference still reproduces the layer with queries and keys STRESS times larger."""
    values = probe.runs[0]
    feeds = {q: values[q] * np.float32(STRESS), k: values[k] * np.float32(STRESS), v: values[v]}
    expected = run_subgraph(index, feeds, output, values)
    return verify_numerically(OP, probe, [lambda run: feeds[q], lambda run: feeds[k], lambda run: feeds[v],
                                          lambda run: projection], lambda run: expected, attrs)


def _scale_per_run(probe: Probe, scalings) -> list[float]:
    """The product of a state's scalings at each probe (1/n follows the shape, so it differs between probes)."""
    scale = []
    for run in range(len(probe.runs)):
        factor = 1.0
        for op_type, tensor in scalings:
            value = np.asarray(probe.runs[run][tensor])
            if not np.issubdtype(value.dtype, np.floating):
                raise NotFused(f"the state's scaling '{tensor}' is not a float scalar")
            factor *= float(value.reshape(())) if op_type == "Mul" else 1.0 / float(value.reshape(()))
        scale.append(factor)
    return scale


def _scaled_query(probe: Probe, query: str, value, scalings, scale: list[float], name: str, rewrite: Rewrite):
    """The state's scalings moved onto the op's query: (new query name, its value per run)."""
    for i, (op_type, tensor) in enumerate(scalings):
        query = rewrite.node(op_type, [query, tensor], f"{name}/query_scaled{i}", name=f"{name}/query_scaled{i}")

    def scaled_value(run):
        x = value(run) if callable(value) else probe.runs[run][value]
        return x * np.float32(scale[run])
    return query, scaled_value


def _match_identity(index: GraphIndex, probe: Probe, product: StateProduct | GroupedStateProduct, name: str) -> Match:
    q, (kt, v), output = product.outer.input[0], product.inner.input, product.outer.output[0]
    k, k_transposed = untransposed(index, probe, kt)
    scalings = getattr(product, "scalings", ())
    scale = _scale_per_run(probe, scalings)
    layout = ChunkLayout.of(probe, q)
    rewrite = Rewrite()
    inputs, values, op_output, expected = layout.qkv_into_op(probe, q, k, v, output, name, rewrite, k_transposed)
    if scalings:
        inputs[0], values[0] = _scaled_query(probe, inputs[0], values[0], scalings, scale, name, rewrite)
    nodes = closed_region(index, [q, k, v], output)
    attrs = {"num_heads": layout.heads, "feature_map": "identity", "causal": 0, "normalize": 0}
    why = verify_numerically(OP, probe, values, expected, attrs)
    if why:
        raise NotFused(f"the op's reference does not reproduce the graph: {why}")
    return rewrite.match(OP, name, inputs, op_output, attrs, nodes)


def _match_grouped(index: GraphIndex, probe: Probe, product: GroupedStateProduct, name: str) -> Match:
    """Grouped q, k, v [B, G, C, D] reshaped (not moved) into the op's [B, G*C, D], one head; the state's scalings
    applied to the queries; the op's [B, G*C, Dv] reshaped back to the graph's [B, G, C, Dv]."""
    q, (kt, v), output = product.outer.input[0], product.inner.input, product.outer.output[0]
    k, k_transposed = untransposed(index, probe, kt)
    if k_transposed:
        raise NotFused("the grouped key state is not a product of transposed keys and values")
    runs = range(len(probe.runs))
    shapes = {t: [probe.shape(t, run) for run in runs] for t in (q, k, v, output)}
    if any(len(s) != 4 for ss in shapes.values() for s in ss):
        raise NotFused(f"grouped linear attention expects [B, G, C, D] tensors, got {shapes[q][0]}")
    if any(shapes[t][run][:3] != shapes[q][run][:3] for t in (k, v, output) for run in runs):
        raise NotFused("grouped queries, keys, values and output differ in batch, groups or group size")
    if len({s[2:] for s in shapes[output]}) != 1:
        raise NotFused("the group size changes with the input")
    scale = _scale_per_run(probe, product.scalings)
    nodes = closed_region(index, [q, k, v], output)

    rewrite = Rewrite()
    flat = rewrite.constant(f"{name}/ungrouped_shape", np.array([0, -1, shapes[q][0][3]], np.int64))
    flat_v = rewrite.constant(f"{name}/ungrouped_value_shape", np.array([0, -1, shapes[v][0][3]], np.int64))
    grouped = rewrite.constant(f"{name}/grouped_shape", np.array([0, -1, *shapes[output][0][2:]], np.int64))
    inputs = [rewrite.node("Reshape", [tensor, shape], f"{name}/{role}", name=f"{name}/{role}")
              for role, tensor, shape in (("query", q, flat), ("key", k, flat), ("value", v, flat_v))]
    op_output = f"{name}/output"
    rewrite.node("Reshape", [op_output, grouped], output, name=f"{name}/regroup")

    def ungrouped(tensor):  # probe values as the op sees them
        def value(run):
            x = probe.runs[run][tensor]
            return x.reshape(x.shape[0], -1, x.shape[-1])
        return value
    values = [ungrouped(q), ungrouped(k), ungrouped(v)]
    # 1/n of the state, moved onto the queries
    inputs[0], values[0] = _scaled_query(probe, inputs[0], values[0], product.scalings, scale, name, rewrite)
    attrs = {"num_heads": 1, "feature_map": "identity", "causal": 0, "normalize": 0}
    why = verify_numerically(OP, probe, values, ungrouped(output), attrs)
    if why:
        raise NotFused(f"the op's reference does not reproduce the grouped linear attention: {why}")
    return rewrite.match(OP, name, inputs, op_output, attrs, nodes)


FAMILY = register(FamilyPass("kernelized_attention", 20, OP, candidates, match, anchor=lambda pair: pair[0]))
