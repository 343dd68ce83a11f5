"""Users' own models end to end: Hugging Face folders (save_pretrained) and a torch.export program of a transformers
BERT, each through `attn-export build PATH -o out`; and the bad inputs a user meets, one line and exit 2."""
import json
import shutil

import pytest
import torch

from pt2_programs import WritesMarker
from conftest import run_cli as run

transformers = pytest.importorskip("transformers")

# tiny and random-initialised: hidden 32, 2 layers, 2 heads (seconds per build)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
            max_position_embeddings=128)


def save(model, folder):
    model.save_pretrained(folder)
    return folder


def bert(folder):
    torch.manual_seed(0)
    return save(transformers.BertModel(transformers.BertConfig(**TINY)).eval(), folder)


def deberta(folder):
    torch.manual_seed(0)
    config = transformers.DebertaV2Config(**TINY, num_labels=3, relative_attention=True, pos_att_type=["c2p", "p2c"],
                                          position_buckets=16)
    return save(transformers.DebertaV2ForSequenceClassification(config).eval(), folder)


def bigbird(folder):
    torch.manual_seed(0)
    # block 8 with one random block: the block-sparse path needs over (5 + 2*1)*8 = 56 tokens
    config = transformers.BigBirdConfig(**TINY, attention_type="block_sparse", block_size=8, num_random_blocks=1)
    return save(transformers.BigBirdModel(config).eval(), folder)


def vit(folder):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=4)
    return save(transformers.ViTForImageClassification(config).eval(), folder)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return bert(tmp_path_factory.mktemp("hf") / "bert")


def built_report(capsys, model, out):
    code, stdout, stderr = run(capsys, "build", model, "-o", out)
    assert code == 0, stdout + stderr
    for name in ("model.onnx", "model.fused.onnx", "report.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))
    report = json.loads((out / "report.json").read_text())
    rows = report["parity"]
    assert rows and all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
    assert {r["graph"] for r in rows} == {"model.onnx", "model.fused.onnx"}
    # every attention layer is in the report, fused or with its reason
    layers = report["fusion"]["layers"]
    assert report["fusion"]["attention_layers"] >= 2 and len(layers) == report["fusion"]["attention_layers"]
    assert all(layer["status"] == "fused" or layer["reason"] for layer in layers)
    return report, stdout


def graph_io(path):
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers], [o.name for o in graph.output]


def test_bert_folder_builds_with_named_outputs_and_dynamic_axes(capsys, tmp_path, bert_folder):
    report, _ = built_report(capsys, bert_folder, tmp_path / "out")
    inputs, outputs = graph_io(tmp_path / "out" / "model.onnx")
    assert inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert outputs == ["last_hidden_state", "pooler_output"]
    assert {r["output"] for r in report["parity"]} == {"last_hidden_state", "pooler_output"}
    assert {r["inputs"] for r in report["parity"]} == {"seq_len=8", "seq_len=16"}
    # check at a length the model takes, then at one over its position embeddings: one line, exit 2
    graph = tmp_path / "out" / "model.fused.onnx"
    assert run(capsys, "check", bert_folder, "--onnx", graph, "--seq-len", "24")[0] == 0
    code, _, err = run(capsys, "check", bert_folder, "--onnx", graph, "--seq-len", "129")
    assert code == 2 and err.count("\n") == 1 and "over the model's max_position_embeddings 128" in err


def test_deberta_sequence_classification_builds(capsys, tmp_path):
    folder = deberta(tmp_path / "deberta")
    report, _ = built_report(capsys, folder, tmp_path / "out")
    inputs, outputs = graph_io(tmp_path / "out" / "model.onnx")
    assert inputs == ["input_ids", "attention_mask"]  # type_vocab_size 0: the model ignores token types
    assert outputs == ["logits"] and len({r["inputs"] for r in report["parity"]}) >= 2


def test_bigbird_block_sparse_builds_at_a_block_sparse_length(capsys, tmp_path):
    folder = bigbird(tmp_path / "bigbird")
    report, stdout = built_report(capsys, folder, tmp_path / "out")
    # HF BigBird's graph holds one length (its block tables come from numpy); 64 = 8 blocks, over 56: still sparse
    assert {r["inputs"] for r in report["parity"]} == {"seq_len=64 batch=1", "seq_len=64 batch=2"}
    # dynamo cannot export it on torch 2.13: the exporter used instead is said, not silent
    assert report["notes"] and "export: used the TorchScript exporter" in stdout
    # each layer's five softmax pieces are one block-sparse node, not dense fragments
    layers = report["fusion"]["layers"]
    assert [(layer["status"], layer["op"]) for layer in layers] == [("fused", "BlockSparseAttention")] * 2, layers
    assert all(layer["attributes"]["count_repeats"] == 1 for layer in layers)


def test_bigbird_stays_block_sparse_and_refuses_full_attention_lengths(bert_folder, tmp_path):
    from attn_export.errors import UserError
    from attn_export.loading import load_model

    loaded = load_model(bigbird(tmp_path / "bigbird"))
    assert loaded.parity_seq_lens() == [64] and loaded.dynamic_axes["input_ids"] == {0: "batch"}
    for n in (56, 60, 200):  # not over 56, not a multiple of 8, over max_position_embeddings
        with pytest.raises(UserError, match="sequence length"):
            loaded.example_inputs(seq_len=n)
    loaded.module(*loaded.example_inputs().values())
    assert loaded.module.model.attention_type == "block_sparse"
    mask = loaded.example_inputs()["attention_mask"]
    assert mask[0].all() and not mask[-1].all(), "one row padded, one not"


def test_vit_image_classification_builds(capsys, tmp_path):
    report, _ = built_report(capsys, vit(tmp_path / "vit"), tmp_path / "out")
    inputs, outputs = graph_io(tmp_path / "out" / "model.onnx")
    assert inputs == ["pixel_values"] and outputs == ["logits"]
    assert {r["inputs"] for r in report["parity"]} == {"batch=1", "batch=2"}
    # bench: no sequence axis, so one record per backend at the given batch (tokens per second undefined)
    code, out, err = run(capsys, "bench", tmp_path / "vit", "--iters", "1", "--warmup", "0", "--backends", "torch",
                         "--batch", "3", "--json", tmp_path / "bench.json")
    assert code == 0, out + err
    records = json.loads((tmp_path / "bench.json").read_text())["records"]
    assert [(r["seq_len"], r["batch"], r["tokens_per_s"]) for r in records] == [(None, 3, None)]


def test_bert_torch_export_programs_build_check_and_bench(capsys, tmp_path, bert_folder):
    model = transformers.BertModel.from_pretrained(bert_folder, attn_implementation="eager").eval()

    class Tensors(torch.nn.Module):  # what the refusal below tells users to do
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)

    ids, mask = torch.randint(0, 100, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", min=2, max=128)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    path = tmp_path / "bert.pt2"
    torch.export.save(torch.export.export(Tensors(model), (ids, mask), dynamic_shapes=shapes), path)
    report, _ = built_report(capsys, path, tmp_path / "out")
    assert len({r["inputs"] for r in report["parity"]}) >= 2
    inputs, _ = graph_io(tmp_path / "out" / "model.onnx")
    assert inputs == ["input_ids", "attention_mask"]
    # check and bench take the program too (one timed call each: this tests that it runs, not its speed)
    assert run(capsys, "check", path, "--onnx", tmp_path / "out" / "model.fused.onnx")[0] == 0
    code, out, err = run(capsys, "bench", path, "--seq-lens", "16", "--iters", "1", "--warmup", "0",
                         "--backends", "torch", "--json", tmp_path / "bench.json")
    assert code == 0, out + err
    records = json.loads((tmp_path / "bench.json").read_text())["records"]
    assert [r["seq_len"] for r in records] == [16]

    class ModelOutputs(Tensors):  # returns transformers' BaseModelOutputWithPoolingAndCrossAttentions
        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)

    # its outputs are flattened to the container's keys, never rebuilt as the class (nothing imported by name)
    path = tmp_path / "bert_model_output.pt2"
    torch.export.save(torch.export.export(ModelOutputs(model), (ids, mask), dynamic_shapes=shapes), path)
    from attn_export.loading import load_model

    loaded = load_model(path)
    assert loaded.output_names == ["last_hidden_state", "pooler_output"]
    feeds = loaded.example_inputs(seq_len=24, batch=3)
    expected = model(**feeds, return_dict=False)
    got = loaded.module(*feeds.values())
    assert isinstance(got, tuple) and len(got) == 2
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected))


# ---------------------------------------------------------------------------------------------------- bad input
def edit_config(folder, **changes):
    path = folder / "config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


def no_config(folder):
    (folder / "config.json").unlink()


def unknown_type(folder):
    edit_config(folder, model_type="no-such-model")


def remote_code(folder):
    edit_config(folder, auto_map={"AutoModel": "modeling_evil.EvilModel"})


def no_weights(folder):
    (folder / "model.safetensors").unlink()


def truncated_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def mismatched_weights(folder):
    edit_config(folder, intermediate_size=48)  # same budget, other shapes


def huge_config(folder):
    edit_config(folder, hidden_size=2**16, intermediate_size=2**18)  # gigabytes of parameters beside 200 KB


def missing_head(folder):
    edit_config(folder, architectures=["BertForSequenceClassification"])  # weights hold no classifier


@pytest.mark.parametrize("breaks, args, expected", [
    (no_config, [], "no config.json"),
    (unknown_type, [], "unknown model_type 'no-such-model'"),
    (remote_code, [], "auto_map"),
    (no_weights, [], "no weights in the folder"),
    (truncated_weights, [], "cannot read the weights"),
    (mismatched_weights, [], "weights do not match the config"),
    (huge_config, [], "config and weights do not match"),
    (missing_head, [], "weights missing from the folder"),
    (None, ["--task", "image-classification"], "bert has no image-classification model"),
], ids=lambda v: getattr(v, "__name__", None) if callable(v) else None)
def test_bad_folders_are_one_line_and_write_nothing(capsys, tmp_path, bert_folder, breaks, args, expected):
    folder = tmp_path / "model"
    shutil.copytree(bert_folder, folder)
    if breaks:
        breaks(folder)
    code, out, err = run(capsys, "build", folder, "-o", tmp_path / "out", *args)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"error: {folder}: ") and expected in err, err
    assert not (tmp_path / "out").exists()


def test_task_override_and_weights_only_pytorch_model_bin(tmp_path, bert_folder):
    from safetensors.torch import load_file

    from attn_export.errors import UserError
    from attn_export.loading import load_model

    classifier = tmp_path / "classifier"
    torch.manual_seed(0)
    save(transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=3)).eval(), classifier)
    assert load_model(classifier).output_names == ["logits"]
    base = load_model(classifier, task="base")  # the encoder under the head, its weights from the same file
    assert base.arch == "BertModel" and base.output_names == ["last_hidden_state", "pooler_output"]
    assert not base.module.training and not base.module.model.training
    checkpoint = tmp_path / "x.pt"
    checkpoint.write_bytes(b"\x80\x04N.")  # a pickle of None
    with pytest.raises(UserError, match="--task applies to Hugging Face model folders only"):
        load_model(checkpoint, task="base")

    # a pytorch_model.bin is read weights-only: a plain state dict loads, a pickled object is refused
    legacy = tmp_path / "legacy"
    shutil.copytree(bert_folder, legacy)
    state = load_file(legacy / "model.safetensors")
    (legacy / "model.safetensors").unlink()
    torch.save(state, legacy / "pytorch_model.bin")
    expected = load_model(bert_folder).example_inputs()
    out_new = load_model(legacy).module(*expected.values())
    out_ref = load_model(bert_folder).module(*expected.values())
    assert all(torch.equal(a, b) for a, b in zip(out_new, out_ref))
    marker = tmp_path / "marker"
    torch.save({**state, "evil": WritesMarker(marker)}, legacy / "pytorch_model.bin")
    with pytest.raises(UserError) as info:
        load_model(legacy)
    assert "cannot read the weights" in str(info.value) and not marker.exists()

