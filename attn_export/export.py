"""torch -> ONNX: the reference graph, standard ops only, with dynamic axes and probe shapes recorded."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from pathlib import Path

import onnx
import torch

from . import external_data
from .atomic import atomic_path
from .errors import UserError

DEFAULT_OPSET = 20  # the highest opset both exporters (dynamo and TorchScript) emit
EXPORTERS = ("dynamo", "torchscript")
PROBE_SHAPES_KEY = "attn_export.probe_shapes"


def export_onnx(module: torch.nn.Module, example_inputs: dict[str, torch.Tensor], *,
                dynamic_axes: dict[str, dict[int, str]] | None = None, exporter: str = "dynamo",
                opset: int = DEFAULT_OPSET, probe_shapes: list[dict[str, list[int]]] | None = None,
                output_names: list[str] | None = None) -> onnx.ModelProto:
    """Export `module(**example_inputs)`. `probe_shapes` (two or more input shape sets the graph accepts) are stored
    in the model's metadata so that passes can run the graph at valid shapes."""
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter '{exporter}' (choose from {', '.join(EXPORTERS)})")
    if module.training:  # a torch.export program's module refuses eval(); the loaders hand over eval modules
        module.eval()
    names = list(example_inputs)
    args = tuple(example_inputs.values())
    with torch.no_grad(), _quiet():
        try:
            if exporter == "dynamo":
                program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                            input_names=names, output_names=output_names,
                                            dynamic_shapes=_dynamic_shapes(names, dynamic_axes), optimize=True)
                model = program.model_proto
            else:
                buffer = io.BytesIO()
                torch.onnx.export(module, args, buffer, dynamo=False, opset_version=opset, input_names=names,
                                  output_names=output_names, dynamic_axes=dynamic_axes or None)
                model = onnx.load_from_string(buffer.getvalue())
        except Exception as e:  # the exporters raise many types; the message is what the user needs
            raise UserError(f"export with the {exporter} exporter failed: {_first_line(e)}") from None
    if probe_shapes:
        set_metadata(model, PROBE_SHAPES_KEY, json.dumps(probe_shapes))
    set_metadata(model, "attn_export.exporter", exporter)
    return model


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write atomically: one file, or, for graphs over protobuf's 2 GiB limit, the file plus one data file
    beside it (see external_data). `model` is not changed."""
    path = Path(path)
    if model.ByteSize() >= external_data.PROTOBUF_LIMIT:
        external_data.save_with_external_data(model, path)
        return path
    with atomic_path(path) as tmp:
        tmp.write_bytes(model.SerializeToString())
    external_data.remove_stale_data_files(path)  # a data file an earlier, larger graph of this name used
    return path


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX model and its external data (from files inside its folder only) and check it; every
    problem is a one-line UserError naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"{path}: not a readable ONNX model ({_first_line(e)})") from None
    if not model.graph.node and not model.graph.output:
        raise UserError(f"{path}: not an ONNX model (empty graph)")
    external_data.load_external_data(model, path)
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # ValidationError, or a checker failure on nonsense fields
        raise UserError(f"{path}: not a valid ONNX model ({_first_line(e)[:300]})") from None
    return model


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def get_metadata(model: onnx.ModelProto, key: str) -> str | None:
    return next((p.value for p in model.metadata_props if p.key == key), None)


def _dynamic_shapes(names, dynamic_axes):
    if not dynamic_axes:
        return None
    return {name: dict(dynamic_axes.get(name, {})) for name in names}


def _first_line(e: Exception) -> str:
    """The first line of the innermost cause: torch.onnx wraps the real reason in "Failed to export ... step 1/3"."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings meant for their developers; keep the user's terminal clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
