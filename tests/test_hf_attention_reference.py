"""The op references compute what Hugging Face transformers' own attention layers compute: a tiny, randomly
initialised DeBERTa-v2 self-attention and BigBird block-sparse attention, built here (nothing downloaded), in eval
mode, with and without padded positions. Their q/k/v projections (and DeBERTa's projected position tables) go into
the op references; the outputs must agree. This is what lets a fusion pass replace those layers by one op."""
import pytest
import torch

from attn_export.ops import BLOCK_SPARSE_ATTENTION as BSA, DISENTANGLED_ATTENTION as DIS

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------------ DeBERTa-v2
def _deberta_layer(pos_att_type, share_att_key):
    from transformers import DebertaV2Config
    from transformers.models.deberta_v2.modeling_deberta_v2 import DisentangledSelfAttention

    config = DebertaV2Config(hidden_size=32, num_attention_heads=2, intermediate_size=64, relative_attention=True,
                             position_buckets=8, max_relative_positions=16, pos_att_type=pos_att_type,
                             share_att_key=share_att_key, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return DisentangledSelfAttention(config).eval(), config


@pytest.mark.parametrize("pos_att_type,share_att_key", [(["p2c", "c2p"], True), (["c2p"], False),
                                                        (["p2c"], True)])
@pytest.mark.parametrize("padded", [False, True])
def test_disentangled_reference_is_hf_deberta_v2_self_attention(pos_att_type, share_att_key, padded):
    layer, config = _deberta_layer(pos_att_type, share_att_key)
    batch, n, span = 2, 24, config.position_buckets  # n > max_relative_positions: the unclamped log buckets
    hidden = torch.randn(batch, n, config.hidden_size)
    rel_embeddings = torch.randn(2 * span, config.hidden_size)
    keep = torch.ones(batch, n, dtype=torch.bool)
    if padded:
        keep[0, 17:] = False  # batch row 0 is padded: its padded queries see nothing (finfo.min everywhere)
    pair = keep[:, None, :, None] & keep[:, None, None, :]  # DebertaV2Encoder.get_attention_mask: query x key
    with torch.no_grad():
        expected, _ = layer(hidden, pair, rel_embeddings=rel_embeddings)
        q, k, v = layer.query_proj(hidden), layer.key_proj(hidden), layer.value_proj(hidden)
        if share_att_key:
            rel_key, rel_query = layer.key_proj(rel_embeddings), layer.query_proj(rel_embeddings)
        else:
            rel_key = layer.pos_key_proj(rel_embeddings)
            rel_query = torch.zeros_like(rel_key)  # p2c is off: never read
    bias = torch.where(pair, 0.0, float("-inf"))
    c2p, p2c = int("c2p" in pos_att_type), int("p2c" in pos_att_type)
    got = DIS.reference(q, k, v, rel_key, rel_query, bias, num_heads=config.num_attention_heads, span=span,
                        max_position=config.max_relative_positions, c2p=c2p, p2c=p2c, masked_rows="mean")
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    if padded:
        # the padded queries average every value uniformly, as the finite fill makes HF's softmax do
        torch.testing.assert_close(got[0, 20], v[0].mean(0), atol=1e-5, rtol=1e-5)
        zeros = DIS.reference(q, k, v, rel_key, rel_query, bias, num_heads=config.num_attention_heads, span=span,
                              max_position=config.max_relative_positions, c2p=c2p, p2c=p2c)
        assert not torch.allclose(zeros[0, 17:], expected[0, 17:])  # "zeros" would not be the model


# ------------------------------------------------------------------------------------------------ BigBird
def hf_bigbird_eval_layout(num_blocks: int, random_blocks: int) -> torch.Tensor:
    """The key blocks of each query block in HF BigBird's block_sparse attention in eval mode: the first and last
    rows are global (global_blocks=1); row 1 sees blocks 0, 1, 2 and the last; row nb-2 sees 0, nb-3, nb-2 and the
    last; every middle row sees its window of 3, the first and last block; and every row's random blocks are block 0
    (transformers draws no random blocks in eval), so block 0 is listed 1 + r times."""
    nb, rand = num_blocks, [0] * random_blocks
    rows = [[-1]] + [[0, 1, 2, nb - 1] + rand]
    rows += [[i - 1, i, i + 1, 0, nb - 1] + rand for i in range(2, nb - 2)]
    rows += [[0, nb - 3, nb - 2, nb - 1] + rand] + [[-1]]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32)[None]


@pytest.mark.parametrize("padded", [False, True])
def test_block_sparse_reference_is_hf_bigbird_block_sparse_attention(padded):
    from transformers import BigBirdConfig, BigBirdModel
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention

    block, random_blocks, nb, heads = 4, 2, 12, 2
    config = BigBirdConfig(hidden_size=32, num_attention_heads=heads, attention_type="block_sparse",
                           block_size=block, num_random_blocks=random_blocks, max_position_embeddings=64,
                           use_bias=True)
    torch.manual_seed(0)
    layer = BigBirdBlockSparseAttention(config).eval()
    batch, n = 2, nb * block
    hidden = torch.randn(batch, n, config.hidden_size)
    mask = torch.ones(batch, n)
    if padded:
        mask[0, 37:] = 0  # padded keys inside the last two blocks of batch row 0
    blocked, band_mask, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(mask, block)
    with torch.no_grad():
        expected, _ = layer(hidden, band_mask, from_mask, to_mask, blocked, blocked)
        q, k, v = layer.query(hidden), layer.key(hidden), layer.value(hidden)
    table = hf_bigbird_eval_layout(nb, random_blocks)
    key_bias = (1.0 - mask) * -10000.0  # HF's attn_mask_penalty on padded keys
    got = BSA.reference(q, k, v, table, key_bias, num_heads=heads, block_size=block, global_blocks=1,
                        count_repeats=1)
    # HF multiplies the context by the query mask (padded queries are zero); the op leaves that to the graph
    torch.testing.assert_close(got * mask[..., None], expected, atol=2e-5, rtol=1e-4)
    # without count_repeats block 0 would weigh once in rows 1..nb-2: a different (wrong) result for this model
    once = BSA.reference(q, k, v, table, key_bias, num_heads=heads, block_size=block, global_blocks=1)
    middle = slice(block, n - block)
    assert not torch.allclose(once[:, middle], expected[:, middle], atol=1e-3)
