"""Attention we did not write, fused: how long fusion takes and the fused / reference latency on onnxruntime CPU.

    python benchmarks/real_world.py                        # every model below, 12 layers
    python benchmarks/real_world.py --models bert,gau --layers 2 --iters 5 --json out/real_world.json

Models are random-initialised at a realistic depth (nothing is downloaded): transformers' BERT, RoBERTa, DeBERTa-v2,
ViT and BigBird (block_sparse, 4096 tokens: fusion time, and what the report says), FLASH-pytorch's GAU and FLASH,
performer-pytorch's FAVOR+ attention, and a packed-qkv Einsum attention as research code writes it. Both graphs run
in one process, interleaved; ratio below 1 means the fused graph is faster.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attn_export.export import export_onnx  # noqa: E402
from attn_export.passes.probe import padding_mask  # noqa: E402
from fusion import fuse_and_time  # noqa: E402  (benchmarks/fusion.py: the same timing for zoo and real-world graphs)


class FirstOutput(torch.nn.Module):
    """transformers returns a ModelOutput; the exporters want tensors (and named inputs, for dynamic shapes)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


class FirstImageOutput(FirstOutput):
    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values, return_dict=False)[0]


class PackedEinsumAttention(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = (torch.einsum("bhid,bhjd->bhij", q, k) * (d // self.heads) ** -0.5).softmax(-1)
        return x + self.out(torch.einsum("bhij,bhjd->bhid", a, v).transpose(1, 2).reshape(b, n, d))


class Stack(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def build(name: str, layers: int):
    """(module, example inputs, probe lengths or None for a fixed length, exporter)."""
    import transformers as hf

    torch.manual_seed(0)
    text = dict(hidden_size=256, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=1024,
                vocab_size=1000)
    if name in ("bert", "roberta"):
        # RoBERTa's positions start after its padding index, so 512 tokens need 514 positions (as roberta-base)
        config = hf.BertConfig(**text) if name == "bert" else hf.RobertaConfig(**text, max_position_embeddings=514)
        model = (hf.BertModel if name == "bert" else hf.RobertaModel)(config, add_pooling_layer=False)
        return FirstOutput(model), _tokens(512), (256, 512), "dynamo"
    if name == "deberta":
        config = hf.DebertaV2Config(**text, relative_attention=True, position_buckets=256, pos_att_type=["p2c", "c2p"],
                                    norm_rel_ebd="layer_norm", max_position_embeddings=512)
        return FirstOutput(hf.DebertaV2Model(config)), _tokens(512), (256, 512), "dynamo"
    if name == "bigbird":
        config = hf.BigBirdConfig(**text, attention_type="block_sparse", block_size=64, num_random_blocks=3,
                                  max_position_embeddings=4096)
        return FirstOutput(hf.BigBirdModel(config, add_pooling_layer=False)), _tokens(4096), None, "torchscript"
    if name == "vit":
        config = hf.ViTConfig(hidden_size=192, num_hidden_layers=layers, num_attention_heads=3,
                              intermediate_size=768, image_size=224, patch_size=16)
        pixels = {"pixel_values": torch.randn(1, 3, 224, 224)}
        return FirstImageOutput(hf.ViTModel(config, add_pooling_layer=False)), pixels, None, "dynamo"
    if name == "gau":
        from flash_pytorch import GAU

        stack = Stack([GAU(dim=256, query_key_dim=128) for _ in range(layers)])
        return stack, {"x": torch.randn(1, 1024, 256)}, (512, 1024), "dynamo"
    if name == "flash":
        from flash_pytorch import FLASH

        stack = Stack([FLASH(dim=256, group_size=256, query_key_dim=128) for _ in range(layers)])
        return stack, {"x": torch.randn(1, 1024, 256)}, (512, 1024), "dynamo"
    if name == "performer":  # performer-pytorch does not export with dynamo
        from performer_pytorch import SelfAttention

        stack = Stack([SelfAttention(dim=256, heads=4, dim_head=64, nb_features=256) for _ in range(layers)])
        return stack, {"x": torch.randn(1, 1024, 256)}, (512, 1024), "torchscript"
    if name == "einsum":
        stack = Stack([PackedEinsumAttention(256, 4) for _ in range(layers)])
        return stack, {"x": torch.randn(1, 1024, 256)}, (512, 1024), "dynamo"
    raise SystemExit(f"unknown model {name!r}")


def _tokens(n: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 1000, (1, n)), "attention_mask": torch.from_numpy(padding_mask([1, n]))}


def bench(name: str, layers: int, iters: int) -> dict:
    module, inputs, lengths, exporter = build(name, layers)
    if lengths:
        dynamic = {k: {0: "batch", 1: "seq"} for k in inputs}
        probe = [{k: [1, n, *v.shape[2:]] for k, v in inputs.items()} for n in lengths]
    else:
        dynamic, probe = None, [{k: list(v.shape) for k, v in inputs.items()}] * 2
    reference = export_onnx(module.eval(), inputs, dynamic_axes=dynamic, exporter=exporter, probe_shapes=probe)
    timed, report = fuse_and_time(reference, {k: v.numpy() for k, v in inputs.items()}, iters)
    ops = sorted({layer.op for layer in report.layers if layer.status == "fused"})
    return {"model": name, "layers": layers, "exporter": exporter, "fused_layers": report.fused,
            "attention_layers": report.attention_layers, "ops": ops, **timed,
            "not_fused": sorted({layer.reason for layer in report.layers if layer.status != "fused"})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bert,roberta,deberta,vit,gau,flash,performer,einsum,bigbird")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    print(f"{'model':9s} {'fused':>7s} {'fuse s':>7s} {'ref ms':>8s} {'fused ms':>9s} {'ratio':>6s}  op")
    for name in args.models.split(","):
        row = bench(name, args.layers, args.iters)
        rows.append(row)
        print(f"{name:9s} {row['fused_layers']:3d}/{row['attention_layers']:<3d} {row['fuse_seconds']:7.1f} "
              f"{row['reference_ms']:8.1f} {row['fused_ms']:9.1f} {row['ratio']:6.2f}  {', '.join(row['ops'])}",
              flush=True)
        for reason in row["not_fused"]:
            print(f"          not fused: {reason[:68]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
