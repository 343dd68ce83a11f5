// Plugin fields, input specs and output-shape rules, without TensorRT.
//
// op_contracts.h (generated from attn_export/ops) describes every op with the types below; FieldValues holds one
// plugin's attribute values: defaults first, then whatever a PluginFieldCollection supplies, checked against the
// contract (kind, length, string options). plugin_base.h translates TensorRT's PluginField to and from this form.
// Keeping this layer free of TensorRT lets tests/test_plugin_rules.py compile and exercise it with g++ alone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace attn_export {
namespace trt_plugins {

enum class FieldKind : int32_t { kInt = 0, kInts = 1, kFloat = 2, kString = 3 };
enum class TensorKind : int32_t { kFloating = 0, kInt32 = 1 };

struct FieldSpec {
  char const* name;
  FieldKind kind;
  int32_t int_default;
  float float_default;
  char const* string_default;
  char const* const* options;  // kString: the accepted values; the value's code is its index here
  int32_t nb_options;
  int32_t const* ints_default;  // kInts
  int32_t nb_ints_default;
};

struct InputSpec {
  char const* name;
  int32_t rank;
  TensorKind kind;
  bool optional;  // optional inputs come last; a node may leave them out
};

// One output dimension: input[input].d[dim], or `constant` when input < 0.
struct DimSource {
  int32_t input;
  int32_t dim;
  int64_t constant;
};

struct OpSpec {
  char const* name;
  char const* version;
  char const* plugin_namespace;
  FieldSpec const* fields;
  int32_t nb_fields;
  InputSpec const* inputs;
  int32_t nb_inputs;
  int32_t nb_required_inputs;
  DimSource const* output_dims;
  int32_t output_rank;
};

// Success, or one line saying what is wrong. Success allocates nothing.
class Status {
 public:
  Status() = default;
  static Status error(std::string message) {
    Status s;
    s.ok_ = false;
    s.message_ = std::move(message);
    return s;
  }
  bool ok() const { return ok_; }
  std::string const& message() const { return message_; }

 private:
  bool ok_ = true;
  std::string message_;
};

// Element types a field may arrive in (a TensorRT-independent copy of the PluginFieldType values we accept).
enum class RawType : int32_t { kInt8, kInt16, kInt32, kInt64, kFloat32, kFloat64, kChar, kOther };

// A field as it is serialized: pointers into the FieldValues that produced it.
struct RawField {
  char const* name;
  RawType type;
  void const* data;
  int32_t length;
};

class FieldValues {
 public:
  explicit FieldValues(OpSpec const& spec);

  OpSpec const& spec() const { return *spec_; }

  // Sets the field called `name` from `length` elements of `type` at `data`. Ints arrive as int32 from the ONNX
  // parser (other integer widths are accepted when the value fits), floats as float32 (float64 accepted), strings
  // as char with or without a NUL terminator (the value ends at the first NUL). Unknown names are refused.
  Status set(char const* name, RawType type, void const* data, int32_t length);

  int32_t getInt(int32_t field) const { return values_[field].i; }
  float getFloat(int32_t field) const { return values_[field].f; }
  std::string const& getString(int32_t field) const { return values_[field].s; }
  int32_t getCode(int32_t field) const { return values_[field].code; }  // index of a string value in its options
  std::vector<int32_t> const& getInts(int32_t field) const { return values_[field].ints; }

  // Every field in contract order, as it is handed to TensorRT for serialization (ints as int32, floats as
  // float32, strings as char including the NUL, exactly what the ONNX parser produces). Valid while *this lives
  // and is not modified.
  std::vector<RawField> serialized() const;

  // "name=value,name=value,..." in contract order: the plugin's timing-cache ID and metadata string.
  std::string describe() const;

 private:
  struct Value {
    int32_t i = 0;
    float f = 0.0f;
    std::string s;
    int32_t code = 0;
    std::vector<int32_t> ints;
  };

  int32_t find(char const* name) const;

  OpSpec const* spec_;
  std::vector<Value> values_;
};

// ------------------------------------------------------------------------------------------------------------
// Shapes

inline constexpr int32_t kMaxRank = 8;

struct TensorShape {
  int32_t rank = 0;
  int64_t d[kMaxRank] = {};
};

std::string shapeString(TensorShape const& shape);  // "2x128x512"

// Checks the number of inputs (required ones present, no more than the contract lists), every input's rank, and
// that every dimension fits the kernels' int32 extents.
Status checkInputs(OpSpec const& spec, TensorShape const* inputs, int32_t nbInputs);

// "input 'key' (2x64x512)": the start of a shape complaint.
std::string describeInput(OpSpec const& spec, TensorShape const* inputs, int32_t index);

// A dimension already checked by checkInputs, as the kernels take it.
inline int32_t extent(int64_t dim) { return static_cast<int32_t>(dim); }

// Returns the error of `expr` from the enclosing function when it is one.
#define ATTN_EXPORT_TRY(expr)          \
  do {                                 \
    ::attn_export::trt_plugins::Status status_ = (expr); \
    if (!status_.ok()) return status_; \
  } while (0)

// ------------------------------------------------------------------------------------------------------------
// Formats

// Element types as supportsFormatCombination sees them (mapped from nvinfer1::DataType in plugin_base.h, from the
// graph's types by the pre-flight), so one rule serves TensorRT and `attn-export plugins check`.
enum class ElementType : int32_t { kFloat32, kFloat16, kBFloat16, kInt32, kOther };

// Whether tensor `pos` (inputs first, then the output) may have type types[pos], given types[0..pos-1] (TensorRT
// asks position by position and a decision may only look at earlier ones). Formats other than linear are refused
// by the caller. Integer tables are int32; the floating tensors share input 0's type, fp32, fp16 or bf16.
bool acceptsType(OpSpec const& spec, int32_t pos, int32_t nbInputs, ElementType const* types);

// The output dimensions from the contract's rule, for any dimension type: plain integers here, TensorRT's
// IDimensionExpr in the plugin. `inputDim(i, d)` returns input i's dimension d, `constant(v)` a constant.
template <typename Dim, typename InputDim, typename Constant>
void outputDims(OpSpec const& spec, InputDim&& inputDim, Constant&& constant, Dim* out) {
  for (int32_t k = 0; k < spec.output_rank; ++k) {
    DimSource const& source = spec.output_dims[k];
    out[k] = source.input < 0 ? constant(source.constant) : inputDim(source.input, source.dim);
  }
}

}  // namespace trt_plugins
}  // namespace attn_export
