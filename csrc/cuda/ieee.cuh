// Round-to-nearest IEEE arithmetic, overloaded on float and double so that templated kernels
// write one expression for either compute type. The CUDA kernels use these wherever their bits
// must equal the CPU's or torch's.
//
// CUDA's _rn intrinsics, not plain operators: nvcc never contracts an intrinsic into an fma,
// whatever its -fmad setting, and division and sqrt stay correctly rounded under -prec-div=false
// or -prec-sqrt=false, so the contract of csrc/noise_loss.h holds under any flags.
// Subnormals are kept because debias/_build.py's NVCC_FLAGS leave -ftz at its default (false);
// with -ftz=true the float intrinsics would flush.

#pragma once

namespace debias {
namespace cuda {
namespace {

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) {
  return __fma_rn(a, b, c);
}
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

}  // namespace
}  // namespace cuda
}  // namespace debias
