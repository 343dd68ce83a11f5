// Index math the kernels share with host code: plain C++ (no CUDA include), `__host__ __device__` under nvcc, so
// a host test (plugins_trt/trt/tests/index_math_harness.cpp, driven by tests/test_index_math.py) checks exactly
// the code the kernels run against the Python op references.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ATTN_EXPORT_HD __host__ __device__ __forceinline__
#else
#define ATTN_EXPORT_HD inline
#endif

namespace attn_export {

// Element strides of an additive bias [bias_batch, bias_heads, bias_rows, kv_len] read as [B, H, Nq, Nk]: a
// dimension of extent 1 broadcasts (stride 0), so a padding mask [B, 1, 1, Nk] is read in place, never expanded.
struct BiasStrides {
  int64_t batch, head, row;
};

ATTN_EXPORT_HD BiasStrides bias_strides(int32_t bias_batch, int32_t bias_heads, int32_t bias_rows, int32_t kv_len) {
  const int64_t plane = static_cast<int64_t>(bias_rows) * kv_len;
  BiasStrides s{};
  s.row = bias_rows == 1 ? 0 : kv_len;
  s.head = bias_heads == 1 ? 0 : plane;
  s.batch = bias_batch == 1 ? 0 : plane * bias_heads;
  return s;
}

ATTN_EXPORT_HD int64_t bias_offset(const BiasStrides& s, int32_t b, int32_t h, int32_t i, int32_t j) {
  return b * s.batch + h * s.head + i * s.row + j;
}

// DeBERTa's relative row delta = clamp(bucket(rel) + span, 0, 2 span - 1) for rel = i - j, with bucket
// transformers' DeBERTa-v2 make_log_bucket_position (max_position > 0) or the identity (0): no clamp of rel to
// +-(max_position - 1) first, float32 arithmetic as transformers does it, logs taken in double and rounded to
// float32 (the correctly rounded float32 log, as disentangled_attention.log_bucket takes it).
ATTN_EXPORT_HD int32_t relative_row(int64_t rel, int32_t span, int32_t max_position) {
  const int32_t mid = span / 2;
  if (max_position > 0 && (rel > mid || rel < -mid)) {
    const float magnitude = static_cast<float>(rel < 0 ? -rel : rel);
    const float ratio = static_cast<float>(log(static_cast<double>(magnitude / static_cast<float>(mid))));
    const float base = static_cast<float>(static_cast<double>(max_position - 1) / mid);
    const float denominator = static_cast<float>(log(static_cast<double>(base)));
    const float log_position = ceilf(ratio / denominator * static_cast<float>(mid - 1)) + static_cast<float>(mid);
    rel = rel > 0 ? static_cast<int64_t>(log_position) : -static_cast<int64_t>(log_position);
  }
  const int64_t index = rel + span;
  return static_cast<int32_t>(index < 0 ? 0 : (index > 2 * static_cast<int64_t>(span) - 1 ? 2 * span - 1 : index));
}

}  // namespace attn_export
