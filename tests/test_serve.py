"""attn-export serve: a real Triton server (nvidia-pytriton's tritonserver) on loopback, asked with tritonclient.

Every loop is bounded in count and time; the server is stopped at the end of the module whatever happens."""
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="needs nvidia-pytriton (the serve extra)")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from attn_export.backends import OnnxRuntimeRunner  # noqa: E402
from attn_export.build_folder import load_parity_data  # noqa: E402
from attn_export.check import compare_outputs  # noqa: E402
from attn_export.deploy.server import TritonServer, free_port  # noqa: E402
from attn_export.export import load_onnx  # noqa: E402

NAME = "bigbird"
VOCAB = 100  # the small BigBird config's vocabulary


@pytest.fixture(scope="module")
def server(bigbird_build):
    out, _ = bigbird_build
    with TritonServer(out, name=NAME, port=free_port(), instances=2) as running:
        yield running


@pytest.fixture(scope="module")
def reference(bigbird_build):
    out, _ = bigbird_build
    return OnnxRuntimeRunner(load_onnx(out / "model.onnx"), "model.onnx")


def infer_http(client, ids):
    tensor = httpclient.InferInput("input_ids", list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids)
    result = client.infer(NAME, [tensor])
    return result.as_numpy(result.get_response()["outputs"][0]["name"])


def assert_matches(reference, ids, got):
    [comparison] = compare_outputs(reference.run({"input_ids": ids}), {"out": got}, pair_by_position=True)
    assert comparison.passed, comparison.reason


def test_http_and_grpc_answers_equal_onnxruntime_on_the_reference_graph(server, reference, bigbird_build):
    out, n_sets = bigbird_build
    http = httpclient.InferenceServerClient(server.http_url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    for label, inputs, torch_outputs in load_parity_data(out / "parity.npz"):
        ids = inputs["input_ids"]
        got = infer_http(http, ids)
        assert_matches(reference, ids, got)
        tensor = grpcclient.InferInput("input_ids", list(ids.shape), "INT64")
        tensor.set_data_from_numpy(ids)
        got_grpc = grpc.infer(NAME, [tensor]).as_numpy(server_output_name(http))
        assert np.array_equal(got, got_grpc), label  # one server, one model: the protocols agree exactly
        assert compare_outputs(torch_outputs, {"out": got}, pair_by_position=True)[0].passed
    grpc.close()


def server_output_name(client):
    return client.get_model_metadata(NAME)["outputs"][0]["name"]


def test_eight_concurrent_clients_every_answer_right_none_lost(server, reference):
    rng = np.random.default_rng(0)
    cases = [rng.integers(0, VOCAB, (1, 128)).astype(np.int64) for _ in range(8)]
    expected = [reference.run({"input_ids": ids}) for ids in cases]
    per_client = 40

    def client_loop(worker):
        client = httpclient.InferenceServerClient(server.http_url, connection_timeout=30, network_timeout=30)
        answers = []
        for i in range(per_client):
            k = (worker + i) % len(cases)
            answers.append((k, infer_http(client, cases[k])))
        client.close()
        return answers

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = [f.result(timeout=240) for f in [pool.submit(client_loop, w) for w in range(8)]]
    answers = [a for r in results for a in r]
    assert len(answers) == 8 * per_client
    for k, got in answers:
        [c] = compare_outputs(expected[k], {"out": got}, pair_by_position=True)
        assert c.passed, c.reason


@pytest.mark.parametrize("bad", ["name", "shape", "dtype"])
def test_a_wrong_request_gets_a_clear_error_and_the_server_keeps_serving(server, reference, bad):
    client = httpclient.InferenceServerClient(server.http_url)
    ids = np.arange(128, dtype=np.int64).reshape(1, 128) % VOCAB
    name, value, datatype = "input_ids", ids, "INT64"
    if bad == "name":
        name = "token_ids"
    elif bad == "shape":
        value = ids.reshape(1, 1, 128)
    else:
        value, datatype = ids.astype(np.float32), "FP32"
    tensor = httpclient.InferInput(name, list(value.shape), datatype)
    tensor.set_data_from_numpy(value)
    with pytest.raises(InferenceServerException) as error:
        client.infer(NAME, [tensor])
    message = str(error.value)
    assert {"name": "token_ids", "shape": "input_ids", "dtype": "FP32"}[bad] in message, message
    assert client.is_server_live() and client.is_model_ready(NAME)
    assert_matches(reference, ids, infer_http(client, ids))


def listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_killed_server_restarted_serves_the_same_repository(bigbird_build, reference):
    out, _ = bigbird_build
    port = free_port()
    ids = np.arange(128, dtype=np.int64).reshape(1, 128) % VOCAB
    first = TritonServer(out, name=NAME, port=port)
    first.start()
    try:
        assert_matches(reference, ids, infer_http(httpclient.InferenceServerClient(first.http_url), ids))
        os.killpg(first.process.pid, signal.SIGKILL)  # a crash: no shutdown path runs
        first.process.wait(timeout=30)
    finally:
        first.stop()
    for _ in range(100):  # bounded: the kernel releases the ports once the group is gone
        if not listening(port):
            break
        time.sleep(0.1)
    with TritonServer(out, name=NAME, port=port) as second:
        assert_matches(reference, ids, infer_http(httpclient.InferenceServerClient(second.http_url), ids))


def test_serve_command_port_in_use_exits_2(bigbird_build):
    out, _ = bigbird_build
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "attn_export.cli", "serve", str(out), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: port") and done.stderr.count("\n") == 1


def descendants(pid):
    """Every process started, directly or not, by `pid` (tritonserver and its Python-backend stubs)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_sigterm_stops_the_server_and_everything_it_started(bigbird_build):
    out, _ = bigbird_build
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "attn_export.cli", "serve", str(out), "--name", NAME,
                              "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = serve.stdout.readline()  # blocks until ready or exit; the server itself bounds its start
        assert f"serving '{NAME}'" in line and f"127.0.0.1:{port}" in line, (line, serve.stderr.read())
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_model_ready(NAME)
        started = descendants(serve.pid)
        assert len(started) >= 2, "serve should have started tritonserver and its model's stub"
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
    assert not listening(port) and not listening(port + 1)
    assert not [p for p in started if os.path.exists(f"/proc/{p}") and "zombie" not in _state(p)]


def _state(pid):
    try:
        return open(f"/proc/{pid}/status").read()
    except OSError:
        return "zombie"
