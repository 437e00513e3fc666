// SwiGLU backward on the CPU: the same op as cuda/swiglu.cu, for machines without a GPU and as a
// second, simple implementation to test against. Layout: dy, gate, up are [rows, cols] with row
// strides and contiguous columns; dgate, dup likewise (the two halves of one [rows, 2 * cols] gradient
// for the packed form). fp32 in and out (bindings.cpp converts
// fp16 and bf16); the sigmoid is recomputed in double.
#include "../llama_fast.h"

#include <cmath>

namespace llama_fast {

void swiglu_backward_cpu(const float* dy, int64_t dy_row_stride, const float* gate, int64_t gate_row_stride,
                         const float* up, int64_t up_row_stride, float* dgate, int64_t dgate_row_stride,
                         float* dup, int64_t dup_row_stride, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* dy_row = dy + r * dy_row_stride;
    const float* g_row = gate + r * gate_row_stride;
    const float* u_row = up + r * up_row_stride;
    for (int64_t c = 0; c < cols; ++c) {
      const double g = g_row[c], u = u_row[c], d = dy_row[c];
      const double s = 1.0 / (1.0 + std::exp(-g));
      dgate[r * dgate_row_stride + c] = static_cast<float>(d * u * s * (1.0 + g * (1.0 - s)));
      dup[r * dup_row_stride + c] = static_cast<float>(d * g * s);
    }
  }
}

}  // namespace llama_fast
