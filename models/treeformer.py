"""Treeformer (Madaan, Bhojanapalli, Jain, Jain; ICLR 2023): attention as decision-tree retrieval.

Each head of each layer owns a binary decision tree of height l: internal nodes n = 0 .. 2^l - 2 in heap order, node
n holding a hyperplane (w_n in R^D, b_n). Queries and keys of that head are routed by the same tree:
    n_0 = 0,   bit_t = [w_{n_t} . x + b_{n_t} > 0],   n_{t+1} = 2 n_t + 1 + bit_t,   leaf(x) = n_l - (2^l - 1).
Routing is l steps of Gather(w, n_t) and integer arithmetic on every token at once (no sort, no loop over tokens).

TF-attention (fine): ordinary softmax attention restricted to the keys in the query's own leaf,
    O_i = sum_{j: leaf(k_j) = leaf(q_i)} softmax_j(q_i . k_j / sqrt(D)) v_j,
written as dense attention under the mask leaf(q_i) == leaf(k_j); a query whose leaf holds no key outputs 0.

TC-attention (coarse): every node n aggregates the keys and values routed through it, and query i attends over the
l + 1 nodes n_0(i) .. n_l(i) of its own root-to-leaf path with one small softmax:
    K_n = mean_{j in n} k_j,   V_n = mean_{j in n} v_j,   O_i = sum_t softmax_t(q_i . K_{n_t(i)} / sqrt(D)) V_{n_t(i)}.
The paper says "aggregated"; we take the mean, not the sum. A sum grows with the node's size (the root sums all N
keys), so logits would scale with N and the softmax would pick nodes by how many tokens they hold, not by similarity,
and the output would scale with N too. The mean is each node's centroid: logits on the scale of ordinary attention,
outputs in the convex hull of the values, nothing depending on N (a landmark, as in Transformer-LS or Nystromformer).
A node on the query's path that no key reached has no mean and is masked out; the root holds every key, so no softmax
is ever empty. Aggregation uses a one-hot membership M [N, 2^(l+1) - 1] (token j is in node n iff its path at depth(n)
is n), K = M^T k / |n| as matmuls, then a Gather of the path rows: no scatter.

Routing is hard, so at inference only the sign of each split matters. The paper trains the trees with dense-gradient-
tree straight-through estimators and 2-D bootstrapping; that training is not reproduced here (no official code).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import registry
from .common import Encoder, EncoderConfig, PreLNBlock, check_length, check_positive, merge_heads, split_heads

FORMS = ("tf", "tc")
MAX_TREE_HEIGHT = 16


@dataclass
class TreeformerConfig(EncoderConfig):
    tree_height: int = 4  # 2^4 = 16 leaves: about 64 keys per leaf at the default length 1024
    attention: str = "tf"  # "tf" (fine, keys in the query's leaf) or "tc" (coarse, aggregates along the path)
    num_classes: int = 2
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "num_classes")
        if not 1 <= self.tree_height <= MAX_TREE_HEIGHT:
            raise ValueError(f"tree_height must be in [1, {MAX_TREE_HEIGHT}], got {self.tree_height}")
        if self.attention not in FORMS:
            raise ValueError(f"attention must be one of {', '.join(FORMS)}, got '{self.attention}'")


def route(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root-to-leaf path [B, H, N, l + 1] (heap node ids) of every vector of x [B, H, N, D] through its head's tree,
    w [H, 2^l - 1, D], b [H, 2^l - 1]."""
    heads, internal, dim = w.shape
    height = int(math.log2(internal + 1))
    # one flat node table for all heads, so each step is a plain Gather (a table lookup) of w and of b
    head_offset = torch.arange(heads, device=x.device)[:, None] * internal  # [H, 1]
    w_flat, b_flat = w.reshape(heads * internal, dim), b.reshape(heads * internal, 1)
    node = torch.zeros_like(x[..., 0], dtype=torch.long)
    path = [node]
    for _ in range(height):
        index = node + head_offset
        w_n, b_n = F.embedding(index, w_flat), F.embedding(index, b_flat)[..., 0]
        bit = ((w_n * x).sum(-1) + b_n > 0).long()
        node = 2 * node + 1 + bit
        path.append(node)
    return torch.stack(path, -1)


def tf_attention(q, k, v, leaf_q, leaf_k):
    """Softmax attention over the keys in the query's leaf; leaf ids [B, H, N]. A query alone in its leaf gives 0."""
    scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(q.shape[-1]))
    same_leaf = leaf_q[..., :, None] == leaf_k[..., None, :]
    scores = scores.masked_fill(~same_leaf, float("-inf"))
    probs = torch.softmax(scores, -1)
    probs = torch.where(torch.isnan(probs), 0.0, probs)  # a row with no key: softmax of all -inf is NaN
    return probs @ v


def node_depths(height: int) -> torch.Tensor:
    """[2^(l+1) - 1]: the depth of every node of a tree of height l, in heap order."""
    return torch.cat([torch.full((2**t,), t) for t in range(height + 1)])


def tc_attention(q, k, v, path_q, path_k, depth):
    """Attention of each query over the mean keys/values of the l + 1 nodes on its path; paths [B, H, N, l + 1],
    depth = node_depths(l)."""
    batch, heads, n, dim = q.shape
    node = torch.arange(depth.shape[0], device=q.device)
    membership = (path_k.index_select(-1, depth) == node).to(k.dtype)  # [B, H, N, nodes]
    count = membership.sum(-2)  # [B, H, nodes]
    size = count.clamp(min=1)[..., None]  # an empty node's mean is unused (masked below); avoid 0 / 0
    k_node, v_node = (membership.transpose(-1, -2) @ t / size for t in (k, v))  # [B, H, nodes, D]

    # the path rows of every query: [B, H, N, l + 1, D]
    index = path_q.reshape(batch, heads, -1)
    k_path, v_path = (torch.gather(t, 2, index[..., None].expand(-1, -1, -1, dim)).reshape(batch, heads, n, -1, dim)
                      for t in (k_node, v_node))
    reached = torch.gather(count, 2, index).reshape(batch, heads, n, 1, -1) > 0
    scores = q[..., None, :] @ k_path.transpose(-1, -2) * (1.0 / math.sqrt(dim))  # [B, H, N, 1, l + 1]
    scores = scores.masked_fill(~reached, float("-inf"))  # the root is always reached
    return (torch.softmax(scores, -1) @ v_path).reshape(batch, heads, n, dim)


class TreeformerAttention(nn.Module):
    def __init__(self, config: TreeformerConfig):
        super().__init__()
        self.num_heads, self.form = config.num_heads, config.attention
        self.query, self.key, self.value, self.out = (nn.Linear(config.hidden, config.hidden) for _ in range(4))
        head_dim, internal = config.hidden // config.num_heads, 2**config.tree_height - 1
        # learned split hyperplanes, one tree per head; b = 0 starts every split through the origin
        self.w = nn.Parameter(torch.randn(config.num_heads, internal, head_dim) / math.sqrt(head_dim))
        self.b = nn.Parameter(torch.zeros(config.num_heads, internal))
        self.register_buffer("node_depth", node_depths(config.tree_height), persistent=False)  # from the config

    def forward(self, x):
        q, k, v = (split_heads(p(x), self.num_heads) for p in (self.query, self.key, self.value))
        path_q, path_k = route(q, self.w, self.b), route(k, self.w, self.b)
        if self.form == "tf":
            out = tf_attention(q, k, v, path_q[..., -1], path_k[..., -1])  # equal leaf node ids <=> same leaf
        else:
            out = tc_attention(q, k, v, path_q, path_k, self.node_depth)
        return self.out(merge_heads(out))


ENTRY = registry.register(registry.ZooEntry(
    name="treeformer",
    paper="Madaan et al., Treeformer: Dense Gradient Trees for Efficient Attention Computation, ICLR 2023",
    complexity="routing O(N * l * d); TF as exported O(N^2 * d) dense masked (sum over leaves of n_leaf^2 * d "
                "with a bucketed kernel); TC O(N * 2^(l+1) * d) for the one-hot aggregation, O(N * l * d) attention",
    constraints="batch and sequence dynamic, any length up to max_seq_len (position table); the leaf layout "
                "depends on the data, so TF is exported as dense attention under a leaf-equality mask",
    config_cls=TreeformerConfig,
    build=lambda c: Encoder(c, lambda i: PreLNBlock(c.hidden, c.mlp_ratio, TreeformerAttention(c)), head="pooled"),
    seq_len_rule=lambda c, n: check_length(c, n, "Treeformer"),
    small=dict(hidden=64, num_heads=4, num_layers=2, tree_height=2, max_seq_len=512, vocab_size=100),
))
