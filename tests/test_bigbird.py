"""BigBird's ITC block-sparse attention: the layout, and equality with dense attention under the block mask."""
import math

import pytest
import torch

import models
from attn_export.errors import UserError
from conftest import small_config
from models.bigbird import BigBirdAttention
from models.common import split_heads


def _attention(nb=8, r=2):
    entry, config = small_config("bigbird")
    config.num_random_blocks = r
    return BigBirdAttention(config, layer_index=0).eval(), config


def _block_mask(table: torch.Tensor, nb: int) -> torch.Tensor:
    """[H, nb, nb] bool: query block i sees key block j (global rows see everything)."""
    heads = table.shape[0]
    mask = torch.zeros(heads, nb, nb, dtype=torch.bool)
    for h in range(heads):
        for i in range(nb):
            for j in table[h, i]:
                if j >= 0:
                    mask[h, i, j] = True
    mask[:, 0] = mask[:, -1] = True
    return mask


def test_layout_has_window_globals_and_r_distinct_random_blocks():
    attention, config = _attention(r=2)
    nb = 10
    table = attention.block_table(nb)
    assert table.shape == (config.num_heads, nb, 5 + 2)
    for h in range(config.num_heads):
        for i in range(1, nb - 1):
            listed = [int(j) for j in table[h, i] if j >= 0]
            assert len(listed) == len(set(listed)), "a block is listed twice"
            assert {0, nb - 1, *[j for j in (i - 1, i, i + 1)]} <= set(listed)
            random = [int(j) for j in table[h, i, 5:]]
            assert all(0 < j < nb - 1 and abs(j - i) > 1 for j in random if j >= 0)
            assert sum(j >= 0 for j in random) == min(2, len([j for j in range(1, nb - 1) if abs(j - i) > 1]))
    assert torch.equal(table, attention.block_table(nb)), "the random blocks must be frozen"
    assert not torch.equal(table[0], table[1]), "heads draw different random blocks"


def test_layout_for_a_shorter_sequence_is_a_valid_table():
    attention, _ = _attention()
    table = attention.block_table(3)
    assert table.max() <= 2 and table.min() >= -1


@pytest.mark.parametrize("nb", [2, 3, 8, 13])
def test_bigbird_equals_dense_attention_under_its_block_mask(nb):
    attention, config = _attention()
    b = config.block_size
    x = torch.randn(2, nb * b, config.hidden)
    out = attention(x)
    q, k, v = (split_heads(p(x), config.num_heads) for p in (attention.query, attention.key, attention.value))
    mask = _block_mask(attention.block_table(nb), nb).repeat_interleave(b, 1).repeat_interleave(b, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    dense = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v
    expected = attention.out(dense.transpose(1, 2).reshape(2, nb * b, -1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sequence_length_rule():
    entry, config = small_config("bigbird")
    entry.check_seq_len(config, 4 * config.block_size)
    with pytest.raises(UserError, match="multiple of block_size"):
        entry.check_seq_len(config, 4 * config.block_size + 1)
    with pytest.raises(UserError, match="must be in"):
        entry.check_seq_len(config, config.max_seq_len + config.block_size)


def test_config_out_of_range_is_a_user_error():
    entry, _ = small_config("bigbird")
    with pytest.raises(UserError, match="num_heads"):
        entry.make_config({"num_heads": -2})
    with pytest.raises(UserError, match="multiple of block_size"):
        entry.make_config({"max_seq_len": 100, "block_size": 64})


def test_lengths_with_fewer_blocks_than_random_blocks_are_refused_and_the_shortest_valid_one_runs():
    entry = models.get("bigbird")
    config = entry.make_config({"hidden": 16, "num_heads": 2, "num_layers": 1, "block_size": 8,
                                "num_random_blocks": 3, "max_seq_len": 256, "vocab_size": 50})
    with pytest.raises(UserError, match="at least 3 blocks"):
        entry.check_seq_len(config, 16)
    entry.check_seq_len(config, 24)
    model = entry.build(config).eval()
    with torch.no_grad():
        assert torch.isfinite(model(**entry.example_inputs(config, 1, 24))).all()
