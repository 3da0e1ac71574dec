// CUDA kernels of the noise_loss op: the loss side of a diffusion training step for every
// family, with the semantics of the CPU kernels (csrc/noise_loss.cpp). The contract (formulas,
// the coefficient rows, `terms`, grad_div and loss_div) is csrc/noise_loss.h. T, P, E are
// storage types (float32, float64, bfloat16, float16); C is the compute type (double for
// float64 data, else float).
//
//   _philox_normal_kernel  out_i = rnd_T(normal_i)
//       writes N * sizeof(T)                                                   bytes 1T
//   _add_noise_kernel      x_t_i = rnd_T(rnd_T(a_b * x0_i) + rnd_T(s_b * e_i)),
//                          e_i = eps_i, or rnd_T(eps_i + rnd_T(g_b * xi_i)) perturbed
//       reads x0 (+ noise) (+ xi), writes x_t                        bytes 2T (3T) (4T)
//   _noise_loss_kernel     y_i = p_b eps_i + q_b x0_i (the named terms),  d_i = pred_i - y_i
//       forward:  loss_b, total; grad_i = rnd_P(g_b * (m_i * h(d_i))) (need_grad)
//       backward: grad_i = rnd_P((g_b * go_b) * (m_i * h(d_i))), go_b from grad_output
//       reads pred (+ noise) (+ x0), writes grad               bytes P + P (+ E) (+ E)
//       (+ the mask's own Mb x mask_size values, read through the cache, never expanded)
// eps_i is noise_i or rnd_E(normal_i), where normal_i is the Philox stream of philox.h,
// regenerated in registers instead of stored: with the stream and the eps term alone a
// training step moves 2 elements per element for the loss side, eager torch about ten. A term
// that `terms` does not name costs nothing: no x0 read without kX0Term, no noise read and no
// stream generated without kEpsTerm. The coefficients of sample b are column b of `coef`.
//
// Design. One block per chunk (sample b, piece j of kChunk elements of the sample) so the
// per-sample values (coefficients, factors) are read once per block. A thread works on items of
// kItem consecutive flat elements starting at a multiple of kItem: kItem / 4 whole Philox
// groups (one philox4x32_10 call per 4 elements, as the stream is defined on the flat index)
// and 16 bytes of the narrowest type (kItem = 8 with a 16-bit type, else 4). A round gives
// each thread 16 elements (8 with float64 data) in items blockDim apart (coalesced); the
// thread issues all the round's 16-byte loads before it generates the normals, so the
// Philox arithmetic overlaps the memory latency: 64 bytes of each fp32 array (32 of 16-bit
// data) in flight per thread. Items wholly inside the chunk with 16-byte aligned pointers take
// this vector path; the items at the chunk's edges (a sample need not start on an item
// boundary) and those of unaligned tensors take a masked scalar path.
//
// The loss reduction is deterministic in one launch: each thread sums its elements in C in a
// fixed order, the block adds the threads' sums in double in a fixed tree (warp shuffles, then
// warp 0 over the warps); a sample of one chunk is done there, otherwise the block stores its
// partial, fences, and counts itself in counter[b]; the block that completes sample b adds
// the sample's partials in index order (thread-strided, then the same tree) and writes
// loss_b; the block that completes the batch (counter[B]) adds loss_0..loss_{B-1} likewise
// into total. The order of every addition depends on B, D and the dtypes only, never on the
// values, so equal inputs give equal bits.
//
// Arithmetic on data uses CUDA's round-to-nearest intrinsics (ieee.cuh: never contracted into
// an fma), and nothing flushes subnormals (no fast math, no -ftz: debias/_build.py), so
// add_noise equals torch's `a * x0 + s * noise` (perturbed: `noise + g * xi` first) bit for
// bit, y and grad have the CPU kernel's bits for the same eps (each product and sum of y, h and
// g_b rounded on its own, the pseudo-Huber sqrt and divisions correctly rounded), and the
// stream is the CPU's AVX2+FMA path's (philox.h: its fused operations are its own, written as
// fmaf). Only the loss sums are this kernel's own: m_i l(d_i) is added with one fma, of
// (m_i h_i) and d_i for l2 and l1, of m_i and l_i for pseudo-Huber.
//
// Kinds and masks are template parameters, like the stream and the mode: each kernel carries
// the arithmetic of its own kind only, and the l2 kernel without a mask is the code the op had
// before either existed. A mask is read where an element needs it, never expanded: its index
// (j / mask_inner) % mask_size takes two 32-bit divisions by multiply-high (MagicDiv), from a
// base the block computes once per chunk, so it costs a few integer operations and a cached
// load an element whatever D is.
//
// Launch configuration: grid = B * ceil(D / kChunk) blocks (1-D, chunks strided past
// 2^31 - 1), 256 threads (fewer, in whole warps, when a sample is smaller than a chunk), at
// least 2 (loss) or 4 (elementwise) resident blocks per SM. A chunk of 8192 elements is 2
// rounds of 256 threads (4 for float64). Smaller chunks would spend more of each block in its
// epilogue (a block reduction, a fence and an atomic); larger ones would leave SMs idle on
// the batches diffusion training actually uses: B = 64 latents of 4 x 64 x 64 already make
// only 128 chunks, about one per SM of an H100, while a 64 MiB fp32 tensor makes 2048, eight
// waves at 2 blocks per SM, so the last wave's imbalance is small. A tiny D (well under a
// chunk) wastes most of each block: correct, not fast.
//
// Cost of the stream: one philox4x32_10 and two Box-Muller pairs per 4 elements, about 70
// instructions per element (PTX count). Where eps comes from the stream, that arithmetic,
// not memory, bounds the kernels with 16-bit data: 4 bytes of traffic per element cannot
// keep an H100's HBM busy at that cost.
//
// Tile, chunk, worker and block mean what csrc/README.md says, in every kernel file.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>

#include <type_traits>

#include "ieee.cuh"
#include "noise_loss.cuh"
#include "noise_loss.h"
#include "philox.h"

namespace debias {
namespace cuda {
namespace {

constexpr int kMaxThreads = 256;
// Resident blocks per SM the register allocation must allow. Without a minimum ptxas trades
// spills for occupancy on its own. 2 blocks (at most 128 registers) is the most that every
// loss instantiation fits without spilling, but float64 pseudo-Huber (kLossMinBlocksOf); 16
// warps per SM still keep more than twice the bytes in flight that HBM latency needs. The
// elementwise kernels fit 64 registers, but perturbed add_noise (kAddNoiseMinBlocksOf).
constexpr int kLossMinBlocks = 2;
constexpr int kElementwiseMinBlocks = 4;

using noise_loss::kEpsTerm;
using noise_loss::kL1;
using noise_loss::kL2;
using noise_loss::kPseudoHuber;
using noise_loss::kRowA;
using noise_loss::kRowC;
using noise_loss::kRowG;
using noise_loss::kRowP;
using noise_loss::kRowQ;
using noise_loss::kRowS;
using noise_loss::kRowW;
using noise_loss::kX0Term;

// kLoss: forward without gradient; kLossGrad: forward; kGradOnly: backward.
enum Mode : int { kLoss, kLossGrad, kGradOnly };

template <typename T>
struct Tag {
  using type = T;
};

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr bool kIs16Bit = sizeof(T) == 2;

// Elements per item: 16 bytes of the narrowest of the types, and whole Philox groups.
template <typename A, typename B = A>
constexpr int kItemOf = (kIs16Bit<A> || kIs16Bit<B>) ? 8 : 4;

// Elements per thread per round: 64 bytes of each 4-byte array in flight, or of each 8-byte
// one (with half as many elements, so float64 data does not hold twice the registers).
template <typename A, typename B = A>
constexpr int kRoundOf = (sizeof(A) == 8 || sizeof(B) == 8) ? 8 : 16;

// ---- conversions (arithmetic: ieee.cuh) ------------------------------------------------------

__device__ __forceinline__ double widen(float v) { return static_cast<double>(v); }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float narrow(double v) { return __double2float_rn(v); }

// A float or double value as C (exact, or rounded to nearest for double -> float).
template <typename C>
__device__ __forceinline__ C to_c(float v) {
  if constexpr (std::is_same_v<C, float>) {
    return v;
  } else {
    return widen(v);
  }
}
template <typename C>
__device__ __forceinline__ C to_c(double v) {
  if constexpr (std::is_same_v<C, double>) {
    return v;
  } else {
    return narrow(v);
  }
}

template <typename C>
__device__ __forceinline__ C int_to_c(int64_t v) {
  if constexpr (std::is_same_v<C, double>) {
    return __ll2double_rn(v);
  } else {
    return __ll2float_rn(v);
  }
}

// ---- storage types ---------------------------------------------------------------------------

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) {
  return __uint_as_float(bits << 16);
}
__device__ __forceinline__ float f16_bits_to_float(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
// Round to nearest even; NaN stays NaN (the canonical one, as torch's CUDA kernels write).
__device__ __forceinline__ uint32_t float_to_bf16_bits(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
__device__ __forceinline__ uint32_t float_to_f16_bits(float v) {
  return __half_as_ushort(__float2half_rn(v));
}

// rnd_T: v rounded to storage type T, in C. Identity for float and double: a float value
// is a double value, and C is double only for double T.
template <typename T, typename C>
__device__ __forceinline__ C round_to(C v) {
  static_assert(!(std::is_same_v<T, float> && std::is_same_v<C, double>), "rnd_float(double)");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return bf16_bits_to_float(float_to_bf16_bits(v));
  } else if constexpr (std::is_same_v<T, __half>) {
    return f16_bits_to_float(float_to_f16_bits(v));
  } else {
    return v;
  }
}

// One element of T as C.
template <typename T, typename C>
__device__ __forceinline__ C load1(const T* p) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return to_c<C>(__ldg(p));
  } else {
    const uint32_t bits = __ldg(reinterpret_cast<const unsigned short*>(p));
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return to_c<C>(bf16_bits_to_float(bits));
    } else {
      return to_c<C>(f16_bits_to_float(bits));
    }
  }
}

// One element of T from C = compute_t<T>, rounded to nearest even.
template <typename T, typename C>
__device__ __forceinline__ void store1(T* p, C v) {
  static_assert(std::is_same_v<C, compute_t<T>>, "stores round from the compute type");
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    *p = v;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(float_to_bf16_bits(v));
  } else {
    *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(float_to_f16_bits(v));
  }
}

// N elements of T from a 16-byte aligned address, as C, in 16-byte loads.
template <typename T, int N, typename C>
__device__ __forceinline__ void load_vec(const T* p, C (&out)[N]) {
  static_assert(N * sizeof(T) % 16 == 0, "whole 16-byte vectors");
  constexpr int kPer = 16 / sizeof(T);
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int v = 0; v < N / kPer; ++v) {
    const uint4 w4 = __ldg(q + v);
    const uint32_t w[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (std::is_same_v<T, float>) {
        out[v * kPer + k] = to_c<C>(__uint_as_float(w[k]));
      } else if constexpr (std::is_same_v<T, double>) {
        if (k < 2) {
          out[v * kPer + k] = to_c<C>(__hiloint2double(static_cast<int>(w[2 * k + 1]),
                                                       static_cast<int>(w[2 * k])));
        }
      } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        out[v * kPer + 2 * k] = to_c<C>(bf16_bits_to_float(w[k] & 0xffffu));
        out[v * kPer + 2 * k + 1] = to_c<C>(__uint_as_float(w[k] & 0xffff0000u));
      } else {
        out[v * kPer + 2 * k] = to_c<C>(f16_bits_to_float(w[k] & 0xffffu));
        out[v * kPer + 2 * k + 1] = to_c<C>(f16_bits_to_float(w[k] >> 16));
      }
    }
  }
}

// N elements of T to a 16-byte aligned address from C = compute_t<T>, in 16-byte stores.
template <typename T, int N, typename C>
__device__ __forceinline__ void store_vec(T* p, const C (&in)[N]) {
  static_assert(N * sizeof(T) % 16 == 0, "whole 16-byte vectors");
  static_assert(std::is_same_v<C, compute_t<T>>, "stores round from the compute type");
  constexpr int kPer = 16 / sizeof(T);
  uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
  for (int v = 0; v < N / kPer; ++v) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (std::is_same_v<T, float>) {
        w[k] = __float_as_uint(in[v * kPer + k]);
      } else if constexpr (std::is_same_v<T, double>) {
        const double d = in[v * kPer + k / 2];
        w[k] = static_cast<uint32_t>(k % 2 == 0 ? __double2loint(d) : __double2hiint(d));
      } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        w[k] = float_to_bf16_bits(in[v * kPer + 2 * k]) |
               (float_to_bf16_bits(in[v * kPer + 2 * k + 1]) << 16);
      } else {
        w[k] = float_to_f16_bits(in[v * kPer + 2 * k]) |
               (float_to_f16_bits(in[v * kPer + 2 * k + 1]) << 16);
      }
    }
    q[v] = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// eps of one item from the stream, (C) rnd_E(normal_i): kItem / 4 groups from group g0.
template <typename E, int kItem, typename C>
__device__ __forceinline__ void stream_item(uint64_t seed, uint64_t offset, uint64_t g0,
                                            C (&eps)[kItem]) {
#pragma unroll
  for (int q = 0; q < kItem / 4; ++q) {
    float n[4];
    philox::normal4<true>(seed, offset, g0 + q, n);
#pragma unroll
    for (int l = 0; l < 4; ++l) eps[4 * q + l] = to_c<C>(round_to<E>(n[l]));
  }
}

// ---- geometry --------------------------------------------------------------------------------

// Chunk `chunk` of B samples of D elements, kChunk per piece: sample b, flat [begin, end).
// Items are kItem flat elements from a multiple of kItem; within the chunk, items and elements
// are counted from item0 in int32 (a chunk spans at most kChunk / kItem + 2 items). A flat
// range of n elements is the case per_sample = number of chunks, D = n.
template <int kItem>
struct Chunk {
  int64_t b;
  int64_t item0;     // the first item that meets the chunk
  int32_t head;      // begin - item0 * kItem, in [0, kItem)
  int32_t len;       // end - begin
  int32_t items;     // items that meet the chunk
  int32_t full_lo;   // local items [full_lo, full_end) lie wholly inside the chunk
  int32_t full_end;

  __device__ __forceinline__ Chunk(int64_t chunk, int64_t per_sample, int64_t D) {
    b = chunk / per_sample;
    const int64_t offset = (chunk - b * per_sample) * kChunk;
    const int64_t begin = b * D + offset;
    len = static_cast<int32_t>(D - offset < kChunk ? D - offset : kChunk);
    len = len > 0 ? len : 0;
    item0 = begin / kItem;
    head = static_cast<int32_t>(begin - item0 * kItem);
    items = len > 0 ? (head + len + kItem - 1) / kItem : 0;
    full_lo = head > 0 ? 1 : 0;
    full_end = (head + len) / kItem;
  }

  // Whether local element le (counted from item0 * kItem) lies in the chunk.
  __device__ __forceinline__ bool holds(int32_t le) const {
    return static_cast<uint32_t>(le - head) < static_cast<uint32_t>(len);
  }

  // The Philox group of local item lk's first element.
  __device__ __forceinline__ uint64_t group(int32_t lk) const {
    return static_cast<uint64_t>(item0 + lk) * (kItem / 4);
  }
};

// Calls round(lk0, vec_items) for each round of the chunk; lk0 is the thread's first local
// item of the round, its others are blockDim.x apart, and bit u of vec_items says whether item
// u lies wholly inside the chunk with 16-byte aligned pointers (vector path) or not (masked
// scalar path: the chunk's edges, unaligned tensors, items past the chunk).
template <int kUnroll, int kItem, typename F>
__device__ __forceinline__ void for_each_round(const Chunk<kItem>& ck, bool vec, F&& round) {
  const int32_t stride = static_cast<int32_t>(blockDim.x);
  for (int32_t base = 0; base < ck.items; base += kUnroll * stride) {
    const int32_t lk0 = base + static_cast<int32_t>(threadIdx.x);
    uint32_t vec_items = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int32_t lk = lk0 + u * stride;
      vec_items |= static_cast<uint32_t>(vec && lk >= ck.full_lo && lk < ck.full_end) << u;
    }
    round(lk0, vec_items);
  }
}

// Sum over the block in a fixed order (a shuffle tree in each warp, then warp 0 over the
// warps' sums); the result is in thread 0. blockDim.x is a multiple of 32. Ends synchronised.
__device__ __forceinline__ double block_sum(double v, double* s_warp) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) s_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? s_warp[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  __syncthreads();
  return v;
}

// ---- the mask's index ------------------------------------------------------------------------

// n / d for n < 2^31 and 1 <= d < 2^31 with one multiply-high, torch's IntDivider method:
// shift = ceil(log2 d), mul = floor(2^32 (2^shift - d) / d) + 1 (it fits 32 bits), and
// n / d = (umulhi(n, mul) + n) >> shift, the sum in 32 bits because n < 2^31.
struct MagicDiv {
  uint32_t mul, shift;
};

MagicDiv magic_div(uint32_t d) {
  uint32_t shift = 0;
  while ((uint64_t{1} << shift) < d) ++shift;
  const uint64_t mul = ((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1;
  return {static_cast<uint32_t>(mul), shift};
}

__device__ __forceinline__ uint32_t divide(uint32_t n, MagicDiv m) {
  return (__umulhi(n, m.mul) + n) >> m.shift;
}

// Divisors of the mask's index are capped at kMaskCap (below), so that every dividend stays
// under 2^31.
constexpr int64_t kMaskCap = int64_t{1} << 30;

// The mask of noise_loss.h (element j of sample b reads row_b[(j / inner) % size]) within one
// chunk, whose element t (0 <= t < len <= kChunk) is the sample's element j0 + t. With
// Q0 = j0 / inner, r0 = j0 % inner and M0 = Q0 % size, that element reads
//     row_b[M0 + s - q * size],  s = (r0 + t) / inner,  q = (M0 + s) / size,
// where s and q are computed as (r0' + t) / inner' and (M0' + s) / size' with the divisors
// capped, inner' = min(inner, kMaskCap), r0' = max(r0 - (inner - inner'), 0), and the same for
// size: a divisor over kMaskCap changes its quotient at most once in a chunk, where the capped
// one does (t < 2^13 and s <= 1 + t stay far below kMaskCap). The dividends are then below
// 2^31 and the divisions are MagicDiv's; the divisions by the full sizes are the block's, once
// per chunk.
struct MaskGeometry {
  int64_t inner, size, batch_stride;  // mask_inner, mask_size, mask_batch_stride
  MagicDiv inner_div, size_div;       // of inner' and size'
};

template <typename C>
struct MaskChunk {
  const C* row;  // row_b + M0
  uint32_t r0, m0;  // r0', M0'

  // The chunk whose element 0 is the sample's element j0, of sample b.
  __device__ __forceinline__ static MaskChunk of(const C* mask, const MaskGeometry& g, int64_t b,
                                                 int64_t j0) {
    const int64_t q0 = j0 / g.inner;
    const int64_t m0_full = q0 % g.size;
    const int64_t r0_full = j0 - q0 * g.inner;
    const int64_t inner_cut = g.inner > kMaskCap ? g.inner - kMaskCap : 0;
    const int64_t size_cut = g.size > kMaskCap ? g.size - kMaskCap : 0;
    return {mask + b * g.batch_stride + m0_full,
            static_cast<uint32_t>(r0_full > inner_cut ? r0_full - inner_cut : 0),
            static_cast<uint32_t>(m0_full > size_cut ? m0_full - size_cut : 0)};
  }

  // m of the chunk's element t.
  __device__ __forceinline__ C at(int32_t t, const MaskGeometry& g) const {
    const uint32_t s = divide(r0 + static_cast<uint32_t>(t), g.inner_div);
    const uint32_t q = divide(m0 + s, g.size_div);
    return __ldg(row + (static_cast<int64_t>(s) - static_cast<int64_t>(q) * g.size));
  }
};

// ---- the loss kinds --------------------------------------------------------------------------

// k of noise_loss.h: g_b = (k * w_b / D / grad_div) * go_b.
template <int64_t kKind>
constexpr int kFactorOf = kKind == kL2 ? 2 : 1;

// m h(d) of one element, kind kKind (noise_loss.h; h without a product when there is no mask),
// and, when kSum, m l(d) added to acc. c and cc = rnd(c * c) are the sample's pseudo-Huber
// constants. For l2 and l1, m l(d) is (m h(d)) d (for l2 up to the rounding of m h), so one
// fma adds it.
template <int64_t kKind, bool kMask, bool kSum, typename C>
__device__ __forceinline__ C loss_factor(C d, C m, C c, C cc, C& acc) {
  C h;
  if constexpr (kKind == kPseudoHuber) {
    const C dd = mul_rn(d, d);
    const C r = sqrt_rn(add_rn(dd, cc));
    h = div_rn(d, r);
    if constexpr (kSum) {
      const C l = div_rn(dd, add_rn(r, c));
      acc = kMask ? fma_rn(m, l, acc) : add_rn(acc, l);
    }
    if constexpr (kMask) h = mul_rn(m, h);
  } else {
    if constexpr (kKind == kL2) {
      h = d;
    } else {
      h = d > C(0) ? C(1) : (d < C(0) ? C(-1) : d);  // sign(d): 0 keeps its sign, NaN stays
    }
    if constexpr (kMask) h = mul_rn(m, h);
    if constexpr (kSum) acc = fma_rn(h, d, acc);
  }
  return h;
}

// ---- kernels ---------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kMaxThreads, kElementwiseMinBlocks)
    _philox_normal_kernel(T* __restrict__ out,  // [n] output
                          int64_t n, uint64_t seed, uint64_t offset,
                          int64_t nchunks,  // ceil(n / kChunk)
                          bool vec) {     // out is 16-byte aligned
  using C = compute_t<T>;
  constexpr int kItem = kItemOf<T>;
  constexpr int kUnroll = kRoundOf<T> / kItem;
  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    const Chunk<kItem> ck(chunk, nchunks, n);
    T* out_t = out + ck.item0 * kItem;
    for_each_round<kUnroll>(ck, vec, [&](int32_t lk0, uint32_t vec_items) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int32_t lk = lk0 + u * static_cast<int32_t>(blockDim.x);
        if (lk >= ck.items) continue;
        C v[kItem];
        stream_item<T>(seed, offset, ck.group(lk), v);
        if (vec_items >> u & 1) {
          store_vec(out_t + lk * kItem, v);
        } else {
#pragma unroll
          for (int e = 0; e < kItem; ++e) {
            if (ck.holds(lk * kItem + e)) store1(out_t + lk * kItem + e, v[e]);
          }
        }
      }
    });
  }
}

template <typename T>
struct AddNoiseParams {
  using C = compute_t<T>;
  const T* __restrict__ x0;     // [B * D]
  const C* __restrict__ coef;   // [kNoiseRows, B]: rows a, s; [kPerturbedRows, B]: a, s, g
  const T* __restrict__ noise;  // [B * D], unused with the stream
  const T* __restrict__ xi;     // [B * D], read with kXiTensor only
  T* __restrict__ x_t;          // [B * D] output
  uint64_t seed, offset;        // eps's stream
  uint64_t xi_seed, xi_offset;  // xi's stream (kXiStream)
  int64_t B, D, per_sample;
  bool vec;  // x0, x_t and the tensors read (noise, xi) are 16-byte aligned
};

// add_noise's perturbation: none (the code of the op before it had one), xi from a tensor, or
// from its stream.
enum Xi : int { kNoXi, kXiTensor, kXiStream };

// A perturbation reads a third array or draws a second stream, which does not fit the 64
// registers of 4 blocks: 3 blocks (80 registers), 2 for float64 data, whose three arrays in
// flight alone hold 48.
template <typename T, int kXi>
constexpr int kAddNoiseMinBlocksOf =
    kXi == kNoXi ? kElementwiseMinBlocks : (sizeof(T) == 8 ? 2 : 3);

template <typename T, bool kStream, int kXi>
__global__ void __launch_bounds__(kMaxThreads, (kAddNoiseMinBlocksOf<T, kXi>))
    _add_noise_kernel(const AddNoiseParams<T> prm) {
  using C = compute_t<T>;
  constexpr int kItem = kItemOf<T>;
  constexpr int kUnroll = kRoundOf<T> / kItem;
  constexpr bool kPerturbed = kXi != kNoXi;
  const int64_t nchunks = prm.B * prm.per_sample;
  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    const Chunk<kItem> ck(chunk, prm.per_sample, prm.D);
    const C a = __ldg(prm.coef + kRowA * prm.B + ck.b);
    const C s = __ldg(prm.coef + kRowS * prm.B + ck.b);
    const C g = kPerturbed ? __ldg(prm.coef + kRowG * prm.B + ck.b) : C(0);
    const T* x0_t = prm.x0 + ck.item0 * kItem;
    const T* noise_t = prm.noise + ck.item0 * kItem;
    const T* xi_t = prm.xi + ck.item0 * kItem;
    T* x_t_t = prm.x_t + ck.item0 * kItem;
    // x_t of one element: rnd_T(rnd_T(a * x) + rnd_T(s * e)), the last rounding by the store;
    // e = eps, or perturbed rnd_T(eps + rnd_T(g * xi)); xi is read only when perturbed.
    auto noised = [&](C x, C eps, const C& xi) {
      C e = eps;
      if constexpr (kPerturbed) e = round_to<T>(add_rn(eps, round_to<T>(mul_rn(g, xi))));
      return add_rn(round_to<T>(mul_rn(a, x)), round_to<T>(mul_rn(s, e)));
    };
    for_each_round<kUnroll>(ck, prm.vec, [&](int32_t lk0, uint32_t vec_items) {
      C x[kUnroll][kItem], eps[kUnroll][kItem], xi[kUnroll][kItem];
      // Every vector load of the round first; the normals are generated while they are in
      // flight.
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (vec_items >> u & 1) {
          const int32_t le0 = (lk0 + u * static_cast<int32_t>(blockDim.x)) * kItem;
          load_vec(x0_t + le0, x[u]);
          if constexpr (!kStream) load_vec(noise_t + le0, eps[u]);
          if constexpr (kXi == kXiTensor) load_vec(xi_t + le0, xi[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int32_t lk = lk0 + u * static_cast<int32_t>(blockDim.x);
        if (lk >= ck.items) continue;
        if constexpr (kStream) stream_item<T>(prm.seed, prm.offset, ck.group(lk), eps[u]);
        if constexpr (kXi == kXiStream) {
          stream_item<T>(prm.xi_seed, prm.xi_offset, ck.group(lk), xi[u]);
        }
        if (vec_items >> u & 1) {
          C out[kItem];
#pragma unroll
          for (int e = 0; e < kItem; ++e) out[e] = noised(x[u][e], eps[u][e], xi[u][e]);
          store_vec(x_t_t + lk * kItem, out);
        } else {
#pragma unroll
          for (int e = 0; e < kItem; ++e) {
            const int32_t le = lk * kItem + e;
            if (!ck.holds(le)) continue;
            if constexpr (!kStream) eps[u][e] = load1<T, C>(noise_t + le);
            if constexpr (kXi == kXiTensor) xi[u][e] = load1<T, C>(xi_t + le);
            store1(x_t_t + le, noised(load1<T, C>(x0_t + le), eps[u][e], xi[u][e]));
          }
        }
      }
    });
  }
}

template <typename P, typename E>
struct LossParams {
  using C = compute_t<P>;
  const P* __restrict__ pred;         // [B * D]
  const C* __restrict__ coef;         // [kLossRows, B]: rows w, p, q (, c: kHuberRows)
  const E* __restrict__ noise;        // [B * D], unused with the stream or without kEpsTerm
  const E* __restrict__ x0;           // [B * D], unused without kX0Term
  const C* __restrict__ mask;         // [Mb * mask_size], read with kMask only
  MaskGeometry mask_geometry;         // of the mask, with kMask
  const C* __restrict__ grad_output;  // kGradOnly: [go_numel]
  int64_t go_numel;                   // 1 or B
  C* loss;                            // [B], forward
  C* total;                           // [], forward
  P* __restrict__ grad;               // [B * D], with a gradient
  double* partial;                    // [B * per_sample] when per_sample > 1, forward
  int32_t* counter;                   // [B + 1] zeroed, forward
  uint64_t seed, offset;
  int64_t grad_div, loss_div;
  int64_t B, D, per_sample;
  bool eps_term, x0_term;  // which terms of y = p eps + q x0 are read
  bool vec;  // every tensor read or written per element is 16-byte aligned
};

// loss_b = C(sum / double(D) * double(w_b)), as the CPU kernel computes it.
template <typename C>
__device__ __forceinline__ C sample_loss(double sum, int64_t D, C w) {
  return to_c<C>(__dmul_rn(__ddiv_rn(sum, __ll2double_rn(D)), widen(w)));
}

// Pseudo-Huber in float64 takes a sqrt and two divisions an element, each an inlined
// iteration with a called path for its special cases: up to about 150 registers (with a mask),
// which 2 blocks would spill. Its register count is left to ptxas (2 blocks still fit where it
// needs at most 128).
template <typename C, int64_t kKind>
constexpr int kLossMinBlocksOf =
    kKind == kPseudoHuber && std::is_same_v<C, double> ? 1 : kLossMinBlocks;

template <typename P, typename E, bool kStream, int kMode, int64_t kKind, bool kMask>
__global__ void __launch_bounds__(kMaxThreads, (kLossMinBlocksOf<compute_t<P>, kKind>))
    _noise_loss_kernel(const LossParams<P, E> prm) {
  using C = compute_t<P>;
  constexpr int kItem = kItemOf<P, E>;
  constexpr int kUnroll = kRoundOf<P, E> / kItem;
  constexpr bool kLossOut = kMode != kGradOnly;
  constexpr bool kGradOut = kMode != kLoss;
  constexpr bool kHuber = kKind == kPseudoHuber;
  __shared__ double s_warp[kMaxThreads / 32];
  __shared__ int s_sample_done, s_all_done;

  const bool eps_term = prm.eps_term;
  const bool x0_term = prm.x0_term;
  const bool load_noise = !kStream && eps_term;
  const int64_t nchunks = prm.B * prm.per_sample;
  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    const Chunk<kItem> ck(chunk, prm.per_sample, prm.D);
    const C w = __ldg(prm.coef + kRowW * prm.B + ck.b);
    const C p_b = __ldg(prm.coef + kRowP * prm.B + ck.b);
    const C q_b = __ldg(prm.coef + kRowQ * prm.B + ck.b);
    const C c = kHuber ? __ldg(prm.coef + kRowC * prm.B + ck.b) : C(0);
    const C cc = mul_rn(c, c);
    // g_b = C(k) * w / C(D) / C(grad_div), left to right.
    C scale = div_rn(div_rn(mul_rn(C(kFactorOf<kKind>), w), int_to_c<C>(prm.D)),
                     int_to_c<C>(prm.grad_div));
    if constexpr (kMode == kGradOnly) {
      scale = mul_rn(scale, __ldg(prm.grad_output + (prm.go_numel == 1 ? 0 : ck.b)));
    }
    const int64_t first = ck.item0 * kItem;  // flat index of local element 0
    const P* pred_t = prm.pred + first;
    const E* noise_t = prm.noise + first;
    const E* x0_t = prm.x0 + first;
    P* grad_t = prm.grad + first;
    C acc = C(0);
    // The mask within the chunk, whose element t is local element head + t, the sample's
    // element (first + head - b D) + t. Unread (not even computed) without kMask.
    MaskChunk<C> mk{};
    if constexpr (kMask) {
      mk = MaskChunk<C>::of(prm.mask, prm.mask_geometry, ck.b, first + ck.head - ck.b * prm.D);
    }

    // pred - y of one element; eps and x are read only when their term is named.
    auto diff = [&](C p, const C& eps, const C& x) {
      C y;
      if (!x0_term) {
        y = mul_rn(p_b, eps);
      } else if (!eps_term) {
        y = mul_rn(q_b, x);
      } else {
        y = add_rn(mul_rn(p_b, eps), mul_rn(q_b, x));
      }
      return sub_rn(p, y);
    };
    // m h(d) of one element, m l(d) added to acc when the loss is out; m is read only with
    // kMask.
    auto factor = [&](C d, const C& m) {
      return loss_factor<kKind, kMask, kLossOut>(d, kMask ? m : C(1), c, cc, acc);
    };
    for_each_round<kUnroll>(ck, prm.vec, [&](int32_t lk0, uint32_t vec_items) {
      C p[kUnroll][kItem], eps[kUnroll][kItem], x[kUnroll][kItem], m[kUnroll][kItem];
      // The mask's values of item u (local item lk), each element's own load.
      auto load_mask = [&](int u, int32_t lk) {
#pragma unroll
        for (int e = 0; e < kItem; ++e) {
          const int32_t le = lk * kItem + e;
          if (ck.holds(le)) m[u][e] = mk.at(le - ck.head, prm.mask_geometry);
        }
      };
      // Every vector load of the round first; the normals are generated while they are in
      // flight. With the stream, an item's mask values are loaded just before its normals are
      // generated instead, which keeps the registers of the other items' values free.
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int32_t lk = lk0 + u * static_cast<int32_t>(blockDim.x);
        if (vec_items >> u & 1) {
          const int32_t le0 = lk * kItem;
          load_vec(pred_t + le0, p[u]);
          if (load_noise) load_vec(noise_t + le0, eps[u]);
          if (x0_term) load_vec(x0_t + le0, x[u]);
        }
        if constexpr (kMask && !kStream) load_mask(u, lk);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int32_t lk = lk0 + u * static_cast<int32_t>(blockDim.x);
        if (lk >= ck.items) continue;
        if constexpr (kMask && kStream) load_mask(u, lk);
        if constexpr (kStream) {
          if (eps_term) stream_item<E>(prm.seed, prm.offset, ck.group(lk), eps[u]);
        }
        if (vec_items >> u & 1) {
          C g[kItem];
#pragma unroll
          for (int e = 0; e < kItem; ++e) {
            g[e] = mul_rn(scale, factor(diff(p[u][e], eps[u][e], x[u][e]), m[u][e]));
          }
          if constexpr (kGradOut) store_vec(grad_t + lk * kItem, g);
        } else {
#pragma unroll
          for (int e = 0; e < kItem; ++e) {
            const int32_t le = lk * kItem + e;
            if (!ck.holds(le)) continue;
            if (load_noise) eps[u][e] = load1<E, C>(noise_t + le);
            if (x0_term) x[u][e] = load1<E, C>(x0_t + le);
            const C h = factor(diff(load1<P, C>(pred_t + le), eps[u][e], x[u][e]), m[u][e]);
            if constexpr (kGradOut) store1(grad_t + le, mul_rn(scale, h));
          }
        }
      }
    });

    if constexpr (kLossOut) {
      const double chunk_sum = block_sum(widen(acc), s_warp);
      if (threadIdx.x == 0) {
        bool done = true;
        if (prm.per_sample > 1) {
          prm.partial[chunk] = chunk_sum;
          __threadfence();
          done = atomicAdd(prm.counter + ck.b, 1) == prm.per_sample - 1;
        }
        s_sample_done = done;
      }
      __syncthreads();
      const bool sample_done = s_sample_done;
      if (sample_done) {
        double sum = chunk_sum;
        if (prm.per_sample > 1) {
          __threadfence();  // the other blocks' partials, seen through their fences
          const double* part = prm.partial + ck.b * prm.per_sample;
          double v = 0.0;
          for (int64_t j = threadIdx.x; j < prm.per_sample; j += blockDim.x) v += __ldcg(part + j);
          sum = block_sum(v, s_warp);
        }
        if (threadIdx.x == 0) {
          prm.loss[ck.b] = sample_loss(sum, prm.D, w);
          __threadfence();
          s_all_done = atomicAdd(prm.counter + prm.B, 1) == prm.B - 1;
        }
      }
      __syncthreads();
      if (sample_done && s_all_done) {
        __threadfence();
        double v = 0.0;
        for (int64_t b = threadIdx.x; b < prm.B; b += blockDim.x) v += widen(__ldcg(prm.loss + b));
        v = block_sum(v, s_warp);
        if (threadIdx.x == 0) *prm.total = to_c<C>(__ddiv_rn(v, __ll2double_rn(prm.loss_div)));
      }
      __syncthreads();  // the flags and s_warp are reused by the next chunk
    }
  }
}

// ---- launchers -------------------------------------------------------------------------------

template <typename F>
cudaError_t with_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(Tag<float>{});
    case DType::kFloat64:
      return f(Tag<double>{});
    case DType::kBFloat16:
      return f(Tag<__nv_bfloat16>{});
    case DType::kFloat16:
      return f(Tag<__half>{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(kind, has_mask) with both as compile-time constants (std::integral_constant).
template <typename F>
cudaError_t with_kind(int64_t kind, bool has_mask, F&& f) {
  auto with_mask = [&](auto kind_c) {
    return has_mask ? f(kind_c, std::true_type{}) : f(kind_c, std::false_type{});
  };
  switch (kind) {
    case kL2:
      return with_mask(std::integral_constant<int64_t, kL2>{});
    case kL1:
      return with_mask(std::integral_constant<int64_t, kL1>{});
    case kPseudoHuber:
      return with_mask(std::integral_constant<int64_t, kPseudoHuber>{});
  }
  return cudaErrorInvalidValue;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

MaskGeometry mask_geometry(int64_t inner, int64_t size, int64_t batch_stride) {
  auto capped = [](int64_t v) { return static_cast<uint32_t>(v < kMaskCap ? v : kMaskCap); };
  return {inner, size, batch_stride, magic_div(capped(inner)), magic_div(capped(size))};
}

// Threads per block: enough for a chunk's items in rounds of `round` elements per thread, in
// whole warps, at most kMaxThreads; fewer only when a sample is smaller than a chunk.
int threads_for(int64_t D, int item, int round) {
  const int64_t elems = D < kChunk ? D : kChunk;
  const int64_t items = elems / item + 2;  // a chunk need not start or end on an item boundary
  const int64_t per_thread = round / item;
  int64_t threads = (items + per_thread - 1) / per_thread;
  threads = (threads + 31) / 32 * 32;
  return static_cast<int>(threads < kMaxThreads ? threads : kMaxThreads);
}

unsigned grid_for(int64_t nchunks) {
  return static_cast<unsigned>(nchunks < INT_MAX ? nchunks : INT_MAX);
}

template <int kMode>
cudaError_t launch_noise_loss(const NoiseLossArgs& a, cudaStream_t stream) {
  if (a.B <= 0) return cudaSuccess;
  return with_type(a.pred_dtype, [&](auto ptag) {
    return with_type(a.eps_dtype, [&](auto etag) {
      using P = typename decltype(ptag)::type;
      using E = typename decltype(etag)::type;
      using C = compute_t<P>;
      LossParams<P, E> prm{};
      prm.pred = static_cast<const P*>(a.pred);
      prm.coef = static_cast<const C*>(a.coef);
      prm.noise = static_cast<const E*>(a.noise);
      prm.x0 = static_cast<const E*>(a.x0);
      prm.mask = static_cast<const C*>(a.mask);
      if (a.mask != nullptr) {
        if (a.mask_inner < 1 || a.mask_size < 1) return cudaErrorInvalidValue;
        prm.mask_geometry = mask_geometry(a.mask_inner, a.mask_size, a.mask_batch_stride);
      }
      prm.grad_output = static_cast<const C*>(a.grad_output);
      prm.go_numel = a.grad_output_numel;
      prm.loss = static_cast<C*>(a.loss);
      prm.total = static_cast<C*>(a.total);
      prm.grad = static_cast<P*>(a.grad);
      prm.partial = a.partial;
      prm.counter = a.counter;
      prm.seed = a.seed;
      prm.offset = a.offset;
      prm.grad_div = a.grad_div;
      prm.loss_div = a.loss_div;
      prm.B = a.B;
      prm.D = a.D;
      prm.per_sample = chunks_per_sample(a.D);
      prm.eps_term = (a.terms & kEpsTerm) != 0;
      prm.x0_term = (a.terms & kX0Term) != 0;
      const bool uses_noise = a.noise != nullptr && prm.eps_term;
      prm.vec = aligned16(a.pred) && (!uses_noise || aligned16(a.noise)) &&
                (!prm.x0_term || aligned16(a.x0)) && (a.grad == nullptr || aligned16(a.grad));
      const unsigned grid = grid_for(a.B * prm.per_sample);
      const int threads = threads_for(a.D, kItemOf<P, E>, kRoundOf<P, E>);
      return with_kind(a.kind, a.mask != nullptr, [&](auto kind_c, auto mask_c) {
        constexpr int64_t kKind = decltype(kind_c)::value;
        constexpr bool kMask = decltype(mask_c)::value;
        if (a.noise == nullptr) {
          _noise_loss_kernel<P, E, true, kMode, kKind, kMask><<<grid, threads, 0, stream>>>(prm);
        } else {
          _noise_loss_kernel<P, E, false, kMode, kKind, kMask><<<grid, threads, 0, stream>>>(prm);
        }
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace

cudaError_t add_noise(DType dtype, const void* x0, const void* coef, const void* noise,
                      uint64_t seed, uint64_t offset, bool perturbed, const void* xi,
                      uint64_t xi_seed, uint64_t xi_offset, void* x_t, int64_t B, int64_t D,
                      cudaStream_t stream) {
  if (B <= 0 || D <= 0) return cudaSuccess;
  return with_type(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    AddNoiseParams<T> prm;
    prm.x0 = static_cast<const T*>(x0);
    prm.coef = static_cast<const C*>(coef);
    prm.noise = static_cast<const T*>(noise);
    prm.xi = perturbed ? static_cast<const T*>(xi) : nullptr;
    prm.x_t = static_cast<T*>(x_t);
    prm.seed = seed;
    prm.offset = offset;
    prm.xi_seed = xi_seed;
    prm.xi_offset = xi_offset;
    prm.B = B;
    prm.D = D;
    prm.per_sample = chunks_per_sample(D);
    prm.vec = aligned16(x0) && aligned16(x_t) && (noise == nullptr || aligned16(noise)) &&
              (prm.xi == nullptr || aligned16(prm.xi));
    const unsigned grid = grid_for(B * prm.per_sample);
    const int threads = threads_for(D, kItemOf<T>, kRoundOf<T>);
    // The stream flags and the perturbation as template parameters: the unperturbed kernels
    // are the code of the op before it had a perturbation.
    auto launch = [&](auto stream_c) {
      constexpr bool kStream = decltype(stream_c)::value;
      if (!perturbed) {
        _add_noise_kernel<T, kStream, kNoXi><<<grid, threads, 0, stream>>>(prm);
      } else if (prm.xi != nullptr) {
        _add_noise_kernel<T, kStream, kXiTensor><<<grid, threads, 0, stream>>>(prm);
      } else {
        _add_noise_kernel<T, kStream, kXiStream><<<grid, threads, 0, stream>>>(prm);
      }
    };
    if (noise == nullptr) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
    return cudaGetLastError();
  });
}

cudaError_t noise_loss_fwd(const NoiseLossArgs& args, cudaStream_t stream) {
  return args.grad != nullptr ? launch_noise_loss<kLossGrad>(args, stream)
                              : launch_noise_loss<kLoss>(args, stream);
}

cudaError_t noise_loss_bwd(const NoiseLossArgs& args, cudaStream_t stream) {
  return launch_noise_loss<kGradOnly>(args, stream);
}

cudaError_t philox_normal(DType dtype, void* out, int64_t n, uint64_t seed, uint64_t offset,
                          cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return with_type(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t nchunks = (n + kChunk - 1) / kChunk;
    const int threads = threads_for(n, kItemOf<T>, kRoundOf<T>);
    _philox_normal_kernel<T><<<grid_for(nchunks), threads, 0, stream>>>(
        static_cast<T*>(out), n, seed, offset, nchunks, aligned16(out));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace debias
