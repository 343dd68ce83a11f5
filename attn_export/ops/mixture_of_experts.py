"""MixtureOfExperts: Switch Transformer's top-1 routed FFN with capacity (kernel family K5).

Per group (one batch row of T tokens), router in float32:
  p = softmax(x W_r), e* = argmax p, g = p[e*];
  capacity C = `capacity`, or ceil(T * capacity_factor / E) when `capacity` is 0;
  tokens join their expert's queue in sequence order and a token is kept iff its place in the queue is <= C;
  y = g * W_out[e*]^T act(W_in[e*]^T x) for a kept token, 0 for a dropped one (the caller's residual carries it).
Experts are bias-free FFNs with stacked weights; act is relu (T5/Switch) or gelu.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from onnx import numpy_helper

from .contract import Attribute, OpContract, TensorSpec, shape_of_first_input
from .onnx_builder import OnnxBuilder

FLOATS = ("float32", "float16", "bfloat16")
ACTIVATIONS = ("relu", "gelu")


def capacity_for(tokens: int, experts: int, capacity: int, capacity_factor: float) -> int:
    return capacity or math.ceil(tokens * capacity_factor / experts)


def reference(hidden, router, expert_in, expert_out, *, capacity=0, capacity_factor=1.0, activation="relu"):
    x = hidden.float()
    _, tokens, _ = x.shape
    experts = router.shape[1]
    probs = torch.softmax(x @ router.float(), -1)
    gate, choice = probs.max(-1)  # [B, T]
    chosen = torch.nn.functional.one_hot(choice, experts)  # [B, T, E]
    place = (chosen.cumsum(1) * chosen).sum(-1)  # 1-based place in the expert's queue
    kept = place <= capacity_for(tokens, experts, capacity, capacity_factor)
    act = torch.nn.functional.relu if activation == "relu" else torch.nn.functional.gelu
    y = torch.zeros_like(x)
    for e in range(experts):
        y_e = act(x @ expert_in[e].float()) @ expert_out[e].float()
        y = torch.where((choice == e)[..., None], y_e, y)
    return (y * (gate * kept)[..., None]).to(hidden.dtype)


def decompose(b: OnnxBuilder, inputs: list[str], outputs: list[str], attrs: dict) -> None:
    """Routed dispatch: each kept token is scattered into its expert's slot (row e*C + place - 1 of its group), the
    experts run as one batched MatMul over their [C, d] slots, and each token gathers its slot back. Dispatch and
    combine move O(T * d) numbers; the GShard one-hot matmuls D^T x and D y cost O(T * E * C * d) products."""
    hidden, router, expert_in, expert_out = inputs
    x = b.op("Cast", hidden, to=1)
    probs = b.op("Softmax", b.op("MatMul", x, b.op("Cast", router, to=1)), axis=-1)  # [B,T,E]
    choice = b.op("ArgMax", probs, axis=-1, keepdims=1)  # [B,T,1]
    gate = b.op("GatherElements", probs, choice, axis=2)  # [B,T,1]
    experts = b.dim(b.op("Shape", router), 1)
    expert_ids = b.op("Range", b.const(0), b.op("Squeeze", experts), b.const(1))
    chosen = b.op("Cast", b.op("Equal", choice, expert_ids), to=7)  # [B,T,E] 0/1
    # 1-based place of each token in its expert's queue, in sequence order within the group
    place = b.reduce("ReduceSum", b.op("Mul", b.op("CumSum", chosen, b.const(1)), chosen), [-1])  # [B,T,1]

    x_shape = b.op("Shape", x)
    batch, tokens, width = b.dim(x_shape, 0), b.dim(x_shape, 1), b.dim(x_shape, 2)
    if attrs["capacity"]:
        capacity = b.const([attrs["capacity"]])
    else:
        ratio = b.op("Div", b.op("Mul", b.op("Cast", tokens, to=1), b.const([attrs["capacity_factor"]], np.float32)),
                     b.op("Cast", experts, to=1))
        capacity = b.op("Cast", b.op("Ceil", ratio), to=7)
    kept = b.op("LessOrEqual", place, capacity)  # [B,T,1]
    slots = b.op("Mul", experts, capacity)  # E*C per group
    group_start = b.unsqueeze(b.op("Mul", b.op("Range", b.const(0), b.op("Squeeze", batch), b.const(1)),
                                   slots), [1, 2])  # [B,1,1]
    slot = b.op("Add", b.op("Add", b.op("Mul", choice, capacity), b.op("Sub", place, b.const(1))), group_start)
    all_slots = b.op("Mul", batch, slots)  # B*E*C
    # a dropped token writes the spare row after the last slot (never read back)
    row = b.op("Reshape", b.op("Where", kept, slot, all_slots), b.const([-1, 1]))  # [B*T,1]
    pool = b.op("ConstantOfShape", b.op("Concat", b.op("Add", all_slots, b.const([1])), width, axis=0),
                value=numpy_helper.from_array(np.zeros(1, np.float32)))  # [B*E*C+1,d]
    token_rows = b.op("Reshape", x, b.op("Concat", b.const([-1]), width, axis=0))  # [B*T,d]
    expert_x = b.op("Slice", b.op("ScatterND", pool, row, token_rows), b.const([0]), all_slots, b.const([0]))
    expert_x = b.op("Reshape", expert_x, b.op("Concat", batch, experts, capacity, width, axis=0))  # [B,E,C,d]
    # [B,E,C,d] @ [E,d,F]: the batch axes broadcast, each expert's weights meet its own slots
    h = b.op("MatMul", expert_x, b.op("Cast", expert_in, to=1))  # [B,E,C,F]
    h = b.op("Relu", h) if attrs["activation"] == "relu" else b.op("Gelu", h)
    y = b.op("MatMul", h, b.op("Cast", expert_out, to=1))  # [B,E,C,d]
    y_rows = b.op("Reshape", y, b.op("Concat", b.const([-1]), width, axis=0))  # [B*E*C,d]
    # each token reads its slot back (a dropped one reads slot 0 and is zeroed), weighted by its gate
    back = b.op("Where", kept, slot, b.const(0))  # [B,T,1]
    gathered = b.op("Gather", y_rows, b.op("Squeeze", back, b.const([2])), axis=0)  # [B,T,d]
    combined = b.op("Where", kept, b.op("Mul", gathered, gate), b.const(0.0, np.float32))
    b.op("CastLike", combined, hidden, outputs=[outputs[0]])


CONTRACT = OpContract(
    op_type="MixtureOfExperts",
    version=1,
    doc=__doc__,
    inputs=(
        TensorSpec("hidden", 3, FLOATS, "[B, T, d] tokens; each batch row is one routing group"),
        TensorSpec("router", 2, FLOATS, "[d, E] router weights (applied in float32)"),
        TensorSpec("expert_in", 3, FLOATS, "[E, d, F] first expert matrix"),
        TensorSpec("expert_out", 3, FLOATS, "[E, F, d] second expert matrix"),
    ),
    outputs=(TensorSpec("output", 3, FLOATS, "[B, T, d] gated expert output; 0 for dropped tokens"),),
    attributes=(
        Attribute("capacity", "int", 0, "tokens per expert per group; 0 means ceil(T * capacity_factor / E)"),
        Attribute("capacity_factor", "float", 1.0, "used when capacity is 0"),
        Attribute("activation", "string", "relu", "expert activation: " + " or ".join(ACTIVATIONS),
                  options=ACTIVATIONS),
    ),
    reference=reference,
    decompose=decompose,
    output_shapes=shape_of_first_input,
)
