// RMSNorm backward on the CPU: the same op as cuda/rms_norm.cu, for machines without a GPU and as
// a second, simple implementation to test against. fp32 in and out (bindings.cpp converts fp16 and
// bf16); double accumulation for the row dot product; dw summed in row order, so deterministic.
#include "../llama_fast.h"

#include <cstddef>
#include <vector>

namespace llama_fast {

void rms_norm_backward_cpu(const float* dy, int64_t dy_row_stride, const float* x, int64_t x_row_stride,
                           const float* w, const float* rstd, const float* dresidual, float* dx, float* dw,
                           int64_t rows, int64_t cols) {
  std::vector<double> dw_acc(static_cast<size_t>(cols), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* dy_row = dy + r * dy_row_stride;
    const float* x_row = x + r * x_row_stride;
    const double rs = rstd[r];
    double dot = 0.0;  // sum(dy * w * x_hat)
    for (int64_t c = 0; c < cols; ++c) dot += double(dy_row[c]) * w[c] * (x_row[c] * rs);
    const double mean = dot / double(cols);
    float* dx_row = dx + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      const double x_hat = x_row[c] * rs;
      double g = double(dy_row[c]) * w[c];
      double v = rs * (g - x_hat * mean);
      if (dresidual) v += dresidual[r * cols + c];
      dx_row[c] = static_cast<float>(v);
      dw_acc[c] += double(dy_row[c]) * x_hat;
    }
  }
  for (int64_t c = 0; c < cols; ++c) dw[c] = static_cast<float>(dw_acc[c]);
}

}  // namespace llama_fast
