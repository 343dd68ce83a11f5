"""Einsum spelled as MatMul: research code writes attention as `einsum('bhid,bhjd->bhij', q, k)`; the family
passes read MatMul, so every Einsum the graph holds is first rewritten into Transpose / Unsqueeze / MatMul (or Mul
when nothing is contracted) / ReduceSum / Squeeze, and kept only where the rewrite reproduces the Einsum's own
values on every probe. An Einsum that cannot be rewritten stays, and the safety net reports it when it is a
product of two data tensors."""
from __future__ import annotations

import string

import numpy as np
import onnx
from onnx import helper

from .framework import run_nodes_many
from .probe import SMALL_BYTES, Probe


class _Unsupported(Exception):
    pass


def normalize_einsums(model: onnx.ModelProto, probe: Probe) -> int:
    """Rewrites the Einsums of `model` in place; returns how many were rewritten. `probe` learns the new tensors.
    A probe made with an EinsumCheck observer checked the rewrites as it ran; otherwise they are checked now."""
    check = next((o for o in getattr(probe, "observers", ()) if isinstance(o, EinsumCheck)), None)
    if check is None:
        check = EinsumCheck(model)
        for run, values in enumerate(probe.runs):
            for name in check.names:
                check.see(run, name, values)
    rewritten, new_nodes = 0, []
    for node in list(model.graph.node):
        replacement = check.replacements.get(node.output[0]) if node.op_type == "Einsum" else None
        if replacement and check.same[node.output[0]]:
            new_nodes.extend(replacement)
            probe.record(replacement[:-1], model.opset_import, [check.made[(node.output[0], run)]
                                                                for run in range(len(probe.runs))])
            rewritten += 1
        else:
            new_nodes.append(node)
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
    return rewritten


class EinsumCheck:
    """Rewrites each Einsum (from its operands' shapes at the first probe) and compares the rewrite with the Einsum's
    own values at every probe, as a probe observer: while the probe runs, the operands are at hand; read later, the
    large ones (a BigBird's gathered key blocks) would be recomputed."""

    def __init__(self, model: onnx.ModelProto):
        self.einsums = {n.output[0]: n for n in model.graph.node if n.op_type == "Einsum"}
        self.names = set(self.einsums)
        self.opsets = list(model.opset_import)
        self.replacements: dict[str, list | None] = {}
        self.same: dict[str, bool] = {}
        self.made: dict[tuple[str, int], dict] = {}  # (Einsum, run) -> the rewrite's tensors: values or shapes

    def see(self, run: int, name: str, values) -> None:
        node = self.einsums[name]
        if name not in self.replacements:
            try:
                self.replacements[name] = _rewrite(node, [np.shape(values[i]) if i in values else None
                                                          for i in node.input])
            except _Unsupported:
                self.replacements[name] = None
            self.same[name] = self.replacements[name] is not None
        replacement = self.replacements[name]
        if not self.same[name]:
            return
        inner = [o for n in replacement[:-1] for o in n.output]
        results = run_nodes_many(replacement, [name, *inner], values, self.opsets)
        self.same[name] = _same(results[0], values[name])
        # small values copied: an onnxruntime output keeps its session's whole memory arena alive
        self.made[(name, run)] = {o: v.copy() if v.nbytes <= SMALL_BYTES else (v.shape, v.dtype)
                                  for o, v in zip(inner, results[1:])}


def _same(got: np.ndarray, expected: np.ndarray) -> bool:
    """Equal up to float rounding; NaN where the Einsum gives NaN (it reads a fully masked softmax row). np.allclose's
    test (|got - expected| <= atol + rtol |expected|, equal infinities and NaNs equal), in place where it can be:
    the operands are a 4096-token BigBird's [B, H, blocks, 64, 448] scores."""
    if got.shape != expected.shape:
        return False
    if np.array_equal(got, expected):  # onnxruntime's Einsum multiplies as MatMul does: often the very same numbers
        return True
    expected = expected.astype(np.result_type(expected, 1.0), copy=False)  # integers compared as floats, as allclose
    tolerance = np.abs(expected)
    scale = float(tolerance.max(initial=0.0))
    finite = None
    if not np.isfinite(scale):  # the scale is that of the finite entries; only those are compared with a tolerance
        finite = np.isfinite(expected)
        scale = float(tolerance.max(where=finite, initial=0.0))
    with np.errstate(invalid="ignore", over="ignore"):
        tolerance *= 1e-4
        tolerance += 1e-5 * max(scale, 1.0)
        difference = np.subtract(got, expected)
        close = np.abs(difference, out=difference) <= tolerance
        if finite is not None:
            close &= finite
        if close.all():
            return True
        a, b = got[~close], expected[~close]
        return bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


def _parse(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """Operand and output subscripts with '...' spelled out as letters no operand uses (broadcast right-aligned)."""
    equation = equation.replace(" ", "")
    if "->" not in equation:
        raise _Unsupported("implicit output")
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise _Unsupported("operand count")
    used = set(equation) - set(".,->")
    free = [c for c in string.ascii_letters if c not in used]
    ellipsis_rank = max((r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t), default=0)
    letters = "".join(free[:ellipsis_rank])
    spelled = []
    for term, rank in zip(terms, ranks):
        if "..." in term:
            own = rank - len(term.replace("...", ""))
            term = term.replace("...", letters[ellipsis_rank - own:] if own else "")
        if len(term) != rank or len(set(term)) != len(term):
            raise _Unsupported("rank mismatch or a repeated subscript (a diagonal)")
        spelled.append(term)
    return spelled, out.replace("...", letters)


class _Builder:
    """New nodes named after the Einsum and carrying its metadata, so they report under the Einsum's module."""

    def __init__(self, node: onnx.NodeProto):
        self.einsum, self.nodes = node, []

    def _node(self, op: str, inputs: list[str], output: str | None, **attrs) -> onnx.NodeProto:
        name = f"{self.einsum.name or self.einsum.output[0]}_{op}_{len(self.nodes)}"
        node = helper.make_node(op, inputs, [output or f"{name}_out"], name=name, **attrs)
        node.metadata_props.extend(self.einsum.metadata_props)
        self.nodes.append(node)
        return node

    def add(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        return self._node(op, inputs, output, **attrs).output[0]

    def const(self, values: list[int]) -> str:
        axes = onnx.numpy_helper.from_array(np.array(values, np.int64))
        return self._node("Constant", [], None, value=axes).output[0]

    def arrange(self, tensor: str, have: str, want: str) -> str:
        """`tensor` with subscripts `have` laid out as `want` (a superset of `have`: missing ones become size 1)."""
        present = [c for c in want if c in have]
        if present != list(have):
            tensor = self.add("Transpose", [tensor], perm=[have.index(c) for c in present])
        missing = [i for i, c in enumerate(want) if c not in have]
        if missing:
            tensor = self.add("Unsqueeze", [tensor, self.const(missing)])
        return tensor

    def reduce(self, tensor: str, have: str, drop: set[str]) -> tuple[str, str]:
        """Sums over the subscripts in `drop` (size-1 placeholder axes are squeezed)."""
        summed = [i for i, c in enumerate(have) if c in drop and c not in (_ROW, _COLUMN)]
        if summed:
            tensor = self.add("ReduceSum", [tensor, self.const(summed)], keepdims=1)
        axes = [i for i, c in enumerate(have) if c in drop]
        if axes:
            tensor = self.add("Squeeze", [tensor, self.const(axes)])
        return tensor, "".join(c for c in have if c not in drop)


def _rewrite(node: onnx.NodeProto, shapes: list[tuple | None]) -> list[onnx.NodeProto]:
    equation = next(a.s.decode() for a in node.attribute if a.name == "equation")
    if any(s is None for s in shapes) or len(node.input) < 2:
        raise _Unsupported("unknown operand shapes")
    terms, out = _parse(equation, [len(s) for s in shapes])
    build = _Builder(node)
    tensors = list(node.input)
    # sum away, per operand, the subscripts no other operand and not the output use
    for i, term in enumerate(terms):
        elsewhere = set(out).union(*(set(t) for j, t in enumerate(terms) if j != i))
        tensors[i], terms[i] = build.reduce(tensors[i], term, set(term) - elsewhere)
    left, left_terms = tensors[0], terms[0]
    for i in range(1, len(terms)):
        later = set(out).union(*(set(t) for t in terms[i + 1:]))
        left, left_terms = _pair(build, left, left_terms, tensors[i], terms[i], later)
    if left_terms != out or left in node.input:
        build.add("Transpose", [left], node.output[0], perm=[left_terms.index(c) for c in out])
    else:
        build.nodes[-1].output[0] = node.output[0]  # the last product already has the output's layout
    return build.nodes


def _pair(build: _Builder, a: str, sa: str, b: str, sb: str, keep: set[str]) -> tuple[str, str]:
    """One contraction of two operands; returns the product and its subscripts (those in `keep`)."""
    shared = [c for c in sa if c in sb]
    contracted = [c for c in shared if c not in keep]
    only_a = [c for c in sa if c not in sb]
    only_b = [c for c in sb if c not in sa]
    if not contracted:  # an elementwise product with broadcasting
        layout = sa + "".join(only_b)
        return build.add("Mul", [build.arrange(a, sa, layout), build.arrange(b, sb, layout)]), layout
    # MatMul contracts one subscript k between one row subscript m and one column subscript n; every other
    # subscript is a (broadcast) batch axis, and further contracted ones are summed after the product
    k = contracted[-1]
    m = only_a[-1] if only_a else _ROW
    n = only_b[-1] if only_b else _COLUMN
    batch = "".join([c for c in shared if c != k] + [c for c in only_a if c != m] + [c for c in only_b if c != n])
    product = build.add("MatMul", [build.arrange(a, sa, batch + m + k), build.arrange(b, sb, batch + k + n)])
    return build.reduce(product, batch + m + n, (set(contracted) - {k}) | {_ROW, _COLUMN})


# size-1 axes that turn a vector operand into a matrix for MatMul (never letters, so no subscript clashes)
_ROW, _COLUMN = "<", ">"
