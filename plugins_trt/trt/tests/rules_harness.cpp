// Drives the TensorRT-free half of the plugins (fields.cpp and the six <op>.cpp files) from the command line, so
// tests/test_plugin_rules.py can check field parsing, shape checks, kernel params and output shapes against the
// Python op contracts with only a C++ compiler:
//
//   rules_harness OP [--field NAME:TYPE:VALUE[,VALUE...]]... [--shape AxBxC]...
//
// TYPE is int8|int16|int32|int64|float32|float64|char|char0 (char0 appends the NUL the ONNX parser includes).
// Prints, one per line: "fields: <describe()>", "roundtrip: <describe() after serialize + parse>", and with
// shapes "params: name=value ..." plus "output: AxBxC", or "error: <message>" where the plugin would refuse.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "../ops.h"
#include "params_print.h"

using namespace attn_export;
using namespace attn_export::trt_plugins;
using attn_export::testing::print;

namespace {

struct RawArg {
  std::string name;
  RawType type;
  std::vector<unsigned char> bytes;
  int32_t length;
};

template <typename T>
void append(std::vector<unsigned char>& bytes, T value) {
  unsigned char const* p = reinterpret_cast<unsigned char const*>(&value);
  bytes.insert(bytes.end(), p, p + sizeof(T));
}

bool parseField(std::string const& text, RawArg& arg) {
  size_t const a = text.find(':');
  size_t const b = a == std::string::npos ? a : text.find(':', a + 1);
  if (b == std::string::npos) return false;
  arg.name = text.substr(0, a);
  std::string const type = text.substr(a + 1, b - a - 1);
  std::string const value = text.substr(b + 1);
  if (type == "char" || type == "char0") {
    arg.type = RawType::kChar;
    arg.bytes.assign(value.begin(), value.end());
    if (type == "char0") arg.bytes.push_back('\0');
    arg.length = static_cast<int32_t>(arg.bytes.size());
    return true;
  }
  std::vector<std::string> items;
  std::stringstream stream(value);
  for (std::string item; std::getline(stream, item, ',');) items.push_back(item);
  arg.length = static_cast<int32_t>(items.size());
  for (std::string const& item : items) {
    if (type == "int8") arg.type = RawType::kInt8, append<int8_t>(arg.bytes, static_cast<int8_t>(std::stoll(item)));
    else if (type == "int16") arg.type = RawType::kInt16, append<int16_t>(arg.bytes, static_cast<int16_t>(std::stoll(item)));
    else if (type == "int32") arg.type = RawType::kInt32, append<int32_t>(arg.bytes, static_cast<int32_t>(std::stoll(item)));
    else if (type == "int64") arg.type = RawType::kInt64, append<int64_t>(arg.bytes, std::stoll(item));
    else if (type == "float32") arg.type = RawType::kFloat32, append<float>(arg.bytes, std::stof(item));
    else if (type == "float64") arg.type = RawType::kFloat64, append<double>(arg.bytes, std::stod(item));
    else return false;
  }
  if (items.empty()) {
    arg.type = type == "int32" ? RawType::kInt32 : RawType::kOther;
  }
  return true;
}

bool parseShape(std::string const& text, TensorShape& shape) {
  shape = TensorShape{};
  std::stringstream stream(text);
  for (std::string item; std::getline(stream, item, 'x');) {
    if (shape.rank == kMaxRank) return false;
    shape.d[shape.rank++] = std::stoll(item);
  }
  return true;
}

template <typename Op>
int run(std::vector<RawArg> const& fields, std::vector<TensorShape> const& shapes) {
  FieldValues values(Op::spec());
  for (RawArg const& f : fields) {
    Status const status = values.set(f.name.c_str(), f.type, f.bytes.empty() ? nullptr : f.bytes.data(), f.length);
    if (!status.ok()) {
      std::cout << "error: " << status.message() << '\n';
      return 0;
    }
  }
  Status status = Op::checkFields(values);
  if (!status.ok()) {
    std::cout << "error: " << status.message() << '\n';
    return 0;
  }
  std::cout << "fields: " << values.describe() << '\n';

  // what a deserialized plugin would hold: every serialized field parsed again
  FieldValues again(Op::spec());
  for (RawField const& raw : values.serialized()) {
    status = again.set(raw.name, raw.type, raw.data, raw.length);
    if (!status.ok()) {
      std::cout << "error: round trip: " << status.message() << '\n';
      return 1;
    }
  }
  std::cout << "roundtrip: " << again.describe() << '\n';

  if (shapes.empty()) return 0;
  typename Op::Params params{};
  status = Op::makeParams(values, shapes.data(), static_cast<int32_t>(shapes.size()), params);
  if (!status.ok()) {
    std::cout << "error: " << status.message() << '\n';
    return 0;
  }
  std::cout << "params:" << print(params) << '\n';
  TensorShape out;
  out.rank = Op::spec().output_rank;
  outputDims(
      Op::spec(), [&](int32_t input, int32_t dim) { return shapes[input].d[dim]; },
      [](int64_t value) { return value; }, out.d);
  std::cout << "output: " << shapeString(out) << '\n';
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: rules_harness OP [--field NAME:TYPE:VALUE]... [--shape AxBxC]...\n";
    return 2;
  }
  std::string const op = argv[1];
  std::vector<RawArg> fields;
  std::vector<TensorShape> shapes;
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string const flag = argv[i];
    if (flag == "--field") {
      RawArg arg;
      if (!parseField(argv[i + 1], arg)) {
        std::cerr << "bad --field " << argv[i + 1] << '\n';
        return 2;
      }
      fields.push_back(arg);
    } else if (flag == "--shape") {
      TensorShape shape;
      if (!parseShape(argv[i + 1], shape)) {
        std::cerr << "bad --shape " << argv[i + 1] << '\n';
        return 2;
      }
      shapes.push_back(shape);
    } else {
      std::cerr << "unknown option " << flag << '\n';
      return 2;
    }
  }
  if (op == "BlockSparseAttention") return run<BlockSparseAttentionOp>(fields, shapes);
  if (op == "DenseAttention") return run<DenseAttentionOp>(fields, shapes);
  if (op == "KernelizedAttention") return run<KernelizedAttentionOp>(fields, shapes);
  if (op == "DisentangledAttention") return run<DisentangledAttentionOp>(fields, shapes);
  if (op == "MixtureOfExperts") return run<MixtureOfExpertsOp>(fields, shapes);
  if (op == "LongConvolution") return run<LongConvolutionOp>(fields, shapes);
  std::cerr << "unknown op " << op << '\n';
  return 2;
}
