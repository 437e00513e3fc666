// Attention backward (RoPE fused) on the CPU: the same op as cuda/attention_backward.cu, for
// machines without a GPU and as a second, simple implementation to test against.
//
// Layout: every tensor contiguous; dout, q, out, dq [B, S, Hq, D]; k, v, dk, dv [B, S, Hkv, D];
// lse fp32 [B, Hq, S]; cos / sin fp32 rows of D / 2, cs_stride apart.
// dtypes: fp32 in and out (bindings.cpp converts fp16 and bf16). Rotations, scores, probabilities
// and every accumulation in double; one query row at a time in a fixed order, so deterministic.
// Math: see llama_fast.h (P recomputed from the saved LSE; dQ, dK rotated back by -theta).
#include "../llama_fast.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace llama_fast {
namespace {

// Rotates the S rows of one head (row stride `row_stride`) into `out` ([S, D] doubles).
void rotate_head(const float* x, int64_t row_stride, const float* cos, const float* sin, int64_t cs_stride,
                 int64_t seq_len, int64_t head_dim, std::vector<double>& out) {
  const int64_t half = head_dim / 2;
  for (int64_t s = 0; s < seq_len; ++s) {
    const float* row = x + s * row_stride;
    double* o = out.data() + s * head_dim;
    for (int64_t d = 0; d < half; ++d) {
      const double c = cos[s * cs_stride + d], sn = sin[s * cs_stride + d];
      o[d] = row[d] * c - row[d + half] * sn;
      o[d + half] = row[d + half] * c + row[d] * sn;
    }
  }
}

// Writes the rotation by -theta of `grad` ([S, D] doubles) to rows of `x` (row stride `row_stride`).
void unrotate_head(const std::vector<double>& grad, const float* cos, const float* sin, int64_t cs_stride,
                   int64_t seq_len, int64_t head_dim, float* x, int64_t row_stride) {
  const int64_t half = head_dim / 2;
  for (int64_t s = 0; s < seq_len; ++s) {
    const double* g = grad.data() + s * head_dim;
    float* row = x + s * row_stride;
    for (int64_t d = 0; d < half; ++d) {
      const double c = cos[s * cs_stride + d], sn = sin[s * cs_stride + d];
      row[d] = static_cast<float>(g[d] * c + g[d + half] * sn);
      row[d + half] = static_cast<float>(g[d + half] * c - g[d] * sn);
    }
  }
}

}  // namespace

void attention_backward_cpu(const float* dout, const float* q, const float* k, const float* v, const float* out,
                            const float* lse, const float* cos, const float* sin, int64_t cs_stride, float* dq,
                            float* dk, float* dv, int64_t batch, int64_t seq_len, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, bool causal) {
  const int64_t S = seq_len, D = head_dim, group = num_heads / num_kv_heads;
  const int64_t q_row = num_heads * D, kv_row = num_kv_heads * D;  // sequence strides
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const size_t n = static_cast<size_t>(S * D);
  std::vector<double> qr(n), kr(n), dqr(n), dkr(n), dv_acc(n);

  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t hk = 0; hk < num_kv_heads; ++hk) {
      const int64_t kv_off = b * S * kv_row + hk * D;
      rotate_head(k + kv_off, kv_row, cos, sin, cs_stride, S, D, kr);
      std::fill(dkr.begin(), dkr.end(), 0.0);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.0);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        const int64_t q_off = b * S * q_row + h * D;
        rotate_head(q + q_off, q_row, cos, sin, cs_stride, S, D, qr);
        std::fill(dqr.begin(), dqr.end(), 0.0);
        const float* lse_row = lse + (b * num_heads + h) * S;
        for (int64_t i = 0; i < S; ++i) {
          const float* do_i = dout + q_off + i * q_row;
          const float* o_i = out + q_off + i * q_row;
          const double* q_i = qr.data() + i * D;
          double delta = 0.0;
          for (int64_t d = 0; d < D; ++d) delta += double(do_i[d]) * o_i[d];
          const int64_t last = causal ? i : S - 1;
          for (int64_t j = 0; j <= last; ++j) {
            const double* k_j = kr.data() + j * D;
            const float* v_j = v + kv_off + j * kv_row;
            double s = 0.0, dp = 0.0;
            for (int64_t d = 0; d < D; ++d) {
              s += q_i[d] * k_j[d];
              dp += double(do_i[d]) * v_j[d];
            }
            const double pij = std::exp(s * scale - double(lse_row[i]));
            const double ds = pij * (dp - delta) * scale;
            double* dq_i = dqr.data() + i * D;
            double* dk_j = dkr.data() + j * D;
            double* dv_j = dv_acc.data() + j * D;
            for (int64_t d = 0; d < D; ++d) {
              dq_i[d] += ds * k_j[d];
              dk_j[d] += ds * q_i[d];
              dv_j[d] += pij * do_i[d];
            }
          }
        }
        unrotate_head(dqr, cos, sin, cs_stride, S, D, dq + q_off, q_row);
      }
      unrotate_head(dkr, cos, sin, cs_stride, S, D, dk + kv_off, kv_row);
      for (int64_t s = 0; s < S; ++s)
        for (int64_t d = 0; d < D; ++d) dv[kv_off + s * kv_row + d] = static_cast<float>(dv_acc[s * D + d]);
    }
  }
}

}  // namespace llama_fast
