"""ONNX external data, read and written safely.

Reading: a tensor stored outside the .onnx file names its file by a relative `location`. onnx.load would follow
any location, `../../etc/passwd` or a symlink out of the folder included; we accept only regular files inside
the model's folder and read exactly the bytes each tensor needs.

Writing: protobuf cannot serialize more than 2 GiB, so larger graphs keep their big tensors in one data file
beside the .onnx. The data file's name carries a random token and is written (and renamed) before the .onnx
that names it, so a run killed between the two renames leaves the previous .onnx with its own data file.
"""
from __future__ import annotations

import math
import re
import secrets
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

import onnx
from onnx import numpy_helper

from .atomic import atomic_path
from .errors import UserError

PROTOBUF_LIMIT = 2**31 - 1  # the most bytes one serialized protobuf message may hold
EXTERNAL_THRESHOLD = 1024  # tensors of this many bytes or more go to the data file
ALIGNMENT = 4096  # offsets in the data file, so runtimes may memory-map tensors
_T = onnx.TensorProto
_ITEMSIZE = {_T.FLOAT: 4, _T.DOUBLE: 8, _T.FLOAT16: 2, _T.BFLOAT16: 2, _T.BOOL: 1, _T.INT8: 1, _T.UINT8: 1,
             _T.INT16: 2, _T.UINT16: 2, _T.INT32: 4, _T.UINT32: 4, _T.INT64: 8, _T.UINT64: 8}


def data_file_name(onnx_name: str, token: str) -> str:
    return f"{onnx_name}.{token}.data"


def _our_data_files(path: Path) -> Iterator[Path]:
    pattern = re.compile(re.escape(path.name) + r"\.[0-9a-f]{12}\.data")
    return (p for p in path.parent.glob(f"{path.name}.*.data") if pattern.fullmatch(p.name))


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: initializers and attribute tensors, in subgraphs and functions too."""
    def from_graph(graph) -> Iterator[onnx.TensorProto]:
        if isinstance(graph, onnx.GraphProto):
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield sparse.values
                yield sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from from_graph(attr.g)
                for sub in attr.graphs:
                    yield from from_graph(sub)

    yield from from_graph(model.graph)
    for function in model.functions:
        yield from from_graph(function)


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


# ----------------------------------------------------------------------------------------------------- reading

def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _data_file(source: Path, tensor: onnx.TensorProto, location: str) -> Path:
    """The file a tensor's location names, provided it is a regular file inside the model's folder."""
    name = tensor.name or "<unnamed>"
    if not location:
        raise UserError(f"{source}: external data of tensor '{name}' names no file")
    if "\0" in location:
        raise UserError(f"{source}: external data of tensor '{name}' has a malformed location")
    posix, windows = PurePosixPath(location.replace("\\", "/")), PureWindowsPath(location)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise UserError(f"{source}: refusing external data of tensor '{name}' at absolute path '{location}': it must "
                        "be a file in the model's folder")
    if ".." in posix.parts:
        raise UserError(f"{source}: refusing external data of tensor '{name}' at '{location}': it points outside "
                        "the model's folder")
    folder = source.parent.resolve()
    path = (folder / posix).resolve()  # follows symlinks: a link out of the folder ends outside it
    if not path.is_relative_to(folder):
        raise UserError(f"{source}: refusing external data of tensor '{name}' at '{location}': a symlink leads "
                        "outside the model's folder")
    if not path.exists():
        raise UserError(f"{source}: external data file '{location}' of tensor '{name}' is missing (it must sit "
                        "beside the model)")
    if not path.is_file():
        raise UserError(f"{source}: external data '{location}' of tensor '{name}' is not a regular file")
    return path


def _span(source: Path, tensor: onnx.TensorProto, path: Path) -> tuple[int, int]:
    """(offset, length) of a tensor's bytes, checked against the file and the tensor's shape."""
    name, entries, size = tensor.name or "<unnamed>", _entries(tensor), path.stat().st_size
    try:
        offset = int(entries.get("offset", 0))
        length = int(entries["length"]) if "length" in entries else size - offset
    except ValueError:
        raise UserError(f"{source}: external data of tensor '{name}' has a malformed offset or length") from None
    if offset < 0 or length < 0 or offset + length > size:
        raise UserError(f"{source}: external data of tensor '{name}' (offset {offset}, length {length}) runs past "
                        f"the end of '{entries['location']}' ({size} bytes): truncated data file?")
    itemsize = _ITEMSIZE.get(tensor.data_type)  # other types (packed 4-bit, strings): the runtime checks them
    if itemsize is not None:
        needed = math.prod(tensor.dims) * itemsize  # exact: no int64 wrap-around for absurd shapes
        if needed != length:
            raise UserError(f"{source}: external data of tensor '{name}' holds {length} bytes, its shape "
                            f"{list(tensor.dims)} needs {needed}")
    return offset, length


def load_external_data(model: onnx.ModelProto, source: Path, check_size: bool = True) -> None:
    """Read every external tensor of `model` (loaded from `source`) into memory, from files inside source's
    folder only. With check_size, graphs that would then exceed protobuf's limit are refused before anything
    is read."""
    tensors = [t for t in all_tensors(model) if is_external(t)]
    if not tensors:
        return
    spans = []
    for tensor in tensors:
        location = _entries(tensor).get("location", "")
        try:
            path = _data_file(source, tensor, location)
            spans.append((tensor, path, *_span(source, tensor, path)))
        except (OSError, RuntimeError) as e:  # unreadable, or a symlink loop
            why = getattr(e, "strerror", None) or e
            raise UserError(f"{source}: cannot read external data '{location}': {why}") from None
    total = model.ByteSize() + sum(length for *_, length in spans)
    if check_size and total >= PROTOBUF_LIMIT:
        raise UserError(f"{source}: the graph with its external data is {total / 2**30:.1f} GiB; attn-export holds "
                        "graphs in memory and cannot work on graphs over protobuf's 2 GiB limit yet")
    for tensor, path, offset, length in spans:
        try:
            with path.open("rb") as f:
                f.seek(offset)
                data = f.read(length)
        except OSError as e:
            raise UserError(f"{source}: cannot read external data '{path.name}': {e.strerror or e}") from None
        if len(data) != length:
            raise UserError(f"{source}: external data of tensor '{tensor.name}' is shorter than its length")
        tensor.raw_data = data
        del tensor.external_data[:]
        tensor.ClearField("data_location")  # DEFAULT: the bytes are in the file


# ----------------------------------------------------------------------------------------------------- writing

def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data  # typed fields -> little-endian bytes


def save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Write `path` with its large tensors in a data file beside it, both atomically; `model` is left as it was."""
    moved = [t for t in all_tensors(model) if not is_external(t) and t.data_type != onnx.TensorProto.STRING
             and t.ByteSize() >= EXTERNAL_THRESHOLD]
    data_name = data_file_name(path.name, secrets.token_hex(6))
    layout = []
    with atomic_path(path.parent / data_name) as tmp:
        with tmp.open("wb") as f:
            for tensor in moved:
                offset = -(-f.tell() // ALIGNMENT) * ALIGNMENT
                f.write(b"\0" * (offset - f.tell()))
                data = _raw_bytes(tensor)
                f.write(data)
                layout.append((tensor, offset, len(data)))
    try:
        for tensor, offset, length in layout:
            tensor.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(field)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
        with atomic_path(path) as tmp:
            tmp.write_bytes(model.SerializeToString())
    finally:
        load_external_data(model, path, check_size=False)  # back to in-memory tensors, read from the file just written
    remove_stale_data_files(path, keep=data_name)


def remove_stale_data_files(path: Path, keep: str | None = None) -> None:
    """Data files of earlier saves of `path` (only names this module writes) that the new file no longer uses."""
    for stale in _our_data_files(path):
        if stale.name != keep:
            stale.unlink(missing_ok=True)
