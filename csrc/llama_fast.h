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

// ---------------------------------------------------------------------------------------------
// SwiGLU backward.   y = silu(gate) * up,  s = sigmoid(gate)   (s recomputed, not saved)
//   dgate = dy * up * s * (1 + gate * (1 - s))
//   dup   = dy * gate * s
// dy, gate, up: [rows, cols] in `dtype` with row strides (gate and up may be the two halves of one
// fused [rows, 2 * cols] GEMM output); dgate, dup: [rows, cols] contiguous in `dtype`.
// ---------------------------------------------------------------------------------------------
struct SwigluBackwardArgs {
  DType dtype;
  const void* dy;   int64_t dy_row_stride;
  const void* gate; int64_t gate_row_stride;
  const void* up;   int64_t up_row_stride;
  void* dgate;      int64_t dgate_row_stride;
  void* dup;        int64_t dup_row_stride;
  int64_t rows, cols;
};

// CPU: fp32 only (the binding converts).
void swiglu_backward_cpu(const float* dy, int64_t dy_row_stride, const float* gate, int64_t gate_row_stride,
                         const float* up, int64_t up_row_stride, float* dgate, int64_t dgate_row_stride,
                         float* dup, int64_t dup_row_stride, int64_t rows, int64_t cols);

// CUDA: returns 0 or a cudaError_t value.
int swiglu_backward_cuda(const SwigluBackwardArgs& args, void* stream);

// ---------------------------------------------------------------------------------------------
// RoPE backward (half-split convention). The forward rotates each head vector x at position p by
// +theta: out1 = x1 c - x2 s, out2 = x2 c + x1 s (x1, x2 the two halves, c = cos[p], s = sin[p]);
// the gradient is the rotation by -theta:
//   dx1 = d1 c + d2 s,   dx2 = d2 c - d1 s
// dq: [batch, seq, q_heads, head_dim], dk: [batch, seq, k_heads, head_dim], both in `dtype` with
// arbitrary element strides (b, s, h, d); dq_out, dk_out: contiguous in `dtype`;
// cos, sin: fp32 [>= seq, head_dim / 2] with contiguous columns and row stride table_row_stride.
// ---------------------------------------------------------------------------------------------
struct RopeBackwardArgs {
  DType dtype;
  const void* dq; int64_t dq_stride[4];
  const void* dk; int64_t dk_stride[4];
  void* dq_out;
  void* dk_out;
  const float* cos;
  const float* sin;
  int64_t table_row_stride;
  int64_t batch, seq, q_heads, k_heads, head_dim;
};

// CPU: fp32, contiguous grad [batch, seq, heads, head_dim] -> contiguous out; called per tensor.
void rope_backward_cpu(const float* grad, float* out, const float* cos, const float* sin, int64_t table_row_stride,
                       int64_t batch, int64_t seq, int64_t heads, int64_t head_dim);

// CUDA: dq and dk in one launch. Returns 0 or a cudaError_t value.
int rope_backward_cuda(const RopeBackwardArgs& args, void* stream);
// Attention backward (RoPE fused; issue 4).   Forward: S = rot(q) rot(k)^T * scale (causal: -inf
// above the diagonal), O = softmax(S) v, scale = 1/sqrt(D); saved row statistics (issue 13 item 6,
// the row-statistics contract): with S2 = S * log2(e) as an fp32 number formed by the forward's arithmetic,
// stats[0] = m2 = max_j S2 and stats[1] = log2l = log2(sum_j exp2(S2 - m2)), fp32 [2, B, Hq, S].
// rot is the half-split rotation x -> [x1 c - x2 s, x2 c + x1 s] with c = cos[pos], s = sin[pos]
// (on the GPU rounded as fma(x1, c, -rn(x2 s)), fma(x2, c, rn(x1 s)) by the Triton forward and the CUDA
// backwards alike: csrc/cuda/common.cuh rotate_pair).
//   P = exp2((S2 - m2) - log2l) (m2 first: exact near the row max; never m2 + log2l in one number),
//   delta = rowsum(dO * O) (CUDA; the CPU backward takes sum_j P dP of its own P and dP, O unread),
//   dV = P^T dO, dP = dO V^T, dS = P * (dP - delta)
//   dQ = rot^-1(dS rot(K) * scale), dK = rot^-1(dS^T rot(Q) * scale)   (rot^-1: rotation by -theta)
// dK and dV are summed over the Hq / Hkv query heads of a kv head (grouped-query attention).
// q, dout, out: [B, S, Hq, D]; k, v: [B, S, Hkv, D]; stats: fp32 [2, B, Hq, S] contiguous;
// cos, sin: fp32 [>= S, D / 2] with row stride cs_stride and contiguous columns.
// ---------------------------------------------------------------------------------------------
struct AttentionBackwardArgs {
  DType dtype;  // of dout, q, k, v, out, dq, dk, dv: F16 or BF16 on CUDA
  // Inputs with element strides along [batch, seq, head, head_dim]; the last stride must be 1.
  const void* dout; int64_t dout_stride[4];
  const void* q;    int64_t q_stride[4];
  const void* k;    int64_t k_stride[4];
  const void* v;    int64_t v_stride[4];
  const void* out;  int64_t out_stride[4];
  const float* stats;  // [2, B, Hq, S]: m2 at stats[(b * Hq + h) * S + i], log2l B * Hq * S floats later
  const float* cos; const float* sin; int64_t cs_stride;
  // Outputs, contiguous: dq [B, S, Hq, D], dk and dv [B, S, Hkv, D].
  void* dq; void* dk; void* dv;
  int64_t batch, seq_len, num_heads, num_kv_heads, head_dim;
  bool causal;
  // true: dQ from its own kernel (no atomics), bitwise reproducible; false: dQ accumulated with
  // fp32 atomics in the key-block kernel (one fewer recomputation of S and dP, order-dependent).
  bool deterministic;
  // Packed documents (issue 15): nullptr (one sequence per batch row, as before, at no cost), or both
  // set, device int32 [S] with batch 1 and causal: token t's document is doc_start[t] .. doc_end[t] - 1
  // (both non-decreasing, and one partition: every token of a document has its two bounds; the CPU op
  // checks this, the CUDA one cannot without a sync), and key j is visible to query i iff
  // doc_start[i] <= j <= i. All documents
  // run in one launch; a query block loads only key blocks from its first query's document start to the
  // diagonal, a key block only query blocks from its diagonal to its last key's document end; blocks
  // inside one document and below the diagonal run unmasked. Only the sm_80 kernel takes them (the
  // sm_90 one does not: the launcher in bindings.cpp runs sm_80 when documents are given).
  const int32_t* doc_start = nullptr;
  const int32_t* doc_end = nullptr;
};

// CUDA workspace: fp32 elements the launcher needs in `workspace` (16-byte aligned): delta, m2 and
// log2l per query row, rot(q) and rot(k) in the input dtype, and the fp32 dQ accumulator
// when not deterministic.
int64_t attention_backward_cuda_workspace(const AttentionBackwardArgs& args);
// CUDA: head_dim even and <= 256. Returns 0 or a cudaError_t value.
int attention_backward_cuda(const AttentionBackwardArgs& args, float* workspace, void* stream);

// CUDA, Hopper (sm_90a, csrc/cuda/attention_backward_sm90.cu; issue 18), opt-in: the same backward
// from the saved row statistics `stats` (fp32 [2, B, Hq, S]: m2, the row max of the scores in base-2
// units, and log2 of the row sum) instead of the LSE. supported: head dims 64 and 128, fp16 / bf16.
// Returns cudaErrorNotSupported (nothing launched) where a tensor cannot be a TMA tensor map (16-byte
// aligned base and strides); callers then run attention_backward_cuda.
bool attention_backward_sm90_supported(const AttentionBackwardArgs& args);
// Whether the current device is sm_90 and this build holds the kernel's sm_90a code (probed once per device).
bool attention_backward_sm90_available();
int64_t attention_backward_sm90_workspace(const AttentionBackwardArgs& args);
int attention_backward_sm90(const AttentionBackwardArgs& args, const float* stats, float* workspace, void* stream);

// CPU: fp32, every tensor contiguous ([B, S, H, D] and stats [2, B, Hq, S]); cos / sin rows cs_stride
// apart; `input`: the dtype q and k came in (the scores round rot(q), rot(k) to it, as the forward).
// Accumulates in double, in a fixed order: deterministic. `out` is not read (may be nullptr): delta is
// sum_j P dP of the row's own values. doc_start: nullptr, or packed documents
// (int32 [S], batch 1, causal; see AttentionBackwardArgs): row i sums over keys doc_start[i] .. i.
void attention_backward_cpu(const float* dout, const float* q, const float* k, const float* v, const float* out,
                            const float* stats, const float* cos, const float* sin, int64_t cs_stride, float* dq,
                            float* dk, float* dv, int64_t batch, int64_t seq_len, int64_t num_heads,
                            int64_t num_kv_heads, int64_t head_dim, bool causal, DType input,
                            const int32_t* doc_start = nullptr);

}  // namespace llama_fast
