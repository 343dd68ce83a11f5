"""Per-head tensors [B, H, N, D] into and out of an op that reads and writes [B, N, H*D].

Where the walk up from a product ends at the layer's [B, N, H*D] tensor, the op reads it as it is; where it ends at a
per-head tensor (MGK's keys concatenated per head, a packed qkv projection sliced into q, k and v), a Transpose +
Reshape merges the heads. The op's output goes to the first merged-heads tensor after the value product, or back
into the graph's per-head tensor through a new split.
"""
from __future__ import annotations

import numpy as np

from .framework import NotFused, Rewrite
from .graph import GraphIndex
from .probe import Probe


def reads_as_op_input(probe: Probe, tensor: str, batch: int, heads: int, dim: int) -> bool:
    """[B, N, H*D], or per-head [B, H, N, D]: the two layouts `into_op` takes."""
    shape = probe.shape(tensor)
    return shape is not None and ((len(shape) == 3 and shape[0] == batch and shape[2] == heads * dim) or
                                  (len(shape) == 4 and tuple(shape[:2]) == (batch, heads) and shape[3] == dim))


def into_op(probe: Probe, tensor: str, batch: int, heads: int, dim: int, what: str, name: str, rewrite: Rewrite):
    """How the op reads a q/k/v boundary tensor: as is when it is [B, N, H*D]; through a new Transpose + Reshape
    when it is per-head [B, H, N, D]. Returns (op input name, probe value of it per run)."""
    shape = probe.shape(tensor)
    if shape is not None and len(shape) == 3 and shape[0] == batch and shape[2] == heads * dim:
        return tensor, tensor
    if shape is None or len(shape) != 4 or tuple(shape[:2]) != (batch, heads) or shape[3] != dim:
        raise NotFused(f"{what} {shape} is not [B, N, {heads}*{dim}] (mismatched head count?)")
    merged = f"{name}/{what}"
    moved = rewrite.node("Transpose", [tensor], f"{merged}_t", name=f"{merged}_transpose", perm=[0, 2, 1, 3])
    rewrite.node("Reshape", [moved, rewrite.constant(f"{merged}_shape", np.array([0, 0, -1], np.int64))], merged,
                 name=f"{merged}_merge")

    def value(run):
        x = probe.runs[run][tensor]
        return x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)
    return merged, value


def output_side(index: GraphIndex, probe: Probe, per_head_output: str, heads: int, name: str, rewrite: Rewrite):
    """Where the fused node's [B, Nq, H*Dv] output goes: the first merged-heads tensor after the value product
    (`per_head_output`), or, when the heads are not merged right away (e.g. a guard on the per-head output), the
    per-head tensor itself through a new split. Returns (graph output, op output, expected value: name or run ->
    array)."""
    batch, _, q_len, v_head_dim = probe.shape(per_head_output)
    output = _merged_output(index, probe, per_head_output, (batch, q_len, heads * v_head_dim))
    if output is not None:
        return output, output, output
    op_output = f"{name}/output"
    split = rewrite.node("Reshape", [op_output, rewrite.constant(f"{name}/split_shape", np.array(
        [0, 0, heads, -1], np.int64))], f"{name}/output_split", name=f"{name}/output_reshape")
    rewrite.node("Transpose", [split], per_head_output, name=f"{name}/output_transpose", perm=[0, 2, 1, 3])

    def expected(run):
        x = probe.runs[run][per_head_output]
        return x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)
    return per_head_output, op_output, expected


def _merged_output(index: GraphIndex, probe: Probe, start: str, shape: tuple, limit: int = 12) -> str | None:
    """Follow layout ops from the attention product to the first tensor of shape [B, N, H*Dv]."""
    tensor = start
    for _ in range(limit):
        if tuple(probe.shape(tensor) or ()) == shape:
            return tensor
        users = [u for u in index.consumers.get(tensor, []) if not all(o in index.static for o in u.output if o)]
        if len(users) != 1 or users[0].op_type not in ("Transpose", "Reshape", "Flatten", "Cast"):
            return None
        tensor = users[0].output[0]
    return None
