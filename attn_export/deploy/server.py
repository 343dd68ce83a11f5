"""`attn-export serve`: a real Triton Inference Server on a build folder, on loopback by default.

The server is nvidia-pytriton's bundled tritonserver binary (Triton 2.51), run directly, not through PyTriton's
Python binding. That wheel ships only Triton's Python backend, so unless the server has an onnxruntime backend
the portable fused graph is served by a Python-backend model (triton_python_model.py) that runs it on
onnxruntime. What it takes on these machines (see README): the Python stub for this interpreter copied into the
backend folder, this interpreter's libpython ahead of the system one (the stub links the system's), the
stub's import path set to ours, gRPC bound to the same host as HTTP, and waiting for the model (not only the
server) to be ready. The server runs in its own process group; stop() ends that whole group, stubs included.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import UserError, one_line
from . import repository

SERVE_EXTRA = "pip install 'attn-export[serve]'"
READY_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 5
STOP_TIMEOUT_S = 15.0  # then SIGKILL


class TritonDistribution:
    """Where nvidia-pytriton keeps the server binary, its backends, Python stubs and shared libraries."""

    def __init__(self):
        spec = importlib.util.find_spec("pytriton")  # located, not imported: the server needs none of PyTriton
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"serve needs Triton's server from nvidia-pytriton ({SERVE_EXTRA})")
        package = Path(next(iter(spec.submodule_search_locations)))
        self.root = package / "tritonserver"
        self.binary = self.root / "bin" / "tritonserver"
        self.backends = self.root / "backends"
        self.libs = package.parent / "nvidia_pytriton.libs"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        self.stub = self.root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not self.binary.is_file():
            raise UserError(f"{self.binary}: nvidia-pytriton is installed without its server binary")
        if not self.stub.is_file():
            raise UserError(f"nvidia-pytriton has no Python-backend stub for Python {version}")

    def has_backend(self, name: str) -> bool:
        return (self.backends / name).is_dir()


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a socket in TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"port {port} on {host} is in use or not available ({e.strerror or e})") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now, with the next one free too (HTTP on it, gRPC on the next)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        try:
            check_port_free(host, port + 1)
            return port
        except UserError:
            continue
    raise UserError("no two free neighbouring ports found")


class TritonServer:
    """One tritonserver process serving one build folder's portable graph as model `name`.

    Use as a context manager, or start()/stop(). HTTP on `port`, gRPC on `port + 1`, both on `host`."""

    def __init__(self, out_dir: str | os.PathLike, *, name: str = "model", host: str = "127.0.0.1",
                 port: int = 8000, backend: str = "onnxruntime", instances: int = 1, max_batch_size: int = 0,
                 intra_op_threads: int = 1):
        self.out_dir, self.name, self.host, self.port = Path(out_dir), name, host, port
        self.grpc_port = port + 1
        self.backend, self.instances, self.max_batch_size = backend, instances, max_batch_size
        self.intra_op_threads = intra_op_threads
        self.process: subprocess.Popen | None = None
        self.workspace: Path | None = None
        self.served_by = ""  # what runs the model, e.g. "python backend (onnxruntime)"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------------------------------ start
    def start(self, ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        if self.backend == "tensorrt":
            raise UserError("serving the TensorRT engine needs a Triton server with the TensorRT backend and a GPU; "
                            "nvidia-pytriton's server has only the Python backend: run `attn-export deploy` and "
                            "the launch line it prints on such a server")
        if self.backend != "onnxruntime":
            raise UserError(f"--backend must be onnxruntime or tensorrt, got '{self.backend}'")
        if not 0 < self.port < 65535:
            raise UserError(f"--port must be between 1 and 65534 (gRPC takes the next one), got {self.port}")
        repository.check_model_options(self.out_dir, self.name, self.max_batch_size, self.instances)
        graph_path, graph = repository.portable_graph(self.out_dir)
        for port in (self.port, self.grpc_port):
            check_port_free(self.host, port)
        dist = TritonDistribution()
        self.workspace = Path(tempfile.mkdtemp(prefix="attn-export-serve-"))
        try:
            models = self.workspace / "repository"
            models.mkdir()
            native = dist.has_backend("onnxruntime")
            # onnxruntime threads per instance, read by triton_python_model.py from the config's parameters
            threads = {"intra_op_threads": str(self.intra_op_threads)}
            repository.onnxruntime_model(models, self.name, graph_path, graph, max_batch_size=self.max_batch_size,
                                         instances=self.instances, python_backend=not native,
                                         parameters=None if native else threads)
            self.served_by = "onnxruntime backend" if native else "python backend running onnxruntime"
            backends = self._backends(dist)
            self._launch(dist, models, backends)
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _backends(self, dist: TritonDistribution) -> Path:
        """A copy of the backend folder with this Python's stub where the Python backend looks for it."""
        backends = self.workspace / "backends"
        shutil.copytree(dist.backends, backends, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(dist.stub, backends / "python" / "triton_python_backend_stub")
        return backends

    def _launch(self, dist: TritonDistribution, models: Path, backends: Path) -> None:
        env = dict(os.environ)
        # the stub links the system libpython; this interpreter's own must win (else: RLock errors at init)
        libdirs = [str(dist.libs), sysconfig.get_config_var("LIBDIR") or ""]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([d for d in libdirs if d] + [env.get("LD_LIBRARY_PATH", "")])
        # The stub's interpreter runs isolated (no PYTHONPATH, no PYTHONHOME) and finds its prefix from the
        # python3 on PATH: ours goes first, so a virtual environment's packages (numpy<2 among them) are the
        # ones it imports.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.pop("PYTHONHOME", None)
        command = [str(dist.binary), f"--model-repository={models}", f"--backend-directory={backends}",
                   f"--http-address={self.host}", f"--http-port={self.port}",
                   f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                   "--allow-metrics=false", "--allow-sagemaker=false", "--allow-vertex-ai=false",
                   "--exit-on-error=true", "--log-verbose=0",
                   # in-flight requests get this long to finish on SIGTERM (idle keep-alive clients would
                   # otherwise hold Triton for its default 30 s)
                   f"--exit-timeout-secs={EXIT_TIMEOUT_S}"]
        self.log_path = self.workspace / "tritonserver.log"
        log = open(self.log_path, "wb")
        try:
            # its own session: stop() signals the server and every stub it started, and nothing else
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        except OSError as e:
            raise UserError(f"{dist.binary}: cannot start Triton ({e.strerror or e})") from None
        finally:
            log.close()

    def _wait_ready(self, timeout_s: float) -> None:
        """The server answers healthy before its models load: wait for this model's own readiness."""
        url = f"http://{self.http_url}/v2/models/{self.name}/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"Triton stopped while starting (exit {self.process.returncode}): {self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise UserError(f"Triton did not make model '{self.name}' ready within {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except (OSError, AttributeError):
            return "no log"
        errors = [line for line in text if line.startswith("E") or "error" in line.lower()]
        return one_line(" | ".join((errors or text)[-lines:])) or "empty log"

    # ------------------------------------------------------------------------------------------- stop
    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to the server's process group (Triton drains and unloads), SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is not None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(timeout=timeout_s)
            _signal_group(process.pid, signal.SIGKILL)  # a stub that outlived its server
        if self.workspace is not None:
            shutil.rmtree(self.workspace, ignore_errors=True)
            self.workspace = None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the group's id is the server's pid (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def serve_forever(server: TritonServer, on_ready=lambda server: None) -> int:
    """Run until Ctrl-C or SIGTERM (then 0), always stopping the server; a server that exits by itself is a
    UserError quoting its log."""
    stopping = []

    def request_stop(signum, frame):
        stopping.append(signum)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        on_ready(server)
        while not stopping and server.running():
            time.sleep(0.2)
        if not stopping:
            raise UserError(f"Triton exited by itself: {server.log_tail()}")
        return 0
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
