// KernelizedAttention (attn_export/ops/kernelized_attention.py): fields and input shapes -> kernel params.
#include "ops.h"

namespace attn_export {
namespace trt_plugins {

namespace c = contracts::kernelized_attention;

namespace {
// The generated option order is the kernel's enum order (both follow kernelized_attention.FEATURE_MAPS).
static_assert(static_cast<int32_t>(FeatureMap::kFavorPositive) == 0, "feature_map codes follow FEATURE_MAPS");
static_assert(static_cast<int32_t>(Stabilizer::kProjection) == 1, "stabilizer codes follow STABILIZERS");
bool isFavor(FieldValues const& f) { return f.getCode(c::kFeatureMap) == static_cast<int32_t>(FeatureMap::kFavorPositive); }
}  // namespace

Status KernelizedAttentionOp::checkFields(FieldValues const& f) {
  if (f.getInt(c::kNumHeads) < 1) return Status::error("num_heads must be at least 1");
  int32_t const causal = f.getInt(c::kCausal);
  int32_t const normalize = f.getInt(c::kNormalize);
  if (causal != 0 && causal != 1) return Status::error("causal must be 0 or 1");
  if (normalize != 0 && normalize != 1) return Status::error("normalize must be 0 or 1");
  if (f.getFloat(c::kScale) < 0.0f) return Status::error("scale must not be negative (0 means 1/sqrt(D))");
  if (f.getFloat(c::kEps) < 0.0f) return Status::error("eps must not be negative");
  // the projection max runs over every key position: a causal token would read future keys
  if (causal == 1 && f.getCode(c::kStabilizer) != static_cast<int32_t>(Stabilizer::kLogits)) {
    return Status::error("stabilizer projection is defined for causal=0 only");
  }
  return Status();
}

Status KernelizedAttentionOp::makeParams(FieldValues const& f, TensorShape const* in, int32_t nbInputs,
                                         Params& p) {
  ATTN_EXPORT_TRY(checkInputs(spec(), in, nbInputs));
  TensorShape const& q = in[0];
  TensorShape const& k = in[1];
  TensorShape const& v = in[2];
  bool const favor = isFavor(f);
  p = Params{};
  p.num_heads = f.getInt(c::kNumHeads);
  p.feature_map = f.getCode(c::kFeatureMap);
  p.causal = f.getInt(c::kCausal);
  p.normalize = f.getInt(c::kNormalize);
  p.scale = f.getFloat(c::kScale);
  p.eps = f.getFloat(c::kEps);
  p.stabilizer = f.getCode(c::kStabilizer);
  p.batch = extent(q.d[0]);
  p.seq_len = extent(q.d[1]);
  p.head_dim = p.num_heads > 0 ? extent(q.d[2]) / p.num_heads : 0;
  p.v_head_dim = p.num_heads > 0 ? extent(v.d[2]) / p.num_heads : 0;
  p.num_features = favor && nbInputs > 3 ? extent(in[3].d[0]) : 0;

  if (p.num_heads < 1 || q.d[2] % p.num_heads != 0 || v.d[2] % p.num_heads != 0) {
    return Status::error("the query width " + std::to_string(q.d[2]) + " and the value width " +
                         std::to_string(v.d[2]) + " must be multiples of num_heads " + std::to_string(p.num_heads));
  }
  if (k.d[0] != q.d[0] || k.d[1] != q.d[1] || k.d[2] != q.d[2]) {
    return Status::error(describeInput(spec(), in, 1) + " must have the query's shape " + shapeString(q));
  }
  if (v.d[0] != q.d[0] || v.d[1] != q.d[1]) {
    return Status::error(describeInput(spec(), in, 2) + " must match the query " + shapeString(q) +
                         " in batch and length");
  }
  if (favor) {
    if (nbInputs < 4) return Status::error("feature_map favor_positive needs the projection input");
    if (in[3].d[1] != p.head_dim || in[3].d[0] < 1) {
      return Status::error(describeInput(spec(), in, 3) + " must be [num_features >= 1, head_dim " +
                           std::to_string(p.head_dim) + "]");
    }
  }
  return Status();
}

void KernelizedAttentionOp::bind(Params& p, void const* const* inputs, int32_t nbInputs, void* output) {
  p.query = inputs[0];
  p.key = inputs[1];
  p.value = inputs[2];
  // only favor_positive reads the projection; the other maps get nullptr as the kernel header asks
  p.projection = nbInputs > 3 && p.feature_map == static_cast<int32_t>(FeatureMap::kFavorPositive) ? inputs[3]
                                                                                                    : nullptr;
  p.output = output;
}

}  // namespace trt_plugins
}  // namespace attn_export
