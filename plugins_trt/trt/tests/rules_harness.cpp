// Drives the TensorRT-free half of the plugins (fields.cpp and the six <op>.cpp files) from the command line, so
// tests/test_plugin_rules.py can check field parsing, shape checks, kernel params and output shapes against the
// Python op contracts with only a C++ compiler:
//
//   rules_harness OP [--field NAME:TYPE:VALUE[,VALUE...]]... [--shape AxBxC]...
//
// TYPE is int8|int16|int32|int64|float32|float64|char|char0 (char0 appends the NUL the ONNX parser includes).
// Prints, one per line: "fields: <describe()>", "roundtrip: <describe() after serialize + parse>", and with
// shapes "params: name=value ..." plus "output: AxBxC", or "error: <message>" where the plugin would refuse.
//
//   rules_harness --check < NODES
//
// The pre-flight of `attn-export plugins check` (attn_export/plugin_check.py writes NODES): per custom node, the
// rules TensorRT's parser, builder and runtime would run, in their order. NODES holds blocks of
//   node NAME OP VERSION NAMESPACE        (NAMESPACE "-" for empty)
//   field NAME:TYPE:VALUE                 (as the ONNX parser passes attributes: int32, float32, char)
//   input TYPE MIN OPT MAX                (float32|float16|bfloat16|int32|other; shapes AxB, "s" for a scalar)
//   end
// and the answer is one line per node: "ok NAME workspace=BYTES output=MIN/OPT/MAX" or "refused NAME: why".
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <exception>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "../ops.h"
#include "launch_plan.h"
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

// ------------------------------------------------------------------------------------------------ --check
// Shared memory per block the kernels may assume: the opt-in limit of sm_80 and sm_87 (sm_90 grants more).
constexpr size_t kCheckSmem = 166912;
constexpr int32_t kCheckMaxInputs = 8;

struct CheckInput {
  ElementType type;
  TensorShape shape[3];  // min, opt, max
};

char const* pointName(int point) { return point == 0 ? "min" : point == 1 ? "opt" : "max"; }

// Launch limits and workspace the kernel library states on the host (launch_plan.h) for these params.
template <typename P> char const* launchLimit(P const&) { return nullptr; }
char const* launchLimit(KernelizedAttentionParams const& p) { return plan::kernelized::launch_limit(p, kCheckSmem); }
char const* launchLimit(MixtureOfExpertsParams const& p) {
  return plan::gemm_launch_limit(p.capacity > 0 ? p.capacity : p.tokens, std::max(p.ffn_dim, p.model_dim));
}
char const* launchLimit(DisentangledAttentionParams const& p) {
  if (p.num_heads > plan::kMaxGridYZ) return "num_heads exceeds the grid's y limit (65535)";
  return plan::gemm_launch_limit(p.seq_len, 2 * static_cast<int64_t>(p.span));
}
char const* launchLimit(DenseAttentionParams const& p) {
  return p.num_heads > plan::kMaxGridYZ ? "num_heads exceeds the grid's y limit (65535)" : nullptr;
}
char const* launchLimit(BlockSparseAttentionParams const& p) {
  return p.num_heads > plan::kMaxGridYZ ? "num_heads exceeds the grid's y limit (65535)" : nullptr;
}
template <typename P> std::string workspace(P const&) { return "0"; }
std::string workspace(KernelizedAttentionParams const& p) {
  return std::to_string(plan::kernelized::workspace_size(p));
}
std::string workspace(MixtureOfExpertsParams const&) { return "kernel-defined"; }
std::string workspace(DisentangledAttentionParams const&) { return "kernel-defined"; }

template <typename Op>
std::string checkNode(std::string const& version, std::string const& ns, std::vector<RawArg> const& fields,
                      std::vector<CheckInput> const& inputs, std::string& detail) {
  OpSpec const& spec = Op::spec();
  // creator lookup by (name, version, namespace), as the parser does with plugin_version / plugin_namespace
  if (version != spec.version) return std::string("plugin_version '") + version + "' but the library has " + spec.version;
  if (ns != spec.plugin_namespace) return "plugin_namespace '" + ns + "' but the library registers '" + spec.plugin_namespace + "'";
  // createPlugin: fields as the parser passes them, then the shape-free checks
  FieldValues values(spec);
  for (RawArg const& f : fields) {
    Status const status = values.set(f.name.c_str(), f.type, f.bytes.empty() ? nullptr : f.bytes.data(), f.length);
    if (!status.ok()) return "createPlugin: " + status.message();
  }
  Status status = Op::checkFields(values);
  if (!status.ok()) return "createPlugin: " + status.message();
  int32_t const nbInputs = static_cast<int32_t>(inputs.size());
  if (nbInputs < spec.nb_required_inputs || nbInputs > spec.nb_inputs || nbInputs > kCheckMaxInputs)
    return "expected " + std::to_string(spec.nb_required_inputs) + " to " + std::to_string(spec.nb_inputs) +
           " inputs, the node has " + std::to_string(nbInputs);
  // supportsFormatCombination with the types the graph feeds at this precision; getOutputDataTypes mirrors input 0
  std::vector<ElementType> types;
  for (CheckInput const& in : inputs) types.push_back(in.type);
  types.push_back(types[0]);
  for (int32_t pos = 0; pos <= nbInputs; ++pos) {
    if (!acceptsType(spec, pos, nbInputs, types.data())) {
      std::string const what = pos < nbInputs ? std::string("input '") + spec.inputs[pos].name + "'" : "the output";
      return "supportsFormatCombination refuses " + what + " (" +
             (pos < nbInputs && spec.inputs[pos].kind == TensorKind::kInt32
                  ? "must be int32"
                  : "floating tensors must share input 0's type, fp32, fp16 or bf16") + ")";
    }
  }
  // getOutputShapes (ranks) and onShapeChange (the full shape checks and params) at the profile's min, opt, max;
  // the workspace and launch limits at max, where TensorRT sizes them
  std::string outputs;
  typename Op::Params params{};
  for (int point = 0; point < 3; ++point) {
    TensorShape shapes[kCheckMaxInputs];
    for (int32_t i = 0; i < nbInputs; ++i) shapes[i] = inputs[static_cast<size_t>(i)].shape[point];
    status = checkInputs(spec, shapes, nbInputs);
    if (!status.ok()) return std::string("getOutputShapes at the profile's ") + pointName(point) + ": " + status.message();
    status = Op::makeParams(values, shapes, nbInputs, params);
    if (!status.ok()) return std::string("onShapeChange at the profile's ") + pointName(point) + ": " + status.message();
    char const* limit = launchLimit(params);
    if (limit) return std::string("launch limit at the profile's ") + pointName(point) + ": " + limit;
    TensorShape out;
    out.rank = spec.output_rank;
    outputDims(spec, [&](int32_t input, int32_t dim) -> int64_t { return shapes[input].d[dim]; },
               [](int64_t value) { return value; }, out.d);
    outputs += (point ? "/" : "") + shapeString(out);
  }
  detail = "workspace=" + workspace(params) + " output=" + outputs;
  return "";
}

bool parseType(std::string const& text, ElementType& type) {
  if (text == "float32") type = ElementType::kFloat32;
  else if (text == "float16") type = ElementType::kFloat16;
  else if (text == "bfloat16") type = ElementType::kBFloat16;
  else if (text == "int32") type = ElementType::kInt32;
  else if (text == "other") type = ElementType::kOther;
  else return false;
  return true;
}

bool parseCheckShape(std::string const& text, TensorShape& shape) {
  if (text == "s") {
    shape = TensorShape{};
    return true;
  }
  try {
    return parseShape(text, shape);
  } catch (std::exception const&) {
    return false;
  }
}

int runCheck() {
  std::string line, name, op, version, ns;
  std::vector<RawArg> fields;
  std::vector<CheckInput> inputs;
  int refused = 0;
  while (std::getline(std::cin, line)) {
    std::istringstream words(line);
    std::string kind;
    words >> kind;
    if (kind == "node") {
      words >> name >> op >> version >> ns;
      if (ns == "-") ns.clear();
      fields.clear(), inputs.clear();
    } else if (kind == "field") {
      RawArg arg;
      std::string spec = line.substr(6);
      bool ok = false;
      try {
        ok = parseField(spec, arg);
      } catch (std::exception const&) {
        ok = false;
      }
      if (!ok) {
        std::cerr << "bad field line: " << line << '\n';
        return 2;
      }
      fields.push_back(arg);
    } else if (kind == "input") {
      std::string type, lo, mid, hi;
      words >> type >> lo >> mid >> hi;
      CheckInput in{};
      if (!parseType(type, in.type) || !parseCheckShape(lo, in.shape[0]) || !parseCheckShape(mid, in.shape[1]) ||
          !parseCheckShape(hi, in.shape[2])) {
        std::cerr << "bad input line: " << line << '\n';
        return 2;
      }
      inputs.push_back(in);
    } else if (kind == "end") {
      std::string detail, why;
      if (op == "BlockSparseAttention") why = checkNode<BlockSparseAttentionOp>(version, ns, fields, inputs, detail);
      else if (op == "DenseAttention") why = checkNode<DenseAttentionOp>(version, ns, fields, inputs, detail);
      else if (op == "KernelizedAttention") why = checkNode<KernelizedAttentionOp>(version, ns, fields, inputs, detail);
      else if (op == "DisentangledAttention") why = checkNode<DisentangledAttentionOp>(version, ns, fields, inputs, detail);
      else if (op == "MixtureOfExperts") why = checkNode<MixtureOfExpertsOp>(version, ns, fields, inputs, detail);
      else if (op == "LongConvolution") why = checkNode<LongConvolutionOp>(version, ns, fields, inputs, detail);
      else why = "no plugin creator named " + op;
      if (why.empty()) {
        std::cout << "ok " << name << ' ' << detail << '\n';
      } else {
        std::cout << "refused " << name << ": " << why << '\n';
        ++refused;
      }
    } else if (!kind.empty()) {
      std::cerr << "bad line: " << line << '\n';
      return 2;
    }
  }
  return refused ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "--check") return runCheck();
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
