"""plugins_trt/kernels/launch_plan.h on the host: the launch geometry, shared-memory plans and workspace sizes the
kernels launch with (issue 14: projection rows past 64 features, grids past 65535, the CUDA-core kernel's shared
memory past the opt-in limit), checked against numbers worked out here. Needs a C++17 compiler."""
import math
import subprocess

import pytest

from test_plugin_rules import KERNELS_DIR, cuda_include_dirs, cxx

H200_SMEM, A100_SMEM = 232448, 166912  # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90 and sm_80


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    compiler = cxx()
    if compiler is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH")
    tmp = tmp_path_factory.mktemp("plan")
    binary = tmp / "launch_plan_probe"
    command = [compiler, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", *cuda_include_dirs(tmp),
               str(KERNELS_DIR / "tests" / "launch_plan_probe.cpp"), "-o", str(binary)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    def run(*args) -> str:
        out = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr
        return out.stdout

    return run


def kernelized(probe, b, h, n, d, dv, m, fmap=0, causal=0, limit=H200_SMEM) -> dict:
    text = probe("kernelized", b, h, n, d, dv, m, fmap, causal, limit)
    values = {}
    for item in text.replace("\n", " ").split():
        key, _, value = item.partition("=")
        values[key] = value
    for line in text.splitlines():
        if line.startswith("limit="):
            values["limit"] = line[len("limit="):]
    return values


@pytest.mark.parametrize("m", [64, 65, 266, 512])
def test_key_state_blocks_read_their_own_projection_rows(probe, m):
    """Every feature a key-state block projects is a row of its 64-row tile (the bug read row f of the tile)."""
    mp = (m + 31) // 32 * 32
    rows = [tuple(map(int, line.split())) for line in probe("wrows", m).splitlines()]
    assert [f for f, _, _ in rows] == list(range(mp))  # every feature of every block, once
    for f, f_base, row in rows:
        assert f_base == f // 64 * 64 and row == f - f_base and 0 <= row < 64
    assert int(kernelized(probe, 1, 2, 200, 64, 64, m)["nfb"]) == math.ceil(mp / 64)


@pytest.mark.parametrize("total", [1, 65535, 65536, 70000, 3 * 65535 + 7])
def test_z_slices_cover_every_entry_once_within_the_limit(probe, total):
    rows = [tuple(map(int, line.split())) for line in probe("zslices", total).splitlines()]
    assert len(rows) == math.ceil(total / 65535)
    covered = []
    for first, count in rows:
        assert 0 < count <= 65535
        covered.extend(range(first, first + count))
    assert covered == list(range(total))


def test_unflatten_is_the_inverse_of_the_flat_block_index(probe):
    nx, ny = 5, 7
    for index in (0, 4, 5, 34, 35, 36, 5 * 7 * 70000 - 1):
        x, y, z = map(int, probe("unflatten", index, nx, ny).split())
        assert 0 <= x < nx and 0 <= y < ny and x + nx * (y + ny * z) == index


def test_batch_times_heads_past_65535_launches_in_grid_x(probe):
    """B*H = 70000 (and E*B for the GEMMs) no longer lands in grid.y/z: the flat grids hold it."""
    v = kernelized(probe, 7000, 10, 128, 64, 64, 266, causal=1)
    nfb, tiles = int(v["nfb"]), int(v["tiles"])
    assert int(v["key_state_blocks"]) == nfb * tiles * 70000
    assert int(v["query_blocks"]) == tiles * 70000
    assert v["limit"] == "none"
    assert kernelized(probe, 1 << 20, 64, 1 << 16, 64, 64, 64, causal=1)["limit"].startswith("batch * heads")
    assert probe("gemm", 65535 * 64, 64).strip() == "limit=none"
    assert "row count" in probe("gemm", 65535 * 64 + 1, 64)


def test_simt_shared_memory_is_the_issue_formula_and_moves_to_the_workspace(probe):
    d = 64
    for m in (266, 800, 1024, 4096):
        v = kernelized(probe, 2, 3, 100, d, 48, m, limit=A100_SMEM)  # dv 48: never the tensor-core path
        assert int(v["simt_smem_all"]) == 4 * (16 * d + 65 * m + 848)
        assert int(v["simt_smem_fixed"]) == 4 * (16 * d + 848)
        over = int(v["simt_smem_all"]) > A100_SMEM
        assert v["state_in_workspace"] == ("1" if over else "0")
        blocks = math.ceil(48 / 32) * 3 * 2
        assert int(v["simt_blocks"]) == blocks
        reserved = int(v["simt_workspace"])
        if int(v["simt_smem_all"]) > 48 * 1024:  # the size is asked before the device is known
            assert reserved >= 4 * 65 * m * blocks and reserved % 256 == 0
        assert int(v["workspace"]) >= reserved
    # M = 800 at d = 64 passes the sm_80 opt-in limit: before the fix the launch failed there
    assert kernelized(probe, 1, 1, 64, 64, 48, 800, limit=A100_SMEM)["state_in_workspace"] == "1"


def test_tensor_core_workspace_is_kept(probe):
    v = kernelized(probe, 2, 4, 1000, 64, 64, 266)
    assert int(v["workspace"]) >= int(v["tc_workspace"]) > 0
