from __future__ import annotations

import numpy as np
import torch

from .base import Runner


class TorchRunner(Runner):
    """Eager torch: the reference every graph is checked against. Outputs are named output_0, output_1, ..."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, label: str, input_names: list[str], device: str = "cpu"):
        super().__init__(label)
        self.module = module.eval().to(device)
        self.input_names = input_names
        self.device = device

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.asarray(feeds[n])).to(self.device) for n in self.input_names]
        with torch.no_grad():
            out = self.module(*args)
        outs = out if isinstance(out, (tuple, list)) else [out]
        return {f"output_{i}": o.detach().cpu().numpy() for i, o in enumerate(outs)}
