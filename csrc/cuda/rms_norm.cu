// RMSNorm backward on the GPU.
//
// Layout: dy and x are [rows, cols] with a row stride and contiguous columns; dx (and the optional
// dresidual) are contiguous [rows, cols]; w and dw are [cols]; rstd is fp32 [rows].
// dtypes: x/dy/dx in fp32, fp16 or bf16; w/dw in the x dtype or fp32. All math in fp32.
//
//   x_hat = x * rstd,  g = dy * w,  dx = rstd * (g - x_hat * mean(g * x_hat)) [+ dresidual]
//   dw = sum over rows of dy * x_hat
//
// One kernel, two phases. Phase one: a persistent grid of G blocks walks the rows (block b takes
// rows b, b + G, ...). Per row it forms mean(g * x_hat) with one block reduction, writes dx, and adds
// dy * x_hat into a per-thread register accumulator for dw; at the end each block writes its
// accumulator as one fp32 row of `partials` [G, cols]. Phase two, after a grid-wide barrier (a
// cooperative launch): every block sums a share of the columns over the G partial rows in the fixed
// order 0..G-1 and writes dw. No atomics, so dw is bitwise deterministic for a given G, and no second
// launch. Where a cooperative launch cannot hold the grid (no device support, too few resident
// blocks), phase two runs as its own kernel with the same order, so the result is the same.
//
// Fast path: a thread owns ITERS packs of VEC columns (16-byte accesses), for cols <= THREADS * VEC * 4
// (8192 columns in 16-bit types). The next row's packs of x and dy (and its rstd) are loaded before
// the current row's reduction, so their latency hides behind its two barriers and the dx stores; the
// row is kept as raw packs (4 registers a pack) and converted to fp32 in each of the two passes.
// Any other width (odd sizes, misaligned views, very wide rows) takes the general path, which streams
// the row from global memory twice and keeps dw in `partials`.
//
// Bytes per call: phase one reads x, dy (and dresidual) and writes dx once: 3 (4) * rows * cols *
// sizeof(T), 384 MiB at 16384 x 4096 in bf16; `partials` adds G * cols * 4 bytes written and read once
// (4.3 MB each way for G = 264, cols = 4096).
#include "common.cuh"

namespace llama_fast {
namespace {

constexpr int kThreads = 256;

// Phase two: the G partial rows summed in order 0..G-1 over this thread's columns of the grid-wide
// stride. Shared by the folded kernels (after grid_sync) and the stand-alone reduce kernel.
template <typename W>
__device__ __forceinline__ void reduce_partials(const float* partials, int num_partials, int64_t cols, W* dw,
                                                int64_t first, int64_t stride) {
  for (int64_t c = first; c < cols; c += stride) {
    float total = 0.f;
    for (int p = 0; p < num_partials; ++p) total += partials[int64_t(p) * cols + c];
    dw[c] = from_float<W>(total);
  }
}

template <typename W, bool FOLD>
__device__ __forceinline__ void finish_dw(const RmsNormBackwardArgs& a, const float* partials) {
  if constexpr (FOLD) {
    grid_sync();  // every block's partial row is written (and visible) past this point
    reduce_partials(partials, int(gridDim.x), a.cols, static_cast<W*>(a.dw),
                    int64_t(blockIdx.x) * kThreads + threadIdx.x, int64_t(gridDim.x) * kThreads);
  }
}

template <typename T, typename W, int VEC, int ITERS, bool FOLD>
__global__ void __launch_bounds__(kThreads) rms_norm_backward_registers(RmsNormBackwardArgs a, float* partials) {
  using Raw = Pack<T, VEC>;
  __shared__ float scratch[kThreads / 32];
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ dres = static_cast<const T*>(a.dresidual);
  T* __restrict__ dx = static_cast<T*>(a.dx);
  const int64_t cols = a.cols;

  float w[ITERS][VEC], dw_acc[ITERS][VEC];
  bool live[ITERS];  // this thread's pack `it` lies inside the row
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t c = (int64_t(it) * kThreads + threadIdx.x) * VEC;
    live[it] = c < cols;
#pragma unroll
    for (int v = 0; v < VEC; ++v) dw_acc[it][v] = w[it][v] = 0.f;
    if (live[it]) load_floats<W, VEC>(static_cast<const W*>(a.w) + c, w[it]);
  }

  // Raw packs of the row being worked on, and of the next one (in flight during this row's work).
  Raw xr[ITERS], dr[ITERS];
  auto load_row = [&](int64_t row, Raw (&xp)[ITERS], Raw (&dp)[ITERS]) {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t c = (int64_t(it) * kThreads + threadIdx.x) * VEC;
      if (live[it]) {
        xp[it] = *reinterpret_cast<const Raw*>(x + row * a.x_row_stride + c);
        dp[it] = *reinterpret_cast<const Raw*>(dy + row * a.dy_row_stride + c);
      }
    }
  };
  int64_t row = blockIdx.x;
  float rs = 0.f;
  if (row < a.rows) {
    load_row(row, xr, dr);
    rs = a.rstd[row];
  }
  for (; row < a.rows; row += gridDim.x) {
    const int64_t next = row + gridDim.x;
    Raw xn[ITERS], dn[ITERS];
    float rs_next = 0.f;
    if (next < a.rows) {
      load_row(next, xn, dn);
      rs_next = a.rstd[next];
    }
    Raw rr[ITERS];  // dresidual of this row, loaded before the reduction for the same reason
    if (dres) {
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int64_t c = (int64_t(it) * kThreads + threadIdx.x) * VEC;
        if (live[it]) rr[it] = *reinterpret_cast<const Raw*>(dres + row * cols + c);
      }
    }
    float dot = 0.f;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      if (!live[it]) continue;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float xh = to_float(xr[it].v[v]) * rs, d = to_float(dr[it].v[v]);
        dot += d * w[it][v] * xh;
        dw_acc[it][v] += d * xh;
      }
    }
    const float mean = block_sum<kThreads>(dot, scratch) / float(cols);
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t c = (int64_t(it) * kThreads + threadIdx.x) * VEC;
      if (!live[it]) continue;
      float out[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float xh = to_float(xr[it].v[v]) * rs;
        out[v] = rs * (to_float(dr[it].v[v]) * w[it][v] - xh * mean);
        if (dres) out[v] += to_float(rr[it].v[v]);
      }
      store_floats<T, VEC>(dx + row * cols + c, out);
    }
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      xr[it] = xn[it];
      dr[it] = dn[it];
    }
    rs = rs_next;
  }

  float* my_partial = partials + int64_t(blockIdx.x) * cols;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t c = (int64_t(it) * kThreads + threadIdx.x) * VEC;
    if (live[it]) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) my_partial[c + v] = dw_acc[it][v];
    }
  }
  finish_dw<W, FOLD>(a, partials);
}

// Any width and alignment: two passes over the row from global memory; dw accumulates in this
// block's own row of `partials` (no other block touches it).
template <typename T, typename W, bool FOLD>
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
  finish_dw<W, FOLD>(a, partials);
}

// Phase two on its own, for launches that cannot be cooperative.
template <typename W>
__global__ void rms_norm_backward_reduce(const float* partials, int num_partials, int64_t cols, W* dw) {
  reduce_partials(partials, num_partials, cols, dw, int64_t(blockIdx.x) * blockDim.x + threadIdx.x,
                  int64_t(gridDim.x) * blockDim.x);
}

// ---- launchers (host only; tests/test_cuda_emulation.py runs the kernels above without them) ----
bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// The phase-one kernel for this shape, folded (FOLD = true, cooperative launch) or not.
template <typename T, typename W, bool FOLD>
void* pick_kernel(const RmsNormBackwardArgs& a) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vectorizable = a.cols % VEC == 0 && a.x_row_stride % VEC == 0 && a.dy_row_stride % VEC == 0 &&
                            aligned(a.x, 16) && aligned(a.dy, 16) && aligned(a.dx, 16) && aligned(a.w, 16) &&
                            (a.dresidual == nullptr || aligned(a.dresidual, 16));
  const int64_t per_iter = int64_t(kThreads) * VEC;
  if (vectorizable && a.cols <= per_iter) return reinterpret_cast<void*>(rms_norm_backward_registers<T, W, VEC, 1, FOLD>);
  if (vectorizable && a.cols <= 2 * per_iter)
    return reinterpret_cast<void*>(rms_norm_backward_registers<T, W, VEC, 2, FOLD>);
  if (vectorizable && a.cols <= 4 * per_iter)
    return reinterpret_cast<void*>(rms_norm_backward_registers<T, W, VEC, 4, FOLD>);
  return reinterpret_cast<void*>(rms_norm_backward_general<T, W, FOLD>);
}

// How many blocks of `kernel` the whole device holds at once (0 where cooperative launches are not
// supported): the largest grid a grid-wide barrier can wait for without deadlock. The 16-bit kernels for
// rows of up to 4096 columns take 128 registers a thread or fewer, so two blocks per SM: 264 on an H100.
int cooperative_capacity(const void* kernel) {
  int device = 0, coop = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device) != cudaSuccess || !coop) return 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0) != cudaSuccess) return 0;
  return sms * per_sm;
}

template <typename T, typename W>
int launch(const RmsNormBackwardArgs& a, float* partials, int grid, cudaStream_t stream) {
  RmsNormBackwardArgs args = a;
  void* params[] = {&args, &partials};
  void* folded = pick_kernel<T, W, true>(a);
  const int capacity = cooperative_capacity(folded);
  if (capacity > 0) {  // as many blocks as the device holds at once, at most `grid`; dw sums that many partials
    const int blocks = grid < capacity ? grid : capacity;
    return static_cast<int>(cudaLaunchCooperativeKernel(folded, dim3(blocks), dim3(kThreads), params, 0, stream));
  }
  const cudaError_t err = cudaLaunchKernel(pick_kernel<T, W, false>(a), dim3(grid), dim3(kThreads), params, 0, stream);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int threads = 256;
  const int blocks = static_cast<int>((a.cols + threads - 1) / threads);
  rms_norm_backward_reduce<W><<<blocks, threads, 0, stream>>>(partials, grid, a.cols, static_cast<W*>(a.dw));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int rms_norm_backward_cuda(const RmsNormBackwardArgs& args, float* partials, int num_partials, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (args.cols <= 0) return 0;
  if (args.rows <= 0) {  // no rows: dw is a sum over nothing
    const size_t w_bytes = args.w_dtype == DType::F32 ? 4 : 2;
    return static_cast<int>(cudaMemsetAsync(args.dw, 0, size_t(args.cols) * w_bytes, stream));
  }
  const int grid = static_cast<int>(num_partials < args.rows ? num_partials : args.rows);
  return dispatch_dtype(args.x_dtype, [&](auto x_tag) {
    using T = decltype(x_tag);
    if (args.w_dtype == DType::F32) return launch<T, float>(args, partials, grid, stream);
    if (args.w_dtype != args.x_dtype) return static_cast<int>(cudaErrorInvalidValue);
    return launch<T, T>(args, partials, grid, stream);
  });
}

}  // namespace llama_fast
