"""benchmarks/gpu_check.py without a GPU: the dry run completes and says what it would run within its budget,
and the pieces that shape the results file (junit counts, kernel rows, file name) give the issue's schema."""
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402


def test_dry_run_completes_and_lists_every_step_within_six_minutes(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    for step in ("build", "tests", "kernels", "zoo"):
        assert f"  {step} " in out
    assert sum(gpu_check.BUDGET.values()) < 6 * 60
    assert "TORCH_CUDA_ARCH_LIST=9.0" in out and "1024 4096 16384" in out and "bfloat16" in out
    assert sum(line.startswith("  zoo ") for line in out.splitlines()) == 1 + 12  # the step and its models
    assert "nothing was run" in out


def test_dry_run_writes_nothing(tmp_path, capsys):
    target = tmp_path / "out.json"
    assert gpu_check.main(["--dry-run", "-o", str(target)]) == 0
    assert f"would write {target}\n" in capsys.readouterr().out and not target.exists()


def test_results_file_name_and_junit_counts():
    assert gpu_check.result_path("NVIDIA H200", datetime.date(2026, 12, 2)).name == "gpu-nvidia-h200-2026-12-02.json"
    xml = ('<testsuites><testsuite tests="10" failures="2" errors="1" skipped="3"></testsuite></testsuites>')
    assert gpu_check.junit_counts(xml) == {"passed": 4, "failed": 3, "skipped": 3}


def test_kernel_rows_carry_the_issue_schema():
    report = {"results": [{"op": "DenseAttention", "case": "softmax", "seq_len": 4096, "ms": 2.0, "tflops": 100.0,
                           "gbps": 50.0, "reference_ms": 10.0, "sdpa_ms": 1.0, "sdpa_tflops": 200.0},
                          {"op": "KernelizedAttention", "case": "favor", "seq_len": 16384, "ms": 1.0, "tflops": 5.0,
                           "gbps": 900.0, "reference_ms": None, "sdpa_ms": 3.0, "sdpa_tflops": 250.0}]}
    rows = gpu_check.kernel_rows(report, "float16")
    assert set(rows[0]) == {"op", "case", "seq_len", "dtype", "ms", "tflops", "gbps", "vs_reference", "vs_sdpa"}
    assert rows[0]["vs_reference"] == 5.0 and rows[0]["vs_sdpa"] == 0.5 and rows[0]["dtype"] == "float16"
    assert rows[1]["vs_reference"] is None and rows[1]["vs_sdpa"] == 0.02
