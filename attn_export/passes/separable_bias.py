"""A score bias that separates into a key-side part and query-side terms the softmax ignores.

    b_ij = c_j + sum_t u_t[i] w_t        (c reads the keys' axis only, u_t the queries' only, w_t constants)

is what distance-based attention adds to q.k: MGK's logits log pi_r - a |q_i - k_jr|^2 add the query-side term
-a |q_i|^2 and the key-side term log pi_r - a |k_jr|^2 to 2a q_i.k_jr. A softmax over j is blind to a term that is
the same for every key of a row, so the op's bias is c alone, broadcast over the queries ([.., 1, Nk]): the Nq x Nk
bias is never written, and the graph's nodes that wrote it fall away.

The walk reads Add, Sub, Neg, Mul (one side a single term) and Concat on the keys' axis down to tensors that have a
single query or a single key. A dropped term must be finite wherever it is computed (an infinite one would have
masked the row or made it NaN), so its query-side factor may not come from an op that makes inf or NaN out of finite
numbers, and its constant must be one number across the keys (MGK with one sigma for both components; with two, the
term is -a_r |q_i|^2, different per component, and the bias stays whole). The key-side part c may hold -inf
(log pi = -inf switches an MGK component off): it stays a bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .finite_scores import FiniteCheck
from .framework import Rewrite
from .graph import GraphIndex
from .probe import Probe
from .softmax_core import axis_is_last

MAX_TERMS = 8


@dataclass(frozen=True)
class Term:
    """u[i] * v[j]: `row` [.., Nq, 1] and `col` [.., 1, Nk or 1], None standing for 1."""
    row: str | None
    col: str | None


@dataclass
class KeySide:
    bias: str | None  # c [.., 1, Nk], or None when the bias had no key-side part


class _Walk:
    """Splits a bias into terms; the helper nodes it needs (products, sums, joined blocks) go to `rewrite`."""

    def __init__(self, index: GraphIndex, probe: Probe, bias: str, name: str, rewrite: Rewrite):
        self.index, self.probe, self.name, self.rewrite = index, probe, name, rewrite
        self.rank = len(probe.shape(bias))
        self.dtype = np.asarray(probe.runs[0][bias]).dtype
        self.count = 0
        self.ranks: dict[str, int] = {}  # of the tensors the walk makes (an elementwise result: its inputs' largest)

    def new(self, op_type: str, inputs: list[str], rank: int | None = None, **attrs) -> str:
        self.count += 1
        out = f"{self.name}/separable{self.count}_{op_type.lower()}"
        self.ranks[out] = rank if rank is not None else max(self.rank_of(t) for t in inputs)
        return self.rewrite.node(op_type, inputs, out, name=out, **attrs)

    def constant(self, value, dtype=None) -> str:
        self.count += 1
        value = np.array(value, dtype or self.dtype)
        self.ranks[f"{self.name}/separable{self.count}_const"] = value.ndim
        return self.rewrite.constant(f"{self.name}/separable{self.count}_const", value)

    def rank_of(self, tensor: str) -> int:
        return self.ranks[tensor] if tensor in self.ranks else len(self.probe.shape(tensor))

    def full_rank(self, tensor: str) -> str:
        """`tensor` with leading axes of 1 up to the bias's rank."""
        missing = self.rank - self.rank_of(tensor)
        return self.new("Unsqueeze", [tensor, self.constant(list(range(missing)), np.int64)], rank=self.rank) \
            if missing else tensor

    def kind(self, tensor: str) -> str:
        """"row" (one key), "col" (one query, or a scalar), "full", or "unknown" (no probed shape)."""
        shapes = [self.probe.shape(tensor, run) for run in range(len(self.probe.runs))]
        if any(s is None or len(s) > self.rank for s in shapes):
            return "unknown"
        shapes = [(1,) * (self.rank - len(s)) + tuple(s) for s in shapes]
        if all(s[-2] == 1 for s in shapes):
            return "col"
        return "row" if all(s[-1] == 1 for s in shapes) else "full"

    def _times(self, a: str | None, b: str | None) -> str | None:
        return b if a is None else a if b is None else self.new("Mul", [a, b])

    def _negated(self, term: Term) -> Term:
        return Term(term.row, self.new("Neg", [term.col]) if term.col else self.constant(-1.0))

    def terms(self, tensor: str, depth: int = 0) -> list[Term] | None:
        kind = self.kind(tensor)
        if kind == "row":
            return [Term(tensor, None)]
        if kind == "col":
            return [Term(None, tensor)]
        node = self.index.producer.get(tensor)
        if kind != "full" or node is None or depth > 16:
            return None
        if node.op_type == "Concat" and axis_is_last(node, self.probe):
            return self._concatenated(node.input, depth)
        parts = [self.terms(t, depth + 1) for t in node.input]
        if any(p is None for p in parts):
            return None
        if node.op_type == "Add" and len(parts) == 2:
            terms = parts[0] + parts[1]
        elif node.op_type == "Sub" and len(parts) == 2:
            terms = parts[0] + [self._negated(t) for t in parts[1]]
        elif node.op_type == "Neg":
            terms = [self._negated(t) for t in parts[0]]
        elif node.op_type == "Mul" and len(parts) == 2 and min(len(p) for p in parts) == 1:
            terms = [Term(self._times(a.row, b.row), self._times(a.col, b.col)) for a in parts[0] for b in parts[1]]
        else:
            return None
        return terms if len(terms) <= MAX_TERMS else None

    def grouped(self, terms: list[Term]) -> dict[str | None, str]:
        """The terms summed per query-side factor: {row (None for 1): the sum of its key-side factors}."""
        sums: dict[str | None, str] = {}
        for term in terms:
            col = term.col or self.constant(1.0)
            sums[term.row] = self.new("Add", [sums[term.row], col]) if term.row in sums else col
        return sums

    def _concatenated(self, blocks: list[str], depth: int) -> list[Term] | None:
        """Blocks side by side on the keys' axis: per query-side factor, its key-side sums joined (0 in a block
        that lacks it), each widened to its block's keys, read from a key-side tensor of that block."""
        groups, widths = [], []
        for block in blocks:
            terms, wide = self.terms(block, depth + 1), self._keys_of(block)
            if terms is None or wide is None:
                return None
            groups.append({row: self.full_rank(col) for row, col in self.grouped(terms).items()})
            widths.append(self.new("Shape", [wide], rank=1, start=-1))
        leads = [self.new("Shape", [col], rank=1, end=-2) for group in groups for col in group.values()]
        lead = self.new("Max", leads) if len(leads) > 1 else leads[0]
        one = self.constant([1], np.int64)
        terms = []
        for row in dict.fromkeys(r for group in groups for r in group):
            widened = [self.new("Expand", [group.get(row) or self.constant(0.0),
                                           self.new("Concat", [lead, one, width], rank=1, axis=0)], rank=self.rank)
                       for group, width in zip(groups, widths)]
            terms.append(Term(row, self.new("Concat", widened, axis=-1)))
        return terms if len(terms) <= MAX_TERMS else None

    def _keys_of(self, block: str, depth: int = 0) -> str | None:
        """A graph tensor of one query and all the keys of `block`, among those it is computed from."""
        kind = self.kind(block)
        if kind == "col" and all(self.probe.shape(block, run)[-1] > 1 for run in range(len(self.probe.runs))):
            return block
        node = self.index.producer.get(block)
        if kind != "full" or node is None or depth > 16:
            return None
        return next((t for t in (self._keys_of(i, depth + 1) for i in node.input) if t), None)


def key_side_bias(index: GraphIndex, probe: Probe, bias: str, name: str, rewrite: Rewrite) -> KeySide | None:
    """The softmax's bias with the query-side terms it ignores dropped (KeySide.bias None: nothing left); None, with
    nothing written to `rewrite`, where `bias` does not separate so. The caller checks the result numerically, as
    every rewrite."""
    if bias not in index.producer:  # a bias the pass computes (a mask copied onto zero scores): not walked
        return None
    trial = Rewrite()
    walk = _Walk(index, probe, bias, name, trial)
    if walk.kind(bias) != "full" or (terms := walk.terms(bias)) is None:
        return None
    sums = walk.grouped(terms)
    dropped = [(row, col) for row, col in sums.items() if row is not None]
    finite = FiniteCheck(index, probe, trial)
    if not dropped or not all(finite(row) and _from_constants(index, trial, col) for row, col in dropped):
        return None
    made = {o for n in trial.nodes for o in n.output}
    trial.evaluate(probe, [t for t in {*(col for _, col in dropped), sums.get(None)} if t in made],
                   index.model.opset_import)
    for _, col in dropped:  # one number along the keys, finite, at every probe
        if not all(np.isfinite(v).all() and (v == v[..., :1]).all() for v in (np.asarray(r[col]) for r in probe.runs)):
            return None
    rewrite.nodes.extend(trial.nodes)
    rewrite.initializers.extend(trial.initializers)
    return KeySide(sums.get(None))


def _from_constants(index: GraphIndex, trial: Rewrite, tensor: str) -> bool:
    """`tensor` is computed from weights and shapes alone."""
    producer = {o: n for n in trial.nodes for o in n.output}
    todo, constants = [tensor], {t.name for t in trial.initializers}
    while todo:
        name = todo.pop()
        if name in producer:
            if producer[name].op_type != "Shape":  # sizes only
                todo.extend(i for i in producer[name].input if i)
        elif name not in constants and not index.is_static(name):
            return False
    return True
