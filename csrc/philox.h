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
// and element i takes n_lane. The words and u are exact and the same bits everywhere. log,
// sin and cos are float32 polynomials (Cephes), accurate to a few ulp, so a twin that uses
// libm agrees to a few ulp, not bit for bit. They are this header's own code, never a math
// library's logf / sincosf, so no compiler flag can swap in other approximations. They are
// evaluated with fused multiply-adds (written as fmaf) on CUDA and on x86 with AVX2+FMA, with
// separate multiply and add on the portable CPU path: the two differ by about an ulp. Within
// one machine every call computes the same bits, whatever the threads or the cut of the tensor
// into chunks.

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

// a * b + c with one rounding (fused) or two. The CUDA and AVX2 paths fuse; the portable
// CPU path does not, because x86-64 without FMA hardware emulates fmaf in libm at about a
// hundred times the cost. Its normals then differ from the fused ones by an ulp or so.
template <bool kFused>
DEBIAS_HOST_DEVICE DEBIAS_INLINE float madd(float a, float b, float c) {
  if constexpr (kFused) {
    return fmaf(a, b, c);
  } else {
    return a * b + c;
  }
}

// (float)x * scale, one rounding, for a power-of-two scale. On the CPU x goes in as its
// 16-bit halves, each exact in float, and both products are exact, so the sum rounds once,
// like (float)x: x86 has no unsigned vector conversion before AVX-512.
template <bool kFused>
DEBIAS_HOST_DEVICE DEBIAS_INLINE float u32_scaled(uint32_t x, float scale) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__uint2float_rn(x), scale);
#else
  const float hi = static_cast<float>(static_cast<int32_t>(x >> 16));
  const float lo = static_cast<float>(static_cast<int32_t>(x & 0xffffu));
  return madd<kFused>(hi, scale * 65536.0f, lo * scale);
#endif
}

// Correctly rounded add and sqrt whatever nvcc's flags (an intrinsic is never contracted into
// an fma, and __fsqrt_rn stays IEEE under -prec-sqrt=false), so that CUDA computes the same
// bits as the AVX2+FMA path.
DEBIAS_HOST_DEVICE DEBIAS_INLINE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

DEBIAS_HOST_DEVICE DEBIAS_INLINE float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return sqrtf(x);
#endif
}

// u(x) = (float)x * 2^-32 + 2^-33, in (0, 1]: the same bits on every target.
template <bool kFused = true>
DEBIAS_HOST_DEVICE DEBIAS_INLINE float uniform(uint32_t x) {
  return add_rn(u32_scaled<kFused>(x, 0x1p-32f), 0x1p-33f);
}

// 4 * u(x), bit for bit (scaling by 4 commutes with both roundings): the angle in quarter
// turns.
template <bool kFused = true>
DEBIAS_HOST_DEVICE DEBIAS_INLINE float quarter_turns(uint32_t x) {
  return add_rn(u32_scaled<kFused>(x, 0x1p-30f), 0x1p-31f);
}

// -2 log(u) for u in [2^-33, 1] (normal floats only). Cephes logf: u = m * 2^e with
// m in [sqrt(1/2), sqrt(2)), log(u) = x - x^2/2 + x^3 P(x) + e ln2 for x = m - 1 (exact),
// ln2 split in two, P of degree 8 by Estrin's scheme (a third of Horner's latency), and
// every coefficient times -2 (exact). Max error about 1 ulp; u = 1 gives exactly 0. u is
// split on its bits (subtracting the bits of sqrt(1/2) borrows from the exponent field
// exactly when m < sqrt(1/2)), without branches, so loops over it vectorise.
template <bool kFused = true>
DEBIAS_HOST_DEVICE DEBIAS_INLINE float minus_two_log(float u) {
  const uint32_t bits = float_as_bits(u);
  const int32_t e = static_cast<int32_t>(bits - 0x3f3504f3u) >> 23;
  const float m = bits_as_float(bits - (static_cast<uint32_t>(e) << 23));
  const float fe = static_cast<float>(e);
  const float x = m - 1.0f;
  const float z = x * x;
  const float z2 = z * z;
  const float p01 = madd<kFused>(4.9999988079e-1f, x, -6.6666662693e-1f);
  const float p23 = madd<kFused>(3.3336114883e-1f, x, -4.0001428127e-1f);
  const float p45 = madd<kFused>(2.4840281904e-1f, x, -2.8498646617e-1f);
  const float p67 = madd<kFused>(2.3029220104e-1f, x, -2.3353996873e-1f);
  const float p03 = madd<kFused>(p23, z, p01);
  const float p47 = madd<kFused>(p67, z, p45);
  const float p = madd<kFused>(-1.4075367153e-1f, z2 * z2, madd<kFused>(p47, z2, p03));
  const float low_terms = madd<kFused>(fe, 4.2438888340e-4f, z);  // -2 (e ln2_lo - x^2 / 2)
  const float y = madd<kFused>(p, x * z, low_terms);
  return madd<kFused>(fe, -1.38671875f, madd<kFused>(x, -2.0f, y));  // -2 e ln2_hi
}

// sin and cos of (pi/2) t for t in [0, 4] (t = 4u: 2 pi u). t = q + f with q the nearest
// integer and |f| <= 1/2, both exact; sin and cos of (pi/2) f are the Cephes sinf/cosf
// polynomials with their coefficients times powers of pi/2, so f needs no rounded
// multiplication by pi/2; then a quadrant swap. Max error about 2 ulp.
template <bool kFused = true>
DEBIAS_HOST_DEVICE DEBIAS_INLINE void sincos_quarter_turns(float t, float& sin_out,
                                                           float& cos_out) {
  const float q = add_rn(add_rn(t, 12582912.0f), -12582912.0f);  // 1.5 * 2^23: rint(t)
  const float f = t - q;
  const int32_t quadrant = static_cast<int32_t>(q) & 3;
  const float z = f * f;
  const float z2 = z * z;
  const float s_lo = madd<kFused>(-6.4596360922e-1f, z, 1.5707963705e+0f);
  const float s_hi = madd<kFused>(-4.6048373915e-3f, z, 7.9681411386e-2f);
  const float s = f * madd<kFused>(s_hi, z2, s_lo);
  const float c_lo = madd<kFused>(-1.2337005138e+0f, z, 1.0f);
  const float c_hi =
      madd<kFused>(9.0560456738e-4f, z2, madd<kFused>(-2.0861119032e-2f, z, 2.5366938114e-1f));
  const float c = madd<kFused>(c_hi, z2, c_lo);
  const bool swap = (quadrant & 1) != 0;
  const uint32_t sin_sign = static_cast<uint32_t>(quadrant & 2) << 30;        // q = 2, 3
  const uint32_t cos_sign = static_cast<uint32_t>((quadrant + 1) & 2) << 30;  // q = 1, 2
  sin_out = bits_as_float(float_as_bits(swap ? c : s) ^ sin_sign);
  cos_out = bits_as_float(float_as_bits(swap ? s : c) ^ cos_sign);
}

// One Box-Muller pair from two Philox words: r = sqrt(-2 log u(xa)), theta = 2 pi u(xb),
// na = r cos(theta), nb = r sin(theta).
template <bool kFused = true>
DEBIAS_HOST_DEVICE DEBIAS_INLINE void box_muller(uint32_t xa, uint32_t xb, float& na,
                                                 float& nb) {
  const float r = sqrt_rn(minus_two_log<kFused>(uniform<kFused>(xa)));
  float s, c;
  sincos_quarter_turns<kFused>(quarter_turns<kFused>(xb), s, c);
  na = r * c;
  nb = r * s;
}

// The four normals of group g: out[lane] is the normal of flat element 4 * g + lane.
template <bool kFused = true>
DEBIAS_HOST_DEVICE DEBIAS_INLINE void normal4(uint64_t seed, uint64_t offset, uint64_t g,
                                              float out[4]) {
  uint32_t c0 = static_cast<uint32_t>(g);
  uint32_t c1 = static_cast<uint32_t>(g >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset);
  uint32_t c3 = static_cast<uint32_t>(offset >> 32);
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller<kFused>(c0, c1, out[0], out[1]);
  box_muller<kFused>(c2, c3, out[2], out[3]);
}

}  // namespace philox
}  // namespace debias
