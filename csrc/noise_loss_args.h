// The arguments of the noise_loss ops and their checks, written once for the CPU kernels
// (csrc/noise_loss.cpp) and the CUDA glue (csrc/cuda/noise_loss_glue.cpp): the op names, the
// C++ parameters of the schemas, and one function per op that checks its tensors (messages
// name the argument) and returns what the kernels need. The contract itself (formulas, rows,
// `terms`, the schemas) is csrc/noise_loss.h, which stays free of torch headers for plain nvcc;
// this header is its torch side. debias/ops/noise_loss.py validates the user's inputs first:
// these checks guard the op boundary, and the kernels trust what passes them.

#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "checks.h"
#include "noise_loss.h"

namespace debias {
namespace noise_loss {

constexpr const char* kAddNoiseOp = "debias_C::add_noise";
constexpr const char* kNoiseLossFwdOp = "debias_C::noise_loss_fwd";
constexpr const char* kNoiseLossBwdOp = "debias_C::noise_loss_bwd";
constexpr const char* kPhiloxNormalOp = "debias_C::philox_normal_";

// The C++ parameters of DEBIAS_NOISE_LOSS_ARGS (noise_loss.h), in its order.
#define DEBIAS_NOISE_LOSS_PARAMS                                                              \
  const at::Tensor &pred, const at::Tensor &coef, const std::optional<at::Tensor> &noise,     \
      const std::optional<at::Tensor> &x0, int64_t terms, at::ScalarType eps_dtype,           \
      int64_t seed, int64_t offset, int64_t kind, const std::optional<at::Tensor> &mask,      \
      int64_t mask_inner, int64_t mask_size, int64_t mask_batch_stride, int64_t grad_div

// The same parameters' names, to hand them on.
#define DEBIAS_NOISE_LOSS_PARAM_NAMES                                                   \
  pred, coef, noise, x0, terms, eps_dtype, seed, offset, kind, mask, mask_inner, mask_size, \
      mask_batch_stride, grad_div

// The storage dtypes the kernels take: T, P and E of noise_loss.h.
inline bool is_float(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf;
}
#define DEBIAS_FLOAT_DTYPES "float32, float64, bfloat16 or float16"

// C, the compute dtype of data of dtype dt.
inline at::ScalarType compute_dtype(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

// The data tensor (x0 or pred), the op's first argument: on the backend's device, [B, ...], a
// float dtype; contiguous, or, for pred on a backend with strided_pred, each sample contiguous
// (the samples may be any stride apart).
inline void check_data(const char* op, const char* name, const at::Tensor& x, Backend backend,
                       bool is_pred) {
  check_device(op, name, x, backend, x, name);
  if (is_pred && backend.strided_pred) {
    TORCH_CHECK(x.dim() >= 1 && (x.size(0) == 0 || x.select(0, 0).is_contiguous()), op,
                ": each sample of ", name, " must be contiguous");
  } else {
    check_contiguous(op, name, x);
  }
  TORCH_CHECK(x.dim() >= 1, op, ": ", name, " needs a batch dimension, got shape ", x.sizes());
  TORCH_CHECK(is_float(x.scalar_type()), op, ": ", name, " must be " DEBIAS_FLOAT_DTYPES ", got ",
              x.scalar_type());
}

// coef: [rows, B] of the compute dtype, contiguous, on the data's device. The CUDA glue never
// reads its values on the host.
inline void check_coef(const char* op, const at::Tensor& coef, int64_t rows, Backend backend,
                       const at::Tensor& data, const char* data_name) {
  check_device(op, "coef", coef, backend, data, data_name);
  check_contiguous(op, "coef", coef);
  check_dtype(op, "coef", coef, compute_dtype(data.scalar_type()));
  const int64_t B = data.size(0);
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == rows && coef.size(1) == B, op,
              ": coef must have shape [", rows, ", ", B, "], got ", coef.sizes());
}

// The mask of noise_loss.h: Mb x mask_size values of the compute dtype, contiguous, on pred's
// device, Mb = B when mask_batch_stride is mask_size, 1 when it is 0.
inline void check_mask(const char* op, const at::Tensor& mask, int64_t inner, int64_t size,
                       int64_t batch_stride, Backend backend, const at::Tensor& pred) {
  check_device(op, "mask", mask, backend, pred, "pred");
  check_contiguous(op, "mask", mask);
  check_dtype(op, "mask", mask, compute_dtype(pred.scalar_type()));
  TORCH_CHECK(inner >= 1 && size >= 1, op, ": mask_inner and mask_size must be >= 1, got ",
              inner, " and ", size);
  TORCH_CHECK(batch_stride == 0 || batch_stride == size, op,
              ": mask_batch_stride must be 0 or mask_size (", size, "), got ", batch_stride);
  const int64_t rows = batch_stride == 0 ? 1 : pred.size(0);
  TORCH_CHECK(mask.numel() == rows * size, op, ": mask must hold ", rows, " x ", size,
              " values, got ", mask.numel());
}

// A tensor read alongside the data (noise, x0): on its device, contiguous, of its shape.
inline void check_like(const char* op, const char* name, const at::Tensor& x, Backend backend,
                       const at::Tensor& data, const char* data_name) {
  check_device(op, name, x, backend, data, data_name);
  check_contiguous(op, name, x);
  TORCH_CHECK(x.sizes() == data.sizes(), op, ": ", name, " must have shape ", data.sizes(),
              ", got ", x.sizes());
}

// add_noise (DEBIAS_ADD_NOISE_SCHEMA): x0 [B, ...] of storage type T, coef [kNoiseRows, B]
// (rows a, s) or [kPerturbedRows, B] (a, s, g: the input is perturbed by g xi), noise and xi
// like x0 when given. D = numel / B elements a sample.
struct AddNoiseArgs {
  at::ScalarType dtype;  // T
  bool perturbed;        // coef has the g row: xi is read (the tensor, or its stream)
  int64_t B, D;
};

inline AddNoiseArgs add_noise_args(Backend backend, const at::Tensor& x0, const at::Tensor& coef,
                                   const std::optional<at::Tensor>& noise,
                                   const std::optional<at::Tensor>& xi) {
  constexpr const char* op = kAddNoiseOp;
  check_data(op, "x0", x0, backend, /*is_pred=*/false);
  const bool perturbed = coef.dim() == 2 && coef.size(0) == kPerturbedRows;
  check_coef(op, coef, perturbed ? kPerturbedRows : kNoiseRows, backend, x0, "x0");
  for (const auto& [name, x] : {std::pair{"noise", &noise}, std::pair{"xi", &xi}}) {
    if (x->has_value()) {
      check_like(op, name, **x, backend, x0, "x0");
      check_dtype(op, name, **x, x0.scalar_type());
    }
  }
  TORCH_CHECK(perturbed || !xi.has_value(), op,
              ": xi was given but coef has no g row (shape [", kPerturbedRows, ", B])");
  const int64_t B = x0.size(0);
  return {x0.scalar_type(), perturbed, B, B > 0 ? x0.numel() / B : 0};
}

// noise_loss_fwd and noise_loss_bwd, the arguments they share (DEBIAS_NOISE_LOSS_ARGS). The
// tensors are the caller's, valid for the call.
struct LossArgs {
  const at::Tensor* pred;   // [B, ...] P; samples pred_stride elements apart
  const at::Tensor* coef;   // [kLossRows, B] C: rows w, p, q
  const at::Tensor* noise;  // like pred, E; nullptr: the stream (or no eps term)
  const at::Tensor* x0;     // like pred, E; nullptr without the x0 term
  const at::Tensor* mask;   // Mb x mask_size in C, or nullptr: no mask
  int64_t terms;            // kEpsTerm, kX0Term or both
  int64_t kind;             // kL2, kL1 or kPseudoHuber (coef has row c)
  int64_t mask_inner, mask_size, mask_batch_stride;
  at::ScalarType pred_dtype, eps_dtype, compute_dtype;  // P; E (noise's when given); C
  int64_t seed, offset, grad_div;
  int64_t B, D;
  int64_t pred_stride;  // D when pred is contiguous
};

inline LossArgs loss_args(const char* op, Backend backend, DEBIAS_NOISE_LOSS_PARAMS) {
  check_data(op, "pred", pred, backend, /*is_pred=*/true);
  TORCH_CHECK(kind == kL2 || kind == kL1 || kind == kPseudoHuber, op,
              ": kind must be 0 (l2), 1 (l1) or 2 (pseudo-Huber), got ", kind);
  check_coef(op, coef, kind == kPseudoHuber ? kHuberRows : kLossRows, backend, pred, "pred");
  if (mask.has_value()) {
    check_mask(op, *mask, mask_inner, mask_size, mask_batch_stride, backend, pred);
  }
  TORCH_CHECK(terms == kEpsTerm || terms == kX0Term || terms == (kEpsTerm | kX0Term), op,
              ": terms must be 1 (eps), 2 (x0) or 3 (both), got ", terms);
  TORCH_CHECK(grad_div >= 1, op, ": grad_div must be >= 1, got ", grad_div);
  at::ScalarType edtype = eps_dtype;
  if (noise.has_value()) {
    check_like(op, "noise", *noise, backend, pred, "pred");
    edtype = noise->scalar_type();
  }
  TORCH_CHECK(is_float(edtype), op, ": noise/eps_dtype must be " DEBIAS_FLOAT_DTYPES ", got ",
              edtype);
  TORCH_CHECK(((terms & kX0Term) != 0) == x0.has_value(), op,
              ": x0 must be given exactly when terms has the x0 term (2), terms = ", terms);
  if (x0.has_value()) {
    check_like(op, "x0", *x0, backend, pred, "pred");
    check_dtype(op, "x0", *x0, edtype);
  }
  const int64_t B = pred.size(0);
  const int64_t D = B > 0 ? pred.numel() / B : 0;
  return {&pred,
          &coef,
          noise.has_value() ? &*noise : nullptr,
          x0.has_value() ? &*x0 : nullptr,
          mask.has_value() ? &*mask : nullptr,
          terms,
          kind,
          mask_inner,
          mask_size,
          mask_batch_stride,
          pred.scalar_type(),
          edtype,
          compute_dtype(pred.scalar_type()),
          seed,
          offset,
          grad_div,
          B,
          D,
          B > 1 ? pred.stride(0) : D};
}

// noise_loss_fwd's own argument.
inline void check_loss_div(int64_t loss_div) {
  TORCH_CHECK(loss_div >= 1, kNoiseLossFwdOp, ": loss_div must be >= 1, got ", loss_div);
}

// noise_loss_bwd's own argument: go_b of noise_loss.h, in C on pred's device, one value for
// every sample or one per sample, in any layout. Returns the values contiguous (1 or B of
// them); the [B] expansion of one value that loss.sum().backward() hands over a reduction="none"
// loss becomes that one value.
inline at::Tensor grad_output_values(Backend backend, const LossArgs& args,
                                     const at::Tensor& grad_output) {
  constexpr const char* op = kNoiseLossBwdOp;
  check_device(op, "grad_output", grad_output, backend, *args.pred, "pred");
  check_dtype(op, "grad_output", grad_output, args.compute_dtype);
  TORCH_CHECK(grad_output.numel() == 1 || grad_output.numel() == args.B, op,
              ": grad_output must have 1 or ", args.B, " elements, got ", grad_output.numel());
  at::Tensor go = grad_output;
  if (go.numel() == args.B && args.B > 1 && go.dim() == 1 && go.stride(0) == 0) {
    go = go.as_strided({1}, {1});
  }
  return go.contiguous();
}

// philox_normal_ (DEBIAS_PHILOX_NORMAL_SCHEMA): out, written in place, contiguous, of a float
// dtype.
inline void check_philox_out(Backend backend, const at::Tensor& out) {
  constexpr const char* op = kPhiloxNormalOp;
  check_device(op, "out", out, backend, out, "out");
  check_contiguous(op, "out", out);
  TORCH_CHECK(is_float(out.scalar_type()), op, ": out must be " DEBIAS_FLOAT_DTYPES ", got ",
              out.scalar_type());
}

}  // namespace noise_loss
}  // namespace debias
