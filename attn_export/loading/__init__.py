"""Load a model safely from one of three sources, told apart by what the path is and holds:

- a folder holding config.json: a Hugging Face model folder (hf.py; needs the `hf` extra);
- a zip archive with a torch.export layout: a .pt2 program (pt2.py, vetted by pt2_vetting.py);
- anything else: an attn-export zoo checkpoint (zoo.py), read weights-only.

Nothing in any of them ever runs as code. Every failure is a UserError "<path>: <problem>" on one line.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

from attn_export.errors import UserError, one_line

from .common import LoadedModel, LoadError, user_error
from .pt2 import load_program
from .pt2_vetting import vet_program
from .zoo import REFUSED_PICKLE, ZOO_FORMAT, ZOO_FORMAT_VERSION, load_zoo_checkpoint, save_zoo_checkpoint

__all__ = ["LoadedModel", "load_model", "save_zoo_checkpoint", "source_kind", "REFUSED_PICKLE", "ZOO_FORMAT",
           "ZOO_FORMAT_VERSION", "LoadError", "vet_program"]


def load_model(path, task: str | None = None) -> LoadedModel:
    """Read a zoo checkpoint, a torch.export program or a Hugging Face folder; anything else is a one-line
    UserError. `task` picks a Hugging Face model's head (see hf.TASKS); other sources have none to pick."""
    path = Path(path)
    try:
        kind = source_kind(path)
        if task is not None and kind != "huggingface":
            raise LoadError(f"--task applies to Hugging Face model folders only, and this is a {kind}")
        if kind == "huggingface":
            from .hf import load_hf_folder  # imports transformers, which only this source needs

            return load_hf_folder(path, task)
        if kind == "torch.export program":
            return load_program(path)
        return load_zoo_checkpoint(path)
    except LoadError as e:
        raise user_error(path, e) from None
    except UserError as e:  # from the registry, a config check or a length rule: say which file
        raise user_error(path, e) from None
    except OSError as e:  # unreadable: permissions, I/O errors
        raise user_error(path, f"cannot read it: {e.strerror or e}") from None


def source_kind(path: Path) -> str:
    """'huggingface', 'torch.export program' or 'zoo checkpoint', from what the path is and holds (a LoadError
    when it is none of them)."""
    if not path.exists():
        raise LoadError("no such file or folder")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoadError("a folder, but not a Hugging Face model folder (no config.json in it)")
        return "huggingface"
    if not path.is_file():
        raise LoadError("not a file")
    if path.stat().st_size == 0:
        raise LoadError("empty file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK":
        return "zoo checkpoint"
    try:  # a zip: torch.save's format or a torch.export archive
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise LoadError(f"truncated or corrupt zip archive ({one_line(e)})") from None
    if any(n.split("/", 1)[-1] == "archive_format" for n in names):
        return "torch.export program"
    if any(n.endswith("serialized_exported_program.json") for n in names):
        raise LoadError("a torch.export program in the pre-2.7 format; re-save it with torch.export.save")
    return "zoo checkpoint"
