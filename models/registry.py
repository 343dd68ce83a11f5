"""The zoo's registry: one entry per seed architecture, with what the toolchain needs to build and feed it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from attn_export.errors import UserError


@dataclass(frozen=True)
class ZooEntry:
    name: str
    paper: str
    complexity: str
    constraints: str  # which lengths, which axes are dynamic, and why
    config_cls: type
    build: Callable[[Any], torch.nn.Module]
    # example_inputs(config, batch, seq_len) -> {input name: tensor}; the order is forward()'s order
    example_inputs: Callable[[Any, int, int], dict[str, torch.Tensor]]
    # {input name: {axis: symbol}}
    dynamic_axes: dict[str, dict[int, str]]
    # seq_len_rule(config, seq_len) raises ValueError with the reason when a length is not allowed
    seq_len_rule: Callable[[Any, int], None]
    # two or more lengths at which parity is checked (one when the sequence axis is fixed)
    parity_seq_lens: Callable[[Any], list[int]]
    # config overrides small enough for quick CPU checks (tests, examples); more than one layer and head
    small: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the example length `zoo create` stores when none is given
    default_seq_len: Callable[[Any], int] = lambda config: 1024

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
        if expected is not None and (not isinstance(value, expected) or (type_name == "int" and isinstance(value, bool))):
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
