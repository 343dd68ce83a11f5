import math

import ml_dtypes
import numpy as np
import pytest
import torch

from attn_export.check import compare_outputs, default_tolerances


@pytest.mark.parametrize("dtype, expected", [
    (np.float32, (1e-4, 1e-3)),
    (np.float16, (1e-2, 1e-2)),
    (ml_dtypes.bfloat16, (5e-2, 5e-2)),
    (torch.bfloat16, (5e-2, 5e-2)),
    (torch.float32, (1e-4, 1e-3)),
    (np.float64, (1e-7, 1e-6)),
    (np.int64, (0.0, 0.0)),
    (np.uint8, (0.0, 0.0)),
    (np.bool_, (0.0, 0.0)),
    ("float16", (1e-2, 1e-2)),
])
def test_default_tolerances(dtype, expected):
    assert default_tolerances(dtype) == expected


def test_default_tolerances_unknown_dtype():
    with pytest.raises(ValueError):
        default_tolerances(np.complex64)


def one(reference, actual, **kw):
    results = compare_outputs({"y": np.asarray(reference)}, {"y": np.asarray(actual)}, **kw)
    assert len(results) == 1
    return results[0]


def test_identical_passes_with_zero_errors():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    c = one(x, x.copy())
    assert c.passed and c.reason == ""
    assert (c.max_abs_err, c.mean_abs_err, c.max_rel_err, c.mean_rel_err) == (0.0, 0.0, 0.0, 0.0)
    assert c.shape == (2, 3) and c.dtype == "float32"
    assert (c.atol, c.rtol) == (1e-4, 1e-3)


def test_statistics_are_exact():
    ref = np.array([1.0, 2.0, 4.0, 10.0])
    act = np.array([1.5, 2.0, 3.0, 10.0])
    c = one(ref, act, atol=1.0, rtol=0.0)
    assert c.max_abs_err == 1.0
    assert c.mean_abs_err == pytest.approx(0.375)
    assert c.max_rel_err == pytest.approx(0.5)
    assert c.mean_rel_err == pytest.approx((0.5 + 0 + 0.25 + 0) / 4)
    assert c.passed  # every element is within atol


def test_element_fails_only_if_both_tolerances_exceeded():
    ref = np.array([100.0, 0.001], dtype=np.float64)
    # element 0: abs 0.5 > atol 0.1 but rel 0.005 <= rtol 0.01 -> passes on rtol
    # element 1: abs 0.05 <= atol 0.1 (rel 50) -> passes on atol
    act = np.array([100.5, 0.051])
    assert one(ref, act, atol=0.1, rtol=0.01).passed
    # now element 0 exceeds both: abs 2 > 0.1 and rel 0.02 > 0.01
    act = np.array([102.0, 0.051])
    c = one(ref, act, atol=0.1, rtol=0.01)
    assert not c.passed
    assert c.reason == "1 of 2 elements outside tolerance"


def test_counts_elements_outside_tolerance():
    ref = np.zeros(4096, dtype=np.float32)
    act = ref.copy()
    act[:312] = 1.0
    c = one(ref, act)
    assert not c.passed
    assert c.reason == "312 of 4096 elements outside tolerance"
    assert c.max_abs_err == 1.0


def test_zero_reference_uses_eps():
    c = one(np.array([0.0]), np.array([1e-10]), atol=0.0, rtol=1e-3)
    assert c.max_rel_err == pytest.approx(1e-10 / 2.22e-16)
    assert not c.passed
    # within atol, the huge relative error does not matter
    assert one(np.array([0.0]), np.array([1e-10]), atol=1e-9, rtol=0.0).passed


def test_float32_defaults_accept_reordered_sums_and_reject_real_errors():
    ref = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    assert one(ref, ref + np.float32(5e-5)).passed  # within atol 1e-4
    assert one(ref * 1000, ref * 1000 * (1 + 5e-4)).passed  # within rtol 1e-3
    assert not one(ref, ref + np.float32(2e-3)).passed  # 2e-3 abs and >= 6.6e-4 rel


def test_float16_defaults_are_looser():
    ref = np.array([1.0, 2.0], dtype=np.float16)
    assert one(ref, ref + np.float16(0.005)).passed
    assert not one(ref, ref + np.float16(0.05)).passed


def test_integers_must_match_exactly():
    ref = np.array([1, 2, 3], dtype=np.int64)
    assert one(ref, ref.copy()).passed
    c = one(ref, np.array([1, 2, 4], dtype=np.int64))
    assert not c.passed and c.reason == "1 of 3 elements outside tolerance"
    assert (c.atol, c.rtol) == (0.0, 0.0)


def test_booleans_must_match_exactly():
    c = one(np.array([True, False]), np.array([True, True]))
    assert not c.passed and c.reason == "1 of 2 elements outside tolerance"


def test_shape_mismatch():
    c = one(np.zeros((1, 2), np.float32), np.zeros((1, 3), np.float32))
    assert not c.passed
    assert c.reason == "shape (1,2) vs (1,3)"
    assert math.isnan(c.max_abs_err)


def test_nan_vs_nan_is_equal():
    ref = np.array([np.nan, 1.0], dtype=np.float32)
    c = one(ref, ref.copy())
    assert c.passed
    assert c.max_abs_err == 0.0


def test_nan_in_actual_where_reference_finite_fails():
    c = one(np.array([1.0, 2.0, 3.0]), np.array([np.nan, 2.0, np.nan]), atol=1e9, rtol=1e9)
    assert not c.passed
    assert c.reason == "NaN in actual where reference is finite (2 elements)"


def test_inf_where_reference_finite_fails():
    c = one(np.array([1.0, 2.0]), np.array([1.0, np.inf]), atol=1e9, rtol=1e9)
    assert not c.passed
    assert c.reason == "inf in actual where reference is finite (1 element)"


def test_same_infinity_is_equal_opposite_is_not():
    ref = np.array([np.inf, -np.inf, 1.0])
    assert one(ref, ref.copy()).passed
    c = one(ref, np.array([np.inf, np.inf, 1.0]))
    assert not c.passed
    assert c.reason == "actual differs where reference is NaN or inf (1 element)"


def test_finite_actual_where_reference_nan_fails():
    c = one(np.array([np.nan]), np.array([0.0]), atol=1e9, rtol=1e9)
    assert not c.passed
    assert "where reference is NaN or inf" in c.reason


def test_nonfinite_and_tolerance_reasons_combine():
    c = one(np.array([1.0, 2.0]), np.array([np.nan, 5.0]), atol=0.1, rtol=0.1)
    assert c.reason == "NaN in actual where reference is finite (1 element); 1 of 2 elements outside tolerance"


def test_explicit_tolerance_overrides_dtype_default():
    ref = np.array([1.0], dtype=np.float32)
    act = np.array([1.5], dtype=np.float32)
    assert not one(ref, act).passed
    c = one(ref, act, atol=0.6)
    assert c.passed and c.atol == 0.6 and c.rtol == 1e-3


def test_missing_output_by_name():
    results = compare_outputs({"logits": np.zeros(2), "aux": np.zeros(1)}, {"logits": np.zeros(2)})
    assert [r.name for r in results] == ["logits", "aux"]
    assert results[0].passed
    assert not results[1].passed
    assert results[1].reason.startswith("missing output")


def test_pair_by_position_when_names_differ():
    ref = {"logits": np.array([1.0, 2.0], np.float32), "probs": np.array([0.5], np.float32)}
    act = {"output_0": np.array([1.0, 2.0], np.float32), "output_1": np.array([0.7], np.float32)}
    by_name = compare_outputs(ref, act)
    assert all(not r.passed and r.reason.startswith("missing output") for r in by_name)
    by_position = compare_outputs(ref, act, pair_by_position=True)
    assert [(r.name, r.actual_name, r.passed) for r in by_position] == [
        ("logits", "output_0", True), ("probs", "output_1", False)]
    assert by_position[1].max_abs_err == pytest.approx(0.2)


def test_pair_by_position_with_fewer_actual_outputs():
    results = compare_outputs({"a": np.zeros(1), "b": np.zeros(1)}, {"x": np.zeros(1)}, pair_by_position=True)
    assert results[0].passed
    assert not results[1].passed and results[1].reason.startswith("missing output")


def test_extra_actual_outputs_are_ignored():
    results = compare_outputs({"a": np.ones(2)}, {"a": np.ones(2), "debug": np.zeros(3)})
    assert len(results) == 1 and results[0].passed


def test_dtype_mismatch_is_reported_and_values_compared():
    c = one(np.array([1.0, 2.0], np.float32), np.array([1.0, 2.0], np.float16))
    assert c.passed
    assert c.dtype == "float32 vs float16"


def test_bfloat16_reference():
    ref = np.array([1.0, 2.0], dtype=ml_dtypes.bfloat16)
    act = np.array([1.03, 2.0], dtype=np.float32)
    c = one(ref, act)
    assert c.passed and (c.atol, c.rtol) == (5e-2, 5e-2)


def test_empty_outputs_pass():
    c = one(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32))
    assert c.passed and c.max_abs_err == 0.0
