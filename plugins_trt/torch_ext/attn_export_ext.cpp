// Torch extension over the plain launchers of plugins_trt/kernels, driven exactly as the TensorRT plugins drive
// them: the attributes arrive by name and go through the plugins' field parsing (plugins_trt/trt/fields.cpp: the
// contract's names, defaults and string options), the shape checks and kernel params come from each op's
// makeParams (plugins_trt/trt/<op>.cpp), the output shape from the contract's rule. So the extension refuses and
// computes what the plugin would. Runs on the current CUDA stream with a workspace from torch's caching allocator;
// built on demand by attn_export/backends/cuda_ops.py.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "attn_export_kernels.h"
#include "ops.h"

namespace {

using attn_export::DataType;
using namespace attn_export::trt_plugins;

constexpr int32_t kMaxInputs = 8;

DataType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DataType::kFloat32;
    case at::kHalf: return DataType::kFloat16;
    case at::kBFloat16: return DataType::kBFloat16;
    default: TORCH_CHECK(false, "attn_export kernels take float32, float16 or bfloat16 tensors, not ", t.scalar_type());
  }
}

int32_t as_int32(py::handle value, const std::string& name) {
  const int64_t v = value.cast<int64_t>();
  TORCH_CHECK(v >= std::numeric_limits<int32_t>::min() && v <= std::numeric_limits<int32_t>::max(), name, "=", v,
              " does not fit the int32 the ONNX parser passes");
  return static_cast<int32_t>(v);
}

// Each attribute by name into the op's fields, typed as TensorRT's ONNX parser types them.
FieldValues parse_attributes(OpSpec const& spec, const py::dict& attrs) {
  FieldValues fields(spec);
  for (auto item : attrs) {
    const std::string name = py::str(item.first);
    py::handle value = item.second;
    Status status;
    if (py::isinstance<py::str>(value)) {
      const std::string text = value.cast<std::string>();
      status = fields.set(name.c_str(), RawType::kChar, text.data(), static_cast<int32_t>(text.size()));
    } else if (py::isinstance<py::bool_>(value) || py::isinstance<py::int_>(value)) {
      const int32_t v = as_int32(value, name);
      status = fields.set(name.c_str(), RawType::kInt32, &v, 1);
    } else if (py::isinstance<py::float_>(value)) {
      const float v = value.cast<float>();
      status = fields.set(name.c_str(), RawType::kFloat32, &v, 1);
    } else if (py::isinstance<py::list>(value) || py::isinstance<py::tuple>(value)) {
      std::vector<int32_t> values;
      for (py::handle v : value) values.push_back(as_int32(v, name));
      status = fields.set(name.c_str(), RawType::kInt32, values.empty() ? nullptr : values.data(),
                          static_cast<int32_t>(values.size()));
    } else {
      TORCH_CHECK(false, spec.name, ": attribute ", name, " must be an int, a float, a string or a list of ints");
    }
    TORCH_CHECK(status.ok(), spec.name, ": ", status.message());
  }
  return fields;
}

template <typename Op>
at::Tensor run(const std::vector<std::optional<at::Tensor>>& given, const py::dict& attrs) {
  OpSpec const& spec = Op::spec();
  FieldValues fields = parse_attributes(spec, attrs);
  Status status = Op::checkFields(fields);
  TORCH_CHECK(status.ok(), spec.name, ": ", status.message());

  int32_t nb = static_cast<int32_t>(given.size());
  while (nb > 0 && !given[static_cast<size_t>(nb - 1)].has_value()) --nb;  // omitted trailing optional inputs
  TORCH_CHECK(nb >= 1 && nb <= kMaxInputs, spec.name, ": expected ", spec.nb_required_inputs, " to ", spec.nb_inputs,
              " inputs, got ", nb);
  const at::Tensor& first = *given[0];
  TORCH_CHECK(first.is_cuda(), spec.name, ": input '", spec.inputs[0].name, "' must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(first.device());

  std::vector<at::Tensor> held;  // contiguous copies, alive until the launch is queued
  TensorShape shapes[kMaxInputs];
  void const* pointers[kMaxInputs] = {};
  for (int32_t i = 0; i < nb; ++i) {
    TORCH_CHECK(i < spec.nb_inputs, spec.name, ": expected at most ", spec.nb_inputs, " inputs");
    char const* name = spec.inputs[i].name;
    TORCH_CHECK(given[static_cast<size_t>(i)].has_value(), spec.name, ": input '", name,
                "' is missing (only trailing optional inputs may be left out)");
    at::Tensor t = *given[static_cast<size_t>(i)];
    if (spec.inputs[i].kind == TensorKind::kInt32) {
      t = t.to(first.device(), at::kInt).contiguous();
    } else {
      TORCH_CHECK(t.is_cuda() && t.device() == first.device(), spec.name, ": input '", name, "' must be on ",
                  first.device());
      TORCH_CHECK(t.scalar_type() == first.scalar_type(), spec.name, ": input '", name, "' must be ",
                  first.scalar_type(), ", not ", t.scalar_type());
      t = t.contiguous();
    }
    TORCH_CHECK(t.dim() <= kMaxRank, spec.name, ": input '", name, "' has rank ", t.dim());
    shapes[i].rank = static_cast<int32_t>(t.dim());
    for (int64_t d = 0; d < t.dim(); ++d) shapes[i].d[d] = t.size(d);
    pointers[i] = t.data_ptr();
    held.push_back(std::move(t));
  }
  typename Op::Params params{};
  status = Op::makeParams(fields, shapes, nb, params);
  TORCH_CHECK(status.ok(), spec.name, ": ", status.message());

  std::vector<int64_t> out_shape(static_cast<size_t>(spec.output_rank));
  outputDims(spec, [&](int32_t input, int32_t dim) -> int64_t { return shapes[input].d[dim]; },
             [](int64_t value) { return value; }, out_shape.data());
  at::Tensor out = at::empty(out_shape, first.options());
  if (out.numel() == 0) return out;
  Op::bind(params, pointers, nb, out.data_ptr());
  const size_t bytes = Op::workspaceSize(params);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, first.options().dtype(at::kByte));
  const cudaError_t err = Op::launch(params, dtype_of(first), workspace.data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "attn_export ", spec.name, " kernel: ", cudaGetErrorString(err));
  return out;
}

at::Tensor run_op(const std::string& op_type, const std::vector<std::optional<at::Tensor>>& inputs,
                  const py::dict& attrs) {
  if (op_type == BlockSparseAttentionOp::spec().name) return run<BlockSparseAttentionOp>(inputs, attrs);
  if (op_type == DenseAttentionOp::spec().name) return run<DenseAttentionOp>(inputs, attrs);
  if (op_type == KernelizedAttentionOp::spec().name) return run<KernelizedAttentionOp>(inputs, attrs);
  if (op_type == DisentangledAttentionOp::spec().name) return run<DisentangledAttentionOp>(inputs, attrs);
  if (op_type == MixtureOfExpertsOp::spec().name) return run<MixtureOfExpertsOp>(inputs, attrs);
  if (op_type == LongConvolutionOp::spec().name) return run<LongConvolutionOp>(inputs, attrs);
  TORCH_CHECK(false, "attn_export has no kernel for op ", op_type);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attn_export CUDA kernels (plugins_trt/kernels) for torch tensors, driven as the TensorRT plugins";
  m.def("run_op", &run_op, "run_op(op_type, inputs, attrs): inputs in contract order (None for an omitted "
        "optional one), attrs by contract name");
}
