"""Model loading: zoo checkpoints and torch.export programs round-trip; everything else is refused in one line that
names the file, and nothing in a hostile file gets to run (the .pt2 security checks: test_pt2_vetting.py)."""
import dataclasses
import io
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from attn_export.errors import UserError
from attn_export.loading import REFUSED_PICKLE, load_model, save_zoo_checkpoint
from models import registry
from pt2_programs import Tagger, WritesMarker, export_tagger

ARCH = "tiny-test"


@dataclass
class TinyConfig:
    vocab_size: int = 32
    hidden: int = 8
    block_size: int = 4

    def __post_init__(self):
        if self.hidden < 1:
            raise ValueError(f"hidden must be at least 1, got {self.hidden}")


class Tiny(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.hidden)
        self.proj = nn.Linear(config.hidden, 3)
        self.drop = nn.Dropout(0.5)  # must be off after loading (eval mode)

    def forward(self, input_ids):
        return self.proj(self.drop(self.embed(input_ids))).mean(1)


def tiny_seq_len_rule(config: TinyConfig, seq_len: int) -> None:
    if seq_len % config.block_size:
        raise ValueError(f"tiny needs a multiple of {config.block_size}, got {seq_len}")


TINY = registry.ZooEntry(
    name=ARCH, paper="test only", complexity="O(N)", constraints="multiple of block_size",
    config_cls=TinyConfig, build=Tiny,
    example_inputs=lambda c, batch, seq_len: {"input_ids": torch.randint(0, c.vocab_size, (batch, seq_len))},
    dynamic_axes={"input_ids": {0: "batch", 1: "seq"}},
    seq_len_rule=tiny_seq_len_rule,
    parity_seq_lens=lambda c: [8, 16],
)


@pytest.fixture(autouse=True)
def tiny_entry(monkeypatch):
    import models  # noqa: F401  (register the real zoo first, as registry.get does)

    monkeypatch.setitem(registry.ZOO, ARCH, TINY)


def tiny_checkpoint(path, config=None, state_dict=None, batch=2, seq_len=8):
    config = config or TinyConfig()
    torch.manual_seed(0)
    model = Tiny(config)
    save_zoo_checkpoint(path, ARCH, config, state_dict if state_dict is not None else model.state_dict(),
                        batch=batch, seq_len=seq_len)
    return model


def raw_checkpoint(**overrides):
    torch.manual_seed(0)
    payload = {"format": "attn-export/zoo-checkpoint", "format_version": 1, "arch": ARCH,
               "config": {"vocab_size": 32, "hidden": 8, "block_size": 4},
               "example": {"batch": 2, "seq_len": 8}, "state_dict": Tiny(TinyConfig()).state_dict()}
    payload.update(overrides)
    return payload


# ---------------------------------------------------------------------------------------------------- zoo

def test_zoo_round_trip(tmp_path):
    path = tmp_path / "model.pt"
    model = tiny_checkpoint(path).eval()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left behind

    loaded = load_model(path)
    assert loaded.arch == ARCH and loaded.entry is TINY and loaded.source == path
    assert loaded.config == TinyConfig()
    assert loaded.exported_program is None
    assert not loaded.module.training
    assert loaded.input_names == ["input_ids"]
    assert loaded.dynamic_axes == {"input_ids": {0: "batch", 1: "seq"}}
    assert (loaded.example_batch, loaded.example_seq_len) == (2, 8)
    assert loaded.parity_seq_lens() == [8, 16]
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[name], tensor)

    inputs = loaded.example_inputs()
    assert inputs["input_ids"].shape == (2, 8)
    with torch.no_grad():
        assert torch.equal(loaded.module(*inputs.values()), model(*inputs.values()))


def test_zoo_example_inputs_are_deterministic_and_leave_global_rng_alone(tmp_path):
    tiny_checkpoint(tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = loaded.example_inputs(seq_len=16, batch=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = loaded.example_inputs(seq_len=16, batch=3)
    assert first["input_ids"].shape == (3, 16)
    assert torch.equal(first["input_ids"], second["input_ids"])


def test_zoo_length_rule_names_the_file(tmp_path):
    tiny_checkpoint(tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    with pytest.raises(UserError) as info:
        loaded.example_inputs(seq_len=10)
    assert str(info.value) == f"{tmp_path / 'model.pt'}: tiny needs a multiple of 4, got 10"


# ------------------------------------------------------------------------------------ refused inputs

def make_missing(path):
    pass


def make_directory(path):
    path.mkdir()


def make_empty(path):
    path.write_bytes(b"")


def make_random(path):
    path.write_bytes(b"\x00" + np.random.default_rng(0).bytes(4095))


def make_text(path):
    path.write_text("hello, I am not a model\n")


def make_truncated(path):
    tiny_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_truncated_legacy(path):
    buffer = io.BytesIO()
    torch.save(raw_checkpoint(), buffer, _use_new_zipfile_serialization=False)
    path.write_bytes(buffer.getvalue()[:300])


def make_unrelated_zip(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")


def make_bare_code_pickle(path):
    path.write_bytes(pickle.dumps({"state_dict": WritesMarker(path.with_suffix(".marker"))}))


def make_torch_zip_code_pickle(path):
    torch.save(raw_checkpoint(config=WritesMarker(path.with_suffix(".marker"))), path)


def make_torch_legacy_code_pickle(path):
    torch.save({"x": WritesMarker(path.with_suffix(".marker"))}, path, _use_new_zipfile_serialization=False)


def make_pickled_module(path):
    torch.save(nn.Linear(2, 2), path)


def make_wrong_format(path):
    torch.save(raw_checkpoint(format="someone-else/checkpoint"), path)


def make_plain_state_dict(path):
    torch.save(Tiny(TinyConfig()).state_dict(), path)


def make_bare_tensor(path):
    torch.save(torch.zeros(3), path)


def make_future_version(path):
    torch.save(raw_checkpoint(format_version=2), path)


def make_unknown_arch(path):
    torch.save(raw_checkpoint(arch="no-such-arch"), path)


def make_bad_config_value(path):
    torch.save(raw_checkpoint(config={"hidden": 0}), path)


def make_unknown_config_field(path):
    torch.save(raw_checkpoint(config={"depth": 3}), path)


def make_bad_example(path):
    torch.save(raw_checkpoint(example={"batch": 2}), path)


def make_bad_example_length(path):
    torch.save(raw_checkpoint(example={"batch": 2, "seq_len": 10}), path)


def make_huge_example_batch(path):
    torch.save(raw_checkpoint(example={"batch": 10**9, "seq_len": 8}), path)


def make_config_far_bigger_than_weights(path):
    torch.save(raw_checkpoint(config={"hidden": 10**7}), path)


def make_missing_weight(path):
    state = Tiny(TinyConfig()).state_dict()
    del state["proj.bias"]
    tiny_checkpoint(path, state_dict=state)


def make_extra_weight(path):
    state = Tiny(TinyConfig()).state_dict()
    state["head.weight"] = torch.zeros(1)
    tiny_checkpoint(path, state_dict=state)


def make_wrong_shape(path):
    tiny_checkpoint(path, state_dict=Tiny(TinyConfig(vocab_size=16)).state_dict())


BAD_FILES = [
    (make_missing, "no such file"),
    (make_directory, "no config.json"),
    (make_empty, "empty file"),
    (make_random, "not a model file: neither a zip archive nor a pickle"),
    (make_text, "not a model file: neither a zip archive nor a pickle"),
    (make_truncated, "truncated or corrupt"),
    (make_truncated_legacy, "truncated or corrupt checkpoint"),
    (make_unrelated_zip, "truncated or corrupt checkpoint"),
    (make_bare_code_pickle, REFUSED_PICKLE),
    (make_torch_zip_code_pickle, REFUSED_PICKLE),
    (make_torch_legacy_code_pickle, REFUSED_PICKLE),
    (make_pickled_module, REFUSED_PICKLE),
    (make_wrong_format, "not an attn-export checkpoint"),
    (make_plain_state_dict, "not an attn-export checkpoint"),
    (make_bare_tensor, "not an attn-export checkpoint"),
    (make_future_version, "unsupported checkpoint format_version 2"),
    (make_unknown_arch, "unknown architecture 'no-such-arch' (known:"),
    (make_bad_config_value, "invalid tiny-test config: hidden must be at least 1, got 0"),
    (make_unknown_config_field, "tiny-test has no config field 'depth'"),
    (make_bad_example, "'example' must hold positive integers"),
    (make_bad_example_length, "tiny needs a multiple of 4, got 10"),
    (make_huge_example_batch, "example batch 1000000000 is over 1024"),
    (make_config_far_bigger_than_weights, "the tiny-test config asks for more than 256 MiB of weights and buffers, "
                                          "while the checkpoint holds 0.0 MiB: config and weights do not match"),
    (make_missing_weight, "state dict does not match tiny-test with this config: missing proj.bias"),
    (make_extra_weight, "state dict does not match tiny-test with this config: unexpected head.weight"),
    (make_wrong_shape, "shape embed.weight (16, 8) vs (32, 8)"),
]


@pytest.mark.parametrize("make, expected", BAD_FILES, ids=[make.__name__[5:] for make, _ in BAD_FILES])
def test_bad_files_are_one_line_user_errors(tmp_path, make, expected):
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(UserError) as info:
        load_model(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    assert expected in message
    assert not path.with_suffix(".marker").exists(), "the loader ran code from the file"


def with_build(monkeypatch, build):
    monkeypatch.setitem(registry.ZOO, ARCH, dataclasses.replace(TINY, build=build))


def test_weights_are_checked_against_the_config_before_anything_real_is_built(tmp_path, monkeypatch):
    devices = []

    def recording_build(config):
        module = Tiny(config)
        devices.append(module.proj.weight.device.type)
        return module

    with_build(monkeypatch, recording_build)
    torch.save(raw_checkpoint(config={"hidden": 10**7}), tmp_path / "huge.pt")
    with pytest.raises(UserError, match="config and weights do not match"):
        load_model(tmp_path / "huge.pt")
    torch.save(raw_checkpoint(config={"hidden": 16}), tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"shape embed.weight \(32, 8\) vs \(32, 16\)"):
        load_model(tmp_path / "other.pt")
    assert devices and set(devices) == {"meta"}, "a mismatched config must never be built for real"
    tiny_checkpoint(tmp_path / "good.pt")
    devices.clear()
    load_model(tmp_path / "good.pt")
    assert devices == ["meta", "cpu"]


def test_model_code_that_cannot_build_on_meta_still_loads(tmp_path, monkeypatch):
    def needs_real_tensors(config):
        torch.ones(1).item()  # .item() has no meta-device answer
        return Tiny(config)

    with_build(monkeypatch, needs_real_tensors)
    model = tiny_checkpoint(tmp_path / "model.pt").eval()
    loaded = load_model(tmp_path / "model.pt")
    inputs = loaded.example_inputs()
    with torch.no_grad():
        assert torch.equal(loaded.module(*inputs.values()), model(*inputs.values()))


def test_a_build_that_fails_is_one_line(tmp_path, monkeypatch):
    def out_of_memory(config):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 TB\nmore detail")

    tiny_checkpoint(tmp_path / "model.pt")
    with_build(monkeypatch, out_of_memory)
    with pytest.raises(UserError) as info:
        load_model(tmp_path / "model.pt")
    assert str(info.value) == (f"{tmp_path / 'model.pt'}: cannot build tiny-test with this config: "
                               "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 TB more detail")


def test_saving_refuses_an_example_batch_out_of_range(tmp_path):
    with pytest.raises(UserError, match=r"the example batch must be in \[1, 1024\], got 5000"):
        tiny_checkpoint(tmp_path / "model.pt", batch=5000)
    assert not list(tmp_path.iterdir())


# -------------------------------------------------------------------------------------- torch.export

@pytest.fixture(scope="module")
def tagger_pt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "tagger.pt2"
    model, example = export_tagger(path, seq=torch.export.Dim("seq", min=4, max=64))
    return path, model, example


def test_pt2_round_trip(tagger_pt2):
    path, model, (ids, mask) = tagger_pt2
    loaded = load_model(path)
    assert loaded.arch == "torch.export" and loaded.entry is None and loaded.config is None
    assert loaded.exported_program is not None
    assert not loaded.module.training
    assert loaded.input_names == ["input_ids", "mask"]
    assert loaded.dynamic_axes == {"input_ids": {1: "seq"}, "mask": {1: "seq"}}
    assert (loaded.example_batch, loaded.example_seq_len) == (2, 16)
    assert loaded.parity_seq_lens() == [16, 32]

    example = loaded.example_inputs()
    assert torch.equal(example["input_ids"], ids) and torch.equal(example["mask"], mask)
    longer = loaded.example_inputs(seq_len=40)
    assert longer["input_ids"].shape == (2, 40) and longer["input_ids"].dtype == torch.int64
    assert 0 <= int(longer["input_ids"].min()) and int(longer["input_ids"].max()) < 50
    assert longer["mask"].shape == (2, 40) and longer["mask"].dtype == torch.float32
    assert torch.equal(longer["input_ids"], loaded.example_inputs(seq_len=40)["input_ids"])
    with torch.no_grad():
        assert torch.allclose(loaded.module(*longer.values()), model(*longer.values()))


def test_pt2_lengths_outside_the_range_are_user_errors(tagger_pt2):
    path = tagger_pt2[0]
    loaded = load_model(path)
    allowed = r"sequence length 100 is not possible: the program allows s\d+ with s\d+ in \[4, 64\]"
    with pytest.raises(UserError, match=allowed):
        loaded.example_inputs(seq_len=100)
    with pytest.raises(UserError, match="fixed batch of 2"):
        loaded.example_inputs(batch=3)


def test_pt2_derived_sequence_dim(tmp_path):
    path = tmp_path / "blocks.pt2"
    blocks = torch.export.Dim("blocks", min=2, max=16)
    export_tagger(path, seq=8 * blocks, seq_len=32)
    loaded = load_model(path)
    assert loaded.example_seq_len == 32
    assert loaded.parity_seq_lens() == [32, 64]
    assert loaded.example_inputs(seq_len=48)["mask"].shape == (2, 48)
    with pytest.raises(UserError, match="sequence length 44 is not possible"):
        loaded.example_inputs(seq_len=44)


def test_pt2_static_program(tmp_path):
    path = tmp_path / "static.pt2"
    export_tagger(path, seq=None)
    loaded = load_model(path)
    assert loaded.dynamic_axes == {}
    assert loaded.parity_seq_lens() == [16]
    with pytest.raises(UserError, match="fixed sequence length of 16"):
        loaded.example_inputs(seq_len=32)


def test_pt2_with_keyword_inputs_is_refused(tmp_path):
    path = tmp_path / "kw.pt2"
    model = Tagger().eval()
    ep = torch.export.export(model, (torch.randint(0, 50, (2, 8)),), {"mask": torch.ones(2, 8)})
    torch.export.save(ep, path)
    with pytest.raises(UserError, match="keyword inputs are not supported"):
        load_model(path)


def test_pt2_training_mode_is_refused(tmp_path):
    class Dropper(nn.Module):
        def forward(self, x):
            return torch.nn.functional.dropout(x, 0.5, training=True)

    path = tmp_path / "train.pt2"
    torch.export.save(torch.export.export(Dropper(), (torch.randn(2, 8),)), path)
    with pytest.raises(UserError, match="exported in training mode"):
        load_model(path)


def test_truncated_pt2(tagger_pt2, tmp_path):
    path = tmp_path / "model.pt2"
    data = tagger_pt2[0].read_bytes()
    path.write_bytes(data[: len(data) - 200])
    with pytest.raises(UserError) as info:
        load_model(path)
    assert str(info.value).startswith(f"{path}: truncated or corrupt")


def test_pt2_with_shape_arithmetic_loads(tmp_path):
    class Halver(nn.Module):
        def forward(self, x):
            batch, n, d = x.shape
            return x.reshape(batch, n // 2, 2 * d)

    path = tmp_path / "halver.pt2"
    pairs = torch.export.Dim("pairs", min=2, max=32)
    torch.export.save(torch.export.export(Halver(), (torch.randn(1, 8, 3),), dynamic_shapes=({1: 2 * pairs},)), path)
    loaded = load_model(path)
    assert loaded.parity_seq_lens() == [8, 16]
    assert loaded.module(*loaded.example_inputs(seq_len=12).values()).shape == (1, 6, 6)
