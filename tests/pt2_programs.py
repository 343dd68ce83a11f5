"""A tiny torch.export program and a code-running pickle, shared by the loading and vetting tests."""
import torch
from torch import nn


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 8)
        self.proj = nn.Linear(8, 4)

    def forward(self, input_ids, mask):
        return self.proj(self.embed(input_ids)) * mask.unsqueeze(-1)


def export_tagger(path, seq=None, seq_len=16):
    model = Tagger().eval()
    ids = torch.randint(0, 50, (2, seq_len))
    mask = torch.ones(2, seq_len)
    shapes = {"input_ids": {1: seq}, "mask": {1: seq}} if seq is not None else None
    torch.export.save(torch.export.export(model, (ids, mask), dynamic_shapes=shapes), path)
    return model, (ids, mask)


class WritesMarker:
    """Unpickling this calls open(marker, "w"): if the marker file exists, the loader ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
