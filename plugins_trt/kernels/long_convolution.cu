// LongConvolution (attn_export/ops/long_convolution.py): y[t, c] = sum_s w_c(t - s) u[s, c] with one combined tap
// function per channel,
//   w_c(l) = kernel[c, l] (l > 0),  kernel_reverse[c, -l - 1] (l < 0: the backward taps start one step later,
//            as in bidirectional S4),  kernel[c, 0] + skip[c] (l = 0),
// so the causal part, the anti-causal part and the skip term are one Toeplitz product. A block owns 32 channels
// (one per lane, so [N, C] rows are read coalesced) and 64 outputs (8 per warp); it walks 64-input tiles (only
// those at or before its outputs when there is no reverse kernel). Each thread keeps 8 outputs and reuses every
// tap and input it reads from shared memory 8 times. fp32 accumulation for every dtype.
// Direct O(N^2 C) work: the same as the reference's conv1d, without its padded copy.
#include "common.cuh"
#include "launch_plan.h"

namespace attn_export {
namespace detail {
namespace {

constexpr int kConvChannels = 32, kConvOut = 64, kConvIn = 64, kConvPerThread = 8;
constexpr int kConvTaps = kConvOut + kConvIn - 1;  // distinct t - s inside one (output tile, input tile) pair
constexpr int kConvTapPitch = kConvTaps + 2;       // odd pitch: lanes (channels) reading one tap hit distinct banks

template <typename T>
__global__ void __launch_bounds__(256)
    long_conv_kernel(const T* u, const T* kernel, const T* skip, const T* kernel_rev, T* y, int n, int taps_len,
                     int channels, int batch0) {
  __shared__ float s_u[kConvIn][kConvChannels];
  __shared__ float s_w[kConvChannels][kConvTapPitch];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int t0 = blockIdx.x * kConvOut, c0 = blockIdx.y * kConvChannels, b = blockIdx.z + batch0;
  const int64_t batch_offset = static_cast<int64_t>(b) * n * channels;
  const int c = c0 + lane;

  float acc[kConvPerThread] = {};
  const int last_tile = kernel_rev ? (n - 1) / kConvIn : min(n - 1, t0 + kConvOut - 1) / kConvIn;
  for (int tile = 0; tile <= last_tile; ++tile) {
    const int s0 = tile * kConvIn;
    __syncthreads();  // the previous tile is consumed
    for (int x = threadIdx.x; x < kConvIn * kConvChannels; x += blockDim.x) {
      const int s = x / kConvChannels, cc = x % kConvChannels;
      const bool ok = s0 + s < n && c0 + cc < channels;
      s_u[s][cc] = ok ? to_float(u[batch_offset + static_cast<int64_t>(s0 + s) * channels + c0 + cc]) : 0.f;
    }
    // tap index i holds w(l) for l = (t0 - s0) + i - (kConvIn - 1)
    for (int x = threadIdx.x; x < kConvChannels * kConvTaps; x += blockDim.x) {
      const int cc = x / kConvTaps, i = x % kConvTaps;
      const int l = t0 - s0 + i - (kConvIn - 1);
      float w = 0.f;
      if (c0 + cc < channels) {
        const int64_t row = static_cast<int64_t>(c0 + cc) * taps_len;
        if (l > 0 && l < taps_len) w = to_float(kernel[row + l]);
        else if (l < 0 && -l <= taps_len && kernel_rev) w = to_float(kernel_rev[row - l - 1]);
        else if (l == 0) w = to_float(kernel[row]) + to_float(skip[c0 + cc]);
      }
      s_w[cc][i] = w;
    }
    __syncthreads();

    // outputs t = t0 + warp*8 + r, inputs s = s0 + q0 + q: tap index warp*8 + r - q0 - q + kConvIn - 1
#pragma unroll 2
    for (int q0 = 0; q0 < kConvIn; q0 += kConvPerThread) {
      float uv[kConvPerThread], w[2 * kConvPerThread - 1];
#pragma unroll
      for (int q = 0; q < kConvPerThread; ++q) uv[q] = s_u[q0 + q][lane];
      const int base = warp * kConvPerThread - q0 + kConvIn - 1 - (kConvPerThread - 1);  // tap of r - q = -7
#pragma unroll
      for (int i = 0; i < 2 * kConvPerThread - 1; ++i) w[i] = s_w[lane][base + i];
#pragma unroll
      for (int r = 0; r < kConvPerThread; ++r)
#pragma unroll
        for (int q = 0; q < kConvPerThread; ++q) acc[r] = fmaf(w[r - q + kConvPerThread - 1], uv[q], acc[r]);
    }
  }
  if (c >= channels) return;
#pragma unroll
  for (int r = 0; r < kConvPerThread; ++r) {
    const int t = t0 + warp * kConvPerThread + r;
    if (t < n) y[batch_offset + static_cast<int64_t>(t) * channels + c] = from_float<T>(acc[r]);
  }
}

template <typename T>
cudaError_t run(const LongConvolutionParams& p, cudaStream_t stream) {
  for (int64_t slice = 0; slice < plan::z_slices(p.batch); ++slice) {  // batch rows past 65535: more launches
    const dim3 grid(ceil_div(p.seq_len, kConvOut), ceil_div(p.channels, kConvChannels),
                    static_cast<unsigned>(plan::z_slice_count(p.batch, slice)));
    long_conv_kernel<T><<<grid, 256, 0, stream>>>(
        static_cast<const T*>(p.input), static_cast<const T*>(p.kernel), static_cast<const T*>(p.skip),
        static_cast<const T*>(p.kernel_reverse), static_cast<T*>(p.output), p.seq_len, p.kernel_len, p.channels,
        static_cast<int>(plan::z_slice_first(slice)));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace detail

size_t long_convolution_workspace_size(const LongConvolutionParams&) { return 0; }

cudaError_t launch_long_convolution(const LongConvolutionParams& p, DataType dtype, void*, cudaStream_t stream) {
  if (p.batch <= 0 || p.seq_len < 0 || p.channels <= 0 || p.kernel_len < p.seq_len) return cudaErrorInvalidValue;
  if (p.seq_len == 0) return cudaSuccess;
  return detail::dispatch_dtype(dtype, [&](auto t) { return detail::run<decltype(t)>(p, stream); });
}

}  // namespace attn_export
