// Torch glue for the llama_fast kernels: input checks with clear messages, dtype dispatch,
// and registration as torch.ops.llama_fast.* for the CPU and CUDA dispatch keys. The fake (shape-only)
// implementations that torch.compile traces with are registered in Python, in llama_fast/_extension.py.
// The kernels themselves live in cuda/*.cu and cpu/*.cpp behind llama_fast.h and know nothing of torch.
#include <torch/extension.h>
#include <cstdlib>
#include <string>
#include <torch/library.h>

#ifdef LLAMA_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "llama_fast.h"

namespace llama_fast {
namespace {

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default:
      TORCH_CHECK(false, "llama_fast: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::F32;
}

void check_same_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "llama_fast: ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

void check_same_shape_dtype(const at::Tensor& ref, const char* ref_name, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "llama_fast: ", name, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "llama_fast: ", name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
  check_same_device(ref, ref_name, t, name);
}

// A [rows, cols] view with contiguous columns (one row stride); copies only when no such view exists.
at::Tensor as_rows(const at::Tensor& t) {
  const int64_t cols = t.size(-1);
  at::Tensor r = t.reshape({-1, cols});
  return r.stride(1) == 1 ? r : r.contiguous();
}

#ifdef LLAMA_FAST_WITH_CUDA
void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, "llama_fast: ", what, " failed to launch: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}
int num_sms(const at::Tensor& t) {
  return at::cuda::getDeviceProperties(t.device().index())->multiProcessorCount;
}
#endif

// ------------------------------------------------------------------------------------------------
// rms_norm_backward(dy, x, weight, rstd, dresidual=None) -> (dx, dw)
// ------------------------------------------------------------------------------------------------
void check_rms_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& rstd, const std::optional<at::Tensor>& dresidual) {
  dtype_of(x, "x");
  TORCH_CHECK(x.dim() >= 1, "llama_fast: x must have at least one dimension, got a scalar");
  check_same_shape_dtype(x, "x", dy, "dy");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "llama_fast: weight must be 1-D of size ",
              x.size(-1), " (the last dim of x), got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
              "llama_fast: weight must be float32 or the dtype of x (", x.scalar_type(), "), got ",
              weight.scalar_type());
  check_same_device(x, "x", weight, "weight");
  const int64_t rows = x.numel() / std::max<int64_t>(x.size(-1), 1);
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows, "llama_fast: rstd must be float32 with ",
              rows, " elements (one per row of x), got ", rstd.scalar_type(), " with ", rstd.numel());
  check_same_device(x, "x", rstd, "rstd");
  if (dresidual) check_same_shape_dtype(x, "x", *dresidual, "dresidual");
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu_impl(const at::Tensor& dy, const at::Tensor& x,
                                                              const at::Tensor& weight, const at::Tensor& rstd,
                                                              const std::optional<at::Tensor>& dresidual) {
  check_rms_norm_backward(dy, x, weight, rstd, dresidual);
  const int64_t cols = x.size(-1);
  at::Tensor x2 = as_rows(x).to(at::kFloat), dy2 = as_rows(dy).to(at::kFloat);
  at::Tensor w = weight.to(at::kFloat).contiguous(), rs = rstd.contiguous();
  at::Tensor dres = dresidual ? as_rows(*dresidual).to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor dx = at::empty({x2.size(0), cols}, x2.options());
  at::Tensor dw = at::empty({cols}, w.options());
  rms_norm_backward_cpu(dy2.data_ptr<float>(), dy2.stride(0), x2.data_ptr<float>(), x2.stride(0),
                        w.data_ptr<float>(), rs.data_ptr<float>(), dres.defined() ? dres.data_ptr<float>() : nullptr,
                        dx.data_ptr<float>(), dw.data_ptr<float>(), x2.size(0), cols);
  return {dx.to(x.scalar_type()).view(x.sizes()), dw.to(weight.scalar_type())};
}

#ifdef LLAMA_FAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda_impl(const at::Tensor& dy, const at::Tensor& x,
                                                               const at::Tensor& weight, const at::Tensor& rstd,
                                                               const std::optional<at::Tensor>& dresidual) {
  check_rms_norm_backward(dy, x, weight, rstd, dresidual);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t cols = x.size(-1);
  at::Tensor x2 = as_rows(x), dy2 = as_rows(dy);
  at::Tensor w = weight.contiguous(), rs = rstd.contiguous();
  at::Tensor dres = dresidual ? dresidual->contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor dw = at::empty_like(w);
  const int64_t rows = x2.size(0);
  const int num_partials = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, 2 * num_sms(x))));
  at::Tensor partials = at::empty({num_partials, cols}, x.options().dtype(at::kFloat));
  RmsNormBackwardArgs args{dtype_of(x, "x"), dtype_of(weight, "weight"),
                           dy2.data_ptr(), dy2.stride(0), x2.data_ptr(), x2.stride(0), w.data_ptr(),
                           rs.data_ptr<float>(), dres.defined() ? dres.data_ptr() : nullptr,
                           dx.data_ptr(), dw.data_ptr(), rows, cols};
  check_cuda(rms_norm_backward_cuda(args, partials.data_ptr<float>(), num_partials,
                                    at::cuda::getCurrentCUDAStream().stream()),
             "rms_norm_backward");
  return {dx, dw};
}
#endif

// --- elementwise ops (issue 3): swiglu_backward, rope_backward ---
// ------------------------------------------------------------------------------------------------
// swiglu_backward(dy, gate, up) -> (dgate, dup)
// ------------------------------------------------------------------------------------------------
void check_swiglu_backward(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up) {
  dtype_of(gate, "gate");
  TORCH_CHECK(gate.dim() >= 1, "llama_fast: gate must have at least one dimension, got a scalar");
  check_same_shape_dtype(gate, "gate", up, "up");
  check_same_shape_dtype(gate, "gate", dy, "dy");
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu_impl(const at::Tensor& dy, const at::Tensor& gate,
                                                            const at::Tensor& up) {
  check_swiglu_backward(dy, gate, up);
  at::Tensor d = as_rows(dy).to(at::kFloat), g = as_rows(gate).to(at::kFloat), u = as_rows(up).to(at::kFloat);
  at::Tensor dgate = at::empty({g.size(0), g.size(1)}, g.options());
  at::Tensor dup = at::empty_like(dgate);
  swiglu_backward_cpu(d.data_ptr<float>(), d.stride(0), g.data_ptr<float>(), g.stride(0), u.data_ptr<float>(),
                      u.stride(0), dgate.data_ptr<float>(), g.size(1), dup.data_ptr<float>(), g.size(1), g.size(0),
                      g.size(1));
  return {dgate.to(gate.scalar_type()).view(gate.sizes()), dup.to(gate.scalar_type()).view(gate.sizes())};
}

// swiglu_packed_backward(dy, gate_up) -> d(gate_up): gate_up is [..., 2F] = [gate | up] (one GEMM's
// output); the gradient is written as one [..., 2F] tensor, so nothing concatenates dgate and dup.
void check_swiglu_packed_backward(const at::Tensor& dy, const at::Tensor& gate_up) {
  dtype_of(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "llama_fast: gate_up must have an even last dim (2F = [gate | up]), got shape ", gate_up.sizes());
  std::vector<int64_t> expected = gate_up.sizes().vec();
  expected.back() /= 2;
  TORCH_CHECK(dy.sizes() == at::IntArrayRef(expected), "llama_fast: dy must have shape ", at::IntArrayRef(expected),
              " (gate_up with its last dim halved), got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == gate_up.scalar_type(), "llama_fast: dy must have the dtype of gate_up (",
              gate_up.scalar_type(), "), got ", dy.scalar_type());
  check_same_device(gate_up, "gate_up", dy, "dy");
}

at::Tensor swiglu_packed_backward_cpu_impl(const at::Tensor& dy, const at::Tensor& gate_up) {
  check_swiglu_packed_backward(dy, gate_up);
  at::Tensor d = as_rows(dy).to(at::kFloat), gu = as_rows(gate_up).to(at::kFloat);  // (rows, F), (rows, 2F)
  const int64_t rows = gu.size(0), cols = gu.size(1) / 2;
  at::Tensor dgu = at::empty({rows, 2 * cols}, gu.options());
  float* out = dgu.data_ptr<float>();
  swiglu_backward_cpu(d.data_ptr<float>(), d.stride(0), gu.data_ptr<float>(), gu.stride(0),
                      gu.data_ptr<float>() + cols, gu.stride(0), out, 2 * cols, out + cols, 2 * cols, rows, cols);
  return dgu.to(gate_up.scalar_type()).view(gate_up.sizes());
}

#ifdef LLAMA_FAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda_impl(const at::Tensor& dy, const at::Tensor& gate,
                                                             const at::Tensor& up) {
  check_swiglu_backward(dy, gate, up);
  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor d = as_rows(dy), g = as_rows(gate), u = as_rows(up);  // (rows, cols), row strides kept
  at::Tensor dgate = at::empty_like(gate, at::MemoryFormat::Contiguous);
  at::Tensor dup = at::empty_like(gate, at::MemoryFormat::Contiguous);
  SwigluBackwardArgs args{dtype_of(gate, "gate"), d.data_ptr(), d.stride(0), g.data_ptr(), g.stride(0),
                          u.data_ptr(), u.stride(0), dgate.data_ptr(), g.size(1), dup.data_ptr(), g.size(1),
                          g.size(0), g.size(1)};
  check_cuda(swiglu_backward_cuda(args, at::cuda::getCurrentCUDAStream().stream()), "swiglu_backward");
  return {dgate, dup};
}

at::Tensor swiglu_packed_backward_cuda_impl(const at::Tensor& dy, const at::Tensor& gate_up) {
  check_swiglu_packed_backward(dy, gate_up);
  const c10::cuda::CUDAGuard guard(gate_up.device());
  at::Tensor d = as_rows(dy), gu = as_rows(gate_up);  // (rows, F), (rows, 2F), row strides kept
  const int64_t rows = gu.size(0), cols = gu.size(1) / 2;
  at::Tensor dgu = at::empty({rows, 2 * cols}, gu.options());
  const int64_t half_bytes = cols * gu.element_size();
  auto* in = static_cast<char*>(gu.data_ptr());
  auto* out = static_cast<char*>(dgu.data_ptr());
  SwigluBackwardArgs args{dtype_of(gate_up, "gate_up"), d.data_ptr(), d.stride(0), in, gu.stride(0),
                          in + half_bytes, gu.stride(0), out, 2 * cols, out + half_bytes, 2 * cols, rows, cols};
  check_cuda(swiglu_backward_cuda(args, at::cuda::getCurrentCUDAStream().stream()), "swiglu_packed_backward");
  return dgu.view(gate_up.sizes());
}
#endif

// ------------------------------------------------------------------------------------------------
// rope_backward(dq, dk, cos, sin) -> (dq rotated back, dk rotated back), positions 0..S-1
// ------------------------------------------------------------------------------------------------
void check_rope_backward(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& cos, const at::Tensor& sin) {
  dtype_of(dq, "dq");
  TORCH_CHECK(dq.dim() == 4, "llama_fast: dq must be 4-D [B, S, Hq, D], got shape ", dq.sizes());
  TORCH_CHECK(dk.dim() == 4 && dk.size(0) == dq.size(0) && dk.size(1) == dq.size(1) && dk.size(3) == dq.size(3),
              "llama_fast: dk must be [B, S, Hkv, D] with B, S, D of dq ", dq.sizes(), ", got shape ", dk.sizes());
  TORCH_CHECK(dk.scalar_type() == dq.scalar_type(), "llama_fast: dk must have the dtype of dq (", dq.scalar_type(),
              "), got ", dk.scalar_type());
  check_same_device(dq, "dq", dk, "dk");
  TORCH_CHECK(dq.size(3) % 2 == 0, "llama_fast: the head dim of dq must be even, got ", dq.size(3));
  auto check_table = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, "llama_fast: ", name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(1) == dq.size(3) / 2 && t.size(0) >= dq.size(1), "llama_fast: ", name,
                " must be [>= ", dq.size(1), ", ", dq.size(3) / 2, "] (seq len, head dim / 2), got shape ", t.sizes());
    check_same_device(dq, "dq", t, name);
  };
  check_table(cos, "cos");
  check_table(sin, "sin");
  TORCH_CHECK(sin.sizes() == cos.sizes(), "llama_fast: sin must have the shape of cos ", cos.sizes(), ", got ",
              sin.sizes());
}

// The first S rows of cos and sin with contiguous columns and one shared row stride.
std::pair<at::Tensor, at::Tensor> rope_tables(const at::Tensor& cos, const at::Tensor& sin, int64_t seq) {
  at::Tensor c = cos.narrow(0, 0, seq), s = sin.narrow(0, 0, seq);
  if (c.stride(1) != 1 || s.stride(1) != 1 || c.stride(0) != s.stride(0)) {
    c = c.contiguous();
    s = s.contiguous();
  }
  return {c, s};
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cpu_impl(const at::Tensor& dq, const at::Tensor& dk,
                                                          const at::Tensor& cos, const at::Tensor& sin) {
  check_rope_backward(dq, dk, cos, sin);
  auto [c, s] = rope_tables(cos, sin, dq.size(1));
  std::vector<at::Tensor> outs;
  for (const at::Tensor& grad : {dq, dk}) {
    at::Tensor g = grad.to(at::kFloat).contiguous();
    at::Tensor out = at::empty_like(g);
    rope_backward_cpu(g.data_ptr<float>(), out.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(),
                      c.stride(0), g.size(0), g.size(1), g.size(2), g.size(3));
    outs.push_back(out.to(grad.scalar_type()));
  }
  return {outs[0], outs[1]};
}

#ifdef LLAMA_FAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> rope_backward_cuda_impl(const at::Tensor& dq, const at::Tensor& dk,
                                                           const at::Tensor& cos, const at::Tensor& sin) {
  check_rope_backward(dq, dk, cos, sin);
  const c10::cuda::CUDAGuard guard(dq.device());
  auto [c, s] = rope_tables(cos, sin, dq.size(1));
  at::Tensor dq_out = at::empty_like(dq, at::MemoryFormat::Contiguous);
  at::Tensor dk_out = at::empty_like(dk, at::MemoryFormat::Contiguous);
  RopeBackwardArgs args{};
  args.dtype = dtype_of(dq, "dq");
  args.dq = dq.data_ptr();
  args.dk = dk.data_ptr();
  for (int d = 0; d < 4; ++d) {
    args.dq_stride[d] = dq.stride(d);
    args.dk_stride[d] = dk.stride(d);
  }
  args.dq_out = dq_out.data_ptr();
  args.dk_out = dk_out.data_ptr();
  args.cos = c.data_ptr<float>();
  args.sin = s.data_ptr<float>();
  args.table_row_stride = c.stride(0);
  args.batch = dq.size(0);
  args.seq = dq.size(1);
  args.q_heads = dq.size(2);
  args.k_heads = dk.size(2);
  args.head_dim = dq.size(3);
  check_cuda(rope_backward_cuda(args, at::cuda::getCurrentCUDAStream().stream()), "rope_backward");
  return {dq_out, dk_out};
}
#endif
// --- end elementwise ops ---

// ------------------------------------------------------------------------------------------------
// attention_backward(dout, q, k, v, out, stats, cos, sin, causal=True, deterministic=False,
//                    doc_start=None, doc_end=None)
//   -> (dq, dk, dv)          (issue 4: RoPE-fused flash attention; math in llama_fast.h)
// doc_start, doc_end: packed documents (issue 15), int32 [S] each, both or neither, with B = 1 and causal:
// token t's document is doc_start[t] .. doc_end[t] - 1 (llama_fast/ops/attention_varlen.py).
// ------------------------------------------------------------------------------------------------
void check_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& out, const at::Tensor& stats,
                              const at::Tensor& cos, const at::Tensor& sin) {
  dtype_of(q, "q");
  TORCH_CHECK(q.dim() == 4, "llama_fast: q must be 4-D [batch, seq, heads, head_dim], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "llama_fast: k must be 4-D [batch, seq, kv_heads, head_dim], got shape ", k.sizes());
  const int64_t B = q.size(0), S = q.size(1), Hq = q.size(2), D = q.size(3), Hkv = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == S && k.size(3) == D, "llama_fast: k must be [", B, ", ", S,
              ", kv_heads, ", D, "] to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "llama_fast: the query heads of q (", Hq,
              ") must be a multiple of the kv heads of k (", Hkv, ")");
  TORCH_CHECK(D > 0 && D % 2 == 0 && D <= 256, "llama_fast: head_dim must be even and at most 256, got ", D);
  for (auto [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "llama_fast: ", name, " must have the dtype of q (",
                q.scalar_type(), "), got ", t->scalar_type());
    check_same_device(q, "q", *t, name);
  }
  TORCH_CHECK(v.sizes() == k.sizes(), "llama_fast: v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  check_same_shape_dtype(q, "q", dout, "dout");
  check_same_shape_dtype(q, "q", out, "out");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 4 && stats.size(0) == 2 && stats.size(1) == B &&
                  stats.size(2) == Hq && stats.size(3) == S,
              "llama_fast: stats must be float32 [2, ", B, ", ", Hq, ", ", S,
              "] (row max m2 and log2 of the row sum per batch, head, query, as the forward saves them), got ",
              stats.scalar_type(), " ", stats.sizes());
  check_same_device(q, "q", stats, "stats");
  for (auto [t, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "llama_fast: ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 2 && t->size(0) >= S && t->size(1) == D / 2, "llama_fast: ", name, " must be [>= ", S,
                ", ", D / 2, "] (seq, head_dim / 2), got ", t->sizes());
    check_same_device(q, "q", *t, name);
  }
}

// Packed documents: both bounds or neither; int32 [S] on q's device, B = 1, causal. Returns whether given.
bool check_documents(const at::Tensor& q, bool causal, const std::optional<at::Tensor>& doc_start,
                     const std::optional<at::Tensor>& doc_end) {
  TORCH_CHECK(doc_start.has_value() == doc_end.has_value(),
              "llama_fast: doc_start and doc_end (packed documents) must be given together, got only ",
              doc_start.has_value() ? "doc_start" : "doc_end");
  if (!doc_start.has_value()) return false;
  TORCH_CHECK(causal, "llama_fast: packed documents (doc_start, doc_end) need causal=True");
  TORCH_CHECK(q.size(0) == 1, "llama_fast: packed documents (doc_start, doc_end) need batch 1 (q [1, T, Hq, D]), "
              "got q of shape ", q.sizes());
  for (auto [t, name] : {std::pair{&*doc_start, "doc_start"}, std::pair{&*doc_end, "doc_end"}}) {
    TORCH_CHECK(t->scalar_type() == at::kInt, "llama_fast: ", name, " must be int32, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == q.size(1), "llama_fast: ", name, " must be [", q.size(1),
                "] (one entry per token of q), got shape ", t->sizes());
    check_same_device(q, "q", *t, name);
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu_impl(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& stats, const at::Tensor& cos, const at::Tensor& sin, bool causal, bool deterministic,
    const std::optional<at::Tensor>& doc_start, const std::optional<at::Tensor>& doc_end) {
  (void)deterministic;  // the CPU kernel is always deterministic
  check_attention_backward(dout, q, k, v, out, stats, cos, sin);
  at::Tensor starts;
  if (check_documents(q, causal, doc_start, doc_end)) {
    // On the host the bounds cost nothing to check: each token's document holds it, and they do not decrease.
    starts = doc_start->contiguous();
    const at::Tensor ends = doc_end->contiguous();
    const int32_t* ds = starts.data_ptr<int32_t>();
    const int32_t* de = ends.data_ptr<int32_t>();
    for (int64_t t = 0; t < q.size(1); ++t) {
      TORCH_CHECK(ds[t] >= 0 && ds[t] <= t && t < de[t] && de[t] <= q.size(1),
                  "llama_fast: doc_start and doc_end must hold each token: need doc_start[t] <= t < doc_end[t] <= ",
                  q.size(1), ", got doc_start[", t, "] = ", ds[t], ", doc_end[", t, "] = ", de[t]);
      TORCH_CHECK(t == 0 || ds[t] >= ds[t - 1], "llama_fast: doc_start must not decrease, got doc_start[", t - 1,
                  "] = ", ds[t - 1], " then doc_start[", t, "] = ", ds[t]);
      TORCH_CHECK(t == 0 || de[t] >= de[t - 1], "llama_fast: doc_end must not decrease, got doc_end[", t - 1,
                  "] = ", de[t - 1], " then doc_end[", t, "] = ", de[t]);
    }
    // One partition: every token of a document has that document's two bounds (the kernels read doc_start
    // for queries and doc_end for keys, so bounds of two partitions would give inconsistent gradients).
    for (int64_t t = 0; t < q.size(1); ++t) {
      TORCH_CHECK(de[ds[t]] == de[t] && ds[de[t] - 1] == ds[t],
                  "llama_fast: doc_start and doc_end must describe the same documents: token ", t, " is in ",
                  ds[t], " .. ", de[t] - 1, " but doc_end[", ds[t], "] = ", de[ds[t]], " and doc_start[", de[t] - 1,
                  "] = ", ds[de[t] - 1]);
    }
  }
  auto f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  at::Tensor dout_f = f32(dout), q_f = f32(q), k_f = f32(k), v_f = f32(v);  // O is not read (delta from P dP)
  at::Tensor stats_c = stats.contiguous(), cos_c = cos.contiguous(), sin_c = sin.contiguous();
  at::Tensor dq = at::empty_like(q_f), dk = at::empty_like(k_f), dv = at::empty_like(v_f);
  attention_backward_cpu(dout_f.data_ptr<float>(), q_f.data_ptr<float>(), k_f.data_ptr<float>(),
                         v_f.data_ptr<float>(), nullptr, stats_c.data_ptr<float>(),
                         cos_c.data_ptr<float>(), sin_c.data_ptr<float>(), cos_c.stride(0), dq.data_ptr<float>(),
                         dk.data_ptr<float>(), dv.data_ptr<float>(), q.size(0), q.size(1), q.size(2), k.size(2),
                         q.size(3), causal, dtype_of(q, "q"),
                         starts.defined() ? starts.data_ptr<int32_t>() : nullptr);
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

#ifdef LLAMA_FAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda_impl(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& stats, const at::Tensor& cos, const at::Tensor& sin, bool causal, bool deterministic,
    const std::optional<at::Tensor>& doc_start, const std::optional<at::Tensor>& doc_end) {
  check_attention_backward(dout, q, k, v, out, stats, cos, sin);
  // On the device the bounds' values are not read back (that would synchronize); the kernels clamp the
  // block ranges they derive from them to the sequence, so bad values give wrong gradients, never stray reads.
  const bool documents = check_documents(q, causal, doc_start, doc_end);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "llama_fast: attention_backward on CUDA needs q, k, v in float16 or bfloat16, got ", q.scalar_type());
  const c10::cuda::CUDAGuard guard(q.device());
  // Rows may have any strides; the head dim must be contiguous (a copy only where it is not).
  auto last_contig = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  at::Tensor dout_c = last_contig(dout), q_c = last_contig(q), k_c = last_contig(k), v_c = last_contig(v),
             out_c = last_contig(out);
  at::Tensor stats_c = stats.contiguous(), cos_c = cos.stride(1) == 1 ? cos : cos.contiguous(),
             sin_c = sin.stride(1) == 1 ? sin : sin.contiguous();
  TORCH_CHECK(cos_c.stride(0) == sin_c.stride(0), "llama_fast: cos and sin must have the same row stride, got ",
              cos_c.stride(0), " and ", sin_c.stride(0));
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  AttentionBackwardArgs a{};
  a.dtype = dtype_of(q, "q");
  auto set = [](const at::Tensor& t, const void*& ptr, int64_t (&stride)[4]) {
    ptr = t.data_ptr();
    for (int i = 0; i < 4; ++i) stride[i] = t.stride(i);
  };
  set(dout_c, a.dout, a.dout_stride);
  set(q_c, a.q, a.q_stride);
  set(k_c, a.k, a.k_stride);
  set(v_c, a.v, a.v_stride);
  set(out_c, a.out, a.out_stride);
  a.stats = stats_c.data_ptr<float>();
  a.cos = cos_c.data_ptr<float>();
  a.sin = sin_c.data_ptr<float>();
  a.cs_stride = cos_c.stride(0);
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.batch = q.size(0);
  a.seq_len = q.size(1);
  a.num_heads = q.size(2);
  a.num_kv_heads = k.size(2);
  a.head_dim = q.size(3);
  a.causal = causal;
  a.deterministic = deterministic;
  at::Tensor starts, ends;
  if (documents) {
    starts = doc_start->contiguous();
    ends = doc_end->contiguous();
    a.doc_start = starts.data_ptr<int32_t>();
    a.doc_end = ends.data_ptr<int32_t>();
  }
  // Opt-in Hopper backward (issue 18): LLAMA_FAST_ATTENTION_BACKWARD=sm90 on an sm_90 device for head
  // dims 64 and 128; it answers cudaErrorNotSupported (nothing launched) elsewhere, and the sm_80
  // kernel below runs. It takes the forward's row statistics (m2, log2l) as they were saved. It does not
  // take packed documents: with them the sm_80 kernel runs.
  const char* backward = std::getenv("LLAMA_FAST_ATTENTION_BACKWARD");
  if (backward && std::string(backward) == "sm90" && !documents && attention_backward_sm90_supported(a)) {
    at::Tensor ws =
        at::empty({std::max<int64_t>(1, attention_backward_sm90_workspace(a))}, q.options().dtype(at::kFloat));
    const int err = attention_backward_sm90(a, stats_c.data_ptr<float>(), ws.data_ptr<float>(),
                                            at::cuda::getCurrentCUDAStream().stream());
    if (err != static_cast<int>(cudaErrorNotSupported)) {
      check_cuda(err, "attention_backward (sm90)");
      return {dq, dk, dv};
    }
  }
  at::Tensor workspace =
      at::empty({std::max<int64_t>(1, attention_backward_cuda_workspace(a))}, q.options().dtype(at::kFloat));
  check_cuda(attention_backward_cuda(a, workspace.data_ptr<float>(), at::cuda::getCurrentCUDAStream().stream()),
             "attention_backward");
  return {dq, dk, dv};
}
#endif
// --- end attention_backward ---

}  // namespace
}  // namespace llama_fast

TORCH_LIBRARY(llama_fast, m) {
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor? dresidual=None)"
        " -> (Tensor, Tensor)");
  // --- elementwise ops (issue 3) ---
  m.def("swiglu_backward(Tensor dy, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("swiglu_packed_backward(Tensor dy, Tensor gate_up) -> Tensor");
  m.def("rope_backward(Tensor dq, Tensor dk, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  // --- end elementwise ops ---
  // attention (issue 4)
  m.def("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats, Tensor cos,"
        " Tensor sin, bool causal=True, bool deterministic=False, Tensor? doc_start=None, Tensor? doc_end=None)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) {
  m.impl("rms_norm_backward", &llama_fast::rms_norm_backward_cpu_impl);
  // --- elementwise ops (issue 3) ---
  m.impl("swiglu_backward", &llama_fast::swiglu_backward_cpu_impl);
  m.impl("swiglu_packed_backward", &llama_fast::swiglu_packed_backward_cpu_impl);
  m.impl("rope_backward", &llama_fast::rope_backward_cpu_impl);
  // --- end elementwise ops ---
  m.impl("attention_backward", &llama_fast::attention_backward_cpu_impl);  // attention (issue 4)
}

#ifdef LLAMA_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(llama_fast, CUDA, m) {
  m.impl("rms_norm_backward", &llama_fast::rms_norm_backward_cuda_impl);
  // --- elementwise ops (issue 3) ---
  m.impl("swiglu_backward", &llama_fast::swiglu_backward_cuda_impl);
  m.impl("swiglu_packed_backward", &llama_fast::swiglu_packed_backward_cuda_impl);
  m.impl("rope_backward", &llama_fast::rope_backward_cuda_impl);
  // --- end elementwise ops ---
  m.impl("attention_backward", &llama_fast::attention_backward_cuda_impl);  // attention (issue 4)
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llama_fast C++/CUDA kernels; the ops register themselves under torch.ops.llama_fast";
#ifdef LLAMA_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
  // The opt-in Hopper attention backward (LLAMA_FAST_ATTENTION_BACKWARD=sm90) can run on the current device.
  m.def("attention_backward_sm90_available", [] { return llama_fast::attention_backward_sm90_available(); });
#else
  m.def("attention_backward_sm90_available", [] { return false; });
  m.attr("with_cuda") = false;
#endif
}
