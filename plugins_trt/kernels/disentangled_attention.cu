// DisentangledAttention (attn_export/ops/disentangled_attention.py), in three steps on one stream:
//   1. delta[i - j + N - 1]: the (log-bucketed, clamped) relative index, one entry per distance, by
//      index_math.h's relative_row (transformers' float32 make_log_bucket_position, tested on the host);
//   2. c2p = Q rel_key^T and p2c = K rel_query^T, [B, H, N, 2*span] in fp32 (two batched GEMMs; 2*span columns,
//      so O(N * span * D) work, not O(N^2 * D));
//   3. fused attention whose scores gather c2p[i, delta] + p2c[j, delta] next to q.k, so the N x N
//      score matrix never reaches memory (NVIDIA's DeBERTa plugin instead fuses only the gather and softmax).
// c2p = 0 / p2c = 0 skip that GEMM and its gather. The optional bias is read through broadcast strides and
// masked_rows kMean floors masked scores as DenseAttention does (attention_core.cuh: kMaskedLogit).
#include "attention_core.cuh"
#include "gemm.cuh"
#include "index_math.h"

namespace attn_export {
namespace detail {
namespace {

__global__ void relative_index_kernel(int* delta, int n, int span, int max_position) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (x >= 2 * n - 1) return;
  delta[x] = relative_row(static_cast<int64_t>(x) - (n - 1), span, max_position);
}

// BIAS is a template argument: without a bias nothing is masked, and the D=32 tensor-core kernel keeps its
// registers (the runtime branch spilled on sm_80).
template <typename T, bool BIAS>
struct DisentangledPolicy {
  const float* c2p;  // [B, H, N, 2*span] or nullptr (term off)
  const float* p2c;  // [B, H, N, 2*span] or nullptr (term off)
  const int* delta;  // [2N - 1]
  const T* bias;     // broadcast [bias_batch, bias_heads, bias_rows, N] (BIAS only)
  BiasStrides bias_strides;
  int n, heads, two_span;
  bool masked_mean;
  static constexpr float empty_row = 0.f;  // a row with no visible key is zeros (a runtime NaN spilled)
  float scale_log2;
  int tile;

  __device__ int prepare(int*, int, int, int) const { return (n + tile - 1) / tile; }
  __device__ int tile_start(const int*, int it) const { return it * tile; }
  __device__ float logit(int b, int h, int i, int j, float qk) const {
    if (i >= n || j >= n) return -INFINITY;
    const int d = delta[i - j + n - 1];
    const int64_t plane = static_cast<int64_t>(b * heads + h) * n;
    float s = qk;
    if (c2p) s += c2p[(plane + i) * two_span + d];
    if (p2c) s += p2c[(plane + j) * two_span + d];
    s *= scale_log2;
    if constexpr (BIAS) {
      s += bias_units(to_float(bias[bias_offset(bias_strides, b, h, i, j)]), kLog2e);
      if (masked_mean && s < kMaskedLogit) s = kMaskedLogit;  // NaN stays NaN
    }
    return s;
  }
};

struct Workspace {
  int* delta;
  float* c2p;
  float* p2c;
};

Workspace carve(const DisentangledAttentionParams& p, void* base) {
  char* w = static_cast<char*>(base);
  Workspace ws{};
  ws.delta = reinterpret_cast<int*>(w);
  w += align_up(sizeof(int) * (2 * static_cast<size_t>(p.seq_len)));
  const size_t plane = sizeof(float) * static_cast<size_t>(p.batch) * p.num_heads * p.seq_len * 2 * p.span;
  ws.c2p = reinterpret_cast<float*>(w);
  ws.p2c = reinterpret_cast<float*>(w + align_up(plane));
  return ws;
}

template <typename T, bool BIAS>
cudaError_t attend(const DisentangledAttentionParams& p, const Workspace& ws, cudaStream_t stream) {
  const int n = p.seq_len, d = p.head_dim, heads = p.num_heads;
  const AttentionProblem pr = make_problem(p.query, p.key, p.value, p.output, heads, n, n, d, d);
  DisentangledPolicy<T, BIAS> pol{};
  pol.c2p = p.c2p ? ws.c2p : nullptr, pol.p2c = p.p2c ? ws.p2c : nullptr, pol.delta = ws.delta;
  pol.bias = static_cast<const T*>(p.bias);
  pol.bias_strides = bias_strides(p.bias_batch, p.bias_heads, p.bias_rows, n);
  pol.masked_mean = p.masked_rows == static_cast<int32_t>(MaskedRows::kMean);
  pol.n = n, pol.heads = heads, pol.two_span = 2 * p.span;
  const float terms = 1.f + (p.c2p ? 1.f : 0.f) + (p.p2c ? 1.f : 0.f);
  const float scale = p.scale != 0.f ? p.scale : 1.f / std::sqrt(terms * d);
  pol.scale_log2 = scale * kLog2e;
  if constexpr (sizeof(T) == 2) {
    if (tc_attention_applies<T>(pr)) {
      switch (d) {
        // with a bias, 32-key tiles at D=64 (the bias gather's registers spill at 64 on sm_80); at D=32 the
        // 32-key tile spills on sm_87 once the batch is sliced, the 64-key one does not
        case 32: return launch_tc_attention<T, 32, 4, 64>(pr, pol, p.batch, 0, stream);
        case 64: return launch_tc_attention<T, 64, 4, BIAS ? 32 : 64>(pr, pol, p.batch, 0, stream);
        case 128: return launch_tc_attention<T, 128, 4, 32>(pr, pol, p.batch, 0, stream);
      }
    }
  }
  return launch_simt_attention<T>(pr, pol, p.batch, kSimtRows, kSimtKeys, 0, stream);
}

template <typename T>
cudaError_t run(const DisentangledAttentionParams& p, void* workspace, cudaStream_t stream) {
  const int n = p.seq_len, d = p.head_dim, heads = p.num_heads, two_span = 2 * p.span;
  const Workspace ws = carve(p, workspace);
  relative_index_kernel<<<ceil_div(2 * n - 1, 256), 256, 0, stream>>>(ws.delta, n, p.span, p.max_position);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  // c2p[b, h] = Q[b, :, h] rel_key[:, h]^T and p2c[b, h] = K[b, :, h] rel_query[:, h]^T
  GemmArgs g{};
  g.M = n, g.N = two_span, g.K = d, g.batch = p.batch * heads, g.batch_split = heads;
  g.lda = static_cast<int64_t>(heads) * d, g.a_hi = g.lda * n, g.a_lo = d;
  g.ldb = static_cast<int64_t>(heads) * d, g.b_hi = 0, g.b_lo = d, g.b_nk = 1;
  g.ldc = two_span, g.c_lo = static_cast<int64_t>(n) * two_span, g.c_hi = g.c_lo * heads, g.c_float = 1;
  if (p.c2p) {
    g.a = p.query, g.b = p.rel_key, g.c = ws.c2p;
    if ((err = launch_gemm<T>(g, stream)) != cudaSuccess) return err;
  }
  if (p.p2c) {
    g.a = p.key, g.b = p.rel_query, g.c = ws.p2c;
    if ((err = launch_gemm<T>(g, stream)) != cudaSuccess) return err;
  }

  return p.bias ? attend<T, true>(p, ws, stream) : attend<T, false>(p, ws, stream);
}

}  // namespace
}  // namespace detail

size_t disentangled_attention_workspace_size(const DisentangledAttentionParams& p) {
  if (p.seq_len <= 0 || p.span <= 0) return 0;
  const size_t plane = sizeof(float) * static_cast<size_t>(p.batch) * p.num_heads * p.seq_len * 2 * p.span;
  return detail::align_up(sizeof(int) * 2 * static_cast<size_t>(p.seq_len)) + 2 * detail::align_up(plane);
}

cudaError_t launch_disentangled_attention(const DisentangledAttentionParams& p, DataType dtype, void* workspace,
                                          cudaStream_t stream) {
  if (p.batch <= 0 || p.num_heads <= 0 || p.head_dim <= 0 || p.seq_len < 0 || p.span <= 0 || p.max_position < 0)
    return cudaErrorInvalidValue;
  if ((p.c2p != 0 && p.c2p != 1) || (p.p2c != 0 && p.p2c != 1) ||
      (p.masked_rows != static_cast<int32_t>(MaskedRows::kZeros) && p.masked_rows != static_cast<int32_t>(MaskedRows::kMean)))
    return cudaErrorInvalidValue;
  if (p.bias && ((p.bias_batch != 1 && p.bias_batch != p.batch) || (p.bias_heads != 1 && p.bias_heads != p.num_heads) ||
                 (p.bias_rows != 1 && p.bias_rows != p.seq_len)))
    return cudaErrorInvalidValue;
  if (p.seq_len == 0) return cudaSuccess;
  if (!workspace) return cudaErrorInvalidValue;
  return detail::dispatch_dtype(dtype, [&](auto t) { return detail::run<decltype(t)>(p, workspace, stream); });
}

}  // namespace attn_export
