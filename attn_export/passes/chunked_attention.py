"""Dense attention run per chunk (SPADE's blocks, Transformer-LS's segments, FLASH's groups) or with relu^2 weights:
the op reads the per-head q, k, v themselves, chunks folded into its batch (chunk_layout.py), and the graph's
per-head output is rebuilt from the op's output."""
from __future__ import annotations

import onnx

from ..ops import DENSE_ATTENTION
from .chunk_layout import ChunkLayout
from .framework import Match, NotFused, Rewrite, closed_region, untransposed, verify_numerically
from .graph import GraphIndex
from .probe import Probe
from .score_chain import ScoreChain, chain_bias
from .separable_bias import key_side_bias

OP = DENSE_ATTENTION


def match(index: GraphIndex, probe: Probe, anchor: onnx.NodeProto, chain: ScoreChain, pv: onnx.NodeProto,
          layout: ChunkLayout, name: str) -> Match:
    q, v, output = chain.qk.input[0], pv.input[1], pv.output[0]
    k, k_transposed = untransposed(index, probe, chain.qk.input[1])
    rewrite = Rewrite()
    query = chain.fold_shape_factors(probe, q, name, rewrite, index.model.opset_import)
    bias = None
    if chain.has_bias:
        bias, bias_values = chain_bias(index, probe, chain, name, rewrite, rank4=False)
        # a bias read from graph tensors that span q's batch axes (by the exporter's symbolic shapes) spans them too
        full = all(any(probe.same_symbolic_dims(side, q, [axis]) for side in chain.side_inputs(index))
                   for axis in layout.batch)
        key_side = key_side_bias(index, probe, bias, name, rewrite) if anchor.op_type == "Softmax" else None
        if key_side is not None:  # the softmax ignores the bias's query-side terms: what is left reads the keys alone
            bias, full = key_side.bias, False
            bias_values = [run[bias] for run in probe.runs] if bias else []
    inputs, values, op_output, expected = layout.qkv_into_op(probe, query, k, v, output, name, rewrite,
                                                             k_transposed)
    nodes = closed_region(index, [q, k, v, *chain.side_inputs(index)], output)

    score_fn = "softmax" if anchor.op_type == "Softmax" else "relu_squared"
    attrs = {"num_heads": layout.heads, "scale": chain.scale, "causal": 0, "score_fn": score_fn}
    if bias:
        bias, bias_value = layout.bias_into_op(probe, bias, bias_values, like=q, name=name, rewrite=rewrite,
                                               full_batch=full)
        inputs, values = inputs + [bias], values + [bias_value]
    why = verify_numerically(OP, probe, values, expected, attrs)
    if why:
        raise NotFused(f"the op's reference does not reproduce the graph: {why}")
    return rewrite.match(OP, name, inputs, op_output, attrs, nodes)
