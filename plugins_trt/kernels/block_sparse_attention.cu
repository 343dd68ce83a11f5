// BlockSparseAttention (attn_export/ops/block_sparse_attention.py): each query tile lies inside one query block,
// so the whole block shares one list of key blocks. The block's table row is read once into shared memory, the
// first warp drops invalid and (unless count_repeats) repeated entries, keeping table order, and the tile loop walks
// only the listed key blocks; global rows walk every block. Only listed blocks are ever loaded or computed. With
// count_repeats a block listed r times is walked r times, so it weighs r times in the exp-sum and the value sum.
#include "attention_core.cuh"

namespace attn_export {
namespace detail {
namespace {

template <typename T>
struct BlockSparsePolicy {
  const int32_t* table;  // [index_heads, num_blocks, slots]
  const T* key_bias;     // [batch, seq_len] or nullptr
  int index_heads, num_blocks, slots, block_size, global_blocks, count_repeats, seq_len;
  float scale_log2;
  static constexpr float empty_row = 0.f;  // a row that sees no key is zeros
  int tile;

  // scratch: [0] listed block count (-1: global row), [1, 1 + slots) the table row, then the de-duplicated list
  __device__ int prepare(int* scratch, int, int h, int q0) const {
    const int qb = q0 / block_size;
    const int tiles_per_block = block_size / tile;
    if (qb < global_blocks || qb >= num_blocks - global_blocks) {
      if (threadIdx.x == 0) scratch[0] = -1;
      __syncthreads();
      return num_blocks * tiles_per_block;
    }
    int* row = scratch + 1;
    int* list = row + slots;
    const int32_t* g = table + (static_cast<int64_t>(index_heads == 1 ? 0 : h) * num_blocks + qb) * slots;
    for (int s = threadIdx.x; s < slots; s += blockDim.x) row[s] = g[s];
    __syncthreads();
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      int count = 0;
      for (int base = 0; base < slots; base += 32) {
        const int s = base + lane;
        const int kb = s < slots ? row[s] : -1;
        bool keep = kb >= 0 && kb < num_blocks;
        for (int t = 0; keep && !count_repeats && t < s; ++t) keep = row[t] != kb;  // else listed twice counts once
        const unsigned votes = __ballot_sync(0xffffffffu, keep);
        if (keep) list[count + __popc(votes & ((1u << lane) - 1u))] = kb;
        count += __popc(votes);
      }
      if (lane == 0) scratch[0] = count;
    }
    __syncthreads();
    return scratch[0] * tiles_per_block;
  }
  __device__ int tile_start(const int* scratch, int it) const {
    const int tiles_per_block = block_size / tile;
    const int nth = it / tiles_per_block;
    const int kb = scratch[0] < 0 ? nth : scratch[1 + slots + nth];
    return kb * block_size + (it % tiles_per_block) * tile;
  }
  __device__ float logit(int b, int, int, int j, float qk) const {
    const float x = qk * scale_log2;
    return key_bias ? x + bias_units(to_float(key_bias[static_cast<int64_t>(b) * seq_len + j]), kLog2e) : x;
  }
};

int largest_divisor_up_to(int n, int cap) {
  for (int d = cap; d > 1; --d)
    if (n % d == 0) return d;
  return 1;
}

template <typename T, int D>
cudaError_t launch_tc(const AttentionProblem& pr, const BlockSparsePolicy<T>& pol, int batch, int scratch,
                      cudaStream_t stream) {
  constexpr int BK64 = D == 128 ? 32 : 64;  // keeps the D=128 tile inside ~52 KiB of shared memory
  if (pol.block_size % 64 == 0) return launch_tc_attention<T, D, 4, BK64>(pr, pol, batch, scratch, stream);
  if (pol.block_size % 32 == 0) return launch_tc_attention<T, D, 2, 32>(pr, pol, batch, scratch, stream);
  return launch_tc_attention<T, D, 1, 16>(pr, pol, batch, scratch, stream);
}

template <typename T>
cudaError_t run(const BlockSparseAttentionParams& p, cudaStream_t stream) {
  const AttentionProblem pr = make_problem(p.query, p.key, p.value, p.output, p.num_heads, p.seq_len, p.seq_len,
                                           p.head_dim, p.head_dim);
  BlockSparsePolicy<T> pol{};
  pol.table = p.block_index;
  pol.key_bias = static_cast<const T*>(p.key_bias);
  pol.count_repeats = p.count_repeats != 0, pol.seq_len = p.seq_len;
  pol.index_heads = p.index_heads, pol.num_blocks = p.seq_len / p.block_size, pol.slots = p.blocks_per_row;
  pol.block_size = p.block_size, pol.global_blocks = p.global_blocks;
  const float scale = p.scale != 0.f ? p.scale : 1.f / std::sqrt(static_cast<float>(p.head_dim));
  pol.scale_log2 = scale * kLog2e;
  const int scratch = 1 + 2 * p.blocks_per_row;

  if constexpr (sizeof(T) == 2) {
    if (tc_attention_applies<T>(pr) && p.block_size % 16 == 0) {
      switch (p.head_dim) {
        case 32: return launch_tc<T, 32>(pr, pol, p.batch, scratch, stream);
        case 64: return launch_tc<T, 64>(pr, pol, p.batch, scratch, stream);
        case 128: return launch_tc<T, 128>(pr, pol, p.batch, scratch, stream);
      }
    }
  }
  // CUDA-core path: row and key tiles that divide the block, so no tile straddles two blocks
  return launch_simt_attention<T>(pr, pol, p.batch, largest_divisor_up_to(p.block_size, kSimtRows),
                                  largest_divisor_up_to(p.block_size, kSimtKeys), scratch, stream);
}

}  // namespace
}  // namespace detail

size_t block_sparse_attention_workspace_size(const BlockSparseAttentionParams&) { return 0; }

cudaError_t launch_block_sparse_attention(const BlockSparseAttentionParams& p, DataType dtype, void*,
                                          cudaStream_t stream) {
  if (p.batch <= 0 || p.num_heads <= 0 || p.head_dim <= 0 || p.block_size <= 0 || p.seq_len < 0 ||
      p.seq_len % p.block_size != 0 || p.blocks_per_row < 0 || p.global_blocks < 0 ||
      (p.count_repeats != 0 && p.count_repeats != 1) ||
      (p.index_heads != 1 && p.index_heads != p.num_heads) || (p.blocks_per_row > 0 && !p.block_index))
    return cudaErrorInvalidValue;
  if (p.seq_len == 0) return cudaSuccess;
  return detail::dispatch_dtype(dtype, [&](auto t) { return detail::run<decltype(t)>(p, stream); });
}

}  // namespace attn_export
