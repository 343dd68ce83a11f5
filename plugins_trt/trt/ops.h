// The six ops as the plugin template sees them: the contract (op_contracts.h), the checks and kernel params that
// follow from the fields and input shapes (one <op>.cpp each, no TensorRT include), and the kernel launcher.
//
// Each Op type provides
//   Params                    the kernel's params struct (attn_export_kernels.h)
//   spec()                    the generated contract table
//   checkFields(fields)       shape-independent checks, run when the plugin is created
//   makeParams(fields, shapes, nbInputs, params)
//                             every shape field of params, and the checks that need shapes; pointers are left null
//   bind(params, inputs, nbInputs, output)
//                             the device pointers (absent optional inputs stay null)
//   launch / workspaceSize    the kernel library's entry points
#pragma once

#include <cstdint>

#include "attn_export_kernels.h"
#include "fields.h"
#include "op_contracts.h"

namespace attn_export {
namespace trt_plugins {

// ---------------------------------------------------------------------------------------------------- ops
struct BlockSparseAttentionOp {
  using Params = BlockSparseAttentionParams;
  static OpSpec const& spec() { return contracts::block_sparse_attention::kSpec; }
  static Status checkFields(FieldValues const& fields);
  static Status makeParams(FieldValues const& fields, TensorShape const* inputs, int32_t nbInputs, Params& params);
  static void bind(Params& params, void const* const* inputs, int32_t nbInputs, void* output);
  static cudaError_t launch(Params const& p, DataType dtype, void* workspace, cudaStream_t stream) {
    return launch_block_sparse_attention(p, dtype, workspace, stream);
  }
  static size_t workspaceSize(Params const& p) { return block_sparse_attention_workspace_size(p); }
};

struct DenseAttentionOp {
  using Params = DenseAttentionParams;
  static OpSpec const& spec() { return contracts::dense_attention::kSpec; }
  static Status checkFields(FieldValues const& fields);
  static Status makeParams(FieldValues const& fields, TensorShape const* inputs, int32_t nbInputs, Params& params);
  static void bind(Params& params, void const* const* inputs, int32_t nbInputs, void* output);
  static cudaError_t launch(Params const& p, DataType dtype, void* workspace, cudaStream_t stream) {
    return launch_dense_attention(p, dtype, workspace, stream);
  }
  static size_t workspaceSize(Params const& p) { return dense_attention_workspace_size(p); }
};

struct KernelizedAttentionOp {
  using Params = KernelizedAttentionParams;
  static OpSpec const& spec() { return contracts::kernelized_attention::kSpec; }
  static Status checkFields(FieldValues const& fields);
  static Status makeParams(FieldValues const& fields, TensorShape const* inputs, int32_t nbInputs, Params& params);
  static void bind(Params& params, void const* const* inputs, int32_t nbInputs, void* output);
  static cudaError_t launch(Params const& p, DataType dtype, void* workspace, cudaStream_t stream) {
    return launch_kernelized_attention(p, dtype, workspace, stream);
  }
  static size_t workspaceSize(Params const& p) { return kernelized_attention_workspace_size(p); }
};

struct DisentangledAttentionOp {
  using Params = DisentangledAttentionParams;
  static OpSpec const& spec() { return contracts::disentangled_attention::kSpec; }
  static Status checkFields(FieldValues const& fields);
  static Status makeParams(FieldValues const& fields, TensorShape const* inputs, int32_t nbInputs, Params& params);
  static void bind(Params& params, void const* const* inputs, int32_t nbInputs, void* output);
  static cudaError_t launch(Params const& p, DataType dtype, void* workspace, cudaStream_t stream) {
    return launch_disentangled_attention(p, dtype, workspace, stream);
  }
  static size_t workspaceSize(Params const& p) { return disentangled_attention_workspace_size(p); }
};

struct MixtureOfExpertsOp {
  using Params = MixtureOfExpertsParams;
  static OpSpec const& spec() { return contracts::mixture_of_experts::kSpec; }
  static Status checkFields(FieldValues const& fields);
  static Status makeParams(FieldValues const& fields, TensorShape const* inputs, int32_t nbInputs, Params& params);
  static void bind(Params& params, void const* const* inputs, int32_t nbInputs, void* output);
  static cudaError_t launch(Params const& p, DataType dtype, void* workspace, cudaStream_t stream) {
    return launch_mixture_of_experts(p, dtype, workspace, stream);
  }
  static size_t workspaceSize(Params const& p) { return mixture_of_experts_workspace_size(p); }
};

struct LongConvolutionOp {
  using Params = LongConvolutionParams;
  static OpSpec const& spec() { return contracts::long_convolution::kSpec; }
  static Status checkFields(FieldValues const& fields);
  static Status makeParams(FieldValues const& fields, TensorShape const* inputs, int32_t nbInputs, Params& params);
  static void bind(Params& params, void const* const* inputs, int32_t nbInputs, void* output);
  static cudaError_t launch(Params const& p, DataType dtype, void* workspace, cudaStream_t stream) {
    return launch_long_convolution(p, dtype, workspace, stream);
  }
  static size_t workspaceSize(Params const& p) { return long_convolution_workspace_size(p); }
};

}  // namespace trt_plugins
}  // namespace attn_export
