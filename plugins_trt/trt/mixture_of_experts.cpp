// MixtureOfExperts (attn_export/ops/mixture_of_experts.py): fields and input shapes -> kernel params.
#include "ops.h"

namespace attn_export {
namespace trt_plugins {

namespace c = contracts::mixture_of_experts;

Status MixtureOfExpertsOp::checkFields(FieldValues const& f) {
  if (f.getInt(c::kCapacity) < 0) return Status::error("capacity must not be negative (0 means from capacity_factor)");
  if (f.getInt(c::kCapacity) == 0 && !(f.getFloat(c::kCapacityFactor) > 0.0f)) {
    return Status::error("capacity_factor must be positive when capacity is 0");
  }
  return Status();
}

Status MixtureOfExpertsOp::makeParams(FieldValues const& f, TensorShape const* in, int32_t nbInputs, Params& p) {
  ATTN_EXPORT_TRY(checkInputs(spec(), in, nbInputs));
  TensorShape const& hidden = in[0];
  TensorShape const& router = in[1];
  TensorShape const& expertIn = in[2];
  TensorShape const& expertOut = in[3];
  p = Params{};
  p.capacity = f.getInt(c::kCapacity);
  p.capacity_factor = f.getFloat(c::kCapacityFactor);
  p.activation = f.getCode(c::kActivation);
  p.batch = extent(hidden.d[0]);
  p.tokens = extent(hidden.d[1]);
  p.model_dim = extent(hidden.d[2]);
  p.num_experts = extent(router.d[1]);
  p.ffn_dim = extent(expertIn.d[2]);

  int64_t const d = hidden.d[2];
  int64_t const e = router.d[1];
  if (router.d[0] != d || e < 1) {
    return Status::error(describeInput(spec(), in, 1) + " must be [model_dim " + std::to_string(d) +
                         ", num_experts >= 1]");
  }
  if (expertIn.d[0] != e || expertIn.d[1] != d || expertIn.d[2] < 1) {
    return Status::error(describeInput(spec(), in, 2) + " must be [" + std::to_string(e) + ", " +
                         std::to_string(d) + ", ffn_dim >= 1]");
  }
  if (expertOut.d[0] != e || expertOut.d[1] != expertIn.d[2] || expertOut.d[2] != d) {
    return Status::error(describeInput(spec(), in, 3) + " must be [" + std::to_string(e) + ", " +
                         std::to_string(expertIn.d[2]) + ", " + std::to_string(d) + "]");
  }
  return Status();
}

void MixtureOfExpertsOp::bind(Params& p, void const* const* inputs, int32_t /*nbInputs*/, void* output) {
  p.hidden = inputs[0];
  p.router = inputs[1];
  p.expert_in = inputs[2];
  p.expert_out = inputs[3];
  p.output = output;
}

}  // namespace trt_plugins
}  // namespace attn_export
