// Prints launch_plan.h's numbers for tests/test_launch_plan.py (host compiler only, no GPU):
//   launch_plan_probe kernelized BATCH HEADS SEQ D DV FEATURES FEATURE_MAP CAUSAL SMEM_LIMIT
//   launch_plan_probe zslices TOTAL
//   launch_plan_probe unflatten INDEX NX NY
//   launch_plan_probe wrows FEATURES      (per feature of each key-state block: "feature f_base tile_row")
//   launch_plan_probe gemm M N
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>

#include "../launch_plan.h"

using namespace attn_export;

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  auto arg = [&](int i) { return std::atoll(argv[i]); };
  if (!std::strcmp(argv[1], "kernelized") && argc == 11) {
    KernelizedAttentionParams p{};
    p.batch = static_cast<int32_t>(arg(2)), p.num_heads = static_cast<int32_t>(arg(3));
    p.seq_len = static_cast<int32_t>(arg(4)), p.head_dim = static_cast<int32_t>(arg(5));
    p.v_head_dim = static_cast<int32_t>(arg(6)), p.num_features = static_cast<int32_t>(arg(7));
    p.feature_map = static_cast<int32_t>(arg(8)), p.causal = static_cast<int32_t>(arg(9));
    const size_t limit = static_cast<size_t>(arg(10));
    namespace k = plan::kernelized;
    const k::Shape s = k::shape(p);
    char const* why = k::launch_limit(p, limit);
    std::printf("m=%d mp=%d tiles=%d nfb=%d splits=%d\n", s.m, s.mp, s.tiles, s.nfb, s.splits);
    std::printf("key_state_blocks=%lld prefix_blocks=%lld query_blocks=%lld simt_blocks=%lld\n",
                static_cast<long long>(k::key_state_blocks(s)), static_cast<long long>(k::prefix_blocks(s)),
                static_cast<long long>(k::query_blocks(s)), static_cast<long long>(k::simt_blocks(s)));
    std::printf("simt_smem_all=%zu simt_smem_fixed=%zu simt_workspace=%zu state_in_workspace=%d\n",
                k::simt_smem_all(s.d, s.m), k::simt_smem_fixed(s.d), k::simt_workspace(s),
                k::simt_state_in_workspace(s, limit) ? 1 : 0);
    std::printf("tc_workspace=%zu workspace=%zu\n", k::dims_fit_tc(s.d, s.dv) ? k::tc_layout(s).total : 0,
                k::workspace_size(p));
    std::printf("limit=%s\n", why ? why : "none");
    return 0;
  }
  if (!std::strcmp(argv[1], "zslices") && argc == 3) {
    const long long total = arg(2);
    for (long long i = 0; i < plan::z_slices(total); ++i)
      std::printf("%lld %lld\n", static_cast<long long>(plan::z_slice_first(i)),
                  static_cast<long long>(plan::z_slice_count(total, i)));
    return 0;
  }
  if (!std::strcmp(argv[1], "unflatten") && argc == 5) {
    const plan::Index3 r = plan::unflatten3(arg(2), static_cast<int>(arg(3)), static_cast<int>(arg(4)));
    std::printf("%d %d %d\n", r.x, r.y, r.z);
    return 0;
  }
  if (!std::strcmp(argv[1], "wrows") && argc == 3) {
    namespace k = plan::kernelized;
    const int mp = static_cast<int>((arg(2) + 31) / 32 * 32);
    for (int f_base = 0; f_base < mp; f_base += k::kFB)
      for (int f = f_base; f < std::min(f_base + k::kFB, mp); ++f) std::printf("%d %d %d\n", f, f_base, k::w_tile_row(f, f_base));
    return 0;
  }
  if (!std::strcmp(argv[1], "gemm") && argc == 4) {
    char const* why = plan::gemm_launch_limit(arg(2), arg(3));
    std::printf("limit=%s\n", why ? why : "none");
    return 0;
  }
  return 2;
}
