"""Fuse block-sparse attention written as several softmax pieces into one BlockSparseAttention per layer.

Hugging Face BigBird (block_sparse, eval) spells one layer as five softmaxes: the two global query blocks, the second
and second-last blocks, and the middle band (window, global and random keys concatenated before the softmax), all
merged into one context. No single piece is attention over the whole layout, so the layer is matched as a group:
every softmax of one module scope whose pieces merge into one [B, N, H*D] context. What the group computes is read
by running it: with zero queries every listed key weighs the same, so values that mark key blocks give each query
block's key blocks and how often each is listed; a boosted key block gives the scale. The mask terms come from
outside the layer (attention_mask only): one is the per-key bias, one the query mask HF multiplies the context by.
"""
from __future__ import annotations

from collections import ChainMap

import numpy as np
import onnx

from ..ops import BLOCK_SPARSE_ATTENTION
from .framework import (GATHER_OPS, LAYOUT_OPS, FamilyPass, Match, NotFused, Rewrite, check_no_escape, region,
                        register, run_nodes, verify_numerically)
from .fusion_report import layer_name
from .graph import GraphIndex
from .probe import Probe
from .softmax_core import softmax_nodes, value_product

OP = BLOCK_SPARSE_ATTENTION


def candidates(index: GraphIndex, probe: Probe):
    """Groups of two or more softmaxes of one module scope, at least one of them over blocked queries (scores of
    rank 5: [B, H, blocks, b, keys]): the pieces of one block-sparse layer."""
    groups: dict[str, list[onnx.NodeProto]] = {}
    for softmax in softmax_nodes(index):
        if _weights_product(index, softmax):
            groups.setdefault(layer_name(softmax), []).append(softmax)
    for group in groups.values():
        if len(group) > 1 and any(len(probe.shape(s.input[0]) or ()) == 5 for s in group):
            yield tuple(group)


def match(index: GraphIndex, probe: Probe, group: tuple, name: str) -> Match:
    hidden = index.from_weights
    qk = sorted({t for s in group for t in _frontier(index, probe, s.input[0], hidden)}, key=_position(index))
    if len(qk) != 2 or not probe.same_shape_in_all(qk[0], qk[1]):
        raise NotFused(f"the scores read {len(qk)} projected tensors, expected a query and a key of one shape")
    output = _merged_context(index, probe, group, qk[0])
    _, outside = region(index, qk, output)
    values = {t for o in outside if o in hidden for t in _frontier(index, probe, o, hidden)}
    if len(values) != 1 or not probe.same_shape_in_all(values.copy().pop(), qk[0]):
        raise NotFused(f"expected one value tensor shaped like the query, found {len(values)}")
    v = values.pop()
    nodes, outside = region(index, [*qk, v], output)
    if any(t in hidden for t in outside):
        raise NotFused(f"the attention also reads data-dependent tensor '{[t for t in outside if t in hidden][0]}'")
    masks = outside  # computed from the masks alone: the key bias and the query mask are among them
    check_no_escape(index, nodes, output)
    heads, block_size, head_dim = _blocking(index, probe, qk[0])

    why = ""
    for q, k in (qk, qk[::-1]):
        try:
            mult = _multiplicities(index, probe, nodes, q, k, v, output, heads, block_size, head_dim)
            table, global_blocks, count_repeats = _table(mult)
            scale = _scale(index, probe, nodes, q, k, v, output, mult, heads, block_size, head_dim)
        except NotFused as e:
            why = str(e)
            continue
        attrs = {"num_heads": heads, "block_size": block_size, "scale": scale, "global_blocks": global_blocks,
                 "count_repeats": count_repeats}
        for bias, query_mask in _mask_roles(probe, masks, output):
            why = verify_numerically(OP, probe, _inputs(probe, q, k, v, table, bias, output),
                                     _unmasked(probe, output, query_mask), attrs)
            if not why:
                return _replacement(index, name, q, k, v, table, bias, query_mask, output, attrs, nodes, masks)
        why = f"the op's reference does not reproduce the graph: {why}"
    raise NotFused(why)


def _weights_product(index: GraphIndex, softmax: onnx.NodeProto) -> bool:
    """The softmax's weights (or slices of them, as the middle band splits its weights per key kind) feed a product."""
    if value_product(index, softmax) is not None:
        return True
    return any(user.op_type == "Slice" and any(c.op_type == "MatMul" and c.input[0] == user.output[0]
                                               for c in index.consumers.get(user.output[0], []))
               for user in index.consumers.get(softmax.output[0], []))


def _position(index: GraphIndex):
    return lambda t: index.position[id(index.producer[t])] if t in index.producer else -1


def _frontier(index: GraphIndex, probe: Probe, tensor: str, hidden: set[str]) -> set[str]:
    """The projected [B, N, C] tensors `tensor` is computed from: walking up through the hidden tensors, stopping at
    the first rank-3 tensor (batch first) that a computing op (not a layout op) makes, such as a Linear's output."""
    found, seen, todo = set(), set(), [tensor]
    while todo:
        t = todo.pop()
        if t in seen or t not in hidden:
            continue
        seen.add(t)
        node = index.producer.get(t)
        if node is None:
            continue
        shapes = [probe.shape(t, r) for r in range(len(probe.runs))]
        batches = [_batch(probe, r) for r in range(len(probe.runs))]
        if (node.op_type not in LAYOUT_OPS and node.op_type not in GATHER_OPS | {"Split"}
                and all(s is not None and len(s) == 3 and s[0] == b for s, b in zip(shapes, batches))):
            found.add(t)
            continue
        todo.extend(i for i in node.input if i)
    return found


def _batch(probe: Probe, run: int) -> int | None:
    feeds = probe.feeds[run]
    return next((np.shape(v)[0] for v in feeds.values() if np.ndim(v) >= 1), None)


def _merged_context(index: GraphIndex, probe: Probe, group: tuple, like: str) -> str:
    """The first tensor shaped like the query that every piece of the layer reaches: where heads merge back."""
    reach = [{o for n in index.descendants(set(s.output)) for o in n.output} for s in group]
    common = set.intersection(*reach)
    for node in index.descendants({s.output[0] for s in group}):
        for out in node.output:
            if out in common and probe.same_shape_in_all(out, like):
                return out
    raise NotFused("the softmax pieces do not merge into one [B, N, H*D] context")


def _blocking(index: GraphIndex, probe: Probe, q: str) -> tuple[int, int, int]:
    """(heads, block size, head dim) from the blocked query [B, H, blocks, b, D], reached by layout ops only."""
    _, n, channels = probe.shape(q)
    todo, seen = [q], set()
    while todo:
        t = todo.pop(0)
        for user in index.consumers.get(t, []):
            if user.op_type not in LAYOUT_OPS or id(user) in seen:
                continue
            seen.add(id(user))
            shape = probe.shape(user.output[0])
            if shape is not None and len(shape) == 5 and shape[1] * shape[4] == channels and \
                    shape[2] * shape[3] == n:
                return shape[1], shape[3], shape[4]
            todo.append(user.output[0])
    raise NotFused("queries are not grouped in blocks (no [B, H, blocks, b, D] view of the query)")


def _run(index: GraphIndex, probe: Probe, nodes: list, feeds: dict, output: str) -> np.ndarray:
    """The layer's output on probe 0 with q/k/v replaced (the masks stay the probe's: batch row 0 is unpadded).
    Only the region's own nodes run: shapes and masks come from the probe, not from re-running earlier layers."""
    values = probe.runs[0]
    feeds = {k: np.ascontiguousarray(v, dtype=values[k].dtype) for k, v in feeds.items()}
    ordered = sorted(nodes, key=lambda n: index.position[id(n)])
    return run_nodes(ordered, output, ChainMap(feeds, values), index.model.opset_import,
                     ir_version=index.model.ir_version)


def _multiplicities(index, probe, nodes, q, k, v, output, heads, block_size, head_dim) -> np.ndarray:
    """[H, blocks, blocks]: how often query block i lists key block j (up to a common factor per row). With zero
    queries every listed key scores the same, so the weight the row gives key block j is its multiplicity; values
    that are 1 on channel c for the keys of block c read that weight off the output, head_dim blocks per run."""
    batch, n, channels = probe.shape(q)
    nb = n // block_size
    zeros = np.zeros((batch, n, channels))
    mass = np.zeros((heads, nb, nb))
    for first in range(0, nb, head_dim):
        blocks = np.arange(n) // block_size - first  # channel c of each head marks key block first + c
        marks = (blocks[:, None] == np.arange(head_dim)[None, :]).astype(np.float64)
        values = np.broadcast_to(np.tile(marks, (1, heads))[None], (batch, n, channels))
        out = _run(index, probe, nodes, {q: zeros, k: probe.runs[0][k], v: values}, output)[0]
        per_query = out.reshape(nb, block_size, heads, head_dim)
        if np.abs(per_query - per_query[:, :1]).max() > 1e-5:
            raise NotFused("the queries of one block see different keys")
        width = min(head_dim, nb - first)
        mass[:, :, first:first + width] = per_query[:, 0, :, :width].transpose(1, 0, 2)
    total = mass.sum(-1)
    if np.any((np.abs(total - 1) > 1e-4) & (total > 1e-6)):
        raise NotFused("the weights of a query block do not sum to one over the key blocks")
    smallest = np.where(mass > 1e-6, mass, np.inf).min(-1, keepdims=True)
    ratio = np.where(mass > 1e-6, mass / np.where(np.isfinite(smallest), smallest, 1), 0)
    mult = np.rint(ratio)
    if np.abs(ratio - mult).max() > 1e-3 or mult.max() > 64:
        raise NotFused("key blocks weigh fractions of one another: not a block layout")
    return mult.astype(np.int64)


def _table(mult: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The op's block_index for these multiplicities: a row that sees every block once and lies at either end is
    global; any other row lists block j mult[j] times (count_repeats when some block is listed more than once)."""
    heads, nb, _ = mult.shape
    full = np.all(mult == 1, axis=(0, 2))
    lead = next((i for i in range(nb) if not full[i]), nb)
    trail = next((i for i in range(nb) if not full[nb - 1 - i]), nb)
    g = min(lead, trail, nb // 2)
    rows = [[[int(j) for j in np.repeat(np.arange(nb), mult[h, i])] if g <= i < nb - g else [] for i in range(nb)]
            for h in range(heads)]
    width = max(1, max(len(r) for head in rows for r in head))
    table = np.full((heads, nb, width), -1, np.int32)
    for h in range(heads):
        for i, r in enumerate(rows[h]):
            table[h, i, :len(r)] = r
    if np.all(table == table[:1]):
        table = table[:1]
    return table, g, int(mult.max() > 1)


def _scale(index, probe, nodes, q, k, v, output, mult, heads, block_size, head_dim) -> float:
    """The score scale: queries 1 and the keys of one block 1 on one channel make that block score `scale` and every
    other 0; the weight a row gives it then solves for exp(scale)."""
    batch, n, channels = probe.shape(q)
    listed = (mult[0] > 0).sum(0)
    shared = int(np.argmax(np.where(listed < mult.shape[1], listed, 0)))  # a block many rows list, not all do
    one_channel = np.zeros(channels)
    one_channel[::head_dim] = 1.0
    queries = np.broadcast_to(one_channel, (batch, n, channels))
    in_block = (np.arange(n) // block_size == shared).astype(np.float64)
    keys = np.broadcast_to(in_block[None, :, None] * one_channel, (batch, n, channels))
    out = _run(index, probe, nodes, {q: queries, k: keys, v: keys}, output)[0]
    weight = out.reshape(-1, block_size, heads, head_dim)[:, 0, 0, 0]  # head 0, per query block
    m, total = mult[0, :, shared].astype(np.float64), mult[0].sum(-1).astype(np.float64)
    rows = (m > 0) & (m < total) & (weight > 1e-6) & (weight < 1 - 1e-6)
    if not rows.any():
        raise NotFused("no query block tells the score scale (every row sees one key block)")
    ratio = weight[rows] * (total[rows] - m[rows]) / (m[rows] * (1 - weight[rows]))
    scale = float(np.median(np.log(ratio)))
    # measured through exp and a float32 softmax: the usual 1/sqrt(D) when it is that up to rounding
    usual = 1.0 / np.sqrt(head_dim)
    return float(usual) if abs(scale - usual) <= 1e-4 * usual else scale


def _mask_roles(probe: Probe, masks: list[str], output: str):
    """(key bias, query mask) pairs to try, most likely first: among the mask terms with one value per token, the
    query mask is 0/1 and zeroes the output where it is 0; the key bias is 0 on valid keys and negative elsewhere."""
    runs = range(len(probe.runs))
    per_token = [t for t in masks if all(_per_token(probe, t, output, r) is not None for r in runs)]
    query_masks = [t for t in per_token if _zeroes_output(probe, t, output)]
    biases = [t for t in per_token if t not in query_masks and
              all(np.all(_per_token(probe, t, output, r) <= 0) for r in runs)]
    for query_mask in [*query_masks, None]:
        for bias in [*biases, None]:
            yield bias, query_mask


def _per_token(probe: Probe, tensor: str, output: str, run: int) -> np.ndarray | None:
    """The tensor as [B, N] when it holds one value per token of the [B, N, C] output, else None."""
    value, (batch, n, _) = probe.runs[run].get(tensor), probe.shape(output, run)
    if value is None or np.ndim(value) < 2 or np.shape(value)[0] != batch or np.size(value) != batch * n:
        return None
    return np.asarray(value).reshape(batch, n)


def _zeroes_output(probe: Probe, tensor: str, output: str) -> bool:
    masks = [_per_token(probe, tensor, output, run) for run in range(len(probe.runs))]
    if any(mask is None or not np.isin(mask, (0, 1)).all() for mask in masks) or all(m.all() for m in masks):
        return False
    return all(np.all(probe.runs[run][output][mask == 0] == 0) for run, mask in enumerate(masks))


def _inputs(probe: Probe, q, k, v, table, bias, output):
    inputs = [q, k, v, lambda run: table]
    if bias is not None:
        inputs.append(lambda run: _per_token(probe, bias, output, run).astype(probe.runs[run][q].dtype))
    return inputs


def _unmasked(probe: Probe, output: str, query_mask: str | None):
    """What the op must reproduce: the layer's output, except for the queries the mask zeroes after the op (NaN:
    not compared)."""
    if query_mask is None:
        return output
    return lambda run: np.where(_per_token(probe, query_mask, output, run)[..., None] == 0, np.nan,
                                probe.runs[run][output])


def _replacement(index, name, q, k, v, table, bias, query_mask, output, attrs, nodes, masks) -> Match:
    rewrite = Rewrite()
    inputs = [q, k, v, rewrite.constant(f"{name}/block_index", table)]
    if bias is not None:
        shape = rewrite.constant(f"{name}/per_token_shape", np.array([0, -1], np.int64))
        inputs.append(rewrite.node("Reshape", [bias, shape], f"{name}/key_bias", name=f"{name}/key_bias"))
    op_output = output
    if query_mask is not None:
        # HF zeroes the context of padded queries after the attention; the op leaves that Mul in the graph
        op_output = f"{name}/context"
        shape = rewrite.constant(f"{name}/query_mask_shape", np.array([0, -1, 1], np.int64))
        per_query = rewrite.node("Reshape", [query_mask, shape], f"{name}/query_mask", name=f"{name}/query_mask")
        rewrite.node("Mul", [op_output, per_query], output, name=f"{name}/masked")
    # the mask arithmetic outside the layer is explained by the fused node (it only feeds it)
    kept = [n for t in masks for n in index.ancestors(t, stop=set())]
    return rewrite.match(OP, name, inputs, op_output, attrs, nodes, kept=kept)


FAMILY = register(FamilyPass("banded_block_sparse", 5, OP, candidates, match, anchor=lambda group: group[0]))
