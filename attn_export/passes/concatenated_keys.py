"""One softmax over concatenated score blocks: attention over the concatenated keys (Transformer-LS).

Transformer-LS scores each segment's queries against the projected landmarks and against the window keys, joins
the two score blocks on the key axis, takes one softmax, and splits the weights again for the two value products:
    P = softmax([s Q K1^T + b1 | s Q K2^T + b2]),   out = P[..., :n1] V1 + P[..., n1:] V2
That is one attention over keys [K1; K2] and values [V1; V2] with bias [b1 | b2]. The rewrite builds those
concatenations in the graph and hands them, chunks folded into the batch, to DenseAttention; a key set every chunk
shares (the landmarks [B, H, 1, r, D]) goes to the op's shared_key/shared_value inputs, read in place rather than
copied into each chunk. The numerical check decides. A block with no bias (the landmarks) leaves every row a
visible key, so the op checks no row (masked_rows "none").
"""
from __future__ import annotations

import numpy as np
import onnx

from ..ops import DENSE_ATTENTION
from .chunk_layout import ChunkLayout
from .framework import Match, NotFused, Rewrite, closed_region, untransposed, verify_numerically
from .graph import GraphIndex
from .probe import Probe
from .score_chain import chain_bias, score_chain
from .softmax_core import axis_is_last

OP = DENSE_ATTENTION


def is_concatenated(index: GraphIndex, probe: Probe, softmax: onnx.NodeProto) -> bool:
    """The softmax reads a Concat on the last axis and its weights are sliced for value products."""
    concat = index.producer.get(softmax.input[0])
    return (concat is not None and concat.op_type == "Concat" and axis_is_last(concat, probe)
            and len(_value_products(index, probe, softmax)) == len(concat.input))


def _value_products(index: GraphIndex, probe: Probe, softmax: onnx.NodeProto) -> list[onnx.NodeProto]:
    """MatMul(Slice(P), V_i) for the slices of the weights on the last axis, in the order of their start."""
    found = []
    for user in index.consumers.get(softmax.output[0], []):
        if user.op_type != "Slice" or len(user.input) < 4:
            return []
        axes = probe.runs[0].get(user.input[3])
        rank = len(probe.shape(user.output[0]) or ())
        if axes is None or [int(a) % rank for a in np.ravel(axes)] != [rank - 1]:
            return []
        products = [u for u in index.consumers.get(user.output[0], []) if u.op_type == "MatMul"]
        if len(products) != 1 or products[0].input[0] != user.output[0]:
            return []
        found.append((int(np.ravel(probe.runs[0][user.input[1]])[0]), products[0]))
    return [p for _, p in sorted(found, key=lambda item: item[0])]


def match(index: GraphIndex, probe: Probe, softmax: onnx.NodeProto, name: str) -> Match:
    concat = index.producer[softmax.input[0]]
    chains = [score_chain(index, probe, t) for t in concat.input]
    why = next((c for c in chains if isinstance(c, str)), None)
    if why:
        raise NotFused(f"a score block of the concatenation: {why}")
    q = chains[0].qk.input[0]
    if any(c.qk.input[0] != q for c in chains):
        raise NotFused("the concatenated score blocks do not share one query tensor")
    if not np.allclose([c.scale for c in chains], chains[0].scale, rtol=1e-6):
        raise NotFused("the concatenated score blocks are scaled differently")
    products = _value_products(index, probe, softmax)
    output = _sum_of(index, [p.output[0] for p in products])
    if output is None:
        raise NotFused("the value products of the score blocks are not added up")

    layout = ChunkLayout.of(probe, q)
    rewrite = Rewrite()
    keys, values, boundary = [], [], [q]
    for i, (chain, product) in enumerate(zip(chains, products)):
        k, transposed = untransposed(index, probe, chain.qk.input[1])
        if transposed:
            rank = len(probe.shape(k))
            # named apart from the tensors concatenated_into_op makes ({name}/key{i}, {name}/key{i}_transpose)
            key = rewrite.node("Transpose", [k], f"{name}/untransposed_key{i}", name=f"{name}/untransposed_key{i}",
                               perm=[*range(rank - 2), rank - 1, rank - 2])
            rewrite.evaluate(probe, [key], index.model.opset_import)  # its shape is read below
            keys.append(key)
        else:
            keys.append(k)
        values.append(product.input[1])
        boundary += [k, product.input[1], *chain.side_inputs(index)]
    # blocks over a set every chunk shares (the landmarks) go to the op's shared inputs, read in place; the op
    # sees those keys first, so they lead in the bias too
    shared = [all(layout.shared_by_every_chunk(probe, t, q) for t in kv) for kv in zip(keys, values)]
    if all(shared):
        shared = [False] * len(shared)
    order = sorted(range(len(chains)), key=lambda i: not shared[i])
    chains, keys, values = ([items[i] for i in order] for items in (chains, keys, values))
    n_shared = sum(shared)
    bias = _concatenated_bias(index, probe, chains, name, rewrite)
    query = layout.into_op(probe, q, f"{name}/query", rewrite)
    key = layout.concatenated_into_op(probe, keys[n_shared:], q, f"{name}/key", rewrite)
    value = layout.concatenated_into_op(probe, values[n_shared:], q, f"{name}/value", rewrite)
    shared_kv = [layout.shared_into_op(probe, parts[:n_shared], f"{name}/shared_{kind}", rewrite)
                 for kind, parts in (("key", keys), ("value", values))] if n_shared else []
    rewrite.evaluate(probe, [key[0], value[0], bias, *shared_kv], index.model.opset_import)
    op_output = f"{name}/output"
    expected = layout.out_of_op(probe, op_output, output, like=q, name=name, rewrite=rewrite)
    bias_op, bias_value = layout.bias_into_op(probe, bias, [run[bias] for run in probe.runs], like=q, name=name,
                                              rewrite=rewrite)

    nodes = closed_region(index, boundary, output)
    attrs = {"num_heads": layout.heads, "scale": chains[0].scale, "causal": 0}
    if any(_never_masked(probe, chain) for chain in chains):  # every row keeps that block's keys: nothing to check
        attrs["masked_rows"] = "none"
    why = verify_numerically(OP, probe, [query[1], key[1], value[1], bias_value, *shared_kv], expected, attrs)
    if why:
        raise NotFused(f"the op's reference does not reproduce the graph: {why}")
    return rewrite.match(OP, name, [query[0], key[0], value[0], bias_op, *shared_kv], op_output, attrs, nodes)


def _never_masked(probe: Probe, chain) -> bool:
    """A score block with no bias over a key count that does not change with the length (Transformer-LS's r
    landmarks): its scores are finite wherever q and k are, so no row of the softmax loses every key."""
    cols = {probe.shape(chain.qk.output[0], run)[-1] for run in range(len(probe.runs))}
    return not chain.has_bias and len(cols) == 1 and 0 not in cols


def _sum_of(index: GraphIndex, tensors: list[str]) -> str | None:
    """The output of the Add (or chain of Adds) that sums exactly `tensors`."""
    pending, total = set(tensors), None
    while len(pending) > 1 or total is None:
        adds = [u for t in pending for u in index.consumers.get(t, []) if u.op_type == "Add"
                and set(u.input) <= pending]
        if not adds:
            return None
        pending = (pending - set(adds[0].input)) | {adds[0].output[0]}
        total = adds[0].output[0]
    return total


def _concatenated_bias(index: GraphIndex, probe: Probe, chains: list, name: str, rewrite: Rewrite) -> str:
    """[b1 | b2 | ..] on the key axis, each block chain_i(0) (zero when the block has no bias) broadcast to
    [.., Nk_i] and all to common leading axes (the query axis among them: Nq, or 1 when no block changes along it).
    A single block with a bias that spans its keys (Transformer-LS's window mask beside the landmarks) is just
    padded with the others' zeros: one Pad, not the shape nodes below, which onnxruntime runs one by one."""
    cols = [probe.shape(chain.qk.output[0])[-1] for chain in chains]
    biases = {i: chain_bias(index, probe, chain, f"{name}/block{i}", rewrite, rank4=False)
              for i, chain in enumerate(chains) if chain.has_bias}
    if len(biases) == 1:
        (i, (block, values)), = biases.items()
        if all(np.ndim(v) and np.shape(v)[-1] == probe.shape(chains[i].qk.output[0], run)[-1]
               for run, v in enumerate(values)):
            rank = np.ndim(values[0])
            pads = [0] * (rank - 1) + [sum(cols[:i])] + [0] * (rank - 1) + [sum(cols[i + 1:])]
            return rewrite.node("Pad", [block, rewrite.constant(f"{name}/bias_pads", np.array(pads, np.int64))],
                                f"{name}/bias_all", name=f"{name}/bias_pad")
    rank = len(probe.shape(chains[0].qk.output[0]))
    zero = rewrite.constant(f"{name}/zero", np.array([0], np.int64))
    minus_one = rewrite.constant(f"{name}/minus_one", np.array([-1], np.int64))
    blocks, leads = [], []
    for i, chain in enumerate(chains):
        if i in biases:
            block = biases[i][0]
        else:
            block = rewrite.constant(f"{name}/block{i}_zero",
                                     np.zeros((), probe.runs[0][chain.qk.output[0]].dtype))
        # only the keys axis is filled in: a bias that does not change along the queries stays one row
        size = rewrite.constant(f"{name}/block{i}_size", np.array([1] * (rank - 1) + [cols[i]], np.int64))
        full = rewrite.node("Expand", [block, size], f"{name}/block{i}_full", name=f"{name}/block{i}_expand")
        shape = rewrite.node("Shape", [full], f"{name}/block{i}_shape", name=f"{name}/block{i}_shape")
        leads.append(rewrite.node("Slice", [shape, zero, minus_one], f"{name}/block{i}_lead",
                                  name=f"{name}/block{i}_lead"))
        blocks.append(full)
    lead = rewrite.node("Max", leads, f"{name}/bias_lead", name=f"{name}/bias_lead")
    expanded = []
    for i, block in enumerate(blocks):
        keys = rewrite.constant(f"{name}/block{i}_cols", np.array([cols[i]], np.int64))
        target = rewrite.node("Concat", [lead, keys], f"{name}/block{i}_target", name=f"{name}/block{i}_target",
                              axis=0)
        expanded.append(rewrite.node("Expand", [block, target], f"{name}/block{i}_common",
                                     name=f"{name}/block{i}_common"))
    return rewrite.node("Concat", expanded, f"{name}/bias_all", name=f"{name}/bias_concat", axis=-1)
