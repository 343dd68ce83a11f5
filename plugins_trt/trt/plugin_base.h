// One IPluginV3 (core + build + runtime) and one IPluginCreatorV3One for every op, as templates over the op
// types of ops.h. Written against the TensorRT 10.3 headers (JetPack 6) and unchanged for newer releases: only
// interfaces whose signatures have not changed since 10.0 are used (no getAliasedInput, no NvInferPluginBase.h).
//
// What every plugin does the same way:
//   - fields: created from a PluginFieldCollection (the ONNX node's attributes at build time, exactly what
//     getFieldsToSerialize returned at runtime), every contract field serialized (fields.h);
//   - output shape: copied from input dimensions by the contract's rule, through IExprBuilder;
//   - formats: linear only; the floating tensors share one type (fp32, fp16 or bf16), integer tables are int32;
//     the output takes the first input's type (TensorRT 11 is strongly typed and asks only getOutputDataTypes);
//   - scratch memory: getWorkspaceSize from the profile's max shapes; enqueue never allocates;
//   - shapes are checked and the kernel params computed in onShapeChange; enqueue binds pointers and launches.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "fields.h"
#include "ops.h"

namespace attn_export {
namespace trt_plugins {

// ------------------------------------------------------------------------------------------ shared helpers
// (plugin_base.cpp)

// Messages go to the logger TensorRT passes to setLoggerFinder, or to stderr before that.
void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept;
void logError(OpSpec const& spec, std::string const& layer, std::string const& message) noexcept;

RawType toRawType(nvinfer1::PluginFieldType type) noexcept;
nvinfer1::PluginFieldType toPluginFieldType(RawType type) noexcept;

// Every field of `fc` into `values` (null fc: all defaults).
Status parseFields(nvinfer1::PluginFieldCollection const* fc, FieldValues& values);

// `fields` as TensorRT PluginFields pointing into `values`.
void toPluginFields(FieldValues const& values, std::vector<nvinfer1::PluginField>& fields);

TensorShape toShape(nvinfer1::Dims const& dims) noexcept;

ElementType toElementType(nvinfer1::DataType type) noexcept;

// fp32, fp16, bf16 -> the kernels' DataType; false for anything else.
bool toKernelType(nvinfer1::DataType type, DataType& out) noexcept;

inline constexpr int32_t kMaxInputs = 8;

// ------------------------------------------------------------------------------------------ the plugin
template <typename Op>
class AttnPlugin final : public nvinfer1::IPluginV3,
                         public nvinfer1::IPluginV3OneCore,
                         public nvinfer1::IPluginV3OneBuild,
                         public nvinfer1::IPluginV3OneRuntime {
 public:
  AttnPlugin(std::string layer, FieldValues fields)
      : layer_(std::move(layer)), fields_(std::move(fields)), description_(fields_.describe()) {}
  AttnPlugin(AttnPlugin const&) = default;  // the serialized view is rebuilt on demand, never shared
  ~AttnPlugin() override = default;

  // IPluginV3 ----------------------------------------------------------------------------------------------
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override {
    switch (type) {
      case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
      case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
      case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }

  nvinfer1::IPluginV3* clone() noexcept override {
    try {
      return new AttnPlugin(*this);
    } catch (std::exception const& e) {
      logError(Op::spec(), layer_, std::string("cannot clone the plugin: ") + e.what());
      return nullptr;
    }
  }

  // IPluginV3OneCore ---------------------------------------------------------------------------------------
  char const* getPluginName() const noexcept override { return Op::spec().name; }
  char const* getPluginVersion() const noexcept override { return Op::spec().version; }
  char const* getPluginNamespace() const noexcept override { return Op::spec().plugin_namespace; }

  // IPluginV3OneBuild --------------------------------------------------------------------------------------
  int32_t getNbOutputs() const noexcept override { return 1; }

  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override {
    DataType kernelType;
    if (nbOutputs != 1 || nbInputs < 1 || !toKernelType(inputTypes[0], kernelType)) {
      logError(Op::spec(), layer_, std::string("input '") + Op::spec().inputs[0].name +
                                       "' must be float32, float16 or bfloat16");
      return -1;
    }
    outputTypes[0] = inputTypes[0];
    return 0;
  }

  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* /*shapeInputs*/,
                          int32_t /*nbShapeInputs*/, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override {
    try {
      OpSpec const& spec = Op::spec();
      if (nbOutputs != 1 || nbInputs > kMaxInputs) {
        logError(spec, layer_, "expected one output and at most " + std::to_string(spec.nb_inputs) + " inputs");
        return -1;
      }
      // Known dimensions are checked now, so a bad graph fails at parse time rather than at the first run;
      // unknown ones stand in as 0 for the rank check.
      TensorShape shapes[kMaxInputs];
      bool allKnown = true;
      for (int32_t i = 0; i < nbInputs; ++i) {
        shapes[i].rank = inputs[i].nbDims;
        for (int32_t d = 0; d < inputs[i].nbDims && d < kMaxRank; ++d) {
          bool const known = inputs[i].d[d]->isConstant();
          allKnown = allKnown && known;
          shapes[i].d[d] = known ? inputs[i].d[d]->getConstantValue() : 0;
        }
      }
      Status status = checkInputs(spec, shapes, nbInputs);
      typename Op::Params params{};
      if (status.ok() && allKnown) status = Op::makeParams(fields_, shapes, nbInputs, params);
      if (!status.ok()) {
        logError(spec, layer_, status.message());
        return -1;
      }
      outputs[0].nbDims = spec.output_rank;
      outputDims(
          spec, [&](int32_t input, int32_t dim) { return inputs[input].d[dim]; },
          [&](int64_t value) { return exprBuilder.constant(value); }, outputs[0].d);
      return 0;
    } catch (std::exception const& e) {
      logError(Op::spec(), layer_, e.what());
      return -1;
    }
  }

  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    if (nbOutputs != 1 || pos < 0 || pos >= nbInputs + nbOutputs || nbInputs > kMaxInputs) return false;
    if (inOut[pos].desc.format != nvinfer1::TensorFormat::kLINEAR) return false;
    // the rule itself is TensorRT-free (fields.h), so `attn-export plugins check` runs the same one
    ElementType types[kMaxInputs + 1] = {};
    for (int32_t i = 0; i <= pos; ++i) types[i] = toElementType(inOut[i].desc.type);
    return acceptsType(Op::spec(), pos, nbInputs, types);
  }

  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* /*in*/, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept override {
    // Shapes may hold -1 here and the profile's min/max need not be valid lengths themselves (a block-sparse
    // profile from 1 to 4096 tokens is fine), so the real checks wait for onShapeChange.
    OpSpec const& spec = Op::spec();
    if (nbOutputs != 1 || nbInputs < spec.nb_required_inputs || nbInputs > spec.nb_inputs) {
      logError(spec, layer_, "unexpected number of inputs or outputs");
      return -1;
    }
    return 0;
  }

  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* /*outputs*/,
                          int32_t /*nbOutputs*/) const noexcept override {
    try {
      // Enough for the profile's max shapes, hence for any smaller problem.
      if (nbInputs > kMaxInputs) return 0;
      TensorShape shapes[kMaxInputs];
      for (int32_t i = 0; i < nbInputs; ++i) shapes[i] = toShape(inputs[i].max);
      if (!checkInputs(Op::spec(), shapes, nbInputs).ok()) return 0;
      // A failed shape check past checkInputs still fills every shape field of params: the max shapes need not
      // be a valid problem themselves (say, not a multiple of block_size) for the shapes that run to be.
      typename Op::Params params{};
      Op::makeParams(fields_, shapes, nbInputs, params);
      return Op::workspaceSize(params);
    } catch (std::exception const&) {
      return 0;
    }
  }

  char const* getTimingCacheID() noexcept override { return description_.c_str(); }
  char const* getMetadataString() noexcept override { return description_.c_str(); }

  // IPluginV3OneRuntime ------------------------------------------------------------------------------------
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override {
    try {
      OpSpec const& spec = Op::spec();
      if (nbOutputs != 1 || nbInputs > kMaxInputs) {
        logError(spec, layer_, "unexpected number of inputs or outputs");
        return -1;
      }
      TensorShape shapes[kMaxInputs];
      for (int32_t i = 0; i < nbInputs; ++i) shapes[i] = toShape(in[i].dims);
      typename Op::Params params{};
      Status const status = Op::makeParams(fields_, shapes, nbInputs, params);
      if (!status.ok()) {
        logError(spec, layer_, status.message());
        return -1;
      }
      if (!toKernelType(in[0].type, dtype_)) {
        logError(spec, layer_, "unsupported input type");
        return -1;
      }
      int64_t outputVolume = 1;
      for (int32_t d = 0; d < out[0].dims.nbDims; ++d) outputVolume *= out[0].dims.d[d];
      params_ = params;
      nbInputs_ = nbInputs;
      empty_ = outputVolume == 0;
      return 0;
    } catch (std::exception const& e) {
      logError(Op::spec(), layer_, e.what());
      return -1;
    }
  }

  int32_t enqueue(nvinfer1::PluginTensorDesc const* /*inputDesc*/, nvinfer1::PluginTensorDesc const* /*outputDesc*/,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override {
    if (nbInputs_ == 0) {
      logError(Op::spec(), layer_, "enqueue before onShapeChange");
      return -1;
    }
    if (empty_) return 0;  // nothing to compute for an empty batch or sequence
    typename Op::Params params = params_;
    Op::bind(params, inputs, nbInputs_, outputs[0]);
    cudaError_t const error = Op::launch(params, dtype_, workspace, stream);
    if (error != cudaSuccess) {
      logError(Op::spec(), layer_, std::string("kernel launch failed: ") + cudaGetErrorName(error) + " (" +
                                       cudaGetErrorString(error) + ")");
      return -1;
    }
    return 0;
  }

  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept override {
    return clone();  // no per-context resources: the kernels use only the workspace TensorRT provides
  }

  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override {
    try {
      toPluginFields(fields_, serialized_);
      collection_.nbFields = static_cast<int32_t>(serialized_.size());
      collection_.fields = serialized_.data();
      return &collection_;
    } catch (std::exception const& e) {
      logError(Op::spec(), layer_, e.what());
      return nullptr;
    }
  }

 private:
  std::string layer_;  // the node name TensorRT created the plugin for (may be empty)
  FieldValues fields_;
  std::string description_;  // "name=value,..." for the timing cache and layer information

  // set by onShapeChange
  typename Op::Params params_{};
  DataType dtype_ = DataType::kFloat32;
  int32_t nbInputs_ = 0;
  bool empty_ = false;

  // getFieldsToSerialize's answer; points into fields_
  std::vector<nvinfer1::PluginField> serialized_;
  nvinfer1::PluginFieldCollection collection_{};
};

// ------------------------------------------------------------------------------------------ the creator
template <typename Op>
class AttnPluginCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  AttnPluginCreator() : defaults_(Op::spec()) {
    // Member storage (not static), as TensorRT may read the field list for as long as the creator is registered.
    toPluginFields(defaults_, fieldList_);
    collection_.nbFields = static_cast<int32_t>(fieldList_.size());
    collection_.fields = fieldList_.data();
  }
  AttnPluginCreator(AttnPluginCreator const&) = delete;
  AttnPluginCreator& operator=(AttnPluginCreator const&) = delete;

  char const* getPluginName() const noexcept override { return Op::spec().name; }
  char const* getPluginVersion() const noexcept override { return Op::spec().version; }
  char const* getPluginNamespace() const noexcept override { return Op::spec().plugin_namespace; }

  // Names, types and default values of every field (the ONNX parser reads only these names from a node).
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &collection_; }

  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase /*phase*/) noexcept override {
    std::string const layer = name ? name : "";
    try {
      FieldValues values(Op::spec());
      Status status = parseFields(fc, values);
      if (status.ok()) status = Op::checkFields(values);
      if (!status.ok()) {
        logError(Op::spec(), layer, status.message());
        return nullptr;
      }
      return new AttnPlugin<Op>(layer, std::move(values));
    } catch (std::exception const& e) {
      logError(Op::spec(), layer, e.what());
      return nullptr;
    }
  }

 private:
  FieldValues defaults_;
  std::vector<nvinfer1::PluginField> fieldList_;
  nvinfer1::PluginFieldCollection collection_{};
};

}  // namespace trt_plugins
}  // namespace attn_export
