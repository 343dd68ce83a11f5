// LongConvolution (attn_export/ops/long_convolution.py): fields and input shapes -> kernel params.
#include "ops.h"

namespace attn_export {
namespace trt_plugins {

namespace c = contracts::long_convolution;

Status LongConvolutionOp::checkFields(FieldValues const& f) {
  if (f.getInt(c::kChannels) < 0) return Status::error("channels must not be negative (0 means from the input)");
  return Status();
}

Status LongConvolutionOp::makeParams(FieldValues const& f, TensorShape const* in, int32_t nbInputs, Params& p) {
  ATTN_EXPORT_TRY(checkInputs(spec(), in, nbInputs));
  TensorShape const& u = in[0];
  TensorShape const& kernel = in[1];
  TensorShape const& skip = in[2];
  int32_t const channels = f.getInt(c::kChannels);
  p = Params{};
  p.batch = extent(u.d[0]);
  p.seq_len = extent(u.d[1]);
  p.channels = extent(u.d[2]);  // the attribute only matters to ONNX Conv; the input says the same
  p.kernel_len = extent(kernel.d[1]);

  if (channels != 0 && channels != u.d[2]) {
    return Status::error(describeInput(spec(), in, 0) + " has " + std::to_string(u.d[2]) +
                         " channels but the channels field says " + std::to_string(channels));
  }
  if (kernel.d[0] != u.d[2] || kernel.d[1] < u.d[1]) {
    return Status::error(describeInput(spec(), in, 1) + " must be [channels " + std::to_string(u.d[2]) +
                         ", taps >= sequence length " + std::to_string(u.d[1]) + "]");
  }
  if (skip.d[0] != u.d[2]) {
    return Status::error(describeInput(spec(), in, 2) + " must be [channels " + std::to_string(u.d[2]) + "]");
  }
  // both directions share one row stride in the kernel
  if (nbInputs > 3 && (in[3].d[0] != kernel.d[0] || in[3].d[1] != kernel.d[1])) {
    return Status::error(describeInput(spec(), in, 3) + " must have the kernel's shape " + shapeString(kernel));
  }
  return Status();
}

void LongConvolutionOp::bind(Params& p, void const* const* inputs, int32_t nbInputs, void* output) {
  p.input = inputs[0];
  p.kernel = inputs[1];
  p.skip = inputs[2];
  p.kernel_reverse = nbInputs > 3 ? inputs[3] : nullptr;
  p.output = output;
}

}  // namespace trt_plugins
}  // namespace attn_export
