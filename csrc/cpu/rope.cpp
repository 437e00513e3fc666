// RoPE backward on the CPU: the same op as cuda/rope.cu (rotation by -theta, half-split
// convention), for machines without a GPU and as a second implementation to test against.
// Layout: grad and out contiguous fp32 [batch, seq, heads, head_dim] (bindings.cpp converts dtypes
// and strides); cos, sin fp32 [>= seq, head_dim / 2] with row stride table_row_stride. fp32 math.
#include "../llama_fast.h"

namespace llama_fast {

void rope_backward_cpu(const float* grad, float* out, const float* cos, const float* sin, int64_t table_row_stride,
                       int64_t batch, int64_t seq, int64_t heads, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t s = 0; s < seq; ++s) {
      const float* c = cos + s * table_row_stride;
      const float* sn = sin + s * table_row_stride;
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t base = ((b * seq + s) * heads + h) * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float d1 = grad[base + i], d2 = grad[base + half + i];
          out[base + i] = d1 * c[i] + d2 * sn[i];
          out[base + half + i] = d2 * c[i] - d1 * sn[i];
        }
      }
    }
  }
}

}  // namespace llama_fast
