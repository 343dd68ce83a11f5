// DenseAttention: weights(scale * q.k^T + bias [+ causal]) v (attn_export/ops/dense_attention.py), weights softmax
// or relu(s)^2, and with logits_input the bias as the whole score (Q and K are then never loaded).
// Key tiles run from 0 to the last key any row of the query tile may see (causal tiles past the diagonal are never
// loaded); the bias is read in the score's fragment layout, so it costs one pass over [Nq, Nk] and nothing more.
// score_fn and logits_input are template arguments of the policy, so the softmax path compiles as before.
// The bias is read through broadcast strides (index_math.h), so [B, 1, 1, Nk] padding masks need no expansion.
// masked_rows kNone: a row with no visible key is NaN (0/0), unchecked, as a plain softmax makes it.
// Shared keys (shared_key, shared_value) lead each row's keys: the core reads them in place from the row's group's
// set, so the policy sees one key axis of shared_len + kv_len keys, as the bias does.
// masked_rows kMean: a masked score (-inf from the bias or the causal mask) becomes kMaskedLogit, a finite floor, so
// a row with no visible key averages every key uniformly while any visible key outweighs the floor by exp2(1e30).
#include "attention_core.cuh"
#include "index_math.h"

namespace attn_export {
namespace detail {
namespace {

template <typename T, bool RELU_SQUARED, bool LOGITS>
struct DensePolicy {
  static constexpr bool kReluSquared = RELU_SQUARED;
  static constexpr bool kReadsQK = !LOGITS;
  // softmax works in log2 units (exp2f), relu(s)^2 on s itself
  static constexpr float kUnits = RELU_SQUARED ? 1.f : kLog2e;

  const T* bias;  // nullptr: none (never with LOGITS)
  BiasStrides bias_strides;
  int q_len, kv_len, causal, diagonal;  // diagonal = kv_len - q_len: query i sees keys j <= i + diagonal
  bool masked_mean;                     // masked_rows kMean (softmax only)
  float empty_row;                      // scales a softmax row with no visible key: 0, or NaN with kNone
  float scale_units;                    // scale * kUnits
  int rows_per_tile;
  int tile;

  __device__ int prepare(int*, int, int, int q0) const {
    int keys = kv_len;
    if (causal && !masked_mean) {  // a row the causal mask empties averages every key with kMean
      const int last_row = min(q0 + rows_per_tile, q_len) - 1;
      keys = min(keys, max(last_row + diagonal + 1, 0));
    }
    return (keys + tile - 1) / tile;
  }
  __device__ int tile_start(const int*, int it) const { return it * tile; }
  __device__ float logit(int b, int h, int i, int j, float qk) const {
    if (i >= q_len || j >= kv_len) return -INFINITY;
    if (causal && j > i + diagonal) return masked_mean ? kMaskedLogit : -INFINITY;
    float x = LOGITS ? 0.f : qk * scale_units;
    if (LOGITS || bias) x += bias_units(to_float(bias[bias_offset(bias_strides, b, h, i, j)]), kUnits);
    return masked_mean && x < kMaskedLogit ? kMaskedLogit : x;  // NaN stays NaN
  }
};

template <typename T, bool RELU_SQUARED, bool LOGITS>
cudaError_t run_with(const DenseAttentionParams& p, cudaStream_t stream) {
  // Without QK the problem's head dim is the value's, which picks the tensor-core tile; q and k stay unread.
  const int head_dim = LOGITS ? p.v_head_dim : p.head_dim;
  AttentionProblem pr = make_problem(LOGITS ? nullptr : p.query, LOGITS ? nullptr : p.key, p.value, p.output,
                                     p.num_heads, p.q_len, p.kv_len, head_dim, p.v_head_dim);
  if (p.shared_key) add_shared_keys(pr, p.shared_key, p.shared_value, p.shared_len, p.batch / p.shared_batch);
  using Policy = DensePolicy<T, RELU_SQUARED, LOGITS>;
  Policy pol{};
  pol.bias = static_cast<const T*>(p.bias);
  pol.bias_strides = bias_strides(p.bias_batch, p.bias_heads, p.bias_rows, pr.kv_len);
  pol.masked_mean = !RELU_SQUARED && p.masked_rows == static_cast<int32_t>(MaskedRows::kMean);
  pol.empty_row = p.masked_rows == static_cast<int32_t>(MaskedRows::kNone) ? NAN : 0.f;
  pol.q_len = p.q_len, pol.kv_len = pr.kv_len, pol.causal = p.causal != 0, pol.diagonal = pr.kv_len - p.q_len;
  if (!LOGITS) {
    const float scale = p.scale != 0.f ? p.scale : 1.f / std::sqrt(static_cast<float>(p.head_dim));
    pol.scale_units = scale * Policy::kUnits;
  }

  if constexpr (sizeof(T) == 2) {
    if (tc_attention_applies<T>(pr)) {
      pol.rows_per_tile = 64;
      switch (head_dim) {
        case 32: return launch_tc_attention<T, 32, 4, 64>(pr, pol, p.batch, 0, stream);
        case 64: return launch_tc_attention<T, 64, 4, 64>(pr, pol, p.batch, 0, stream);
        case 128: return launch_tc_attention<T, 128, 4, 32>(pr, pol, p.batch, 0, stream);
      }
    }
  }
  pol.rows_per_tile = kSimtRows;
  return launch_simt_attention<T>(pr, pol, p.batch, kSimtRows, kSimtKeys, 0, stream);
}

template <typename T>
cudaError_t run(const DenseAttentionParams& p, cudaStream_t stream) {
  const bool relu_squared = p.score_fn == static_cast<int32_t>(ScoreFn::kReluSquared);
  if (p.logits_input) return relu_squared ? run_with<T, true, true>(p, stream) : run_with<T, false, true>(p, stream);
  return relu_squared ? run_with<T, true, false>(p, stream) : run_with<T, false, false>(p, stream);
}

}  // namespace
}  // namespace detail

size_t dense_attention_workspace_size(const DenseAttentionParams&) { return 0; }

cudaError_t launch_dense_attention(const DenseAttentionParams& p, DataType dtype, void*, cudaStream_t stream) {
  if (p.batch <= 0 || p.num_heads <= 0 || p.q_len < 0 || p.kv_len < 0 || p.v_head_dim <= 0)
    return cudaErrorInvalidValue;
  if (p.score_fn < static_cast<int32_t>(ScoreFn::kSoftmax) || p.score_fn > static_cast<int32_t>(ScoreFn::kReluSquared))
    return cudaErrorInvalidValue;
  if (p.logits_input != 0 && p.logits_input != 1) return cudaErrorInvalidValue;
  if (p.logits_input && !p.bias) return cudaErrorInvalidValue;  // the logits come in as the bias
  if (!p.logits_input && p.head_dim <= 0) return cudaErrorInvalidValue;
  if (p.bias && ((p.bias_batch != 1 && p.bias_batch != p.batch) || (p.bias_heads != 1 && p.bias_heads != p.num_heads) ||
                 (p.bias_rows != 1 && p.bias_rows != p.q_len) || (p.logits_input && p.bias_rows != p.q_len)))
    return cudaErrorInvalidValue;
  if (p.masked_rows < static_cast<int32_t>(MaskedRows::kZeros) ||
      p.masked_rows > static_cast<int32_t>(MaskedRows::kNone))
    return cudaErrorInvalidValue;
  if (!p.shared_key != !p.shared_value) return cudaErrorInvalidValue;
  if (p.shared_key && (p.logits_input || p.shared_len < 0 || p.shared_batch <= 0 || p.batch % p.shared_batch != 0 ||
                       int64_t{p.kv_len} + p.shared_len > INT32_MAX))
    return cudaErrorInvalidValue;
  if (p.q_len == 0) return cudaSuccess;
  return detail::dispatch_dtype(dtype, [&](auto t) { return detail::run<decltype(t)>(p, stream); });
}

}  // namespace attn_export
