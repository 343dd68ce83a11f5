"""What a build folder holds: the file names, what each is for, and the parity data (.npz) beside report.json.

Nothing here imports torch: an edge device without PyTorch reads the folder (attn_export.edge).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import UserError, one_line

# The files a build folder holds, and what each is for (report.json repeats this under "files").
REFERENCE_GRAPH = "model.onnx"
FUSED_GRAPH = "model.fused.onnx"
PORTABLE_GRAPH = "model.fused.portable.onnx"
PARITY_DATA = "parity.npz"
FILE_ROLES = {
    REFERENCE_GRAPH: "reference graph: standard ONNX ops only, runs anywhere",
    FUSED_GRAPH: "for TensorRT: custom nodes only, no function bodies (build the engine from this one)",
    PORTABLE_GRAPH: "portable fused graph: custom nodes with their decompositions as model-local functions; "
                    "plain onnxruntime, Triton's onnxruntime backend and other ONNX tools run it",
    PARITY_DATA: "the parity inputs and torch's outputs (edge devices check an engine against them)",
    "model.plan": "TensorRT engine (where TensorRT and a GPU exist), model.json its manifest",
}


def save_parity_data(path: str | Path, labels: list[str], records: list[tuple[dict, dict]]) -> None:
    """One .npz (no pickles: strings are stored as unicode arrays): labels, inputs/<i>/<name>, outputs/<i>/<name>."""
    arrays = {"labels": np.array(labels, dtype=np.str_)}
    for i, (inputs, outputs) in enumerate(records):
        arrays.update({f"inputs/{i}/{name}": np.asarray(value) for name, value in inputs.items()})
        arrays.update({f"outputs/{i}/{name}": np.asarray(value) for name, value in outputs.items()})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a bare path
            np.savez(f, **arrays)


def load_parity_data(path: str | Path) -> list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """[(label, inputs, outputs)] in the order they were saved; outputs keep their order (output_0, ...)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            labels = [str(label) for label in data["labels"]]
            sets = [(label, {}, {}) for label in labels]
            for key in data.files:
                kind, _, rest = key.partition("/")
                index, _, name = rest.partition("/")
                if kind in ("inputs", "outputs") and index.isdigit() and int(index) < len(sets):
                    sets[int(index)][1 if kind == "inputs" else 2][name] = data[key]
    except FileNotFoundError:
        raise UserError(f"{path}: no parity data (an older build? run `attn-export build` again)") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(one_line(f"{path}: not a parity data file ({e})")) from None
    return sets  # a zip keeps its members in the order they were written: outputs stay in order
