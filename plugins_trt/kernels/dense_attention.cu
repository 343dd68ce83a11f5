// DenseAttention: softmax(scale * q.k^T + bias [+ causal]) v (attn_export/ops/dense_attention.py).
// Key tiles run from 0 to the last key any row of the query tile may see (causal tiles past the diagonal are never
// loaded); the bias is read in the score's fragment layout, so it costs one pass over [Nq, Nk] and nothing more.
#include "attention_core.cuh"

namespace attn_export {
namespace detail {
namespace {

template <typename T>
struct DensePolicy {
  const T* bias;  // nullptr: none
  int64_t bias_batch_stride, bias_head_stride;
  int q_len, kv_len, causal, diagonal;  // diagonal = kv_len - q_len: query i sees keys j <= i + diagonal
  float scale_log2;
  int rows_per_tile;
  int tile;

  __device__ int prepare(int*, int, int, int q0) const {
    int keys = kv_len;
    if (causal) {
      const int last_row = min(q0 + rows_per_tile, q_len) - 1;
      keys = min(keys, max(last_row + diagonal + 1, 0));
    }
    return (keys + tile - 1) / tile;
  }
  __device__ int tile_start(const int*, int it) const { return it * tile; }
  __device__ float logit(int b, int h, int i, int j, float qk) const {
    if (i >= q_len || j >= kv_len || (causal && j > i + diagonal)) return -INFINITY;
    float x = qk * scale_log2;
    if (bias) {
      const int64_t at = b * bias_batch_stride + h * bias_head_stride + static_cast<int64_t>(i) * kv_len + j;
      x += to_float(bias[at]) * kLog2e;
    }
    return x;
  }
};

template <typename T>
cudaError_t run(const DenseAttentionParams& p, cudaStream_t stream) {
  const AttentionProblem pr = make_problem(p.query, p.key, p.value, p.output, p.num_heads, p.q_len, p.kv_len,
                                           p.head_dim, p.v_head_dim);
  DensePolicy<T> pol{};
  pol.bias = static_cast<const T*>(p.bias);
  const int64_t plane = static_cast<int64_t>(p.q_len) * p.kv_len;
  pol.bias_head_stride = p.bias_heads == 1 ? 0 : plane;
  pol.bias_batch_stride = p.bias_batch == 1 ? 0 : plane * p.bias_heads;
  pol.q_len = p.q_len, pol.kv_len = p.kv_len, pol.causal = p.causal != 0, pol.diagonal = p.kv_len - p.q_len;
  const float scale = p.scale != 0.f ? p.scale : 1.f / std::sqrt(static_cast<float>(p.head_dim));
  pol.scale_log2 = scale * kLog2e;

  if constexpr (sizeof(T) == 2) {
    if (tc_attention_applies<T>(pr)) {
      pol.rows_per_tile = 64;
      switch (p.head_dim) {
        case 32: return launch_tc_attention<T, 32, 4, 64>(pr, pol, p.batch, 0, stream);
        case 64: return launch_tc_attention<T, 64, 4, 64>(pr, pol, p.batch, 0, stream);
        case 128: return launch_tc_attention<T, 128, 4, 32>(pr, pol, p.batch, 0, stream);
      }
    }
  }
  pol.rows_per_tile = kSimtRows;
  return launch_simt_attention<T>(pr, pol, p.batch, kSimtRows, kSimtKeys, 0, stream);
}

}  // namespace
}  // namespace detail

size_t dense_attention_workspace_size(const DenseAttentionParams&) { return 0; }

cudaError_t launch_dense_attention(const DenseAttentionParams& p, DataType dtype, void*, cudaStream_t stream) {
  if (p.batch <= 0 || p.num_heads <= 0 || p.q_len < 0 || p.kv_len < 0 || p.head_dim <= 0 || p.v_head_dim <= 0)
    return cudaErrorInvalidValue;
  if (p.bias && ((p.bias_batch != 1 && p.bias_batch != p.batch) || (p.bias_heads != 1 && p.bias_heads != p.num_heads)))
    return cudaErrorInvalidValue;
  if (p.q_len == 0) return cudaSuccess;
  return detail::dispatch_dtype(dtype, [&](auto t) { return detail::run<decltype(t)>(p, stream); });
}

}  // namespace attn_export
