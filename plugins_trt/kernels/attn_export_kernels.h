// attn_export CUDA kernels: the public interface.
//
// One params struct and one launcher per custom op of attn_export/ops/. Plain C++ and CUDA runtime only (no
// TensorRT include), so the TensorRT plugins (plugins_trt/trt/) and the torch extension (plugins_trt/torch_ext/)
// call the same code.
//
// Rules every struct follows (tests/test_kernel_contract.py checks them against the op contracts):
//   - every contract input is a pointer field with the input's name (optional inputs may be nullptr);
//   - `output` is the output pointer;
//   - every contract attribute is a field with the attribute's name: int -> int32_t, float -> float, string ->
//     int32_t holding the code of the enum named in the field's comment ("enum Name"), whose values follow the
//     order of the contract's option list;
//   - the remaining fields are shapes.
// Tensors are dense, row-major, in the contract's layout ([B, N, H*D] for attention). All floating tensors of one
// call share `dtype`; integer tables are int32.
//
// Launchers enqueue work on `stream` and never allocate, synchronise or copy from the host, so they are legal in a
// TensorRT enqueue and inside CUDA-graph capture. `workspace` must hold <op>_workspace_size(params) bytes (256-byte
// aligned; nullptr is fine when that size is 0). A launcher returns cudaErrorInvalidValue for shapes the op's
// contract rejects, and the launch error otherwise.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace attn_export {

// Element type of the floating tensors of one call. Owned by this library (not nvinfer1::DataType).
enum class DataType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------------------------------------------------------
// BlockSparseAttention (attn_export/ops/block_sparse_attention.py)
// Per head and query block i: softmax over the key blocks block_index[h, i, :] (entries outside [0, N/block_size)
// ignored; repeats counted once, or with count_repeats once per listed slot); global rows (the first and last
// global_blocks query blocks) see every key. key_bias (optional) is added to every score of key j. A row that sees
// no key (or only keys biased -inf) is zero.
struct BlockSparseAttentionParams {
  const void* query;           // [batch, seq_len, num_heads * head_dim]
  const void* key;             // [batch, seq_len, num_heads * head_dim]
  const void* value;           // [batch, seq_len, num_heads * head_dim]
  const int32_t* block_index;  // [index_heads, seq_len / block_size, blocks_per_row]
  const void* key_bias;        // [batch, seq_len] or nullptr; -inf masks a key
  void* output;                // [batch, seq_len, num_heads * head_dim]
  int32_t batch;
  int32_t seq_len;             // must be a multiple of block_size
  int32_t head_dim;
  int32_t index_heads;         // 1 (one table for every head) or num_heads
  int32_t blocks_per_row;      // m, the table's last axis
  int32_t num_heads;
  int32_t block_size;
  float scale;                 // 0 means 1/sqrt(head_dim)
  int32_t global_blocks;
  int32_t count_repeats;       // 1: a block listed r times weighs r times
};

// ---------------------------------------------------------------------------------------------------------------
// DenseAttention (attn_export/ops/dense_attention.py)
// weights(scale * q.k^T + bias [+ causal mask]) v with float32 statistics; bias broadcasts over batch, heads and
// query rows (index_math.h: bias_strides). A softmax row whose every score is -inf gives zeros, the mean of the
// values with masked_rows kMean, or NaN with kNone (no check: for scores a pass proved finite).
// weights: softmax over each row, or relu(s)^2 with no normalisation. With logits_input the bias is the whole
// score (query and key are not read; scale and head_dim are ignored).
// The codes of `score_fn`, in the order of dense_attention.SCORE_FNS.
enum class ScoreFn : int32_t { kSoftmax = 0, kReluSquared = 1 };
// The codes of `masked_rows`, in the order of dense_attention.MASKED_ROWS.
enum class MaskedRows : int32_t { kZeros = 0, kMean = 1, kNone = 2 };

struct DenseAttentionParams {
  const void* query;           // [batch, q_len, num_heads * head_dim] (not read with logits_input)
  const void* key;             // [batch, kv_len, num_heads * head_dim] (not read with logits_input)
  const void* value;           // [batch, kv_len, num_heads * v_head_dim]
  const void* bias;            // [bias_batch, bias_heads, bias_rows, shared_len + kv_len] or nullptr; -inf masks a key
  const void* shared_key;      // [shared_batch, shared_len, num_heads * head_dim] or nullptr: batch row b sees set
  const void* shared_value;    // b / (batch / shared_batch) ahead of its own keys; [.., num_heads * v_head_dim]
  void* output;                // [batch, q_len, num_heads * v_head_dim]
  int32_t batch;
  int32_t q_len;
  int32_t kv_len;              // the row's own keys (key, value)
  int32_t shared_batch;        // divides batch (ignored without shared keys)
  int32_t shared_len;          // 0 without shared keys
  int32_t head_dim;            // ignored with logits_input
  int32_t v_head_dim;
  int32_t bias_batch;          // 1 or batch (ignored without bias)
  int32_t bias_heads;          // 1 or num_heads (ignored without bias)
  int32_t bias_rows;           // 1 or q_len (ignored without bias); must be q_len with logits_input
  int32_t num_heads;
  float scale;                 // 0 means 1/sqrt(head_dim); ignored with logits_input
  int32_t causal;              // 1: query i sees keys j <= i + shared_len + kv_len - q_len
  int32_t score_fn;            // enum ScoreFn
  int32_t logits_input;        // 1: bias (required) holds the logits
  int32_t masked_rows;         // enum MaskedRows
};

// ---------------------------------------------------------------------------------------------------------------
// KernelizedAttention (attn_export/ops/kernelized_attention.py)
// The codes of `feature_map`, in the order of kernelized_attention.FEATURE_MAPS.
enum class FeatureMap : int32_t { kFavorPositive = 0, kEluPlusOne = 1, kIdentity = 2 };
// The codes of `stabilizer` (kernelized_attention.STABILIZERS): the favor shift is the max of the logits
// W x' - |x'|^2/2 or of the projection W x' alone (performer-pytorch; causal=0 only).
enum class Stabilizer : int32_t { kLogits = 0, kProjection = 1 };

struct KernelizedAttentionParams {
  const void* query;           // [batch, seq_len, num_heads * head_dim]
  const void* key;             // [batch, seq_len, num_heads * head_dim]
  const void* value;           // [batch, seq_len, num_heads * v_head_dim]
  const void* projection;      // [num_features, head_dim] (favor_positive only, else nullptr)
  void* output;                // [batch, seq_len, num_heads * v_head_dim]
  int32_t batch;
  int32_t seq_len;
  int32_t head_dim;
  int32_t v_head_dim;
  int32_t num_features;        // M: projection rows for favor_positive (ignored by the other maps)
  int32_t num_heads;
  int32_t feature_map;         // enum FeatureMap
  int32_t causal;
  int32_t normalize;
  float scale;                 // favor_positive temperature; 0 means 1/sqrt(head_dim)
  float eps;
  int32_t stabilizer;          // enum Stabilizer (favor_positive only)
};

// ---------------------------------------------------------------------------------------------------------------
// DisentangledAttention (attn_export/ops/disentangled_attention.py)
// DeBERTa: softmax(scale * (q.k + c2p q.rel_key[delta] + p2c k.rel_query[delta]) + bias) v with delta the
// (log-bucketed) relative position shifted by span and clamped to [0, 2*span) (index_math.h: relative_row). The
// bias broadcasts like DenseAttention's; masked_rows as there, kZeros or kMean only.
struct DisentangledAttentionParams {
  const void* query;           // [batch, seq_len, num_heads * head_dim]
  const void* key;             // [batch, seq_len, num_heads * head_dim]
  const void* value;           // [batch, seq_len, num_heads * head_dim]
  const void* rel_key;         // [2 * span, num_heads * head_dim]
  const void* rel_query;       // [2 * span, num_heads * head_dim]
  const void* bias;            // [bias_batch, bias_heads, bias_rows, seq_len] or nullptr; -inf masks a key
  void* output;                // [batch, seq_len, num_heads * head_dim]
  int32_t batch;
  int32_t seq_len;
  int32_t head_dim;
  int32_t num_heads;
  int32_t span;
  int32_t max_position;        // 0: no log buckets (DeBERTa v1)
  float scale;                 // 0 means 1/sqrt((1 + c2p + p2c) * head_dim)
  int32_t c2p;                 // 1: content-to-position term (0: rel_key is not read)
  int32_t p2c;                 // 1: position-to-content term (0: rel_query is not read)
  int32_t masked_rows;         // enum MaskedRows
  int32_t bias_batch;          // 1 or batch (ignored without bias)
  int32_t bias_heads;          // 1 or num_heads (ignored without bias)
  int32_t bias_rows;           // 1 or seq_len (ignored without bias)
};

// ---------------------------------------------------------------------------------------------------------------
// MixtureOfExperts (attn_export/ops/mixture_of_experts.py)
// Switch top-1 routing per batch row with capacity; dropped tokens get zeros.
// The codes of `activation`, in the order of mixture_of_experts.ACTIVATIONS.
enum class Activation : int32_t { kRelu = 0, kGelu = 1 };

struct MixtureOfExpertsParams {
  const void* hidden;          // [batch, tokens, model_dim]
  const void* router;          // [model_dim, num_experts]
  const void* expert_in;       // [num_experts, model_dim, ffn_dim]
  const void* expert_out;      // [num_experts, ffn_dim, model_dim]
  void* output;                // [batch, tokens, model_dim]
  int32_t batch;
  int32_t tokens;
  int32_t model_dim;
  int32_t ffn_dim;
  int32_t num_experts;
  int32_t capacity;            // 0 means ceil(tokens * capacity_factor / num_experts)
  float capacity_factor;
  int32_t activation;          // enum Activation
};

// ---------------------------------------------------------------------------------------------------------------
// LongConvolution (attn_export/ops/long_convolution.py)
// y[t, c] = sum_{l<=t} kernel[c, l] u[t-l, c] + sum_{1<=l<N-t} kernel_reverse[c, l-1] u[t+l, c] + skip[c] u[t, c].
struct LongConvolutionParams {
  const void* input;           // [batch, seq_len, channels]
  const void* kernel;          // [channels, kernel_len], kernel_len >= seq_len
  const void* skip;            // [channels]
  const void* kernel_reverse;  // [channels, kernel_len] or nullptr
  void* output;                // [batch, seq_len, channels]
  int32_t batch;
  int32_t seq_len;
  int32_t kernel_len;
  int32_t channels;
};

// ---------------------------------------------------------------------------------------------------------------
// Launchers and workspace sizes (bytes; enough for any dtype).
cudaError_t launch_block_sparse_attention(const BlockSparseAttentionParams& params, DataType dtype, void* workspace,
                                          cudaStream_t stream);
size_t block_sparse_attention_workspace_size(const BlockSparseAttentionParams& params);

cudaError_t launch_dense_attention(const DenseAttentionParams& params, DataType dtype, void* workspace,
                                   cudaStream_t stream);
size_t dense_attention_workspace_size(const DenseAttentionParams& params);

cudaError_t launch_kernelized_attention(const KernelizedAttentionParams& params, DataType dtype, void* workspace,
                                        cudaStream_t stream);
size_t kernelized_attention_workspace_size(const KernelizedAttentionParams& params);

cudaError_t launch_disentangled_attention(const DisentangledAttentionParams& params, DataType dtype, void* workspace,
                                          cudaStream_t stream);
size_t disentangled_attention_workspace_size(const DisentangledAttentionParams& params);

cudaError_t launch_mixture_of_experts(const MixtureOfExpertsParams& params, DataType dtype, void* workspace,
                                      cudaStream_t stream);
size_t mixture_of_experts_workspace_size(const MixtureOfExpertsParams& params);

cudaError_t launch_long_convolution(const LongConvolutionParams& params, DataType dtype, void* workspace,
                                    cudaStream_t stream);
size_t long_convolution_workspace_size(const LongConvolutionParams& params);

}  // namespace attn_export
