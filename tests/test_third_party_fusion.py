"""Attention written by code we did not write: tiny random-initialised models from Hugging Face transformers and
from re-implementations on PyPI, and attention spelled as research code spells it (Einsum, masked_fill with finite
fills). Each either fuses with parity on padded and fully masked rows, or is reported per model layer, never
skipped."""
import inspect
import sys

import numpy as np
import onnx
import pytest
import torch

from attn_export import api
from attn_export.backends import OnnxRuntimeRunner
from attn_export.errors import UserError
from attn_export.export import export_onnx
from attn_export.passes.probe import padding_mask
from conftest import run_cli as run

transformers = pytest.importorskip("transformers")
# every fully fused real-world graph must also pass the plugins' own C++ rules at fp32 and fp16
pytestmark = pytest.mark.usefixtures("plugins_accept_fused_graphs")


class EinsumAttention(torch.nn.Module):
    """Multi-head attention as research code writes it: one packed qkv projection, Einsum products, a mask."""

    def __init__(self, dim=32, heads=4, mask_style=None):
        super().__init__()
        self.heads, self.mask_style = heads, mask_style
        self.qkv, self.out = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = torch.einsum("bhid,bhjd->bhij", q, k) * (d // self.heads) ** -0.5
        keep = None if mask is None else mask[:, None, None, :].bool()
        if self.mask_style == "finfo":
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        elif self.mask_style == "minus_10000":
            scores = scores + (1.0 - keep.float()) * -10000.0
        elif self.mask_style == "minus_inf":
            scores = scores.masked_fill(~keep, float("-inf"))
        out = torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), v)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


def _export(module, inputs, exporter, lengths=(16, 24)):
    """Dynamic batch and sequence, probe shapes at two lengths (batch 2 first: padded rows)."""
    dynamic = {name: {0: "batch", 1: "seq"} for name in inputs}
    shapes = [{k: [batch, n, *v.shape[2:]] for k, v in inputs.items()} for batch, n in zip((2, 1), lengths)]
    return export_onnx(module.eval(), inputs, dynamic_axes=dynamic, exporter=exporter, probe_shapes=shapes)


def _masked_feeds(model, batch=3, n=16):
    """Feeds with a padded row and a fully masked row, as a user's padded batch may hold."""
    feeds = {}
    for inp in model.graph.input:
        dims = [d.dim_value or (batch if i == 0 else n) for i, d in enumerate(inp.type.tensor_type.shape.dim)]
        if inp.type.tensor_type.elem_type == 1:  # float
            feeds[inp.name] = np.random.default_rng(7).standard_normal(dims).astype(np.float32)
        else:
            feeds[inp.name] = padding_mask(dims, fully_masked_row=True)
    return feeds


def _fused_ops(fused):
    return sorted(n.op_type for n in fused.graph.node if n.domain == "attn_export")


def _assert_parity_where_defined(model, fused, feeds):
    expected = OnnxRuntimeRunner(model, "reference").run(feeds)
    got = OnnxRuntimeRunner(fused, "fused").run(feeds)
    for name, want in expected.items():
        defined = np.isfinite(want)  # -inf masks leave a fully masked row undefined (NaN) in the original
        np.testing.assert_allclose(got[name][defined], want[defined], atol=1e-4, rtol=1e-3)
        assert np.isfinite(got[name]).all()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("mask_style", [None, "minus_10000", "finfo", "minus_inf"])
def test_einsum_attention_with_masks_fuses_into_dense_attention(exporter, mask_style):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 32)
    inputs = {"x": x} if mask_style is None else {"x": x, "mask": torch.from_numpy(padding_mask([2, 16]))}
    model = _export(EinsumAttention(mask_style=mask_style), inputs, exporter)
    fused, report = api.fuse(model)
    assert report.attention_layers == 1 and report.all_fused, report.as_dict()
    assert _fused_ops(fused) == ["DenseAttention"]
    assert not [n for n in fused.graph.node if n.op_type in ("Einsum", "Softmax")]
    _assert_parity_where_defined(model, fused, _masked_feeds(model))
    if mask_style == "finfo":  # a finite fill: the fully masked row averages the values, as in the original
        feeds = _masked_feeds(model)
        want = OnnxRuntimeRunner(model, "reference").run(feeds)
        assert all(np.isfinite(v).all() for v in want.values())


def _hf_text_model(kind):
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(**small), add_pooling_layer=False)
    if kind == "roberta":
        return transformers.RobertaModel(transformers.RobertaConfig(**small), add_pooling_layer=False)
    return transformers.DebertaV2Model(transformers.DebertaV2Config(
        **small, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm"))


class _Tensors(torch.nn.Module):
    """The model's first output as a tensor (transformers returns a ModelOutput)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


def _text_inputs():
    return {"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": torch.from_numpy(padding_mask([2, 16]))}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_hf_bert_family_with_padding_mask_fuses_every_layer(kind, exporter):
    model = _export(_Tensors(_hf_text_model(kind)), _text_inputs(), exporter)
    fused, report = api.fuse(model)
    assert report.attention_layers == 2 and report.all_fused, report.as_dict()
    assert [layer.name.endswith("attention.self") for layer in report.layers] == [True, True]
    assert _fused_ops(fused) == ["DenseAttention", "DenseAttention"]
    _assert_parity_where_defined(model, fused, _masked_feeds(model))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_hf_vit_fuses_every_layer(exporter):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_channels=3)
    vit = transformers.ViTModel(config, add_pooling_layer=False).eval()

    class Pixels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = vit

        def forward(self, pixel_values):
            return self.vit(pixel_values=pixel_values, return_dict=False)[0]

    pixels = torch.randn(2, 3, 32, 32)
    model = export_onnx(Pixels().eval(), {"pixel_values": pixels}, dynamic_axes={"pixel_values": {0: "batch"}},
                        exporter=exporter, probe_shapes=[{"pixel_values": [2, 3, 32, 32]},
                                                         {"pixel_values": [1, 3, 32, 32]}])
    fused, report = api.fuse(model)
    assert report.attention_layers == 2 and report.all_fused, report.as_dict()
    got = OnnxRuntimeRunner(fused, "fused").run({"pixel_values": pixels.numpy()})
    np.testing.assert_allclose(next(iter(got.values())), Pixels()(pixels).detach().numpy(), atol=1e-4, rtol=1e-3)


class _Ids(torch.nn.Module):
    """The model called without an attention mask (transformers then masks with all ones)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, return_dict=False)[0]


def _hf_deberta(pos_att_type):
    torch.manual_seed(0)
    return transformers.DebertaV2Model(transformers.DebertaV2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        relative_attention=True, position_buckets=8, pos_att_type=pos_att_type, norm_rel_ebd="layer_norm"))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("pos_att_type", [["p2c", "c2p"], ["c2p"]])
def test_hf_deberta_v2_fuses_every_layer_into_disentangled_attention(exporter, masked, pos_att_type):
    if pos_att_type == ["c2p"] and (exporter, masked) != ("dynamo", True):
        pytest.skip("one c2p-only case is enough: the other axes are covered with both terms")
    deberta = _hf_deberta(pos_att_type)
    inputs = _text_inputs() if masked else {"input_ids": _text_inputs()["input_ids"]}
    model = _export(_Tensors(deberta) if masked else _Ids(deberta), inputs, exporter)
    fused, report = api.fuse(model)
    assert report.attention_layers == 2 and report.all_fused, report.as_dict()
    assert [layer.name.split(".")[-3:] for layer in report.layers] == [["0", "attention", "self"],
                                                                       ["1", "attention", "self"]]
    assert _fused_ops(fused) == ["DisentangledAttention", "DisentangledAttention"]
    config = deberta.config
    for layer in report.layers:
        attrs = layer.attributes
        assert (attrs["span"], attrs["max_position"]) == (config.position_buckets, config.max_position_embeddings)
        assert (attrs["c2p"], attrs["p2c"]) == (int("c2p" in pos_att_type), int("p2c" in pos_att_type))
        assert attrs["scale"] == 0.0  # HF's 1/sqrt(D * (1 + terms)) is the op's default
        assert attrs["masked_rows"] == ("mean" if masked else "zeros")
    # the relative terms and their log buckets run inside the op: no gathered N x N score term is left
    assert not {"GatherElements", "Log", "Softmax"} & {n.op_type for n in fused.graph.node}
    nodes = [n for n in fused.graph.node if n.op_type == "DisentangledAttention"]
    assert all(len(n.input) == (6 if masked else 5) for n in nodes)  # a bias only where there is a mask
    feeds = _masked_feeds(model)
    _assert_parity_where_defined(model, fused, feeds)
    if masked:  # the fully masked batch row: HF's finite fill averages the values uniformly, and so must the op
        with torch.no_grad():
            want = deberta(input_ids=torch.from_numpy(feeds["input_ids"]),
                           attention_mask=torch.from_numpy(feeds["attention_mask"]), return_dict=False)[0]
        got = OnnxRuntimeRunner(fused, "fused").run(feeds)
        np.testing.assert_allclose(next(iter(got.values())), want.numpy(), atol=1e-4, rtol=1e-3)


class _DataIndexedDisentangled(torch.nn.Module):
    """DeBERTa's c2p term with the relative index taken from given position ids (data), not from the length."""

    def __init__(self, dim=32, heads=2, span=8):
        super().__init__()
        self.heads, self.span = heads, span
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.rel = torch.nn.Parameter(torch.randn(2 * span, dim))

    def forward(self, x, positions):
        b, n, d = x.shape
        split = lambda t: t.reshape(t.shape[0], -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v, rel_k = split(self.q(x)), split(self.k(x)), split(self.v(x)), split(self.k(self.rel[None]))
        delta = (positions[:, :, None] - positions[:, None, :] + self.span).clamp(0, 2 * self.span - 1)
        c2p = torch.gather(q @ rel_k.transpose(-1, -2), -1, delta[:, None].expand(b, self.heads, n, n))
        scores = (q @ k.transpose(-1, -2) + c2p) / (2 * (d // self.heads)) ** 0.5
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_disentangled_attention_with_a_data_dependent_index_is_reported_not_densified(exporter):
    torch.manual_seed(0)
    inputs = {"x": torch.randn(2, 16, 32), "positions": torch.arange(16).repeat(2, 1)}
    model = _export(_DataIndexedDisentangled(), inputs, exporter)
    fused, report = api.fuse(model)
    assert report.attention_layers == 1 and not report.all_fused, report.as_dict()
    assert "computed from the input data" in report.layers[0].reason
    assert _fused_ops(fused) == []  # not DenseAttention over a materialised position bias either


def _reimplementation(name):
    torch.manual_seed(0)
    if name == "performer":
        performer_pytorch = pytest.importorskip("performer_pytorch")
        return performer_pytorch.SelfAttention(dim=32, heads=2, dim_head=16, nb_features=24, causal=False)
    flash_pytorch = pytest.importorskip("flash_pytorch")
    if name == "gau":
        return flash_pytorch.GAU(dim=32, query_key_dim=16)
    return flash_pytorch.FLASH(dim=32, group_size=16, query_key_dim=16)


# the exporters that take each re-implementation (performer-pytorch fails with dynamo, FLASH with TorchScript)
REIMPLEMENTATIONS = [("performer", "torchscript"), ("gau", "dynamo"), ("gau", "torchscript"), ("flash", "dynamo")]


@pytest.mark.parametrize("name,exporter", REIMPLEMENTATIONS)
def test_einsum_written_reimplementations_are_never_missed(name, exporter, capsys, tmp_path):
    module = _reimplementation(name)

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, x):
            return self.inner(x)

    model = _export(Call(), {"x": torch.randn(2, 32, 32)}, exporter, lengths=(32, 64))
    assert "Einsum" in {n.op_type for n in model.graph.node}
    fused, report = api.fuse(model)
    assert report.attention_layers >= 1, "attention written with Einsum must be seen"
    assert all(layer.name.startswith("inner") for layer in report.layers), report.as_dict()
    if name == "gau":  # relu^2 over the whole sequence, its 1/N folded into the query: the op's relu^2 form
        assert report.all_fused and _fused_ops(fused) == ["DenseAttention"], report.as_dict()
        assert report.layers[0].attributes["score_fn"] == "relu_squared"
    if name == "performer":  # FAVOR+ with performer-pytorch's own eps and shift (the max of W x', not of the logits)
        assert report.all_fused and _fused_ops(fused) == ["KernelizedAttention"], report.as_dict()
        assert [layer.name for layer in report.layers] == ["inner.fast_attention"]
        attrs = report.layers[0].attributes
        eps = inspect.signature(sys.modules["performer_pytorch.performer_pytorch"].softmax_kernel).parameters["eps"]
        assert (attrs["feature_map"], attrs["stabilizer"], attrs["causal"], attrs["normalize"]) == (
            "favor_positive", "projection", 0, 1)
        assert attrs["eps"] == pytest.approx(eps.default) and attrs["scale"] == pytest.approx(16 ** -0.5)
    if name == "flash":  # local relu^2 within groups, and the global Q (K^T V) / n over the grouped sequence
        assert report.all_fused and _fused_ops(fused) == ["DenseAttention", "KernelizedAttention"], report.as_dict()
        parts = {part.op: part.attributes for part in report.layers[0].parts}
        assert parts["DenseAttention"]["score_fn"] == "relu_squared"
        assert (parts["KernelizedAttention"]["feature_map"], parts["KernelizedAttention"]["normalize"]) == (
            "identity", 0)
    if not report.all_fused:  # what is left is reported with a reason, so --strict fails on it
        assert all(layer.reason for layer in report.layers if layer.status != "fused")
    onnx.save(model, tmp_path / "model.onnx")
    code, out, _ = run(capsys, "fuse", tmp_path / "model.onnx", "-o", tmp_path / "fused.onnx", "--strict")
    assert code == (0 if report.all_fused else 1), out
    assert report.all_fused or "not fused" in out
    # ones, random rows at another length, and for FAVOR+ large norms, where its eps and shift decide the output
    rng = np.random.default_rng(3)
    feeds = [np.ones((1, 32, 32)), rng.standard_normal((2, 48, 32))]
    for x in feeds + ([30 * rng.standard_normal((2, 32, 32))] if name == "performer" else []):
        got = OnnxRuntimeRunner(fused, "fused").run({"x": x.astype(np.float32)})
        want = OnnxRuntimeRunner(model, "reference").run({"x": x.astype(np.float32)})
        for name_, value in want.items():
            np.testing.assert_allclose(got[name_], value, atol=1e-4, rtol=1e-3)


def test_flash_pytorch_padded_groups_fuse():
    """A length that is not a multiple of the group size: FLASH-pytorch zero-pads q, k, v inside the graph and
    divides the global state by the unpadded n; both parts still fuse, with parity at lengths that pad."""
    module = _reimplementation("flash")
    model = _export(module, {"x": torch.randn(2, 40, 32)}, "dynamo", lengths=(40, 56))
    assert "Pad" in {n.op_type for n in model.graph.node}
    fused, report = api.fuse(model)
    assert report.all_fused and _fused_ops(fused) == ["DenseAttention", "KernelizedAttention"], report.as_dict()
    for n in (40, 23):
        x = np.random.default_rng(n).standard_normal((2, n, 32)).astype(np.float32)
        want = OnnxRuntimeRunner(model, "reference").run({"x": x})
        got = OnnxRuntimeRunner(fused, "fused").run({"x": x})
        for name_, value in want.items():
            np.testing.assert_allclose(got[name_], value, atol=1e-4, rtol=1e-3)
            np.testing.assert_allclose(value, module(torch.from_numpy(x)).detach().numpy(), atol=1e-4, rtol=1e-3)


def test_flash_pytorch_per_group_global_part_fuses():
    """reduce_group_non_causal_attn=False: each group's queries read only their own group's state (scaled by 1/n):
    the op run per group."""
    flash_pytorch = pytest.importorskip("flash_pytorch")
    torch.manual_seed(0)
    module = flash_pytorch.FLASH(dim=32, group_size=16, query_key_dim=16, reduce_group_non_causal_attn=False)
    model = _export(module, {"x": torch.randn(2, 32, 32)}, "dynamo", lengths=(32, 64))
    fused, report = api.fuse(model)
    assert report.all_fused and _fused_ops(fused) == ["DenseAttention", "KernelizedAttention"], report.as_dict()
    x = np.random.default_rng(5).standard_normal((2, 48, 32)).astype(np.float32)
    want, got = (OnnxRuntimeRunner(m, tag).run({"x": x}) for m, tag in ((model, "reference"), (fused, "fused")))
    for name_, value in want.items():
        np.testing.assert_allclose(got[name_], value, atol=1e-4, rtol=1e-3)


def test_flash_pytorch_causal_global_part_is_refused_with_its_reason(capsys, tmp_path):
    """causal=True: each group reads an exclusive prefix of the group states, not the op's per-token causal form.
    The local relu^2 part still fuses; the global part is reported with that reason and --strict fails."""
    flash_pytorch = pytest.importorskip("flash_pytorch")
    torch.manual_seed(0)
    module = flash_pytorch.FLASH(dim=32, group_size=16, query_key_dim=16, causal=True)
    model = _export(module, {"x": torch.randn(2, 32, 32)}, "dynamo", lengths=(32, 64))
    fused, report = api.fuse(model)
    assert not report.all_fused and _fused_ops(fused) == ["DenseAttention"]
    assert "causal over groups" in report.layers[0].reason, report.as_dict()
    onnx.save(model, tmp_path / "model.onnx")
    code, out, _ = run(capsys, "fuse", tmp_path / "model.onnx", "-o", tmp_path / "fused.onnx", "--strict")
    assert code == 1 and "causal over groups" in out
    x = np.random.default_rng(6).standard_normal((2, 48, 32)).astype(np.float32)
    want, got = (OnnxRuntimeRunner(m, tag).run({"x": x}) for m, tag in ((model, "reference"), (fused, "fused")))
    for name_, value in want.items():
        np.testing.assert_allclose(got[name_], value, atol=1e-4, rtol=1e-3)


def test_performer_pytorch_causal_is_refused_with_its_reason():
    """performer-pytorch's causal path (without fast_transformers) loops over torch.chunk in Python: TorchScript
    writes a SplitToSequence that onnxruntime refuses, so fuse stops with that reason (exit 2), never a silent
    pass-through. Should an exporter fix the graph, the layer must still be fused or reported."""
    performer_pytorch = pytest.importorskip("performer_pytorch")
    torch.manual_seed(0)
    module = performer_pytorch.SelfAttention(dim=32, heads=2, dim_head=16, nb_features=24, causal=True)
    model = _export(module, {"x": torch.randn(2, 32, 32)}, "torchscript", lengths=(32, 64))
    try:
        _, report = api.fuse(model)
    except UserError as e:
        assert "cannot run the graph on onnxruntime" in str(e)
        return
    assert report.attention_layers >= 1
    assert all(layer.reason for layer in report.layers if layer.status != "fused"), report.as_dict()


def _hf_bigbird(random_blocks=2, n=128):
    torch.manual_seed(0)
    config = transformers.BigBirdConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, vocab_size=100, max_position_embeddings=n,
                                        attention_type="block_sparse", block_size=8, num_random_blocks=random_blocks)
    return transformers.BigBirdModel(config, add_pooling_layer=False).eval()


@pytest.mark.parametrize("exporter", ["torchscript"])  # dynamo fails on HF BigBird's block_sparse on torch 2.13
def test_hf_bigbird_block_sparse_fuses_one_block_sparse_node_per_layer(exporter):
    n = 128  # 16 blocks of 8, over (5 + 2*2) blocks: HF keeps block_sparse; the graph holds this one length
    inputs = {"input_ids": torch.randint(0, 100, (2, n)), "attention_mask": torch.from_numpy(padding_mask([2, n]))}
    shapes = [{name: [batch, n] for name in inputs} for batch in (2, 1)]
    model = export_onnx(_Tensors(_hf_bigbird()).eval(), inputs, dynamic_axes={name: {0: "batch"} for name in inputs},
                        exporter=exporter, probe_shapes=shapes)
    fused, report = api.fuse(model)
    assert report.attention_layers == 2 and report.all_fused, report.as_dict()
    assert [layer.name.split(".")[-4:] for layer in report.layers] == [["layer", "0", "attention", "self"],
                                                                       ["layer", "1", "attention", "self"]]
    assert _fused_ops(fused) == ["BlockSparseAttention", "BlockSparseAttention"]
    assert not [node for node in fused.graph.node if node.op_type == "Softmax"]
    # eval: global first/last blocks, block 0 listed once per random block too, each listing weighing in the softmax
    attrs = report.layers[0].attributes
    assert (attrs["block_size"], attrs["global_blocks"], attrs["count_repeats"]) == (8, 1, 1)
    for batch in (3, 1):  # a padded row and a fully masked row (batch 3), then one unpadded row
        _assert_parity_where_defined(model, fused, _masked_feeds(model, batch=batch, n=n))


def test_hf_bigbird_layout_fed_to_the_fused_node_is_the_models():
    """The block table the pass read off the graph lists what HF computes in eval: window, global and r copies of
    block 0 per middle row (tests/test_hf_attention_reference.py checks that layout against HF's own layer)."""
    from test_hf_attention_reference import hf_bigbird_eval_layout

    n, random_blocks = 128, 2
    inputs = {"input_ids": torch.randint(0, 100, (1, n)), "attention_mask": torch.ones(1, n, dtype=torch.int64)}
    model = export_onnx(_Tensors(_hf_bigbird(random_blocks, n)).eval(), inputs, exporter="torchscript",
                        probe_shapes=[{name: [1, n] for name in inputs}] * 2)
    fused, _ = api.fuse(model)
    tables = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    node = next(n for n in fused.graph.node if n.op_type == "BlockSparseAttention")
    table, want = tables[node.input[3]], hf_bigbird_eval_layout(n // 8, random_blocks).numpy()
    middle = slice(1, n // 8 - 1)  # global rows list nothing; the order of a row's slots does not matter
    np.testing.assert_array_equal(np.sort(table[:, middle], -1), np.sort(want[:, middle], -1))
