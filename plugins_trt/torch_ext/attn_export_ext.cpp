// Torch extension over the plain launchers of plugins_trt/kernels: one function per custom op, taking the op's
// inputs and attributes (string attributes as their enum codes), running on the current CUDA stream with a
// workspace from torch's caching allocator. Built on demand by attn_export/backends/cuda_ops.py.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>

#include "attn_export_kernels.h"

namespace {

using attn_export::DataType;

DataType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DataType::kFloat32;
    case at::kHalf: return DataType::kFloat16;
    case at::kBFloat16: return DataType::kBFloat16;
    default: TORCH_CHECK(false, "attn_export kernels take float32, float16 or bfloat16 tensors, not ", t.scalar_type());
  }
}

// A floating input: on the first input's device, of its dtype, of the given rank; returned contiguous.
at::Tensor floating(const at::Tensor& t, const at::Tensor& first, const char* name, int64_t rank) {
  TORCH_CHECK(t.is_cuda() && t.device() == first.device(), name, " must be on ", first.device());
  TORCH_CHECK(t.scalar_type() == first.scalar_type(), name, " must be ", first.scalar_type(), ", not ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == rank, name, " must have rank ", rank, ", got shape ", t.sizes());
  return t.contiguous();
}

at::Tensor scratch(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "attn_export ", op, " kernel: ", cudaGetErrorString(err));
}

int32_t head_dim_of(const at::Tensor& x, int64_t num_heads, const char* name) {
  TORCH_CHECK(num_heads > 0 && x.size(2) % num_heads == 0, name, " width ", x.size(2), " is not a multiple of ",
              num_heads, " heads");
  return static_cast<int32_t>(x.size(2) / num_heads);
}

at::Tensor block_sparse_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                  const at::Tensor& block_index, const std::optional<at::Tensor>& key_bias,
                                  int64_t num_heads, int64_t block_size, double scale, int64_t global_blocks,
                                  int64_t count_repeats) {
  TORCH_CHECK(query.is_cuda() && query.dim() == 3, "query must be a CUDA tensor [B, N, H*D]");
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = query.contiguous(), k = floating(key, query, "key", 3), v = floating(value, query, "value", 3);
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "query, key and value must have one shape");
  TORCH_CHECK(block_index.dim() == 3, "block_index must be [H or 1, N / block_size, m]");
  const at::Tensor table = block_index.to(query.device(), at::kInt).contiguous();
  attn_export::BlockSparseAttentionParams p{};
  p.query = q.data_ptr(), p.key = k.data_ptr(), p.value = v.data_ptr(), p.block_index = table.data_ptr<int32_t>();
  p.batch = q.size(0), p.seq_len = q.size(1), p.head_dim = head_dim_of(q, num_heads, "query");
  p.index_heads = table.size(0), p.blocks_per_row = table.size(2);
  p.num_heads = num_heads, p.block_size = block_size, p.scale = scale, p.global_blocks = global_blocks;
  p.count_repeats = count_repeats;
  TORCH_CHECK(count_repeats == 0 || count_repeats == 1, "count_repeats must be 0 or 1");
  at::Tensor kb;
  if (key_bias && key_bias->defined()) {
    kb = floating(*key_bias, query, "key_bias", 2);
    TORCH_CHECK(kb.size(0) == p.batch && kb.size(1) == p.seq_len, "key_bias must be [B, N], got ", kb.sizes());
    p.key_bias = kb.data_ptr();
  }
  TORCH_CHECK(block_size > 0 && p.seq_len % block_size == 0, "sequence length ", p.seq_len,
              " is not a multiple of block_size ", block_size);
  TORCH_CHECK(table.size(1) == p.seq_len / block_size, "block_index has ", table.size(1), " rows for ",
              p.seq_len / block_size, " query blocks");
  at::Tensor out = at::empty_like(q);
  p.output = out.data_ptr();
  at::Tensor ws = scratch(attn_export::block_sparse_attention_workspace_size(p), q);
  check(attn_export::launch_block_sparse_attention(p, dtype_of(q), ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "BlockSparseAttention");
  return out;
}

at::Tensor dense_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                           const std::optional<at::Tensor>& bias, int64_t num_heads, double scale, int64_t causal,
                           int64_t score_fn, int64_t logits_input, int64_t masked_rows) {
  TORCH_CHECK(query.is_cuda() && query.dim() == 3, "query must be a CUDA tensor [B, Nq, H*D]");
  TORCH_CHECK(logits_input == 0 || logits_input == 1, "logits_input must be 0 or 1");
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor v = floating(value, query, "value", 3);
  attn_export::DenseAttentionParams p{};
  p.batch = query.size(0), p.q_len = query.size(1), p.kv_len = v.size(1);
  p.v_head_dim = head_dim_of(v, num_heads, "value");
  p.num_heads = num_heads, p.scale = scale, p.causal = causal, p.score_fn = score_fn, p.logits_input = logits_input;
  p.masked_rows = masked_rows;
  TORCH_CHECK(v.size(0) == p.batch, "value must be [B, Nk, H*Dv]");
  at::Tensor q, k;
  if (!logits_input) {  // with logits_input the kernel reads neither, so neither is copied or checked
    q = query.contiguous(), k = floating(key, query, "key", 3);
    TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && v.size(1) == k.size(1),
                "key must be [B, Nk, H*D] and value [B, Nk, H*Dv]");
    p.head_dim = head_dim_of(q, num_heads, "query");
    p.query = q.data_ptr(), p.key = k.data_ptr();
  }
  at::Tensor b;
  if (bias && bias->defined()) {
    b = floating(*bias, query, "bias", 4);
    // [B, 1, 1, Nk] padding masks broadcast over heads and query rows (the logits need every row)
    TORCH_CHECK((b.size(0) == 1 || b.size(0) == p.batch) && (b.size(1) == 1 || b.size(1) == num_heads) &&
                    (b.size(2) == p.q_len || (!logits_input && b.size(2) == 1)) && b.size(3) == p.kv_len,
                "bias must be [B or 1, H or 1, Nq", logits_input ? "" : " or 1", ", Nk], got ", b.sizes());
    p.bias = b.data_ptr(), p.bias_batch = b.size(0), p.bias_heads = b.size(1), p.bias_rows = b.size(2);
  } else {
    TORCH_CHECK(!logits_input, "logits_input=1 needs the logits as the bias input");
    p.bias_batch = p.bias_heads = p.bias_rows = 1;
  }
  p.value = v.data_ptr();
  at::Tensor out = at::empty({p.batch, p.q_len, num_heads * p.v_head_dim}, query.options());
  p.output = out.data_ptr();
  at::Tensor ws = scratch(attn_export::dense_attention_workspace_size(p), query);
  check(attn_export::launch_dense_attention(p, dtype_of(query), ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "DenseAttention");
  return out;
}

at::Tensor kernelized_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                const std::optional<at::Tensor>& projection, int64_t num_heads, int64_t feature_map,
                                int64_t causal, int64_t normalize, double scale, double eps) {
  TORCH_CHECK(query.is_cuda() && query.dim() == 3, "query must be a CUDA tensor [B, N, H*D]");
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = query.contiguous(), k = floating(key, query, "key", 3), v = floating(value, query, "value", 3);
  TORCH_CHECK(k.sizes() == q.sizes() && v.size(0) == q.size(0) && v.size(1) == q.size(1),
              "key must match query, value must be [B, N, H*Dv]");
  attn_export::KernelizedAttentionParams p{};
  p.batch = q.size(0), p.seq_len = q.size(1);
  p.head_dim = head_dim_of(q, num_heads, "query"), p.v_head_dim = head_dim_of(v, num_heads, "value");
  p.num_heads = num_heads, p.feature_map = feature_map, p.causal = causal, p.normalize = normalize;
  p.scale = scale, p.eps = eps;
  at::Tensor w;
  if (feature_map == static_cast<int64_t>(attn_export::FeatureMap::kFavorPositive)) {
    TORCH_CHECK(projection && projection->defined(), "favor_positive needs the projection input");
    w = floating(*projection, query, "projection", 2);
    TORCH_CHECK(w.size(1) == p.head_dim, "projection must be [M, ", p.head_dim, "], got ", w.sizes());
    p.projection = w.data_ptr(), p.num_features = w.size(0);
  }
  p.query = q.data_ptr(), p.key = k.data_ptr(), p.value = v.data_ptr();
  at::Tensor out = at::empty({p.batch, p.seq_len, num_heads * p.v_head_dim}, q.options());
  p.output = out.data_ptr();
  at::Tensor ws = scratch(attn_export::kernelized_attention_workspace_size(p), q);
  check(attn_export::launch_kernelized_attention(p, dtype_of(q), ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "KernelizedAttention");
  return out;
}

at::Tensor disentangled_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                  const at::Tensor& rel_key, const at::Tensor& rel_query,
                                  const std::optional<at::Tensor>& bias, int64_t num_heads, int64_t span,
                                  int64_t max_position, double scale, int64_t c2p, int64_t p2c, int64_t masked_rows) {
  TORCH_CHECK(query.is_cuda() && query.dim() == 3, "query must be a CUDA tensor [B, N, H*D]");
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = query.contiguous(), k = floating(key, query, "key", 3), v = floating(value, query, "value", 3);
  const at::Tensor rk = floating(rel_key, query, "rel_key", 2), rq = floating(rel_query, query, "rel_query", 2);
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "query, key and value must have one shape");
  TORCH_CHECK((!c2p || (rk.size(0) >= 2 * span && rk.size(1) == q.size(2))) &&
                  (!p2c || (rq.size(0) >= 2 * span && rq.size(1) == q.size(2))),
              "rel_key and rel_query (where read) must be [2 * span, H*D]");
  TORCH_CHECK((c2p == 0 || c2p == 1) && (p2c == 0 || p2c == 1), "c2p and p2c must be 0 or 1");
  attn_export::DisentangledAttentionParams p{};
  p.query = q.data_ptr(), p.key = k.data_ptr(), p.value = v.data_ptr();
  p.rel_key = rk.data_ptr(), p.rel_query = rq.data_ptr();
  p.batch = q.size(0), p.seq_len = q.size(1), p.head_dim = head_dim_of(q, num_heads, "query");
  p.num_heads = num_heads, p.span = span, p.max_position = max_position, p.scale = scale;
  p.c2p = c2p, p.p2c = p2c, p.masked_rows = masked_rows;
  p.bias_batch = p.bias_heads = p.bias_rows = 1;
  at::Tensor b;
  if (bias && bias->defined()) {
    b = floating(*bias, query, "bias", 4);
    TORCH_CHECK((b.size(0) == 1 || b.size(0) == p.batch) && (b.size(1) == 1 || b.size(1) == num_heads) &&
                    (b.size(2) == 1 || b.size(2) == p.seq_len) && b.size(3) == p.seq_len,
                "bias must be [B or 1, H or 1, N or 1, N], got ", b.sizes());
    p.bias = b.data_ptr(), p.bias_batch = b.size(0), p.bias_heads = b.size(1), p.bias_rows = b.size(2);
  }
  at::Tensor out = at::empty_like(q);
  p.output = out.data_ptr();
  at::Tensor ws = scratch(attn_export::disentangled_attention_workspace_size(p), q);
  check(attn_export::launch_disentangled_attention(p, dtype_of(q), ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "DisentangledAttention");
  return out;
}

at::Tensor mixture_of_experts(const at::Tensor& hidden, const at::Tensor& router, const at::Tensor& expert_in,
                              const at::Tensor& expert_out, int64_t capacity, double capacity_factor,
                              int64_t activation) {
  TORCH_CHECK(hidden.is_cuda() && hidden.dim() == 3, "hidden must be a CUDA tensor [B, T, d]");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor x = hidden.contiguous(), r = floating(router, hidden, "router", 2);
  const at::Tensor wi = floating(expert_in, hidden, "expert_in", 3), wo = floating(expert_out, hidden, "expert_out", 3);
  const int64_t d = x.size(2), e = r.size(1), f = wi.size(2);
  TORCH_CHECK(r.size(0) == d, "router must be [d, E]");
  TORCH_CHECK(wi.size(0) == e && wi.size(1) == d, "expert_in must be [E, d, F]");
  TORCH_CHECK(wo.size(0) == e && wo.size(1) == f && wo.size(2) == d, "expert_out must be [E, F, d]");
  attn_export::MixtureOfExpertsParams p{};
  p.hidden = x.data_ptr(), p.router = r.data_ptr(), p.expert_in = wi.data_ptr(), p.expert_out = wo.data_ptr();
  p.batch = x.size(0), p.tokens = x.size(1), p.model_dim = d, p.ffn_dim = f, p.num_experts = e;
  p.capacity = capacity, p.capacity_factor = capacity_factor, p.activation = activation;
  at::Tensor out = at::empty_like(x);
  p.output = out.data_ptr();
  at::Tensor ws = scratch(attn_export::mixture_of_experts_workspace_size(p), x);
  check(attn_export::launch_mixture_of_experts(p, dtype_of(x), ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "MixtureOfExperts");
  return out;
}

at::Tensor long_convolution(const at::Tensor& input, const at::Tensor& kernel, const at::Tensor& skip,
                            const std::optional<at::Tensor>& kernel_reverse, int64_t channels) {
  TORCH_CHECK(input.is_cuda() && input.dim() == 3, "input must be a CUDA tensor [B, N, C]");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor u = input.contiguous(), kf = floating(kernel, input, "kernel", 2);
  const at::Tensor s = floating(skip, input, "skip", 1);
  const int64_t c = u.size(2);
  TORCH_CHECK(channels == 0 || channels == c, "channels attribute ", channels, " but the input has ", c);
  TORCH_CHECK(kf.size(0) == c && kf.size(1) >= u.size(1) && s.size(0) == c, "kernel must be [C, L >= N], skip [C]");
  attn_export::LongConvolutionParams p{};
  at::Tensor kr;
  if (kernel_reverse && kernel_reverse->defined()) {
    kr = floating(*kernel_reverse, input, "kernel_reverse", 2);
    TORCH_CHECK(kr.sizes() == kf.sizes(), "kernel_reverse must have the kernel's shape");
    p.kernel_reverse = kr.data_ptr();
  }
  p.input = u.data_ptr(), p.kernel = kf.data_ptr(), p.skip = s.data_ptr();
  p.batch = u.size(0), p.seq_len = u.size(1), p.kernel_len = kf.size(1), p.channels = c;
  at::Tensor out = at::empty_like(u);
  p.output = out.data_ptr();
  at::Tensor ws = scratch(attn_export::long_convolution_workspace_size(p), u);
  check(attn_export::launch_long_convolution(p, dtype_of(u), ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "LongConvolution");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attn_export CUDA kernels (plugins_trt/kernels) for torch tensors";
  m.def("block_sparse_attention", &block_sparse_attention);
  m.def("dense_attention", &dense_attention);
  m.def("kernelized_attention", &kernelized_attention);
  m.def("disentangled_attention", &disentangled_attention);
  m.def("mixture_of_experts", &mixture_of_experts);
  m.def("long_convolution", &long_convolution);
}
