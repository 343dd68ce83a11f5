// Plugin field values and input checks (no TensorRT include; see fields.h).
#include "fields.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>

namespace attn_export {
namespace trt_plugins {

namespace {

char const* kindName(FieldKind kind) {
  switch (kind) {
    case FieldKind::kInt: return "int";
    case FieldKind::kInts: return "ints";
    case FieldKind::kFloat: return "float";
    case FieldKind::kString: return "string";
  }
  return "?";
}

char const* rawTypeName(RawType type) {
  switch (type) {
    case RawType::kInt8: return "int8";
    case RawType::kInt16: return "int16";
    case RawType::kInt32: return "int32";
    case RawType::kInt64: return "int64";
    case RawType::kFloat32: return "float32";
    case RawType::kFloat64: return "float64";
    case RawType::kChar: return "char";
    case RawType::kOther: return "an unsupported type";
  }
  return "?";
}

bool isInteger(RawType type) {
  return type == RawType::kInt8 || type == RawType::kInt16 || type == RawType::kInt32 || type == RawType::kInt64;
}

int64_t integerAt(RawType type, void const* data, int32_t i) {
  switch (type) {
    case RawType::kInt8: return static_cast<int8_t const*>(data)[i];
    case RawType::kInt16: return static_cast<int16_t const*>(data)[i];
    case RawType::kInt32: return static_cast<int32_t const*>(data)[i];
    case RawType::kInt64: return static_cast<int64_t const*>(data)[i];
    default: return 0;
  }
}

bool fitsInt32(int64_t v) {
  return v >= std::numeric_limits<int32_t>::min() && v <= std::numeric_limits<int32_t>::max();
}

}  // namespace

FieldValues::FieldValues(OpSpec const& spec) : spec_(&spec), values_(static_cast<size_t>(spec.nb_fields)) {
  for (int32_t k = 0; k < spec.nb_fields; ++k) {
    FieldSpec const& f = spec.fields[k];
    Value& v = values_[k];
    v.i = f.int_default;
    v.f = f.float_default;
    if (f.kind == FieldKind::kString) {
      v.s = f.string_default;
      for (int32_t o = 0; o < f.nb_options; ++o) {
        if (v.s == f.options[o]) v.code = o;
      }
    }
    if (f.kind == FieldKind::kInts) v.ints.assign(f.ints_default, f.ints_default + f.nb_ints_default);
  }
}

int32_t FieldValues::find(char const* name) const {
  for (int32_t k = 0; k < spec_->nb_fields; ++k) {
    if (std::strcmp(spec_->fields[k].name, name) == 0) return k;
  }
  return -1;
}

Status FieldValues::set(char const* name, RawType type, void const* data, int32_t length) {
  if (name == nullptr) return Status::error("a plugin field has no name");
  int32_t const k = find(name);
  if (k < 0) {
    std::string known;
    for (int32_t i = 0; i < spec_->nb_fields; ++i) known += (i ? ", " : "") + std::string(spec_->fields[i].name);
    return Status::error(std::string("unknown field '") + name + "' (fields: " + known + ")");
  }
  FieldSpec const& f = spec_->fields[k];
  Value& v = values_[k];
  std::string const where = std::string("field '") + name + "' (" + kindName(f.kind) + ")";
  if (length < 0 || (length > 0 && data == nullptr)) return Status::error(where + " has no data");

  switch (f.kind) {
    case FieldKind::kInt: {
      if (!isInteger(type) || length != 1) {
        return Status::error(where + " needs one integer, got " + std::to_string(length) + " x " +
                             rawTypeName(type));
      }
      int64_t const value = integerAt(type, data, 0);
      if (!fitsInt32(value)) return Status::error(where + " = " + std::to_string(value) + " does not fit int32");
      v.i = static_cast<int32_t>(value);
      return Status();
    }
    case FieldKind::kInts: {
      if (!isInteger(type)) return Status::error(where + " needs integers, got " + rawTypeName(type));
      std::vector<int32_t> values(static_cast<size_t>(length));
      for (int32_t i = 0; i < length; ++i) {
        int64_t const value = integerAt(type, data, i);
        if (!fitsInt32(value)) return Status::error(where + " holds " + std::to_string(value) + ", not an int32");
        values[i] = static_cast<int32_t>(value);
      }
      v.ints = std::move(values);
      return Status();
    }
    case FieldKind::kFloat: {
      if ((type != RawType::kFloat32 && type != RawType::kFloat64) || length != 1) {
        return Status::error(where + " needs one float32, got " + std::to_string(length) + " x " + rawTypeName(type));
      }
      double const value = type == RawType::kFloat32 ? static_cast<float const*>(data)[0]
                                                     : static_cast<double const*>(data)[0];
      if (!std::isfinite(value)) return Status::error(where + " is not finite");
      v.f = static_cast<float>(value);
      return Status();
    }
    case FieldKind::kString: {
      if (type != RawType::kChar) return Status::error(where + " needs characters, got " + rawTypeName(type));
      char const* chars = static_cast<char const*>(data);
      size_t n = 0;
      while (n < static_cast<size_t>(length) && chars[n] != '\0') ++n;
      std::string value(chars ? chars : "", n);
      for (int32_t o = 0; o < f.nb_options; ++o) {
        if (value == f.options[o]) {
          v.s = std::move(value);
          v.code = o;
          return Status();
        }
      }
      std::string options;
      for (int32_t o = 0; o < f.nb_options; ++o) options += (o ? ", " : "") + std::string(f.options[o]);
      return Status::error(where + " = '" + value + "' is not one of: " + options);
    }
  }
  return Status::error(where + " has an unknown kind");
}

std::vector<RawField> FieldValues::serialized() const {
  std::vector<RawField> out;
  out.reserve(values_.size());
  for (int32_t k = 0; k < spec_->nb_fields; ++k) {
    FieldSpec const& f = spec_->fields[k];
    Value const& v = values_[k];
    switch (f.kind) {
      case FieldKind::kInt: out.push_back({f.name, RawType::kInt32, &v.i, 1}); break;
      case FieldKind::kInts:
        out.push_back({f.name, RawType::kInt32, v.ints.data(), static_cast<int32_t>(v.ints.size())});
        break;
      case FieldKind::kFloat: out.push_back({f.name, RawType::kFloat32, &v.f, 1}); break;
      case FieldKind::kString:
        out.push_back({f.name, RawType::kChar, v.s.c_str(), static_cast<int32_t>(v.s.size() + 1)});
        break;
    }
  }
  return out;
}

std::string FieldValues::describe() const {
  std::ostringstream out;
  out.precision(9);  // enough digits to tell any two float32 values apart
  for (int32_t k = 0; k < spec_->nb_fields; ++k) {
    FieldSpec const& f = spec_->fields[k];
    Value const& v = values_[k];
    out << (k ? "," : "") << f.name << '=';
    switch (f.kind) {
      case FieldKind::kInt: out << v.i; break;
      case FieldKind::kFloat: out << v.f; break;
      case FieldKind::kString: out << v.s; break;
      case FieldKind::kInts:
        out << '[';
        for (size_t i = 0; i < v.ints.size(); ++i) out << (i ? " " : "") << v.ints[i];
        out << ']';
        break;
    }
  }
  return out.str();
}

std::string shapeString(TensorShape const& shape) {
  std::string out;
  for (int32_t i = 0; i < shape.rank; ++i) out += (i ? "x" : "") + std::to_string(shape.d[i]);
  return shape.rank ? out : "scalar";
}

bool acceptsType(OpSpec const& spec, int32_t pos, int32_t nbInputs, ElementType const* types) {
  if (nbInputs < spec.nb_required_inputs || nbInputs > spec.nb_inputs || pos < 0 || pos > nbInputs) return false;
  bool const isInput = pos < nbInputs;
  if (isInput && spec.inputs[pos].kind == TensorKind::kInt32) return types[pos] == ElementType::kInt32;
  if (pos == 0) {
    return types[0] == ElementType::kFloat32 || types[0] == ElementType::kFloat16 ||
           types[0] == ElementType::kBFloat16;
  }
  return types[pos] == types[0];
}

Status checkInputs(OpSpec const& spec, TensorShape const* inputs, int32_t nbInputs) {
  if (nbInputs < spec.nb_required_inputs || nbInputs > spec.nb_inputs) {
    std::string expected = std::to_string(spec.nb_required_inputs);
    if (spec.nb_inputs > spec.nb_required_inputs) expected += " to " + std::to_string(spec.nb_inputs);
    return Status::error(std::string(spec.name) + " takes " + expected + " inputs, got " + std::to_string(nbInputs));
  }
  for (int32_t i = 0; i < nbInputs; ++i) {
    if (inputs[i].rank != spec.inputs[i].rank) {
      return Status::error(std::string("input '") + spec.inputs[i].name + "' must have rank " +
                           std::to_string(spec.inputs[i].rank) + ", got shape " + shapeString(inputs[i]));
    }
    for (int32_t d = 0; d < inputs[i].rank; ++d) {
      if (inputs[i].d[d] < 0 || inputs[i].d[d] > std::numeric_limits<int32_t>::max()) {
        return Status::error(describeInput(spec, inputs, i) + ": dimension " + std::to_string(d) +
                             " is outside the kernels' int32 range");
      }
    }
  }
  return Status();
}

std::string describeInput(OpSpec const& spec, TensorShape const* inputs, int32_t index) {
  return std::string("input '") + spec.inputs[index].name + "' (" + shapeString(inputs[index]) + ")";
}

}  // namespace trt_plugins
}  // namespace attn_export
