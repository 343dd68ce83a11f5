"""The kernels' index math, compiled for the host from plugins_trt/kernels/index_math.h (the code the kernels run,
`__host__ __device__`), against the Python op references: DeBERTa's log-bucketed relative row (issue 14 item 3,
N past max_position) and the broadcast strides of an additive bias [B|1, H|1, Nq|1, Nk] (issue 14 item 4).
Needs a C++17 compiler; skipped without one."""
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from attn_export.ops.disentangled_attention import relative_index
from test_plugin_rules import cxx

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    compiler = cxx()
    if compiler is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH")
    binary = tmp_path_factory.mktemp("index_math") / "index_math_harness"
    source = ROOT / "plugins_trt" / "trt" / "tests" / "index_math_harness.cpp"
    result = subprocess.run([compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-I",
                             str(ROOT / "plugins_trt" / "kernels"), str(source), "-o", str(binary)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    def run(*args) -> list[int]:
        out = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return [int(x) for x in out.stdout.split()]

    return run


@pytest.mark.parametrize("span,max_position,n", [(8, 16, 40), (256, 512, 1500), (64, 34, 300), (512, 258, 900),
                                                 (6, 9, 50), (4, 0, 20), (16, 64, 10)])
def test_relative_row_is_the_reference_delta(harness, span, max_position, n):
    """delta[i - j + N - 1] as the kernel computes it equals the reference's delta(i, j) for every distance, also
    past max_position (no clamp first, as transformers) and for configurations where float32 and double differ."""
    delta = relative_index(n, n, span, max_position)
    expected = torch.cat([delta[0].flip(0), delta[1:, 0]]).tolist()  # rel = -(N-1) .. N-1
    assert harness("bucket", span, max_position, n) == expected


@pytest.mark.parametrize("bias_shape,full", [((2, 1, 1, 5), (2, 3, 4, 5)), ((1, 3, 4, 5), (2, 3, 4, 5)),
                                             ((2, 3, 1, 5), (2, 3, 4, 5)), ((1, 1, 4, 5), (2, 3, 4, 5)),
                                             ((2, 3, 4, 5), (2, 3, 4, 5)), ((1, 1, 1, 7), (1, 2, 3, 7))])
def test_bias_offsets_broadcast_like_numpy(harness, bias_shape, full):
    """Every (b, h, i, j) reads the element numpy broadcasting would give it, for every broadcast form."""
    expected = np.broadcast_to(np.arange(np.prod(bias_shape)).reshape(bias_shape), full).ravel().tolist()
    assert harness("bias", *bias_shape[:3], *full) == expected
