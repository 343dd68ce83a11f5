// A stand-in for TensorRT that takes the plugin library through its life the way TensorRT's ONNX parser, builder
// and runtime call it, with the CUDA kernels replaced by recorders. It is compiled from the plugin sources against
// real TensorRT headers (10.3 and the newest release) with AddressSanitizer, and needs neither libnvinfer nor a GPU
// (tests/test_plugin_headers.py builds and runs it when the headers are present).
//
// What it shows: the creators list, field lists and defaults; createPlugin with ONNX-parser-shaped fields;
// the capability interfaces; output types; output shapes through IExprBuilder (symbolic and constant dimensions);
// every format combination TensorRT could offer; configure, workspace, onShapeChange and enqueue (kernel params
// and pointers as the launcher receives them); refusals with a logged reason; serialization into a runtime-phase
// plugin; clone and attachToContext surviving the original's deletion. What it cannot show: that real TensorRT
// calls these methods in this order with these arguments, and the kernels' numbers.
//
// Output: "creator ..." and "field ..." lines describing the library, "rule <op> ..." lines with the output-shape
// rule as seen through IExprBuilder, then "ok"/"FAIL" lines; the exit status is the number of failures.
#include <NvInferRuntime.h>

#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "attn_export_kernels.h"
#include "params_print.h"

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder);

using nvinfer1::DataType;
using nvinfer1::PluginFieldType;
using nvinfer1::TensorFormat;

// ------------------------------------------------------------------------------------------------ kernel recorders
namespace {
struct Launch {
  std::string op;
  std::string params;
  std::vector<void const*> pointers;  // inputs in contract order, then the output
  attn_export::DataType dtype;
  void* workspace;
  cudaStream_t stream;
};
std::vector<Launch> gLaunches;
cudaError_t gLaunchResult = cudaSuccess;

template <typename P>
cudaError_t record(char const* op, P const& p, std::vector<void const*> pointers, attn_export::DataType dtype,
                   void* workspace, cudaStream_t stream) {
  gLaunches.push_back({op, attn_export::testing::print(p), std::move(pointers), dtype, workspace, stream});
  return gLaunchResult;
}

// A size that grows with the problem, so a test sees which shapes it was computed from.
size_t sizeOf(int64_t a, int64_t b) { return static_cast<size_t>(1000 * a + b); }
}  // namespace

namespace attn_export {
cudaError_t launch_block_sparse_attention(const BlockSparseAttentionParams& p, DataType t, void* w, cudaStream_t s) {
  return record("BlockSparseAttention", p, {p.query, p.key, p.value, p.block_index, p.output}, t, w, s);
}
size_t block_sparse_attention_workspace_size(const BlockSparseAttentionParams& p) { return sizeOf(p.batch, p.seq_len); }
cudaError_t launch_dense_attention(const DenseAttentionParams& p, DataType t, void* w, cudaStream_t s) {
  return record("DenseAttention", p, {p.query, p.key, p.value, p.bias, p.output}, t, w, s);
}
size_t dense_attention_workspace_size(const DenseAttentionParams& p) { return sizeOf(p.batch, p.kv_len); }
cudaError_t launch_kernelized_attention(const KernelizedAttentionParams& p, DataType t, void* w, cudaStream_t s) {
  return record("KernelizedAttention", p, {p.query, p.key, p.value, p.projection, p.output}, t, w, s);
}
size_t kernelized_attention_workspace_size(const KernelizedAttentionParams& p) { return sizeOf(p.batch, p.seq_len); }
cudaError_t launch_disentangled_attention(const DisentangledAttentionParams& p, DataType t, void* w, cudaStream_t s) {
  return record("DisentangledAttention", p, {p.query, p.key, p.value, p.rel_key, p.rel_query, p.output}, t, w, s);
}
size_t disentangled_attention_workspace_size(const DisentangledAttentionParams& p) { return sizeOf(p.batch, p.seq_len); }
cudaError_t launch_mixture_of_experts(const MixtureOfExpertsParams& p, DataType t, void* w, cudaStream_t s) {
  return record("MixtureOfExperts", p, {p.hidden, p.router, p.expert_in, p.expert_out, p.output}, t, w, s);
}
size_t mixture_of_experts_workspace_size(const MixtureOfExpertsParams& p) { return sizeOf(p.batch, p.tokens); }
cudaError_t launch_long_convolution(const LongConvolutionParams& p, DataType t, void* w, cudaStream_t s) {
  return record("LongConvolution", p, {p.input, p.kernel, p.skip, p.kernel_reverse, p.output}, t, w, s);
}
size_t long_convolution_workspace_size(const LongConvolutionParams& p) { return sizeOf(p.batch, p.seq_len); }
}  // namespace attn_export

extern "C" const char* cudaGetErrorName(cudaError_t error) { return error ? "cudaErrorRecorded" : "cudaSuccess"; }
extern "C" const char* cudaGetErrorString(cudaError_t error) { return error ? "recorded failure" : "no error"; }

// ------------------------------------------------------------------------------------------------ fake TensorRT
namespace {

int gFailures = 0;

void check(bool ok, std::string const& what) {
  std::printf("%s %s\n", ok ? "ok" : "FAIL", what.c_str());
  if (!ok) ++gFailures;
}

class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
    if (severity <= Severity::kERROR) errors.emplace_back(msg);
  }
  std::vector<std::string> errors;

  bool loggedSince(size_t before, std::string const& fragment) const {
    for (size_t i = before; i < errors.size(); ++i) {
      if (errors[i].find(fragment) != std::string::npos) return true;
    }
    return false;
  }
};

class LoggerFinder final : public nvinfer1::ILoggerFinder {
 public:
  nvinfer1::ILogger* findLogger() noexcept override { return &logger; }
  Logger logger;
};

class FakeDimImpl final : public nvinfer1::apiv::VDimensionExpr {
 public:
  FakeDimImpl(bool constant, int64_t value) : constant_(constant), value_(value) {}
  bool isConstant() const override { return constant_; }
  int64_t getConstantValue() const override { return constant_ ? value_ : std::numeric_limits<int64_t>::min(); }
  bool isSizeTensor() const override { return false; }

 private:
  bool constant_;
  int64_t value_;
};

class FakeDim final : public nvinfer1::IDimensionExpr {
 public:
  FakeDim(bool constant, int64_t value) : impl_(constant, value) { mImpl = &impl_; }
  ~FakeDim() noexcept override = default;

 private:
  FakeDimImpl impl_;
};

class FakeBuilderImpl final : public nvinfer1::apiv::VExprBuilder {
 public:
  nvinfer1::IDimensionExpr const* constant(int64_t value) override { return make(true, value); }
  nvinfer1::IDimensionExpr const* operation(nvinfer1::DimensionOperation, nvinfer1::IDimensionExpr const&,
                                            nvinfer1::IDimensionExpr const&) override {
    ++operations;  // the contracts' rules copy dimensions; arithmetic would mean the table changed
    return make(false, 0);
  }
  nvinfer1::IDimensionExpr const* declareSizeTensor(int32_t, nvinfer1::IDimensionExpr const&,
                                                    nvinfer1::IDimensionExpr const&) override {
    return nullptr;
  }
  FakeDim const* make(bool constant, int64_t value) {
    dims.push_back(std::make_unique<FakeDim>(constant, value));
    return dims.back().get();
  }
  std::vector<std::unique_ptr<FakeDim>> dims;
  int operations = 0;
};

class FakeBuilder final : public nvinfer1::IExprBuilder {
 public:
  FakeBuilder() { mImpl = &impl; }
  ~FakeBuilder() noexcept override = default;
  FakeBuilderImpl impl;
};

// ------------------------------------------------------------------------------------------------ scenarios
struct Field {
  std::string name;
  PluginFieldType type;
  std::vector<unsigned char> bytes;
  int32_t length;
};

template <typename T>
Field numeric(std::string name, PluginFieldType type, T value) {
  Field f{std::move(name), type, std::vector<unsigned char>(sizeof(T)), 1};
  std::memcpy(f.bytes.data(), &value, sizeof(T));
  return f;
}
// As the ONNX parser hands over node attributes: INT -> kINT32, FLOAT -> kFLOAT32, STRING -> kCHAR with NUL.
Field intField(std::string name, int32_t value) { return numeric(std::move(name), PluginFieldType::kINT32, value); }
Field floatField(std::string name, float value) { return numeric(std::move(name), PluginFieldType::kFLOAT32, value); }
Field stringField(std::string name, std::string const& value) {
  Field f{std::move(name), PluginFieldType::kCHAR, std::vector<unsigned char>(value.begin(), value.end()), 0};
  f.bytes.push_back('\0');
  f.length = static_cast<int32_t>(f.bytes.size());
  return f;
}

struct Collection {
  explicit Collection(std::vector<Field> fields) : owned(std::move(fields)) {
    for (Field const& f : owned) list.emplace_back(f.name.c_str(), f.bytes.data(), f.type, f.length);
    fc.nbFields = static_cast<int32_t>(list.size());
    fc.fields = list.data();
  }
  std::vector<Field> owned;
  std::vector<nvinfer1::PluginField> list;
  nvinfer1::PluginFieldCollection fc{};
};

using Shapes = std::vector<std::vector<int64_t>>;

struct Scenario {
  char const* op;
  std::vector<Field> fields;
  Shapes shapes;                 // a valid problem
  std::vector<bool> intInputs;   // inputs that are int32 tables
  std::vector<int64_t> output;   // its output shape
  std::string params;            // the kernel params it must produce
  Shapes badShapes;              // a problem onShapeChange must refuse ...
  std::string badMessage;        // ... logging this
  std::vector<Field> badFields;  // fields createPlugin must refuse
};

nvinfer1::Dims dims(std::vector<int64_t> const& shape) {
  nvinfer1::Dims d{};
  d.nbDims = static_cast<int32_t>(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) d.d[i] = shape[i];
  return d;
}

std::vector<nvinfer1::PluginTensorDesc> descs(Shapes const& shapes, std::vector<bool> const& intInputs, DataType type,
                                              std::vector<int64_t> const& output) {
  std::vector<nvinfer1::PluginTensorDesc> out;
  for (size_t i = 0; i < shapes.size(); ++i) {
    nvinfer1::PluginTensorDesc d{};
    d.dims = dims(shapes[i]);
    d.type = i < intInputs.size() && intInputs[i] ? DataType::kINT32 : type;
    d.format = TensorFormat::kLINEAR;
    d.scale = 1.0f;
    out.push_back(d);
  }
  nvinfer1::PluginTensorDesc o{};
  o.dims = dims(output);
  o.type = type;
  o.format = TensorFormat::kLINEAR;
  out.push_back(o);
  return out;
}

std::vector<nvinfer1::DynamicPluginTensorDesc> dynamicDescs(std::vector<nvinfer1::PluginTensorDesc> const& in) {
  std::vector<nvinfer1::DynamicPluginTensorDesc> out;
  for (auto const& d : in) {
    nvinfer1::DynamicPluginTensorDesc dd{};
    dd.desc = d;
    for (int32_t k = 0; k < d.dims.nbDims; ++k) dd.desc.dims.d[k] = -1;  // build time: dynamic
    dd.min = d.dims;
    dd.opt = d.dims;
    dd.max = d.dims;
    out.push_back(dd);
  }
  return out;
}

// Every format combination TensorRT could ask about, walked position by position as the builder does (a position
// is only asked once the earlier ones hold supported values). Returns the accepted complete combinations.
std::vector<std::string> formatCombinations(nvinfer1::IPluginV3OneBuild* build, Shapes const& shapes) {
  int32_t const nbInputs = static_cast<int32_t>(shapes.size());
  int32_t const total = nbInputs + 1;
  DataType const types[] = {DataType::kFLOAT, DataType::kHALF, DataType::kBF16, DataType::kINT32, DataType::kINT8};
  TensorFormat const formats[] = {TensorFormat::kLINEAR, TensorFormat::kCHW32};
  std::vector<nvinfer1::DynamicPluginTensorDesc> inOut(total);
  for (int32_t i = 0; i < total; ++i) inOut[i].desc.dims = dims(i < nbInputs ? shapes[i] : shapes[0]);
  std::vector<std::string> accepted;
  std::vector<std::string> names(total);
  auto walk = [&](auto&& self, int32_t pos) -> void {
    if (pos == total) {
      std::string combo;
      for (auto const& n : names) combo += (combo.empty() ? "" : ",") + n;
      accepted.push_back(combo);
      return;
    }
    for (DataType t : types) {
      for (TensorFormat f : formats) {
        inOut[pos].desc.type = t;
        inOut[pos].desc.format = f;
        if (!build->supportsFormatCombination(pos, inOut.data(), nbInputs, 1)) continue;
        char const* name = t == DataType::kFLOAT ? "fp32" : t == DataType::kHALF ? "fp16" : t == DataType::kBF16 ? "bf16"
                           : t == DataType::kINT32 ? "int32" : "int8";
        names[pos] = std::string(name) + (f == TensorFormat::kLINEAR ? "" : "/chw32");
        self(self, pos + 1);
      }
    }
  };
  walk(walk, 0);
  return accepted;
}

struct Plugin {
  nvinfer1::IPluginV3* v3;
  nvinfer1::IPluginV3OneCore* core;
  nvinfer1::IPluginV3OneBuild* build;
  nvinfer1::IPluginV3OneRuntime* runtime;
};

Plugin interfaces(nvinfer1::IPluginV3* p) {
  auto* core = static_cast<nvinfer1::IPluginV3OneCore*>(p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE));
  auto* build = static_cast<nvinfer1::IPluginV3OneBuild*>(p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD));
  auto* runtime =
      static_cast<nvinfer1::IPluginV3OneRuntime*>(p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
  return {p, core, build, runtime};
}

std::string serializedText(nvinfer1::PluginFieldCollection const* fc) {
  if (fc == nullptr) return "<null>";
  std::string text;
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    nvinfer1::PluginField const& f = fc->fields[i];
    text += std::string(f.name) + ":" + std::to_string(static_cast<int32_t>(f.type)) + ":" + std::to_string(f.length) + "=";
    size_t const size = f.type == PluginFieldType::kCHAR ? 1 : 4;
    auto const* bytes = static_cast<unsigned char const*>(f.data);
    for (size_t b = 0; b < size * static_cast<size_t>(f.length); ++b) text += std::to_string(bytes[b]) + ".";
    text += ";";
  }
  return text;
}

void describeCreator(nvinfer1::IPluginCreatorV3One* creator) {
  std::printf("creator %s %s %s\n", creator->getPluginName(), creator->getPluginVersion(), creator->getPluginNamespace());
  nvinfer1::PluginFieldCollection const* fc = creator->getFieldNames();
  for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
    nvinfer1::PluginField const& f = fc->fields[i];
    std::string value;
    if (f.type == PluginFieldType::kINT32 && f.data) value = std::to_string(*static_cast<int32_t const*>(f.data));
    if (f.type == PluginFieldType::kFLOAT32 && f.data) {
      char buffer[64];
      std::snprintf(buffer, sizeof(buffer), "%.9g", static_cast<double>(*static_cast<float const*>(f.data)));
      value = buffer;
    }
    if (f.type == PluginFieldType::kCHAR && f.data) value = static_cast<char const*>(f.data);
    char const* type = f.type == PluginFieldType::kINT32 ? "int" : f.type == PluginFieldType::kFLOAT32 ? "float"
                       : f.type == PluginFieldType::kCHAR ? "string" : "?";
    std::printf("field %s %s %s %d %s\n", creator->getPluginName(), f.name, type, f.length, value.c_str());
  }
}

void runScenario(nvinfer1::IPluginCreatorV3One* creator, Scenario const& s, Logger& logger) {
  std::string const op = s.op;
  Collection fields(s.fields);
  nvinfer1::IPluginV3* created = creator->createPlugin("layer_7", &fields.fc, nvinfer1::TensorRTPhase::kBUILD);
  check(created != nullptr, op + ": createPlugin(kBUILD) with the node's fields");
  if (!created) return;
  Plugin p = interfaces(created);
  check(std::strcmp(created->getInterfaceInfo().kind, "PLUGIN") == 0, op + ": IPluginV3 interface kind");
  check(p.core && std::strcmp(p.core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0, op + ": core capability");
  check(p.build && std::strcmp(p.build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0, op + ": build capability");
  check(p.runtime && std::strcmp(p.runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0,
        op + ": runtime capability");
  check(std::strcmp(p.core->getPluginName(), creator->getPluginName()) == 0 &&
            std::strcmp(p.core->getPluginVersion(), creator->getPluginVersion()) == 0 &&
            std::strcmp(p.core->getPluginNamespace(), creator->getPluginNamespace()) == 0,
        op + ": plugin name, version and namespace match the creator");
  check(p.build->getNbOutputs() == 1, op + ": one output");

  int32_t const nbInputs = static_cast<int32_t>(s.shapes.size());
  // output types follow input 0
  std::vector<DataType> inTypes(nbInputs, DataType::kHALF);
  for (int32_t i = 0; i < nbInputs; ++i) {
    if (s.intInputs[i]) inTypes[i] = DataType::kINT32;
  }
  DataType outType = DataType::kFLOAT;
  check(p.build->getOutputDataTypes(&outType, 1, inTypes.data(), nbInputs) == 0 && outType == DataType::kHALF,
        op + ": fp16 inputs give an fp16 output");
  inTypes[0] = DataType::kINT8;
  size_t before = logger.errors.size();
  check(p.build->getOutputDataTypes(&outType, 1, inTypes.data(), nbInputs) != 0 && logger.errors.size() > before,
        op + ": an int8 input 0 is refused with a logged reason");

  // output shapes: symbolic dims must be passed through by the contract's rule, with no arithmetic
  {
    FakeBuilder builder;
    std::vector<nvinfer1::DimsExprs> in(nbInputs);
    std::vector<std::vector<std::string>> names(nbInputs);
    for (int32_t i = 0; i < nbInputs; ++i) {
      in[i].nbDims = static_cast<int32_t>(s.shapes[i].size());
      for (int32_t d = 0; d < in[i].nbDims; ++d) in[i].d[d] = builder.impl.make(false, 0);
    }
    nvinfer1::DimsExprs out{};
    int32_t const status = p.build->getOutputShapes(in.data(), nbInputs, nullptr, 0, &out, 1, builder);
    std::string rule;
    for (int32_t k = 0; status == 0 && k < out.nbDims; ++k) {
      std::string where = "?";
      for (int32_t i = 0; i < nbInputs; ++i) {
        for (int32_t d = 0; d < in[i].nbDims; ++d) {
          if (in[i].d[d] == out.d[k]) where = "in" + std::to_string(i) + ".d" + std::to_string(d);
        }
      }
      if (where == "?" && out.d[k]->isConstant()) where = std::to_string(out.d[k]->getConstantValue());
      rule += " " + where;
    }
    std::printf("rule %s%s\n", s.op, rule.c_str());
    check(status == 0 && builder.impl.operations == 0, op + ": symbolic output shape by copying input dimensions");
  }
  {
    FakeBuilder builder;
    std::vector<nvinfer1::DimsExprs> in(nbInputs);
    for (int32_t i = 0; i < nbInputs; ++i) {
      in[i].nbDims = static_cast<int32_t>(s.shapes[i].size());
      for (int32_t d = 0; d < in[i].nbDims; ++d) in[i].d[d] = builder.impl.make(true, s.shapes[i][d]);
    }
    nvinfer1::DimsExprs out{};
    bool same = p.build->getOutputShapes(in.data(), nbInputs, nullptr, 0, &out, 1, builder) == 0 &&
                out.nbDims == static_cast<int32_t>(s.output.size());
    for (int32_t k = 0; same && k < out.nbDims; ++k) same = out.d[k]->getConstantValue() == s.output[k];
    check(same, op + ": constant output shape");
    for (int32_t i = 0; i < nbInputs; ++i) {
      for (int32_t d = 0; d < in[i].nbDims; ++d) in[i].d[d] = builder.impl.make(true, s.badShapes[i][d]);
    }
    before = logger.errors.size();
    check(p.build->getOutputShapes(in.data(), nbInputs, nullptr, 0, &out, 1, builder) != 0 &&
              logger.loggedSince(before, s.badMessage),
          op + ": known bad shapes refused at parse time: " + s.badMessage);
  }

  // formats
  std::vector<std::string> combos = formatCombinations(p.build, s.shapes);
  std::string expected[3];
  char const* floats[] = {"fp32", "fp16", "bf16"};
  for (int t = 0; t < 3; ++t) {
    for (int32_t i = 0; i <= nbInputs; ++i) {
      expected[t] += (i ? "," : "") + std::string(i < nbInputs && s.intInputs[i] ? "int32" : floats[t]);
    }
  }
  check(combos.size() == 3 && combos[0] == expected[0] && combos[1] == expected[1] && combos[2] == expected[2],
        op + ": formats are linear fp32/fp16/bf16 shared by every floating tensor, int32 tables (" +
            std::to_string(combos.size()) + " combinations)");

  // build-time configuration and workspace
  std::vector<nvinfer1::PluginTensorDesc> desc = descs(s.shapes, s.intInputs, DataType::kHALF, s.output);
  std::vector<nvinfer1::DynamicPluginTensorDesc> dyn = dynamicDescs(desc);
  check(p.build->configurePlugin(dyn.data(), nbInputs, dyn.data() + nbInputs, 1) == 0, op + ": configurePlugin");
  size_t const workspace = p.build->getWorkspaceSize(dyn.data(), nbInputs, dyn.data() + nbInputs, 1);
  check(workspace == static_cast<size_t>(1000 * s.shapes[0][0] + s.shapes[0][1]) ||
            workspace == static_cast<size_t>(1000 * s.shapes[0][0] + s.shapes[1][1]),
        op + ": workspace from the profile's max shapes (" + std::to_string(workspace) + " bytes)");
  check(p.build->getTimingCacheID() != nullptr && std::strlen(p.build->getTimingCacheID()) > 0,
        op + std::string(": timing cache ID ") + (p.build->getTimingCacheID() ? p.build->getTimingCacheID() : ""));

  // runtime: shapes, then a launch with recognisable pointers
  check(p.runtime->onShapeChange(desc.data(), nbInputs, desc.data() + nbInputs, 1) == 0, op + ": onShapeChange");
  std::vector<void const*> inputs;
  for (int32_t i = 0; i < nbInputs; ++i) inputs.push_back(reinterpret_cast<void const*>(0x1000 * (i + 1)));
  void* outputs[] = {reinterpret_cast<void*>(0x9000)};
  void* workspacePtr = reinterpret_cast<void*>(0x7000);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(0x42);
  gLaunches.clear();
  int32_t const status = p.runtime->enqueue(desc.data(), desc.data() + nbInputs, inputs.data(), outputs, workspacePtr,
                                            stream);
  bool launched = status == 0 && gLaunches.size() == 1;
  check(launched && gLaunches[0].op == op, op + ": enqueue launches the op's kernel once");
  if (launched) {
    Launch const& l = gLaunches[0];
    check(l.params == s.params, op + ": kernel params" + l.params + (l.params == s.params ? "" : " != " + s.params));
    bool pointers = l.pointers.size() >= static_cast<size_t>(nbInputs) + 1 && l.pointers.back() == outputs[0];
    for (int32_t i = 0; pointers && i < nbInputs; ++i) pointers = l.pointers[i] == inputs[i];
    for (size_t i = nbInputs; pointers && i + 1 < l.pointers.size(); ++i) pointers = l.pointers[i] == nullptr;
    check(pointers, op + ": input and output pointers in contract order, absent optional inputs null");
    check(l.dtype == attn_export::DataType::kFloat16 && l.workspace == workspacePtr && l.stream == stream,
          op + ": dtype, workspace and stream passed through");
  }
  gLaunchResult = cudaErrorInvalidValue;
  before = logger.errors.size();
  check(p.runtime->enqueue(desc.data(), desc.data() + nbInputs, inputs.data(), outputs, workspacePtr, stream) != 0 &&
            logger.loggedSince(before, "kernel launch failed"),
        op + ": a failing launch is reported");
  gLaunchResult = cudaSuccess;

  std::vector<nvinfer1::PluginTensorDesc> bad = descs(s.badShapes, s.intInputs, DataType::kHALF, s.output);
  before = logger.errors.size();
  check(p.runtime->onShapeChange(bad.data(), nbInputs, bad.data() + nbInputs, 1) != 0 &&
            logger.loggedSince(before, s.badMessage) && logger.loggedSince(before, "layer_7"),
        op + ": onShapeChange refuses bad shapes naming the layer");

  // an empty batch launches nothing
  Shapes empty = s.shapes;
  std::vector<int64_t> emptyOut = s.output;
  empty[0][0] = 0;
  emptyOut[0] = 0;
  for (int32_t i = 1; i < nbInputs; ++i) {
    if (s.shapes[i].size() == 3 && s.shapes[i][0] == s.shapes[0][0] && !s.intInputs[i]) empty[i][0] = 0;
  }
  std::vector<nvinfer1::PluginTensorDesc> emptyDesc = descs(empty, s.intInputs, DataType::kHALF, emptyOut);
  gLaunches.clear();
  bool emptyOk = p.runtime->onShapeChange(emptyDesc.data(), nbInputs, emptyDesc.data() + nbInputs, 1) == 0;
  emptyOk = emptyOk && p.runtime->enqueue(emptyDesc.data(), emptyDesc.data() + nbInputs, inputs.data(), outputs,
                                          workspacePtr, stream) == 0;
  check(emptyOk && gLaunches.empty(), op + ": an empty batch enqueues nothing");

  // serialization -> a runtime-phase plugin with the same fields
  std::string const serialized = serializedText(p.runtime->getFieldsToSerialize());
  nvinfer1::IPluginV3* runtimePlugin =
      creator->createPlugin("layer_7", p.runtime->getFieldsToSerialize(), nvinfer1::TensorRTPhase::kRUNTIME);
  check(runtimePlugin != nullptr, op + ": createPlugin(kRUNTIME) from getFieldsToSerialize");
  if (runtimePlugin) {
    Plugin r = interfaces(runtimePlugin);
    check(serializedText(r.runtime->getFieldsToSerialize()) == serialized &&
              std::strcmp(r.build->getTimingCacheID(), p.build->getTimingCacheID()) == 0,
          op + ": deserialized plugin holds the same fields");
    delete runtimePlugin;
  }
  nvinfer1::PluginFieldCollection const* fc = p.runtime->getFieldsToSerialize();
  bool types = fc && fc->nbFields == static_cast<int32_t>(creator->getFieldNames()->nbFields);
  for (int32_t i = 0; types && i < fc->nbFields; ++i) {
    PluginFieldType const t = fc->fields[i].type;
    types = t == PluginFieldType::kINT32 || t == PluginFieldType::kFLOAT32 || t == PluginFieldType::kCHAR;
  }
  check(types, op + ": every field serialized as int32, float32 or char, as the ONNX parser would pass it");

  // clones must own their state: delete the original, then use the clones
  nvinfer1::IPluginV3* clone = created->clone();
  nvinfer1::IPluginV3* attached = p.runtime->attachToContext(nullptr);
  delete created;
  check(clone && attached && clone != attached, op + ": clone and attachToContext give new objects");
  if (clone && attached) {
    Plugin c = interfaces(clone);
    Plugin a = interfaces(attached);
    check(serializedText(c.runtime->getFieldsToSerialize()) == serialized &&
              serializedText(a.runtime->getFieldsToSerialize()) == serialized,
          op + ": clones keep the fields after the original is deleted");
    check(a.runtime->onShapeChange(desc.data(), nbInputs, desc.data() + nbInputs, 1) == 0 &&
              a.runtime->enqueue(desc.data(), desc.data() + nbInputs, inputs.data(), outputs, workspacePtr, stream) == 0,
          op + ": an attached clone runs");
  }
  delete clone;
  delete attached;

  // refusals at creation
  for (Field const& badField : s.badFields) {
    Collection badFc({badField});
    before = logger.errors.size();
    nvinfer1::IPluginV3* refused = creator->createPlugin("layer_8", &badFc.fc, nvinfer1::TensorRTPhase::kBUILD);
    check(refused == nullptr && logger.loggedSince(before, badField.name),
          op + ": createPlugin refuses field '" + badField.name + "' with a logged reason");
    delete refused;
  }
  nvinfer1::PluginFieldCollection none{};
  nvinfer1::IPluginV3* defaults = creator->createPlugin("layer_9", &none, nvinfer1::TensorRTPhase::kBUILD);
  check(defaults != nullptr, op + ": createPlugin with no fields uses the defaults");
  delete defaults;
}

}  // namespace

int main() {
  LoggerFinder finder;
  setLoggerFinder(&finder);
  int32_t nb = 0;
  nvinfer1::IPluginCreatorInterface* const* creators = getCreators(nb);
  check(creators != nullptr && nb == 6, "getCreators lists six creators");
  std::vector<nvinfer1::IPluginCreatorV3One*> v3;
  for (int32_t i = 0; i < nb; ++i) {
    nvinfer1::InterfaceInfo const info = creators[i]->getInterfaceInfo();
    check(std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0 && info.major == 1,
          std::string("creator ") + std::to_string(i) + " is an IPluginCreatorV3One");
    v3.push_back(static_cast<nvinfer1::IPluginCreatorV3One*>(creators[i]));
    describeCreator(v3.back());
  }
  int32_t again = 0;
  check(getCreators(again) == creators && again == nb, "getCreators returns the same creators every time");

  std::vector<Scenario> scenarios = {
      {"BlockSparseAttention",
       {intField("num_heads", 4), intField("block_size", 16), floatField("scale", 0.125f), intField("global_blocks", 1)},
       {{2, 64, 128}, {2, 64, 128}, {2, 64, 128}, {4, 4, 3}},
       {false, false, false, true},
       {2, 64, 128},
       " batch=2 seq_len=64 head_dim=32 index_heads=4 blocks_per_row=3 num_heads=4 block_size=16 scale=0.125 "
       "global_blocks=1",
       {{2, 60, 128}, {2, 60, 128}, {2, 60, 128}, {4, 4, 3}},
       "not a multiple of block_size",
       {numeric("num_heads", PluginFieldType::kFLOAT32, 4.0f), intField("block_size", 0), intField("no_such_field", 1)}},
      {"DenseAttention",
       {intField("num_heads", 2), floatField("scale", 0.5f), intField("causal", 1),
        stringField("score_fn", "relu_squared")},
       {{3, 5, 16}, {3, 7, 16}, {3, 7, 24}, {1, 2, 5, 7}},
       {false, false, false, false},
       {3, 5, 24},
       " batch=3 q_len=5 kv_len=7 head_dim=8 v_head_dim=12 bias_batch=1 bias_heads=2 num_heads=2 scale=0.5 causal=1"
       " score_fn=1 logits_input=0",
       {{3, 5, 16}, {3, 7, 16}, {3, 7, 24}, {1, 2, 5, 6}},
       "input 'bias'",
       {intField("causal", 2), numeric("scale", PluginFieldType::kINT32, int32_t{1}), stringField("score_fn", "relu"),
        intField("logits_input", 2)}},
      // the logits as the bias: the query gives only batch and rows, the key is not read
      {"DenseAttention",
       {intField("num_heads", 2), intField("logits_input", 1)},
       {{3, 5, 6}, {3, 7, 16}, {3, 7, 24}, {1, 2, 5, 7}},
       {false, false, false, false},
       {3, 5, 24},
       " batch=3 q_len=5 kv_len=7 head_dim=0 v_head_dim=12 bias_batch=1 bias_heads=2 num_heads=2 scale=0 causal=0"
       " score_fn=0 logits_input=1",
       {{3, 5, 6}, {3, 7, 16}, {3, 7, 24}, {1, 2, 5, 6}},
       "(the logits)",
       {intField("logits_input", -1)}},
      {"KernelizedAttention",
       {intField("num_heads", 2), stringField("feature_map", "favor_positive"), intField("causal", 1),
        intField("normalize", 1), floatField("scale", 0.25f), floatField("eps", 0.001f)},
       {{2, 9, 16}, {2, 9, 16}, {2, 9, 32}, {6, 8}},
       {false, false, false, false},
       {2, 9, 32},
       " batch=2 seq_len=9 head_dim=8 v_head_dim=16 num_features=6 num_heads=2 feature_map=0 causal=1 normalize=1 "
       "scale=0.25 eps=0.001 stabilizer=0",
       {{2, 9, 16}, {2, 9, 16}, {2, 9, 32}, {6, 4}},
       "input 'projection'",
       {stringField("feature_map", "softmax"), numeric("eps", PluginFieldType::kCHAR, 'x')}},
      {"DisentangledAttention",
       {intField("num_heads", 2), intField("span", 4), intField("max_position", 16), floatField("scale", 0.0f)},
       {{1, 10, 12}, {1, 10, 12}, {1, 10, 12}, {8, 12}, {8, 12}},
       {false, false, false, false, false},
       {1, 10, 12},
       " batch=1 seq_len=10 head_dim=6 num_heads=2 span=4 max_position=16 scale=0",
       {{1, 10, 12}, {1, 10, 12}, {1, 10, 12}, {6, 12}, {8, 12}},
       "input 'rel_key'",
       {intField("span", 0), intField("max_position", -1)}},
      {"MixtureOfExperts",
       {intField("capacity", 0), floatField("capacity_factor", 1.5f), stringField("activation", "gelu")},
       {{2, 6, 8}, {8, 4}, {4, 8, 16}, {4, 16, 8}},
       {false, false, false, false},
       {2, 6, 8},
       " batch=2 tokens=6 model_dim=8 ffn_dim=16 num_experts=4 capacity=0 capacity_factor=1.5 activation=1",
       {{2, 6, 8}, {8, 4}, {4, 8, 16}, {4, 8, 8}},
       "input 'expert_out'",
       {stringField("activation", "swish"), intField("capacity", -1)}},
      {"LongConvolution",
       {intField("channels", 5)},
       {{2, 7, 5}, {5, 9}, {5}, {5, 9}},
       {false, false, false, false},
       {2, 7, 5},
       " batch=2 seq_len=7 kernel_len=9 channels=5",
       {{2, 7, 5}, {5, 6}, {5}, {5, 9}},
       "input 'kernel'",
       {intField("channels", -3)}},
  };

  for (Scenario const& s : scenarios) {
    nvinfer1::IPluginCreatorV3One* creator = nullptr;
    for (auto* c : v3) {
      if (std::strcmp(c->getPluginName(), s.op) == 0) creator = c;
    }
    check(creator != nullptr, std::string("creator for ") + s.op);
    if (creator) runScenario(creator, s, finder.logger);
  }

  // optional inputs: DenseAttention without its bias, which logits_input=1 needs
  for (auto* c : v3) {
    if (std::strcmp(c->getPluginName(), "DenseAttention") != 0) continue;
    nvinfer1::PluginFieldCollection none{};
    nvinfer1::IPluginV3* plugin = c->createPlugin("no_bias", &none, nvinfer1::TensorRTPhase::kBUILD);
    Plugin p = interfaces(plugin);
    std::vector<nvinfer1::PluginTensorDesc> desc = descs({{1, 4, 8}, {1, 6, 8}, {1, 6, 8}}, {false, false, false},
                                                         DataType::kFLOAT, {1, 4, 8});
    gLaunches.clear();
    void const* inputs[] = {reinterpret_cast<void const*>(0x1000), reinterpret_cast<void const*>(0x2000),
                            reinterpret_cast<void const*>(0x3000)};
    void* outputs[] = {reinterpret_cast<void*>(0x9000)};
    bool ok = p.runtime->onShapeChange(desc.data(), 3, desc.data() + 3, 1) == 0 &&
              p.runtime->enqueue(desc.data(), desc.data() + 3, inputs, outputs, nullptr, nullptr) == 0 &&
              gLaunches.size() == 1 && gLaunches[0].pointers[3] == nullptr &&
              gLaunches[0].dtype == attn_export::DataType::kFloat32;
    check(ok, "DenseAttention: three inputs (no bias) run with a null bias");
    size_t const before = finder.logger.errors.size();
    check(p.runtime->onShapeChange(desc.data(), 2, desc.data() + 2, 1) != 0 &&
              finder.logger.loggedSince(before, "takes 3 to 4 inputs"),
          "DenseAttention: two inputs are refused");
    delete plugin;

    Collection logits({intField("logits_input", 1)});
    plugin = c->createPlugin("no_logits", &logits.fc, nvinfer1::TensorRTPhase::kBUILD);
    p = interfaces(plugin);
    size_t const beforeLogits = finder.logger.errors.size();
    check(p.runtime->onShapeChange(desc.data(), 3, desc.data() + 3, 1) != 0 &&
              finder.logger.loggedSince(beforeLogits, "needs the logits as the bias input"),
          "DenseAttention: logits_input=1 without the bias input is refused");
    delete plugin;
  }

  std::printf("%d failure(s)\n", gFailures);
  return gFailures;
}
