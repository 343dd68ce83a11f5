"""Per-chunk attention: lay out per-head tensors with extra leading axes for an op that reads [B', N, H*D].

Local attention is often written on chunks: queries [B, H, G, C, D] (SPADE's blocks, Transformer-LS's segments) or
[B, G, C, D] (FLASH's single-head groups), each chunk attending to its own gathered keys. Such a layer is dense
attention run per chunk: the chunk axis joins the batch, B' = B * G. This module finds which axes are batch and
which is the head axis, and writes the Transpose + Reshape nodes into and out of the op.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .framework import NotFused, Rewrite, unsqueeze_to_rank
from .probe import Probe


@dataclass(frozen=True)
class ChunkLayout:
    """Axes of a per-head tensor [..., rows, features]: `batch` axes fold into B', `head` (or None) is H."""
    rank: int
    batch: tuple[int, ...]
    head: int | None
    heads: int
    rows_follow_input: bool = False  # the rows axis may change with the input (read from the tensor, not a constant)

    @staticmethod
    def heads_in_batch() -> ChunkLayout:
        """[B, H, N, D] read as B*H rows of one head: the op's [B*H, N, D] is a Reshape of the per-head tensor."""
        return ChunkLayout(4, (0, 1), None, 1, rows_follow_input=True)

    @staticmethod
    def of(probe: Probe, per_head: str) -> ChunkLayout:
        """[B, H, N, D]: head axis 1. [B, H, G, C, D]: heads and chunks both join the batch, (0, 1, 2), one head per
        op row: the op's [B*H*G, C, D] is then a Reshape of the graph's tensor (no Transpose into or out of the op,
        none in its decomposition). [B, G, C, D] whose axis 1 changes with the input's length: no head axis,
        batch (0, 1). [B, N, D]: one head."""
        shapes = [probe.shape(per_head, run) for run in range(len(probe.runs))]
        rank = len(shapes[0] or ())
        if rank == 3:
            return ChunkLayout(3, (0,), None, 1)
        if rank == 4:  # [B, H, N, D], unless axis 1 follows the input's length
            return ChunkLayout(4, (0,), 1, shapes[0][1]) if len({s[1] for s in shapes}) == 1 else \
                ChunkLayout(4, (0, 1), None, 1)
        if rank == 5:
            return ChunkLayout(5, (0, 1, 2), None, 1)
        raise NotFused(f"per-head tensor {shapes[0]} is neither [B, H, N, D] nor chunked [B, H, G, C, D]")

    def _batch_sizes(self, like: str, out: str, rewrite: Rewrite) -> str:
        """`out`: the sizes of `like`'s batch axes (1-D int64)."""
        axes = rewrite.constant(f"{out}_axes", np.array(self.batch, np.int64))
        shape = rewrite.node("Shape", [like], f"{out}_of", name=f"{out}_of")
        return rewrite.node("Gather", [shape, axes], out, name=out, axis=0)

    def _perm(self, rows: int, features: int) -> list[int]:
        return [*self.batch, rows, *([self.head] if self.head is not None else []), features]

    def into_op(self, probe: Probe, tensor: str, name: str, rewrite: Rewrite, transposed: bool = False):
        """`tensor` ([..., rows, D], or [..., D, rows] when `transposed`) as [B', rows, H*D].
        Returns (op input name, value per run)."""
        rows, features = (self.rank - 1, self.rank - 2) if transposed else (self.rank - 2, self.rank - 1)
        if self.rank == 3 and not transposed:  # [B, N, D] is already the op's layout
            return tensor, tensor
        shape = probe.shape(tensor)
        if self.head is not None and shape[self.head] != self.heads:
            raise NotFused(f"{name.rsplit('/', 1)[-1]} {shape} has {shape[self.head]} heads, the query {self.heads}")
        n_rows = {probe.shape(tensor, run)[rows] for run in range(len(probe.runs))}
        if len(n_rows) != 1 and not self.rows_follow_input:
            raise NotFused(f"chunk length of {tensor} changes with the input ({sorted(n_rows)})")
        perm = self._perm(rows, features)
        width = self.heads * shape[features]
        moved = _transposed(tensor, f"{name}_t", perm, f"{name}_transpose", rewrite)
        if self.rows_follow_input:  # [-1, rows of the tensor, H*D]
            at = len(self.batch)
            rows_now = rewrite.node("Shape", [moved], f"{name}_rows", name=f"{name}_rows", start=at, end=at + 1)
            target = rewrite.node("Concat", [rewrite.constant(f"{name}_lead", np.array([-1], np.int64)), rows_now,
                                             rewrite.constant(f"{name}_width", np.array([width], np.int64))],
                                  f"{name}_shape", name=f"{name}_shape", axis=0)
        else:
            target = rewrite.constant(f"{name}_shape", np.array([-1, n_rows.pop(), width], np.int64))
        rewrite.node("Reshape", [moved, target], name, name=f"{name}_merge")

        def value(run):
            x = probe.runs[run][tensor].transpose(perm)
            return x.reshape(-1, x.shape[len(self.batch)], width)
        return name, value

    def qkv_into_op(self, probe: Probe, q: str, k: str, v: str, output: str, name: str, rewrite: Rewrite,
                    k_transposed: bool = False):
        """q, k, v into the op, and the op's output back to the graph's per-head `output`.
        Returns (op inputs, their values per run, op output, expected op output per run)."""
        layouts = [self.into_op(probe, q, f"{name}/query", rewrite),
                   self.into_op(probe, k, f"{name}/key", rewrite, transposed=k_transposed),
                   self.into_op(probe, v, f"{name}/value", rewrite)]
        op_output = f"{name}/output"
        expected = self.out_of_op(probe, op_output, output, like=q, name=name, rewrite=rewrite)
        return [t[0] for t in layouts], [t[1] for t in layouts], op_output, expected

    def concatenated_into_op(self, probe: Probe, parts: list[str], like: str, name: str, rewrite: Rewrite):
        """Per-head [.., rows_i, D] tensors joined on the row axis, straight into the op's [B', sum rows_i, H*D].
        Each part is transposed first and expanded to the batch axes of `like` (one whose batch axes are `like`'s
        by the exporter's symbolic shapes is not copied), so the joined tensor is written once, already in the op's
        layout. A single part is just laid out. Returns (op input name, its name again: the caller evaluates the
        rewrite to read its value)."""
        if len(parts) == 1:
            laid_out = self.into_op(probe, parts[0], name, rewrite)[0]
            return laid_out, laid_out
        rows, features = self.rank - 2, self.rank - 1
        perm = self._perm(rows, features)
        batch = self._batch_sizes(like, f"{name}_batch", rewrite)
        joined, total_rows = [], 0
        for i, part in enumerate(parts):
            shape = probe.shape(part)
            if self.head is not None and shape[self.head] != self.heads:
                raise NotFused(f"{part} {shape} has {shape[self.head]} heads, the query {self.heads}")
            tail = [shape[rows], *([self.heads] if self.head is not None else []), shape[features]]
            total_rows += shape[rows]
            moved = _transposed(part, f"{name}{i}_t", perm, f"{name}{i}_transpose", rewrite)
            if probe.same_symbolic_dims(part, like, self.batch):  # already one set per chunk: nothing to copy
                joined.append(moved)
                continue
            target = rewrite.node("Concat", [batch, rewrite.constant(f"{name}{i}_tail", np.array(tail, np.int64))],
                                  f"{name}{i}_target", name=f"{name}{i}_target", axis=0)
            joined.append(rewrite.node("Expand", [moved, target], f"{name}{i}", name=f"{name}{i}_expand"))
        width = self.heads * probe.shape(parts[0])[features]
        rewrite.node("Concat", joined, f"{name}_joined", name=f"{name}_concat", axis=len(self.batch))
        rewrite.node("Reshape", [f"{name}_joined", rewrite.constant(f"{name}_shape", np.array(
            [-1, total_rows, width], np.int64))], name, name=f"{name}_merge")
        return name, name

    def shared_by_every_chunk(self, probe: Probe, part: str, like: str) -> bool:
        """`part` [.., 1, rows, D] is one set that every chunk of `like` [.., G, C, D] sees (Transformer-LS's
        landmarks): heads fold into the batch, the part's chunk axis is 1 at every probe while `like`'s is not
        (else nothing tells a shared set from a per-chunk one), and its leading axes are `like`'s, so op batch row
        b' sees set b' // G, the op's shared_key form."""
        chunk = self.rank - 3
        if chunk < 1 or self.head is not None or self.batch != tuple(range(chunk + 1)):
            return False
        shapes = [(probe.shape(part, run), probe.shape(like, run)) for run in range(len(probe.runs))]
        return (all(len(p) == self.rank and p[chunk] == 1 and p[:chunk] == q[:chunk] for p, q in shapes)
                and any(q[chunk] != 1 for _, q in shapes))

    def shared_into_op(self, probe: Probe, parts: list[str], name: str, rewrite: Rewrite) -> str:
        """Sets shared by every chunk ([.., 1, rows_i, D], see shared_by_every_chunk) joined on the row axis as the
        op's [B' / G, sum rows_i, D]: read in place, one row per set rather than one per chunk."""
        rows = self.rank - 2
        joined = parts[0] if len(parts) == 1 else rewrite.node("Concat", parts, f"{name}_joined",
                                                               name=f"{name}_concat", axis=rows)
        total = sum(probe.shape(p)[rows] for p in parts)
        return rewrite.node("Reshape", [joined, rewrite.constant(f"{name}_shape", np.array(
            [-1, total, probe.shape(parts[0])[-1]], np.int64))], name, name=f"{name}_merge")

    def out_of_op(self, probe: Probe, op_output: str, per_head_output: str, like: str, name: str, rewrite: Rewrite):
        """Nodes taking the op's [B', rows, H*Dv] back to the graph's per-head `per_head_output`; the batch axes'
        sizes are read from `like`, a per-head tensor of the same chunking that stays in the graph.
        Returns the expected op output (name, or value per run)."""
        out_shape = probe.shape(per_head_output)
        rows, features = self.rank - 2, self.rank - 1
        if self.rank == 3:
            rewrite.node("Identity", [op_output], per_head_output, name=f"{name}/output")
            return per_head_output
        perm = self._perm(rows, features)
        batch = self._batch_sizes(like, f"{name}/batch_dims", rewrite)
        tail = [*([self.heads] if self.head is not None else []), out_shape[features]]
        if self.rows_follow_input:  # the rows are the op output's own
            rows_now = rewrite.node("Shape", [op_output], f"{name}/rows", name=f"{name}/rows", start=1, end=2)
            parts = [batch, rows_now, rewrite.constant(f"{name}/tail", np.array(tail, np.int64))]
        else:
            parts = [batch, rewrite.constant(f"{name}/tail", np.array([out_shape[rows], *tail], np.int64))]
        unmerged_shape = rewrite.node("Concat", parts, f"{name}/unmerged_shape", name=f"{name}/unmerged_shape", axis=0)
        back = [int(a) for a in np.argsort(perm)]
        if back == sorted(back):  # the op's rows are the graph's: the Reshape writes the output itself
            rewrite.node("Reshape", [op_output, unmerged_shape], per_head_output, name=f"{name}/unmerge")
        else:
            unmerged = rewrite.node("Reshape", [op_output, unmerged_shape], f"{name}/unmerged", name=f"{name}/unmerge")
            rewrite.node("Transpose", [unmerged], per_head_output, name=f"{name}/output_transpose", perm=back)

        def expected(run):
            x = probe.runs[run][per_head_output]
            return x.transpose(perm).reshape(-1, x.shape[rows], self.heads * x.shape[features])
        return expected

    def bias_into_op(self, probe: Probe, bias: str, values: list[np.ndarray], like: str, name: str, rewrite: Rewrite,
                     full_batch: bool = False):
        """A bias broadcasting against the per-head scores [..., Nq, Nk] to [B' or 1, H or 1, Nq, Nk]; the batch
        axes' sizes are read from `like` when the bias changes along them (a mask that depends on the chunk).
        `full_batch`: the caller knows the bias already spans `like`'s batch axes at every input shape.
        Returns (op input name, values per run)."""
        rank = np.ndim(values[0])
        if rank > self.rank:
            raise NotFused(f"the score bias has rank {rank}, more than the scores' {self.rank}")
        tensor = unsqueeze_to_rank(bias, rank, name, rewrite, target=self.rank)
        values = [v.reshape((1,) * (self.rank - rank) + v.shape) for v in values]
        head_size = values[0].shape[self.head] if self.head is not None else 1
        perm = [*self.batch, *([self.head] if self.head is not None else []), self.rank - 2, self.rank - 1]
        per_batch = any(v.shape[a] != 1 for v in values for a in self.batch)
        if per_batch and (full_batch or probe.same_symbolic_dims(tensor, like, self.batch)):
            per_batch = False  # already the batch axes of `like` at every input shape: nothing to broadcast
        if per_batch:  # e.g. a mask that depends on the chunk: expand it over the whole batch first
            batch = self._batch_sizes(like, f"{name}/bias_batch", rewrite)
            target = rewrite.node("ScatterElements", [
                rewrite.constant(f"{name}/bias_ones", np.ones(self.rank, np.int64)), f"{name}/bias_batch_axes", batch],
                f"{name}/bias_target", name=f"{name}/bias_target")
            tensor = rewrite.node("Expand", [tensor, target], f"{name}/bias_full", name=f"{name}/bias_expand")
        # [-1, H or 1, Nq, Nk], Nq and Nk read from the bias itself: they follow the sequence where it is not chunked
        moved = _transposed(tensor, f"{name}/bias_t", perm, f"{name}/bias_transpose", rewrite)
        rows_keys = rewrite.node("Shape", [moved], f"{name}/bias_rows_keys", name=f"{name}/bias_rows_keys", start=-2)
        batch_heads = rewrite.constant(f"{name}/bias_batch_heads", np.array([-1, head_size], np.int64))
        shape = rewrite.node("Concat", [batch_heads, rows_keys], f"{name}/bias_shape", name=f"{name}/bias_shape",
                             axis=0)
        op_bias = rewrite.node("Reshape", [moved, shape], f"{name}/bias_op", name=f"{name}/bias_merge")

        def value(run):
            v = values[run]
            if per_batch:
                like_shape = probe.shape(like, run)
                v = np.broadcast_to(v, [like_shape[a] if a in self.batch else v.shape[a] for a in range(self.rank)])
            return np.ascontiguousarray(v.transpose(perm).reshape(-1, head_size, *v.shape[-2:]))
        return op_bias, value


def _transposed(tensor: str, out: str, perm: list[int], name: str, rewrite: Rewrite) -> str:
    """`tensor` moved by `perm`; no Transpose (no copy to write) when `perm` moves nothing."""
    if list(perm) == sorted(perm):
        return tensor
    return rewrite.node("Transpose", [tensor], out, name=name, perm=list(perm))
