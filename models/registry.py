"""The zoo's registry: one entry per seed architecture, with what the toolchain needs to build and feed it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from attn_export.errors import UserError


def token_example_inputs(config, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    from .common import token_inputs

    return token_inputs(config.vocab_size, batch, seq_len)


def token_parity_lengths(config) -> list[int]:
    """100 and 256 tokens (neither a power of two nor a multiple of the other), or what the position table allows."""
    lengths = [n for n in (100, 256) if n <= config.max_seq_len]
    return lengths if len(lengths) > 1 else sorted({max(config.max_seq_len // 2, 1), config.max_seq_len})


@dataclass(frozen=True)
class ZooEntry:
    name: str
    paper: str
    complexity: str
    constraints: str  # which lengths, which axes are dynamic, and why
    config_cls: type
    build: Callable[[Any], torch.nn.Module]
    # seq_len_rule(config, seq_len) raises ValueError with the reason when a length is not allowed
    seq_len_rule: Callable[[Any, int], None]
    # example_inputs(config, batch, seq_len) -> {input name: tensor}; the order is forward()'s order
    example_inputs: Callable[[Any, int, int], dict[str, torch.Tensor]] = token_example_inputs
    # {input name: {axis: symbol}}
    dynamic_axes: dict[str, dict[int, str]] = dataclasses.field(
        default_factory=lambda: {"input_ids": {0: "batch", 1: "seq"}})
    # two or more lengths at which parity is checked (one when the sequence axis is fixed)
    parity_seq_lens: Callable[[Any], list[int]] = token_parity_lengths
    # config overrides small enough for quick CPU checks (tests, examples); more than one layer and head
    small: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the example length `zoo create` stores when none is given
    default_seq_len: Callable[[Any], int] = lambda config: min(1024, config.max_seq_len)

    def check_seq_len(self, config, seq_len: int) -> None:
        try:
            self.seq_len_rule(config, seq_len)
        except ValueError as e:
            raise UserError(str(e)) from None

    def make_config(self, overrides: dict[str, Any] | None = None):
        return config_from_dict(self.config_cls, overrides or {}, self.name)


ZOO: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    ZOO[entry.name] = entry
    return entry


def get(name: str) -> ZooEntry:
    import models  # noqa: F401  (importing the package registers every architecture)

    if name not in ZOO:
        raise UserError(f"unknown architecture '{name}' (known: {', '.join(sorted(ZOO))})")
    return ZOO[name]


def config_from_dict(config_cls: type, values: dict[str, Any], arch: str):
    """Build a config dataclass from plain values, converting strings (from --set) to the field's type."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"{arch} has no config field '{key}' (fields: {', '.join(fields)})")
        kwargs[key] = _coerce(value, fields[key].type, key, arch)
    try:
        return config_cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"invalid {arch} config: {e}") from None


def _coerce(value: Any, type_name: Any, key: str, arch: str):
    type_name = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    if not isinstance(value, str):
        expected = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(type_name)
        bool_for_int = type_name == "int" and isinstance(value, bool)
        if expected is not None and (not isinstance(value, expected) or bool_for_int):
            raise UserError(f"{arch} config field '{key}' must be {type_name}, got {value!r}")
        return float(value) if type_name == "float" else value
    try:
        if type_name == "int":
            return int(value)
        if type_name == "float":
            return float(value)
        if type_name == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
    except ValueError:
        raise UserError(f"{arch} config field '{key}' must be {type_name}, got '{value}'") from None
    return value
