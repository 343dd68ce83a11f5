"""attn-export command line: a thin layer over attn_export.api. User errors print one line and exit 2."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attn-export")
def cli():
    """Export efficient-attention transformers to ONNX, fuse their attention into custom ops, check parity
    against PyTorch, and build TensorRT engines where TensorRT exists.

    \b
    Typical use:
      attn-export zoo create bigbird -o model.pt
      attn-export build model.pt -o out/
    MODEL may also be a torch.export program (.pt2) or a Hugging Face model folder.
    """


# ---------------------------------------------------------------------------------------------------- zoo
@cli.group()
def zoo():
    """The reference models (one per seed mechanism)."""


@zoo.command("list")
def zoo_list():
    """List the architectures with their paper, attention complexity and export constraints."""
    from rich.table import Table

    import models
    from .report import console

    table = Table(title="attn-export zoo", title_justify="left", show_lines=True)
    for column in ("name", "paper", "attention complexity", "export constraints"):
        table.add_column(column)
    for name in sorted(models.ZOO):
        e = models.ZOO[name]
        table.add_row(name, e.paper, e.complexity, e.constraints)
    console.print(table)


@zoo.command("create")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Checkpoint to write (a plain dict: format tag, architecture, config, weights).")
@click.option("--seq-len", type=int, default=None,
              help="Example sequence length stored with the checkpoint [default: the model's own, e.g. 1024].")
@click.option("--batch", type=int, default=1, show_default=True, help="Example batch size.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field, e.g. --set num_layers=4 (repeatable).")
def zoo_create(name, output, seq_len, batch, overrides):
    """Create a randomly initialised (seeded) zoo model and save it as a checkpoint."""
    import torch

    import models
    from .loading import save_zoo_checkpoint

    entry = models.get(name)
    config = entry.make_config(_parse_overrides(overrides))
    seq_len = entry.default_seq_len(config) if seq_len is None else seq_len
    entry.check_seq_len(config, seq_len)
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    torch.manual_seed(getattr(config, "seed", 0))
    module = entry.build(config)
    save_zoo_checkpoint(output, name, config, module.state_dict(), batch=batch, seq_len=seq_len)
    click.echo(f"wrote {output} ({name}, {sum(p.numel() for p in module.parameters()):,} parameters)")


def _parse_overrides(pairs) -> dict[str, str]:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got '{pair}'")
        values[key.strip()] = value.strip()
    return values


# ---------------------------------------------------------------------------------------------------- export
EXPORTER = click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto",
                        show_default=True,
                        help="torch.onnx exporter; auto: dynamo, or TorchScript (said in one line) where dynamo fails.")
TASK = click.option("--task", type=click.Choice(["base", "sequence-classification", "token-classification",
                                                 "masked-lm", "question-answering", "image-classification"]),
                    help="Hugging Face folders: the head to load [default: from config.architectures].")
STATIC = click.option("--static", is_flag=True, help="Fix every axis to the example shape (no dynamic axes).")


@cli.command("export")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="ONNX file to write.")
@EXPORTER
@STATIC
@TASK
def export_cmd(model, output, exporter, static, task):
    """Export MODEL to a reference ONNX graph of standard ops.

    MODEL is a zoo checkpoint (.pt), a torch.export program (.pt2) or a Hugging Face model folder."""
    from . import api
    from .loading import load_model

    loaded = load_model(model, task=task)
    notes: list[str] = []
    graph = api.export(loaded.module, loaded.example_inputs(), output, exporter=exporter,
                       dynamic_axes=None if static else loaded.dynamic_axes,
                       probe_shapes=_probe_shapes(loaded, static), output_names=loaded.output_names, notes=notes,
                       prefer=loaded.exporter_hint)
    for note in notes:
        click.echo(f"export: {note}")
    click.echo(f"wrote {output} ({len(graph.graph.node)} nodes)")


def _probe_shapes(loaded, static: bool):
    return [{n: list(t.shape) for n, t in inputs.items()} for _, inputs in loaded.parity_inputs(static)]


# ---------------------------------------------------------------------------------------------------- fuse
@cli.command("fuse")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Fused ONNX file to write.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the fusion report as JSON.")
@click.option("--strict", is_flag=True, help="Exit 1 when any attention layer is not fused.")
def fuse_cmd(model, output, report_path, strict):
    """Fuse the attention of any ONNX graph into attn-export custom ops and report every attention layer."""
    from . import api
    from .atomic import write_json
    from .report import console, fusion_table

    _, report = api.fuse(model, output)
    console.print(fusion_table(report))
    if report_path:
        write_json(report_path, report.as_dict())
    click.echo(f"wrote {output}")
    if strict and not report.all_fused:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------------- check
@cli.command("check")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--onnx", "graphs", multiple=True, type=click.Path(path_type=Path),
              help="A graph to check against the torch model (repeatable).")
@click.option("--atol", type=float, help="Absolute tolerance (default: by dtype, 1e-4 for float32).")
@click.option("--rtol", type=float, help="Relative tolerance (default: by dtype, 1e-3 for float32).")
@click.option("--seq-len", "seq_lens", multiple=True, type=click.IntRange(min=1),
              help="Sequence length(s) to check at (default: the model's parity lengths).")
@TASK
def check_cmd(models, graphs, atol, rtol, seq_lens, task):
    """Compare outputs: a torch model against each --onnx graph, or ONNX graphs against the first one.

    \b
      attn-export check model.pt --onnx model.onnx --onnx model.fused.onnx
      attn-export check a.onnx b.onnx
    The torch model is a zoo checkpoint (.pt), a torch.export program (.pt2) or a Hugging Face model folder.
    An element fails when both its absolute and relative errors exceed the tolerances. Exit 1 on failure.
    """
    from . import api
    from .backends import OnnxRuntimeRunner, TorchRunner
    from .export import load_onnx
    from .passes.probe import probe_shapes, random_inputs
    from .report import console, parity_table

    if models[0].suffix != ".onnx":  # a zoo checkpoint, a .pt2 or a Hugging Face folder
        if len(models) > 1:
            raise UserError("give one torch model; pass graphs with --onnx")
        if not graphs:
            raise UserError("nothing to compare: pass one or more graphs with --onnx")
        from .loading import load_model

        loaded = load_model(models[0], task=task)
        sets = ([(f"seq_len={n}", loaded.example_inputs(seq_len=n)) for n in seq_lens] if seq_lens
                else loaded.parity_inputs(static=not loaded.dynamic_axes))
        feeds = [(label, {k: v.numpy() for k, v in inputs.items()}) for label, inputs in sets]
        reference = TorchRunner(loaded.module, str(models[0]), loaded.input_names, output_names=loaded.output_names)
        candidates = [OnnxRuntimeRunner(load_onnx(g), str(g)) for g in graphs]
    else:
        if len(models) + len(graphs) < 2:
            raise UserError("give two or more ONNX graphs to compare")
        paths = list(models) + list(graphs)
        first = load_onnx(paths[0])
        reference = OnnxRuntimeRunner(first, str(paths[0]))
        candidates = [OnnxRuntimeRunner(load_onnx(p), str(p)) for p in paths[1:]]
        shape_sets = probe_shapes(first)
        if seq_lens:
            shape_sets = [{k: [s[0], n, *s[2:]] if len(s) > 1 else s for k, s in shape_sets[0].items()}
                          for n in seq_lens]
        feeds = [("random " + ",".join(f"{k}={'x'.join(map(str, s))}" for k, s in shapes.items()),
                  random_inputs(first, shapes, seed=i)) for i, shapes in enumerate(shape_sets)]
    results = api.check(reference, candidates, feeds, atol=atol, rtol=rtol)
    console.print(parity_table(results))
    if not all(r.passed for r in results):
        sys.exit(1)


# ---------------------------------------------------------------------------------------------------- build
@cli.command("build")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("out"),
              show_default=True, help="Folder for model.onnx, model.fused.onnx, report.json (and model.plan).")
@EXPORTER
@STATIC
@click.option("--atol", type=float, help="Absolute parity tolerance (default: by dtype).")
@click.option("--rtol", type=float, help="Relative parity tolerance (default: by dtype).")
@click.option("--strict", is_flag=True, help="Exit 1 when any attention layer is not fused or any parity check fails.")
@click.option("--no-engine", is_flag=True, help="Skip the TensorRT engine even where TensorRT exists.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Engine precision (TensorRT 11 follows the graph's own types instead).")
@click.option("--min-shapes", multiple=True, metavar="NAME:DIMS,...",
              help="Optimization profile minimum, trtexec style: input_ids:1x128 (repeatable).")
@click.option("--opt-shapes", multiple=True, metavar="NAME:DIMS,...",
              help="The shapes TensorRT optimizes for (alone: a fixed shape).")
@click.option("--max-shapes", multiple=True, metavar="NAME:DIMS,...", help="Optimization profile maximum.")
@click.option("--seq-lens", "seq_len_buckets", metavar="N,N,...",
              help="Sequence-length buckets, one optimization profile each (e.g. 128,512,2048).")
@TASK
def build_cmd(model, out_dir, exporter, static, atol, rtol, strict, no_engine, precision, min_shapes, opt_shapes,
              max_shapes, seq_len_buckets, task):
    """Export, fuse, check parity and (where TensorRT and a GPU exist) build an engine and check its parity,
    all in one go. Without profile options the engine's profile spans the parity lengths.

    \b
    MODEL is a zoo checkpoint (.pt), a torch.export program (.pt2) or a Hugging Face model folder:
      attn-export build ./my-bert -o out/"""
    from . import api
    from .backends.tensorrt_profiles import ProfileRequest
    from .loading import load_model
    from .report import console, fusion_table, parity_table

    loaded = load_model(model, task=task)
    profiles = ProfileRequest.from_options(min_shapes, opt_shapes, max_shapes, seq_len_buckets,
                                           batch=getattr(loaded, "example_batch", None) or 1)
    parity_inputs = loaded.parity_inputs(static)
    with console.status("building") as status:
        result = api.build(loaded.module, loaded.example_inputs(), out_dir,
                           dynamic_axes=None if static else loaded.dynamic_axes, parity_inputs=parity_inputs,
                           exporter=exporter, atol=atol, rtol=rtol, engine=not no_engine, precision=precision,
                           profiles=None if profiles.empty else profiles, output_names=loaded.output_names,
                           prefer_exporter=loaded.exporter_hint, progress=lambda message: status.update(message))
    for note in result.notes:
        click.echo(f"export: {note}")
    console.print(fusion_table(result.fusion))
    console.print(parity_table(result.parity))
    engine = result.engine
    if engine["path"]:
        click.echo(f"engine: {engine['path']} ({engine['precision']}, {len(engine['profiles'])} optimization "
                   f"profile(s), manifest {engine['manifest']})")
        for note in (engine.get("parity_note"), engine.get("reason")):
            if note:
                click.echo(f"engine: {note}")
    else:
        click.echo(f"engine: not built: {engine['reason']}")
    click.echo(f"wrote {out_dir}/: model.onnx, model.fused.onnx (TensorRT), model.fused.portable.onnx "
               "(onnxruntime, Triton), parity.npz, report.json")
    if strict and not result.ok:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------------- bench
def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise UserError(f"{option} takes positive integers, got '{text}'")
    return values


@cli.command("bench")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--backends", default="torch,onnxruntime", show_default=True,
              help="Comma-separated: torch (eager), onnxruntime (reference and fused graphs), tensorrt (engine).")
@click.option("--seq-lens", help="Comma-separated lengths [default: 1024,4096 where the model allows them].")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="fp16/bf16 need a GPU (torch eager, tensorrt).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed calls before timing.")
@click.option("--iters", type=int, default=20, show_default=True, help="Timed calls per backend and length.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the records as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG of median latency against sequence length.")
@TASK
def bench_cmd(model, backends, seq_lens, batch, dtype, device, warmup, iters, json_path, plot_path, task):
    """Time MODEL on each backend at each sequence length: latency min/mean/median/p90/p95/p99, throughput, memory.
    MODEL is a zoo checkpoint (.pt), a torch.export program (.pt2) or a Hugging Face model folder.

    \b
      attn-export bench model.pt --backends torch,onnxruntime --seq-lens 1024,4096 --json bench.json --plot bench.png
    On CUDA, torch and TensorRT are timed with inputs already on the GPU (trtexec: GPU Compute Time, no transfers);
    onnxruntime takes host arrays (copies included). CUDA graphs are not used.
    """
    import tempfile

    from rich.progress import Progress

    from . import api, bench
    from .atomic import write_json
    from .loading import load_model
    from .report import bench_table, console

    backend_names = [b.strip() for b in backends.split(",") if b.strip()]
    if batch < 1 or warmup < 0 or iters < 1:
        raise UserError("--batch and --iters must be at least 1, --warmup at least 0")
    device = bench.resolve_device(device)
    bench.check_request(backend_names, dtype, device)
    loaded = load_model(model, task=task)
    lengths = _int_list(seq_lens, "--seq-lens")
    if lengths is None:
        lengths = [n for n in (1024, 4096) if loaded.seq_axis_dynamic and _allowed(loaded, n)] or \
            [loaded.example_seq_len]
    for n in lengths:
        loaded.check_seq_len(n)
    if not loaded.seq_axis_dynamic and lengths != [loaded.example_seq_len]:
        raise UserError(f"{model}: the sequence axis is fixed at {loaded.example_seq_len}; bench that length only")

    def inputs_for(n):
        return {k: v.numpy() for k, v in loaded.example_inputs(seq_len=n, batch=batch).items()}

    with tempfile.TemporaryDirectory(prefix="attn-export-bench-") as workdir, Progress(console=console) as progress:
        task = progress.add_task("preparing", total=None)
        cases = []
        if "torch" in backend_names:
            cases.append(bench.torch_case(loaded.module, loaded.input_names, device, dtype))
        if "onnxruntime" in backend_names or "tensorrt" in backend_names:
            progress.update(task, description="exporting and fusing")
            reference = api.export_auto(loaded.module, loaded.example_inputs(),  # in memory: nothing to keep
                                        dynamic_axes=loaded.dynamic_axes or None, output_names=loaded.output_names,
                                        probe_shapes=_probe_shapes(loaded, False), prefer=loaded.exporter_hint)
            fused, _ = api.fuse(reference)
            if "onnxruntime" in backend_names:
                cases += [bench.onnxruntime_case(reference, "model.onnx", device),
                          bench.onnxruntime_case(fused, "model.fused.onnx", device)]
            if "tensorrt" in backend_names:
                progress.update(task, description="building the TensorRT engine")
                shapes = [{k: tuple(v.shape) for k, v in inputs_for(n).items()} for n in lengths]
                cases += bench.tensorrt_cases(fused, workdir, shapes, dtype)
        progress.update(task, total=len(cases) * len(lengths))
        records = bench.run_benchmark(cases, inputs_for, lengths, batch, dtype, warmup, iters,
                                      started=lambda label: progress.update(task, description=label),
                                      finished=lambda: progress.advance(task))
        progress.update(task, description="done")
    console.print(bench_table(records))
    title = f"{loaded.arch or model.name}, batch {batch}, {dtype}, {device}"
    if json_path:
        write_json(json_path, {"model": str(model), "records": [r.as_dict() for r in records]})
        click.echo(f"wrote {json_path}")
    if plot_path:
        bench.write_plot(records, plot_path, title)
        click.echo(f"wrote {plot_path}")


def _allowed(loaded, seq_len: int) -> bool:
    try:
        loaded.check_seq_len(seq_len)
    except UserError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------- plugins
@cli.group()
def plugins():
    """The TensorRT plugin library (plugins_trt/)."""


@plugins.command("build")
@click.option("--tensorrt-root", type=click.Path(file_okay=False, path_type=Path),
              help="TensorRT folder holding include/NvInfer.h and lib/libnvinfer.so [default: CMake's search].")
@click.option("--cuda-archs", metavar="SM;SM;...", help="CUDA architectures, e.g. '80;87;90' [default: 80;87;90].")
@click.option("-o", "--build-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="CMake build folder [default: plugins_trt/build, where attn-export looks for the library].")
@click.option("-j", "--jobs", type=int, default=None, help="Parallel compile jobs [default: 2].")
@click.option("--kernels-only", is_flag=True, help="Build the CUDA kernels even when TensorRT is not found.")
def plugins_build_cmd(tensorrt_root, cuda_archs, build_dir, jobs, kernels_only):
    """Configure and build plugins_trt/ with CMake and print the plugin library's path.

    \b
      attn-export plugins build --tensorrt-root /usr/src/tensorrt --cuda-archs 87
    Exit 2 with one line when CMake, nvcc or TensorRT is missing or the build fails (log in the build folder).
    """
    from rich.progress import BarColumn, Progress, TextColumn

    from . import plugins_build
    from .report import console

    archs = plugins_build.parse_archs(cuda_archs)
    build_dir = build_dir or plugins_build.DEFAULT_BUILD_DIR
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  console=console, transient=True) as progress:
        task = progress.add_task("configuring", total=100)

        def on_line(line: str) -> None:
            done = plugins_build.progress_of(line)
            if done is not None:
                progress.update(task, completed=done, description="building")

        outcome = plugins_build.build_plugins(build_dir=build_dir, tensorrt_root=tensorrt_root, cuda_archs=archs,
                                              jobs=jobs or plugins_build.default_jobs(), kernels_only=kernels_only,
                                              on_line=on_line)
    if outcome.plugin_library is None:
        click.echo(f"built {outcome.kernel_library} (kernels only: TensorRT not found, no plugin library)")
    else:
        click.echo(str(outcome.plugin_library))


# ---------------------------------------------------------------------------------------------------- deploy
@cli.command("deploy")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--triton-repo", "repo", type=click.Path(path_type=Path), required=True,
              help="Triton model repository to write (created, or models added to an existing one).")
@click.option("--name", help="Model name prefix: NAME_onnxruntime, NAME_tensorrt [default: OUT_DIR's name].")
@click.option("--max-batch-size", type=int, default=0, show_default=True,
              help="Triton max_batch_size; > 0 needs a dynamic batch axis (dims then leave it out).")
@click.option("--instances", type=int, default=1, show_default=True,
              help="Model instances (per optimization profile for the engine).")
def deploy_cmd(out_dir, repo, name, max_batch_size, instances):
    """Write a Triton model repository from a build folder: the portable fused graph as an onnxruntime_onnx
    model, and the engine as a tensorrt_plan model where the build made one (with its plugin library copied
    beside the repository and the launch line that loads it). Needs the serve extra.

    \b
      attn-export deploy out/ --triton-repo models/ --name bigbird
    """
    from .deploy.repository import deploy

    result = deploy(out_dir, repo, name=name, max_batch_size=max_batch_size, instances=instances)
    for model, platform in result.models.items():
        click.echo(f"wrote {result.repository / model} ({platform})")
    for model, why in result.skipped.items():
        click.echo(f"skipped {model}: {why}")
    if result.plugin_library:
        click.echo(f"plugin library: {result.plugin_library}")
    click.echo("launch (configs checked with Triton's protobuf):")
    for line in result.launch:
        click.echo(f"  {line}")


@cli.command("serve")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--name", default="model", show_default=True, help="Model name clients ask for.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address HTTP and gRPC listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="HTTP port; gRPC listens on PORT+1.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt needs a Triton server with the TensorRT backend (use deploy's launch line).")
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances.")
@click.option("--max-batch-size", type=int, default=0, show_default=True, help="As for deploy.")
def serve_cmd(out_dir, name, host, port, backend, instances, max_batch_size):
    """Serve a build folder's portable fused graph with a real Triton Inference Server (nvidia-pytriton's
    tritonserver; its Python backend runs the graph on onnxruntime) over HTTP/REST and gRPC until Ctrl-C or
    SIGTERM, which stop the server and every process it started.

    \b
      attn-export serve out/ --name bigbird --port 8000
    """
    from .deploy.server import TritonServer, serve_forever

    def ready(server):
        click.echo(f"serving '{name}' ({server.served_by}): HTTP {server.http_url}, gRPC {server.grpc_url}; "
                   "Ctrl-C stops")

    server = TritonServer(out_dir, name=name, host=host, port=port, backend=backend, instances=instances,
                          max_batch_size=max_batch_size)
    serve_forever(server, ready)
    click.echo("stopped")


# ---------------------------------------------------------------------------------------------------- engine
@cli.command("engine")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--plugin-library", type=click.Path(dir_okay=False, path_type=Path),
              help="libattn_export_plugins.so [default: $ATTN_EXPORT_PLUGIN_LIB, else plugins_trt/build].")
@click.option("-o", "--output", "engine_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Engine to write [default: OUT_DIR/model.plan].")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--onnxruntime", is_flag=True, help="Also run the portable graph on onnxruntime against parity.npz.")
@click.option("--atol", type=float, help="Absolute parity tolerance (default: by precision).")
@click.option("--rtol", type=float, help="Relative parity tolerance (default: by precision).")
def engine_cmd(out_dir, plugin_library, engine_path, precision, onnxruntime, atol, rtol):
    """Build the TensorRT engine from a build folder's model.fused.onnx on this device and check it against
    the inputs and torch outputs `build` saved (parity.npz). Imports no torch: for edge devices (Jetson).
    Exit 1 when a check fails, 2 when TensorRT, a GPU or the folder's files are missing.

    \b
      attn-export engine out/ --plugin-library ./libattn_export_plugins.so
    """
    from .edge import EDGE_REPORT, build_and_check

    def show(checks):
        for check in checks:
            for c in check.comparisons:
                verdict = "pass" if c.passed else f"FAIL {c.reason}"
                click.echo(f"{check.runner} [{check.inputs}] {c.name}: max abs err {c.max_abs_err:.2g} "
                           f"(atol {c.atol:g}, rtol {c.rtol:g}) {verdict}")

    result = build_and_check(out_dir, engine_path=engine_path, plugin_library=plugin_library, precision=precision,
                             onnxruntime=onnxruntime, atol=atol, rtol=rtol, on_checks=show)
    click.echo(f"engine: {result.engine}; report {out_dir / EDGE_REPORT}")
    if not result.passed:
        sys.exit(1)


@plugins.command("check")
@click.argument("graph", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Engine precision: the element types the plugins are offered.")
@click.option("--min-shapes", multiple=True, metavar="NAME:DIMS,...", help="Profile minimum (trtexec style).")
@click.option("--opt-shapes", multiple=True, metavar="NAME:DIMS,...",
              help="Profile optimum [default: the shapes recorded at export, spanned per dimension].")
@click.option("--max-shapes", multiple=True, metavar="NAME:DIMS,...", help="Profile maximum.")
def plugins_check_cmd(graph, precision, min_shapes, opt_shapes, max_shapes):
    """Run the plugin library's own C++ rules on every custom node of a fused graph, as TensorRT's parser and
    builder would: fields, output shapes over the profile, formats at PRECISION, shape checks, launch limits.

    \b
      attn-export plugins check out/model.fused.onnx --precision fp16
    Needs a C++ compiler, not TensorRT or a GPU. Exit 0 when every node is accepted, 1 with one line per refused
    node, 2 when the graph is bad or the rules cannot be run.
    """
    from .plugin_check import check_file

    results = check_file(graph, precision, min_shapes=min_shapes, opt_shapes=opt_shapes, max_shapes=max_shapes)
    refused = [r for r in results if not r.accepted]
    for r in refused:
        click.echo(f"refused {r.name} ({r.op_type}): {r.detail}")
    click.echo(f"{len(results) - len(refused)} of {len(results)} plugin nodes accepted at {precision}")
    if refused:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------------- doctor
@cli.command("doctor")
@click.option("--require", "required", multiple=True, type=click.Choice(["tensorrt", "cuda", "plugins"]),
              help="Exit 1 unless this piece works here (repeatable).")
def doctor_cmd(required):
    """The environment on one screen: torch, onnxruntime and its providers, TensorRT, CUDA and the GPU, the
    plugin library and the creators it registers. Exit 1 when torch, onnx or onnxruntime is broken, or when a
    piece named with --require does not work."""
    from .doctor import diagnose, report_lines, unmet

    findings = diagnose()
    for line in report_lines(findings, tuple(required)):
        click.echo(line)
    if unmet(findings, tuple(required)):
        sys.exit(1)


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="attn-export", standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # bad usage: one line, like every other user error
        hint = f" (see 'attn-export {e.ctx.command_path.split(' ', 1)[-1]} --help')" if getattr(e, "ctx", None) else ""
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(0)


if __name__ == "__main__":
    main()
