from __future__ import annotations

import numpy as np


class Runner:
    """A backend: `name` says which (torch, onnxruntime, tensorrt), `label` which model or graph it runs."""

    name = "runner"

    def __init__(self, label: str):
        self.label = label

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError
