"""Export, fuse and check step by step with attn_export.api, on a custom model with Performer attention.

The model is written here: a token embedding, one pre-LN residual block whose attention is FAVOR+ linear
attention (models.performer.PerformerAttention with a small config; its random features are drawn once from a
seeded generator and frozen), and a per-token head. The three steps:

  1. api.export  torch -> OUT_DIR/model.onnx, standard ONNX ops, batch and sequence axes dynamic
  2. api.fuse    model.onnx -> OUT_DIR/model.fused.onnx, attention rewritten into a LinearAttention custom node;
                 the FusionReport says, per attention layer, fused or not fused and why
  3. api.check   torch eager (TorchRunner) is the reference; both graphs run on onnxruntime (OnnxRuntimeRunner,
                 which runs custom nodes through their standard-ONNX decompositions) at two sequence lengths

Run from the repository root:   python examples/export_fuse_check.py [OUT_DIR]   (default out/export_fuse_check)
Exits 1 when a layer is not fused or a parity check fails.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from attn_export import api
from attn_export.backends import OnnxRuntimeRunner, TorchRunner
from attn_export.report import console, parity_table
from models.common import TokenEmbedding
from models.performer import PerformerAttention, PerformerConfig

VOCAB, HIDDEN, HEADS, FEATURES = 500, 64, 4, 32
MAX_SEQ_LEN = 512
SEQ_LENS = (100, 256)  # parity lengths; any length up to MAX_SEQ_LEN is valid


class TinyPerformerTagger(nn.Module):
    """embedding -> x + FAVOR+ attention(LayerNorm(x)) -> LayerNorm -> per-token logits."""

    def __init__(self):
        super().__init__()
        config = PerformerConfig(vocab_size=VOCAB, max_seq_len=MAX_SEQ_LEN, hidden=HIDDEN, num_heads=HEADS,
                                 num_features=FEATURES, num_layers=1, causal=False)
        self.embed = TokenEmbedding(VOCAB, MAX_SEQ_LEN, HIDDEN)
        self.norm_in = nn.LayerNorm(HIDDEN)
        self.attention = PerformerAttention(config, layer_index=0)
        self.norm_out = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, 5)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        x = x + self.attention(self.norm_in(x))
        return self.head(self.norm_out(x))


def token_ids(batch: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def main() -> int:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "out/export_fuse_check")
    torch.manual_seed(0)
    model = TinyPerformerTagger().eval()
    print(f"model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")

    # 1. export. probe_shapes: input shapes the graph accepts; the fusion passes run the graph at them.
    example = {"input_ids": token_ids(1, SEQ_LENS[0], seed=0)}
    onnx_path, fused_path = out_dir / "model.onnx", out_dir / "model.fused.onnx"
    reference_graph = api.export(model, example, onnx_path, dynamic_axes={"input_ids": {0: "batch", 1: "seq"}},
                                 probe_shapes=[{"input_ids": [1, n]} for n in SEQ_LENS])
    print(f"1. export: wrote {onnx_path} ({len(reference_graph.graph.node)} nodes)")

    # 2. fuse. The fused graph is compared with model.onnx before it is written; a mismatch raises UserError.
    fused_graph, report = api.fuse(reference_graph, fused_path)
    print(f"2. fuse: wrote {fused_path} ({len(fused_graph.graph.node)} nodes); "
          f"{report.fused} of {report.attention_layers} attention layers fused")
    for layer in report.layers:
        detail = layer.reason if layer.status != "fused" else \
            ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in layer.attributes.items())
        print(f"   {layer.name}: {layer.status} as {layer.op or '-'} ({detail})")
    custom = [n for n in fused_graph.graph.node if n.domain == "attn_export"]
    print(f"   custom nodes in the fused graph: {', '.join(f'{n.op_type} {n.name!r}' for n in custom) or 'none'}")

    # 3. check: torch eager against both graphs on onnxruntime, at two sequence lengths (batch 2).
    feeds = [(f"seq_len={n}", {"input_ids": token_ids(2, n, seed=i + 1).numpy()}) for i, n in enumerate(SEQ_LENS)]
    reference = TorchRunner(model, "torch eager", input_names=["input_ids"])
    candidates = [OnnxRuntimeRunner(reference_graph, onnx_path.name), OnnxRuntimeRunner(fused_graph, fused_path.name)]
    results = api.check(reference, candidates, feeds)  # tolerances by dtype: float32 atol 1e-4, rtol 1e-3
    print("3. check:")
    console.print(parity_table(results))

    passed = all(r.passed for r in results)
    if not report.all_fused or not passed:
        print("FAILED: " + ("not every attention layer was fused" if not report.all_fused else "parity failed"),
              file=sys.stderr)
        return 1
    print("ok: every attention layer fused and both graphs match torch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
