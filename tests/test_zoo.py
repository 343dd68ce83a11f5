"""Every zoo architecture, through the CLI as a user runs it: create, then build --strict (export with the dynamo
exporter, fuse every attention layer, onnxruntime parity against torch at every parity length)."""
import json

import onnx
import pytest

import models
from conftest import small_config
from test_cli import run, small_args

from attn_export.plugin_check import check_model_at, find_compiler

SEED_MECHANISMS = ["bigbird", "deberta", "evolving", "flash", "hypercube", "mgk", "performer", "spade", "switch",
                   "transformer-ls", "treeformer", "vit"]
REGISTERED = sorted(models.ZOO)


def test_zoo_list_shows_the_twelve_with_paper_complexity_and_constraints(capsys):
    code, out, _ = run(capsys, "zoo", "list")
    assert code == 0
    assert REGISTERED == SEED_MECHANISMS
    for name in SEED_MECHANISMS:
        entry = models.ZOO[name]
        assert name in out and entry.paper and entry.complexity and entry.constraints


@pytest.mark.parametrize("name", REGISTERED)
def test_small_config_is_small_and_valid(name):
    entry, config = small_config(name)
    assert config.num_layers >= 2 and getattr(config, "num_heads", 2) >= 1
    lengths = entry.parity_seq_lens(config)
    for n in lengths:
        entry.check_seq_len(config, n)
    dynamic = any(1 in axes for axes in entry.dynamic_axes.values())
    assert len(lengths) >= (2 if dynamic else 1), "a dynamic sequence axis is checked at two or more lengths"


@pytest.mark.parametrize("name", REGISTERED)
def test_create_and_strict_build_fuse_everything_and_pass_parity(capsys, tmp_path, name):
    ckpt = tmp_path / "model.pt"
    assert run(capsys, "zoo", "create", name, "-o", ckpt, *small_args(name))[0] == 0
    code, out, err = run(capsys, "build", ckpt, "-o", tmp_path / "out", "--no-engine", "--strict")
    assert code == 0, out + err  # --strict: every attention layer fused and every parity row passed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["fusion"]["layers"] and all(row["status"] == "fused" for row in report["fusion"]["layers"])
    rows = report["parity"]
    entry, config = small_config(name)
    # every parity length (a fixed-length graph is checked at two batch sizes of its one length instead)
    assert {r["inputs"].split()[0] for r in rows} == {f"seq_len={n}" for n in entry.parity_seq_lens(config)}
    assert {r["graph"] for r in rows} == {"model.onnx", "model.fused.onnx"}
    assert all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
    # the plugin library's own rules accept every fused node at fp32 and fp16 (attn-export plugins check)
    if find_compiler():
        fused = onnx.load(tmp_path / "out" / "model.fused.onnx")
        for precision, results in check_model_at(fused, ("fp32", "fp16")).items():
            assert results and all(r.accepted for r in results), (precision, [r for r in results if not r.accepted])
