// CPU kernels of the noise_loss op: the loss side of a diffusion training step, for every
// family (DDPM, flow matching, EDM) through per-sample coefficients. The contract (formulas,
// coefficient rows, `terms`, the scale convention, the schemas) is csrc/noise_loss.h.
//
//   add_noise       x_t = a_b * x0 + s_b * eps     (eps + g_b xi with input perturbation)
//   noise_loss_fwd  loss_b = w_b / D * sum_i m_i l(pred_i - y_i),  y = p_b eps + q_b x0,
//                   grad_i = k w_b / D * m_i h(pred_i - y_i)   (l2: l = d^2, h = d, k = 2;
//                   l1; pseudo-Huber; m the mask, read at its own size)
//   noise_loss_bwd  grad_i again, times the upstream gradient (GPU's recompute design)
//   philox_normal_  eps itself, materialised
//
// eps is either a given tensor or the package's Philox stream (philox.h), regenerated from
// (seed, offset) wherever it is needed, so a training step need not store it: add_noise reads
// x0 and writes x_t, noise_loss_fwd reads pred and writes grad, and the same eps reaches both.
// On a CPU the stream costs more to generate than to store, so add_noise can also write out
// the eps it generated (keep_noise) for the loss to read instead.
//
// Layout of this file: the stream generator (an AVX2+FMA path and a portable path, chosen
// once per process), the elementwise helpers, the kernels, the launchers, the registration.
// Ops live in torch.ops.debias_C; inputs are validated by the Python caller, and the launchers
// check the op's arguments with csrc/noise_loss_args.h, the checks the CUDA glue shares.
//
// Tile, chunk, worker and block mean what csrc/README.md says, in every kernel file.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "noise_loss.h"
#include "noise_loss_args.h"
#include "philox.h"

namespace debias {
namespace {

// Philox groups per generator batch: 16 groups = 64 normals = four AVX2 vectors of counters.
constexpr int64_t kBatchGroups = 16;
// Tile (csrc/README.md): elements per inner step; every per-step buffer stays in L1.
constexpr int64_t kTile = 1024;
// A tile of normals starts on a group boundary and ends on a batch boundary.
constexpr int64_t kNormalBuf = kTile + 4 * kBatchGroups;
// Elements per parallel task.
constexpr int64_t kGrain = 32768;
// Chunk (csrc/README.md): the loss's unit of reduction, fixed, never straddling a sample, so
// sums do not depend on threads.
constexpr int64_t kChunk = 16384;
// Independent accumulators of a squared-difference sum (vector lanes).
constexpr int kSumLanes = 16;
static_assert(kTile % (4 * kBatchGroups) == 0, "kNormalBuf assumes whole batches per tile");

// The per-call constants of the stream (philox.h): the key and the counter's offset words.
struct Stream {
  uint32_t k0, k1;  // seed, low and high word
  uint32_t o0, o1;  // offset, low and high word
};

Stream make_stream(int64_t seed, int64_t offset) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t o = static_cast<uint64_t>(offset);
  return {static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32), static_cast<uint32_t>(o),
          static_cast<uint32_t>(o >> 32)};
}

// Box-Muller on one batch. wa/wb hold the words of 2 * kBatchGroups pairs ordered as
// (x0 of g, x2 of g) and (x1 of g, x3 of g) for consecutive groups g, so the pair k gives
// normals 2k (cos) and 2k + 1 (sin) of the batch: element order, no transpose.
// kFused: multiply-adds as fma (the AVX2+FMA path) or as two roundings (philox.h).
template <bool kFused>
DEBIAS_INLINE void box_muller_batch(const uint32_t* wa,  // first words of the pairs
                                    const uint32_t* wb,  // second words of the pairs
                                    float* out) {        // 4 * kBatchGroups normals
  for (int64_t k = 0; k < 2 * kBatchGroups; ++k) {
    float c, s;
    philox::box_muller<kFused>(wa[k], wb[k], c, s);
    out[2 * k] = c;
    out[2 * k + 1] = s;
  }
}

// Stream generator: normals of groups [g0, g0 + nbatch * kBatchGroups) into out, in element
// order. Portable version: scalar Philox, Box-Muller auto-vectorised.
void normal_batches_generic(const Stream& st, uint64_t g0, int64_t nbatch, float* out) {
  for (int64_t bt = 0; bt < nbatch; ++bt) {
    alignas(64) uint32_t wa[2 * kBatchGroups];
    alignas(64) uint32_t wb[2 * kBatchGroups];
    for (int64_t j = 0; j < kBatchGroups; ++j) {
      const uint64_t g = g0 + static_cast<uint64_t>(bt * kBatchGroups + j);
      uint32_t c0 = static_cast<uint32_t>(g), c1 = static_cast<uint32_t>(g >> 32);
      uint32_t c2 = st.o0, c3 = st.o1;
      philox::philox4x32_10(c0, c1, c2, c3, st.k0, st.k1);
      wa[2 * j] = c0;
      wa[2 * j + 1] = c2;
      wb[2 * j] = c1;
      wb[2 * j + 1] = c3;
    }
    box_muller_batch<false>(wa, wb, out + 4 * kBatchGroups * bt);
  }
}

#if defined(__x86_64__)
// AVX2+FMA version. One group per 64-bit lane: vpmuludq multiplies the low words of
// the lanes into full 64-bit products, so a product is at once (lo in the low word) and
// (hi after a 64-bit shift); the high words of lanes carry garbage that no step reads.
// Four vectors (16 groups) advance round by round to hide the multiply latency.
__attribute__((target("avx2,fma"))) void normal_batches_avx2(const Stream& st, uint64_t g0,
                                                          int64_t nbatch, float* out) {
  constexpr int kVecs = kBatchGroups / 4;
  __m256i round_k0[10], round_k1[10];
  uint32_t k0 = st.k0, k1 = st.k1;
  for (int r = 0; r < 10; ++r) {
    round_k0[r] = _mm256_set1_epi64x(k0);
    round_k1[r] = _mm256_set1_epi64x(k1);
    k0 += philox::kW0;
    k1 += philox::kW1;
  }
  const __m256i m0 = _mm256_set1_epi64x(philox::kM0);
  const __m256i m1 = _mm256_set1_epi64x(philox::kM1);
  const __m256i off0 = _mm256_set1_epi64x(st.o0);
  const __m256i off1 = _mm256_set1_epi64x(st.o1);
  const __m256i iota = _mm256_setr_epi64x(0, 1, 2, 3);
  for (int64_t bt = 0; bt < nbatch; ++bt) {
    const uint64_t gb = g0 + static_cast<uint64_t>(bt * kBatchGroups);
    __m256i c0[kVecs], c1[kVecs], c2[kVecs], c3[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      const __m256i g =
          _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(gb + 4 * v)), iota);
      c0[v] = g;
      c1[v] = _mm256_srli_epi64(g, 32);
      c2[v] = off0;
      c3[v] = off1;
    }
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      for (int v = 0; v < kVecs; ++v) {
        const __m256i p0 = _mm256_mul_epu32(c0[v], m0);
        const __m256i p1 = _mm256_mul_epu32(c2[v], m1);
        const __m256i hi1 = _mm256_srli_epi64(p1, 32);
        const __m256i hi0 = _mm256_srli_epi64(p0, 32);
        const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), round_k0[r]);
        const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), round_k1[r]);
        c0[v] = n0;
        c1[v] = p1;
        c2[v] = n2;
        c3[v] = p0;
      }
    }
    alignas(64) uint32_t wa[2 * kBatchGroups];
    alignas(64) uint32_t wb[2 * kBatchGroups];
    for (int v = 0; v < kVecs; ++v) {
      const __m256i a = _mm256_blend_epi32(c0[v], _mm256_slli_epi64(c2[v], 32), 0xaa);
      const __m256i b = _mm256_blend_epi32(c1[v], _mm256_slli_epi64(c3[v], 32), 0xaa);
      _mm256_store_si256(reinterpret_cast<__m256i*>(wa + 8 * v), a);
      _mm256_store_si256(reinterpret_cast<__m256i*>(wb + 8 * v), b);
    }
    box_muller_batch<true>(wa, wb, out + 4 * kBatchGroups * bt);
  }
}
#endif

using NormalBatchesFn = void (*)(const Stream&, uint64_t, int64_t, float*);

// Chosen once per process (cpu_isa.h): the AVX2 generator also needs FMA.
NormalBatchesFn pick_normal_batches() {
#if defined(__x86_64__)
  if (cpu_has_avx2(/*fma=*/true)) return normal_batches_avx2;
#endif
  return normal_batches_generic;
}

// Returns p with p[k] = normal_{i0 + k} for 0 <= k < n <= kTile; buf holds kNormalBuf
// floats. The stream depends on i only: a tile may start and end anywhere in a group.
const float* stream_normals(const Stream& st, int64_t i0, int64_t n, float* buf) {
  static const NormalBatchesFn normal_batches = pick_normal_batches();
  const int64_t g0 = i0 >> 2;
  const int64_t ngroups = ((i0 + n + 3) >> 2) - g0;
  const int64_t nbatch = (ngroups + kBatchGroups - 1) / kBatchGroups;
  normal_batches(st, static_cast<uint64_t>(g0), nbatch, buf);
  return buf + (i0 & 3);
}

// Compute type: double for float64 data, float otherwise.
template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// float -> bfloat16 with c10::BFloat16's rounding (to nearest even, NaN -> 0x7FC0), written
// without a branch so that loops of it vectorise; c10's branches on NaN and does not.
DEBIAS_INLINE c10::BFloat16 to_bfloat16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t bits = v != v ? 0x7FC0u : rounded;
  return c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
}

// A compute-type value stored as T (rounded to nearest even).
template <typename T, typename C>
DEBIAS_INLINE T to_storage(C v) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<C, float>) {
    return to_bfloat16(v);
  } else {
    return static_cast<T>(v);
  }
}

// rnd_T: round a compute-type value to storage type T and back.
template <typename T, typename C>
DEBIAS_INLINE C rnd(C v) {
  return static_cast<C>(to_storage<T>(v));
}

// eps of elements [i0, i0 + n) as values of E: noise + i0 when noise is given, else
// rnd_E(normal_i) from the stream, in nbuf (E float) or ebuf (kTile values). The tiles read E
// and convert to their compute type in the loop itself.
template <typename E>
const E* load_eps(const E* noise,  // [N] or nullptr: use the stream
                  const Stream& st, int64_t i0, int64_t n, float* nbuf, E* ebuf) {
  if (noise != nullptr) return noise + i0;
  const float* normal = stream_normals(st, i0, n, nbuf);
  if constexpr (std::is_same_v<E, float>) {
    return normal;
  } else {
    for (int64_t k = 0; k < n; ++k) ebuf[k] = to_storage<E>(normal[k]);
    return ebuf;
  }
}

// src [n] as values of T: src itself when it holds T, else converted into buf (n <= kTile).
template <typename T, typename E>
DEBIAS_INLINE const T* as_type(const E* src, int64_t n, T* buf) {
  if constexpr (std::is_same_v<T, E>) {
    return src;
  } else {
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<T>(src[k]);
    return buf;
  }
}

// add_noise forward. For element i of sample b, a = a[b], s = s[b]:
//     x_t[i] = rnd_T(rnd_T(a * x0[i]) + rnd_T(s * e_i)),  e_i = eps_i
// which is `a * x0 + s * noise` evaluated by torch in dtype T, bit for bit; kPerturbed
// (g = g[b]): e_i = rnd_T(eps_i + rnd_T(g * xi_i)), `noise + g * xi` first, as the trainers
// write input perturbation. eps and xi come in tiles of kTile elements, whatever the sample
// size. Memory: read x0 (and noise, xi when given), write x_t (and eps when kept).
template <typename T>
struct AddNoiseKernel {
  const T* x0;              // [B * D]
  const compute_t<T>* a;    // [B] signal coefficient, rounded to T
  const compute_t<T>* s;    // [B] noise coefficient, rounded to T
  const compute_t<T>* g;    // [B] perturbation strength (kPerturbed)
  const T* noise;           // [B * D] or nullptr: the stream
  Stream st;
  const T* xi;              // [B * D] or nullptr: the stream xi_st
  Stream xi_st;
  T* x_t;                   // [B * D] output
  T* eps_out;               // [B * D] output or nullptr: eps kept
  int64_t D;
};

// Per-tile buffers of add_noise (load_eps's): nbuf and ebuf for eps, the xi_ ones for xi.
template <typename T, bool kPerturbed>
struct AddNoiseBuffers {
  alignas(64) float nbuf[kNormalBuf];
  alignas(64) T ebuf[kTile];
  alignas(64) float xi_nbuf[kPerturbed ? kNormalBuf : 1];
  alignas(64) T xi_ebuf[kPerturbed ? kTile : 1];
};

// Elements [i0, i1) of add_noise, i1 - i0 <= kTile. Compiled twice (_add_noise_tile below),
// the same operations in the same order for any ISA.
template <typename T, bool kPerturbed>
DEBIAS_INLINE void add_noise_tile(const AddNoiseKernel<T>& kn, int64_t i0, int64_t i1,
                                  AddNoiseBuffers<T, kPerturbed>& buf) {
  using C = compute_t<T>;
  const T* eps = load_eps<T>(kn.noise, kn.st, i0, i1 - i0, buf.nbuf, buf.ebuf);
  const T* xis = nullptr;
  if constexpr (kPerturbed) {
    xis = load_eps<T>(kn.xi, kn.xi_st, i0, i1 - i0, buf.xi_nbuf, buf.xi_ebuf);
  }
  if (kn.eps_out != nullptr) {
    std::memcpy(kn.eps_out + i0, eps, static_cast<size_t>(i1 - i0) * sizeof(T));
  }
  // the runs of [i0, i1) that lie in one sample
  for (int64_t b = i0 / kn.D; b * kn.D < i1; ++b) {
    const int64_t r0 = std::max(i0, b * kn.D), r1 = std::min(i1, (b + 1) * kn.D);
    const C ab = kn.a[b];
    const C sb = kn.s[b];
    const T* e = eps + (r0 - i0);
    const T* x = kn.x0 + r0;
    T* out = kn.x_t + r0;
    if constexpr (kPerturbed) {
      const C gb = kn.g[b];
      const T* z = xis + (r0 - i0);
      for (int64_t k = 0; k < r1 - r0; ++k) {
        const C perturbed = rnd<T>(static_cast<C>(e[k]) + rnd<T>(gb * static_cast<C>(z[k])));
        const C signal = rnd<T>(ab * static_cast<C>(x[k]));
        const C scaled_eps = rnd<T>(sb * perturbed);
        out[k] = to_storage<T>(signal + scaled_eps);
      }
    } else {
      for (int64_t k = 0; k < r1 - r0; ++k) {
        const C signal = rnd<T>(ab * static_cast<C>(x[k]));
        const C scaled_eps = rnd<T>(sb * static_cast<C>(e[k]));
        out[k] = to_storage<T>(signal + scaled_eps);
      }
    }
  }
}

// add_noise_tile for the baseline ISA and for AVX2 (cpu_has_avx2): twice the vector lanes
// (bfloat16 add_noise, 262k elements: 334 -> 241 us on 2 threads).
template <typename T, bool kPerturbed>
void _add_noise_tile(const AddNoiseKernel<T>& kn, int64_t i0, int64_t i1,
                     AddNoiseBuffers<T, kPerturbed>& buf) {
  add_noise_tile<T, kPerturbed>(kn, i0, i1, buf);
}

#if defined(__x86_64__)
template <typename T, bool kPerturbed>
__attribute__((target("avx2"))) void _add_noise_tile_avx2(
    const AddNoiseKernel<T>& kn, int64_t i0, int64_t i1, AddNoiseBuffers<T, kPerturbed>& buf) {
  add_noise_tile<T, kPerturbed>(kn, i0, i1, buf);
}
#endif

template <typename T, bool kPerturbed>
void _add_noise_fwd_kernel(const AddNoiseKernel<T>& kn, int64_t N) {
  auto tile = _add_noise_tile<T, kPerturbed>;
#if defined(__x86_64__)
  if (cpu_has_avx2()) tile = _add_noise_tile_avx2<T, kPerturbed>;
#endif
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    AddNoiseBuffers<T, kPerturbed> buf;
    for (int64_t i0 = begin; i0 < end; i0 += kTile) tile(kn, i0, std::min(i0 + kTile, end), buf);
  });
}

// y_i = p eps_i + q x0_i with the terms of kTerms (noise_loss.h), each product rounded; eps
// and x0 hold values of E, read as C.
template <int64_t kTerms, typename E, typename C>
DEBIAS_INLINE C target(const E* eps, const E* x0, int64_t i, C p, C q) {
  using namespace noise_loss;
  if constexpr (kTerms == kEpsTerm) return p * static_cast<C>(eps[i]);
  if constexpr (kTerms == kX0Term) return q * static_cast<C>(x0[i]);
  if constexpr (kTerms == (kEpsTerm | kX0Term)) {
    const C pe = p * static_cast<C>(eps[i]);
    const C qx = q * static_cast<C>(x0[i]);
    return pe + qx;
  }
}

// The mask's values m_i of elements [j0, j0 + n) of one sample (noise_loss.h): the sample's
// row of the mask is read at (j / inner) % size. Points into the row when the run is one
// stretch of it, else into buf (kTile values), filled a constant or contiguous run at a time.
template <typename C>
const C* mask_values(const C* row, int64_t inner, int64_t size, int64_t j0, int64_t n, C* buf) {
  int64_t m = (j0 / inner) % size;
  int64_t r = j0 % inner;
  if (inner == 1 && m + n <= size) return row + m;
  for (int64_t k = 0; k < n;) {
    if (inner == 1) {
      const int64_t len = std::min(n - k, size - m);
      std::memcpy(buf + k, row + m, static_cast<size_t>(len) * sizeof(C));
      k += len;
      m = 0;
    } else {
      const int64_t len = std::min(n - k, inner - r);
      std::fill(buf + k, buf + k + len, row[m]);
      k += len;
      r = 0;
      m = m + 1 == size ? 0 : m + 1;
    }
  }
  return buf;
}

// The elementwise loss l(d) and its derivative factor h(d) of kind kKind (noise_loss.h);
// c and cc = rnd(c * c) are the sample's pseudo-Huber constants. Each operation rounds on its
// own; std::sqrt and '/' are IEEE (correctly rounded), as on the GPU.
template <int64_t kKind, typename C>
DEBIAS_INLINE void loss_and_factor(C d, C c, C cc, C& l, C& h) {
  using namespace noise_loss;
  if constexpr (kKind == kL2) {
    l = d * d;
    h = d;
  } else if constexpr (kKind == kL1) {
    l = std::abs(d);
    // sign(d); 0 keeps its sign, NaN stays NaN. Two selects of a constant, which compilers
    // turn into vector blends (the nested form became a branch: 25x slower on random signs).
    h = d > C(0) ? C(1) : d;
    h = d < C(0) ? C(-1) : h;
  } else {
    const C dd = d * d;
    const C r = std::sqrt(dd + cc);
    l = dd / (r + c);
    h = d / r;
  }
}

// Sum of m_i l(pred_i - y_i) over n elements of one sample, and
// grad = rnd_P(gscale * (m_i h_i)) when kGrad. kSumLanes running sums in C (vector lanes),
// added in double at the end: n <= kTile keeps the float error of a lane near 64 roundings.
template <typename P, typename E, typename C, bool kGrad, int64_t kTerms, int64_t kKind,
          bool kMask>
DEBIAS_INLINE double loss_tile(const P* pred, const E* eps, const E* x0, const C* mask, C p,
                               C q, C c, int64_t n, P* grad, C gscale) {
  const C cc = c * c;
  C acc[kSumLanes] = {};
  auto step = [&](int64_t i, int j) {
    const C d = static_cast<C>(pred[i]) - target<kTerms>(eps, x0, i, p, q);
    C l, h;
    loss_and_factor<kKind>(d, c, cc, l, h);
    if constexpr (kMask) {
      l = mask[i] * l;
      h = mask[i] * h;
    }
    acc[j] += l;
    if constexpr (kGrad) grad[i] = to_storage<P>(gscale * h);
  };
  int64_t k = 0;
  for (; k + kSumLanes <= n; k += kSumLanes) {
    for (int j = 0; j < kSumLanes; ++j) step(k + j, j);
  }
  for (int j = 0; k + j < n; ++j) step(k + j, j);
  double sum = 0.0;  // lanes past n hold 0 and would add nothing
  for (int j = 0; j < std::min<int64_t>(n, kSumLanes); ++j) sum += static_cast<double>(acc[j]);
  return sum;
}

// Loss chunks in flat order: sample s is cut into per_sample chunks of kChunk elements (the
// last one shorter). next() walks without divisions, which matters when D is tiny.
struct ChunkCursor {
  int64_t D, per_sample;
  int64_t index, sample, part;  // chunk index = sample * per_sample + part
  int64_t begin, end;         // flat range of the chunk

  ChunkCursor(int64_t D_, int64_t per_sample_, int64_t index_)
      : D(D_), per_sample(per_sample_), index(index_), sample(index_ / per_sample_),
        part(index_ % per_sample_) {
    bounds();
  }
  void next() {
    ++index;
    if (++part == per_sample) {
      part = 0;
      ++sample;
    }
    bounds();
  }
  void bounds() {
    begin = sample * D + part * kChunk;
    end = std::min(begin + kChunk, (sample + 1) * D);
  }
};

// noise_loss forward (+ gradient). For element i of sample b, with C the compute type
// (noise_loss.h has the contract, the kinds of loss l and their factors h and k):
//     y_i    = p_b eps_i + q_b x0_i           (the terms of kTerms only)
//     loss_b = (sum_i m_i l(pred_i - y_i) / D) * w_b
//     grad_i = rnd_P((k * w_b / D / grad_div * go_b) * (m_i h(pred_i - y_i)))
// (the factor once per sample in C; go_b is the upstream gradient of the backward op, 1 in
// the forward pass; m_i = 1 and no product without a mask).
// Determinism: samples are cut into fixed chunks of at most kChunk elements and chunks into
// pieces of at most kTile from the chunk start; a piece is summed by one loss_tile call, a
// chunk adds its pieces in order into its own slot, a sample adds its chunks in order. The
// cuts depend on D alone, so the loss has the same bits for any number of threads. Threads
// take whole chunks; a step of a thread covers as many whole pieces as fit in kTile elements
// (several samples when D is small), so eps is generated in long runs. eps comes from the
// stream when noise is nullptr and only when the eps term is used.
// Memory: read pred (+ noise, + x0), write grad: 2N (3N, 4N) elements, B outputs, and the
// mask's own values (never expanded).
template <typename P, typename E>
struct LossKernel {
  using C = compute_t<P>;
  const P* pred;              // [B, D] model output, rows pred_stride apart
  int64_t pred_stride;        // D when contiguous
  const C* w;                 // [B] loss weight
  const C* p;                 // [B] eps coefficient of the target
  const C* q;                 // [B] x0 coefficient of the target
  const C* c;                 // [B] pseudo-Huber c, or nullptr
  C k;                        // the kind's gradient factor: 2 for l2, else 1
  const C* mask;              // Mb x mask_size, or nullptr
  int64_t mask_inner, mask_size, mask_batch_stride;
  const E* noise;             // [B * D] or nullptr: the stream
  const E* x0;                // [B * D] or nullptr (no x0 term)
  Stream st;
  int64_t grad_div;           // B for a batch mean, else 1
  const C* grad_output;       // [B] or [1] or nullptr (= 1)
  int64_t go_stride;          // 1 for [B], 0 for [1]
  P* grad;                    // [B * D] output when kGrad
  int64_t B, D;
  int64_t chunks_per_sample;  // ceil(D / kChunk)
};

// loss_tile for the baseline ISA (SSE2 vectors on x86-64) and for AVX2 (cpu_has_avx2): twice
// the lanes for the pseudo-Huber tile, bound by its square root and divisions (262k elements:
// 147 -> ~75 us on 2 threads). The same operations in the same order for any ISA, so the bits
// do not depend on which one runs (no FMA: -ffp-contract=off).
#define DEBIAS_LOSS_TILE_PARAMS                                                             \
  const P *pred, const E *eps, const E *x0, const C *mask, C p, C q, C c, int64_t n, P *grad, \
      C gscale
#define DEBIAS_LOSS_TILE_CALL \
  loss_tile<P, E, C, kGrad, kTerms, kKind, kMask>(pred, eps, x0, mask, p, q, c, n, grad, gscale)

template <typename P, typename E, typename C, bool kGrad, int64_t kTerms, int64_t kKind,
          bool kMask>
double _loss_tile(DEBIAS_LOSS_TILE_PARAMS) {
  return DEBIAS_LOSS_TILE_CALL;
}

#if defined(__x86_64__)
template <typename P, typename E, typename C, bool kGrad, int64_t kTerms, int64_t kKind,
          bool kMask>
__attribute__((target("avx2"))) double _loss_tile_avx2(DEBIAS_LOSS_TILE_PARAMS) {
  return DEBIAS_LOSS_TILE_CALL;
}
#endif
#undef DEBIAS_LOSS_TILE_PARAMS
#undef DEBIAS_LOSS_TILE_CALL

template <typename P, typename E, typename C>
using LossTileFn = double (*)(const P*, const E*, const E*, const C*, C, C, C, int64_t, P*, C);

// _loss_tile of the call's kind, mask and ISA, chosen once per call.
template <typename P, typename E, typename C, bool kGrad, int64_t kTerms>
LossTileFn<P, E, C> pick_loss_tile(int64_t kind, bool has_mask) {
  using namespace noise_loss;
  auto pick = [&](auto kind_c) -> LossTileFn<P, E, C> {
    constexpr int64_t K = decltype(kind_c)::value;
#if defined(__x86_64__)
    if (cpu_has_avx2()) {
      if (has_mask) return _loss_tile_avx2<P, E, C, kGrad, kTerms, K, true>;
      return _loss_tile_avx2<P, E, C, kGrad, kTerms, K, false>;
    }
#endif
    if (has_mask) return _loss_tile<P, E, C, kGrad, kTerms, K, true>;
    return _loss_tile<P, E, C, kGrad, kTerms, K, false>;
  };
  if (kind == kL1) return pick(std::integral_constant<int64_t, kL1>{});
  if (kind == kPseudoHuber) return pick(std::integral_constant<int64_t, kPseudoHuber>{});
  return pick(std::integral_constant<int64_t, kL2>{});
}

template <typename P, typename E, bool kGrad, int64_t kTerms>
void _noise_loss_fwd_kernel(const LossKernel<P, E>& kn, int64_t kind,
                            compute_t<P>* loss) {  // [B] output
  using C = compute_t<P>;
  constexpr bool kEps = (kTerms & noise_loss::kEpsTerm) != 0;
  constexpr bool kX0 = (kTerms & noise_loss::kX0Term) != 0;
  // The tile reads eps and x0 as E when E is pred's dtype (the usual case), else as C.
  using T = std::conditional_t<std::is_same_v<E, P>, E, C>;
  constexpr int64_t kConvert = std::is_same_v<T, E> ? 1 : kTile;
  const auto loss_tile = pick_loss_tile<P, T, C, kGrad, kTerms>(kind, kn.mask != nullptr);
  const int64_t D = kn.D;
  const int64_t nchunks = kn.B * kn.chunks_per_sample;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, std::min(D, kChunk)));
  std::vector<double> partial(static_cast<size_t>(nchunks));
  at::parallel_for(0, nchunks, grain, [&](int64_t lo, int64_t hi) {
    alignas(64) float nbuf[kNormalBuf];
    alignas(64) E ebuf[kTile];
    alignas(64) T tbuf[kConvert];
    alignas(64) T xbuf[kConvert];
    alignas(64) C mbuf[kTile];
    ChunkCursor cur(D, kn.chunks_per_sample, lo);  // chunk of the next piece
    int64_t pos = cur.begin;                       // start of the next piece
    double chunk_sum = 0.0;
    while (cur.index < hi) {
      // This step: [c0, c1), the whole pieces from pos on that fit in kTile elements.
      const int64_t c0 = pos;
      int64_t c1 = c0;
      for (ChunkCursor look = cur; look.index < hi;) {
        const int64_t piece_end = std::min(c1 + kTile, look.end);
        if (piece_end - c0 > kTile) break;
        c1 = piece_end;
        if (piece_end == look.end) look.next();
      }
      const T* eps = nullptr;
      const T* xs = nullptr;
      if constexpr (kEps) {
        eps = as_type<T>(load_eps<E>(kn.noise, kn.st, c0, c1 - c0, nbuf, ebuf), c1 - c0, tbuf);
      }
      if constexpr (kX0) xs = as_type<T>(kn.x0 + c0, c1 - c0, xbuf);
      for (int64_t i = c0; i < c1;) {
        const int64_t piece_end = std::min(i + kTile, cur.end);
        const int64_t b = cur.sample;
        C gscale = kn.k * kn.w[b] / static_cast<C>(D) / static_cast<C>(kn.grad_div);
        if (kn.grad_output != nullptr) gscale *= kn.grad_output[b * kn.go_stride];
        const C* ms = nullptr;
        if (kn.mask != nullptr) {
          ms = mask_values(kn.mask + b * kn.mask_batch_stride, kn.mask_inner, kn.mask_size,
                           i - b * D, piece_end - i, mbuf);
        }
        chunk_sum += loss_tile(kn.pred + i + b * (kn.pred_stride - D),
                               kEps ? eps + (i - c0) : nullptr, kX0 ? xs + (i - c0) : nullptr, ms,
                               kn.p[b], kn.q[b], kn.c == nullptr ? C(0) : kn.c[b],
                               piece_end - i, kGrad ? kn.grad + i : nullptr, gscale);
        if (piece_end == cur.end) {
          partial[static_cast<size_t>(cur.index)] = chunk_sum;
          chunk_sum = 0.0;
          cur.next();
        }
        i = piece_end;
      }
      pos = c1;
    }
  });
  for (int64_t b = 0; b < kn.B; ++b) {
    double sum = 0.0;
    for (int64_t j = 0; j < kn.chunks_per_sample; ++j) {
      sum += partial[static_cast<size_t>(b * kn.chunks_per_sample + j)];
    }
    loss[b] = static_cast<C>(sum / static_cast<double>(D) * static_cast<double>(kn.w[b]));
  }
}

// philox_normal: out[i] = rnd_T(normal_i). Memory: write N elements of T.
template <typename T>
void _philox_normal_kernel(Stream st, T* out, int64_t N) {
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float nbuf[kNormalBuf];
    for (int64_t i0 = begin; i0 < end; i0 += kTile) {
      const int64_t n = std::min(kTile, end - i0);
      const float* normal = stream_normals(st, i0, n, nbuf);
      for (int64_t k = 0; k < n; ++k) out[i0 + k] = to_storage<T>(normal[k]);
    }
  });
}

// Schema: DEBIAS_ADD_NOISE_SCHEMA (noise_loss.h). Returns (x_t like x0, the eps of the
// stream like x0 when keep_noise and noise is None, else an empty [0] tensor).
std::tuple<at::Tensor, at::Tensor> add_noise_cpu(const at::Tensor& x0, const at::Tensor& coef,
                                                 const std::optional<at::Tensor>& noise,
                                                 int64_t seed, int64_t offset,
                                                 bool keep_noise,
                                                 const std::optional<at::Tensor>& xi,
                                                 int64_t xi_seed, int64_t xi_offset) {
  using namespace noise_loss;
  const AddNoiseArgs args = add_noise_args(kCPU, x0, coef, noise, xi);
  at::Tensor out = at::empty_like(x0);
  const bool keep = keep_noise && !noise.has_value();
  at::Tensor kept = keep ? at::empty_like(x0) : at::empty({0}, x0.options());
  if (x0.numel() == 0) return {out, kept};
  const int64_t B = args.B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "add_noise", [&] {
    using C = compute_t<scalar_t>;
    const C* c = coef.data_ptr<C>();
    auto run = [&](auto perturbed) {
      const AddNoiseKernel<scalar_t> kn{
          x0.data_ptr<scalar_t>(), c + kRowA * B, c + kRowS * B,
          args.perturbed ? c + kRowG * B : nullptr,
          noise.has_value() ? noise->data_ptr<scalar_t>() : nullptr, make_stream(seed, offset),
          xi.has_value() ? xi->data_ptr<scalar_t>() : nullptr, make_stream(xi_seed, xi_offset),
          out.data_ptr<scalar_t>(), keep ? kept.data_ptr<scalar_t>() : nullptr, args.D};
      _add_noise_fwd_kernel<scalar_t, decltype(perturbed)::value>(kn, B * args.D);
    };
    if (args.perturbed) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  return {out, kept};
}

// Runs the loss kernel into loss ([B], C) and, when grad is given, grad (like pred);
// grad_output (C, [B] or [1], contiguous) scales the gradient when given.
void run_noise_loss(const noise_loss::LossArgs& a, const at::Tensor* grad_output,
                    at::Tensor& loss, at::Tensor* grad) {
  using namespace noise_loss;
  const int64_t B = a.B, D = a.D;
  if (B == 0) return;
  const Stream st = make_stream(a.seed, a.offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.pred_dtype, "noise_loss", [&] {
    using P = scalar_t;
    using C = compute_t<P>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.eps_dtype, "noise_loss", [&] {
      using E = scalar_t;
      const C* c = a.coef->data_ptr<C>();
      const E* noise_p = a.noise != nullptr ? a.noise->data_ptr<E>() : nullptr;
      const E* x0_p = a.x0 != nullptr ? a.x0->data_ptr<E>() : nullptr;
      const C* go_p = grad_output != nullptr ? grad_output->data_ptr<C>() : nullptr;
      const int64_t go_stride = grad_output != nullptr && grad_output->numel() > 1 ? 1 : 0;
      const LossKernel<P, E> kn{
          a.pred->data_ptr<P>(), a.pred_stride, c + kRowW * B, c + kRowP * B, c + kRowQ * B,
          a.kind == kPseudoHuber ? c + kRowC * B : nullptr, C(a.kind == kL2 ? 2 : 1),
          a.mask != nullptr ? a.mask->data_ptr<C>() : nullptr, a.mask_inner, a.mask_size,
          a.mask_batch_stride, noise_p, x0_p, st, a.grad_div, go_p, go_stride,
          grad != nullptr ? grad->data_ptr<P>() : nullptr, B, D, (D + kChunk - 1) / kChunk};
      auto run = [&](auto grad_flag, auto terms_c) {
        _noise_loss_fwd_kernel<P, E, decltype(grad_flag)::value, decltype(terms_c)::value>(
            kn, a.kind, loss.data_ptr<C>());
      };
      auto with_terms = [&](auto grad_flag) {
        using Eps = std::integral_constant<int64_t, kEpsTerm>;
        using X0 = std::integral_constant<int64_t, kX0Term>;
        using Both = std::integral_constant<int64_t, kEpsTerm | kX0Term>;
        if (a.terms == kEpsTerm) {
          run(grad_flag, Eps{});
        } else if (a.terms == kX0Term) {
          run(grad_flag, X0{});
        } else {
          run(grad_flag, Both{});
        }
      };
      if (grad != nullptr) {
        with_terms(std::true_type{});
      } else {
        with_terms(std::false_type{});
      }
    });
  });
}

// Schema: DEBIAS_NOISE_LOSS_FWD_SCHEMA (noise_loss.h). Returns (loss [B] in C, total [] in C,
// grad like pred or an empty [0] tensor when not need_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor> noise_loss_fwd_cpu(DEBIAS_NOISE_LOSS_PARAMS,
                                                                  int64_t loss_div,
                                                                  bool need_grad) {
  using namespace noise_loss;
  const LossArgs args = loss_args(kNoiseLossFwdOp, kCPU, DEBIAS_NOISE_LOSS_PARAM_NAMES);
  check_loss_div(loss_div);
  at::Tensor loss = at::empty({args.B}, pred.options().dtype(args.compute_dtype));
  at::Tensor grad = at::empty(need_grad ? pred.sizes() : at::IntArrayRef{0}, pred.options());
  run_noise_loss(args, nullptr, loss, need_grad ? &grad : nullptr);
  at::Tensor total = at::empty({}, loss.options());
  AT_DISPATCH_FLOATING_TYPES(args.compute_dtype, "noise_loss_total", [&] {
    const scalar_t* lp = loss.data_ptr<scalar_t>();
    double sum = 0.0;
    for (int64_t b = 0; b < loss.numel(); ++b) sum += static_cast<double>(lp[b]);
    *total.data_ptr<scalar_t>() = static_cast<scalar_t>(sum / static_cast<double>(loss_div));
  });
  return {loss, total, grad};
}

// Schema: DEBIAS_NOISE_LOSS_BWD_SCHEMA (noise_loss.h). The gradient of noise_loss_fwd
// recomputed, each sample's factor times grad_output (C, 1 or B values).
at::Tensor noise_loss_bwd_cpu(DEBIAS_NOISE_LOSS_PARAMS, const at::Tensor& grad_output) {
  using namespace noise_loss;
  const LossArgs args = loss_args(kNoiseLossBwdOp, kCPU, DEBIAS_NOISE_LOSS_PARAM_NAMES);
  const at::Tensor go = grad_output_values(kCPU, args, grad_output);
  at::Tensor loss = at::empty({args.B}, pred.options().dtype(args.compute_dtype));
  at::Tensor grad = at::empty(pred.sizes(), pred.options());
  run_noise_loss(args, &go, loss, &grad);
  return grad;
}

// Schema: DEBIAS_PHILOX_NORMAL_SCHEMA (noise_loss.h). Fills a contiguous CPU tensor with the
// stream of (seed, offset), rounded to its dtype (float64 holds the float32 normals exactly).
void philox_normal_cpu(at::Tensor& out, int64_t seed, int64_t offset) {
  noise_loss::check_philox_out(kCPU, out);
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "philox_normal",
                                  [&] {
    _philox_normal_kernel<scalar_t>(make_stream(seed, offset), out.data_ptr<scalar_t>(),
                                    out.numel());
  });
}

}  // namespace
}  // namespace debias

TORCH_LIBRARY(debias_C, m) {
  m.def(DEBIAS_ADD_NOISE_SCHEMA);
  m.def(DEBIAS_NOISE_LOSS_FWD_SCHEMA);
  m.def(DEBIAS_NOISE_LOSS_BWD_SCHEMA);
  m.def(DEBIAS_PHILOX_NORMAL_SCHEMA);
}

TORCH_LIBRARY_IMPL(debias_C, CPU, m) {
  m.impl("add_noise", &debias::add_noise_cpu);
  m.impl("noise_loss_fwd", &debias::noise_loss_fwd_cpu);
  m.impl("noise_loss_bwd", &debias::noise_loss_bwd_cpu);
  m.impl("philox_normal_", &debias::philox_normal_cpu);
}
