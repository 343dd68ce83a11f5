"""A read-only index over an ONNX graph (producers, consumers, static tensors) and the graph edits passes make."""
from __future__ import annotations

from collections import deque
from functools import cached_property

import onnx

# ops whose output is known before the data is: shapes, and anything computed only from shapes and constants
SHAPE_OPS = {"Shape", "Size"}
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


class GraphIndex:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.nodes = list(self.graph.node)
        self.position = {id(n): i for i, n in enumerate(self.nodes)}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.graph_inputs = {i.name for i in self.graph.input} - set(self.initializers)
        self.graph_outputs = {o.name for o in self.graph.output}
        self.static = self._static_tensors()

    def _static_tensors(self) -> set[str]:
        static = set(self.initializers)
        for node in self.nodes:  # nodes are topologically sorted in a valid model
            inputs = [i for i in node.input if i]
            if node.op_type in SHAPE_OPS or (node.op_type not in RANDOM_OPS and all(i in static for i in inputs)):
                static.update(o for o in node.output if o)
        return static

    @cached_property
    def from_weights(self) -> set[str]:
        """Data tensors computed from the model's weights (the hidden states and all that follows them); the other
        data tensors are computed from the inputs alone (an attention mask, position ids)."""
        weights = {name for name, t in self.initializers.items()
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
                   and len(t.dims) >= 2}
        derived: set[str] = set()
        for node in self.nodes:
            if all(o in self.static for o in node.output if o):
                continue  # a shape read off the hidden states is known before the data
            if any(i in derived for i in node.input) or (
                    node.op_type in ("MatMul", "Gemm", "Gather", "Conv") and any(i in weights for i in node.input)):
                derived.update(o for o in node.output if o)
        return derived

    def is_static(self, name: str) -> bool:
        return name in self.static

    def dynamic_inputs(self, node: onnx.NodeProto) -> list[str]:
        return [i for i in node.input if i and i not in self.static]

    def ancestors(self, tensor: str, stop: set[str]) -> list[onnx.NodeProto]:
        """Nodes the tensor depends on, not looking past `stop` tensors."""
        seen, order, todo = set(), [], deque([tensor])
        while todo:
            t = todo.popleft()
            node = self.producer.get(t)
            if t in stop or node is None or id(node) in seen:
                continue
            seen.add(id(node))
            order.append(node)
            todo.extend(i for i in node.input if i)
        return order

    def descendants(self, tensors: set[str]) -> list[onnx.NodeProto]:
        seen, order, todo = set(), [], deque(tensors)
        while todo:
            for node in self.consumers.get(todo.popleft(), []):
                if id(node) not in seen:
                    seen.add(id(node))
                    order.append(node)
                    todo.extend(o for o in node.output if o)
        return sorted(order, key=lambda n: self.position[id(n)])


def topological_sort(graph: onnx.GraphProto) -> None:
    ordered = topological_order(graph)
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def topological_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes in waves: first every node that reads only graph inputs and initializers, then every node that
    reads only those and the first wave, ...; each wave in the graph's own order. A node's wave is one more than
    the latest wave among its producers, so one pass in dependency order (Kahn) finds them all."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o and o not in available}
    readers: dict[int, list[int]] = {}
    waiting = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for name in set(node.input):
            if name in available:
                continue
            if name not in producer:
                raise ValueError("graph has a cycle or a dangling input")
            readers.setdefault(producer[name], []).append(i)
            waiting[i] += 1
    wave = [0] * len(nodes)
    todo = deque(i for i in range(len(nodes)) if not waiting[i])
    done = 0
    while todo:
        i = todo.popleft()
        done += 1
        for j in readers.get(i, []):
            wave[j] = max(wave[j], wave[i] + 1)
            waiting[j] -= 1
            if not waiting[j]:
                todo.append(j)
    if done < len(nodes):
        raise ValueError("graph has a cycle or a dangling input")
    return [nodes[i] for i in sorted(range(len(nodes)), key=lambda i: (wave[i], i))]


def remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads, and initializers nobody reads."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        copies = [onnx.NodeProto() for _ in keep]
        for copy, node in zip(copies, keep):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copies)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        copies = [onnx.TensorProto() for _ in kept]
        for copy, t in zip(copies, kept):
            copy.CopyFrom(t)
        del graph.initializer[:]
        graph.initializer.extend(copies)
