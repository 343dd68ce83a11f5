// Generated from attn_export/ops by `python -m attn_export.plugin_contracts`. Do not edit:
// tests/test_plugin_contract.py fails when this file and the op contracts disagree.
#pragma once

#include <cstdint>

#include "fields.h"

namespace attn_export {
namespace trt_plugins {
namespace contracts {

inline constexpr char kPluginNamespace[] = "attn_export";
// Fingerprint of the tables below (attn_export.plugin_contracts.contracts_digest()), recorded by engine
// manifests.
#define ATTN_EXPORT_CONTRACTS_DIGEST "8201037071fda77d"
inline constexpr char kContractsDigest[] = ATTN_EXPORT_CONTRACTS_DIGEST;

// BlockSparseAttention v1: attn_export/ops/block_sparse_attention.py
namespace block_sparse_attention {
inline constexpr char kName[] = "BlockSparseAttention";
inline constexpr char kVersion[] = "1";
enum Field : int32_t { kNumHeads = 0, kBlockSize = 1, kScale = 2, kGlobalBlocks = 3, kCountRepeats = 4 };
inline constexpr FieldSpec kFields[] = {
    {"num_heads", FieldKind::kInt, 1, 0.0f, "", nullptr, 0, nullptr, 0},
    {"block_size", FieldKind::kInt, 64, 0.0f, "", nullptr, 0, nullptr, 0},
    {"scale", FieldKind::kFloat, 0, 0.0f, "", nullptr, 0, nullptr, 0},
    {"global_blocks", FieldKind::kInt, 0, 0.0f, "", nullptr, 0, nullptr, 0},
    {"count_repeats", FieldKind::kInt, 0, 0.0f, "", nullptr, 0, nullptr, 0},
};
inline constexpr InputSpec kInputs[] = {
    {"query", 3, TensorKind::kFloating, false},
    {"key", 3, TensorKind::kFloating, false},
    {"value", 3, TensorKind::kFloating, false},
    {"block_index", 3, TensorKind::kInt32, false},
    {"key_bias", 2, TensorKind::kFloating, true},
};
inline constexpr DimSource kOutputDims[] = {{0, 0, 0}, {0, 1, 0}, {0, 2, 0}};
inline constexpr OpSpec kSpec{kName, kVersion, kPluginNamespace, kFields, 5, kInputs, 5, 4, kOutputDims, 3};
}  // namespace block_sparse_attention

// DenseAttention v1: attn_export/ops/dense_attention.py
namespace dense_attention {
inline constexpr char kName[] = "DenseAttention";
inline constexpr char kVersion[] = "1";
enum Field : int32_t { kNumHeads = 0, kScale = 1, kCausal = 2, kScoreFn = 3, kLogitsInput = 4, kMaskedRows = 5 };
inline constexpr char const* kScoreFnOptions[] = {"softmax", "relu_squared"};
inline constexpr char const* kMaskedRowsOptions[] = {"zeros", "mean", "none"};
inline constexpr FieldSpec kFields[] = {
    {"num_heads", FieldKind::kInt, 1, 0.0f, "", nullptr, 0, nullptr, 0},
    {"scale", FieldKind::kFloat, 0, 0.0f, "", nullptr, 0, nullptr, 0},
    {"causal", FieldKind::kInt, 0, 0.0f, "", nullptr, 0, nullptr, 0},
    {"score_fn", FieldKind::kString, 0, 0.0f, "softmax", kScoreFnOptions, 2, nullptr, 0},
    {"logits_input", FieldKind::kInt, 0, 0.0f, "", nullptr, 0, nullptr, 0},
    {"masked_rows", FieldKind::kString, 0, 0.0f, "zeros", kMaskedRowsOptions, 3, nullptr, 0},
};
inline constexpr InputSpec kInputs[] = {
    {"query", 3, TensorKind::kFloating, false},
    {"key", 3, TensorKind::kFloating, false},
    {"value", 3, TensorKind::kFloating, false},
    {"bias", 4, TensorKind::kFloating, true},
    {"shared_key", 3, TensorKind::kFloating, true},
    {"shared_value", 3, TensorKind::kFloating, true},
};
inline constexpr DimSource kOutputDims[] = {{0, 0, 0}, {0, 1, 0}, {2, 2, 0}};
inline constexpr OpSpec kSpec{kName, kVersion, kPluginNamespace, kFields, 6, kInputs, 6, 3, kOutputDims, 3};
}  // namespace dense_attention

// DisentangledAttention v1: attn_export/ops/disentangled_attention.py
namespace disentangled_attention {
inline constexpr char kName[] = "DisentangledAttention";
inline constexpr char kVersion[] = "1";
enum Field : int32_t { kNumHeads = 0, kSpan = 1, kMaxPosition = 2, kScale = 3, kC2p = 4, kP2c = 5, kMaskedRows = 6 };
inline constexpr char const* kMaskedRowsOptions[] = {"zeros", "mean"};
inline constexpr FieldSpec kFields[] = {
    {"num_heads", FieldKind::kInt, 1, 0.0f, "", nullptr, 0, nullptr, 0},
    {"span", FieldKind::kInt, 256, 0.0f, "", nullptr, 0, nullptr, 0},
    {"max_position", FieldKind::kInt, 512, 0.0f, "", nullptr, 0, nullptr, 0},
    {"scale", FieldKind::kFloat, 0, 0.0f, "", nullptr, 0, nullptr, 0},
    {"c2p", FieldKind::kInt, 1, 0.0f, "", nullptr, 0, nullptr, 0},
    {"p2c", FieldKind::kInt, 1, 0.0f, "", nullptr, 0, nullptr, 0},
    {"masked_rows", FieldKind::kString, 0, 0.0f, "zeros", kMaskedRowsOptions, 2, nullptr, 0},
};
inline constexpr InputSpec kInputs[] = {
    {"query", 3, TensorKind::kFloating, false},
    {"key", 3, TensorKind::kFloating, false},
    {"value", 3, TensorKind::kFloating, false},
    {"rel_key", 2, TensorKind::kFloating, false},
    {"rel_query", 2, TensorKind::kFloating, false},
    {"bias", 4, TensorKind::kFloating, true},
};
inline constexpr DimSource kOutputDims[] = {{0, 0, 0}, {0, 1, 0}, {0, 2, 0}};
inline constexpr OpSpec kSpec{kName, kVersion, kPluginNamespace, kFields, 7, kInputs, 6, 5, kOutputDims, 3};
}  // namespace disentangled_attention

// KernelizedAttention v1: attn_export/ops/kernelized_attention.py
namespace kernelized_attention {
inline constexpr char kName[] = "KernelizedAttention";
inline constexpr char kVersion[] = "1";
enum Field : int32_t { kNumHeads = 0, kFeatureMap = 1, kCausal = 2, kNormalize = 3, kScale = 4, kEps = 5, kStabilizer = 6 };
inline constexpr char const* kFeatureMapOptions[] = {"favor_positive", "elu_plus_one", "identity"};
inline constexpr char const* kStabilizerOptions[] = {"logits", "projection"};
inline constexpr FieldSpec kFields[] = {
    {"num_heads", FieldKind::kInt, 1, 0.0f, "", nullptr, 0, nullptr, 0},
    {"feature_map", FieldKind::kString, 0, 0.0f, "favor_positive", kFeatureMapOptions, 3, nullptr, 0},
    {"causal", FieldKind::kInt, 0, 0.0f, "", nullptr, 0, nullptr, 0},
    {"normalize", FieldKind::kInt, 1, 0.0f, "", nullptr, 0, nullptr, 0},
    {"scale", FieldKind::kFloat, 0, 0.0f, "", nullptr, 0, nullptr, 0},
    {"eps", FieldKind::kFloat, 0, 1e-06f, "", nullptr, 0, nullptr, 0},
    {"stabilizer", FieldKind::kString, 0, 0.0f, "logits", kStabilizerOptions, 2, nullptr, 0},
};
inline constexpr InputSpec kInputs[] = {
    {"query", 3, TensorKind::kFloating, false},
    {"key", 3, TensorKind::kFloating, false},
    {"value", 3, TensorKind::kFloating, false},
    {"projection", 2, TensorKind::kFloating, true},
};
inline constexpr DimSource kOutputDims[] = {{0, 0, 0}, {0, 1, 0}, {2, 2, 0}};
inline constexpr OpSpec kSpec{kName, kVersion, kPluginNamespace, kFields, 7, kInputs, 4, 3, kOutputDims, 3};
}  // namespace kernelized_attention

// LongConvolution v1: attn_export/ops/long_convolution.py
namespace long_convolution {
inline constexpr char kName[] = "LongConvolution";
inline constexpr char kVersion[] = "1";
enum Field : int32_t { kChannels = 0 };
inline constexpr FieldSpec kFields[] = {
    {"channels", FieldKind::kInt, 0, 0.0f, "", nullptr, 0, nullptr, 0},
};
inline constexpr InputSpec kInputs[] = {
    {"input", 3, TensorKind::kFloating, false},
    {"kernel", 2, TensorKind::kFloating, false},
    {"skip", 1, TensorKind::kFloating, false},
    {"kernel_reverse", 2, TensorKind::kFloating, true},
};
inline constexpr DimSource kOutputDims[] = {{0, 0, 0}, {0, 1, 0}, {0, 2, 0}};
inline constexpr OpSpec kSpec{kName, kVersion, kPluginNamespace, kFields, 1, kInputs, 4, 3, kOutputDims, 3};
}  // namespace long_convolution

// MixtureOfExperts v1: attn_export/ops/mixture_of_experts.py
namespace mixture_of_experts {
inline constexpr char kName[] = "MixtureOfExperts";
inline constexpr char kVersion[] = "1";
enum Field : int32_t { kCapacity = 0, kCapacityFactor = 1, kActivation = 2 };
inline constexpr char const* kActivationOptions[] = {"relu", "gelu"};
inline constexpr FieldSpec kFields[] = {
    {"capacity", FieldKind::kInt, 0, 0.0f, "", nullptr, 0, nullptr, 0},
    {"capacity_factor", FieldKind::kFloat, 0, 1.0f, "", nullptr, 0, nullptr, 0},
    {"activation", FieldKind::kString, 0, 0.0f, "relu", kActivationOptions, 2, nullptr, 0},
};
inline constexpr InputSpec kInputs[] = {
    {"hidden", 3, TensorKind::kFloating, false},
    {"router", 2, TensorKind::kFloating, false},
    {"expert_in", 3, TensorKind::kFloating, false},
    {"expert_out", 3, TensorKind::kFloating, false},
};
inline constexpr DimSource kOutputDims[] = {{0, 0, 0}, {0, 1, 0}, {0, 2, 0}};
inline constexpr OpSpec kSpec{kName, kVersion, kPluginNamespace, kFields, 3, kInputs, 4, 4, kOutputDims, 3};
}  // namespace mixture_of_experts

}  // namespace contracts
}  // namespace trt_plugins
}  // namespace attn_export
