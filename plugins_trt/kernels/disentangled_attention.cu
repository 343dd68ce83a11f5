// DisentangledAttention (attn_export/ops/disentangled_attention.py), in three steps on one stream:
//   1. delta[i - j + N - 1]: the (log-bucketed, clamped) relative index, one entry per distance, in double
//      precision like the reference;
//   2. c2p = Q rel_key^T and p2c = K rel_query^T, [B, H, N, 2*span] in fp32 (two batched GEMMs; 2*span columns,
//      so O(N * span * D) work, not O(N^2 * D));
//   3. fused attention whose scores gather c2p[i, delta] + p2c[j, delta] next to q.k, so the N x N
//      score matrix never reaches memory (NVIDIA's DeBERTa plugin instead fuses only the gather and softmax).
#include "attention_core.cuh"
#include "gemm.cuh"

namespace attn_export {
namespace detail {
namespace {

__global__ void relative_index_kernel(int* delta, int n, int span, int max_position) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (x >= 2 * n - 1) return;
  long long rel = x - (n - 1);
  if (max_position > 0) {
    const int mid = span / 2;
    if (rel > mid || rel < -mid) {  // DeBERTa-v2 make_log_bucket_position: outside +-mid, log-spaced buckets
      const double magnitude = fabs(static_cast<double>(rel));
      const double log_position =
          ceil(log(magnitude / mid) / log(static_cast<double>(max_position - 1) / mid) * (mid - 1)) + mid;
      rel = static_cast<long long>(rel > 0 ? log_position : -log_position);
    }
  }
  const long long index = rel + span;
  delta[x] = static_cast<int>(index < 0 ? 0 : (index > 2 * span - 1 ? 2 * span - 1 : index));
}

struct DisentangledPolicy {
  const float* c2p;  // [B, H, N, 2*span]
  const float* p2c;  // [B, H, N, 2*span]
  const int* delta;  // [2N - 1]
  int n, heads, two_span;
  float scale_log2;
  int tile;

  __device__ int prepare(int*, int, int, int) const { return (n + tile - 1) / tile; }
  __device__ int tile_start(const int*, int it) const { return it * tile; }
  __device__ float logit(int b, int h, int i, int j, float qk) const {
    if (i >= n || j >= n) return -INFINITY;
    const int d = delta[i - j + n - 1];
    const int64_t plane = static_cast<int64_t>(b * heads + h) * n;
    return (qk + c2p[(plane + i) * two_span + d] + p2c[(plane + j) * two_span + d]) * scale_log2;
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
  g.a = p.query, g.b = p.rel_key, g.c = ws.c2p;
  if ((err = launch_gemm<T>(g, stream)) != cudaSuccess) return err;
  g.a = p.key, g.b = p.rel_query, g.c = ws.p2c;
  if ((err = launch_gemm<T>(g, stream)) != cudaSuccess) return err;

  const AttentionProblem pr = make_problem(p.query, p.key, p.value, p.output, heads, n, n, d, d);
  DisentangledPolicy pol{};
  pol.c2p = ws.c2p, pol.p2c = ws.p2c, pol.delta = ws.delta;
  pol.n = n, pol.heads = heads, pol.two_span = two_span;
  const float scale = p.scale != 0.f ? p.scale : 1.f / std::sqrt(3.f * d);
  pol.scale_log2 = scale * kLog2e;
  if constexpr (sizeof(T) == 2) {
    if (tc_attention_applies<T>(pr)) {
      switch (d) {
        case 32: return launch_tc_attention<T, 32, 4, 64>(pr, pol, p.batch, 0, stream);
        case 64: return launch_tc_attention<T, 64, 4, 64>(pr, pol, p.batch, 0, stream);
        case 128: return launch_tc_attention<T, 128, 4, 32>(pr, pol, p.batch, 0, stream);
      }
    }
  }
  return launch_simt_attention<T>(pr, pol, p.batch, kSimtRows, kSimtKeys, 0, stream);
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
  if (p.seq_len == 0) return cudaSuccess;
  if (!workspace) return cudaErrorInvalidValue;
  return detail::dispatch_dtype(dtype, [&](auto t) { return detail::run<decltype(t)>(p, workspace, stream); });
}

}  // namespace attn_export
