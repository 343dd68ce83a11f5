"""attn-export zoo checkpoints: a plain dict (format tag, architecture name, config values, example sizes, state
dict) read with torch.load(weights_only=True), which refuses any pickled object other than tensors and plain data.
The module is rebuilt from the zoo's own code, first on the meta device under a memory budget so that a config the
weights do not fit (hidden=10**9 in a 1 MB file) is refused before any memory is spent on it."""
from __future__ import annotations

import dataclasses
import io
import pickle
import pickletools
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attn_export.atomic import atomic_path
from attn_export.errors import UserError, one_line
from models import registry

from .common import BUILD_SLACK_BYTES, AllocationBudget, LoadedModel, LoadError, OverBudget, few, seeded

ZOO_FORMAT = "attn-export/zoo-checkpoint"
ZOO_FORMAT_VERSION = 1
MAX_EXAMPLE_BATCH = 1024  # a checkpoint's example batch; larger ones are more likely damage than intent
REFUSED_PICKLE = ("refusing to load: it contains Python objects other than tensors and plain data (pickled code?); "
                  "attn-export reads only zoo checkpoints, torch.export programs and Hugging Face folders")


def load_zoo_checkpoint(path: Path) -> LoadedModel:
    """A file that is not a zip archive of another kind: it must parse as a pickle and load weights-only."""
    if not zipfile.is_zipfile(path) and not _parses_as_pickle(path):
        raise LoadError("not a model file: neither a zip archive nor a pickle")
    return _load_zoo(path, _torch_load_weights_only(path))


def _parses_as_pickle(path: Path) -> bool:
    """Whether the file (or, in a torch.save zip, its data.pkl) starts with a well-formed pickle.
    pickletools only reads opcodes; it runs nothing."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
                stream = io.BytesIO(archive.read(name))
            for _ in pickletools.genops(stream):
                pass
        else:
            with path.open("rb") as stream:
                for _ in pickletools.genops(stream):  # stops at the first pickle's STOP
                    pass
        return True
    except Exception:
        return False


def _torch_load_weights_only(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the pickle-protocol notice for plain pickles
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only reports every refusal this way, damage included: a well-formed pickle means refusal
        raise LoadError(REFUSED_PICKLE if _parses_as_pickle(path) else "truncated or corrupt checkpoint") from None
    except Exception as e:  # torch reports damage as RuntimeError, EOFError, KeyError, ValueError, ...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"truncated or corrupt checkpoint ({first_line[:160]})") from None


# --------------------------------------------------------------------------------------------------------------
# Zoo checkpoints
# --------------------------------------------------------------------------------------------------------------

def _plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def save_zoo_checkpoint(path, arch: str, config, state_dict, batch: int, seq_len: int) -> Path:
    """Write a zoo checkpoint (written under a temporary name, then renamed)."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    if not _plain(values):
        raise ValueError(f"{arch} config holds values that are not plain data: {values!r}")
    if not 1 <= batch <= MAX_EXAMPLE_BATCH:
        raise UserError(f"the example batch must be in [1, {MAX_EXAMPLE_BATCH}], got {batch}")
    payload = {
        "format": ZOO_FORMAT,
        "format_version": ZOO_FORMAT_VERSION,
        "arch": arch,
        "config": values,
        "example": {"batch": int(batch), "seq_len": int(seq_len)},
        "state_dict": {name: tensor.detach().cpu() for name, tensor in state_dict.items()},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _load_zoo(path: Path, obj) -> LoadedModel:
    if not isinstance(obj, dict) or obj.get("format") != ZOO_FORMAT:
        raise LoadError(f"not an attn-export checkpoint (no '{ZOO_FORMAT}' format tag; "
                         "make one with `attn-export zoo create`)")
    if obj.get("format_version") != ZOO_FORMAT_VERSION:
        raise LoadError(f"unsupported checkpoint format_version {obj.get('format_version')!r} "
                         f"(this attn-export reads {ZOO_FORMAT_VERSION})")
    arch, values, example, state_dict = obj.get("arch"), obj.get("config"), obj.get("example"), obj.get("state_dict")
    if not isinstance(arch, str) or not isinstance(values, dict):
        raise LoadError("malformed checkpoint: 'arch' must be a string and 'config' a dict")
    if not (isinstance(example, dict) and all(_positive_int(example.get(k)) for k in ("batch", "seq_len"))):
        raise LoadError("malformed checkpoint: 'example' must hold positive integers 'batch' and 'seq_len'")
    if example["batch"] > MAX_EXAMPLE_BATCH:
        raise LoadError(f"malformed checkpoint: example batch {example['batch']} is over {MAX_EXAMPLE_BATCH}")
    if not (isinstance(state_dict, dict) and all(isinstance(v, torch.Tensor) for v in state_dict.values())):
        raise LoadError("malformed checkpoint: 'state_dict' must map names to tensors")

    entry = registry.get(arch)
    config = registry.config_from_dict(entry.config_cls, values, arch)
    planned = _planned_shapes(entry, config, arch, state_dict)
    if planned is not None:  # the weights must fit the config before any real memory is spent on it
        _check_state_dict(planned, state_dict, arch)
    try:
        module = entry.build(config)
    except ValueError as e:
        raise LoadError(f"invalid {arch} config: {e}") from None
    except (RuntimeError, MemoryError) as e:  # e.g. an allocation the machine cannot make
        raise LoadError(f"cannot build {arch} with this config: {one_line(e)[:200]}") from None
    _load_state_dict(module, state_dict, arch)
    module.eval()
    batch, seq_len = example["batch"], example["seq_len"]
    entry.check_seq_len(config, seq_len)
    with seeded():
        input_names = list(entry.example_inputs(config, 1, seq_len))  # names only: batch 1 is enough
    return LoadedModel(module=module, arch=arch, config=config, entry=entry, source=path,
                       input_names=input_names, dynamic_axes={k: dict(v) for k, v in entry.dynamic_axes.items()},
                       example_batch=batch, example_seq_len=seq_len, spec=_ZooInputs(entry, config))


def _planned_shapes(entry, config, arch: str, state_dict: dict) -> dict[str, tuple] | None:
    """The state dict shapes this config builds, found on the meta device (no memory, no random numbers), with
    a budget: a config that asks for far more memory than the checkpoint holds (a damaged or hostile value such
    as hidden=10**9) is refused before it is built. None when the model code cannot build on the meta device."""
    held = sum(t.numel() * t.element_size() for t in state_dict.values())
    budget = AllocationBudget(2 * held + BUILD_SLACK_BYTES)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"), budget:  # leaves the caller's RNG alone
            module = entry.build(config)
    except ValueError as e:
        raise LoadError(f"invalid {arch} config: {e}") from None
    except OverBudget:
        raise LoadError(f"the {arch} config asks for more than {budget.limit / 2**20:,.0f} MiB of weights and "
                         f"buffers, while the checkpoint holds {held / 2**20:,.1f} MiB: config and weights do not "
                         "match") from None
    except Exception:
        return None  # model code that needs real tensors to build: the real build and its checks decide
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def _check_state_dict(expected: dict[str, tuple], state_dict: dict, arch: str) -> None:
    """Names and shapes of the checkpoint's tensors against those the config builds."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    reshaped = [f"{k} {tuple(state_dict[k].shape)} vs {expected[k]}"
                for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {few(missing)}")
    if unexpected:
        problems.append(f"unexpected {few(unexpected)}")
    if reshaped:
        problems.append(f"shape {few(reshaped)}")
    if problems:
        raise LoadError(f"state dict does not match {arch} with this config: {'; '.join(problems)}")


def _load_state_dict(module: torch.nn.Module, state_dict: dict, arch: str) -> None:
    _check_state_dict({k: tuple(v.shape) for k, v in module.state_dict().items()}, state_dict, arch)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise LoadError(f"state dict does not match {arch}: {e}") from None


@dataclass
class _ZooInputs:
    """Inputs from the zoo entry's own example_inputs and length rules."""
    entry: Any
    config: Any

    def check_seq_len(self, seq_len: int) -> None:
        self.entry.check_seq_len(self.config, seq_len)

    def make(self, seq_len: int | None, batch: int) -> dict[str, torch.Tensor]:
        self.check_seq_len(seq_len)
        with seeded():
            return dict(self.entry.example_inputs(self.config, batch, seq_len))

    def parity_seq_lens(self) -> list[int]:
        return list(self.entry.parity_seq_lens(self.config))
