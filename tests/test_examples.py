"""The scripts in examples/ run as a user would run them (python examples/<script>.py OUT_DIR from the repository
root) and leave the files they promise."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXAMPLES = [
    ("build_your_own_model.py", ("model.onnx", "model.fused.onnx", "report.json")),
    ("export_fuse_check.py", ("model.onnx", "model.fused.onnx")),
]


@pytest.mark.parametrize("script, expected", EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_runs(script, expected, tmp_path):
    out_dir = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(Path("examples") / script), str(out_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for name in expected:
        assert (out_dir / name).is_file(), f"{script} did not write {name}\n{proc.stdout[-3000:]}"
    assert "ok:" in proc.stdout
    if "report.json" in expected:
        report = json.loads((out_dir / "report.json").read_text())
        assert set(report) >= {"fusion", "parity", "engine"}
        assert report["fusion"]["attention_layers"] == report["fusion"]["fused"] >= 1
        assert report["parity"] and all(row["passed"] for row in report["parity"])
