// RMSNorm backward on the GPU.
//
// Layout: dy and x are [rows, cols] with a row stride and contiguous columns; dx (and the optional
// dresidual) are contiguous [rows, cols]; w and dw are [cols]; rstd is fp32 [rows].
// dtypes: x/dy/dx in fp32, fp16 or bf16; w/dw in the x dtype or fp32. All math in fp32.
//
// Stage one: a persistent grid of `num_partials` blocks walks the rows (block b takes rows
// b, b + grid, ...). Per row it forms mean(dy * w * x_hat) with one block reduction, writes dx, and
// adds dy * x_hat into a per-thread register accumulator for dw. At the end each block writes its
// accumulator as one fp32 row of `partials`.
// Stage two: one thread per column sums the `num_partials` rows in a fixed order. No atomics, so
// dw is bitwise deterministic for a given grid.
//
// Fast path: a thread owns ITERS packs of VEC columns (16-byte accesses) held in registers, for
// cols <= THREADS * VEC * 4 (8192 columns in 16-bit types). Any other width (odd sizes, misaligned views, very wide rows) takes
// the general path, which streams the row from global memory twice and keeps dw in `partials`.
#include "common.cuh"

namespace llama_fast {
namespace {

constexpr int kThreads = 256;

template <typename T, typename W, int VEC, int ITERS>
__global__ void __launch_bounds__(kThreads) rms_norm_backward_registers(RmsNormBackwardArgs a, float* partials) {
  __shared__ float scratch[kThreads / 32];
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ dres = static_cast<const T*>(a.dresidual);
  T* __restrict__ dx = static_cast<T*>(a.dx);
  const int64_t cols = a.cols;

  float w[ITERS][VEC], dw_acc[ITERS][VEC];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t c = (int64_t(it) * kThreads + threadIdx.x) * VEC;
#pragma unroll
    for (int v = 0; v < VEC; ++v) dw_acc[it][v] = 0.f;
    if (c < cols) {
      load_floats<W, VEC>(static_cast<const W*>(a.w) + c, w[it]);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) w[it][v] = 0.f;
    }
  }

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const float rs = a.rstd[row];
    float xv[ITERS][VEC], gv[ITERS][VEC];  // x_hat and dy * w
    float dot = 0.f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t c = (int64_t(it) * kThreads + threadIdx.x) * VEC;
      float dyv[VEC];
      if (c < cols) {
        load_floats<T, VEC>(x + row * a.x_row_stride + c, xv[it]);
        load_floats<T, VEC>(dy + row * a.dy_row_stride + c, dyv);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) xv[it][v] = dyv[v] = 0.f;
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        xv[it][v] *= rs;
        gv[it][v] = dyv[v] * w[it][v];
        dot += gv[it][v] * xv[it][v];
        dw_acc[it][v] += dyv[v] * xv[it][v];
      }
    }
    const float mean = block_sum<kThreads>(dot, scratch) / float(cols);
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t c = (int64_t(it) * kThreads + threadIdx.x) * VEC;
      if (c >= cols) continue;
      float out[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) out[v] = rs * (gv[it][v] - xv[it][v] * mean);
      if (dres) {
        float r[VEC];
        load_floats<T, VEC>(dres + row * cols + c, r);
#pragma unroll
        for (int v = 0; v < VEC; ++v) out[v] += r[v];
      }
      store_floats<T, VEC>(dx + row * cols + c, out);
    }
  }

  float* my_partial = partials + int64_t(blockIdx.x) * cols;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t c = (int64_t(it) * kThreads + threadIdx.x) * VEC;
    if (c < cols) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) my_partial[c + v] = dw_acc[it][v];
    }
  }
}

// Any width and alignment: two passes over the row from global memory; dw accumulates in this
// block's own row of `partials` (no other block touches it).
template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) rms_norm_backward_general(RmsNormBackwardArgs a, float* partials) {
  __shared__ float scratch[kThreads / 32];
  const T* dy = static_cast<const T*>(a.dy);
  const T* x = static_cast<const T*>(a.x);
  const W* w = static_cast<const W*>(a.w);
  const T* dres = static_cast<const T*>(a.dresidual);
  T* dx = static_cast<T*>(a.dx);
  const int64_t cols = a.cols;
  float* my_partial = partials + int64_t(blockIdx.x) * cols;
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) my_partial[c] = 0.f;

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const float rs = a.rstd[row];
    const T* x_row = x + row * a.x_row_stride;
    const T* dy_row = dy + row * a.dy_row_stride;
    float dot = 0.f;
    for (int64_t c = threadIdx.x; c < cols; c += kThreads)
      dot += to_float(dy_row[c]) * to_float(w[c]) * to_float(x_row[c]) * rs;
    const float mean = block_sum<kThreads>(dot, scratch) / float(cols);
    for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
      const float xh = to_float(x_row[c]) * rs;
      const float d = to_float(dy_row[c]);
      float out = rs * (d * to_float(w[c]) - xh * mean);
      if (dres) out += to_float(dres[row * cols + c]);
      dx[row * cols + c] = from_float<T>(out);
      my_partial[c] += d * xh;  // the same thread owns column c on every row: no race
    }
  }
}

template <typename W>
__global__ void rms_norm_backward_reduce(const float* partials, int num_partials, int64_t cols, W* dw) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float total = 0.f;
  for (int p = 0; p < num_partials; ++p) total += partials[int64_t(p) * cols + c];
  dw[c] = from_float<W>(total);
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T, typename W>
void launch_stage_one(const RmsNormBackwardArgs& a, float* partials, int grid, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vectorizable = a.cols % VEC == 0 && a.x_row_stride % VEC == 0 && a.dy_row_stride % VEC == 0 &&
                            aligned(a.x, 16) && aligned(a.dy, 16) && aligned(a.dx, 16) && aligned(a.w, 16) &&
                            (a.dresidual == nullptr || aligned(a.dresidual, 16));
  const int64_t per_iter = int64_t(kThreads) * VEC;
  if (vectorizable && a.cols <= per_iter) {
    rms_norm_backward_registers<T, W, VEC, 1><<<grid, kThreads, 0, stream>>>(a, partials);
  } else if (vectorizable && a.cols <= 2 * per_iter) {
    rms_norm_backward_registers<T, W, VEC, 2><<<grid, kThreads, 0, stream>>>(a, partials);
  } else if (vectorizable && a.cols <= 4 * per_iter) {
    rms_norm_backward_registers<T, W, VEC, 4><<<grid, kThreads, 0, stream>>>(a, partials);
  } else {
    rms_norm_backward_general<T, W><<<grid, kThreads, 0, stream>>>(a, partials);
  }
}

}  // namespace

int rms_norm_backward_cuda(const RmsNormBackwardArgs& args, float* partials, int num_partials, void* stream_ptr) {
  if (args.rows <= 0 || args.cols <= 0) return 0;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int grid = static_cast<int>(num_partials < args.rows ? num_partials : args.rows);
  const int err = dispatch_dtype(args.x_dtype, [&](auto x_tag) {
    using T = decltype(x_tag);
    auto with_w = [&](auto w_tag) {
      using W = decltype(w_tag);
      launch_stage_one<T, W>(args, partials, grid, stream);
      const int threads = 256;
      const int blocks = static_cast<int>((args.cols + threads - 1) / threads);
      rms_norm_backward_reduce<W><<<blocks, threads, 0, stream>>>(partials, grid, args.cols, static_cast<W*>(args.dw));
      return static_cast<int>(cudaGetLastError());
    };
    if (args.w_dtype == DType::F32) return with_w(float{});
    if (args.w_dtype != args.x_dtype) return static_cast<int>(cudaErrorInvalidValue);
    return with_w(T{});
  });
  return err;
}

}  // namespace llama_fast
