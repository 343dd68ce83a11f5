from __future__ import annotations

import numpy as np
import onnx

from ..errors import UserError
from ..ops.functions import with_function_bodies
from .base import Runner


class OnnxRuntimeRunner(Runner):
    """Runs a graph on onnxruntime; custom nodes run through their decompositions, attached in memory."""

    name = "onnxruntime"

    def __init__(self, model: onnx.ModelProto, label: str, providers: list[str] | None = None,
                 threads: int | None = None):
        """`threads`: onnxruntime's intra-op threads (None: its default, one per core)."""
        super().__init__(label)
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # graph-optimizer notes are not the user's business
        options = ort.SessionOptions()
        options.log_severity_level = 4  # errors reach the user as one line of ours
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(with_function_bodies(model).SerializeToString(), options,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as e:
            raise UserError(f"{label}: onnxruntime cannot load the graph ({str(e).splitlines()[0]})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise UserError(f"{self.label}: no value for graph input(s) {', '.join(missing)}")
        try:
            outputs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        except Exception as e:
            raise UserError(f"{self.label}: onnxruntime failed ({str(e).splitlines()[0]})") from None
        return dict(zip(self.output_names, outputs))
