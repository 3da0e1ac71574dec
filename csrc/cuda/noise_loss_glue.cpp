// The torch side of the CUDA kernels of the noise_loss op (csrc/cuda/noise_loss.cu): allocates
// outputs and workspace, launches on the current stream of the data's device, and registers the
// kernels under the CUDA key of the ops that csrc/noise_loss.cpp defines with the schemas of
// csrc/noise_loss.h, which also holds the contract. The arguments are checked by
// csrc/noise_loss_args.h, as on the CPU. (Not named noise_loss.cpp: setuptools names objects
// by stem, and that one would collide with noise_loss.cu's in the same folder.)
//
// Nothing here reads device memory, so no call synchronises: coef and grad_output stay on
// the device and only their shapes are checked.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "noise_loss.cuh"
#include "noise_loss_args.h"

namespace debias {
namespace {

using noise_loss::AddNoiseArgs;
using noise_loss::LossArgs;

cuda::DType kernel_dtype(at::ScalarType dt) {
  switch (dt) {
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kHalf:
      return cuda::DType::kFloat16;
    default:
      return cuda::DType::kFloat32;
  }
}

cudaStream_t current_stream(const at::Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}

// The kernel arguments that noise_loss_fwd and noise_loss_bwd share.
cuda::NoiseLossArgs kernel_args(const LossArgs& a) {
  cuda::NoiseLossArgs args{};
  args.pred_dtype = kernel_dtype(a.pred_dtype);
  args.eps_dtype = kernel_dtype(a.eps_dtype);
  args.pred = a.pred->const_data_ptr();
  args.coef = a.coef->const_data_ptr();
  args.noise = a.noise != nullptr ? a.noise->const_data_ptr() : nullptr;
  args.x0 = a.x0 != nullptr ? a.x0->const_data_ptr() : nullptr;
  args.terms = a.terms;
  args.seed = static_cast<uint64_t>(a.seed);
  args.offset = static_cast<uint64_t>(a.offset);
  args.kind = a.kind;
  args.mask = a.mask != nullptr ? a.mask->const_data_ptr() : nullptr;
  args.mask_inner = a.mask_inner;
  args.mask_size = a.mask_size;
  args.mask_batch_stride = a.mask_batch_stride;
  args.grad_div = a.grad_div;
  args.B = a.B;
  args.D = a.D;
  return args;
}

// Schema: DEBIAS_ADD_NOISE_SCHEMA (noise_loss.h). As on the CPU (csrc/noise_loss.cpp), except
// that keep_noise is ignored: a GPU regenerates the stream in the loss instead of storing it,
// so `kept` is always an empty [0] tensor. With coef's row g, xi (or the stream of xi_seed,
// xi_offset) perturbs x_t.
std::tuple<at::Tensor, at::Tensor> add_noise_cuda(const at::Tensor& x0, const at::Tensor& coef,
                                                  const std::optional<at::Tensor>& noise,
                                                  int64_t seed, int64_t offset,
                                                  bool /*keep_noise*/,
                                                  const std::optional<at::Tensor>& xi,
                                                  int64_t xi_seed, int64_t xi_offset) {
  const AddNoiseArgs a = noise_loss::add_noise_args(kCUDA, x0, coef, noise, xi);
  const c10::cuda::CUDAGuard guard(x0.device());
  at::Tensor x_t = at::empty(x0.sizes(), x0.options());
  at::Tensor kept = at::empty({0}, x0.options());
  C10_CUDA_CHECK(cuda::add_noise(
      kernel_dtype(a.dtype), x0.const_data_ptr(), coef.const_data_ptr(),
      noise.has_value() ? noise->const_data_ptr() : nullptr, static_cast<uint64_t>(seed),
      static_cast<uint64_t>(offset), a.perturbed,
      xi.has_value() ? xi->const_data_ptr() : nullptr, static_cast<uint64_t>(xi_seed),
      static_cast<uint64_t>(xi_offset), x_t.mutable_data_ptr(), a.B, a.D, current_stream(x0)));
  return {x_t, kept};
}

// Schema: DEBIAS_NOISE_LOSS_FWD_SCHEMA (noise_loss.h). Returns (loss [B] in C, total [] in C,
// grad like pred or an empty [0] tensor when need_grad is false). The workspace is B + 1
// zeroed counters and, when a sample spans several chunks, a double per chunk.
std::tuple<at::Tensor, at::Tensor, at::Tensor> noise_loss_fwd_cuda(DEBIAS_NOISE_LOSS_PARAMS,
                                                                   int64_t loss_div,
                                                                   bool need_grad) {
  const LossArgs a =
      noise_loss::loss_args(noise_loss::kNoiseLossFwdOp, kCUDA, DEBIAS_NOISE_LOSS_PARAM_NAMES);
  noise_loss::check_loss_div(loss_div);
  const c10::cuda::CUDAGuard guard(pred.device());
  const at::TensorOptions copts = pred.options().dtype(a.compute_dtype);
  const int64_t B = a.B;
  at::Tensor loss = at::empty({B}, copts);
  at::Tensor grad = need_grad ? at::empty(pred.sizes(), pred.options())
                              : at::empty({0}, pred.options());
  if (B == 0) return {loss, at::zeros({}, copts), grad};
  at::Tensor total = at::empty({}, copts);
  // On the current stream, like the launch: the counters are zero when the kernel starts.
  at::Tensor partial =
      at::empty({cuda::noise_loss_partials(B, a.D)}, pred.options().dtype(at::kDouble));
  at::Tensor counter =
      at::zeros({cuda::noise_loss_counters(B)}, pred.options().dtype(at::kInt));
  cuda::NoiseLossArgs args = kernel_args(a);
  args.loss_div = loss_div;
  args.loss = loss.mutable_data_ptr();
  args.total = total.mutable_data_ptr();
  args.grad = need_grad ? grad.mutable_data_ptr() : nullptr;
  args.partial = partial.numel() > 0 ? partial.mutable_data_ptr<double>() : nullptr;
  args.counter = counter.mutable_data_ptr<int32_t>();
  C10_CUDA_CHECK(cuda::noise_loss_fwd(args, current_stream(pred)));
  return {loss, total, grad};
}

// Schema: DEBIAS_NOISE_LOSS_BWD_SCHEMA (noise_loss.h). The gradient of noise_loss_fwd
// recomputed from the inputs, each sample's g_b times go_b: grad_output (C, on pred's device)
// holds one value for every sample or one per sample, and is read by the kernel.
at::Tensor noise_loss_bwd_cuda(DEBIAS_NOISE_LOSS_PARAMS, const at::Tensor& grad_output) {
  const LossArgs a =
      noise_loss::loss_args(noise_loss::kNoiseLossBwdOp, kCUDA, DEBIAS_NOISE_LOSS_PARAM_NAMES);
  const c10::cuda::CUDAGuard guard(pred.device());
  const at::Tensor go = noise_loss::grad_output_values(kCUDA, a, grad_output);
  at::Tensor grad = at::empty(pred.sizes(), pred.options());
  if (grad.numel() == 0) return grad;
  cuda::NoiseLossArgs args = kernel_args(a);
  args.grad_output = go.const_data_ptr();
  args.grad_output_numel = go.numel();
  args.grad = grad.mutable_data_ptr();
  C10_CUDA_CHECK(cuda::noise_loss_bwd(args, current_stream(pred)));
  return grad;
}

// Schema: DEBIAS_PHILOX_NORMAL_SCHEMA (noise_loss.h). Fills a contiguous CUDA tensor with the
// stream of (seed, offset), rounded to its dtype.
void philox_normal__cuda(at::Tensor& out, int64_t seed, int64_t offset) {
  noise_loss::check_philox_out(kCUDA, out);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(cuda::philox_normal(kernel_dtype(out.scalar_type()), out.mutable_data_ptr(),
                                     out.numel(), static_cast<uint64_t>(seed),
                                     static_cast<uint64_t>(offset), current_stream(out)));
}

}  // namespace
}  // namespace debias

TORCH_LIBRARY_IMPL(debias_C, CUDA, m) {
  m.impl("add_noise", &debias::add_noise_cuda);
  m.impl("noise_loss_fwd", &debias::noise_loss_fwd_cuda);
  m.impl("noise_loss_bwd", &debias::noise_loss_bwd_cuda);
  m.impl("philox_normal_", &debias::philox_normal__cuda);
}
