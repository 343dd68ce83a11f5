// Kernel params as "name=value ..." (every non-pointer field, in the header's order), for the test drivers.
#pragma once

#include <sstream>
#include <string>

#include "attn_export_kernels.h"

namespace attn_export {
namespace testing {

struct Printer {
  std::ostringstream out;
  template <typename T>
  Printer& operator()(char const* name, T value) {
    out << ' ' << name << '=' << value;
    return *this;
  }
};

inline std::string print(BlockSparseAttentionParams const& p) {
  Printer o;
  o("batch", p.batch)("seq_len", p.seq_len)("head_dim", p.head_dim)("index_heads", p.index_heads)(
      "blocks_per_row", p.blocks_per_row)("num_heads", p.num_heads)("block_size", p.block_size)("scale", p.scale)(
      "global_blocks", p.global_blocks)("count_repeats", p.count_repeats);
  return o.out.str();
}

inline std::string print(DenseAttentionParams const& p) {
  Printer o;
  o("batch", p.batch)("q_len", p.q_len)("kv_len", p.kv_len)("shared_batch", p.shared_batch)(
      "shared_len", p.shared_len)("head_dim", p.head_dim)("v_head_dim", p.v_head_dim)("bias_batch", p.bias_batch)(
      "bias_heads", p.bias_heads)("bias_rows", p.bias_rows)("num_heads", p.num_heads)(
      "scale", p.scale)("causal", p.causal)("score_fn", p.score_fn)("logits_input", p.logits_input)(
      "masked_rows", p.masked_rows);
  return o.out.str();
}

inline std::string print(KernelizedAttentionParams const& p) {
  Printer o;
  o("batch", p.batch)("seq_len", p.seq_len)("head_dim", p.head_dim)("v_head_dim", p.v_head_dim)(
      "num_features", p.num_features)("num_heads", p.num_heads)("feature_map", p.feature_map)("causal", p.causal)(
      "normalize", p.normalize)("scale", p.scale)("eps", p.eps)("stabilizer", p.stabilizer);
  return o.out.str();
}

inline std::string print(DisentangledAttentionParams const& p) {
  Printer o;
  o("batch", p.batch)("seq_len", p.seq_len)("head_dim", p.head_dim)("num_heads", p.num_heads)("span", p.span)(
      "max_position", p.max_position)("scale", p.scale)("c2p", p.c2p)("p2c", p.p2c)("masked_rows", p.masked_rows)(
      "bias_batch", p.bias_batch)("bias_heads", p.bias_heads)("bias_rows", p.bias_rows);
  return o.out.str();
}

inline std::string print(MixtureOfExpertsParams const& p) {
  Printer o;
  o("batch", p.batch)("tokens", p.tokens)("model_dim", p.model_dim)("ffn_dim", p.ffn_dim)(
      "num_experts", p.num_experts)("capacity", p.capacity)("capacity_factor", p.capacity_factor)(
      "activation", p.activation);
  return o.out.str();
}

inline std::string print(LongConvolutionParams const& p) {
  Printer o;
  o("batch", p.batch)("seq_len", p.seq_len)("kernel_len", p.kernel_len)("channels", p.channels);
  return o.out.str();
}

}  // namespace testing
}  // namespace attn_export
