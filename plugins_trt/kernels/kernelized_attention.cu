// KernelizedAttention (attn_export/ops/kernelized_attention.py): out_i = phi(q_i) S / phi(q_i) z with
// S = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j) over all keys (non-causal) or keys j <= i (causal).
//
// Internally phi carries no 1/sqrt(M) (it cancels in the normalised output; an unnormalised favor output is
// multiplied by 1/M at the end). Tensor-core path (fp16/bf16, head dim = value head dim in {32, 64, 128}, features
// padded to a multiple of 32, when the query kernel's tiles fit the device's shared memory):
//
//   non-causal  1. key_state: blocks of (64 features, key range, batch*head) stream 64-key tiles; phi(K) of a
//                  tile goes to shared memory and S += phi^T V, z += colsum(phi) run on mma. favor's key shift c
//                  (max over keys and features, of the logits or of x'.w alone: `stabilizer`) is tracked online: a larger max rescales S and z, and the eps
//                  term, which a shift must not scale, is kept apart as eps * sum(v) (exact).
//               2. combine: one block per (batch, head) merges the key ranges in fp32 and stores S as 16-bit,
//                  scaled by its absolute max (so no overflow whatever N is), z in fp32.
//               3. query: 64 queries per block; phi(Q) is built in registers in 32-feature chunks (favor: a first
//                  pass finds each row's max) and fed straight into phi(Q) S as A fragments; phi(Q).z in fp32.
//   causal      chunked prefix states over 64-token chunks: 1. key_state per chunk (fixed favor shift
//               c = max_r |w_r|^2 / 2, so phi needs no future token), 2. an exclusive scan of the chunk states,
//               3. query per chunk: phi(Q) S_<c from the scanned state plus the masked in-chunk quadratic form
//               (phi(Q) phi(K)^T with j <= i) times V, both on mma.
// Every other case (fp32, other sizes, shared memory past the device limit) runs a CUDA-core kernel: one block per
// (batch, head, 32 value columns) walking 16-token chunks in order with the state in shared memory.
#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "launch_plan.h"

namespace attn_export {
namespace detail {
namespace {

namespace kp = plan::kernelized;
using kp::kFB;
using kp::kFC;
using kp::kMaxTcFeatures;
using kp::kTile;
using kp::record_floats;
constexpr int kFavor = static_cast<int>(FeatureMap::kFavorPositive);
constexpr int kElu = static_cast<int>(FeatureMap::kEluPlusOne);

__device__ __forceinline__ float elementwise_feature(float x, int fmap) {
  if (fmap == kElu) return x > 0.f ? x + 1.f : expf(x);  // elu(x) + 1
  return x;                                              // identity
}

struct LinearArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* w;  // projection [m, d] (favor)
  void* out;
  int batch, heads, n, d, dv, m, mp;  // mp: m rounded up to 32
  int fmap, causal, normalize;
  float root_scale;  // x' = root_scale * x (favor)
  float eps;
  int shift_logits;  // favor shifts: 1 the max of logits x'.w - |x'|^2/2, 0 the max of x'.w (stabilizer projection)
  int tiles, splits, nfb;  // tiles = ceil(n / 64); nfb = ceil(mp / 64)
  float* records;          // key_state output: one record per (batch*head, split or chunk, feature block)
  float* s_fp32;           // non-causal combined S [bh, mp, dv]
  void* s_half;            // non-causal combined S / scale, 16-bit [bh, mp, dv]
  float* z;                // non-causal combined z [bh, mp]
  float* s_scale;          // [bh]
  float* w_bound;          // causal favor shift: max_r |w_r|^2 / 2
  float* simt_state;       // CUDA-core kernel: feature-sized arrays in the workspace (nullptr: in shared memory)
};

// Causal favor in fp16: the fixed shift leaves phi(k) near eps (1e-6, subnormal in fp16, stored as 1.0133e-6).
// phi(k) is kept times this power of two in the 16-bit tiles and fp32 records, and the query kernel divides it out
// before anything is packed again, so no 16-bit phi(k) or phi(q).phi(k) is subnormal or overflows (<= M + 1).
template <typename T> struct CausalBoost { static constexpr float value = 1.f; };
template <> struct CausalBoost<__half> { static constexpr float value = 1024.f; };

// ---- shared pieces --------------------------------------------------------------------------------------------
template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_rows_async(T* s, int ld, const T* g, int64_t stride, int row0, int len) {
  for (int c = threadIdx.x; c < ROWS * (COLS / 8); c += THREADS) {
    const int r = c / (COLS / 8), col = (c % (COLS / 8)) * 8;
    const bool ok = row0 + r < len;
    cp_async_16(s + r * ld + col, ok ? g + (row0 + r) * stride + col : g, ok);
  }
}

// logits' = x . w_f for this warp's 16 rows (A fragments xf) and features [f0, f0 + 32) of a [feature][d] tile
template <typename T, int D>
__device__ __forceinline__ void project32(float (&acc)[4][4], const uint32_t (&xf)[D / 16][4], const T* sW, int ldw,
                                          int f0, int lane) {
#pragma unroll
  for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < 2; ++np) {
      uint32_t bf[4];
      load_b_nk(bf, sW, ldw, f0 + np * 16, kk * 16, lane);
      mma16816<T>(acc[2 * np], xf[kk], bf[0], bf[1]);
      mma16816<T>(acc[2 * np + 1], xf[kk], bf[2], bf[3]);
    }
  }
}

// root_scale^2 |x|^2 / 2 for this thread's two fragment rows (row and row + 8 of a [rows][d] tile)
template <typename T, int D>
__device__ __forceinline__ void half_norms(float (&hn)[2], const T* sX, int ld, int row, int lane, float root_scale) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float acc = 0.f;
    for (int c = lane % 4; c < D; c += 4) {
      const float x = to_float(sX[(row + 8 * r) * ld + c]);
      acc = fmaf(x, x, acc);
    }
    hn[r] = quad_sum(acc) * root_scale * root_scale * 0.5f;
  }
}

// phi(keys) for 64 keys x features [f0, f0 + 32 * chunks) into sP (columns from p0), with a fixed favor shift c
// (phi = boost * (exp(logit - c) + eps_add)) or the element-wise maps; keys >= n and features >= m give 0.
// f0 is the global feature number (bounds, key columns); sW holds projection rows from global feature w_base on.
template <typename T, int D>
__device__ void key_features(T* sP, int ldp, int p0, const T* sK, int ldk, const T* sW, int ldw, int w_base, int f0,
                             int chunks, const LinearArgs& a, int key0, float c, float eps_add, float boost, int warp,
                             int lane) {
  const int row = warp * 16 + lane / 4;
  if (a.fmap == kFavor) {
    uint32_t kf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) load_a(kf[kk], sK, ldk, warp * 16, kk * 16, lane);
    float hn[2];
    half_norms<T, D>(hn, sK, ldk, row, lane, a.root_scale);
    for (int ch = 0; ch < chunks; ++ch) {
      float lg[4][4];
      project32<T, D>(lg, kf, sW, ldw, kp::w_tile_row(f0 + ch * kFC, w_base), lane);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float phi[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int f = f0 + ch * kFC + nt * 8 + (lane % 4) * 2 + e;
            const bool ok = key0 + row + 8 * r < a.n && f < a.m;
            phi[e] = ok ? (expf(a.root_scale * lg[nt][2 * r + e] - hn[r] - c) + eps_add) * boost : 0.f;
          }
          *reinterpret_cast<uint32_t*>(sP + (row + 8 * r) * ldp + p0 + ch * kFC + nt * 8 + (lane % 4) * 2) =
              pack2<T>(phi[0], phi[1]);
        }
      }
    }
  } else {
    for (int x = threadIdx.x; x < kTile * chunks * kFC; x += blockDim.x) {
      const int key = x / (chunks * kFC), f = x % (chunks * kFC);
      const bool ok = key0 + key < a.n && f0 + f < a.m;
      sP[key * ldp + p0 + f] = from_float<T>(ok ? elementwise_feature(to_float(sK[key * ldk + f0 + f]), a.fmap) : 0.f);
    }
  }
}

// ================================================================================================================
// 1. key_state: flat grid over (nfb, splits or chunks, batch*heads), 4 warps
// ================================================================================================================
template <typename T, int D, int DV>
struct KeyStateSmem {
  static constexpr int LDX = D + 8, LDV = DV + 8, LDP = kFB + 8;
  static size_t bytes() {
    return sizeof(T) * (kFB * LDX + 2 * kTile * LDX + 2 * kTile * LDV + kTile * LDP) + sizeof(float) * 8;
  }
};

template <typename T, int D, int DV, bool CAUSAL>
__global__ void __launch_bounds__(128, 2) key_state_kernel(const LinearArgs a) {
  using L = KeyStateSmem<T, D, DV>;
  constexpr int LDX = L::LDX, LDV = L::LDV, LDP = L::LDP;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sW = reinterpret_cast<T*>(smem);  // [kFB][LDX] this block's projection rows
  T* sK = sW + kFB * LDX;               // [2][kTile][LDX]
  T* sV = sK + 2 * kTile * LDX;         // [2][kTile][LDV]
  T* sP = sV + 2 * kTile * LDV;         // [kTile][LDP] phi(keys) of the tile, this block's features
  float* s_max = reinterpret_cast<float*>(sP + kTile * LDP);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tid = threadIdx.x;
  const plan::Index3 at = plan::unflatten3(blockIdx.x, a.nfb, CAUSAL ? a.tiles : a.splits);
  const int fb = at.x, part = at.y, bh = at.z, b = bh / a.heads, h = bh % a.heads;
  const int f_base = fb * kFB;
  const bool favor = a.fmap == kFavor;
  const int first = CAUSAL ? part : static_cast<int>(static_cast<int64_t>(part) * a.tiles / a.splits);
  const int last = CAUSAL ? part + 1 : static_cast<int>(static_cast<int64_t>(part + 1) * a.tiles / a.splits);
  const int64_t k_stride = static_cast<int64_t>(a.heads) * D, v_stride = static_cast<int64_t>(a.heads) * DV;
  const T* kg = static_cast<const T*>(a.k) + static_cast<int64_t>(b) * a.n * k_stride + h * D;
  const T* vg = static_cast<const T*>(a.v) + static_cast<int64_t>(b) * a.n * v_stride + h * DV;

  if (favor) {
    const T* w_rows = static_cast<const T*>(a.w) + static_cast<int64_t>(f_base) * D;
    load_rows_async<T, kFB, D, 128>(sW, LDX, w_rows, D, 0, a.m - f_base);
  }
  load_rows_async<T, kTile, D, 128>(sK, LDX, kg, k_stride, first * kTile, a.n);
  load_rows_async<T, kTile, DV, 128>(sV, LDV, vg, v_stride, first * kTile, a.n);
  cp_async_commit();

  float acc[DV / 8][4];  // S rows f_base + 16 warp + (lane/4, +8), all dv columns
#pragma unroll
  for (int i = 0; i < DV / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float z_col = 0.f, v_col = 0.f;  // thread tid: column sums of phi (feature f_base + tid) and of v (column tid)
  float c_run = CAUSAL ? (favor ? *a.w_bound : 0.f) : (favor ? -INFINITY : 0.f);
  const float eps_add = CAUSAL && favor ? a.eps : 0.f;  // non-causal keeps eps apart (see the file comment)
  const int row = warp * 16 + lane / 4;

  for (int it = first; it < last; ++it) {
    const int stage = (it - first) & 1;
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < last) {
      load_rows_async<T, kTile, D, 128>(sK + (stage ^ 1) * kTile * LDX, LDX, kg, k_stride, (it + 1) * kTile, a.n);
      load_rows_async<T, kTile, DV, 128>(sV + (stage ^ 1) * kTile * LDV, LDV, vg, v_stride, (it + 1) * kTile, a.n);
    }
    cp_async_commit();
    const T* cK = sK + stage * kTile * LDX;
    const T* cV = sV + stage * kTile * LDV;
    const int key0 = it * kTile;

    if (favor && !CAUSAL) {
      // online shift: the tile's largest logit over its keys and this block's features
      uint32_t kf[D / 16][4];
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) load_a(kf[kk], cK, LDX, warp * 16, kk * 16, lane);
      float hn[2];
      half_norms<T, D>(hn, cK, LDX, row, lane, a.root_scale);
      float tile_max = -INFINITY;
#pragma unroll
      for (int ch = 0; ch < kFB / kFC; ++ch) {
        float lg[4][4];
        project32<T, D>(lg, kf, sW, LDX, ch * kFC, lane);
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int f = f_base + ch * kFC + nt * 8 + (lane % 4) * 2 + (e & 1);
            if (key0 + row + 8 * (e >> 1) < a.n && f < a.m)
              tile_max = fmaxf(tile_max, a.root_scale * lg[nt][e] - (a.shift_logits ? hn[e >> 1] : 0.f));
          }
      }
      tile_max = warp_max(tile_max);
      if (lane == 0) s_max[warp] = tile_max;
      __syncthreads();
      const float c_new = fmaxf(c_run, fmaxf(fmaxf(s_max[0], s_max[1]), fmaxf(s_max[2], s_max[3])));
      const float alpha = c_new == -INFINITY ? 1.f : expf(c_run - c_new);
#pragma unroll
      for (int i = 0; i < DV / 8; ++i) acc[i][0] *= alpha, acc[i][1] *= alpha, acc[i][2] *= alpha, acc[i][3] *= alpha;
      z_col *= alpha;
      c_run = c_new;
    }
    const float boost = CAUSAL && favor ? CausalBoost<T>::value : 1.f;
    key_features<T, D>(sP, LDP, 0, cK, LDX, sW, LDX, f_base, f_base, kFB / kFC, a, key0, c_run, eps_add, boost, warp,
                       lane);
    __syncthreads();

    // S[f, :] += sum_keys phi[key, f] v[key, :]   (A = phi^T straight from the [key][feature] tile)
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) {
      uint32_t af[4];
      load_a_trans(af, sP, LDP, kk * 16, warp * 16, lane);
#pragma unroll
      for (int dp = 0; dp < DV / 16; ++dp) {
        uint32_t bf[4];
        load_b_kn(bf, cV, LDV, kk * 16, dp * 16, lane);
        mma16816<T>(acc[2 * dp], af, bf[0], bf[1]);
        mma16816<T>(acc[2 * dp + 1], af, bf[2], bf[3]);
      }
    }
    if (tid < kFB)
      for (int key = 0; key < kTile; ++key) z_col += to_float(sP[key * LDP + tid]);
    if (!CAUSAL && favor && fb == 0 && tid < DV)
      for (int key = 0; key < kTile; ++key) v_col += to_float(cV[key * LDV + tid]);  // rows past n are zeros
  }
  cp_async_wait<0>();

  const int64_t record_set = static_cast<int64_t>(bh) * (CAUSAL ? a.tiles : a.splits) + part;
  float* rec = a.records + (record_set * a.nfb + fb) * record_floats(DV);
#pragma unroll
  for (int dt = 0; dt < DV / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) rec[(row + 8 * (e >> 1)) * DV + dt * 8 + (lane % 4) * 2 + (e & 1)] = acc[dt][e];
  if (tid < kFB) rec[kFB * DV + tid] = z_col;
  if (tid == 0) rec[kFB * DV + kFB] = c_run;
  if (tid < DV) rec[kFB * DV + kFB + 1 + tid] = v_col;
}

// ================================================================================================================
// 2a. non-causal combine: one block per batch*head
// ================================================================================================================
template <typename T>
__global__ void __launch_bounds__(256) combine_kernel(const LinearArgs a) {
  __shared__ float s_red[8];
  extern __shared__ float s_vsum[];  // [dv]
  const int bh = blockIdx.x, dv = a.dv, rec_len = record_floats(dv);
  const bool favor = a.fmap == kFavor;
  const float* recs = a.records + static_cast<int64_t>(bh) * a.splits * a.nfb * rec_len;
  auto rec = [&](int split, int fb) { return recs + (static_cast<int64_t>(split) * a.nfb + fb) * rec_len; };

  float c = 0.f;  // the global shift: the largest block shift
  if (favor) {
    c = -INFINITY;
    for (int i = 0; i < a.splits * a.nfb; ++i) c = fmaxf(c, rec(i / a.nfb, i % a.nfb)[kFB * dv + kFB]);
  }
  for (int j = threadIdx.x; j < dv; j += blockDim.x) {
    float s = 0.f;
    for (int split = 0; split < a.splits; ++split) s += rec(split, 0)[kFB * dv + kFB + 1 + j];
    s_vsum[j] = s;
  }
  __syncthreads();
  auto weight = [&](const float* r) {
    const float cs = r[kFB * dv + kFB];
    return favor ? (cs == -INFINITY ? 0.f : expf(cs - c)) : 1.f;
  };

  float* S = a.s_fp32 + static_cast<int64_t>(bh) * a.mp * dv;
  float amax = 0.f;
  for (int x = threadIdx.x; x < a.mp * dv; x += blockDim.x) {
    const int f = x / dv, j = x % dv, fb = f / kFB, fl = f % kFB;
    float s = 0.f;
    for (int split = 0; split < a.splits; ++split) {
      const float* r = rec(split, fb);
      s += weight(r) * r[fl * dv + j];
    }
    if (favor && f < a.m) s += a.eps * s_vsum[j];
    S[x] = s;
    amax = fmaxf(amax, fabsf(s));
  }
  for (int f = threadIdx.x; f < a.mp; f += blockDim.x) {
    const int fb = f / kFB, fl = f % kFB;
    float s = 0.f;
    for (int split = 0; split < a.splits; ++split) {
      const float* r = rec(split, fb);
      s += weight(r) * r[kFB * dv + fl];
    }
    if (favor && f < a.m) s += a.eps * a.n;
    a.z[static_cast<int64_t>(bh) * a.mp + f] = s;
  }
  amax = warp_max(amax);
  if (threadIdx.x % 32 == 0) s_red[threadIdx.x / 32] = amax;
  __syncthreads();
  float scale = 0.f;
  for (int i = 0; i < 8; ++i) scale = fmaxf(scale, s_red[i]);
  scale = scale > 0.f ? scale : 1.f;
  if (threadIdx.x == 0) a.s_scale[bh] = scale;
  T* Sh = static_cast<T*>(a.s_half) + static_cast<int64_t>(bh) * a.mp * dv;
  const float inv = 1.f / scale;
  for (int x = threadIdx.x; x < a.mp * dv; x += blockDim.x) Sh[x] = from_float<T>(S[x] * inv);
}

// ================================================================================================================
// 2b. causal: exclusive prefix over chunks, in place, one thread per state element; flat grid over (slices of a
// chunk's state, batch*heads)
// ================================================================================================================
__global__ void prefix_kernel(const LinearArgs a, int slices) {
  const int per_chunk = a.nfb * record_floats(a.dv);
  const int64_t bh = blockIdx.x / slices;
  const int x = static_cast<int>(blockIdx.x % slices) * blockDim.x + threadIdx.x;
  if (x >= per_chunk) return;
  float* base = a.records + bh * a.tiles * per_chunk + x;
  float running = 0.f;
  for (int c = 0; c < a.tiles; ++c) {
    const float v = base[static_cast<int64_t>(c) * per_chunk];
    base[static_cast<int64_t>(c) * per_chunk] = running;
    running += v;
  }
}

template <typename T>
__global__ void projection_bound_kernel(const LinearArgs a) {  // causal favor shift: max_r |w_r|^2 / 2, one warp
  float best = 0.f;
  const T* w = static_cast<const T*>(a.w);
  for (int r = threadIdx.x; r < a.m; r += 32) {
    float s = 0.f;
    for (int c = 0; c < a.d; ++c) {
      const float x = to_float(w[static_cast<int64_t>(r) * a.d + c]);
      s = fmaf(x, x, s);
    }
    best = fmaxf(best, s);
  }
  best = warp_max(best);
  if (threadIdx.x == 0) *a.w_bound = 0.5f * best;
}

// ================================================================================================================
// 3. query: flat grid over (tiles, batch*heads), 4 warps of 16 queries
// ================================================================================================================
template <typename T, int D, int DV>
struct QuerySmem {
  static constexpr int LDX = D + 8, LDV = DV + 8;
  static size_t bytes(int mp, bool causal) {
    size_t elems = static_cast<size_t>(kTile) * LDX + static_cast<size_t>(mp) * LDX + static_cast<size_t>(mp) * LDV;
    if (causal) elems += static_cast<size_t>(kTile) * LDX + static_cast<size_t>(kTile) * LDV + kTile * (mp + 8);
    return sizeof(T) * elems + sizeof(float) * (mp + 16);
  }
};

template <typename T, int D, int DV, bool CAUSAL>
__global__ void __launch_bounds__(128, 2) query_kernel(const LinearArgs a) {
  using L = QuerySmem<T, D, DV>;
  constexpr int LDX = L::LDX, LDV = L::LDV;
  const int mp = a.mp, ldp = mp + 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // [kTile][LDX]
  T* sW = sQ + kTile * LDX;             // [mp][LDX]
  T* sS = sW + mp * LDX;                // [mp][LDV] S / scale
  T* sK = sS + mp * LDV;                // causal: [kTile][LDX]
  T* sV = sK + (CAUSAL ? kTile * LDX : 0);   // causal: [kTile][LDV]
  T* sP = sV + (CAUSAL ? kTile * LDV : 0);   // causal: [kTile][ldp] phi(keys) of the chunk
  float* sZ = reinterpret_cast<float*>(sP + (CAUSAL ? kTile * ldp : 0));  // [mp]
  float* s_red = sZ + mp;                                                 // [16]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tile = static_cast<int>(blockIdx.x % a.tiles), bh = static_cast<int>(blockIdx.x / a.tiles);
  const int b = bh / a.heads, h = bh % a.heads;
  const int q0 = tile * kTile;
  const bool favor = a.fmap == kFavor;
  const int64_t x_stride = static_cast<int64_t>(a.heads) * D, v_stride = static_cast<int64_t>(a.heads) * DV;
  const int64_t x_batch = static_cast<int64_t>(b) * a.n * x_stride, v_batch = static_cast<int64_t>(b) * a.n * v_stride;

  load_rows_async<T, kTile, D, 128>(sQ, LDX, static_cast<const T*>(a.q) + x_batch + h * D, x_stride, q0, a.n);
  if (favor)
    for (int c = threadIdx.x; c < mp * (D / 8); c += 128) {
      const int r = c / (D / 8), col = (c % (D / 8)) * 8;
      const T* src = static_cast<const T*>(a.w) + static_cast<int64_t>(r) * D + col;
      cp_async_16(sW + r * LDX + col, r < a.m ? src : static_cast<const T*>(a.w), r < a.m);
    }
  float scale;
  if constexpr (CAUSAL) {
    load_rows_async<T, kTile, D, 128>(sK, LDX, static_cast<const T*>(a.k) + x_batch + h * D, x_stride, q0, a.n);
    load_rows_async<T, kTile, DV, 128>(sV, LDV, static_cast<const T*>(a.v) + v_batch + h * DV, v_stride, q0, a.n);
    cp_async_commit();
    // the scanned state of this chunk: S_<c and z_<c, rescaled to 16 bits by their absolute max
    const int rec_len = record_floats(DV);
    const float* recs = a.records + (static_cast<int64_t>(bh) * a.tiles + tile) * a.nfb * rec_len;
    float amax = 0.f;
    for (int x = threadIdx.x; x < mp * DV; x += 128) {
      const int f = x / DV, j = x % DV;
      amax = fmaxf(amax, fabsf(recs[(f / kFB) * rec_len + (f % kFB) * DV + j]));
    }
    for (int f = threadIdx.x; f < mp; f += 128) sZ[f] = recs[(f / kFB) * rec_len + kFB * DV + f % kFB];
    amax = warp_max(amax);
    if (lane == 0) s_red[warp] = amax;
    __syncthreads();
    scale = fmaxf(fmaxf(s_red[0], s_red[1]), fmaxf(s_red[2], s_red[3]));
    scale = scale > 0.f ? scale : 1.f;
    const float inv = 1.f / scale;
    for (int x = threadIdx.x; x < mp * DV; x += 128) {
      const int f = x / DV, j = x % DV;
      sS[f * LDV + j] = from_float<T>(recs[(f / kFB) * rec_len + (f % kFB) * DV + j] * inv);
    }
  } else {
    const T* Sg = static_cast<const T*>(a.s_half) + static_cast<int64_t>(bh) * mp * DV;
    for (int c = threadIdx.x; c < mp * (DV / 8); c += 128) {
      const int r = c / (DV / 8), col = (c % (DV / 8)) * 8;
      cp_async_16(sS + r * LDV + col, Sg + static_cast<int64_t>(r) * DV + col, true);
    }
    cp_async_commit();
    for (int f = threadIdx.x; f < mp; f += 128) sZ[f] = a.z[static_cast<int64_t>(bh) * mp + f];
    scale = a.s_scale[bh];
  }
  cp_async_wait<0>();
  __syncthreads();

  if constexpr (CAUSAL) {
    const float c = favor ? *a.w_bound : 0.f;
    key_features<T, D>(sP, ldp, 0, sK, LDX, sW, LDX, 0, 0, mp / kFC, a, q0, c, favor ? a.eps : 0.f,
                       favor ? CausalBoost<T>::value : 1.f, warp, lane);
    __syncthreads();
  }

  const int row = warp * 16 + lane / 4;  // this thread's query rows in the tile: row, row + 8
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a(qf[kk], sQ, LDX, warp * 16, kk * 16, lane);

  float o[DV / 8][4];
#pragma unroll
  for (int i = 0; i < DV / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float qk[CAUSAL ? kTile / 8 : 1][4];  // causal: phi(q) . phi(k) within the chunk
#pragma unroll
  for (int i = 0; i < (CAUSAL ? kTile / 8 : 1); ++i) qk[i][0] = qk[i][1] = qk[i][2] = qk[i][3] = 0.f;
  float den[2] = {0.f, 0.f};

  // one 16-feature step: phi(q) A fragment `af` of features [f, f + 16) against S rows and chunk keys
  auto consume = [&](const uint32_t (&af)[4], int f) {
#pragma unroll
    for (int dp = 0; dp < DV / 16; ++dp) {
      uint32_t bf[4];
      load_b_kn(bf, sS, LDV, f, dp * 16, lane);
      mma16816<T>(o[2 * dp], af, bf[0], bf[1]);
      mma16816<T>(o[2 * dp + 1], af, bf[2], bf[3]);
    }
    if constexpr (CAUSAL) {
#pragma unroll
      for (int np = 0; np < kTile / 16; ++np) {
        uint32_t bf[4];
        load_b_nk(bf, sP, ldp, np * 16, f, lane);
        mma16816<T>(qk[2 * np], af, bf[0], bf[1]);
        mma16816<T>(qk[2 * np + 1], af, bf[2], bf[3]);
      }
    }
  };

  if (favor) {
    float hn[2];
    half_norms<T, D>(hn, sQ, LDX, row, lane, a.root_scale);
    float row_max[2] = {-INFINITY, -INFINITY};
    for (int f0 = 0; f0 < mp; f0 += kFC) {  // pass 1: each query's largest logit
      float lg[4][4];
      project32<T, D>(lg, qf, sW, LDX, f0, lane);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (f0 + nt * 8 + (lane % 4) * 2 + (e & 1) < a.m)
            row_max[e >> 1] =
                fmaxf(row_max[e >> 1], a.root_scale * lg[nt][e] - (a.shift_logits ? hn[e >> 1] : 0.f));
    }
    row_max[0] = quad_max(row_max[0]), row_max[1] = quad_max(row_max[1]);
    for (int f0 = 0; f0 < mp; f0 += kFC) {  // pass 2: phi(q) = exp(logit - max) + eps, consumed as A fragments
      float lg[4][4];
      project32<T, D>(lg, qf, sW, LDX, f0, lane);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int f = f0 + nt * 8 + (lane % 4) * 2 + (e & 1);
          const float phi = f < a.m ? expf(a.root_scale * lg[nt][e] - hn[e >> 1] - row_max[e >> 1]) + a.eps : 0.f;
          den[e >> 1] = fmaf(phi, sZ[f], den[e >> 1]);
          lg[nt][e] = phi;
        }
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        const uint32_t af[4] = {pack2<T>(lg[2 * ks][0], lg[2 * ks][1]), pack2<T>(lg[2 * ks][2], lg[2 * ks][3]),
                                pack2<T>(lg[2 * ks + 1][0], lg[2 * ks + 1][1]),
                                pack2<T>(lg[2 * ks + 1][2], lg[2 * ks + 1][3])};
        consume(af, f0 + ks * 16);
      }
    }
  } else {
    // element-wise maps: the features are q's own coordinates, so the A fragments are q's, mapped in place
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t af[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 x = unpack2<T>(qf[kk][j]);
        const int f = kk * 16 + (lane % 4) * 2 + (j >> 1) * 8;  // a[0], a[1]: k 2t..; a[2], a[3]: k 2t+8..
        const float p0 = elementwise_feature(x.x, a.fmap), p1 = elementwise_feature(x.y, a.fmap);
        den[j & 1] = fmaf(p0, sZ[f], fmaf(p1, sZ[f + 1], den[j & 1]));  // a[0], a[2]: row g; a[1], a[3]: row g+8
        af[j] = pack2<T>(p0, p1);
      }
      consume(af, kk * 16);
    }
  }

  // the state term was computed against S / scale; causal favor states and phi(k) carry the boost
  const float unboost = CAUSAL && favor ? 1.f / CausalBoost<T>::value : 1.f;
  const float o_mul = scale * unboost;
#pragma unroll
  for (int i = 0; i < DV / 8; ++i) o[i][0] *= o_mul, o[i][1] *= o_mul, o[i][2] *= o_mul, o[i][3] *= o_mul;
  den[0] = quad_sum(den[0]) * unboost, den[1] = quad_sum(den[1]) * unboost;

  if constexpr (CAUSAL) {
    // in-chunk part: key j sees query i iff j <= i. The weights are rounded to T here, as the P.V product
    // below reads them, so numerator and denominator sum the same weights.
    float part[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; e += 2) {
        const int j = nt * 8 + (lane % 4) * 2;
        const int i = row + 8 * (e >> 1);
        const float2 w = unpack2<T>(pack2<T>(j > i ? 0.f : qk[nt][e] * unboost, j + 1 > i ? 0.f : qk[nt][e + 1] * unboost));
        qk[nt][e] = w.x, qk[nt][e + 1] = w.y;
        part[e >> 1] += w.x + w.y;
      }
    den[0] += quad_sum(part[0]), den[1] += quad_sum(part[1]);
#pragma unroll
    for (int ks = 0; ks < kTile / 16; ++ks) {
      const uint32_t af[4] = {pack2<T>(qk[2 * ks][0], qk[2 * ks][1]), pack2<T>(qk[2 * ks][2], qk[2 * ks][3]),
                              pack2<T>(qk[2 * ks + 1][0], qk[2 * ks + 1][1]),
                              pack2<T>(qk[2 * ks + 1][2], qk[2 * ks + 1][3])};
#pragma unroll
      for (int dp = 0; dp < DV / 16; ++dp) {
        uint32_t bf[4];
        load_b_kn(bf, sV, LDV, ks * 16, dp * 16, lane);
        mma16816<T>(o[2 * dp], af, bf[0], bf[1]);
        mma16816<T>(o[2 * dp + 1], af, bf[2], bf[3]);
      }
    }
  }

  const float factor = favor ? 1.f / a.m : 1.f;  // the 1/sqrt(M) of both feature maps (unnormalised output)
  T* og = static_cast<T*>(a.out) + static_cast<int64_t>(b) * a.n * v_stride + h * DV;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = q0 + row + 8 * r;
    if (i >= a.n) continue;
    const float mul = a.normalize && den[r] != 0.f ? 1.f / den[r] : factor;
#pragma unroll
    for (int dt = 0; dt < DV / 8; ++dt)
      *reinterpret_cast<uint32_t*>(og + i * v_stride + dt * 8 + (lane % 4) * 2) =
          pack2<T>(o[dt][2 * r] * mul, o[dt][2 * r + 1] * mul);
  }
}

// ================================================================================================================
// CUDA-core fallback: flat grid over (ceil(dv / 32), heads, batch), 256 threads, 16-token chunks in sequence order
// ================================================================================================================
using kp::kChunk;

template <typename T>
__global__ void __launch_bounds__(256) simt_linear_kernel(const LinearArgs a) {
  extern __shared__ __align__(16) float sm[];
  const int d = a.d, m = a.m;
  // fixed-size arrays first (launch_plan.h: simt_fixed_floats), then the feature-sized ones, in shared memory
  // after them or, when they do not fit, in this block's slice of the workspace
  float* sX = sm;                      // [kChunk][d] the chunk's q or k
  float* sV = sX + kChunk * d;         // [kChunk][32]
  float* sA = sV + kChunk * 32;        // [kChunk][kChunk] causal in-chunk phi(q).phi(k)
  float* sRow = sA + kChunk * kChunk;  // [kChunk] half norms, then row maxima
  float* sDen = sRow + kChunk;         // [kChunk]
  float* sMisc = sDen + kChunk;        // [16]
  float* big = a.simt_state ? a.simt_state + static_cast<int64_t>(blockIdx.x) * kp::simt_feature_floats(m)
                            : sMisc + 16;
  float* sPq = big;                // [kChunk][m]
  float* sPk = sPq + kChunk * m;   // [kChunk][m]
  float* sS = sPk + kChunk * m;    // [m][32] state for this block's 32 value columns
  float* sZ = sS + m * 32;         // [m]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const plan::Index3 at = plan::unflatten3(blockIdx.x, kp::simt_column_blocks(a.dv), a.heads);
  const int j0 = at.x * 32, h = at.y, b = at.z;
  const bool favor = a.fmap == kFavor;
  const int64_t x_stride = static_cast<int64_t>(a.heads) * d, v_stride = static_cast<int64_t>(a.heads) * a.dv;
  const T* qg = static_cast<const T*>(a.q) + static_cast<int64_t>(b) * a.n * x_stride + h * d;
  const T* kg = static_cast<const T*>(a.k) + static_cast<int64_t>(b) * a.n * x_stride + h * d;
  const T* vg = static_cast<const T*>(a.v) + static_cast<int64_t>(b) * a.n * v_stride + h * a.dv + j0;
  const T* w = static_cast<const T*>(a.w);

  // raw features of tokens [t0, t0 + kChunk) of x into P: favor logits (x'.w - |x'|^2/2) or the element-wise map
  auto features = [&](const T* xg, int t0, float* P) {
    __syncthreads();
    for (int x = tid; x < kChunk * d; x += 256) {
      const int t = x / d;
      sX[x] = t0 + t < a.n ? to_float(xg[(t0 + t) * x_stride + x % d]) : 0.f;
    }
    __syncthreads();
    if (favor) {
      if (tid < kChunk) {
        float s = 0.f;
        for (int c = 0; c < d; ++c) s = fmaf(sX[tid * d + c], sX[tid * d + c], s);
        sRow[tid] = s * a.root_scale * a.root_scale * 0.5f;
      }
      __syncthreads();
      for (int x = tid; x < kChunk * m; x += 256) {
        const int t = x / m, f = x % m;
        float s = 0.f;
        for (int c = 0; c < d; ++c) s = fmaf(sX[t * d + c], to_float(w[static_cast<int64_t>(f) * d + c]), s);
        P[x] = t0 + t < a.n ? a.root_scale * s - sRow[t] : -INFINITY;
      }
    } else {
      for (int x = tid; x < kChunk * m; x += 256) P[x] = t0 + x / m < a.n ? elementwise_feature(sX[x], a.fmap) : 0.f;
    }
    __syncthreads();
  };
  // phi = exp(P - c) + eps with one shift c for every entry (keys)
  auto shift_all = [&](float* P, float c) {
    for (int x = tid; x < kChunk * m; x += 256) P[x] = P[x] == -INFINITY ? 0.f : expf(P[x] - c) + a.eps;
    __syncthreads();
  };
  // the value whose max is the shift: the logit P, or x'.w = P + |x'|^2/2 (stabilizer projection)
  auto shift_value = [&](const float* P, int x) { return a.shift_logits ? P[x] : P[x] + sRow[x / m]; };
  // phi = exp(P - rowmax) + eps (queries)
  auto shift_rows = [&](float* P) {
    for (int t = warp; t < kChunk; t += 8) {
      float mx = -INFINITY;
      for (int f = lane; f < m; f += 32) mx = fmaxf(mx, shift_value(P, t * m + f));
      mx = warp_max(mx);
      for (int f = lane; f < m; f += 32) P[t * m + f] = mx == -INFINITY ? 0.f : expf(P[t * m + f] - mx) + a.eps;
    }
    __syncthreads();
  };
  auto load_v = [&](int t0) {
    for (int x = tid; x < kChunk * 32; x += 256) {
      const int t = x / 32, j = x % 32;
      sV[x] = t0 + t < a.n && j0 + j < a.dv ? to_float(vg[(t0 + t) * v_stride + j]) : 0.f;
    }
  };
  auto accumulate_state = [&]() {  // S += phi(k)^T v, z += colsum phi(k) over the chunk
    for (int x = tid; x < m * 32; x += 256) {
      const int f = x / 32, j = x % 32;
      float s = sS[x];
      for (int t = 0; t < kChunk; ++t) s = fmaf(sPk[t * m + f], sV[t * 32 + j], s);
      sS[x] = s;
    }
    for (int f = tid; f < m; f += 256) {
      float s = sZ[f];
      for (int t = 0; t < kChunk; ++t) s += sPk[t * m + f];
      sZ[f] = s;
    }
    __syncthreads();
  };
  const float factor = favor ? 1.f / m : 1.f;
  auto emit = [&](int t0, bool causal) {  // out = (phi(q) S [+ in-chunk]) / den
    for (int t = warp; t < kChunk; t += 8) {
      float s = 0.f;
      for (int f = lane; f < m; f += 32) s = fmaf(sPq[t * m + f], sZ[f], s);
      s = warp_sum(s);
      if (causal)
        for (int u = 0; u <= t; ++u) s += sA[t * kChunk + u];
      if (lane == 0) sDen[t] = s;
    }
    __syncthreads();
    T* og = static_cast<T*>(a.out) + static_cast<int64_t>(b) * a.n * v_stride + h * a.dv + j0;
    for (int x = tid; x < kChunk * 32; x += 256) {
      const int t = x / 32, j = x % 32;
      if (t0 + t >= a.n || j0 + j >= a.dv) continue;
      float s = 0.f;
      for (int f = 0; f < m; ++f) s = fmaf(sPq[t * m + f], sS[f * 32 + j], s);
      if (causal)
        for (int u = 0; u <= t; ++u) s = fmaf(sA[t * kChunk + u], sV[u * 32 + j], s);
      const float mul = a.normalize && sDen[t] != 0.f ? 1.f / sDen[t] : factor;
      og[(t0 + t) * v_stride + j] = from_float<T>(s * mul);
    }
  };

  for (int x = tid; x < m * 32; x += 256) sS[x] = 0.f;
  for (int f = tid; f < m; f += 256) sZ[f] = 0.f;

  if (!a.causal) {
    float c = 0.f;
    if (favor) {  // the keys' shift: max over every key and feature
      float mx = -INFINITY;
      for (int t0 = 0; t0 < a.n; t0 += kChunk) {
        features(kg, t0, sPk);
        for (int x = tid; x < kChunk * m; x += 256) mx = fmaxf(mx, shift_value(sPk, x));
      }
      mx = warp_max(mx);
      if (lane == 0) sMisc[warp] = mx;
      __syncthreads();
      c = sMisc[0];
      for (int i = 1; i < 8; ++i) c = fmaxf(c, sMisc[i]);
    }
    for (int t0 = 0; t0 < a.n; t0 += kChunk) {
      features(kg, t0, sPk);
      if (favor) shift_all(sPk, c);
      load_v(t0);
      __syncthreads();
      accumulate_state();
    }
    for (int t0 = 0; t0 < a.n; t0 += kChunk) {
      features(qg, t0, sPq);
      if (favor) shift_rows(sPq);
      emit(t0, false);
    }
  } else {
    float c = 0.f;
    if (favor) {  // max_r |w_r|^2 / 2
      float best = 0.f;
      for (int f = tid; f < m; f += 256) {
        float s = 0.f;
        for (int x = 0; x < d; ++x) {
          const float v = to_float(w[static_cast<int64_t>(f) * d + x]);
          s = fmaf(v, v, s);
        }
        best = fmaxf(best, s);
      }
      best = warp_max(best);
      if (lane == 0) sMisc[warp] = best;
      __syncthreads();
      for (int i = 0; i < 8; ++i) c = fmaxf(c, sMisc[i]);
      c *= 0.5f;
    }
    for (int t0 = 0; t0 < a.n; t0 += kChunk) {
      features(qg, t0, sPq);
      if (favor) shift_rows(sPq);
      features(kg, t0, sPk);
      if (favor) shift_all(sPk, c);
      load_v(t0);
      for (int x = tid; x < kChunk * kChunk; x += 256) {
        const int t = x / kChunk, u = x % kChunk;
        float s = 0.f;
        if (u <= t)
          for (int f = 0; f < m; ++f) s = fmaf(sPq[t * m + f], sPk[u * m + f], s);
        sA[x] = s;
      }
      __syncthreads();
      emit(t0, true);
      __syncthreads();
      accumulate_state();
    }
  }
}

// ================================================================================================================
// host side
// ================================================================================================================
using kp::dims_fit_tc;

LinearArgs make_args(const KernelizedAttentionParams& p) {
  const kp::Shape s = kp::shape(p);
  LinearArgs a{};
  a.q = p.query, a.k = p.key, a.v = p.value, a.w = p.projection, a.out = p.output;
  a.batch = s.batch, a.heads = s.heads, a.n = s.n, a.d = s.d, a.dv = s.dv, a.m = s.m, a.mp = s.mp;
  a.fmap = p.feature_map, a.causal = s.causal, a.normalize = p.normalize != 0;
  const float scale = p.scale != 0.f ? p.scale : 1.f / std::sqrt(static_cast<float>(p.head_dim));
  a.root_scale = std::sqrt(scale);
  a.eps = p.eps;
  a.shift_logits = p.stabilizer != static_cast<int32_t>(Stabilizer::kProjection);
  a.tiles = s.tiles, a.nfb = s.nfb, a.splits = s.splits;
  return a;
}

kp::Shape shape_of(const LinearArgs& a) {
  kp::Shape s{};
  s.batch = a.batch, s.heads = a.heads, s.n = a.n, s.d = a.d, s.dv = a.dv, s.m = a.m, s.mp = a.mp;
  s.tiles = a.tiles, s.nfb = a.nfb, s.splits = a.splits, s.causal = a.causal != 0, s.favor = a.fmap == kFavor;
  return s;
}

template <typename T, int D, int DV>
cudaError_t run_tc(LinearArgs a, void* workspace, cudaStream_t stream) {
  const kp::Shape shp = shape_of(a);
  const kp::WorkspaceLayout l = kp::tc_layout(shp);
  char* w = static_cast<char*>(workspace);
  a.records = reinterpret_cast<float*>(w + l.records), a.s_fp32 = reinterpret_cast<float*>(w + l.s_fp32);
  a.s_half = w + l.s_half, a.z = reinterpret_cast<float*>(w + l.z), a.s_scale = reinterpret_cast<float*>(w + l.s_scale);
  a.w_bound = reinterpret_cast<float*>(w + l.w_bound);
  const int bh = a.batch * a.heads;  // combine: one block per batch*head in grid.x
  cudaError_t err;
  const size_t ks_smem = KeyStateSmem<T, D, DV>::bytes(), q_smem = QuerySmem<T, D, DV>::bytes(a.mp, a.causal);

  if (a.causal) {
    if (a.fmap == kFavor) {
      projection_bound_kernel<T><<<1, 32, 0, stream>>>(a);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    auto ks = key_state_kernel<T, D, DV, true>;
    if ((err = allow_smem(ks, ks_smem)) != cudaSuccess) return err;
    ks<<<static_cast<unsigned>(kp::key_state_blocks(shp)), 128, ks_smem, stream>>>(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    prefix_kernel<<<static_cast<unsigned>(kp::prefix_blocks(shp)), 256, 0, stream>>>(a, kp::prefix_slices(shp));
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    auto qk = query_kernel<T, D, DV, true>;
    if ((err = allow_smem(qk, q_smem)) != cudaSuccess) return err;
    qk<<<static_cast<unsigned>(kp::query_blocks(shp)), 128, q_smem, stream>>>(a);
    return cudaGetLastError();
  }
  auto ks = key_state_kernel<T, D, DV, false>;
  if ((err = allow_smem(ks, ks_smem)) != cudaSuccess) return err;
  ks<<<static_cast<unsigned>(kp::key_state_blocks(shp)), 128, ks_smem, stream>>>(a);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  combine_kernel<T><<<bh, 256, sizeof(float) * a.dv, stream>>>(a);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  auto qk = query_kernel<T, D, DV, false>;
  if ((err = allow_smem(qk, q_smem)) != cudaSuccess) return err;
  qk<<<static_cast<unsigned>(kp::query_blocks(shp)), 128, q_smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
size_t tc_smem_need(const LinearArgs& a) {
  auto need = [&](auto d_tag) {
    constexpr int D = decltype(d_tag)::value;
    return std::max(KeyStateSmem<T, D, D>::bytes(), QuerySmem<T, D, D>::bytes(a.mp, a.causal));
  };
  return a.d == 32 ? need(std::integral_constant<int, 32>{})
                   : a.d == 64 ? need(std::integral_constant<int, 64>{}) : need(std::integral_constant<int, 128>{});
}

template <typename T>
cudaError_t run(const KernelizedAttentionParams& p, void* workspace, cudaStream_t stream) {
  const LinearArgs a = make_args(p);
  if constexpr (sizeof(T) == 2) {
    const bool aligned = aligned16(p.query) && aligned16(p.key) && aligned16(p.value) && aligned16(p.output) &&
                         (a.fmap != kFavor || aligned16(p.projection));
    const bool fits = a.mp <= kMaxTcFeatures && tc_smem_need<T>(a) <= smem_optin_limit();
    if (dims_fit_tc(a.d, a.dv) && fits && aligned && workspace) {
      switch (a.d) {
        case 32: return run_tc<T, 32, 32>(a, workspace, stream);
        case 64: return run_tc<T, 64, 64>(a, workspace, stream);
        default: return run_tc<T, 128, 128>(a, workspace, stream);
      }
    }
  }
  // the CUDA-core kernel: state in shared memory where it fits, else in the workspace the plan reserved
  const kp::Shape shp = shape_of(a);
  LinearArgs sa = a;
  size_t smem = kp::simt_smem_all(a.d, a.m);
  if (kp::simt_state_in_workspace(shp, smem_optin_limit())) {
    if (!workspace || kp::simt_workspace(shp) == 0) return cudaErrorInvalidValue;
    sa.simt_state = static_cast<float*>(workspace);
    smem = kp::simt_smem_fixed(a.d);
  }
  cudaError_t err = allow_smem(simt_linear_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  simt_linear_kernel<T><<<static_cast<unsigned>(kp::simt_blocks(shp)), 256, smem, stream>>>(sa);
  return cudaGetLastError();
}

}  // namespace
}  // namespace detail

size_t kernelized_attention_workspace_size(const KernelizedAttentionParams& p) {
  return plan::kernelized::workspace_size(p);
}

cudaError_t launch_kernelized_attention(const KernelizedAttentionParams& p, DataType dtype, void* workspace,
                                        cudaStream_t stream) {
  const bool favor = p.feature_map == static_cast<int32_t>(FeatureMap::kFavorPositive);
  if (p.batch <= 0 || p.num_heads <= 0 || p.seq_len < 0 || p.head_dim <= 0 || p.v_head_dim <= 0 ||
      p.feature_map < 0 || p.feature_map > 2 || (favor && (p.num_features <= 0 || !p.projection)))
    return cudaErrorInvalidValue;
  if (p.seq_len == 0) return cudaSuccess;
  if (plan::kernelized::launch_limit(p, detail::smem_optin_limit())) return cudaErrorInvalidConfiguration;
  return detail::dispatch_dtype(dtype, [&](auto t) { return detail::run<decltype(t)>(p, workspace, stream); });
}

}  // namespace attn_export
