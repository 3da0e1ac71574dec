// The torch side of the CUDA kernels of the noise_loss op (csrc/cuda/noise_loss.cu): checks
// the tensors, allocates outputs and workspace, launches on the current stream of the data's
// device, and registers the kernels under the CUDA key of the ops that csrc/noise_loss.cpp
// defines. (Not named noise_loss.cpp: setuptools names objects by stem, and that one would
// collide with noise_loss.cu's in the same folder.)
//
// Nothing here reads device memory, so no call synchronises: t's values are checked by the
// kernels, which give NaN for a sample whose t is outside the tables, and grad_output stays
// on the device.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>

#include "noise_loss.cuh"

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

enum Target : int64_t { kEpsilon = 0, kVPrediction = 1, kSample = 2 };

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

// t: int64 [B] on the data's device. Its values are not read here.
void check_t(const char* op, const at::Tensor& t, int64_t B, const at::Device& device) {
  DEBIAS_CHECK_CUDA(op, t, "t", device);
  DEBIAS_CHECK_DTYPE(op, t, "t", at::kLong);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, ": t must have shape [", B, "], got ",
              t.sizes());
  DEBIAS_CHECK_CONTIGUOUS(op, t, "t");
}

// The tables: contiguous 1-D tensors of the compute dtype on the data's device, of one
// length, which is returned.
int64_t check_tables(const char* op, at::ScalarType ctype, const at::Device& device,
                     std::initializer_list<const at::Tensor*> tables,
                     std::initializer_list<const char*> names) {
  int64_t steps = -1;
  auto name = names.begin();
  for (const at::Tensor* table : tables) {
    const char* nm = *name++;
    TORCH_CHECK(table->is_cuda() && table->device() == device, op, ": ", nm,
                " must be on the data's device ", device, ", got ", table->device());
    TORCH_CHECK(table->dim() == 1 && table->is_contiguous(), op, ": ", nm,
                " must be a contiguous 1-D tensor, got shape ", table->sizes());
    TORCH_CHECK(table->scalar_type() == ctype, op, ": ", nm, " must have dtype ", ctype,
                ", got ", table->scalar_type());
    TORCH_CHECK(steps < 0 || table->size(0) == steps, op, ": ", nm, " has ", table->size(0),
                " entries, the other tables ", steps);
    steps = table->size(0);
  }
  return steps;
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

// The checks and kernel arguments that noise_loss_fwd and noise_loss_bwd share.
cuda::NoiseLossArgs loss_args(const char* op, const at::Tensor& pred, const at::Tensor& t,
                              const at::Tensor& weight, const at::Tensor& coef_a,
                              const at::Tensor& coef_b, const std::optional<at::Tensor>& noise,
                              const std::optional<at::Tensor>& x0, int64_t target,
                              at::ScalarType eps_dtype, int64_t seed, int64_t offset,
                              double grad_scale) {
  check_data(op, "pred", pred);
  const at::Device device = pred.device();
  check_t(op, t, pred.size(0), device);
  const int64_t steps = check_tables(op, compute_dtype(pred.scalar_type()), device,
                                     {&weight, &coef_a, &coef_b}, {"weight", "coef_a", "coef_b"});
  TORCH_CHECK(target == kEpsilon || target == kVPrediction || target == kSample, op,
              ": target must be 0 (epsilon), 1 (v_prediction) or 2 (sample), got ", target);
  at::ScalarType edtype = eps_dtype;
  if (noise.has_value()) {
    check_like(op, "noise", *noise, "pred", pred);
    edtype = noise->scalar_type();
  }
  TORCH_CHECK(is_supported_float(edtype), op,
              ": noise/eps_dtype must be float32, float64, bfloat16 or float16, got ", edtype);
  TORCH_CHECK(target == kEpsilon || x0.has_value(), op, ": x0 is required for target ",
              target == kVPrediction ? "v_prediction" : "sample");
  if (x0.has_value()) {
    check_like(op, "x0", *x0, "pred", pred);
    DEBIAS_CHECK_DTYPE(op, *x0, "x0", edtype);
  }

  cuda::NoiseLossArgs args{};
  args.pred_dtype = kernel_dtype(pred.scalar_type());
  args.eps_dtype = kernel_dtype(edtype);
  args.pred = pred.const_data_ptr();
  args.t = t.const_data_ptr<int64_t>();
  args.weight = weight.const_data_ptr();
  args.coef_a = coef_a.const_data_ptr();
  args.coef_b = coef_b.const_data_ptr();
  args.noise = noise.has_value() ? noise->const_data_ptr() : nullptr;
  args.x0 = x0.has_value() ? x0->const_data_ptr() : nullptr;
  args.target = static_cast<int32_t>(target);
  args.seed = static_cast<uint64_t>(seed);
  args.offset = static_cast<uint64_t>(offset);
  args.grad_scale = grad_scale;
  args.B = pred.size(0);
  args.D = args.B > 0 ? pred.numel() / args.B : 0;
  args.steps = steps;
  return args;
}

// add_noise(Tensor x0, Tensor t, Tensor coef_a, Tensor coef_b, Tensor? noise, int seed,
//           int offset, bool keep_noise) -> (Tensor, Tensor)
// As on the CPU (csrc/noise_loss.cpp), except that keep_noise is ignored: a GPU regenerates
// the stream in the loss instead of storing it, so `kept` is always an empty [0] tensor.
std::tuple<at::Tensor, at::Tensor> add_noise_cuda(const at::Tensor& x0, const at::Tensor& t,
                                                  const at::Tensor& coef_a,
                                                  const at::Tensor& coef_b,
                                                  const std::optional<at::Tensor>& noise,
                                                  int64_t seed, int64_t offset,
                                                  bool /*keep_noise*/) {
  constexpr const char* op = "debias_C::add_noise";
  check_data(op, "x0", x0);
  const at::Device device = x0.device();
  check_t(op, t, x0.size(0), device);
  const int64_t steps = check_tables(op, compute_dtype(x0.scalar_type()), device,
                                     {&coef_a, &coef_b}, {"coef_a", "coef_b"});
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
      kernel_dtype(x0.scalar_type()), x0.const_data_ptr(), t.const_data_ptr<int64_t>(),
      coef_a.const_data_ptr(), coef_b.const_data_ptr(),
      noise.has_value() ? noise->const_data_ptr() : nullptr, static_cast<uint64_t>(seed),
      static_cast<uint64_t>(offset), x_t.mutable_data_ptr(), B, D, steps,
      c10::cuda::getCurrentCUDAStream(device.index()).stream()));
  return {x_t, kept};
}

// noise_loss_fwd(Tensor pred, Tensor t, Tensor weight, Tensor coef_a, Tensor coef_b,
//                Tensor? noise, Tensor? x0, int target, ScalarType eps_dtype, int seed,
//                int offset, float grad_scale, float loss_scale, bool need_grad)
//     -> (Tensor, Tensor, Tensor)
// Returns (loss [B] in C, total = loss_scale * sum_b loss_b as a [] tensor in C, grad like
// pred or an empty [0] tensor when need_grad is false). The workspace is B + 1 zeroed
// counters and, when a sample spans several tiles, a double per tile.
std::tuple<at::Tensor, at::Tensor, at::Tensor> noise_loss_fwd_cuda(
    const at::Tensor& pred, const at::Tensor& t, const at::Tensor& weight,
    const at::Tensor& coef_a, const at::Tensor& coef_b, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& x0, int64_t target, at::ScalarType eps_dtype, int64_t seed,
    int64_t offset, double grad_scale, double loss_scale, bool need_grad) {
  constexpr const char* op = "debias_C::noise_loss_fwd";
  cuda::NoiseLossArgs args = loss_args(op, pred, t, weight, coef_a, coef_b, noise, x0, target,
                                       eps_dtype, seed, offset, grad_scale);
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
  args.loss_scale = loss_scale;
  args.loss = loss.mutable_data_ptr();
  args.total = total.mutable_data_ptr();
  args.grad = need_grad ? grad.mutable_data_ptr() : nullptr;
  args.partial = partial.numel() > 0 ? partial.mutable_data_ptr<double>() : nullptr;
  args.counter = counter.mutable_data_ptr<int32_t>();
  C10_CUDA_CHECK(cuda::noise_loss_fwd(
      args, c10::cuda::getCurrentCUDAStream(pred.device().index()).stream()));
  return {loss, total, grad};
}

// noise_loss_bwd(Tensor pred, Tensor t, Tensor weight, Tensor coef_a, Tensor coef_b,
//                Tensor? noise, Tensor? x0, int target, ScalarType eps_dtype, int seed,
//                int offset, float grad_scale, Tensor grad_output) -> Tensor
// grad_i = rnd_P((2 w_b grad_scale / D * go_b) * (pred_i - y_i)), recomputed from the inputs:
// grad_output (C, on pred's device) holds one value for every sample or one per sample, and
// is read by the kernel.
at::Tensor noise_loss_bwd_cuda(const at::Tensor& pred, const at::Tensor& t,
                               const at::Tensor& weight, const at::Tensor& coef_a,
                               const at::Tensor& coef_b, const std::optional<at::Tensor>& noise,
                               const std::optional<at::Tensor>& x0, int64_t target,
                               at::ScalarType eps_dtype, int64_t seed, int64_t offset,
                               double grad_scale, const at::Tensor& grad_output) {
  constexpr const char* op = "debias_C::noise_loss_bwd";
  cuda::NoiseLossArgs args = loss_args(op, pred, t, weight, coef_a, coef_b, noise, x0, target,
                                       eps_dtype, seed, offset, grad_scale);
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

// philox_normal_(Tensor(a!) out, int seed, int offset) -> ()
// Fills a contiguous CUDA tensor with the stream of (seed, offset), rounded to its dtype.
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
