// DenseAttention (attn_export/ops/dense_attention.py): fields and input shapes -> kernel params.
#include "ops.h"

namespace attn_export {
namespace trt_plugins {

namespace c = contracts::dense_attention;

// The generated option order is the kernel's enum order (both follow dense_attention.SCORE_FNS).
static_assert(static_cast<int32_t>(ScoreFn::kSoftmax) == 0 && static_cast<int32_t>(ScoreFn::kReluSquared) == 1,
              "score_fn codes follow SCORE_FNS");
static_assert(static_cast<int32_t>(MaskedRows::kZeros) == 0 && static_cast<int32_t>(MaskedRows::kMean) == 1 &&
                  static_cast<int32_t>(MaskedRows::kNone) == 2,
              "masked_rows codes follow MASKED_ROWS");

Status DenseAttentionOp::checkFields(FieldValues const& f) {
  if (f.getInt(c::kNumHeads) < 1) return Status::error("num_heads must be at least 1");
  int32_t const causal = f.getInt(c::kCausal);
  if (causal != 0 && causal != 1) return Status::error("causal must be 0 or 1");
  int32_t const logitsInput = f.getInt(c::kLogitsInput);
  if (logitsInput != 0 && logitsInput != 1) return Status::error("logits_input must be 0 or 1");
  // an unknown score_fn or masked_rows never gets here: FieldValues::set refuses it, naming the options
  return Status();
}

Status DenseAttentionOp::makeParams(FieldValues const& f, TensorShape const* in, int32_t nbInputs, Params& p) {
  ATTN_EXPORT_TRY(checkInputs(spec(), in, nbInputs));
  TensorShape const& q = in[0];
  TensorShape const& k = in[1];
  TensorShape const& v = in[2];
  bool const hasBias = nbInputs > 3;
  bool const hasShared = nbInputs > 4;
  bool const logits = f.getInt(c::kLogitsInput) != 0;
  p = Params{};
  p.num_heads = f.getInt(c::kNumHeads);
  p.scale = f.getFloat(c::kScale);
  p.causal = f.getInt(c::kCausal);
  p.score_fn = f.getCode(c::kScoreFn);
  p.logits_input = logits ? 1 : 0;
  p.masked_rows = f.getCode(c::kMaskedRows);
  p.batch = extent(q.d[0]);
  p.q_len = extent(q.d[1]);
  // With logits_input the keys are the value's rows and the query only gives batch and rows: its width and the
  // key are never read, so they are not checked (the contract's reference does not read them either).
  p.kv_len = extent(logits ? v.d[1] : k.d[1]);
  p.head_dim = p.num_heads > 0 && !logits ? extent(q.d[2]) / p.num_heads : 0;
  p.v_head_dim = p.num_heads > 0 ? extent(v.d[2]) / p.num_heads : 0;
  p.bias_batch = hasBias ? extent(in[3].d[0]) : 1;
  p.bias_heads = hasBias ? extent(in[3].d[1]) : 1;
  p.bias_rows = hasBias ? extent(in[3].d[2]) : 1;
  p.shared_batch = hasShared ? extent(in[4].d[0]) : 1;
  p.shared_len = hasShared ? extent(in[4].d[1]) : 0;
  int64_t const keys = int64_t{p.shared_len} + p.kv_len;  // what a row sees: shared keys first, then its own
  if (nbInputs == 5) return Status::error("shared_key needs shared_value");
  if (hasShared && logits) return Status::error("shared keys do not go with logits_input=1");
  if (keys > INT32_MAX) return Status::error("more keys than the kernels' int32 range");

  if (logits) {
    if (p.num_heads < 1 || v.d[2] % p.num_heads != 0) {
      return Status::error("the value width " + std::to_string(v.d[2]) + " must be a multiple of num_heads " +
                           std::to_string(p.num_heads));
    }
    if (v.d[0] != q.d[0]) {
      return Status::error(describeInput(spec(), in, 2) + " must match the query " + shapeString(q) + " in batch");
    }
    if (!hasBias) return Status::error("logits_input=1 needs the logits as the bias input");
  } else {
    if (p.num_heads < 1 || q.d[2] % p.num_heads != 0 || v.d[2] % p.num_heads != 0) {
      return Status::error("the query width " + std::to_string(q.d[2]) + " and the value width " +
                           std::to_string(v.d[2]) + " must be multiples of num_heads " + std::to_string(p.num_heads));
    }
    if (k.d[0] != q.d[0] || k.d[2] != q.d[2]) {
      return Status::error(describeInput(spec(), in, 1) + " must match the query " + shapeString(q) +
                           " in batch and width");
    }
    if (v.d[0] != q.d[0] || v.d[1] != k.d[1]) {
      return Status::error(describeInput(spec(), in, 2) + " must match the key " + shapeString(k) +
                           " in batch and length");
    }
    if (hasShared) {
      TensorShape const& sk = in[4];
      TensorShape const& sv = in[5];
      if (sk.d[0] < 1 || q.d[0] % sk.d[0] != 0 || sk.d[2] != q.d[2]) {
        return Status::error(describeInput(spec(), in, 4) + " must have a batch that divides the query's " +
                             shapeString(q) + " and its width");
      }
      if (sv.d[0] != sk.d[0] || sv.d[1] != sk.d[1] || sv.d[2] != v.d[2]) {
        return Status::error(describeInput(spec(), in, 5) + " must match the shared key " + shapeString(sk) +
                             " in batch and length, and the value " + shapeString(v) + " in width");
      }
    }
  }
  if (hasBias) {
    TensorShape const& bias = in[3];
    // a padding mask is [B, 1, 1, Nk]: batch, heads and (except for logits) query rows broadcast
    bool const rowsOk = bias.d[2] == q.d[1] || (!logits && bias.d[2] == 1);
    bool const ok = (bias.d[0] == 1 || bias.d[0] == q.d[0]) && (bias.d[1] == 1 || bias.d[1] == p.num_heads) &&
                    rowsOk && bias.d[3] == keys;
    if (!ok) {
      return Status::error(describeInput(spec(), in, 3) + " must be [1 or " + std::to_string(q.d[0]) + ", 1 or " +
                           std::to_string(p.num_heads) + ", " + (logits ? "" : "1 or ") + std::to_string(q.d[1]) +
                           ", " + std::to_string(keys) + "]" +
                           (logits ? " (the logits)" : hasShared ? " (the shared keys, then the own)" : ""));
    }
  }
  return Status();
}

void DenseAttentionOp::bind(Params& p, void const* const* inputs, int32_t nbInputs, void* output) {
  p.query = inputs[0];
  p.key = inputs[1];
  p.value = inputs[2];
  p.bias = nbInputs > 3 ? inputs[3] : nullptr;
  p.shared_key = nbInputs > 5 ? inputs[4] : nullptr;
  p.shared_value = nbInputs > 5 ? inputs[5] : nullptr;
  p.output = output;
}

}  // namespace trt_plugins
}  // namespace attn_export
