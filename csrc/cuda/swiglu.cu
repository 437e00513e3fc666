// SwiGLU backward on the GPU.
//
// Layout: dy, gate, up are [rows, cols] with a row stride each and contiguous columns (gate and up
// are typically the two .chunk(2, -1) halves of one fused [rows, 2 * cols] GEMM output, row stride
// 2 * cols); dgate and dup are [rows, cols] with row strides too (contiguous, or the two halves of
// one [rows, 2 * cols] gradient for the packed form, so no concatenation follows).
// dtypes: all tensors in one of fp32, fp16, bf16. Math in fp32; sigmoid(gate) is recomputed here
// instead of being saved by the forward.
//
// Grid: blockIdx.y picks a chunk of THREADS * VEC columns, blockIdx.x walks rows with a grid
// stride, so no thread ever divides. Fast path: each thread moves one 16-byte pack of each tensor
// (VEC = 16 / sizeof(T) elements) when the column count, the row strides and the pointers allow;
// otherwise VEC = 1. Row offsets are int64 (tensors past 2^31 elements).
#include "common.cuh"

namespace llama_fast {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxRowBlocks = 1 << 20;  // grid.x cap; larger row counts loop

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) swiglu_backward_kernel(SwigluBackwardArgs a) {
  const int64_t c = (int64_t(blockIdx.y) * kThreads + threadIdx.x) * VEC;
  if (c >= a.cols) return;
  const T* __restrict__ dy = static_cast<const T*>(a.dy);
  const T* __restrict__ gate = static_cast<const T*>(a.gate);
  const T* __restrict__ up = static_cast<const T*>(a.up);
  T* __restrict__ dgate = static_cast<T*>(a.dgate);
  T* __restrict__ dup = static_cast<T*>(a.dup);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    float d[VEC], g[VEC], u[VEC], dg[VEC], du[VEC];
    load_floats<T, VEC>(dy + row * a.dy_row_stride + c, d);
    load_floats<T, VEC>(gate + row * a.gate_row_stride + c, g);
    load_floats<T, VEC>(up + row * a.up_row_stride + c, u);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float s = 1.f / (1.f + __expf(-g[v]));
      du[v] = d[v] * g[v] * s;
      dg[v] = d[v] * u[v] * s * (1.f + g[v] * (1.f - s));
    }
    store_floats<T, VEC>(dgate + row * a.dgate_row_stride + c, dg);
    store_floats<T, VEC>(dup + row * a.dup_row_stride + c, du);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
int launch(const SwigluBackwardArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vectorizable = a.cols % VEC == 0 && a.dy_row_stride % VEC == 0 && a.gate_row_stride % VEC == 0 &&
                            a.up_row_stride % VEC == 0 && a.dgate_row_stride % VEC == 0 &&
                            a.dup_row_stride % VEC == 0 && aligned16(a.dy) && aligned16(a.gate) && aligned16(a.up) &&
                            aligned16(a.dgate) && aligned16(a.dup);
  const int vec = vectorizable ? VEC : 1;
  const int64_t col_blocks = (a.cols + int64_t(kThreads) * vec - 1) / (int64_t(kThreads) * vec);
  if (col_blocks > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 grid(static_cast<unsigned>(a.rows < kMaxRowBlocks ? a.rows : kMaxRowBlocks),
                  static_cast<unsigned>(col_blocks));
  if (vectorizable) {
    swiglu_backward_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(a);
  } else {
    swiglu_backward_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int swiglu_backward_cuda(const SwigluBackwardArgs& args, void* stream_ptr) {
  if (args.rows <= 0 || args.cols <= 0) return 0;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  return dispatch_dtype(args.dtype, [&](auto tag) { return launch<decltype(tag)>(args, stream); });
}

}  // namespace llama_fast
