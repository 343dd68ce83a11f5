"""Hypercube (NIP) block-sparse attention: the Gray-code cube layout against a loop-by-loop rebuild of the
official construction, its graph properties, and equality with dense attention under the block mask."""
import math

import numpy as np
import pytest
import torch

from attn_export.backends import OnnxRuntimeRunner
from attn_export.errors import UserError
from attn_export.export import export_onnx
from conftest import small_config
from models.common import split_heads
from models.hypercube import HypercubeAttention, gray_labels

NB_RANGE = range(1, 33)  # the small config covers 32 blocks


def _attention():
    _, config = small_config("hypercube")
    return HypercubeAttention(config).eval(), config


def _neighbour_sets(attention, nb):
    """{query block: set of key blocks} read off the module's table."""
    table = attention.block_table(nb)[0]
    return {i: {int(j) for j in table[i] if j >= 0} for i in range(nb)}


def _nip_neighbours(nb):
    """The official TesseractSparsityConfig construction, with strings and list.index."""
    k = math.ceil(math.log2(nb)) if nb > 1 else 0
    labels = [int(format(p ^ (p >> 1), f"0{k}b")[::-1], 2) if k else 0 for p in range(2**k)]
    result = {}
    for i in range(nb):
        found = {i}
        for t in range(k):
            p = labels.index(labels[i] ^ (1 << t))
            found.add(p if p < nb else i)
        result[i] = found
    return result


def test_gray_labels_and_block_0_for_eight_blocks():
    assert gray_labels(3).tolist() == [0, 4, 6, 2, 3, 7, 5, 1]
    attention, _ = _attention()
    assert _neighbour_sets(attention, 8)[0] == {0, 1, 3, 7}


@pytest.mark.parametrize("nb", NB_RANGE)
def test_layout_equals_the_official_construction(nb):
    attention, _ = _attention()
    assert _neighbour_sets(attention, nb) == _nip_neighbours(nb)


def test_graph_is_symmetric_with_consecutive_blocks_adjacent():
    attention, _ = _attention()
    for nb in NB_RANGE:
        sets = _neighbour_sets(attention, nb)
        for i, found in sets.items():
            assert i in found
            assert all(i in sets[j] for j in found), f"nb={nb}: {i} -> {found} is not symmetric"
            assert all(j in found for j in (i - 1, i + 1) if 0 <= j < nb), f"nb={nb}: {i} misses i-1 or i+1"


@pytest.mark.parametrize("nb", [3, 5, 6, 7, 12, 20, 31])
def test_no_block_listed_twice_and_degree_at_most_k_plus_1_when_nb_is_not_a_power_of_two(nb):
    attention, _ = _attention()
    table = attention.block_table(nb)[0]
    k = math.ceil(math.log2(nb))
    for i in range(nb):
        listed = [int(j) for j in table[i] if j >= 0]
        assert len(listed) == len(set(listed)), f"block {i} lists {listed}"
        assert len(listed) <= k + 1 and all(j < nb for j in listed)
    degrees = [len(found) for found in _neighbour_sets(attention, nb).values()]
    assert min(degrees) < k + 1, "a missing vertex must shrink some block's degree"


@pytest.mark.parametrize("nb", [1, 5, 8, 12])
def test_attention_equals_dense_attention_under_the_block_mask(nb):
    attention, config = _attention()
    b = config.block_size
    x = torch.randn(2, nb * b, config.hidden)
    q, k, v = (split_heads(p(x), config.num_heads) for p in (attention.query, attention.key, attention.value))
    block_mask = torch.zeros(nb, nb, dtype=torch.bool)
    for i, found in _nip_neighbours(nb).items():
        block_mask[i, list(found)] = True
    mask = block_mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
    expected = attention.out((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(2, nb * b, -1))
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)


def test_torchscript_export_keeps_the_length_dynamic_and_parity():
    entry, config = small_config("hypercube")
    module = entry.build(config).eval()
    inputs = [entry.example_inputs(config, 2, n) for n in entry.parity_seq_lens(config)]
    model = export_onnx(module, inputs[0], dynamic_axes=entry.dynamic_axes, exporter="torchscript")
    runner = OnnxRuntimeRunner(model, "reference")
    for x in inputs:
        got = list(runner.run({k: t.numpy() for k, t in x.items()}).values())[0]
        np.testing.assert_allclose(got, module(**x).detach().numpy(), atol=1e-4, rtol=1e-3)


def test_sequence_length_rule():
    entry, config = small_config("hypercube")
    entry.check_seq_len(config, config.block_size)
    entry.check_seq_len(config, 12 * config.block_size)
    with pytest.raises(UserError, match="multiple of block_size"):
        entry.check_seq_len(config, 4 * config.block_size + 1)
    with pytest.raises(UserError, match="must be in"):
        entry.check_seq_len(config, config.max_seq_len + config.block_size)
    default = entry.make_config()
    entry.check_seq_len(default, entry.default_seq_len(default))


def test_config_out_of_range_is_a_user_error():
    entry, _ = small_config("hypercube")
    with pytest.raises(UserError, match="block_size"):
        entry.make_config({"block_size": 0})
    with pytest.raises(UserError, match="multiple of block_size"):
        entry.make_config({"max_seq_len": 100, "block_size": 16})
    with pytest.raises(UserError, match="multiple of num_heads"):
        entry.make_config({"hidden": 66, "num_heads": 4})
