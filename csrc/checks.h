// The checks that every op's arguments header (csrc/<op>_args.h) is written with: which
// backend's kernels will read a tensor, and the device and layout checks, each message naming
// the op and the argument ("debias_C::knn_candidates: queries must be contiguous"). Torch-facing:
// the CPU kernels and the CUDA glue include it, plain nvcc never does.

#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceType.h>

namespace debias {

// What a backend's kernels take: the device type of every tensor, and whether pred may have
// any stride between samples (the CPU kernels of noise_loss read it sample by sample, so a
// channel slice such as model_output[:, :C] needs no copy; the CUDA kernels take it
// contiguous).
struct Backend {
  c10::DeviceType device;
  bool strided_pred;
};
constexpr Backend kCPU{c10::DeviceType::CPU, true};
constexpr Backend kCUDA{c10::DeviceType::CUDA, false};

// x is a tensor of the backend's device type, on the device of `first` (the op's first tensor
// argument, named first_name), which the backend's kernels read.
inline void check_device(const char* op, const char* name, const at::Tensor& x, Backend backend,
                         const at::Tensor& first, const char* first_name) {
  TORCH_CHECK(x.device().type() == backend.device, op, ": ", name, " must be a ", backend.device,
              " tensor, got ", x.device());
  TORCH_CHECK(x.device() == first.device(), op, ": ", name, " must be on the device of ",
              first_name, ", ", first.device(), ", got ", x.device());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& x,
                        at::ScalarType dtype) {
  TORCH_CHECK(x.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              x.scalar_type());
}

}  // namespace debias
