// The torch side of the CUDA kernels of the noise_loss op (csrc/cuda/noise_loss.cu): checks
// the tensors, allocates outputs and workspace, launches on the current stream of the data's
// device, and registers the kernels under the CUDA key of the ops that csrc/noise_loss.cpp
// defines with the schemas of csrc/noise_loss.h, which also holds the contract. (Not named
// noise_loss.cpp: setuptools names objects by stem, and that one would collide with
// noise_loss.cu's in the same folder.)
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
#include "noise_loss.h"

namespace debias {
namespace {

// name: the argument's name in the op schema, for the message.
#define DEBIAS_CHECK_CUDA(op, x, name, dev)                                              \
  TORCH_CHECK((x).is_cuda(), op, ": " name " must be a CUDA tensor, got one on ",         \
              (x).device());                                                              \
  TORCH_CHECK((x).device() == (dev), op, ": " name " must be on the data's device ", (dev), \
              ", got ", (x).device())

#define DEBIAS_CHECK_CONTIGUOUS(op, x, name) \
  TORCH_CHECK((x).is_contiguous(), op, ": " name " must be contiguous")

#define DEBIAS_CHECK_DTYPE(op, x, name, dtype)                                           \
  TORCH_CHECK((x).scalar_type() == (dtype), op, ": " name " must have dtype ", (dtype),  \
              ", got ", (x).scalar_type())

bool is_supported_float(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf;
}

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

at::ScalarType compute_dtype(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

// The data tensor (x0 or pred): CUDA, contiguous, [B, ...], a supported float dtype.
void check_data(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(x.dim() >= 1, op, ": ", name, " needs a batch dimension, got shape ", x.sizes());
  TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
}

// coef: [rows, B] of the compute dtype, contiguous, on the data's device. Its values are not
// read here.
void check_coef(const char* op, const at::Tensor& coef, int64_t rows, int64_t B,
                at::ScalarType ctype, const at::Device& device) {
  DEBIAS_CHECK_CUDA(op, coef, "coef", device);
  DEBIAS_CHECK_DTYPE(op, coef, "coef", ctype);
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == rows && coef.size(1) == B, op,
              ": coef must have shape [", rows, ", ", B, "], got ", coef.sizes());
  DEBIAS_CHECK_CONTIGUOUS(op, coef, "coef");
}

// A tensor read alongside the data: same device, contiguous, same shape.
void check_like(const char* op, const char* name, const at::Tensor& x, const char* like_name,
                const at::Tensor& like) {
  TORCH_CHECK(x.is_cuda() && x.device() == like.device(), op, ": ", name, " must be on ",
              like_name, "'s device ", like.device(), ", got ", x.device());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(x.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name,
              " ", like.sizes(), ", got ", x.sizes());
}

// The checks and kernel arguments that noise_loss_fwd and noise_loss_bwd share
// (DEBIAS_NOISE_LOSS_ARGS). E, the dtype of eps and x0, is noise's when given, else eps_dtype.
cuda::NoiseLossArgs loss_args(const char* op, const at::Tensor& pred, const at::Tensor& coef,
                              const std::optional<at::Tensor>& noise,
                              const std::optional<at::Tensor>& x0, int64_t terms,
                              at::ScalarType eps_dtype, int64_t seed, int64_t offset,
                              int64_t grad_div) {
  using noise_loss::kEpsTerm;
  using noise_loss::kX0Term;
  check_data(op, "pred", pred);
  const at::Device device = pred.device();
  check_coef(op, coef, noise_loss::kLossRows, pred.size(0), compute_dtype(pred.scalar_type()),
             device);
  TORCH_CHECK(terms == kEpsTerm || terms == kX0Term || terms == (kEpsTerm | kX0Term), op,
              ": terms must be 1 (eps), 2 (x0) or 3 (both), got ", terms);
  TORCH_CHECK(grad_div >= 1, op, ": grad_div must be >= 1, got ", grad_div);
  at::ScalarType edtype = eps_dtype;
  if (noise.has_value()) {
    check_like(op, "noise", *noise, "pred", pred);
    edtype = noise->scalar_type();
  }
  TORCH_CHECK(is_supported_float(edtype), op,
              ": noise/eps_dtype must be float32, float64, bfloat16 or float16, got ", edtype);
  TORCH_CHECK(((terms & kX0Term) != 0) == x0.has_value(), op,
              ": x0 must be given exactly when terms has the x0 term (2), terms = ", terms);
  if (x0.has_value()) {
    check_like(op, "x0", *x0, "pred", pred);
    DEBIAS_CHECK_DTYPE(op, *x0, "x0", edtype);
  }

  cuda::NoiseLossArgs args{};
  args.pred_dtype = kernel_dtype(pred.scalar_type());
  args.eps_dtype = kernel_dtype(edtype);
  args.pred = pred.const_data_ptr();
  args.coef = coef.const_data_ptr();
  args.noise = noise.has_value() ? noise->const_data_ptr() : nullptr;
  args.x0 = x0.has_value() ? x0->const_data_ptr() : nullptr;
  args.terms = terms;
  args.seed = static_cast<uint64_t>(seed);
  args.offset = static_cast<uint64_t>(offset);
  args.grad_div = grad_div;
  args.B = pred.size(0);
  args.D = args.B > 0 ? pred.numel() / args.B : 0;
  return args;
}

// Schema: DEBIAS_ADD_NOISE_SCHEMA (noise_loss.h). As on the CPU (csrc/noise_loss.cpp), except
// that keep_noise is ignored: a GPU regenerates the stream in the loss instead of storing it,
// so `kept` is always an empty [0] tensor.
std::tuple<at::Tensor, at::Tensor> add_noise_cuda(const at::Tensor& x0, const at::Tensor& coef,
                                                  const std::optional<at::Tensor>& noise,
                                                  int64_t seed, int64_t offset,
                                                  bool /*keep_noise*/) {
  constexpr const char* op = "debias_C::add_noise";
  check_data(op, "x0", x0);
  const at::Device device = x0.device();
  check_coef(op, coef, noise_loss::kNoiseRows, x0.size(0), compute_dtype(x0.scalar_type()),
             device);
  if (noise.has_value()) {
    check_like(op, "noise", *noise, "x0", x0);
    DEBIAS_CHECK_DTYPE(op, *noise, "noise", x0.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor x_t = at::empty(x0.sizes(), x0.options());
  at::Tensor kept = at::empty({0}, x0.options());
  const int64_t B = x0.size(0);
  const int64_t D = B > 0 ? x0.numel() / B : 0;
  C10_CUDA_CHECK(cuda::add_noise(
      kernel_dtype(x0.scalar_type()), x0.const_data_ptr(), coef.const_data_ptr(),
      noise.has_value() ? noise->const_data_ptr() : nullptr, static_cast<uint64_t>(seed),
      static_cast<uint64_t>(offset), x_t.mutable_data_ptr(), B, D,
      c10::cuda::getCurrentCUDAStream(device.index()).stream()));
  return {x_t, kept};
}

// Schema: DEBIAS_NOISE_LOSS_FWD_SCHEMA (noise_loss.h). Returns (loss [B] in C, total [] in C,
// grad like pred or an empty [0] tensor when need_grad is false). The workspace is B + 1
// zeroed counters and, when a sample spans several chunks, a double per chunk.
std::tuple<at::Tensor, at::Tensor, at::Tensor> noise_loss_fwd_cuda(
    const at::Tensor& pred, const at::Tensor& coef, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& x0, int64_t terms, at::ScalarType eps_dtype, int64_t seed,
    int64_t offset, int64_t grad_div, int64_t loss_div, bool need_grad) {
  constexpr const char* op = "debias_C::noise_loss_fwd";
  cuda::NoiseLossArgs args =
      loss_args(op, pred, coef, noise, x0, terms, eps_dtype, seed, offset, grad_div);
  TORCH_CHECK(loss_div >= 1, op, ": loss_div must be >= 1, got ", loss_div);
  const c10::cuda::CUDAGuard guard(pred.device());
  const at::TensorOptions copts = pred.options().dtype(compute_dtype(pred.scalar_type()));
  const int64_t B = args.B;
  at::Tensor loss = at::empty({B}, copts);
  at::Tensor grad = need_grad ? at::empty(pred.sizes(), pred.options())
                              : at::empty({0}, pred.options());
  if (B == 0) return {loss, at::zeros({}, copts), grad};
  at::Tensor total = at::empty({}, copts);
  // On the current stream, like the launch: the counters are zero when the kernel starts.
  at::Tensor partial =
      at::empty({cuda::noise_loss_partials(B, args.D)}, pred.options().dtype(at::kDouble));
  at::Tensor counter =
      at::zeros({cuda::noise_loss_counters(B)}, pred.options().dtype(at::kInt));
  args.loss_div = loss_div;
  args.loss = loss.mutable_data_ptr();
  args.total = total.mutable_data_ptr();
  args.grad = need_grad ? grad.mutable_data_ptr() : nullptr;
  args.partial = partial.numel() > 0 ? partial.mutable_data_ptr<double>() : nullptr;
  args.counter = counter.mutable_data_ptr<int32_t>();
  C10_CUDA_CHECK(cuda::noise_loss_fwd(
      args, c10::cuda::getCurrentCUDAStream(pred.device().index()).stream()));
  return {loss, total, grad};
}

// Schema: DEBIAS_NOISE_LOSS_BWD_SCHEMA (noise_loss.h). The gradient of noise_loss_fwd
// recomputed from the inputs, each sample's g_b times go_b: grad_output (C, on pred's device)
// holds one value for every sample or one per sample, and is read by the kernel.
at::Tensor noise_loss_bwd_cuda(const at::Tensor& pred, const at::Tensor& coef,
                               const std::optional<at::Tensor>& noise,
                               const std::optional<at::Tensor>& x0, int64_t terms,
                               at::ScalarType eps_dtype, int64_t seed, int64_t offset,
                               int64_t grad_div, const at::Tensor& grad_output) {
  constexpr const char* op = "debias_C::noise_loss_bwd";
  cuda::NoiseLossArgs args =
      loss_args(op, pred, coef, noise, x0, terms, eps_dtype, seed, offset, grad_div);
  const int64_t B = args.B;
  DEBIAS_CHECK_CUDA(op, grad_output, "grad_output", pred.device());
  DEBIAS_CHECK_DTYPE(op, grad_output, "grad_output", compute_dtype(pred.scalar_type()));
  TORCH_CHECK(grad_output.numel() == 1 || grad_output.numel() == B, op,
              ": grad_output must hold 1 or B = ", B, " values, got shape ", grad_output.sizes());
  const c10::cuda::CUDAGuard guard(pred.device());
  at::Tensor grad = at::empty(pred.sizes(), pred.options());
  if (grad.numel() == 0) return grad;
  // loss.sum().backward() over reduction="none" hands in one value expanded to [B].
  at::Tensor go = grad_output;
  if (go.numel() == B && B > 1 && go.dim() == 1 && go.stride(0) == 0) go = go.as_strided({1}, {1});
  go = go.contiguous();
  args.grad_output = go.const_data_ptr();
  args.grad_output_numel = go.numel();
  args.grad = grad.mutable_data_ptr();
  C10_CUDA_CHECK(cuda::noise_loss_bwd(
      args, c10::cuda::getCurrentCUDAStream(pred.device().index()).stream()));
  return grad;
}

// Schema: DEBIAS_PHILOX_NORMAL_SCHEMA (noise_loss.h). Fills a contiguous CUDA tensor with the
// stream of (seed, offset), rounded to its dtype.
void philox_normal__cuda(at::Tensor& out, int64_t seed, int64_t offset) {
  constexpr const char* op = "debias_C::philox_normal_";
  TORCH_CHECK(out.is_cuda(), op, ": out must be a CUDA tensor, got one on ", out.device());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK(is_supported_float(out.scalar_type()), op,
              ": out must be float32, float64, bfloat16 or float16, got ", out.scalar_type());
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(cuda::philox_normal(
      kernel_dtype(out.scalar_type()), out.mutable_data_ptr(), out.numel(),
      static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
      c10::cuda::getCurrentCUDAStream(out.device().index()).stream()));
}

}  // namespace
}  // namespace debias

TORCH_LIBRARY_IMPL(debias_C, CUDA, m) {
  m.impl("add_noise", &debias::add_noise_cuda);
  m.impl("noise_loss_fwd", &debias::noise_loss_fwd_cuda);
  m.impl("noise_loss_bwd", &debias::noise_loss_bwd_cuda);
  m.impl("philox_normal_", &debias::philox_normal__cuda);
}
