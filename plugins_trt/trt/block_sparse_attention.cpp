// BlockSparseAttention (attn_export/ops/block_sparse_attention.py): fields and input shapes -> kernel params.
#include "ops.h"

namespace attn_export {
namespace trt_plugins {

namespace c = contracts::block_sparse_attention;

Status BlockSparseAttentionOp::checkFields(FieldValues const& f) {
  if (f.getInt(c::kNumHeads) < 1) return Status::error("num_heads must be at least 1");
  if (f.getInt(c::kBlockSize) < 1) return Status::error("block_size must be at least 1");
  if (f.getInt(c::kGlobalBlocks) < 0) return Status::error("global_blocks must not be negative");
  int32_t const countRepeats = f.getInt(c::kCountRepeats);
  if (countRepeats != 0 && countRepeats != 1) return Status::error("count_repeats must be 0 or 1");
  return Status();
}

Status BlockSparseAttentionOp::makeParams(FieldValues const& f, TensorShape const* in, int32_t nbInputs,
                                          Params& p) {
  ATTN_EXPORT_TRY(checkInputs(spec(), in, nbInputs));
  TensorShape const& q = in[0];
  TensorShape const& table = in[3];
  p = Params{};
  p.num_heads = f.getInt(c::kNumHeads);
  p.block_size = f.getInt(c::kBlockSize);
  p.scale = f.getFloat(c::kScale);
  p.global_blocks = f.getInt(c::kGlobalBlocks);
  p.count_repeats = f.getInt(c::kCountRepeats);
  p.batch = extent(q.d[0]);
  p.seq_len = extent(q.d[1]);
  p.head_dim = p.num_heads > 0 ? extent(q.d[2]) / p.num_heads : 0;
  p.index_heads = extent(table.d[0]);
  p.blocks_per_row = extent(table.d[2]);

  for (int32_t i = 1; i < 3; ++i) {
    if (in[i].d[0] != q.d[0] || in[i].d[1] != q.d[1] || in[i].d[2] != q.d[2]) {
      return Status::error(describeInput(spec(), in, i) + " must have the query's shape " + shapeString(q));
    }
  }
  if (p.num_heads < 1 || q.d[2] % p.num_heads != 0) {
    return Status::error(describeInput(spec(), in, 0) + ": width " + std::to_string(q.d[2]) +
                         " is not a multiple of num_heads " + std::to_string(p.num_heads));
  }
  if (p.block_size < 1 || p.seq_len % p.block_size != 0) {
    return Status::error("sequence length " + std::to_string(p.seq_len) + " is not a multiple of block_size " +
                         std::to_string(p.block_size));
  }
  if (p.index_heads != 1 && p.index_heads != p.num_heads) {
    return Status::error(describeInput(spec(), in, 3) + ": the first axis must be 1 or num_heads " +
                         std::to_string(p.num_heads));
  }
  if (table.d[1] != p.seq_len / p.block_size) {
    return Status::error(describeInput(spec(), in, 3) + ": the second axis must be sequence length / block_size = " +
                         std::to_string(p.seq_len / p.block_size));
  }
  if (p.blocks_per_row < 1) return Status::error(describeInput(spec(), in, 3) + ": lists no key block per row");
  if (nbInputs > 4 && (in[4].d[0] != q.d[0] || in[4].d[1] != q.d[1])) {
    return Status::error(describeInput(spec(), in, 4) + " must be [" + std::to_string(q.d[0]) + ", " +
                         std::to_string(q.d[1]) + "] (batch, sequence length)");
  }
  return Status();
}

void BlockSparseAttentionOp::bind(Params& p, void const* const* inputs, int32_t nbInputs, void* output) {
  p.query = inputs[0];
  p.key = inputs[1];
  p.value = inputs[2];
  p.block_index = static_cast<int32_t const*>(inputs[3]);
  p.key_bias = nbInputs > 4 ? inputs[4] : nullptr;
  p.output = output;
}

}  // namespace trt_plugins
}  // namespace attn_export
