"""Optimization profiles for a TensorRT engine, decided without TensorRT.

A profile maps each dynamic input to its (min, opt, max) shape. They come from
  - trtexec-style shape lists: `--min-shapes input_ids:1x128 --opt-shapes input_ids:1x512 --max-shapes ...`
    (one profile; give only --opt-shapes for a fixed shape);
  - sequence-length buckets: `--seq-lens 128,512,2048` gives one profile per bucket, each covering the lengths
    above the previous bucket up to its own (the first from 1), optimized for its own length;
  - the shapes the parity check runs at (one profile covering all of them).
The input shapes are read from the ONNX graph: an int is a fixed dimension, a string a dynamic one.
`select_profile` picks the profile for the shapes of a run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import onnx

from ..errors import UserError

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # min, opt, max
Profile = dict[str, ShapeRange]
InputDims = dict[str, tuple]  # {input: (int or symbol str, ...)}

_DIMS = re.compile(r"^\d+(x\d+)*$")


def model_inputs(model: onnx.ModelProto) -> InputDims:
    """Graph inputs that are not initializers: {name: dims}, a dim an int when fixed, else its symbol ("?" if
    unnamed)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs: InputDims = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = []
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or "?")
        inputs[value.name] = tuple(dims)
    return inputs


def dynamic_inputs(inputs: InputDims) -> list[str]:
    return [name for name, dims in inputs.items() if any(not isinstance(d, int) for d in dims)]


# ------------------------------------------------------------------------------------- trtexec-style lists
def parse_shapes(values: str | Iterable[str] | None, option: str) -> dict[str, Shape]:
    """'input_ids:1x128,mask:1x128' (the option may repeat) -> {"input_ids": (1, 128), "mask": (1, 128)}.

    As in trtexec, the name ends at the last ':'; a name that holds commas or colons may be quoted ('a:b':1x2)."""
    if values is None:
        return {}
    if isinstance(values, str):
        values = [values]
    shapes: dict[str, Shape] = {}
    for text in values:
        for item in _split_items(text):
            name, sep, dims = item.rpartition(":")
            name = name.strip().strip("'\"")
            dims = dims.strip()
            if not sep or not name:
                raise UserError(f"{option} expects NAME:DIMS such as input_ids:1x128, got '{item}'")
            if not _DIMS.match(dims):
                raise UserError(f"{option} {name}: dimensions must be positive integers joined by 'x' (e.g. 1x128), "
                                f"got '{dims}'")
            if name in shapes:
                raise UserError(f"{option} gives '{name}' twice")
            shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes


def _split_items(text: str) -> list[str]:
    """Split on commas outside quotes."""
    items, current, quote = [], [], None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == ",":
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    items.append("".join(current))
    return [item for item in (i.strip() for i in items) if item]


def profile_from_shapes(inputs: InputDims, min_shapes: Mapping[str, Shape], opt_shapes: Mapping[str, Shape],
                        max_shapes: Mapping[str, Shape]) -> Profile:
    """One profile from trtexec-style lists. --opt-shapes is required; a name without --min-shapes or
    --max-shapes takes its opt shape there (so --opt-shapes alone fixes the shape)."""
    if not opt_shapes:
        raise UserError("--min-shapes/--max-shapes need --opt-shapes too (the shape TensorRT optimizes for)")
    for option, shapes in (("--min-shapes", min_shapes), ("--max-shapes", max_shapes)):
        extra = sorted(set(shapes) - set(opt_shapes))
        if extra:
            raise UserError(f"{option} names {', '.join(extra)} without an --opt-shapes entry")
    profile: Profile = {}
    for name, opt in opt_shapes.items():
        profile[name] = (tuple(min_shapes.get(name, opt)), tuple(opt), tuple(max_shapes.get(name, opt)))
    check_profile(inputs, profile, 0)
    return profile


# ------------------------------------------------------------------------------------- sequence buckets
def parse_seq_lens(text: str | None) -> list[int] | None:
    """'128,512,2048' -> [128, 512, 2048] (sorted, distinct, positive)."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seq-lens takes comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise UserError(f"--seq-lens takes positive integers, got '{text}'")
    if len(set(values)) != len(values):
        raise UserError(f"--seq-lens lists a length twice: '{text}'")
    return sorted(values)


def axis_roles(inputs: InputDims, dynamic_axes: Mapping[str, Mapping[int, str]] | None = None) -> dict[str, dict]:
    """{input: {axis: "batch" | "seq"}} for the dynamic axes. With the model's dynamic axes, an axis whose symbol
    is "batch" is the batch axis and every other one a sequence axis; without them, a dynamic axis 0 is the batch
    and the other dynamic axes are sequence axes."""
    roles: dict[str, dict] = {}
    for name, dims in inputs.items():
        named = dict((dynamic_axes or {}).get(name, {}))
        for axis, dim in enumerate(dims):
            if isinstance(dim, int):
                continue
            symbol = named.get(axis)
            if symbol is not None:
                role = "batch" if "batch" in str(symbol).lower() else "seq"
            else:
                role = "batch" if axis == 0 else "seq"
            roles.setdefault(name, {})[axis] = role
    return roles


def seq_len_profiles(inputs: InputDims, seq_lens: list[int], *, batch: int = 1,
                     dynamic_axes: Mapping[str, Mapping[int, str]] | None = None) -> list[Profile]:
    """One profile per bucket: sequence axes from (previous bucket + 1) to the bucket, optimized for the bucket;
    batch axes from 1 to `batch`, optimized for `batch`."""
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    roles = axis_roles(inputs, dynamic_axes)
    if not any("seq" in r.values() for r in roles.values()):
        raise UserError("--seq-lens needs a dynamic sequence axis, and this model has none "
                        f"(dynamic inputs: {', '.join(dynamic_inputs(inputs)) or 'none'}); "
                        "give --opt-shapes (and --min-shapes/--max-shapes) instead")
    lengths = sorted(seq_lens)
    profiles = []
    for i, length in enumerate(lengths):
        low = lengths[i - 1] + 1 if i else 1
        profile: Profile = {}
        for name, axes in roles.items():
            ranges = []
            for axis, dim in enumerate(inputs[name]):
                role = axes.get(axis)
                ranges.append((dim, dim, dim) if role is None else (1, batch, batch) if role == "batch"
                              else (low, length, length))
            profile[name] = tuple(tuple(r[k] for r in ranges) for k in range(3))
        profiles.append(profile)
    return profiles


def covering_profile(shape_sets: list[Mapping[str, Shape]]) -> Profile:
    """One profile spanning every given set of input shapes (elementwise min and max; opt is the first set)."""
    if not shape_sets:
        raise ValueError("no input shapes")
    profile: Profile = {}
    for name, first in shape_sets[0].items():
        shapes = [tuple(s[name]) for s in shape_sets]
        if len({len(s) for s in shapes}) != 1:
            raise UserError(f"input '{name}' changes rank between the given shapes: {shapes}")
        profile[name] = (tuple(min(d) for d in zip(*shapes)), tuple(first), tuple(max(d) for d in zip(*shapes)))
    return profile


# ------------------------------------------------------------------------------------- a user's request
@dataclass
class ProfileRequest:
    """What a user asked for on the command line, resolved once the graph's inputs are known: trtexec-style
    shapes, or sequence-length buckets, or nothing (then the caller picks a default)."""

    min_shapes: dict[str, Shape] = field(default_factory=dict)
    opt_shapes: dict[str, Shape] = field(default_factory=dict)
    max_shapes: dict[str, Shape] = field(default_factory=dict)
    seq_lens: list[int] | None = None
    batch: int = 1

    @classmethod
    def from_options(cls, min_shapes=None, opt_shapes=None, max_shapes=None, seq_lens: str | None = None,
                     batch: int = 1) -> ProfileRequest:
        """Parse the option strings now (so a typo fails before any export); shapes and buckets exclude each
        other."""
        request = cls(parse_shapes(min_shapes, "--min-shapes"), parse_shapes(opt_shapes, "--opt-shapes"),
                      parse_shapes(max_shapes, "--max-shapes"), parse_seq_lens(seq_lens), batch)
        if request.seq_lens and (request.min_shapes or request.opt_shapes or request.max_shapes):
            raise UserError("give either --seq-lens buckets or --min/--opt/--max-shapes, not both")
        if (request.min_shapes or request.max_shapes) and not request.opt_shapes:
            raise UserError("--min-shapes/--max-shapes need --opt-shapes too (the shape TensorRT optimizes for)")
        return request

    @property
    def empty(self) -> bool:
        return not (self.opt_shapes or self.seq_lens)

    def resolve(self, inputs: InputDims, dynamic_axes: Mapping[str, Mapping[int, str]] | None = None
                ) -> list[Profile] | None:
        """The profiles for a graph with these inputs (None when nothing was asked), checked against it."""
        if self.seq_lens:
            result = seq_len_profiles(inputs, self.seq_lens, batch=self.batch, dynamic_axes=dynamic_axes)
        elif self.opt_shapes:
            result = [profile_from_shapes(inputs, self.min_shapes, self.opt_shapes, self.max_shapes)]
        else:
            return None
        check_profiles(inputs, result)
        return result


# ------------------------------------------------------------------------------------- checks and selection
def check_profile(inputs: InputDims, profile: Profile, index: int) -> None:
    """Every dynamic input has a range; every range names an input, has its rank, keeps its fixed dimensions and
    satisfies min <= opt <= max."""
    where = f"optimization profile {index}"
    for name in dynamic_inputs(inputs):
        if name not in profile:
            raise UserError(f"{where} has no shape for dynamic input '{name}' "
                            f"(dims {_dims_text(inputs[name])})")
    for name, (lo, opt, hi) in profile.items():
        if name not in inputs:
            raise UserError(f"{where} names '{name}', which is not a model input (inputs: {', '.join(inputs)})")
        dims = inputs[name]
        if not len(lo) == len(opt) == len(hi) == len(dims):
            raise UserError(f"{where}: '{name}' has rank {len(dims)} ({_dims_text(dims)}), got shapes "
                            f"{_shape_text(lo)}, {_shape_text(opt)}, {_shape_text(hi)}")
        for axis, dim in enumerate(dims):
            if isinstance(dim, int) and not lo[axis] == opt[axis] == hi[axis] == dim:
                raise UserError(f"{where}: '{name}' axis {axis} is fixed at {dim} in the model")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise UserError(f"{where}: '{name}' needs min <= opt <= max on every axis, got "
                            f"{_shape_text(lo)}, {_shape_text(opt)}, {_shape_text(hi)}")


def check_profiles(inputs: InputDims, profiles: list[Profile]) -> None:
    if dynamic_inputs(inputs) and not profiles:
        raise UserError(f"the model has dynamic inputs ({', '.join(dynamic_inputs(inputs))}) but no optimization "
                        "profile was given")
    for index, profile in enumerate(profiles):
        check_profile(inputs, profile, index)


def select_profile(profiles: list[Profile], shapes: Mapping[str, Shape]) -> int | None:
    """The profile whose ranges hold every given shape (the narrowest when several do), or None."""
    best, best_volume = None, None
    for index, profile in enumerate(profiles):
        fits = True
        for name, (lo, _, hi) in profile.items():
            shape = shapes.get(name)
            if shape is None or len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                fits = False
                break
        if not fits:
            continue
        volume = sum(_volume(hi) for _, _, hi in profile.values())
        if best_volume is None or volume < best_volume:
            best, best_volume = index, volume
    return best


def describe_profiles(profiles: list[Profile]) -> str:
    """'input_ids 1x1..1x128 (opt 1x128) | input_ids 1x129..1x512 (opt 1x512)' for messages."""
    parts = []
    for profile in profiles:
        parts.append(", ".join(f"{name} {_shape_text(lo)}..{_shape_text(hi)} (opt {_shape_text(opt)})"
                               for name, (lo, opt, hi) in profile.items()))
    return " | ".join(parts)


def profiles_to_json(profiles: list[Profile]) -> list[dict]:
    return [{name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in p.items()}
            for p in profiles]


def profiles_from_json(data) -> list[Profile]:
    try:
        return [{name: (tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])) for name, r in p.items()} for p in data]
    except (TypeError, KeyError, AttributeError):
        raise UserError("malformed optimization profiles in the engine manifest") from None


def _volume(shape: Shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def _dims_text(dims) -> str:
    return "x".join(str(d) for d in dims) or "scalar"
