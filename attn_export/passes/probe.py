"""Run a graph on onnxruntime at two or more valid input shapes and give passes every intermediate tensor.

Passes read shapes and values from these runs: a matched subgraph is verified against the op's reference on the
very tensors the graph computes, and layouts are read off the values of static tensors."""
from __future__ import annotations

import json
from collections import ChainMap, OrderedDict
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from ..errors import UserError
from ..export import PROBE_SHAPES_KEY, get_metadata
from ..ops.functions import with_function_bodies
from .graph import SHAPE_OPS, topological_order

DEFAULT_PROBE_LENGTHS = (128, 256)


def probe_shapes(model: onnx.ModelProto) -> list[dict[str, list[int]]]:
    """Shapes recorded at export, else symbolic axes set to 1 or 2 (axis 0) and 128 or 256 (other axes)."""
    recorded = get_metadata(model, PROBE_SHAPES_KEY)
    if recorded:
        return json.loads(recorded)
    inits = {t.name for t in model.graph.initializer}
    shapes = []
    for batch, length in zip((2, 1), DEFAULT_PROBE_LENGTHS):
        shape_set = {}
        for inp in model.graph.input:
            if inp.name in inits:
                continue
            dims = inp.type.tensor_type.shape.dim
            shape_set[inp.name] = [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else length)
                                   for i, d in enumerate(dims)]
        shapes.append(shape_set)
    return shapes


def random_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int,
                  fully_masked_row: bool = False) -> dict[str, np.ndarray]:
    """Random floats; integer and boolean inputs of rank 2 or more as padding masks (0/1 ids are valid for any
    vocabulary too): batch row 0 full, later rows with a shorter valid prefix, and with `fully_masked_row` the last
    row all padding, so masks with padded and fully masked rows reach the verifier."""
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        shape = shapes[inp.name]
        if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            feeds[inp.name] = (padding_mask(shape, fully_masked_row) if len(shape) >= 2
                               else rng.integers(0, 2, size=shape)).astype(dtype)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def padding_mask(shape: list[int], fully_masked_row: bool = False) -> np.ndarray:
    """1 for the valid prefix of each batch row along the last axis: row b keeps N - b*N/(2B) positions (at least
    one); the last row keeps none with `fully_masked_row`."""
    batch, n = shape[0], shape[-1]
    mask = np.zeros(shape, np.int64)
    for b in range(batch):
        mask[b, ..., :max(1, n - (b * n) // (2 * batch))] = 1
    if fully_masked_row and batch > 1:
        mask[-1] = 0
    return mask


def mask_inputs(model: onnx.ModelProto) -> list[str]:
    """The integer and boolean inputs of rank 2 or more: padding masks (or ids, which take 0/1 as well)."""
    inits = {t.name for t in model.graph.initializer}
    return [inp.name for inp in model.graph.input if inp.name not in inits and len(inp.type.tensor_type.shape.dim) >= 2
            and (np.issubdtype(dtype := helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type), np.integer)
                 or dtype == np.bool_)]


def run_all_tensors(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor of one run, all held at once (small graphs and tests; the Probe keeps only what it must)."""
    probe = with_function_bodies(model)
    values = _Recipe(probe).run_all([feeds], keep=lambda value, boundary: True)[0]
    return {name: values[name] for name in values}


# a tensor up to this size is kept; a larger one only when shaped like what crosses between pieces (_Recipe.run_all)
SMALL_BYTES = 1 << 20
PIECE_NODES = 250  # nodes per onnxruntime session in the probe run: what one piece computes is all held at once
RECENT_BYTES = 1 << 29  # recomputed values kept for the next reads (a layer's q, k, v and output at every probe)


class ProbeValues(Mapping):
    """The tensors of one probe run, by name. Holding them all took ~20 GB per run for a 12-layer BigBird at 4096
    tokens, so only small tensors, those that cross between pieces of the run (the hidden states between layers, the
    masks) and those shaped like them are kept; any other (scores, gathered key blocks, a feed-forward's inner
    activations) is recomputed when read, by running its producers from the nearest kept or recent tensors on
    onnxruntime again: the same kernels on the same inputs, so the same numbers. Every name's shape and dtype is known
    without its value."""

    def __init__(self, recipe: "_Recipe", run: int):
        self._recipe, self._run = recipe, run
        self._kept: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple[tuple, np.dtype]] = {}

    def put(self, name: str, value, keep: bool, remember: bool = True, copy: bool = True) -> None:
        """Records the value's shape; keeps the value (a copy unless `copy` is False: an output of a session with a
        memory arena would pin the whole arena), or with `remember` holds it among the recent."""
        value = np.asarray(value)
        self._shapes[name] = (value.shape, value.dtype)
        if keep:
            self._kept[name] = value.copy() if copy and not value.flags.owndata else value
            self._recipe.forget(self._run, name)
        else:
            self._kept.pop(name, None)
            if remember:
                self._recipe.remember(self._run, name, value)

    def __setitem__(self, name: str, value) -> None:
        self.put(name, value, keep=np.asarray(value).nbytes <= SMALL_BYTES)

    def __getitem__(self, name: str) -> np.ndarray:
        value = self._kept.get(name)
        if value is None:
            if name not in self._shapes:
                raise KeyError(name)
            value = self._recipe.recompute(self, name)
        return value

    def __contains__(self, name) -> bool:
        return name in self._shapes

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def note(self, name: str, shape: tuple, dtype: np.dtype) -> None:
        """A tensor known by its shape, its value recomputed when read."""
        self._kept.pop(name, None)
        self._recipe.forget(self._run, name)
        self._shapes[name] = (tuple(shape), np.dtype(dtype))

    def shape(self, name: str) -> tuple | None:
        known = self._shapes.get(name)
        return None if known is None else tuple(known[0])

    def dtype(self, name: str) -> np.dtype:
        return self._shapes[name][1]

    def available(self, name: str) -> np.ndarray | None:
        """The value if kept or recently computed, without computing it."""
        value = self._kept.get(name)
        return value if value is not None else self._recipe.recent(self._run, name)


class _Recipe:
    """How every probed tensor is computed (the graph's nodes and those passes added), and the recent values."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.nodes = list(model.graph.node) if _is_sorted(model.graph) else topological_order(model.graph)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.position = {id(n): i for i, n in enumerate(self.nodes)}
        self.opsets = {o.domain: o.version for o in model.opset_import}
        self.graph_outputs = {o.name for o in model.graph.output}
        self._recent = _Recent(RECENT_BYTES)

    def run_all(self, feeds_per_run: list[dict], keep, observers=()) -> list[ProbeValues]:
        """Run the graph piece by piece (each piece one session, run for every feed set); what a later piece reads
        is held until then. `keep(value, boundary)` says which values stay; `boundary`: the value crosses the piece's
        end, or is shaped like one that does and is made in the piece (between layers, the hidden states: so a
        layer's q, k, v and output are kept too). Each observer's `see(run, name, values)` is called for the tensors
        in its `names` as soon as they are made, with every value at hand."""
        watched = {name: o for o in observers for name in o.names}
        runs = [ProbeValues(self, r) for r in range(len(feeds_per_run))]
        static = {init.name: onnx.numpy_helper.to_array(init) for init in self.model.graph.initializer}
        last_read = {}
        for i, node in enumerate(self.nodes):
            for name in _reads(node):
                last_read[name] = i
        for values, feeds in zip(runs, feeds_per_run):
            for name, value in [*feeds.items(), *static.items()]:
                values.put(name, value, keep=True)
        live = [{} for _ in runs]
        cuts = self._cuts(last_read)
        for start, end in zip(cuts, cuts[1:]):
            nodes = self.nodes[start:end]
            session, inputs, outputs = self._session(nodes, runs[0].dtype)
            for values, held in zip(runs, live):
                made = dict(zip(outputs, session.run(outputs, {n: held[n] if n in held else values[n]
                                                               for n in inputs})))
                crossing = {n for n in outputs if last_read.get(n, -1) >= end or n in self.graph_outputs}
                boundary = {made[n].shape for n in crossing}
                for name, value in made.items():
                    values.put(name, value, keep=name in crossing or keep(value, value.shape in boundary),
                               remember=False, copy=False)  # the piece sessions have no arena
                    if name in crossing:
                        held[name] = values.available(name)
                for name in outputs:
                    if name in watched:
                        watched[name].see(values._run, name, ChainMap(made, held, values))
                del made
                for name in [n for n in held if last_read.get(n, -1) < end]:
                    del held[name]
        return runs

    def _cuts(self, last_read: dict[str, int]) -> list[int]:
        """Where pieces start and end: about every PIECE_NODES nodes, where the fewest computed tensors cross (between
        two layers only the hidden states and the masks do), so what is held and kept at the cuts stays small."""
        static = {t.name for t in self.model.graph.initializer}
        crossing = [0] * (len(self.nodes) + 2)  # crossing[i]: computed tensors read at or after node i, made before
        for i, node in enumerate(self.nodes):
            inputs = [t for t in _reads(node) if t]
            if node.op_type in SHAPE_OPS or all(t in static for t in inputs):
                static.update(o for o in node.output if o)
                continue
            for out in node.output:
                if last_read.get(out, -1) > i:
                    crossing[i + 1] += 1
                    crossing[last_read[out] + 1] -= 1
        for i in range(1, len(crossing)):
            crossing[i] += crossing[i - 1]
        cuts = [0]
        while cuts[-1] + 2 * PIECE_NODES < len(self.nodes):
            window = range(cuts[-1] + PIECE_NODES // 2, cuts[-1] + 2 * PIECE_NODES)
            cuts.append(min(window, key=lambda i: (crossing[i], -i)))
        return [*cuts, len(self.nodes)]

    def recompute(self, values: ProbeValues, name: str) -> np.ndarray:
        """Runs the producers of `name` back to tensors whose values are at hand (only `name` is asked of the
        session, so onnxruntime reuses the memory of what it makes on the way); keeps it as recent."""
        recent = self._recent.get((values._run, name))
        if recent is not None:
            return recent
        nodes, seen, todo = [], set(), [name]
        while todo:
            node = self.producer.get(todo.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            nodes.append(node)
            todo.extend(i for i in _reads(node) if i and values.available(i) is None)
        nodes.sort(key=lambda n: self.position[id(n)])
        session, inputs, _ = self._session(nodes, lambda i: values.available(i).dtype, outputs=[name])
        value = session.run([name], {n: values.available(n) for n in inputs})[0]
        self._recent.put((values._run, name), value)
        return value

    def recent(self, run: int, name: str) -> np.ndarray | None:
        return self._recent.get((run, name))

    def remember(self, run: int, name: str, value: np.ndarray) -> None:
        self._recent.put((run, name), value)

    def forget(self, run: int, name: str) -> None:
        self._recent.pop((run, name))

    def add(self, nodes: list[onnx.NodeProto], opset_imports, initializers) -> None:
        for node in nodes:
            self.position[id(node)] = len(self.nodes)
            self.nodes.append(node)
            self.producer.update((o, node) for o in node.output if o)
        for opset in opset_imports:
            self.opsets.setdefault(opset.domain, opset.version)

    def _session(self, nodes: list[onnx.NodeProto], dtype_of, outputs: list[str] | None = None):
        """An onnxruntime session computing `outputs` (default: every output of `nodes`, in order) from the tensors
        the nodes read. No memory arena: a kept output would pin all of it."""
        import onnxruntime as ort

        produced = {o for n in nodes for o in n.output if o}
        inputs = sorted({i for n in nodes for i in _reads(n) if i and i not in produced})
        infos = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype_of(name)), None)
                 for name in inputs]
        outputs = outputs or [o for n in nodes for o in n.output if o]
        graph = helper.make_graph(nodes, "probe", infos, [onnx.ValueInfoProto(name=o) for o in outputs])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets.items()],
                                  functions=self.model.functions)
        model.ir_version = self.model.ir_version
        ort.set_default_logger_severity(3)  # graph-optimizer notes are not the user's business
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_cpu_mem_arena = False
        options.log_severity_level = 4  # errors reach the user as one line of ours
        return (ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]),
                inputs, outputs)


class _Recent:
    """Values by (run, name), the least recently used dropped past `budget` bytes (the latest always stays)."""

    def __init__(self, budget: int):
        self.budget, self.bytes, self.values = budget, 0, OrderedDict()

    def get(self, key) -> np.ndarray | None:
        value = self.values.get(key)
        if value is not None:
            self.values.move_to_end(key)
        return value

    def put(self, key, value: np.ndarray) -> None:
        self.pop(key)
        self.values[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.budget and len(self.values) > 1:
            self.bytes -= self.values.popitem(last=False)[1].nbytes

    def pop(self, key) -> None:
        value = self.values.pop(key, None)
        if value is not None:
            self.bytes -= value.nbytes


def _reads(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads: its inputs, and the outer tensors its subgraphs (If, Loop, Scan) use."""
    names = list(node.input)
    for attr in node.attribute:
        for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {i.name for i in graph.input} | {t.name for t in graph.initializer}
            inner |= {o for n in graph.node for o in n.output}
            names += [i for n in graph.node for i in _reads(n) if i not in inner]
    return names


def _is_sorted(graph: onnx.GraphProto) -> bool:
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        if not all(i in available for i in _reads(node)):
            return False
        available.update(node.output)
    return True


class Probe:
    """Values of every tensor at each probe shape set (see ProbeValues: large ones are recomputed when read)."""

    def __init__(self, model: onnx.ModelProto, observers=()):
        """`observers`: see _Recipe.run_all (the Einsum rewrite is checked on values as they are made)."""
        self.shapes = probe_shapes(model)
        # the exporter's symbolic shapes ("batch", "(seq//8)", 4), where it wrote them: what holds at every shape
        self.symbols = {v.name: tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                                      for d in v.type.tensor_type.shape.dim)
                        for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]
                        if v.type.tensor_type.HasField("shape")}
        self.feeds = [random_inputs(model, s, seed=i) for i, s in enumerate(self.shapes)]
        masks = mask_inputs(model)
        if masks and all(self.shapes[0][name][0] > 1 for name in masks):
            # one more run where a whole batch row is padding: fully masked rows are where -inf and finite
            # fills (finfo.min, -10000) differ, and a fusion must reproduce the graph there too
            self.shapes = [*self.shapes, self.shapes[0]]
            self.feeds.append(random_inputs(model, self.shapes[0], seed=0, fully_masked_row=True))
        self._recipe = _Recipe(with_function_bodies(model))
        try:
            self.runs = self._recipe.run_all(self.feeds, keep=lambda value, boundary:
                                             boundary or value.nbytes <= SMALL_BYTES, observers=observers)
            self.observers = list(observers)
        except Exception as e:
            reason = str(e).splitlines()[0]
            raise UserError(f"cannot run the graph on onnxruntime to verify fusions: {reason}") from None

    def evaluate(self, nodes: list, outputs: list[str], opset_imports, initializers=()) -> None:
        """Run new nodes (a pass's rewrite) on every probe and keep their `outputs` like the graph's own tensors."""
        nodes = [_copy(n) for n in nodes]
        self._recipe.add(nodes, opset_imports, initializers)
        for values in self.runs:
            for init in initializers:
                values.put(init.name, onnx.numpy_helper.to_array(init), keep=True)
            for name in outputs:
                value = self._recipe.recompute(values, name)
                values.put(name, value, keep=value.nbytes <= SMALL_BYTES)

    def record(self, nodes: list, opset_imports, made: list[dict]) -> None:
        """New nodes a pass ran on every probe already: `made[run]` maps each output to its value, or to its
        (shape, dtype) where the value was too large to keep (recomputed from `nodes` when read)."""
        self._recipe.add([_copy(n) for n in nodes], opset_imports, ())
        for values, outputs in zip(self.runs, made):
            for name, value in outputs.items():
                if isinstance(value, tuple):
                    values.note(name, *value)
                else:
                    values.put(name, value, keep=True)

    def outputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """The graph's outputs at `feeds` when a probe ran these very feeds, else None."""
        for values, probed in zip(self.runs, self.feeds):
            if probed.keys() == feeds.keys() and all(np.array_equal(probed[k], feeds[k]) and
                                                     probed[k].dtype == feeds[k].dtype for k in feeds):
                return {o.name: values[o.name] for o in self._recipe.model.graph.output}
        return None

    def shape(self, name: str, run: int = 0) -> tuple | None:
        return self.runs[run].shape(name)

    def same_symbolic_dims(self, a: str, b: str, axes) -> bool:
        """Whether `a` and `b` have the same size on `axes` at every input shape, as the exporter's symbolic shapes
        state it (False where it wrote none)."""
        sa, sb = self.symbols.get(a), self.symbols.get(b)
        if sa is None or sb is None or len(sa) != len(sb):
            return False
        return all(sa[i] is not None and sa[i] == sb[i] for i in axes)

    def same_shape_in_all(self, a: str, b: str) -> bool:
        return all(self.shape(a, r) is not None and self.shape(a, r) == self.shape(b, r) for r in range(len(self.runs)))


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy
