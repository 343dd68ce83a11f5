// DisentangledAttention (attn_export/ops/disentangled_attention.py): fields and input shapes -> kernel params.
#include "ops.h"

namespace attn_export {
namespace trt_plugins {

namespace c = contracts::disentangled_attention;

Status DisentangledAttentionOp::checkFields(FieldValues const& f) {
  if (f.getInt(c::kNumHeads) < 1) return Status::error("num_heads must be at least 1");
  int32_t const span = f.getInt(c::kSpan);
  int32_t const maxPosition = f.getInt(c::kMaxPosition);
  if (span < 1) return Status::error("span must be at least 1");
  if (maxPosition < 0) return Status::error("max_position must not be negative (0 means no log buckets)");
  // log buckets divide by log((max_position - 1) / (span / 2)) and by span / 2
  if (maxPosition > 0 && span < 2) return Status::error("log buckets (max_position > 0) need span >= 2");
  for (int32_t field : {static_cast<int32_t>(c::kC2p), static_cast<int32_t>(c::kP2c)}) {
    int32_t const value = f.getInt(field);
    if (value != 0 && value != 1) return Status::error(std::string(c::kFields[field].name) + " must be 0 or 1");
  }
  // an unknown masked_rows never gets here: FieldValues::set refuses it, naming the options
  return Status();
}

Status DisentangledAttentionOp::makeParams(FieldValues const& f, TensorShape const* in, int32_t nbInputs,
                                           Params& p) {
  ATTN_EXPORT_TRY(checkInputs(spec(), in, nbInputs));
  TensorShape const& q = in[0];
  p = Params{};
  p.num_heads = f.getInt(c::kNumHeads);
  p.span = f.getInt(c::kSpan);
  p.max_position = f.getInt(c::kMaxPosition);
  p.scale = f.getFloat(c::kScale);
  p.c2p = f.getInt(c::kC2p);
  p.p2c = f.getInt(c::kP2c);
  p.masked_rows = f.getCode(c::kMaskedRows);
  bool const hasBias = nbInputs > 5;
  p.bias_batch = hasBias ? extent(in[5].d[0]) : 1;
  p.bias_heads = hasBias ? extent(in[5].d[1]) : 1;
  p.bias_rows = hasBias ? extent(in[5].d[2]) : 1;
  p.batch = extent(q.d[0]);
  p.seq_len = extent(q.d[1]);
  p.head_dim = p.num_heads > 0 ? extent(q.d[2]) / p.num_heads : 0;

  if (p.num_heads < 1 || q.d[2] % p.num_heads != 0) {
    return Status::error(describeInput(spec(), in, 0) + ": width " + std::to_string(q.d[2]) +
                         " is not a multiple of num_heads " + std::to_string(p.num_heads));
  }
  for (int32_t i = 1; i < 3; ++i) {
    if (in[i].d[0] != q.d[0] || in[i].d[1] != q.d[1] || in[i].d[2] != q.d[2]) {
      return Status::error(describeInput(spec(), in, i) + " must have the query's shape " + shapeString(q));
    }
  }
  // the kernel reads rows [0, 2 * span) of each table it uses (c2p: rel_key, p2c: rel_query), [rows, H * D]
  for (int32_t i = 3; i < 5; ++i) {
    if ((i == 3 ? p.c2p : p.p2c) == 0) continue;
    if (in[i].d[0] < 2 * static_cast<int64_t>(p.span) || in[i].d[1] != q.d[2]) {
      return Status::error(describeInput(spec(), in, i) + " must be [2 * span = " + std::to_string(2 * p.span) +
                           ", " + std::to_string(q.d[2]) + "]");
    }
  }
  if (hasBias) {
    TensorShape const& bias = in[5];
    bool const ok = (bias.d[0] == 1 || bias.d[0] == q.d[0]) && (bias.d[1] == 1 || bias.d[1] == p.num_heads) &&
                    (bias.d[2] == 1 || bias.d[2] == q.d[1]) && bias.d[3] == q.d[1];
    if (!ok) {
      return Status::error(describeInput(spec(), in, 5) + " must be [1 or " + std::to_string(q.d[0]) + ", 1 or " +
                           std::to_string(p.num_heads) + ", 1 or " + std::to_string(q.d[1]) + ", " +
                           std::to_string(q.d[1]) + "]");
    }
  }
  return Status();
}

void DisentangledAttentionOp::bind(Params& p, void const* const* inputs, int32_t nbInputs, void* output) {
  p.query = inputs[0];
  p.key = inputs[1];
  p.value = inputs[2];
  p.rel_key = inputs[3];
  p.rel_query = inputs[4];
  p.bias = nbInputs > 5 ? inputs[5] : nullptr;
  p.output = output;
}

}  // namespace trt_plugins
}  // namespace attn_export
