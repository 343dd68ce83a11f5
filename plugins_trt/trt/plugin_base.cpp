// The TensorRT-facing helpers every plugin shares (plugin_base.h).
#include "plugin_base.h"

#include <atomic>
#include <cstdio>

namespace attn_export {
namespace trt_plugins {

namespace {
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};
}  // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept { gLoggerFinder.store(finder); }

void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept {
  nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
  nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
  if (logger) {
    logger->log(severity, message.c_str());
  } else if (severity <= nvinfer1::ILogger::Severity::kWARNING) {
    std::fprintf(stderr, "[attn_export] %s\n", message.c_str());
  }
}

void logError(OpSpec const& spec, std::string const& layer, std::string const& message) noexcept {
  try {
    std::string text = std::string("[attn_export] ") + spec.name;
    if (!layer.empty()) text += " '" + layer + "'";
    logMessage(nvinfer1::ILogger::Severity::kERROR, text + ": " + message);
  } catch (...) {
    // nothing left to report with
  }
}

RawType toRawType(nvinfer1::PluginFieldType type) noexcept {
  switch (type) {
    case nvinfer1::PluginFieldType::kINT8: return RawType::kInt8;
    case nvinfer1::PluginFieldType::kINT16: return RawType::kInt16;
    case nvinfer1::PluginFieldType::kINT32: return RawType::kInt32;
    case nvinfer1::PluginFieldType::kINT64: return RawType::kInt64;
    case nvinfer1::PluginFieldType::kFLOAT32: return RawType::kFloat32;
    case nvinfer1::PluginFieldType::kFLOAT64: return RawType::kFloat64;
    case nvinfer1::PluginFieldType::kCHAR: return RawType::kChar;
    default: return RawType::kOther;
  }
}

nvinfer1::PluginFieldType toPluginFieldType(RawType type) noexcept {
  switch (type) {
    case RawType::kInt8: return nvinfer1::PluginFieldType::kINT8;
    case RawType::kInt16: return nvinfer1::PluginFieldType::kINT16;
    case RawType::kInt32: return nvinfer1::PluginFieldType::kINT32;
    case RawType::kInt64: return nvinfer1::PluginFieldType::kINT64;
    case RawType::kFloat32: return nvinfer1::PluginFieldType::kFLOAT32;
    case RawType::kFloat64: return nvinfer1::PluginFieldType::kFLOAT64;
    case RawType::kChar: return nvinfer1::PluginFieldType::kCHAR;
    case RawType::kOther: break;
  }
  return nvinfer1::PluginFieldType::kUNKNOWN;
}

Status parseFields(nvinfer1::PluginFieldCollection const* fc, FieldValues& values) {
  if (fc == nullptr) return Status();
  if (fc->nbFields > 0 && fc->fields == nullptr) return Status::error("the field collection has no fields array");
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    nvinfer1::PluginField const& field = fc->fields[i];
    Status const status = values.set(field.name, toRawType(field.type), field.data, field.length);
    if (!status.ok()) return status;
  }
  return Status();
}

void toPluginFields(FieldValues const& values, std::vector<nvinfer1::PluginField>& fields) {
  fields.clear();
  for (RawField const& raw : values.serialized()) {
    fields.emplace_back(raw.name, raw.data, toPluginFieldType(raw.type), raw.length);
  }
}

TensorShape toShape(nvinfer1::Dims const& dims) noexcept {
  TensorShape shape;
  shape.rank = dims.nbDims < 0 ? 0 : (dims.nbDims > kMaxRank ? kMaxRank : dims.nbDims);
  for (int32_t d = 0; d < shape.rank; ++d) shape.d[d] = dims.d[d];
  return shape;
}

ElementType toElementType(nvinfer1::DataType type) noexcept {
  switch (type) {
    case nvinfer1::DataType::kFLOAT: return ElementType::kFloat32;
    case nvinfer1::DataType::kHALF: return ElementType::kFloat16;
    case nvinfer1::DataType::kBF16: return ElementType::kBFloat16;
    case nvinfer1::DataType::kINT32: return ElementType::kInt32;
    default: return ElementType::kOther;
  }
}

bool toKernelType(nvinfer1::DataType type, DataType& out) noexcept {
  switch (type) {
    case nvinfer1::DataType::kFLOAT: out = DataType::kFloat32; return true;
    case nvinfer1::DataType::kHALF: out = DataType::kFloat16; return true;
    case nvinfer1::DataType::kBF16: out = DataType::kBFloat16; return true;
    default: return false;
  }
}

}  // namespace trt_plugins
}  // namespace attn_export
