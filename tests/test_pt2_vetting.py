"""Security vetting of .pt2 archives (attn_export.loading.pt2_vetting): hostile variants of a valid archive, each of
which would run code (or load a library) in torch.export.load or in ExportedProgram.module(), are refused, or
defused, before that happens, with one line naming the file."""
import io
import json
import pickle
import zipfile

import pytest
import torch

from attn_export.errors import UserError
from attn_export.loading import load_model
from pt2_programs import WritesMarker, export_tagger


@pytest.fixture(scope="module")
def tagger_pt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "tagger.pt2"
    model, example = export_tagger(path, seq=torch.export.Dim("seq", min=4, max=64))
    return path, model, example


# Hostile variants of a valid archive: each would run code (or load a library) in torch.export.load or in
# ExportedProgram.module(); the loader must refuse them, or defuse them, before that happens.

def rewrite_archive(source, target, edits=None, extra=None):
    """Copy a .pt2 archive, replacing entries by edits[relative name](old bytes) and adding extra entries."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            relative = info.filename[len(root) + 1:]
            data = zin.read(info.filename)
            if edits and relative in edits:
                data = edits[relative](data)
            zout.writestr(info.filename, data)
        for relative, data in (extra or {}).items():
            zout.writestr(f"{root}/{relative}", data)


def edit_program(change):
    def edit(data):
        program = json.loads(data)
        change(program)
        return json.dumps(program).encode()
    return edit


def first(program, key):
    """The first dict in the program JSON that holds `key`."""
    stack = [program]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            if key in node:
                return node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    raise KeyError(key)


def torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def hostile_sample_inputs(marker):
    return {"data/sample_inputs/model.pt": lambda _: torch_saved(((WritesMarker(marker),), {}))}, None


def hostile_pickled_weight(marker):
    def config(data):
        weights = json.loads(data)
        next(iter(weights["config"].values()))["use_pickle"] = True
        return json.dumps(weights).encode()
    return {"data/weights/model_weights_config.json": config,
            "data/weights/weight_0": lambda _: torch_saved(WritesMarker(marker))}, None


def hostile_sympy_expression(marker):
    def change(program):
        node = first(program, "expr_str")
        node["expr_str"] = f"(open('{marker}', 'w') and 0) + " + node["expr_str"]
    return {"models/model.json": edit_program(change)}, None


def hostile_sympy_string(marker):
    def change(program):
        node = first(program, "expr_str")
        node["expr_str"] = "Symbol('s0; import os')"
    return {"models/model.json": edit_program(change)}, None


def hostile_sympy_expression_without_quotes(marker):
    def change(program):
        node = first(program, "expr_str")
        node["expr_str"] = "Max(exec(chr(49)), " + node["expr_str"] + ")"
    return {"models/model.json": edit_program(change)}, None


def hostile_node_target(marker):
    def change(program):
        first(program, "target")["target"] = "torch.os.system"
    return {"models/model.json": edit_program(change)}, None


def hostile_treespec(marker):
    def change(program):
        node = first(program, "in_spec")
        node["in_spec"] = node["in_spec"].replace('"builtins.tuple"', '"collections.defaultdict"', 1)
    return {"models/model.json": edit_program(change)}, None


def hostile_argument_name(marker):
    def change(program):
        first(program, "forward_arg_names")["forward_arg_names"][0] = f"x=open('{marker}', 'w')"
    return {"models/model.json": edit_program(change)}, None


def hostile_compiled_code(marker):
    return None, {"data/aotinductor/model/model.so": b"\x7fELF"}


def hostile_custom_object(marker):
    return None, {"data/constants/custom_obj_0": pickle.dumps(WritesMarker(marker))}


HOSTILE = [
    (hostile_sample_inputs, "sample inputs hold Python objects"),
    (hostile_pickled_weight, "is stored as a pickled object"),
    (hostile_sympy_expression, "calls something other than a sympy function"),
    (hostile_sympy_string, "holds an unexpected string"),
    (hostile_sympy_expression_without_quotes, "calls something other than a sympy function"),
    (hostile_node_target, "which is not a torch op"),
    (hostile_treespec, "inputs use the Python type collections.defaultdict"),
    (hostile_argument_name, "which is not a plain identifier"),
    (hostile_compiled_code, "unexpected entry 'data/aotinductor/model/model.so'"),
    (hostile_custom_object, "unexpected entry 'data/constants/custom_obj_0'"),
]


@pytest.mark.parametrize("make, expected", HOSTILE, ids=[make.__name__[8:] for make, _ in HOSTILE])
def test_hostile_pt2_is_refused(tagger_pt2, tmp_path, make, expected):
    path, marker = tmp_path / "model.pt2", tmp_path / "model.marker"
    edits, extra = make(marker)
    rewrite_archive(tagger_pt2[0], path, edits, extra)
    with pytest.raises(UserError) as info:
        load_model(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert expected in message
    assert not marker.exists(), "the loader ran code from the file"


def test_pt2_guards_code_is_never_executed(tagger_pt2, tmp_path):
    path, marker = tmp_path / "model.pt2", tmp_path / "model.marker"

    def change(program):
        program["guards_code"] = [f"open('{marker}', 'w') is not None"]

    rewrite_archive(tagger_pt2[0], path, {"models/model.json": edit_program(change)})
    loaded = load_model(path)
    loaded.module(*loaded.example_inputs().values())
    loaded.exported_program.module()(*loaded.example_inputs().values())
    assert not marker.exists()


def test_loaded_graph_calling_a_python_function_is_refused(tagger_pt2):
    from attn_export.loading.common import LoadError as _LoadError
    from attn_export.loading.pt2_vetting import vet_program as _vet_program

    program = torch.export.load(tagger_pt2[0])  # a file we made: safe to load directly
    node = next(n for n in program.graph.nodes if n.op == "call_function")
    node.target = print
    with pytest.raises(_LoadError, match="which is not a torch op"):
        _vet_program(program)


def test_hostile_graph_input_name_is_refused(tagger_pt2, tmp_path):
    """FX pastes graph input names into the Python source it compiles for .module()."""
    path, marker = tmp_path / "model.pt2", tmp_path / "model.marker"
    injected = f"mask=open('{marker}', 'w')"
    edit = lambda data: data.replace(b'"mask"', json.dumps(injected).encode())  # noqa: E731
    rewrite_archive(tagger_pt2[0], path, {"models/model.json": edit})
    with pytest.raises(UserError, match="refusing to load: the program holds the name"):
        load_model(path)
    assert not marker.exists()


def test_library_output_containers_are_flattened_by_name_and_other_types_refused_with_what_to_do():
    """A transformers ModelOutput in the out_spec would be rebuilt from the class the file names: its tensors are
    returned as a tuple instead, named by its keys; a container of another shape is refused with the fix, and an
    unnamed type as hostile."""
    from attn_export.loading.common import LoadError
    from attn_export.loading.pt2_vetting import _flatten_library_outputs, _vet_program_json, _vet_treespec

    leaf = {"type": None, "context": None, "children_spec": []}
    kind = "transformers.modeling_outputs.BaseModelOutput"
    spec = {"type": kind, "context": '["last_hidden_state", "pooler_output"]', "children_spec": [leaf, leaf]}

    def program(out_spec):
        return {"graph_module": {"module_call_graph": [{"signature": {"out_spec": json.dumps([1, out_spec])}}]}}

    flat = program(spec)
    assert _flatten_library_outputs(flat) == ["last_hidden_state", "pooler_output"]
    assert json.loads(flat["graph_module"]["module_call_graph"][0]["signature"]["out_spec"]) == [
        1, {"type": "builtins.tuple", "context": "null", "children_spec": [leaf, leaf]}]
    _vet_program_json(flat)  # plain now

    for odd in ({**spec, "children_spec": [leaf]},  # keys and tensors do not pair up
                {**spec, "context": '["a b", "c"]'},  # keys that are not names
                {**spec, "children_spec": [leaf, {**spec, "children_spec": [leaf, leaf]}]}):  # nested
        nested = program(odd)
        assert _flatten_library_outputs(nested) is None
        with pytest.raises(LoadError, match=f"outputs use the Python type {kind}; export the model so that it "
                                            "takes and returns plain tensors .*return_dict=False"):
            _vet_program_json(nested)
    with pytest.raises(LoadError, match="refusing to load: outputs use an unnamed Python type"):
        _vet_treespec(json.dumps([1, {**spec, "type": "os.system('x')"}]), "outputs")
