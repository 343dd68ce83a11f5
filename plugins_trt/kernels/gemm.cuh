// A small batched GEMM with gathered A rows, scattered C rows and device-side row counts: C = act(A B) * scale.
// There is no cuBLAS on the build machines and TensorRT V3 plugins get no cuBLAS handle, so the kernels carry
// their own. Used for DeBERTa's c2p/p2c products and for MoE's expert FFNs (a grouped GEMM: each (expert, group)
// is one batch entry whose row count is only known on the device).
//
//   gemm_tc_kernel    fp16/bf16: 64x64x32 tiles, 4 warps of 32x32, mma.sync m16n8k16, fp32 accumulators,
//                     two-stage cp.async. Needs K, N, lda, ldb multiples of 8 and 16-byte aligned bases.
//   gemm_simt_kernel  any dtype and shape: 64x64x16 tiles, 4x4 outputs per thread, fp32 math.
#pragma once

#include "common.cuh"
#include "launch_plan.h"

namespace attn_export {
namespace detail {

struct GemmArgs {
  int M, N, K;
  int batch, batch_split;  // batch entry z splits as (z / batch_split, z % batch_split) for the hi/lo strides
  int z0;                  // first batch entry of this launch (grid.z holds at most 65535: launch_gemm slices)
  const int* m_count;      // rows of entry z: m_count[z] (nullptr: M); the grid covers M
  const void* a;           // A [M, K] rows
  int64_t lda, a_hi, a_lo;
  const int* a_rows;  // optional: row r of entry z is a + a_rows[z * M + r] * lda (strides unused)
  const void* b;      // B [K, N] (b_nk = 0) or [N, K] (b_nk = 1, C = A B^T)
  int64_t ldb, b_hi, b_lo;
  int b_nk;
  void* c;  // C [M, N] rows
  int64_t ldc, c_hi, c_lo;
  const int* c_rows;       // optional: row r of entry z is written to c + c_rows[z * M + r] * ldc
  const float* row_scale;  // optional: multiplies row r by row_scale[c_rows[z * M + r]] (needs c_rows)
  int activation;          // Activation code + 1, or 0 for none
  int c_float;             // 1: C is float32, else the input type
};

constexpr int kActNone = 0, kActRelu = 1, kActGelu = 2;

__device__ __forceinline__ float activate(float x, int act) {
  if (act == kActRelu) return fmaxf(x, 0.f);
  if (act == kActGelu) return gelu_erf(x);
  return x;
}

__device__ __forceinline__ int64_t gemm_a_row(const GemmArgs& g, int z, int r) {
  if (g.a_rows) return static_cast<int64_t>(g.a_rows[static_cast<int64_t>(z) * g.M + r]) * g.lda;
  return (z / g.batch_split) * g.a_hi + (z % g.batch_split) * g.a_lo + static_cast<int64_t>(r) * g.lda;
}
__device__ __forceinline__ int64_t gemm_c_row(const GemmArgs& g, int z, int r) {
  if (g.c_rows) return static_cast<int64_t>(g.c_rows[static_cast<int64_t>(z) * g.M + r]) * g.ldc;
  return (z / g.batch_split) * g.c_hi + (z % g.batch_split) * g.c_lo + static_cast<int64_t>(r) * g.ldc;
}
__device__ __forceinline__ float gemm_row_scale(const GemmArgs& g, int z, int r) {
  return g.row_scale ? g.row_scale[g.c_rows[static_cast<int64_t>(z) * g.M + r]] : 1.f;
}

template <typename T>
__device__ __forceinline__ void gemm_store2(const GemmArgs& g, int64_t offset, float x0, float x1) {
  if (g.c_float) {
    *reinterpret_cast<float2*>(static_cast<float*>(g.c) + offset) = make_float2(x0, x1);
  } else if constexpr (sizeof(T) == 2) {
    *reinterpret_cast<uint32_t*>(static_cast<T*>(g.c) + offset) = pack2<T>(x0, x1);
  } else {
    static_cast<T*>(g.c)[offset] = from_float<T>(x0);
    static_cast<T*>(g.c)[offset + 1] = from_float<T>(x1);
  }
}

// ---- tensor cores ---------------------------------------------------------------------------------------------
constexpr int kGemmBM = 64, kGemmBN = 64, kGemmBK = 32;

template <typename T, bool B_NK>
__global__ void __launch_bounds__(128) gemm_tc_kernel(const GemmArgs g) {
  constexpr int LDA = kGemmBK + 8;                        // A tile [64][32]
  constexpr int LDB = B_NK ? kGemmBK + 8 : kGemmBN + 8;   // B tile [64 n][32 k] or [32 k][64 n]
  constexpr int B_ROWS = B_NK ? kGemmBN : kGemmBK;
  __shared__ __align__(16) T sA[2][kGemmBM * LDA];
  __shared__ __align__(16) T sB[2][B_ROWS * LDB];

  const int z = blockIdx.z + g.z0;
  const int rows = g.m_count ? g.m_count[z] : g.M;
  const int m0 = blockIdx.y * kGemmBM, n0 = blockIdx.x * kGemmBN;
  if (m0 >= rows) return;  // a grouped entry with fewer rows than the grid covers
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / 2, wn = warp % 2;

  const T* A = static_cast<const T*>(g.a);
  const T* B = static_cast<const T*>(g.b) + (z / g.batch_split) * g.b_hi + (z % g.batch_split) * g.b_lo;

  // each thread copies the same two 16-byte chunks of every A tile: rows tid/4 and tid/4 + 32, chunk tid%4
  const T* a_src[2];
  bool a_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = m0 + tid / 4 + 32 * i;
    a_ok[i] = r < rows;
    a_src[i] = A + (a_ok[i] ? gemm_a_row(g, z, r) : 0) + (tid % 4) * 8;
  }
  auto load_stage = [&](int stage, int k0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const bool ok = a_ok[i] && k0 + (tid % 4) * 8 < g.K;
      cp_async_16(&sA[stage][(tid / 4 + 32 * i) * LDA + (tid % 4) * 8], ok ? a_src[i] + k0 : A, ok);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if constexpr (B_NK) {  // rows n, chunks along k
        const int n = tid / 4 + 32 * i, k = k0 + (tid % 4) * 8;
        const bool ok = n0 + n < g.N && k < g.K;
        cp_async_16(&sB[stage][n * LDB + (tid % 4) * 8], ok ? B + (n0 + n) * g.ldb + k : B, ok);
      } else {  // rows k, chunks along n
        const int k = tid / 8 + 16 * i, n = n0 + (tid % 8) * 8;
        const bool ok = k0 + k < g.K && n < g.N;
        cp_async_16(&sB[stage][k * LDB + (tid % 8) * 8], ok ? B + (k0 + k) * g.ldb + n : B, ok);
      }
    }
  };

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

  const int k_tiles = ceil_div(g.K, kGemmBK);
  load_stage(0, 0);
  cp_async_commit();
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<0>();
    __syncthreads();
    if (kt + 1 < k_tiles) load_stage((kt + 1) & 1, (kt + 1) * kGemmBK);
    cp_async_commit();
    const T* a_s = sA[kt & 1];
    const T* b_s = sB[kt & 1];
#pragma unroll
    for (int kk = 0; kk < kGemmBK / 16; ++kk) {
      uint32_t af[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) load_a(af[mi], a_s, LDA, wm * 32 + mi * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t bf[4];
        if constexpr (B_NK) load_b_nk(bf, b_s, LDB, wn * 32 + np * 16, kk * 16, lane);
        else load_b_kn(bf, b_s, LDB, kk * 16, wn * 32 + np * 16, lane);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          mma16816<T>(acc[mi][2 * np], af[mi], bf[0], bf[1]);
          mma16816<T>(acc[mi][2 * np + 1], af[mi], bf[2], bf[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = m0 + wm * 32 + mi * 16 + lane / 4 + 8 * half;
      if (r >= rows) continue;
      const int64_t row = gemm_c_row(g, z, r);
      const float scale = gemm_row_scale(g, z, r);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int n = n0 + wn * 32 + nt * 8 + (lane % 4) * 2;
        if (n >= g.N) continue;
        gemm_store2<T>(g, row + n, activate(acc[mi][nt][2 * half], g.activation) * scale,
                       activate(acc[mi][nt][2 * half + 1], g.activation) * scale);
      }
    }
  }
}

// ---- CUDA cores -----------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(256) gemm_simt_kernel(const GemmArgs g) {
  constexpr int BM = 64, BN = 64, BK = 16;
  __shared__ float sA[BK][BM + 4];
  __shared__ float sB[BK][BN + 4];
  const int z = blockIdx.z + g.z0;
  const int rows = g.m_count ? g.m_count[z] : g.M;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  if (m0 >= rows) return;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const T* A = static_cast<const T*>(g.a);
  const T* B = static_cast<const T*>(g.b) + (z / g.batch_split) * g.b_hi + (z % g.batch_split) * g.b_lo;

  // this thread loads A rows tid/16 + 16 i (i < 4) at column tid % 16 of every k tile
  int64_t a_row[4];
  bool a_ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = m0 + tid / 16 + 16 * i;
    a_ok[i] = r < rows;
    a_row[i] = a_ok[i] ? gemm_a_row(g, z, r) : 0;
  }
  float acc[4][4] = {};
  for (int k0 = 0; k0 < g.K; k0 += BK) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int k = k0 + tid % 16;
      sA[tid % 16][tid / 16 + 16 * i] = a_ok[i] && k < g.K ? to_float(A[a_row[i] + k]) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int x = tid + 256 * i;
      if (g.b_nk) {
        const int n = x / BK, k = x % BK;
        const bool ok = n0 + n < g.N && k0 + k < g.K;
        sB[k][n] = ok ? to_float(B[(n0 + n) * g.ldb + k0 + k]) : 0.f;
      } else {
        const int k = x / BN, n = x % BN;
        const bool ok = n0 + n < g.N && k0 + k < g.K;
        sB[k][n] = ok ? to_float(B[(k0 + k) * g.ldb + n0 + n]) : 0.f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float a[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sA[k][ty * 4 + i], bv[i] = sB[k][tx * 4 + i];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = m0 + ty * 4 + i;
    if (r >= rows) continue;
    const int64_t row = gemm_c_row(g, z, r);
    const float scale = gemm_row_scale(g, z, r);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx * 4 + j;
      if (n >= g.N) continue;
      const float x = activate(acc[i][j], g.activation) * scale;
      if (g.c_float) static_cast<float*>(g.c)[row + n] = x;
      else static_cast<T*>(g.c)[row + n] = from_float<T>(x);
    }
  }
}

template <typename T>
cudaError_t launch_gemm(const GemmArgs& g, cudaStream_t stream) {
  if (g.M <= 0 || g.N <= 0 || g.batch <= 0) return cudaSuccess;
  if (plan::gemm_launch_limit(g.M, g.N)) return cudaErrorInvalidConfiguration;
  bool tc = false;
  if constexpr (sizeof(T) == 2) {
    tc = g.K % 8 == 0 && g.N % 8 == 0 && g.lda % 8 == 0 && g.ldb % 8 == 0 && g.ldc % 2 == 0 &&
         g.c_hi % 2 == 0 && g.c_lo % 2 == 0 &&
         g.a_hi % 8 == 0 && g.a_lo % 8 == 0 && g.b_hi % 8 == 0 && g.b_lo % 8 == 0 &&
         aligned16(g.a) && aligned16(g.b) && (reinterpret_cast<uintptr_t>(g.c) & 7u) == 0;
  }
  // batch entries (experts * batch, batch * heads) past 65535 go in further launches along z
  for (int64_t slice = 0; slice < plan::z_slices(g.batch); ++slice) {
    GemmArgs part = g;
    part.z0 = static_cast<int>(plan::z_slice_first(slice));
    const dim3 grid(ceil_div(g.N, 64), ceil_div(g.M, 64), static_cast<unsigned>(plan::z_slice_count(g.batch, slice)));
    bool launched = false;
    if constexpr (sizeof(T) == 2) {
      if (tc) {
        if (g.b_nk) gemm_tc_kernel<T, true><<<grid, 128, 0, stream>>>(part);
        else gemm_tc_kernel<T, false><<<grid, 128, 0, stream>>>(part);
        launched = true;
      }
    }
    if (!launched) gemm_simt_kernel<T><<<grid, 256, 0, stream>>>(part);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace detail
}  // namespace attn_export
