// Softmax attention with online (FlashAttention-2 style) normalisation, shared by DenseAttention,
// BlockSparseAttention and DisentangledAttention. What differs between them is a Policy:
//
//   int   prepare(int* scratch, int b, int h, int q0)   how many key tiles the query tile starting at q0 visits
//                                                        (called by every thread; may use scratch and sync)
//   int   tile_start(const int* scratch, int it)        the first key of the it-th visited tile
//   float logit(int b, int h, int i, int j, float qk)   the score of query i and key j in log2 units, from the raw
//                                                        dot product qk, or -INFINITY when j is not visible to i
//   int   tile                                          keys per tile (set by the launcher to the kernel's tile)
// and, optionally (compile-time switches; a policy without them gets the defaults):
//   static constexpr bool kReluSquared   default false. true: weights relu(s)^2 with no normalisation (no running
//                                        max, rescale, sum or division); logit() then returns s in natural units.
//   static constexpr bool kReadsQK       default true. false: Q and K are neither loaded nor multiplied (no shared
//                                        memory either); logit() gets qk = 0 and the score comes from elsewhere.
//
// Two kernels run a policy:
//   tc_attention_kernel    fp16/bf16, head_dim == v_head_dim in {32, 64, 128}: mma.sync m16n8k16 with fp32
//                          accumulators, each warp owns 16 query rows, K/V tiles double-buffered by cp.async,
//                          P stays in registers between the two products.
//   simt_attention_kernel  any dtype (fp32 always comes here), any head dims up to 256: fp32 CUDA-core math,
//                          16 query rows per block (4 per warp), one key per lane.
// Both keep the row max and sum in fp32; a row whose keys are all masked gets zeros (never NaN), and P is in
// [0, 1] before it is rounded to 16 bits, so nothing overflows in fp16 however long the sequence. relu(s)^2 weights
// have no such bound: in fp16 a weight above 65504 (s > 255) overflows when P is rounded for the second product.
#pragma once

#include <type_traits>

#include "common.cuh"
#include "launch_plan.h"

namespace attn_export {
namespace detail {

template <class P, class = void> struct relu_squared_weights : std::false_type {};
template <class P>
struct relu_squared_weights<P, std::void_t<decltype(P::kReluSquared)>> : std::bool_constant<P::kReluSquared> {};
template <class P, class = void> struct reads_qk : std::true_type {};
template <class P> struct reads_qk<P, std::void_t<decltype(P::kReadsQK)>> : std::bool_constant<P::kReadsQK> {};

struct AttentionProblem {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int heads, q_len, kv_len, head_dim, v_head_dim;
  int64_t q_stride, k_stride, v_stride, o_stride;  // elements between consecutive tokens
  int64_t q_batch, k_batch, v_batch, o_batch;      // elements between consecutive batch rows
  int batch0;  // first batch row of this launch (grid.z holds at most 65535: the launchers slice the batch)
  // A key set that each group of shared_group consecutive batch rows sees ahead of its own keys (DenseAttention's
  // shared_key; add_shared_keys): key j < shared_len is row j of set b / shared_group, key j >= shared_len the
  // row's own key j - shared_len, and kv_len counts both. None: shared_len 0.
  const void* k_shared;
  const void* v_shared;
  int shared_len, shared_group;
  int64_t ks_batch, vs_batch;
};

inline AttentionProblem make_problem(const void* q, const void* k, const void* v, void* out, int heads, int q_len,
                                     int kv_len, int head_dim, int v_head_dim) {
  AttentionProblem p{};
  p.q = q, p.k = k, p.v = v, p.out = out;
  p.heads = heads, p.q_len = q_len, p.kv_len = kv_len, p.head_dim = head_dim, p.v_head_dim = v_head_dim;
  p.q_stride = p.k_stride = static_cast<int64_t>(heads) * head_dim;
  p.v_stride = p.o_stride = static_cast<int64_t>(heads) * v_head_dim;
  p.q_batch = p.q_stride * q_len, p.o_batch = p.o_stride * q_len;
  p.k_batch = p.k_stride * kv_len, p.v_batch = p.v_stride * kv_len;
  p.shared_group = 1;
  return p;
}

// `rows` keys and values [batch / group, rows, heads * dim] that each group of `group` batch rows sees first.
inline void add_shared_keys(AttentionProblem& p, const void* k, const void* v, int rows, int group) {
  p.k_shared = k, p.v_shared = v, p.shared_len = rows, p.shared_group = group;
  p.ks_batch = p.k_stride * rows, p.vs_batch = p.v_stride * rows;
  p.kv_len += rows;
}

// The key (or value) rows of one batch row and head: rows [0, shared_len) of its group's shared set, then its own.
template <typename T>
struct KeyRows {
  const T* shared;
  const T* own;
  int64_t stride;  // elements between consecutive tokens
  int shared_len;
  __device__ __forceinline__ const T* row(int j) const {
    return j < shared_len ? shared + j * stride : own + (j - shared_len) * stride;
  }
};

template <typename T>
__device__ __forceinline__ KeyRows<T> key_rows(const AttentionProblem& pr, const void* own, int64_t own_batch,
                                               const void* shared, int64_t shared_batch, int64_t stride, int b,
                                               int column) {
  const T* s = pr.shared_len ? static_cast<const T*>(shared) + (b / pr.shared_group) * shared_batch + column : nullptr;
  return {s, static_cast<const T*>(own) + b * own_batch + column, stride, pr.shared_len};
}

// ================================================================================================================
// Tensor-core kernel
// ================================================================================================================
template <typename T, int D, int WARPS, int BK>
struct TcConfig {
  static constexpr int BQ = 16 * WARPS;
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int LD = D + 8;  // +16 bytes per row: the 8 rows of an ldmatrix land in distinct banks
  // Q (reused to stage the output), K and V double-buffered (no K without QK), the policy's scratch
  static size_t smem_bytes(int scratch_ints, bool reads_qk) {
    return static_cast<size_t>(BQ + (reads_qk ? 4 : 2) * BK) * LD * sizeof(T) +
           static_cast<size_t>(scratch_ints) * sizeof(int);
  }
};

// rows [row0, row0 + ROWS) of a [len, stride] matrix (columns 0..D-1 from g) into s; rows past len are zeros.
template <typename T, int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_rows_async(T* s, int ld, const T* g, int64_t stride, int row0, int len) {
  constexpr int CHUNKS_PER_ROW = D / 8;  // 16-byte chunks
  for (int c = threadIdx.x; c < ROWS * CHUNKS_PER_ROW; c += THREADS) {
    const int r = c / CHUNKS_PER_ROW, col = (c % CHUNKS_PER_ROW) * 8;
    const bool ok = row0 + r < len;
    cp_async_16(s + r * ld + col, ok ? g + (row0 + r) * stride + col : g, ok);
  }
}

// keys (or values) row0 .. row0 + ROWS - 1 of `g` into s, as above.
template <typename T, int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_rows_async(T* s, int ld, const KeyRows<T>& g, int row0, int len) {
  constexpr int CHUNKS_PER_ROW = D / 8;
  for (int c = threadIdx.x; c < ROWS * CHUNKS_PER_ROW; c += THREADS) {
    const int r = c / CHUNKS_PER_ROW, col = (c % CHUNKS_PER_ROW) * 8;
    const bool ok = row0 + r < len;
    cp_async_16(s + r * ld + col, ok ? g.row(row0 + r) + col : g.own, ok);
  }
}

template <typename T, int D, int WARPS, int BK, class Policy>
__global__ void __launch_bounds__(WARPS * 32) tc_attention_kernel(const AttentionProblem pr, const Policy pol) {
  using Cfg = TcConfig<T, D, WARPS, BK>;
  constexpr int BQ = Cfg::BQ, LD = Cfg::LD, THREADS = Cfg::THREADS;
  constexpr bool kQK = reads_qk<Policy>::value;
  constexpr bool kSoftmax = !relu_squared_weights<Policy>::value;
  static_assert(D % 16 == 0 && BK % 16 == 0, "mma tiles");

  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BQ * LD;                     // two stages of BK rows
  T* sV = sK + (kQK ? 2 * BK * LD : 0);     // two stages of BK rows
  int* scratch = reinterpret_cast<int*>(sV + 2 * BK * LD);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.z + pr.batch0, h = blockIdx.y, q0 = blockIdx.x * BQ;
  const T* qg = kQK ? static_cast<const T*>(pr.q) + b * pr.q_batch + h * D : nullptr;
  KeyRows<T> kg{};
  if constexpr (kQK) kg = key_rows<T>(pr, pr.k, pr.k_batch, pr.k_shared, pr.ks_batch, pr.k_stride, b, h * D);
  const KeyRows<T> vg = key_rows<T>(pr, pr.v, pr.v_batch, pr.v_shared, pr.vs_batch, pr.v_stride, b, h * D);

  if constexpr (kQK) load_rows_async<T, BQ, D, THREADS>(sQ, LD, qg, pr.q_stride, q0, pr.q_len);
  const int n_tiles = pol.prepare(scratch, b, h, q0);
  if (n_tiles > 0) {
    const int k0 = pol.tile_start(scratch, 0);
    if constexpr (kQK) load_rows_async<T, BK, D, THREADS>(sK, LD, kg, k0, pr.kv_len);
    load_rows_async<T, BK, D, THREADS>(sV, LD, vg, k0, pr.kv_len);
  }
  cp_async_commit();

  uint32_t qf[D / 16][4];
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int row0 = q0 + warp * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8
  const int col_in_tile = (lane % 4) * 2;

  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait<0>();
    __syncthreads();  // tile `it` has landed and every warp is done with the stage the next load overwrites
    if (kQK && it == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) load_a(qf[kk], sQ, LD, warp * 16, kk * 16, lane);
    }
    if (it + 1 < n_tiles) {
      const int k1 = pol.tile_start(scratch, it + 1);
      T* nK = sK + ((it + 1) & 1) * BK * LD;
      T* nV = sV + ((it + 1) & 1) * BK * LD;
      if constexpr (kQK) load_rows_async<T, BK, D, THREADS>(nK, LD, kg, k1, pr.kv_len);
      load_rows_async<T, BK, D, THREADS>(nV, LD, vg, k1, pr.kv_len);
    }
    cp_async_commit();
    const T* cK = sK + (it & 1) * BK * LD;
    const T* cV = sV + (it & 1) * BK * LD;
    const int k0 = pol.tile_start(scratch, it);

    // S = Q K^T for this warp's 16 rows and the tile's BK keys
    float s[BK / 8][4];
#pragma unroll
    for (int i = 0; i < BK / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    if constexpr (kQK) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < BK / 16; ++np) {
          uint32_t bf[4];
          load_b_nk(bf, cK, LD, np * 16, kk * 16, lane);
          mma16816<T>(s[2 * np], qf[kk], bf[0], bf[1]);
          mma16816<T>(s[2 * np + 1], qf[kk], bf[2], bf[3]);
        }
      }
    }

    if constexpr (kSoftmax) {
      // scores, masks and the online-softmax update (rows r = 0: row0, r = 1: row0 + 8)
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < BK / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const int j = k0 + nt * 8 + col_in_tile + (e & 1);
          s[nt][e] = pol.logit(b, h, row0 + 8 * r, j, s[nt][e]);
          tile_max[r] = fmaxf(tile_max[r], s[nt][e]);
        }
      }
      float ref[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_new = fmaxf(row_max[r], quad_max(tile_max[r]));
        ref[r] = softmax_ref(m_new);
        const float alpha = exp2f(row_max[r] - ref[r]);  // 0 while the row had nothing, 1 when the max holds
        row_max[r] = m_new;
        row_sum[r] *= alpha;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          o[dt][2 * r] *= alpha;
          o[dt][2 * r + 1] *= alpha;
        }
      }
#pragma unroll
      for (int nt = 0; nt < BK / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float p = exp2f(s[nt][e] - ref[e >> 1]);
          row_sum[e >> 1] += p;  // per-thread partial; the 4 lanes of a row are summed once at the end
          s[nt][e] = p;
        }
      }
    } else {
      // relu(s)^2: each weight stands alone, so O just accumulates (a masked key's -inf gives 0). Scores first,
      // then weights, as above: fused into one loop, ptxas spills at D=64 on sm_80.
#pragma unroll
      for (int nt = 0; nt < BK / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = k0 + nt * 8 + col_in_tile + (e & 1);
          s[nt][e] = pol.logit(b, h, row0 + 8 * (e >> 1), j, s[nt][e]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < BK / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float x = fmaxf(s[nt][e], 0.f);
          s[nt][e] = x * x;
        }
      }
    }

    // O += P V, P reused straight from the accumulators as A fragments
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bf[4];
        load_b_kn(bf, cV, LD, kk * 16, dp * 16, lane);
        mma16816<T>(o[2 * dp], a, bf[0], bf[1]);
        mma16816<T>(o[2 * dp + 1], a, bf[2], bf[3]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // no copy into sQ may still be in flight when it is reused for the output

  // normalise (softmax only), stage this warp's 16 rows in sQ, then write 16-byte chunks
  T* sO = sQ + warp * 16 * LD;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float inv = 1.f;
    if constexpr (kSoftmax) {
      const float total = quad_sum(row_sum[r]);
      inv = total > 0.f ? __frcp_rn(total) : pol.empty_row;
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(sO + (lane / 4 + 8 * r) * LD + dt * 8 + col_in_tile) =
          pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    }
  }
  __syncwarp();
  T* og = static_cast<T*>(pr.out) + b * pr.o_batch + h * D;
  for (int c = lane; c < 16 * D / 8; c += 32) {
    const int r = c / (D / 8), col = (c % (D / 8)) * 8;
    const int i = q0 + warp * 16 + r;
    if (i < pr.q_len) *reinterpret_cast<uint4*>(og + i * pr.o_stride + col) =
        *reinterpret_cast<const uint4*>(sO + r * LD + col);
  }
}

template <typename T, int D, int WARPS, int BK, class Policy>
cudaError_t launch_tc_attention(const AttentionProblem& pr, Policy pol, int batch, int scratch_ints,
                                cudaStream_t stream) {
  using Cfg = TcConfig<T, D, WARPS, BK>;
  pol.tile = BK;
  const size_t smem = Cfg::smem_bytes(scratch_ints, reads_qk<Policy>::value);
  auto kernel = tc_attention_kernel<T, D, WARPS, BK, Policy>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  for (int64_t slice = 0; slice < plan::z_slices(batch); ++slice) {
    AttentionProblem part = pr;
    part.batch0 = static_cast<int>(plan::z_slice_first(slice));
    const dim3 grid(ceil_div(pr.q_len, Cfg::BQ), pr.heads, static_cast<unsigned>(plan::z_slice_count(batch, slice)));
    kernel<<<grid, Cfg::THREADS, smem, stream>>>(part, pol);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// The tensor-core path applies to 16-bit types, equal q/k and v head dims of 32, 64 or 128, and 16-byte aligned
// rows (cp.async moves 16 bytes at a time).
template <typename T>
inline bool tc_attention_applies(const AttentionProblem& pr) {
  if (sizeof(T) != 2 || pr.head_dim != pr.v_head_dim) return false;
  if (pr.head_dim != 32 && pr.head_dim != 64 && pr.head_dim != 128) return false;
  return aligned16(pr.q) && aligned16(pr.k) && aligned16(pr.v) && aligned16(pr.out) && aligned16(pr.k_shared) &&
         aligned16(pr.v_shared);
}

// ================================================================================================================
// CUDA-core kernel (fp32 math; every dtype and head dim up to 256)
// ================================================================================================================
constexpr int kSimtRows = 16;  // query rows per block: 4 warps x 4 rows
constexpr int kSimtKeys = 32;  // keys per tile at most: one per lane

template <int DMAX>
inline size_t simt_attention_smem(int head_dim, int scratch_ints) {
  return sizeof(float) * (kSimtRows * head_dim + kSimtKeys * (head_dim + 1) + kSimtKeys * DMAX) +
         sizeof(int) * static_cast<size_t>(scratch_ints);
}

template <typename T, int DMAX, class Policy>
__global__ void __launch_bounds__(128, 4)  // 4 blocks/SM: also steers ptxas away from a spill
    simt_attention_kernel(const AttentionProblem pr, const Policy pol, const int rows_per_block) {
  constexpr int RPW = kSimtRows / 4;  // rows per warp
  constexpr int VC = DMAX / 32;       // output columns per lane
  constexpr bool kQK = reads_qk<Policy>::value;
  constexpr bool kSoftmax = !relu_squared_weights<Policy>::value;
  extern __shared__ __align__(16) unsigned char smem[];
  const int dk = kQK ? pr.head_dim : 0, dv = pr.v_head_dim, kt = pol.tile;
  float* sQ = reinterpret_cast<float*>(smem);  // [16][dk]
  float* sK = sQ + kSimtRows * dk;             // [32][dk + 1]: lane-per-key reads hit distinct banks
  float* sV = sK + kSimtKeys * (dk + 1);       // [32][DMAX], zero past dv
  int* scratch = reinterpret_cast<int*>(sV + kSimtKeys * DMAX);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.z + pr.batch0, h = blockIdx.y, q0 = blockIdx.x * rows_per_block;
  const T* qg = kQK ? static_cast<const T*>(pr.q) + b * pr.q_batch + h * dk : nullptr;
  KeyRows<T> kg{};
  if constexpr (kQK) kg = key_rows<T>(pr, pr.k, pr.k_batch, pr.k_shared, pr.ks_batch, pr.k_stride, b, h * dk);
  const KeyRows<T> vg = key_rows<T>(pr, pr.v, pr.v_batch, pr.v_shared, pr.vs_batch, pr.v_stride, b, h * dv);

  if constexpr (kQK) {
    for (int x = threadIdx.x; x < kSimtRows * dk; x += blockDim.x) {
      const int r = x / dk, d = x % dk;
      const bool ok = r < rows_per_block && q0 + r < pr.q_len;
      sQ[x] = ok ? to_float(qg[(q0 + r) * pr.q_stride + d]) : 0.f;
    }
  }
  const int n_tiles = pol.prepare(scratch, b, h, q0);

  float acc[RPW][VC];
  float row_max[RPW], row_sum[RPW];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    row_max[rr] = -INFINITY, row_sum[rr] = 0.f;
#pragma unroll
    for (int c = 0; c < VC; ++c) acc[rr][c] = 0.f;
  }

  for (int it = 0; it < n_tiles; ++it) {
    const int k0 = pol.tile_start(scratch, it);
    __syncthreads();  // the previous tile is consumed (and sQ is written, on the first pass)
    if constexpr (kQK) {
      for (int x = threadIdx.x; x < kSimtKeys * dk; x += blockDim.x) {
        const int j = x / dk, d = x % dk;
        const bool ok = j < kt && k0 + j < pr.kv_len;
        sK[j * (dk + 1) + d] = ok ? to_float(kg.row(k0 + j)[d]) : 0.f;
      }
    }
    for (int x = threadIdx.x; x < kSimtKeys * DMAX; x += blockDim.x) {
      const int j = x / DMAX, d = x % DMAX;
      const bool ok = j < kt && k0 + j < pr.kv_len && d < dv;
      sV[x] = ok ? to_float(vg.row(k0 + j)[d]) : 0.f;
    }
    __syncthreads();

    float s[RPW];
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) s[rr] = 0.f;
    if constexpr (kQK) {
      const float* krow = sK + lane * (dk + 1);
      for (int d = 0; d < dk; ++d) {
        const float kd = krow[d];
#pragma unroll
        for (int rr = 0; rr < RPW; ++rr) s[rr] = fmaf(sQ[(warp * RPW + rr) * dk + d], kd, s[rr]);
      }
    }
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const int r = warp * RPW + rr, i = q0 + r;
      const bool visible = lane < kt && r < rows_per_block && i < pr.q_len;
      const float x = visible ? pol.logit(b, h, i, k0 + lane, s[rr]) : -INFINITY;
      if constexpr (kSoftmax) {
        const float m_new = fmaxf(row_max[rr], warp_max(x));
        const float ref = softmax_ref(m_new);
        const float alpha = exp2f(row_max[rr] - ref);
        const float p = exp2f(x - ref);
        row_max[rr] = m_new;
        row_sum[rr] = row_sum[rr] * alpha + warp_sum(p);
#pragma unroll
        for (int c = 0; c < VC; ++c) acc[rr][c] *= alpha;
        s[rr] = p;
      } else {
        const float relu = fmaxf(x, 0.f);  // relu(s)^2, no normalisation
        s[rr] = relu * relu;
      }
    }
#pragma unroll 4
    for (int j = 0; j < kt; ++j) {
#pragma unroll
      for (int rr = 0; rr < RPW; ++rr) {
        const float pj = __shfl_sync(0xffffffffu, s[rr], j);
#pragma unroll
        for (int c = 0; c < VC; ++c) acc[rr][c] = fmaf(pj, sV[j * DMAX + c * 32 + lane], acc[rr][c]);
      }
    }
  }

  T* og = static_cast<T*>(pr.out) + b * pr.o_batch + h * dv;
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const int r = warp * RPW + rr, i = q0 + r;
    if (r >= rows_per_block || i >= pr.q_len) continue;
    const float inv = !kSoftmax ? 1.f : row_sum[rr] > 0.f ? __frcp_rn(row_sum[rr]) : pol.empty_row;
#pragma unroll
    for (int c = 0; c < VC; ++c) {
      const int d = c * 32 + lane;
      if (d < dv) og[i * pr.o_stride + d] = from_float<T>(acc[rr][c] * inv);
    }
  }
}

// keys_per_tile <= 32 and rows_per_block <= 16 let block-sparse tiles stay inside one block.
template <typename T, class Policy>
cudaError_t launch_simt_attention(const AttentionProblem& pr, Policy pol, int batch, int rows_per_block,
                                  int keys_per_tile, int scratch_ints, cudaStream_t stream) {
  pol.tile = keys_per_tile;
  const int dk = reads_qk<Policy>::value ? pr.head_dim : 0;  // no Q or K tile in shared memory without QK
  const int dmax = dk > pr.v_head_dim ? dk : pr.v_head_dim;
  auto run = [&](auto kernel, size_t smem) -> cudaError_t {
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    for (int64_t slice = 0; slice < plan::z_slices(batch); ++slice) {  // batch rows past 65535: more launches
      AttentionProblem part = pr;
      part.batch0 = static_cast<int>(plan::z_slice_first(slice));
      const dim3 grid(ceil_div(pr.q_len, rows_per_block), pr.heads,
                      static_cast<unsigned>(plan::z_slice_count(batch, slice)));
      kernel<<<grid, 128, smem, stream>>>(part, pol, rows_per_block);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    return cudaSuccess;
  };
  if (dmax <= 64) return run(simt_attention_kernel<T, 64, Policy>, simt_attention_smem<64>(dk, scratch_ints));
  if (dmax <= 128) return run(simt_attention_kernel<T, 128, Policy>, simt_attention_smem<128>(dk, scratch_ints));
  if (dmax <= 256) return run(simt_attention_kernel<T, 256, Policy>, simt_attention_smem<256>(dk, scratch_ints));
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace attn_export
