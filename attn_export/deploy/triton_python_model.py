"""Triton Python-backend model that runs the portable fused graph on onnxruntime.

`attn-export serve` copies this file as <model>/1/model.py when the server has no onnxruntime backend
(nvidia-pytriton's server ships only the Python backend). It imports onnxruntime and numpy only: the portable
graph carries its custom ops' decompositions, so neither attn_export nor torch is needed inside the server.
Triton checks each request's names, data types and shapes against config.pbtxt before execute() sees it.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        parameters = config.get("parameters", {})
        threads = int(parameters.get("intra_op_threads", {}).get("string_value", "0") or 0)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per core)
        options.log_severity_level = 3
        self.session = ort.InferenceSession(os.path.join(folder, "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.output_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    def execute(self, requests):
        responses = []
        for request in requests:  # one request at a time: a failure answers that request only
            try:
                feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
                values = self.session.run(self.outputs, feeds)
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=self.output_dtypes[name]))
                           for name, value in zip(self.outputs, values)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as e:  # reaches the client as the request's error; the server keeps serving
                message = " ".join(str(e).split()) or type(e).__name__
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"onnxruntime: {message}")))
        return responses

    def finalize(self):
        self.session = None
