"""The command line end to end, as a user runs it: zoo, export, fuse, check, build; bad input exits 2."""
import json

import pytest

from conftest import small_config, run_cli as run


def small_args(name):
    """`zoo create` options for the entry's small config, at its first parity length."""
    entry, config = small_config(name)
    sets = [arg for key, value in entry.small.items() for arg in ("--set", f"{key}={value}")]
    return sets + ["--seq-len", str(entry.parity_seq_lens(config)[0])]


def test_zoo_list_shows_both_models(capsys):
    code, out, _ = run(capsys, "zoo", "list")
    assert code == 0 and "bigbird" in out and "performer" in out


@pytest.mark.parametrize("name", ["bigbird", "performer"])
def test_create_then_build_fuses_everything_and_passes_parity(capsys, tmp_path, name):
    ckpt = tmp_path / "model.pt"
    assert run(capsys, "zoo", "create", name, "-o", ckpt, *small_args(name))[0] == 0
    code, out, _ = run(capsys, "build", ckpt, "-o", tmp_path / "out", "--strict")
    assert code == 0, out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["fusion"]["attention_layers"] == 2 and report["fusion"]["fused"] == 2
    assert {layer["status"] for layer in report["fusion"]["layers"]} == {"fused"}
    assert all({"name", "op", "status", "reason"} <= set(layer) for layer in report["fusion"]["layers"])
    rows = report["parity"]
    assert {r["graph"] for r in rows} == {"model.onnx", "model.fused.onnx"} and len({r["inputs"] for r in rows}) >= 2
    assert all(r["passed"] and r["max_abs_err"] <= r["atol"] + r["rtol"] for r in rows)
    assert report["engine"]["path"] is None and "TensorRT" in report["engine"]["reason"]
    assert "engine: not built" in out
    assert (tmp_path / "out" / "model.onnx").exists() and (tmp_path / "out" / "model.fused.onnx").exists()
    assert not list((tmp_path / "out").glob("*.tmp")), "no temporary file may remain"


def test_step_by_step_export_fuse_check(capsys, tmp_path):
    ckpt, ref, fused = tmp_path / "m.pt", tmp_path / "m.onnx", tmp_path / "m.fused.onnx"
    assert run(capsys, "zoo", "create", "performer", "-o", ckpt, *small_args("performer"))[0] == 0
    assert run(capsys, "export", ckpt, "-o", ref)[0] == 0
    code, out, _ = run(capsys, "fuse", ref, "-o", fused, "--report", tmp_path / "fusion.json", "--strict")
    assert code == 0 and "2 of 2" in out
    assert json.loads((tmp_path / "fusion.json").read_text())["fused"] == 2
    assert run(capsys, "check", ckpt, "--onnx", ref, "--onnx", fused)[0] == 0
    assert run(capsys, "check", ref, fused)[0] == 0
    # zero tolerance: onnxruntime does not reproduce torch bit for bit, so the comparison must fail with exit 1
    code, out, _ = run(capsys, "check", ckpt, "--onnx", fused, "--atol", "0", "--rtol", "0")
    assert code == 1 and "FAIL" in out


def test_strict_fuse_exits_1_when_attention_is_not_fused(capsys, tmp_path):
    import torch

    from attn_export.export import export_onnx, save_onnx

    class Dense(torch.nn.Module):  # softmax over the query axis: attention no pass may fuse
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2), -2) @ v

    q = torch.randn(1, 2, 16, 8)
    save_onnx(export_onnx(Dense(), {"q": q, "k": q, "v": q}), tmp_path / "dense.onnx")
    code, out, _ = run(capsys, "fuse", tmp_path / "dense.onnx", "-o", tmp_path / "f.onnx", "--strict")
    assert code == 1 and "not fused" in out


@pytest.mark.parametrize("args,message", [
    (["build", "missing.pt"], "missing.pt"),
    (["zoo", "create", "nosuchmodel", "-o", "x.pt"], "unknown architecture"),
    (["zoo", "create", "bigbird", "-o", "x.pt", "--set", "num_heads=-1"], "num_heads"),
    (["zoo", "create", "bigbird", "-o", "x.pt", "--seq-len", "100"], "multiple of block_size"),
    (["zoo", "create", "bigbird", "-o", "x.pt", "--set", "heads"], "KEY=VALUE"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *args)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err + out
    assert not (tmp_path / "x.pt").exists()


def test_malformed_onnx_is_refused_with_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    code, _, err = run(capsys, "fuse", bad, "-o", tmp_path / "out.onnx")
    assert code == 2 and "bad.onnx" in err and err.count("\n") == 1
    assert not (tmp_path / "out.onnx").exists()
