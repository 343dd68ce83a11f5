// MixtureOfExperts (attn_export/ops/mixture_of_experts.py): Switch top-1 routing with capacity.
//   1. router: one warp per token, logits in fp32, softmax max and argmax -> (expert, gate);
//   2. dispatch: one warp per group walks its tokens in order (32 at a time, __match_any_sync ranks tokens that
//      chose the same expert), giving each kept token its queue slot; no host round trip, no sort;
//   3. expert FFN as two grouped GEMMs over (expert, group) entries whose row counts live on the device: the first
//      gathers its token rows and applies the activation, the second scales by the gate and scatters rows back.
// Dropped tokens keep the zeros the output is cleared to. Only routed tokens are computed (never all experts densely).
#include <cmath>

#include "gemm.cuh"

namespace attn_export {
namespace detail {
namespace {

constexpr int kRouterWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kRouterWarps * 32)
    router_kernel(const T* hidden, const T* router, int rows, int dim, int experts, int* choice, float* gate) {
  extern __shared__ float s_logits[];  // [kRouterWarps][experts]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = blockIdx.x * kRouterWarps + warp;
  if (t >= rows) return;
  float* logits = s_logits + warp * experts;
  const T* x = hidden + static_cast<int64_t>(t) * dim;
  for (int e = 0; e < experts; ++e) {
    float acc = 0.f;
    for (int k = lane; k < dim; k += 32)
      acc = fmaf(to_float(x[k]), to_float(router[static_cast<int64_t>(k) * experts + e]), acc);
    acc = warp_sum(acc);
    if (lane == 0) logits[e] = acc;
  }
  __syncwarp();
  float best = -INFINITY;
  int arg = experts;
  for (int e = lane; e < experts; e += 32)
    if (logits[e] > best) best = logits[e], arg = e;
  for (int o = 16; o > 0; o >>= 1) {  // the largest logit, the first expert on ties
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
    if (ob > best || (ob == best && oa < arg)) best = ob, arg = oa;
  }
  float sum = 0.f;
  for (int e = lane; e < experts; e += 32) sum += expf(logits[e] - best);
  sum = warp_sum(sum);
  if (lane == 0) {
    choice[t] = arg < experts ? arg : 0;
    gate[t] = 1.f / sum;  // softmax at the argmax: exp(0) / sum
  }
}

// slot_rows[(e * batch + b) * capacity + slot] = the token row (b * tokens + t) holding that slot of e's queue
__global__ void dispatch_kernel(const int* choice, int tokens, int experts, int batch, int capacity, int* slot_rows,
                                int* counts) {
  extern __shared__ int queue_len[];  // [experts]
  const int b = blockIdx.x, lane = threadIdx.x;
  for (int e = lane; e < experts; e += 32) queue_len[e] = 0;
  __syncwarp();
  const unsigned lower = (1u << lane) - 1u;
  for (int t0 = 0; t0 < tokens; t0 += 32) {
    const int t = t0 + lane;
    const int e = t < tokens ? choice[static_cast<int64_t>(b) * tokens + t] : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & lower);  // earlier tokens of this chunk with the same expert
    const int base = e >= 0 ? queue_len[e] : 0;
    __syncwarp();
    if (e >= 0) {
      const int place = base + rank;  // 0-based place in the queue; kept iff place < capacity
      if (place < capacity) slot_rows[(static_cast<int64_t>(e) * batch + b) * capacity + place] = b * tokens + t;
      if (rank == 0) queue_len[e] = base + __popc(peers);
    }
    __syncwarp();
  }
  for (int e = lane; e < experts; e += 32) counts[e * batch + b] = min(queue_len[e], capacity);
}

// capacity per expert and group, at most the group's token count (a queue cannot be longer)
int effective_capacity(const MixtureOfExpertsParams& p) {
  const double per_expert = static_cast<double>(p.tokens) * p.capacity_factor / p.num_experts;
  long long c = p.capacity > 0 ? p.capacity : static_cast<long long>(std::ceil(per_expert));
  if (c < 0) c = 0;
  return static_cast<int>(c < p.tokens ? c : p.tokens);
}

struct Workspace {
  int* choice;
  float* gate;
  int* slot_rows;
  int* counts;
  void* ffn;  // [experts * batch, capacity, ffn_dim] activations between the two GEMMs
};

Workspace carve(const MixtureOfExpertsParams& p, void* base, size_t* total) {
  const size_t rows = static_cast<size_t>(p.batch) * p.tokens;
  const size_t entries = static_cast<size_t>(p.num_experts) * p.batch;
  const size_t cap = effective_capacity(p);
  char* w = static_cast<char*>(base);
  Workspace ws{};
  size_t off = 0;
  ws.choice = reinterpret_cast<int*>(w + off), off += align_up(sizeof(int) * rows);
  ws.gate = reinterpret_cast<float*>(w + off), off += align_up(sizeof(float) * rows);
  ws.slot_rows = reinterpret_cast<int*>(w + off), off += align_up(sizeof(int) * entries * cap);
  ws.counts = reinterpret_cast<int*>(w + off), off += align_up(sizeof(int) * entries);
  ws.ffn = w + off, off += align_up(sizeof(float) * entries * cap * p.ffn_dim);
  if (total) *total = off;
  return ws;
}

template <typename T>
cudaError_t run(const MixtureOfExpertsParams& p, void* workspace, cudaStream_t stream) {
  const int rows = p.batch * p.tokens, experts = p.num_experts, cap = effective_capacity(p);
  cudaError_t err = cudaMemsetAsync(p.output, 0, sizeof(T) * static_cast<size_t>(rows) * p.model_dim, stream);
  if (err != cudaSuccess || cap == 0) return err;
  const Workspace ws = carve(p, workspace, nullptr);

  const size_t router_smem = sizeof(float) * kRouterWarps * experts;
  if ((err = allow_smem(router_kernel<T>, router_smem)) != cudaSuccess) return err;
  router_kernel<T><<<ceil_div(rows, kRouterWarps), kRouterWarps * 32, router_smem, stream>>>(
      static_cast<const T*>(p.hidden), static_cast<const T*>(p.router), rows, p.model_dim, experts, ws.choice,
      ws.gate);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const size_t dispatch_smem = sizeof(int) * experts;
  if ((err = allow_smem(dispatch_kernel, dispatch_smem)) != cudaSuccess) return err;
  dispatch_kernel<<<p.batch, 32, dispatch_smem, stream>>>(ws.choice, p.tokens, experts, p.batch, cap, ws.slot_rows,
                                                          ws.counts);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  const int64_t ffn_entry = static_cast<int64_t>(cap) * p.ffn_dim;
  GemmArgs up{};  // ffn[e, b] = act(hidden[slot rows] expert_in[e])
  up.M = cap, up.N = p.ffn_dim, up.K = p.model_dim, up.batch = experts * p.batch, up.batch_split = p.batch;
  up.m_count = ws.counts;
  up.a = p.hidden, up.lda = p.model_dim, up.a_rows = ws.slot_rows;
  up.b = p.expert_in, up.ldb = p.ffn_dim, up.b_hi = static_cast<int64_t>(p.model_dim) * p.ffn_dim, up.b_lo = 0;
  up.c = ws.ffn, up.ldc = p.ffn_dim, up.c_hi = ffn_entry * p.batch, up.c_lo = ffn_entry;
  up.activation = p.activation + 1, up.c_float = 0;
  if ((err = launch_gemm<T>(up, stream)) != cudaSuccess) return err;

  GemmArgs down{};  // output[slot rows] = gate * ffn[e, b] expert_out[e]
  down.M = cap, down.N = p.model_dim, down.K = p.ffn_dim, down.batch = experts * p.batch, down.batch_split = p.batch;
  down.m_count = ws.counts;
  down.a = ws.ffn, down.lda = p.ffn_dim, down.a_hi = ffn_entry * p.batch, down.a_lo = ffn_entry;
  down.b = p.expert_out, down.ldb = p.model_dim, down.b_hi = static_cast<int64_t>(p.ffn_dim) * p.model_dim;
  down.c = p.output, down.ldc = p.model_dim, down.c_rows = ws.slot_rows, down.row_scale = ws.gate;
  down.activation = kActNone, down.c_float = 0;
  return launch_gemm<T>(down, stream);
}

}  // namespace
}  // namespace detail

size_t mixture_of_experts_workspace_size(const MixtureOfExpertsParams& p) {
  if (p.batch <= 0 || p.tokens <= 0 || p.num_experts <= 0) return 0;
  size_t total = 0;
  detail::carve(p, nullptr, &total);
  return total;
}

cudaError_t launch_mixture_of_experts(const MixtureOfExpertsParams& p, DataType dtype, void* workspace,
                                      cudaStream_t stream) {
  if (p.batch <= 0 || p.tokens < 0 || p.model_dim <= 0 || p.ffn_dim <= 0 || p.num_experts <= 0 ||
      (p.activation != static_cast<int32_t>(Activation::kRelu) &&
       p.activation != static_cast<int32_t>(Activation::kGelu)))
    return cudaErrorInvalidValue;
  if (p.tokens == 0) return cudaSuccess;
  if (!workspace) return cudaErrorInvalidValue;
  return detail::dispatch_dtype(dtype, [&](auto t) { return detail::run<decltype(t)>(p, workspace, stream); });
}

}  // namespace attn_export
