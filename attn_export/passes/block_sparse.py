"""Fuse block-sparse softmax attention (BigBird-style: key blocks gathered by a table, optional global rows)
into BlockSparseAttention."""
from __future__ import annotations


import numpy as np
import onnx
from onnx import helper

from ..ops import BLOCK_SPARSE_ATTENTION
from .framework import (GATHER_OPS, FamilyPass, Match, NotFused, closed_region, constant, find_output,
                        has_dynamic_shapes, region, register, run_subgraph, static_tensor_matching, verify_numerically,
                        walk_to_boundary)
from .graph import GraphIndex
from .probe import Probe
from .softmax_core import SoftmaxCore, find_core, softmax_nodes

OP = BLOCK_SPARSE_ATTENTION


def candidates(index: GraphIndex, probe: Probe):
    """Softmax cores whose keys reach the layer through a gather with static indices, or whose blocked queries
    ([B, H, blocks, b, D]) meet keys gathered with data-dependent indices (reported: the layout is not constant)."""
    for softmax in softmax_nodes(index):
        core = find_core(index, probe, softmax)
        if isinstance(core, str):
            continue
        k, _, passed = walk_to_boundary(index, probe, core.kt_side, through=GATHER_OPS)
        if any(op.startswith("Gather") for op in passed):
            yield core
        elif _data_indexed_gather(index, k) is not None and len(probe.shape(core.q_side) or ()) == 5:
            yield core


def match(index: GraphIndex, probe: Probe, core: SoftmaxCore, name: str) -> Match:
    q, q_factor, _ = walk_to_boundary(index, probe, core.q_side)
    k, k_factor, _ = walk_to_boundary(index, probe, core.kt_side, through=GATHER_OPS)
    gather = _data_indexed_gather(index, k)
    if gather is not None:
        raise NotFused(f"the block layout is not constant: key blocks are gathered ({gather.op_type} '{gather.name}') "
                       "with indices computed from the input data", final=True)
    for t in (q, k):
        if t in index.static:
            raise NotFused("query or key is a constant")
    q_blocks = probe.shape(core.q_side)
    if q_blocks is None or len(q_blocks) != 5:
        raise NotFused(f"queries are not grouped in blocks (shape {q_blocks}, expected [B, H, blocks, b, D])")
    heads, block_size, head_dim = q_blocks[1], q_blocks[3], q_blocks[4]
    q_shape = probe.shape(q)
    if q_shape is None or len(q_shape) != 3 or q_shape[2] != heads * head_dim:
        raise NotFused(f"query {q_shape} is not [B, N, {heads}*{head_dim}] (mismatched head count?)")

    output = find_output(index, probe, [core.pv.output[0]], like=q)
    if output is None:
        raise NotFused("no [B, N, H*D] output where the heads merge back")
    nodes, outside = region(index, [q, k], output)
    v = _single_value_input(index, probe, outside)
    nodes = closed_region(index, [q, k, v], output)

    tables = [_block_table(index, probe, core, k, k_factor, run, block_size) for run in range(len(probe.runs))]
    scale = core.score_scale * q_factor * k_factor
    for g in (0, 1, 2):  # global query blocks at both ends, tried in order
        attrs = {"num_heads": heads, "block_size": block_size, "scale": scale, "global_blocks": g}
        why = verify_numerically(OP, probe, [q, k, v, lambda run: tables[run]], output, attrs)
        if not why:
            break
    else:
        raise NotFused(f"the op's reference does not reproduce the graph: {why}")

    new_inits, new_nodes = [], []
    table_name = f"{name}/block_index"
    if has_dynamic_shapes(index.model):
        ignore = [_global_rows(t.shape[1], g) for t in tables]
        source = static_tensor_matching(index, probe, tables, ignore, before=output)
        if source is None:
            raise NotFused("the block layout depends on the sequence length and no static tensor holds it as a "
                           "[heads, blocks, slots] table")
        new_nodes.append(helper.make_node("Cast", [source], [table_name], to=onnx.TensorProto.INT32,
                                          name=f"{name}/block_index_cast"))
    else:
        new_inits.append(constant(table_name, tables[0]))
    return Match(OP, name, [q, k, v, table_name], output, attrs, nodes, new_inits, new_nodes)


def _data_indexed_gather(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    """The gather producing `tensor` when its indices are data-dependent (not a constant layout), else None."""
    node = index.producer.get(tensor)
    if node is not None and node.op_type.startswith("Gather") and not all(index.is_static(i) for i in node.input[1:]):
        return node
    return None


def _single_value_input(index, probe, outside: list[str]) -> str:
    values = {walk_to_boundary(index, probe, t, through=GATHER_OPS)[0] for t in outside}
    if len(values) != 1:
        raise NotFused(f"expected one value tensor outside q and k, found {len(values)}")
    return values.pop()


def _global_rows(nb: int, g: int) -> set[int]:
    return set(range(min(g, nb))) | set(range(max(nb - g, 0), nb))


def _block_table(index: GraphIndex, probe: Probe, core: SoftmaxCore, k: str, k_factor: float, run: int,
                 block_size: int) -> np.ndarray:
    """Read the layout off the graph: run the key-gathering subgraph on keys that carry their own block number,
    and take the slots the softmax gives weight to. Returns int32 [H, blocks, slots], -1 for a hidden slot."""
    values = probe.runs[run]
    k_value = values[k]
    n = k_value.shape[1]
    code = np.broadcast_to((np.arange(n) // block_size + 1).astype(k_value.dtype)[None, :, None], k_value.shape)
    keys = run_subgraph(index, {k: np.ascontiguousarray(code)}, _gathered_keys(index, core), values)
    # keys: [B, H, nb, m*b, D]
    if keys.ndim != 5 or keys.shape[3] % block_size:
        raise NotFused(f"gathered keys have shape {keys.shape}, expected [B, H, blocks, slots*b, D]")
    heads, nb, slots = keys.shape[1], keys.shape[2], keys.shape[3] // block_size
    per_slot = keys[0, :, :, :, 0].reshape(heads, nb, slots, block_size)
    if not np.all(per_slot == per_slot[..., :1]):
        raise NotFused("gathered key slots are not whole blocks")
    block_ids = np.rint(per_slot[..., 0] / k_factor).astype(np.int64) - 1
    probs = values[core.probs].reshape(-1, heads, nb, block_size, slots, block_size)
    visible = probs.max(axis=(0, 3, 5)) > 0
    return np.where(visible & (block_ids >= 0), block_ids, -1).astype(np.int32)


def _gathered_keys(index: GraphIndex, core: SoftmaxCore) -> str:
    """The key tensor as the QK product sees it, before the transpose: [B, H, blocks, slots*b, D]."""
    node = index.producer.get(core.kt_side)
    if node is not None and node.op_type == "Transpose":
        return node.input[0]
    raise NotFused("keys enter the QK product without a transpose")


FAMILY = register(FamilyPass("block_sparse", 10, OP, candidates, match, anchor=lambda core: core.softmax))
