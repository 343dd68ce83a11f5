"""Masks, exactly: attention masked the ways research code and transformers write it (a bool mask through
masked_fill with -inf or finfo.min, a 0/1 integer mask as an additive -10000, HF BERT's extended mask) fuses once,
and the fused graph then computes what the original computes for any padding a user's batch may hold: drawn by
hypothesis, with padded rows, fully masked rows and holes anywhere, not only the prefix masks the probes use.
A finite fill makes a fully masked row average the values uniformly; -inf leaves it undefined (NaN) in the
original, where the fused graph must still be finite."""
import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_export import api
from attn_export.backends import OnnxRuntimeRunner
from attn_export.export import export_onnx
from attn_export.passes.probe import padding_mask

EXAMPLES = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
DIM, HEADS, VOCAB = 32, 4, 50


class MaskedAttention(torch.nn.Module):
    """One attention layer as research code writes it: packed qkv, Einsum products, a key padding mask."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.qkv, self.out = torch.nn.Linear(DIM, 3 * DIM), torch.nn.Linear(DIM, DIM)

    def forward(self, x, mask):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        scores = torch.einsum("bhid,bhjd->bhij", q, k) * (d // HEADS) ** -0.5
        if self.style == "bool_minus_inf":
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        elif self.style == "bool_finfo":
            scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        else:  # "int_minus_10000": a 0/1 integer mask turned into an additive bias
            scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0
        out = torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), v)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class BertLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(hidden_size=DIM, num_hidden_layers=1, num_attention_heads=HEADS,
                                         intermediate_size=64, vocab_size=VOCAB, attn_implementation="eager")
        self.bert = transformers.BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids, mask):
        return self.bert(input_ids=input_ids, attention_mask=mask, return_dict=False)[0]


STYLES = ["bool_minus_inf", "bool_finfo", "int_minus_10000", "hf_bert"]


def _example(style: str, batch: int, n: int):
    torch.manual_seed(0)
    mask = torch.from_numpy(padding_mask([batch, n]))
    if style == "hf_bert":
        return BertLayers().eval(), {"input_ids": torch.randint(0, VOCAB, (batch, n)), "mask": mask}
    return MaskedAttention(style).eval(), {"x": torch.randn(batch, n, DIM),
                                           "mask": mask.bool() if style.startswith("bool") else mask}


@functools.lru_cache(maxsize=None)
def fused_once(style: str, exporter: str):
    """(input names, runner of the fused graph, torch module): exported at a dynamic batch and length, fused once."""
    module, inputs = _example(style, 2, 16)
    dynamic = {name: {0: "batch", 1: "seq"} for name in inputs}
    shapes = [{k: [b, n, *v.shape[2:]] for k, v in inputs.items()} for b, n in ((2, 16), (1, 24))]
    model = export_onnx(module, inputs, dynamic_axes=dynamic, exporter=exporter, probe_shapes=shapes)
    fused, report = api.fuse(model)
    assert report.all_fused and report.attention_layers == 1, report.as_dict()
    return [i.name for i in model.graph.input], OnnxRuntimeRunner(fused, "fused"), module


@st.composite
def padded_batches(draw):
    """A [B, N] keep-mask: each row a prefix, a suffix, all masked, or random holes."""
    batch, n = draw(st.integers(1, 4)), draw(st.integers(4, 40))
    rows = []
    for _ in range(batch):
        kind = draw(st.sampled_from(["prefix", "suffix", "none", "holes"]))
        if kind == "holes":
            rows.append(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        else:
            keep = draw(st.integers(1, n)) if kind != "none" else 0
            row = [i < keep for i in range(n)]
            rows.append(row[::-1] if kind == "suffix" else row)
    return np.array(rows, bool)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("style", STYLES)
@EXAMPLES
@given(keep=padded_batches())
def test_fused_graph_computes_the_original_on_every_row_of_any_padding(style, exporter, keep):
    names, fused, module = fused_once(style, exporter)
    rng = np.random.default_rng(keep.size)
    batch, n = keep.shape
    mask = keep if style.startswith("bool") else keep.astype(np.int64)
    data = (rng.integers(0, VOCAB, (batch, n)) if style == "hf_bert"
            else rng.standard_normal((batch, n, DIM)).astype(np.float32))
    got = next(iter(fused.run(dict(zip(names, (data, mask)))).values()))
    with torch.no_grad():
        want = module(torch.from_numpy(data), torch.from_numpy(mask)).numpy()
    assert np.isfinite(got).all()
    fully_masked = ~keep.any(-1)
    if style == "bool_minus_inf":  # the original leaves fully masked rows undefined (NaN): compare the others
        assert np.isnan(want[fully_masked]).all()
        want, got = want[~fully_masked], got[~fully_masked]
    else:  # a finite fill: a fully masked row is the uniform average of the values, defined
        assert np.isfinite(want).all()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
