"""Latency of a real Triton server on a build folder, under concurrent clients (reported, never asserted).

    python benchmarks/serve.py out/                         # 8 clients x 50 requests, HTTP, example length
    python benchmarks/serve.py out/ --clients 16 --requests 100 --protocol grpc --json out/serve.json

Starts `attn-export serve`'s server on a free loopback port, sends each client's requests back to back, checks
every answer against onnxruntime on model.onnx, and prints latency percentiles and throughput.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attn_export.backends import OnnxRuntimeRunner  # noqa: E402
from attn_export.build_folder import load_parity_data  # noqa: E402
from attn_export.check import compare_outputs  # noqa: E402
from attn_export.deploy.server import TritonServer, free_port  # noqa: E402
from attn_export.export import load_onnx  # noqa: E402


def client_loop(protocol: str, url: str, name: str, feeds: dict[str, np.ndarray], requests: int):
    if protocol == "grpc":
        import tritonclient.grpc as client_module
    else:
        import tritonclient.http as client_module
    client = client_module.InferenceServerClient(url)
    metadata = client.get_model_metadata(name, as_json=True) if protocol == "grpc" else client.get_model_metadata(name)
    output = metadata["outputs"][0]["name"]
    tensors = []
    for key, value in feeds.items():
        tensor = client_module.InferInput(key, list(value.shape), "INT64" if value.dtype == np.int64 else "FP32")
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    latencies, answers = [], []
    for _ in range(requests):
        start = time.perf_counter()
        result = client.infer(name, tensors)
        latencies.append((time.perf_counter() - start) * 1e3)
        answers.append(result.as_numpy(output))
    client.close()
    return latencies, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    _, feeds, _ = load_parity_data(args.out_dir / "parity.npz")[0]
    expected = OnnxRuntimeRunner(load_onnx(args.out_dir / "model.onnx"), "model.onnx").run(feeds)
    name = "model"
    with TritonServer(args.out_dir, name=name, port=free_port(), instances=args.instances) as server:
        url = server.grpc_url if args.protocol == "grpc" else server.http_url
        client_loop(args.protocol, url, name, feeds, 3)  # warm-up
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            runs = list(pool.map(lambda _: client_loop(args.protocol, url, name, feeds, args.requests),
                                 range(args.clients)))
        wall = time.perf_counter() - start
    latencies = np.array([ms for run, _ in runs for ms in run])
    correct = all(compare_outputs(expected, {"out": out}, pair_by_position=True)[0].passed
                  for _, answers in runs for out in answers)
    record = {"protocol": args.protocol, "clients": args.clients, "requests": int(latencies.size),
              "instances": args.instances, "shapes": {k: list(v.shape) for k, v in feeds.items()},
              "served_by": server.served_by, "all_correct": correct,
              "latency_ms": {p: float(np.percentile(latencies, q)) for p, q in
                             (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99))} | {"max": float(latencies.max())},
              "throughput_per_s": latencies.size / wall}
    lat = record["latency_ms"]
    print(f"{args.protocol}, {args.clients} clients x {args.requests} requests ({server.served_by}): "
          f"p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f}, p99 {lat['p99']:.2f}, max {lat['max']:.2f}; "
          f"{record['throughput_per_s']:.0f} requests/s; answers {'all correct' if correct else 'WRONG'}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
