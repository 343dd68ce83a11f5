// Compiled by the host C++ compiler alone: the public header must not need nvcc (the TensorRT wrappers and the
// torch extension include it from .cpp files).
#include "attn_export_kernels.h"
#include "launch_plan.h"

namespace {
[[maybe_unused]] attn_export::DataType header_check_dtype = attn_export::DataType::kFloat16;
}  // namespace
