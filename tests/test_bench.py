"""attn-export bench on CPU: records with the promised fields, ordered percentiles, JSON and PNG written, and bad
requests refused in one line."""
import json
import os

import pytest

from attn_export.backends.tensorrt_runner import tensorrt_status
from attn_export.bench import latency_stats
from test_cli import run, small_args


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from attn_export.cli import main

    path = tmp_path_factory.mktemp("bench") / "model.pt"
    with pytest.raises(SystemExit) as exit_info:
        main(["zoo", "create", "performer", "-o", str(path), *small_args("performer")])
    assert exit_info.value.code == 0
    return path


def test_latency_stats_are_ordered_percentiles():
    import numpy as np

    stats = latency_stats(np.arange(1, 101, dtype=float))
    assert stats["min"] == 1 and stats["median"] == 50.5 and stats["mean"] == 50.5
    assert stats["min"] <= stats["median"] <= stats["p90"] <= stats["p95"] <= stats["p99"] <= 100
    assert stats["p99"] == pytest.approx(99.01)


def test_bench_writes_records_json_and_plot(capsys, tmp_path, checkpoint):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    code, out, err = run(capsys, "bench", checkpoint, "--seq-lens", "64,128", "--warmup", "1", "--iters", "3",
                         "--json", out_json, "--plot", out_png)
    assert code == 0, out + err
    records = json.loads(out_json.read_text())["records"]
    assert {(r["backend"], r["graph"], r["seq_len"]) for r in records} == {
        (backend, graph, n) for backend, graph in
        (("torch", "eager"), ("onnxruntime", "model.onnx"), ("onnxruntime", "model.fused.onnx")) for n in (64, 128)}
    for r in records:
        assert {"backend", "graph", "seq_len", "batch", "dtype", "device", "latency_ms"} <= set(r)
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["p95"] <= lat["p99"]
        assert r["device"] == "cpu" and r["dtype"] == "fp32" and r["iters"] == 3 and r["cuda_graphs"] is False
        assert r["throughput_per_s"] == pytest.approx(1e3 / lat["mean"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "model.fused.onnx" in out and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("args,message", [
    (["--backends", "torch,tvm"], "unknown backend"),
    (["--dtype", "fp16", "--device", "cpu"], "needs a GPU"),
    (["--seq-lens", "64,abc"], "comma-separated integers"),
    (["--seq-lens", "100000"], "sequence length"),
    (["--backends", "tensorrt"], "tensorrt backend"),
])
def test_bad_requests_exit_2_with_one_line(capsys, tmp_path, checkpoint, args, message):
    if "tensorrt" in args and tensorrt_status()[0]:
        pytest.skip("TensorRT is usable here")
    code, out, err = run(capsys, "bench", checkpoint, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_tensorrt_profile_spans_each_dimension_not_the_tuples():
    """min/max over shape tuples compare lexicographically: (2, 64) < (1, 128) would pick a batch 1..2 range with
    64..64 tokens. Each dimension takes its own min and max."""
    from attn_export.bench import span_profile

    shapes = [{"ids": (2, 64), "mask": (2, 64)}, {"ids": (1, 128), "mask": (1, 128)}]
    profile = span_profile(shapes)
    assert profile["ids"] == ((1, 64), (1, 128), (2, 128))
    assert profile["mask"] == ((1, 64), (1, 128), (2, 128))


def _record(backend, graph, name, median, peak=None):
    from attn_export.bench import BenchRecord

    lat = {"min": median / 2, "mean": median, "median": median, "p90": median * 1.5, "p95": median * 2,
           "p99": median * 3}
    return BenchRecord(backend, graph, 16384, 1, "fp16", "cuda", lat, 1e3 / median, 1.6e7 / median, peak, name)


def test_latency_table_fits_80_columns_with_whole_figures():
    from rich.console import Console

    from attn_export.report import bench_table

    records = [_record("tensorrt", "model.plan", "GPU Compute Time", 12345.678, 81234.0),
               _record("tensorrt", "model.plan (end to end)", "Latency", 0.000123),
               _record("onnxruntime", "model.fused.onnx", "Latency", 3.21, None),
               _record("torch", "eager", "GPU Compute Time", 1.5e6, 512.0)]
    console = Console(width=80, record=True, color_system=None, file=open(os.devnull, "w"))
    console.print(bench_table(records))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text and "..." not in text
    assert "12346" in text and "1e-04" in text and "1500000" in text and "81234" in text and "3.21" in text
    rows = [line for line in text.splitlines() if "16384" in line]
    assert len(rows) == 4 and sum(" GPU " in row for row in rows) == 2 and sum(" e2e " in row for row in rows) == 2
