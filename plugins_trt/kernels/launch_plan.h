// Launch geometry, shared-memory plans and workspace sizes, as plain C++ (no CUDA include beyond the kernel
// header), so the launchers, the plugins' pre-flight (`attn-export plugins check`) and the host tests
// (tests/test_launch_plan.py) all compute them with the same code.
//
// CUDA limits the grid's y and z extents to 65535 blocks and x to 2^31 - 1: anything that grows with batch *
// heads, experts * batch or the batch goes into x (decoded in the kernel) or is launched in z slices.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "attn_export_kernels.h"

#if defined(__CUDACC__)
#define ATTN_EXPORT_HD __host__ __device__
#else
#define ATTN_EXPORT_HD
#endif

namespace attn_export {
namespace plan {

constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;
// Dynamic shared memory every sm_80+ part grants without opting in; above it the device's opt-in limit decides.
constexpr size_t kDefaultSmem = 48 * 1024;

ATTN_EXPORT_HD inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align256(size_t x) { return (x + 255) / 256 * 256; }

// ---- z slices: a launch over `total` entries along z runs as ceil(total / 65535) launches ----------------------
ATTN_EXPORT_HD inline int64_t z_slices(int64_t total) { return total <= 0 ? 0 : ceil_div64(total, kMaxGridYZ); }
ATTN_EXPORT_HD inline int64_t z_slice_first(int64_t slice) { return slice * kMaxGridYZ; }
ATTN_EXPORT_HD inline int64_t z_slice_count(int64_t total, int64_t slice) {
  const int64_t rest = total - z_slice_first(slice);
  return rest < kMaxGridYZ ? rest : kMaxGridYZ;
}

// ---- a flat grid.x index as (fastest, middle, slowest) coordinates --------------------------------------------
struct Index3 {
  int x, y, z;
};
ATTN_EXPORT_HD inline Index3 unflatten3(int64_t index, int nx, int ny) {
  Index3 r;
  r.x = static_cast<int>(index % nx);
  r.y = static_cast<int>((index / nx) % ny);
  r.z = static_cast<int>(index / (static_cast<int64_t>(nx) * ny));
  return r;
}

// ================================================================================================================
// KernelizedAttention
// ================================================================================================================
namespace kernelized {

constexpr int kTile = 64;            // tokens per tile (and per causal chunk)
constexpr int kFB = 64;              // features per key-state block
constexpr int kFC = 32;              // features per register chunk
constexpr int kMaxTcFeatures = 512;  // beyond, the query kernel's W and S tiles outgrow shared memory anyway
constexpr int kTargetBlocks = 264;   // key-state blocks to aim for (two waves on a 132-SM H100) when splitting keys
constexpr int kChunk = 16;           // tokens per step of the CUDA-core kernel
constexpr int kSimtColumns = 32;     // value columns per CUDA-core block

struct Shape {
  int batch, heads, n, d, dv, m, mp;  // m: features (favor: projection rows, else head_dim); mp: m rounded to 32
  int tiles, nfb, splits;             // tiles = ceil(n / 64); nfb = ceil(mp / 64); splits: key ranges (non-causal)
  bool causal, favor;
};

inline Shape shape(const KernelizedAttentionParams& p) {
  Shape s{};
  s.favor = p.feature_map == static_cast<int32_t>(FeatureMap::kFavorPositive);
  s.causal = p.causal != 0;
  s.batch = p.batch, s.heads = p.num_heads, s.n = p.seq_len, s.d = p.head_dim, s.dv = p.v_head_dim;
  s.m = s.favor ? p.num_features : p.head_dim;
  s.mp = (s.m + 31) / 32 * 32;
  s.tiles = static_cast<int>(ceil_div64(p.seq_len, kTile));
  s.nfb = static_cast<int>(ceil_div64(s.mp, kFB));
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.num_heads * s.nfb;
  const int64_t want = ceil_div64(kTargetBlocks, std::max<int64_t>(blocks, 1));
  s.splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, s.tiles, 64})));
  return s;
}

// The row of the key-state block's shared projection tile that holds global feature `feature` (the block holds
// rows [f_base, f_base + 64) only).
ATTN_EXPORT_HD inline int w_tile_row(int feature, int f_base) { return feature - f_base; }

// record of a key-state block: S part [kFB][dv], z part [kFB], then (non-causal) the shift c and sum(v) [dv]
ATTN_EXPORT_HD inline int record_floats(int dv) { return kFB * dv + kFB + 1 + dv; }

// value head dim = query head dim (every zoo model); other shapes take the CUDA-core kernel
inline bool dims_fit_tc(int d, int dv) { return (d == 32 || d == 64 || d == 128) && dv == d; }

// Flat grid.x sizes of the tensor-core kernels: key state (nfb, parts, batch*heads), prefix scan (slices of one
// chunk's state, batch*heads), query (tiles, batch*heads).
inline int64_t key_state_blocks(const Shape& s) {
  return static_cast<int64_t>(s.nfb) * (s.causal ? s.tiles : s.splits) * s.batch * s.heads;
}
inline int prefix_slices(const Shape& s) { return static_cast<int>(ceil_div64(int64_t{s.nfb} * record_floats(s.dv), 256)); }
inline int64_t prefix_blocks(const Shape& s) { return int64_t{prefix_slices(s)} * s.batch * s.heads; }
inline int64_t query_blocks(const Shape& s) { return int64_t{s.tiles} * s.batch * s.heads; }

struct WorkspaceLayout {
  size_t records, s_fp32, s_half, z, s_scale, w_bound, total;
};

// Every term grows with the shapes (TensorRT sizes the workspace at a profile's largest shapes and runs smaller
// ones), so the non-causal record count uses a bound of batch*heads*splits that does not shrink with batch*heads.
inline WorkspaceLayout tc_layout(const Shape& s) {
  const size_t bh = static_cast<size_t>(s.batch) * s.heads;
  const size_t split_bound =
      std::min(bh * std::min(s.tiles, 64), bh + static_cast<size_t>(ceil_div64(kTargetBlocks, s.nfb)));
  const size_t record_sets = s.causal ? bh * s.tiles : split_bound;
  WorkspaceLayout l{};
  size_t off = 0;
  l.records = off, off += align256(sizeof(float) * record_sets * s.nfb * record_floats(s.dv));
  const size_t s_elems = s.causal ? 0 : bh * s.mp * s.dv;
  l.s_fp32 = off, off += align256(sizeof(float) * s_elems);
  l.s_half = off, off += align256(sizeof(uint16_t) * s_elems);
  l.z = off, off += align256(sizeof(float) * (s.causal ? 0 : bh * s.mp));
  l.s_scale = off, off += align256(sizeof(float) * bh);
  l.w_bound = off, off += align256(sizeof(float));
  l.total = off;
  return l;
}

// CUDA-core kernel: shared floats that do not grow with the features (the chunk's q/k [16][d], v [16][32], the
// causal in-chunk products [16][16], row statistics) and those that do (phi(q), phi(k) [16][m] each, the state
// S [m][32] and z [m]). When both do not fit the device's shared memory, the feature-sized arrays move to the
// workspace (one slice per block) instead of the launch failing.
ATTN_EXPORT_HD inline size_t simt_fixed_floats(int d) {
  return static_cast<size_t>(kChunk) * d + kChunk * kSimtColumns + kChunk * kChunk + 4 * kChunk + 16;
}
ATTN_EXPORT_HD inline size_t simt_feature_floats(int m) {
  return 2 * static_cast<size_t>(kChunk) * m + static_cast<size_t>(m) * kSimtColumns + m;
}
inline size_t simt_smem_all(int d, int m) { return sizeof(float) * (simt_fixed_floats(d) + simt_feature_floats(m)); }
inline size_t simt_smem_fixed(int d) { return sizeof(float) * simt_fixed_floats(d); }
ATTN_EXPORT_HD inline int simt_column_blocks(int dv) { return static_cast<int>(ceil_div64(dv, kSimtColumns)); }
inline int64_t simt_blocks(const Shape& s) { return int64_t{simt_column_blocks(s.dv)} * s.heads * s.batch; }
// Workspace the CUDA-core kernel may need: reserved whenever its shared plan passes the 48 KiB every device gives,
// since the device (and its opt-in limit) is unknown when TensorRT asks for the size.
inline size_t simt_workspace(const Shape& s) {
  if (simt_smem_all(s.d, s.m) <= kDefaultSmem) return 0;
  return align256(sizeof(float) * simt_feature_floats(s.m) * static_cast<size_t>(simt_blocks(s)));
}
// Whether the CUDA-core kernel keeps its state in the workspace for a device granting `smem_limit` bytes.
inline bool simt_state_in_workspace(const Shape& s, size_t smem_limit) { return simt_smem_all(s.d, s.m) > smem_limit; }

inline size_t workspace_size(const KernelizedAttentionParams& p) {
  if (p.batch <= 0 || p.num_heads <= 0 || p.seq_len <= 0 || p.head_dim <= 0 || p.v_head_dim <= 0) return 0;
  const Shape s = shape(p);
  if (s.m <= 0) return 0;
  const size_t tc = dims_fit_tc(s.d, s.dv) && s.mp <= kMaxTcFeatures ? tc_layout(s).total : 0;
  return std::max(tc, simt_workspace(s));
}

// Why these params cannot launch on a device granting `smem_limit` bytes of shared memory per block, or nullptr.
inline char const* launch_limit(const KernelizedAttentionParams& p, size_t smem_limit) {
  if (p.batch <= 0 || p.num_heads <= 0 || p.seq_len <= 0) return nullptr;  // nothing is launched
  const Shape s = shape(p);
  if (key_state_blocks(s) > kMaxGridX || query_blocks(s) > kMaxGridX || prefix_blocks(s) > kMaxGridX ||
      simt_blocks(s) > kMaxGridX)
    return "batch * heads * sequence tiles exceeds the 2^31-1 blocks of a grid";
  if (simt_smem_fixed(s.d) > smem_limit) return "head_dim too large for the CUDA-core kernel's shared memory";
  return nullptr;
}

}  // namespace kernelized

// ================================================================================================================
// GEMM grids (MixtureOfExperts, DisentangledAttention): (ceil(N/64), ceil(M/64), batch entries in z slices)
// ================================================================================================================
inline char const* gemm_launch_limit(int64_t m, int64_t n) {
  if (ceil_div64(n, 64) > kMaxGridX) return "a GEMM's column count exceeds the grid's x limit";
  if (ceil_div64(m, 64) > kMaxGridYZ) return "a GEMM's row count exceeds 65535 * 64 (the grid's y limit)";
  return nullptr;
}

}  // namespace plan
}  // namespace attn_export
