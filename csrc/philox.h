// The package's noise stream: Philox4x32-10 counters turned into standard normals.
//
// This header is THE definition of the stream; the CPU kernels (csrc/noise_loss.cpp), the
// CUDA kernels and the pure-torch twin (debias/reference.py) all follow it. It has no torch
// headers so that plain nvcc can compile it.
//
// Counter layout. A noise tensor is indexed by its flat row-major element index i (int64).
// Four consecutive elements share one Philox call:
//
//     group g = i >> 2,  lane = i & 3
//     key     = (k0, k1) = (seed & 0xffffffff, (uint64)seed >> 32)
//     counter = (c0, c1, c2, c3) = (g & 0xffffffff, g >> 32,
//                                   offset & 0xffffffff, (uint64)offset >> 32)
//     (x0, x1, x2, x3) = philox4x32_10(counter, key)
//
// seed and offset are int64 reinterpreted as uint64. Different offsets give independent
// streams under the same seed (one offset per training step, say).
//
// Philox4x32-10 (Salmon et al. 2011, Random123 constants). One round:
//     (hi0, lo0) = M0 * c0,  (hi1, lo1) = M1 * c2          (64-bit products split in two)
//     counter    = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
// ten rounds, with k0 += W0, k1 += W1 between consecutive rounds.
//
// Normals (Box-Muller, all float32):
//     u(x)     = (float)x * 2^-32 + 2^-33      multiply, then add: no fma; u in (0, 1]
//     r        = sqrt(-2 * log(u(x0))),  theta = 2 * pi * u(x1)
//     n0, n1   = r * cos(theta), r * sin(theta)
//     n2, n3   = the same from (x2, x3)
// and element i takes n_lane. u and the bit pattern of the counters are exact; log and
// sin/cos below are float32 polynomials (Cephes) accurate to a few ulp, so a twin that uses
// libm agrees to a few ulp, not bit for bit. The functions use plain mul/add (the CPU build
// has -ffp-contract=off), so every CPU target computes the same bits.

#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define DEBIAS_HOST_DEVICE __host__ __device__
#define DEBIAS_INLINE __forceinline__
#else
#include <math.h>
#include <string.h>
#define DEBIAS_HOST_DEVICE
#define DEBIAS_INLINE inline __attribute__((always_inline))
#endif

namespace debias {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;  // multiplier of c0
constexpr uint32_t kM1 = 0xCD9E8D57u;  // multiplier of c2
constexpr uint32_t kW0 = 0x9E3779B9u;  // key bump of k0 (golden ratio)
constexpr uint32_t kW1 = 0xBB67AE85u;  // key bump of k1 (sqrt(3) - 1)

DEBIAS_HOST_DEVICE DEBIAS_INLINE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2,
                                                   uint32_t& c3, uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c1 = static_cast<uint32_t>(p1);
  c3 = static_cast<uint32_t>(p0);
  c0 = n0;
  c2 = n2;
}

// Philox4x32-10 in place: (c0..c3) is the counter on entry and the output words on exit.
DEBIAS_HOST_DEVICE DEBIAS_INLINE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2,
                                                    uint32_t& c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 9; ++r) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kW0;
    k1 += kW1;
  }
  philox_round(c0, c1, c2, c3, k0, k1);
}

DEBIAS_HOST_DEVICE DEBIAS_INLINE uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  memcpy(&b, &f, sizeof(b));
  return b;
#endif
}

DEBIAS_HOST_DEVICE DEBIAS_INLINE float bits_as_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  memcpy(&f, &b, sizeof(f));
  return f;
#endif
}

// u(x) = (float)x * 2^-32 + 2^-33, in (0, 1]; exact to the bit on every target.
DEBIAS_HOST_DEVICE DEBIAS_INLINE float uniform(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(__uint2float_rn(x), 0x1p-32f), 0x1p-33f);
#else
  return static_cast<float>(x) * 0x1p-32f + 0x1p-33f;
#endif
}

// log(u) for u in [2^-33, 1] (normal floats only), Cephes logf: u = m * 2^e with
// m in [sqrt(1/2), sqrt(2)), log(m) = x - x^2/2 + x^3 P(x) for x = m - 1 (exact), and ln 2
// split in two. Max error about 1 ulp; log(1) is exactly 0. Branch-free so loops vectorise.
DEBIAS_HOST_DEVICE DEBIAS_INLINE float log_unit(float u) {
  const uint32_t bits = float_as_bits(u);
  const float m = bits_as_float((bits & 0x007fffffu) | 0x3f000000u);  // in [0.5, 1)
  const int32_t e_raw = static_cast<int32_t>(bits >> 23) - 126;
  const bool low = m < 0.70710678118654752440f;
  const float fe = static_cast<float>(low ? e_raw - 1 : e_raw);
  const float x = (low ? m + m : m) - 1.0f;
  const float z = x * x;
  float p = 7.0376836292e-2f;
  p = p * x + -1.1514610310e-1f;
  p = p * x + 1.1676998740e-1f;
  p = p * x + -1.2420140846e-1f;
  p = p * x + 1.4249322787e-1f;
  p = p * x + -1.6668057665e-1f;
  p = p * x + 2.0000714765e-1f;
  p = p * x + -2.4999993993e-1f;
  p = p * x + 3.3333331174e-1f;
  float y = p * x * z;
  y = y + fe * -2.12194440e-4f;
  y = y + z * -0.5f;
  return (x + y) + fe * 0.693359375f;
}

// sin and cos of 2*pi*u for u in [0, 1], reduced on the turn fraction: 4u = q + f with q the
// nearest integer and |f| <= 1/2 (both exact), then Cephes sinf/cosf polynomials on
// x = f * pi/2 in [-pi/4, pi/4] and a quadrant swap. Max error about 2 ulp.
DEBIAS_HOST_DEVICE DEBIAS_INLINE void sincos_turn(float u, float& sin_out, float& cos_out) {
  const float t = u * 4.0f;
  const float q = (t + 12582912.0f) - 12582912.0f;  // 1.5 * 2^23: rounds t to an integer
  const float x = (t - q) * 1.57079632679489661923f;
  const int32_t quadrant = static_cast<int32_t>(q) & 3;
  const float z = x * x;
  float ps = -1.9515295891e-4f;
  ps = ps * z + 8.3321608736e-3f;
  ps = ps * z + -1.6666654611e-1f;
  const float s = ps * z * x + x;
  float pc = 2.443315711809948e-5f;
  pc = pc * z + -1.388731625493765e-3f;
  pc = pc * z + 4.166664568298827e-2f;
  const float c = (pc * z * z + z * -0.5f) + 1.0f;
  const bool swap = (quadrant & 1) != 0;
  const float sin_mag = swap ? c : s;
  const float cos_mag = swap ? s : c;
  sin_out = (quadrant & 2) != 0 ? -sin_mag : sin_mag;
  cos_out = ((quadrant + 1) & 2) != 0 ? -cos_mag : cos_mag;
}

// One Box-Muller pair from two Philox words.
DEBIAS_HOST_DEVICE DEBIAS_INLINE void box_muller(uint32_t xa, uint32_t xb, float& na,
                                                 float& nb) {
  const float r = sqrtf(log_unit(uniform(xa)) * -2.0f);
  float s, c;
  sincos_turn(uniform(xb), s, c);
  na = r * c;
  nb = r * s;
}

// The four normals of group g: out[lane] is the normal of flat element 4 * g + lane.
DEBIAS_HOST_DEVICE DEBIAS_INLINE void normal4(uint64_t seed, uint64_t offset, uint64_t g,
                                              float out[4]) {
  uint32_t c0 = static_cast<uint32_t>(g);
  uint32_t c1 = static_cast<uint32_t>(g >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset);
  uint32_t c3 = static_cast<uint32_t>(offset >> 32);
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller(c0, c1, out[0], out[1]);
  box_muller(c2, c3, out[2], out[3]);
}

}  // namespace philox
}  // namespace debias
