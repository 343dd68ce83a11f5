"""Hugging Face model folders (save_pretrained: config.json + model.safetensors), through transformers (the `hf`
extra). Nothing from the folder runs as code:

- config.json is read as JSON; a config with `auto_map` (a model that needs its own code, trust_remote_code) is
  refused, and model_type must name a class transformers itself ships;
- weights come from safetensors when the folder has them, a pytorch_model.bin only through weights-only loading;
- before any real weight is allocated, the model is built on the meta device under a memory budget set by the
  weights file's size, so a config that asks for far more than its weights hold is refused first.

The model class comes from config.architectures (or --task), the module is in eval mode with eager attention, and
its outputs are the model's own named tensors (last_hidden_state, logits, ...).
"""
from __future__ import annotations

import inspect
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from attn_export.errors import UserError, one_line

from .common import BUILD_SLACK_BYTES, EXAMPLE_SEED, AllocationBudget, LoadedModel, LoadError, OverBudget, few

# --task values (optimum's names) -> the transformers auto-mapping holding each model type's class for it
TASKS = {
    "base": "MODEL_MAPPING_NAMES",
    "sequence-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token-classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "question-answering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}
# how config.architectures names a class for each task (BertForMaskedLM -> masked-lm, ViTModel -> base)
_ARCH_SUFFIXES = {
    "ForSequenceClassification": "sequence-classification",
    "ForTokenClassification": "token-classification",
    "ForMaskedLM": "masked-lm",
    "ForQuestionAnswering": "question-answering",
    "ForImageClassification": "image-classification",
    "Model": "base",
}
MAX_CONFIG_BYTES = 4 << 20  # config.json is a few KB; anything this large is not a config
EXAMPLE_BATCH = 2  # two rows, so that one can be padded
SHORTEST_PARITY_LEN = 8


def load_hf_folder(folder: Path, task: str | None) -> LoadedModel:
    transformers = _import_transformers()
    with _quiet_transformers():
        return _load(transformers, folder, task)


def _load(transformers, folder: Path, task: str | None) -> LoadedModel:
    values = _read_config(folder)
    config = _make_config(transformers, values)
    task, cls = _model_class(transformers, config, values, task)
    weights = _weight_files(folder)
    _check_budget(cls, config, weights)
    model = _from_pretrained(cls, folder, config, weights, task)
    model.eval()
    inputs = _input_spec(model, config)
    wrapper = (ImageModelOutputs if isinstance(inputs, ImageInputs) else TextModelOutputs)(model, inputs.names)
    attention_types = _attention_types(model)
    with torch.no_grad():
        example = inputs.make(inputs.example_seq_len, EXAMPLE_BATCH)
        try:
            wrapper.output_names = wrapper.named_outputs(*example.values())
        except Exception as e:  # a model that cannot run on its own config's inputs
            raise LoadError(f"the model fails on example inputs {_shapes(example)}: {one_line(e)[:200]}") from None
    if _attention_types(model) != attention_types:  # BigBird switches itself to full attention, for good
        raise LoadError(f"the model changed its attention from {sorted(attention_types)} to "
                        f"{sorted(_attention_types(model))} at example inputs {_shapes(example)}")
    return LoadedModel(module=wrapper, arch=cls.__name__, config=config, entry=None, source=folder,
                       input_names=list(inputs.names), dynamic_axes=inputs.dynamic_axes(), example_batch=EXAMPLE_BATCH,
                       example_seq_len=inputs.example_seq_len, spec=inputs, output_names=list(wrapper.output_names),
                       exporter_hint=_exporter_hint(config))


def _attention_types(model) -> set[str]:
    """The attention kinds a model's modules say they use (BigBird: block_sparse or original_full)."""
    return {str(m.attention_type) for m in model.modules() if isinstance(getattr(m, "attention_type", None), str)}


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise LoadError("a Hugging Face model folder needs transformers: pip install 'attn-export[hf]'") from None
    return transformers


# --------------------------------------------------------------------------------------------------------------
# config and class
# --------------------------------------------------------------------------------------------------------------

def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise LoadError(f"config.json is {path.stat().st_size:,} bytes: not a model config")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"config.json is not valid JSON ({one_line(e)[:120]})") from None
    if not isinstance(values, dict):
        raise LoadError("config.json does not hold a JSON object")
    if "auto_map" in values:
        raise LoadError("refusing to load: config.json has auto_map, so the model needs Python code from its "
                        "folder (trust_remote_code); attn-export never runs code from a model folder")
    return values


def _make_config(transformers, values: dict):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = values.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise LoadError(f"unknown model_type {model_type!r} in config.json (transformers "
                        f"{transformers.__version__} has no such model)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return CONFIG_MAPPING[model_type].from_dict(values)
    except Exception as e:  # a value the config class rejects
        raise LoadError(f"invalid {model_type} config: {one_line(e)[:200]}") from None


def _model_class(transformers, config, values: dict, task: str | None):
    """(task, class): the task --task names, or the one config.architectures' class name says."""
    from transformers.models.auto import modeling_auto

    model_type = config.model_type
    if task is None:
        architectures = values.get("architectures") or []
        name = architectures[0] if architectures and isinstance(architectures[0], str) else None
        if name is None:
            task = "base"
        else:
            task = next((t for suffix, t in _ARCH_SUFFIXES.items() if name.endswith(suffix)), None)
            if task is None:
                raise LoadError(f"config.architectures names {name}, a head attn-export does not export; pass "
                                f"--task with one of {', '.join(TASKS)}")
    elif task not in TASKS:
        raise LoadError(f"unknown task '{task}' (choose from {', '.join(TASKS)})")
    class_name = getattr(modeling_auto, TASKS[task]).get(model_type)
    if class_name is None:
        raise LoadError(f"{model_type} has no {task} model in transformers {transformers.__version__}"
                        + ("" if task == "base" else "; pass another --task"))
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise LoadError(f"transformers {transformers.__version__} lists {class_name} but cannot import it")
    return task, cls


# --------------------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------------------

@dataclass
class _Weights:
    files: list[Path]
    safetensors: bool

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _weight_files(folder: Path) -> _Weights:
    """The folder's weights: model.safetensors (or its shards) first, else pytorch_model.bin (or its shards)."""
    for name, safe in (("model.safetensors", True), ("pytorch_model.bin", False)):
        if (folder / name).is_file():
            return _Weights([folder / name], safe)
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise LoadError(f"{index.name} is not a weight index (no weight_map)") from None
            bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s]
            if bad:  # a shard outside the folder
                raise LoadError(f"{index.name} names shard files outside the folder: {few(bad)}")
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise LoadError(f"missing weight shards {few(missing)}")
            return _Weights([folder / s for s in shards], safe)
    raise LoadError("no weights in the folder (model.safetensors or pytorch_model.bin)")


def _check_budget(cls, config, weights: _Weights) -> None:
    """Build the model on the meta device (no memory) and refuse it when its parameters and buffers need far more
    bytes than the weights files hold: a damaged or hostile config (hidden_size=10**9 beside a 1 MB file)."""
    held = weights.nbytes
    budget = AllocationBudget(2 * held + BUILD_SLACK_BYTES)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"), budget, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = cls(config)
    except OverBudget:
        raise LoadError(f"the config asks for over {budget.limit / 2**20:,.0f} MiB of parameters and buffers while "
                        f"the weights hold {held / 2**20:,.1f} MiB: config and weights do not match") from None
    except Exception as e:  # a config value the model code rejects
        raise LoadError(f"cannot build {cls.__name__} with this config: {one_line(e)[:200]}") from None
    needed = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    if needed > budget.limit:
        raise LoadError(f"the config asks for {needed / 2**20:,.1f} MiB of parameters and buffers while the weights "
                        f"hold {held / 2**20:,.1f} MiB: config and weights do not match")


def _from_pretrained(cls, folder: Path, config, weights: _Weights, task: str):
    kwargs = dict(config=config, local_files_only=True, trust_remote_code=False, use_safetensors=weights.safetensors,
                  weights_only=True, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = cls.from_pretrained(folder, **kwargs)
    except Exception as e:  # truncated files, mismatched shapes, unreadable pickles: all say what in their text
        text = one_line(e)
        if "mismatch" in text.lower():
            raise LoadError(f"weights do not match the config: {text[:240]}") from None
        raise LoadError(f"cannot read the weights ({type(e).__name__}: {text[:240]})") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if mismatched:
        raise LoadError(f"weights do not match the config: shape of {few(mismatched)}")
    if missing:  # transformers would start these at random: parity would pass and the model be meaningless
        hint = "" if task == "base" else f" (the weights may have no {task} head; try another --task)"
        raise LoadError(f"weights missing from the folder: {few(missing)}{hint}")
    return model


class _quiet_transformers:
    """transformers logs load reports and draws progress bars for its own users; ours see our one line instead.
    Both settings are put back afterwards (an API caller may want them)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.hf_logging, self.bars = hf_logging, hf_logging.is_progress_bar_enabled()
        self.logger = logging.getLogger("transformers")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        if self.bars:
            self.hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------------------------
# the module as exported, and its inputs
# --------------------------------------------------------------------------------------------------------------

class NamedOutputs(torch.nn.Module):
    """The transformers model called with keyword inputs, returning the tensors of its output in the order and
    under the names the model gives them (exporters take positional inputs and return tuples). The subclasses
    spell out forward()'s parameters: torch.export names dynamic shapes by them."""

    def __init__(self, model: torch.nn.Module, input_names: list[str]):
        super().__init__()
        self.model, self.input_names = model, list(input_names)
        self.output_names: list[str] = []
        self.train(model.training)

    def named_outputs(self, *inputs) -> list[str]:
        out = self.model(**dict(zip(self.input_names, inputs)), return_dict=True)
        return [k for k, v in out.items() if isinstance(v, torch.Tensor)]

    def _call(self, **inputs):
        out = self.model(**{k: v for k, v in inputs.items() if v is not None}, return_dict=True)
        return tuple(out[k] for k in self.output_names)


class TextModelOutputs(NamedOutputs):
    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self._call(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


class ImageModelOutputs(NamedOutputs):
    def forward(self, pixel_values):
        return self._call(pixel_values=pixel_values)


def _exporter_hint(config) -> tuple[str, str] | None:
    if config.model_type == "big_bird" and getattr(config, "attention_type", None) == "block_sparse":
        # torch 2.13's dynamo export traces it, then fails decomposing (aten.sub.Tensor) after a long trace
        return "torchscript", "the dynamo exporter fails on HF BigBird's block-sparse attention"
    return None


def _input_spec(model, config):
    params = inspect.signature(model.forward).parameters
    if "input_ids" in params:
        names = ["input_ids"] + [n for n in ("attention_mask", "token_type_ids") if n in params]
        if "token_type_ids" in names and getattr(config, "type_vocab_size", 2) < 1:
            names.remove("token_type_ids")  # DeBERTa-v2 by default: the model ignores them, the graph would drop them
        return TextInputs.for_model(model, config, names)
    if "pixel_values" in params:
        return ImageInputs(int(getattr(config, "num_channels", 3)), _image_size(config))
    raise LoadError(f"{type(model).__name__} takes neither input_ids nor pixel_values; attn-export exports text "
                    "and image models")


def _image_size(config) -> tuple[int, int]:
    size = getattr(config, "image_size", None)
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return int(size[0]), int(size[1])
    raise LoadError(f"config.image_size {size!r} is not a positive size")


def _shapes(inputs: dict) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v.shape))}" for k, v in inputs.items())


@dataclass
class TextInputs:
    """Token inputs at any length the model accepts: at most max_len (absolute position embeddings), a multiple
    of `multiple` and over `longer_than` (BigBird's block-sparse path: shorter inputs, or lengths that are not a
    whole number of blocks, make HF switch the model to full attention for good, or pad inside the model)."""
    names: list[str]
    vocab_size: int
    type_vocab_size: int
    max_len: int | None
    multiple: int = 1
    longer_than: int = 0
    why: str = ""
    # HF BigBird's block-sparse code builds its block tables with numpy from the length, so every exporter
    # specialises the graph to the example's length: only the batch stays dynamic
    fixed_len: bool = False

    @classmethod
    def for_model(cls, model, config, names: list[str]) -> TextInputs:
        max_len = getattr(config, "max_position_embeddings", None)
        spec = cls(names, int(config.vocab_size), int(getattr(config, "type_vocab_size", 0) or 0),
                   max_len if isinstance(max_len, int) and max_len > 0 else None)
        if getattr(config, "attention_type", None) == "block_sparse":  # BigBird
            block, random_blocks = int(config.block_size), int(config.num_random_blocks)
            spec.multiple, spec.longer_than, spec.fixed_len = block, (5 + 2 * random_blocks) * block, True
            spec.why = (f"block_sparse attention with block_size {block} and {random_blocks} random blocks needs a "
                        f"multiple of {block} over {spec.longer_than}")
        if not any(spec.valid(n) for n in range(1, (spec.max_len or spec.longer_than + 2 * spec.multiple) + 1)):
            raise LoadError(f"no sequence length suits this config ({spec.why or 'max_position_embeddings'})")
        return spec

    def valid(self, n: int) -> bool:
        return (n >= 1 and n % self.multiple == 0 and n > self.longer_than
                and (self.max_len is None or n <= self.max_len))

    def check_seq_len(self, seq_len: int | None) -> None:
        if seq_len is None or self.valid(seq_len):
            return
        if self.max_len is not None and seq_len > self.max_len:
            raise UserError(f"sequence length {seq_len} is over the model's max_position_embeddings {self.max_len}")
        if seq_len < 1:
            raise UserError(f"sequence length must be at least 1, got {seq_len}")
        raise UserError(f"sequence length {seq_len} is not possible: {self.why}")

    def _next_valid(self, n: int) -> int | None:
        n = max(n, self.longer_than + 1)
        n += -n % self.multiple
        return n if self.valid(n) else None

    @property
    def example_seq_len(self) -> int:
        return self._next_valid(SHORTEST_PARITY_LEN) or next(n for n in range(self.max_len, 0, -1) if self.valid(n))

    def parity_seq_lens(self) -> list[int]:
        first = self.example_seq_len
        if self.fixed_len:
            return [first]
        second = self._next_valid(first + max(self.multiple, SHORTEST_PARITY_LEN))
        return [first] if second is None else [first, second]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: "batch"} if self.fixed_len else {0: "batch", 1: "seq"} for name in self.names}

    def make(self, seq_len: int | None, batch: int) -> dict[str, torch.Tensor]:
        """Random token ids; the last row (of two or more) padded over its last quarter in attention_mask;
        token_type_ids 0 over the first half, 1 after (a sentence pair) when the model has two types."""
        seq_len = self.example_seq_len if seq_len is None else seq_len
        self.check_seq_len(seq_len)
        generator = torch.Generator().manual_seed(EXAMPLE_SEED)
        inputs = {"input_ids": torch.randint(0, self.vocab_size, (batch, seq_len), generator=generator)}
        if "attention_mask" in self.names:
            mask = torch.ones(batch, seq_len, dtype=torch.int64)
            if batch > 1 and seq_len > 1:
                mask[-1, seq_len - max(1, seq_len // 4):] = 0
            inputs["attention_mask"] = mask
        if "token_type_ids" in self.names:
            types = torch.zeros(batch, seq_len, dtype=torch.int64)
            if self.type_vocab_size > 1:
                types[:, seq_len // 2:] = 1
            inputs["token_type_ids"] = types
        return {name: inputs[name] for name in self.names}


@dataclass
class ImageInputs:
    """pixel_values at the model's own image size; only the batch is dynamic."""
    channels: int
    size: tuple[int, int]
    names: tuple[str, ...] = ("pixel_values",)
    example_seq_len = None

    def check_seq_len(self, seq_len: int | None) -> None:
        if seq_len is not None:
            raise UserError(f"the model takes {self.channels}x{self.size[0]}x{self.size[1]} images: it has no "
                            "sequence length")

    def parity_seq_lens(self) -> list[int]:
        return []

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"pixel_values": {0: "batch"}}

    def make(self, seq_len: int | None, batch: int) -> dict[str, torch.Tensor]:
        self.check_seq_len(seq_len)
        generator = torch.Generator().manual_seed(EXAMPLE_SEED)
        return {"pixel_values": torch.randn(batch, self.channels, *self.size, generator=generator)}
