// Prints what the kernels' host/device index math (plugins_trt/kernels/index_math.h) computes, so
// tests/test_index_math.py can compare it with the Python op references using only a C++ compiler:
//
//   index_math_harness bucket SPAN MAX_POSITION N          delta for rel = -(N-1) .. N-1, space-separated
//   index_math_harness bias BB BH BR B H NQ NK             bias offsets for every (b, h, i, j), row-major
#include <cstdlib>
#include <iostream>
#include <string>

#include "index_math.h"

int main(int argc, char** argv) {
  std::string const mode = argc > 1 ? argv[1] : "";
  if (mode == "bucket" && argc == 5) {
    int32_t const span = std::atoi(argv[2]), max_position = std::atoi(argv[3]), n = std::atoi(argv[4]);
    for (int64_t rel = -(n - 1); rel <= n - 1; ++rel) {
      std::cout << attn_export::relative_row(rel, span, max_position) << (rel < n - 1 ? ' ' : '\n');
    }
    return 0;
  }
  if (mode == "bias" && argc == 9) {
    int32_t v[7];
    for (int k = 0; k < 7; ++k) v[k] = std::atoi(argv[2 + k]);
    attn_export::BiasStrides const s = attn_export::bias_strides(v[0], v[1], v[2], v[6]);
    for (int32_t b = 0; b < v[3]; ++b)
      for (int32_t h = 0; h < v[4]; ++h)
        for (int32_t i = 0; i < v[5]; ++i)
          for (int32_t j = 0; j < v[6]; ++j) std::cout << attn_export::bias_offset(s, b, h, i, j) << ' ';
    std::cout << '\n';
    return 0;
  }
  std::cerr << "usage: index_math_harness bucket SPAN MAX_POSITION N | bias BB BH BR B H NQ NK\n";
  return 2;
}
