"""Parity: compare a backend's outputs with a reference's, output by output, in the manner of polygraphy.

Tolerances depend on the reference dtype. Even in float32 a backend never matches torch eager bit for bit:
ONNX Runtime and TensorRT reorder reductions (softmax sums, matmul accumulation, layer-norm means), fuse
element-wise chains, and our custom ops' decompositions compute the same math through different but equivalent
formulas (a block-sparse gather instead of a masked dense softmax, a reassociated kernelized product). So
float32 gets atol 1e-4 / rtol 1e-3, float16 and bfloat16 (10 and 7 mantissa bits) much looser, float64 tight,
and integers and booleans must match exactly.

The element-wise rule is polygraphy's "elemwise" check: an element fails only when its absolute error exceeds
atol AND its relative error exceeds rtol, so each element may pass on either tolerance. The relative error
divides by the reference (a zero reference counts as 2.22e-16). Non-finite values: NaN against NaN, and an
infinity against the same infinity, are equal; anything else non-finite against the reference fails.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# numpy's float64 machine epsilon, as polygraphy uses, so a zero reference gives a huge (not infinite) rel error
ZERO_REFERENCE_EPS = 2.22e-16

_FLOAT_TOLERANCES = {
    "float64": (1e-7, 1e-6),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}


def _dtype_name(dtype) -> str:
    """'float32' for numpy dtypes, torch dtypes ('torch.float32') and strings alike."""
    text = str(dtype)
    if text.startswith("torch."):
        return text[len("torch."):]
    try:
        return np.dtype(dtype).name
    except TypeError:
        return text


def default_tolerances(dtype) -> tuple[float, float]:
    """(atol, rtol) for outputs of this dtype (numpy, torch or a name); exact for integers and booleans."""
    name = _dtype_name(dtype)
    if name in _FLOAT_TOLERANCES:
        return _FLOAT_TOLERANCES[name]
    if name == "bool" or name.startswith(("int", "uint")):
        return 0.0, 0.0
    raise ValueError(f"no default tolerance for dtype {name}")


@dataclass
class OutputComparison:
    name: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_err: float
    mean_abs_err: float
    max_rel_err: float
    mean_rel_err: float
    atol: float
    rtol: float
    passed: bool
    reason: str = ""  # "" when passed, otherwise one line saying why not
    actual_name: str = ""  # the actual output's name (differs from `name` when paired by position)


def _shape_text(shape) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def compare_outputs(
    reference: dict[str, np.ndarray],
    actual: dict[str, np.ndarray],
    atol: float | None = None,
    rtol: float | None = None,
    *,
    pair_by_position: bool = False,
) -> list[OutputComparison]:
    """One OutputComparison per reference output, in the reference's order.

    Outputs are paired by name; with pair_by_position they are paired in order instead (graphs from different
    exporters name their outputs differently). Outputs of `actual` that the reference lacks are not compared.
    atol/rtol None means the default for the reference output's dtype.
    """
    if pair_by_position:
        actual_items = list(actual.items())
        pairs = [(ref_name, actual_items[i] if i < len(actual_items) else None)
                 for i, ref_name in enumerate(reference)]
    else:
        pairs = [(ref_name, (ref_name, actual[ref_name]) if ref_name in actual else None) for ref_name in reference]

    results = []
    for ref_name, matched in pairs:
        ref = np.asarray(reference[ref_name])
        tol = default_tolerances(ref.dtype)
        out_atol = tol[0] if atol is None else float(atol)
        out_rtol = tol[1] if rtol is None else float(rtol)
        if matched is None:
            results.append(_failed(ref_name, ref, out_atol, out_rtol, _missing_reason(actual, pair_by_position)))
            continue
        act_name, act = matched[0], np.asarray(matched[1])
        results.append(_compare_one(ref_name, act_name, ref, act, out_atol, out_rtol))
    return results


def _missing_reason(actual: dict, pair_by_position: bool) -> str:
    if pair_by_position:
        return f"missing output (actual has only {len(actual)} outputs)"
    names = ", ".join(actual) or "none"
    return f"missing output (actual has: {names}; pair_by_position pairs outputs in order)"


def _failed(name, ref, atol, rtol, reason, actual_name="") -> OutputComparison:
    nan = float("nan")
    return OutputComparison(name, tuple(ref.shape), ref.dtype.name, nan, nan, nan, nan, atol, rtol,
                            False, reason, actual_name)


def _compare_one(name, act_name, ref, act, atol, rtol) -> OutputComparison:
    dtype = ref.dtype.name if ref.dtype == act.dtype else f"{ref.dtype.name} vs {act.dtype.name}"
    if ref.shape != act.shape:
        return _failed(name, ref, atol, rtol, f"shape {_shape_text(ref.shape)} vs {_shape_text(act.shape)}", act_name)

    r = ref.astype(np.float64)
    a = act.astype(np.float64)
    finite = np.isfinite(r) & np.isfinite(a)

    # Non-finite positions: equal only when both are NaN or both the same infinity.
    nonfinite = ~finite
    same_special = (np.isnan(r) & np.isnan(a)) | (np.isinf(r) & (r == a))
    special_bad = nonfinite & ~same_special
    ref_finite = np.isfinite(r)
    nan_where_finite = int(np.count_nonzero(special_bad & ref_finite & np.isnan(a)))
    inf_where_finite = int(np.count_nonzero(special_bad & ref_finite & np.isinf(a)))
    other_special = int(np.count_nonzero(special_bad & ~ref_finite))

    abs_err = np.abs(a[finite] - r[finite])
    denom = np.abs(r[finite])
    rel_err = abs_err / np.where(denom == 0, ZERO_REFERENCE_EPS, denom)
    outside = int(np.count_nonzero((abs_err > atol) & (rel_err > rtol)))

    reasons = []
    if nan_where_finite:
        reasons.append(f"NaN in actual where reference is finite ({_plural(nan_where_finite, 'element')})")
    if inf_where_finite:
        reasons.append(f"inf in actual where reference is finite ({_plural(inf_where_finite, 'element')})")
    if other_special:
        reasons.append(f"actual differs where reference is NaN or inf ({_plural(other_special, 'element')})")
    if outside:
        reasons.append(f"{outside} of {ref.size} elements outside tolerance")

    def stat(values, fn) -> float:
        return float(fn(values)) if values.size else 0.0

    return OutputComparison(
        name=name,
        shape=tuple(ref.shape),
        dtype=dtype,
        max_abs_err=stat(abs_err, np.max),
        mean_abs_err=stat(abs_err, np.mean),
        max_rel_err=stat(rel_err, np.max),
        mean_rel_err=stat(rel_err, np.mean),
        atol=atol,
        rtol=rtol,
        passed=not reasons,
        reason="; ".join(reasons),
        actual_name=act_name,
    )
