from __future__ import annotations

import numpy as np
import torch

from .base import Runner


class TorchRunner(Runner):
    """Eager torch: the reference every graph is checked against. Outputs are named as `output_names` says, else
    output_0, output_1, ..."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, label: str, input_names: list[str], device: str = "cpu",
                 output_names: list[str] | None = None):
        super().__init__(label)
        if module.training:  # a torch.export program's module refuses eval(); loaded models are in eval already
            module.eval()
        self.module = module.to(device)
        self.input_names = input_names
        self.output_names = output_names
        self.device = device

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.asarray(feeds[n])).to(self.device) for n in self.input_names]
        with torch.no_grad():
            out = self.module(*args)
        if isinstance(out, dict):  # a torch.export program that returns a dict: its keys name the outputs
            names, outs = [str(k) for k in out], list(out.values())
        else:
            outs = out if isinstance(out, (tuple, list)) else [out]
            names = self.output_names if self.output_names and len(self.output_names) == len(outs) else \
                [f"output_{i}" for i in range(len(outs))]
        return {name: o.detach().cpu().numpy() for name, o in zip(names, outs)}
