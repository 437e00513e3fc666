// Attention backward (RoPE fused) on the CPU: the same op as cuda/attention_backward.cu, for
// machines without a GPU and as a second, simple implementation to test against.
//
// Layout: every tensor contiguous; dout, q, out, dq [B, S, Hq, D]; k, v, dk, dv [B, S, Hkv, D];
// stats fp32 [2, B, Hq, S] (m2, then log2l; csrc/llama_fast.h); cos / sin fp32 rows of D / 2, cs_stride apart.
// dtypes: fp32 in and out (bindings.cpp converts fp16 and bf16; `input` names the dtype they came in).
// P = exp2((S2 - m2) - log2l) with S2 formed as the CPU forward forms it (llama_fast.ops.attention
// _scores2): rotation in fp32 (no fused multiply-add), rounded to the input dtype, the dot of those
// values summed in double and rounded to fp32, times the fp32 scale * log2(e). Bitwise that forward's
// S2 (but where two double sums straddle an fp32 rounding boundary), so S2 - m2 is exact near the row
// max however large the scores. The rest (dP, dS, the accumulations) in double from double
// rotations; one query row at a time in a fixed order, so deterministic. delta = sum_j P dP of the
// row's own P and dP (O, `out`, is not read): dP - delta cancels as eager's does on near one-hot rows.
// Packed documents (doc_start, int32 [S], B = 1, causal): row i sums over keys doc_start[i] .. i only,
// all documents in one call.
// Math: see llama_fast.h (dQ, dK rotated back by -theta).
#include "../llama_fast.h"

#include <algorithm>
#include <cfloat>
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

// x rounded to nearest-even with `bits` significant bits and the quantum at least 2^min_exp, then
// overflowing past `max_finite` to infinity: fp16 (11, -24, 65504) and bf16 (8, -133, FLT_MAX) as
// torch's .to() rounds.
float round_to(float x, int bits, int min_exp, float max_finite) {
  if (!std::isfinite(x) || x == 0.f) return x;
  int e = 0;
  std::frexp(x, &e);  // |x| in [2^(e-1), 2^e)
  const int q = std::max(e - bits, min_exp);
  const double r = std::ldexp(std::nearbyint(std::ldexp(double(x), -q)), q);
  if (std::fabs(r) > double(max_finite)) return x > 0 ? INFINITY : -INFINITY;
  return float(r);
}

float round_to_dtype(float x, DType input) {
  if (input == DType::F16) return round_to(x, 11, -24, 65504.f);
  if (input == DType::BF16) return round_to(x, 8, -133, FLT_MAX);
  return x;
}

// The rotated rows of one head as the forward multiplies them ([S, D] floats): x1 * c - x2 * s and
// x2 * c + x1 * s in fp32, each product rounded before the sum (volatile: no fused multiply-add,
// whatever the compiler's contraction setting), then rounded to the input dtype.
void rotate_head_f32(const float* x, int64_t row_stride, const float* cos, const float* sin, int64_t cs_stride,
                     int64_t seq_len, int64_t head_dim, DType input, std::vector<float>& out) {
  const int64_t half = head_dim / 2;
  for (int64_t s = 0; s < seq_len; ++s) {
    const float* row = x + s * row_stride;
    float* o = out.data() + s * head_dim;
    for (int64_t d = 0; d < half; ++d) {
      const float c = cos[s * cs_stride + d], sn = sin[s * cs_stride + d];
      volatile float a = row[d] * c, b = row[d + half] * sn, e = row[d + half] * c, f = row[d] * sn;
      o[d] = round_to_dtype(a - b, input);
      o[d + half] = round_to_dtype(e + f, input);
    }
  }
}

}  // namespace

void attention_backward_cpu(const float* dout, const float* q, const float* k, const float* v, const float* out,
                            const float* stats, const float* cos, const float* sin, int64_t cs_stride, float* dq,
                            float* dk, float* dv, int64_t batch, int64_t seq_len, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, bool causal, DType input,
                            const int32_t* doc_start) {
  const int64_t S = seq_len, D = head_dim, group = num_heads / num_kv_heads;
  (void)out;  // delta comes from P and dP (above); the op's signature keeps O for the CUDA backwards
  const int64_t q_row = num_heads * D, kv_row = num_kv_heads * D;  // sequence strides
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const float qk_scale = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(D)));
  const int64_t stats_half = batch * num_heads * S;  // log2l starts here
  const size_t n = static_cast<size_t>(S * D);
  std::vector<double> qr(n), kr(n), dqr(n), dkr(n), dv_acc(n);
  std::vector<float> qf(n), kf(n);  // the forward's score operands
  std::vector<double> p_row(static_cast<size_t>(S)), dp_row(static_cast<size_t>(S));  // one query row's P, dP

  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t hk = 0; hk < num_kv_heads; ++hk) {
      const int64_t kv_off = b * S * kv_row + hk * D;
      rotate_head(k + kv_off, kv_row, cos, sin, cs_stride, S, D, kr);
      rotate_head_f32(k + kv_off, kv_row, cos, sin, cs_stride, S, D, input, kf);
      std::fill(dkr.begin(), dkr.end(), 0.0);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.0);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        const int64_t q_off = b * S * q_row + h * D;
        rotate_head(q + q_off, q_row, cos, sin, cs_stride, S, D, qr);
        rotate_head_f32(q + q_off, q_row, cos, sin, cs_stride, S, D, input, qf);
        std::fill(dqr.begin(), dqr.end(), 0.0);
        const float* m2_row = stats + (b * num_heads + h) * S;
        const float* log2l_row = m2_row + stats_half;
        for (int64_t i = 0; i < S; ++i) {
          const float* do_i = dout + q_off + i * q_row;
          const double* q_i = qr.data() + i * D;
          const float* qf_i = qf.data() + i * D;
          // Packed documents (B = 1, causal): keys doc_start[i] .. i; keys of other documents never
          // enter the sums, so one document's inputs cannot reach another's gradients.
          const int64_t first = doc_start != nullptr ? doc_start[i] : 0;
          const int64_t last = causal ? i : S - 1;
          // P and dP of the row first, then delta = sum_j P dP from those very values (not
          // rowsum(dO * O): O is the forward's, rounded, and its scores were not this S2), so that
          // dP - delta cancels as eager's softmax backward does on near one-hot rows (issue 13 item 6).
          double delta = 0.0;
          for (int64_t j = first; j <= last; ++j) {
            const float* kf_j = kf.data() + j * D;
            const float* v_j = v + kv_off + j * kv_row;
            double s = 0.0, dp = 0.0;
            for (int64_t d = 0; d < D; ++d) {
              s += double(qf_i[d]) * double(kf_j[d]);  // exact products
              dp += double(do_i[d]) * v_j[d];
            }
            volatile float s2 = static_cast<float>(s) * qk_scale;  // one fp32 product, as the forward
            volatile float centered = s2 - m2_row[i];              // exact near the row max
            p_row[j] = std::exp2(double(centered) - double(log2l_row[i]));
            dp_row[j] = dp;
            delta += p_row[j] * dp;
          }
          for (int64_t j = first; j <= last; ++j) {
            const double* k_j = kr.data() + j * D;
            const double pij = p_row[j];
            const double ds = pij * (dp_row[j] - delta) * scale;
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
