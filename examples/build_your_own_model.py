"""Build your own model: export, fuse and check a custom nn.Module in one call to attn_export.api.build.

The model below is written here, not taken from the zoo: a token embedding, one pre-LN residual block whose
attention is a BigBird block-sparse layer (models.bigbird.BigBirdAttention with a small config), and a
per-token classifier. api.build exports it to ONNX, rewrites the attention into a BlockSparseAttention custom
node, checks both graphs against torch eager at two sequence lengths, and writes

    OUT_DIR/model.onnx        reference graph (standard ONNX ops)
    OUT_DIR/model.fused.onnx  attention as attn_export custom nodes
    OUT_DIR/report.json       fusion, parity and engine

Run from the repository root:   python examples/build_your_own_model.py [OUT_DIR]   (default out/example)
Exits 1 when a layer is not fused or a parity check fails.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from attn_export import api
from attn_export.report import console, fusion_table, parity_table
from models.bigbird import BigBirdAttention, BigBirdConfig
from models.common import TokenEmbedding

VOCAB, HIDDEN, HEADS, BLOCK = 500, 64, 4, 16
MAX_SEQ_LEN = 256  # the frozen random block table covers MAX_SEQ_LEN / BLOCK blocks


class TinyBigBirdTagger(nn.Module):
    """embedding -> x + BigBird attention(LayerNorm(x)) -> LayerNorm -> per-token logits."""

    def __init__(self):
        super().__init__()
        config = BigBirdConfig(vocab_size=VOCAB, max_seq_len=MAX_SEQ_LEN, hidden=HIDDEN, num_heads=HEADS,
                               block_size=BLOCK, num_random_blocks=2, num_layers=1)
        self.embed = TokenEmbedding(VOCAB, MAX_SEQ_LEN, HIDDEN)
        self.norm_in = nn.LayerNorm(HIDDEN)
        self.attention = BigBirdAttention(config, layer_index=0)
        self.norm_out = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, 5)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        x = x + self.attention(self.norm_in(x))
        return self.head(self.norm_out(x))


def token_ids(batch: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def main() -> int:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "out/example")
    torch.manual_seed(0)
    model = TinyBigBirdTagger().eval()
    print(f"model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")

    # Batch and sequence stay dynamic in the graph; BigBird needs lengths that are multiples of BLOCK.
    # Parity is checked at two lengths (8 and 12 blocks) and two batch sizes.
    example = {"input_ids": token_ids(1, 128, seed=0)}
    parity_inputs = [("batch=1 seq_len=128", example),
                     ("batch=2 seq_len=192", {"input_ids": token_ids(2, 192, seed=1)})]
    result = api.build(model, example, out_dir, dynamic_axes={"input_ids": {0: "batch", 1: "seq"}},
                       parity_inputs=parity_inputs, progress=lambda message: print(f"... {message}"))

    console.print(fusion_table(result.fusion))
    console.print(parity_table(result.parity))
    engine = result.engine
    print(f"engine: {engine['path']}" if engine["path"] else f"engine: not built: {engine['reason']}")
    for name in ("model.onnx", "model.fused.onnx", "report.json"):
        print(f"wrote {out_dir / name}")
    if not result.ok:
        print("FAILED: not every attention layer was fused, or a parity check failed", file=sys.stderr)
        return 1
    print("ok: every attention layer fused and parity holds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
