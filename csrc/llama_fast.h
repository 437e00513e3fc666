// llama_fast kernel entry points: plain C++ declarations, no torch and no CUDA headers,
// so bindings.cpp, the CUDA files and the CPU files all share one contract.
//
// Conventions for every entry point below:
//  * tensors are raw pointers; "rows" are the flattened leading dims, the last dim is contiguous;
//    row strides are given in elements;
//  * DType says how a pointer's elements are stored; statistics and workspaces are fp32;
//  * CUDA launchers take the stream as `void*` (a cudaStream_t) and never synchronize.
#pragma once
#include <cstdint>

namespace llama_fast {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// ---------------------------------------------------------------------------------------------
// RMSNorm backward.   y = x * rstd * w,  rstd = 1 / sqrt(mean(x^2) + eps)   (rstd saved by forward)
//   g   = dy * w
//   dx  = rstd * (g - x * rstd^2 * mean(g * x))  [+ dresidual]
//   dw  = sum_rows(dy * x * rstd)          reduced in two fixed-order stages: deterministic
// dy, x: [rows, cols] in x_dtype with row strides; w: [cols] in w_dtype; rstd: [rows] fp32;
// dresidual: nullptr or [rows, cols] contiguous in x_dtype; dx: [rows, cols] contiguous in x_dtype;
// dw: [cols] in w_dtype.
// ---------------------------------------------------------------------------------------------
struct RmsNormBackwardArgs {
  DType x_dtype, w_dtype;
  const void* dy; int64_t dy_row_stride;
  const void* x;  int64_t x_row_stride;
  const void* w;
  const float* rstd;
  const void* dresidual;
  void* dx;
  void* dw;
  int64_t rows, cols;
};

// CPU: fp32 only (the binding converts); single pass over rows, dw summed in row order.
void rms_norm_backward_cpu(const float* dy, int64_t dy_row_stride, const float* x, int64_t x_row_stride,
                           const float* w, const float* rstd, const float* dresidual, float* dx, float* dw,
                           int64_t rows, int64_t cols);

// CUDA: `partials` is an fp32 workspace of num_partials * cols elements (num_partials >= 1 blocks
// of stage one; the caller picks it, e.g. a few per SM). Returns 0 or a cudaError_t value.
int rms_norm_backward_cuda(const RmsNormBackwardArgs& args, float* partials, int num_partials, void* stream);

}  // namespace llama_fast
