// Torch glue for the llama_fast kernels: input checks with clear messages, dtype dispatch,
// and registration as torch.ops.llama_fast.* for the CPU and CUDA dispatch keys. The fake (shape-only)
// implementations that torch.compile traces with are registered in Python, in llama_fast/_extension.py.
// The kernels themselves live in cuda/*.cu and cpu/*.cpp behind llama_fast.h and know nothing of torch.
#include <torch/extension.h>
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

}  // namespace
}  // namespace llama_fast

TORCH_LIBRARY(llama_fast, m) {
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor? dresidual=None)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llama_fast, CPU, m) {
  m.impl("rms_norm_backward", &llama_fast::rms_norm_backward_cpu_impl);
}

#ifdef LLAMA_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(llama_fast, CUDA, m) {
  m.impl("rms_norm_backward", &llama_fast::rms_norm_backward_cuda_impl);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llama_fast C++/CUDA kernels; the ops register themselves under torch.ops.llama_fast";
#ifdef LLAMA_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
