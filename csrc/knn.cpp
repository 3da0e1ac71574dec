// CPU kernel of the knn op's fast pass: candidate nearest neighbours by the expanded score.
//
//   knn_candidates  r_ij = qn_i + yn_j - 2 <q_i, y_j>   (evaluated left to right in T)
//                   for each query i, the k database rows j with the smallest r_ij,
//                   sorted by (r, j); a NaN score ranks as +inf, still ordered by j
//
// The caller (debias/ops/knn.py) centres the data, computes the squared norms qn, yn, asks for
// k plus a margin and certifies and re-ranks the candidates exactly in float64: this op only
// has to be fast and to select exactly by the score it states.
//
// The n x m score matrix is never built. A chunk of queries times a tile of database rows goes
// through BLAS (at::mm_out: MKL sgemm / dgemm) into a tile buffer of a few MiB, and a fused
// scan turns each product row into scores and keeps a running top-k per query. Most scores
// lose to the current k-th best with one compare; the scan tests a tile of them at once and
// looks at single scores only when one of the tile wins.
//
// knn_quantize and knn_candidates_int8 are the int8 pass: the same search on two levels of
// int8 codes, with exact int32 products from at::_int_mm (oneDNN: AMX or VNNI); see the section
// "the int8 pass" below.
//
// Layout of this file: the per-query top-k (sorted insertion for small k, a buffer compacted
// by nth_element for large k), the row scan, the tiled driver, the launcher; then the int8
// pass (quantisation, its scan, driver and launchers); the registration. The ops' schemas and
// argument checks are csrc/knn_args.h, shared with the CUDA glue.
//
// Tile, chunk, worker and block mean what csrc/README.md says, in every kernel file.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "knn_args.h"

namespace debias {
namespace {

// Up to this k the running top-k is a sorted array with insertion; above it, a buffer that is
// compacted to its k best by nth_element whenever it fills up.
constexpr int64_t kSortedMaxK = 32;
// Scores tested together by the scan's threshold compare (two AVX2 vectors of float).
constexpr int64_t kScanTile = 16;

// The order of scores: NaN ranks as +inf.
template <typename T>
inline T rank_key(T r) {
  return std::isnan(r) ? std::numeric_limits<T>::infinity() : r;
}

// The running top-k of one query under the order (rank_key(r), j). Database rows reach it in
// increasing j, so a newcomer with a score equal to the current k-th best never displaces it:
// once the top-k is full, a score enters iff rank_key(score) < thr, and since NaN < thr is
// false that is the plain compare `score < thr`.
template <typename T, bool kSorted>
struct TopK {
  T* r;             // [cap] scores; kSorted: ascending in (rank_key(r), j) over [0, size)
  int64_t* idx;     // [cap] database rows
  int64_t k;
  int64_t cap;      // k when kSorted, else k + slack
  int64_t size = 0;
  bool full = false;  // kSorted: k held; buffer: compacted at least once
  T thr = std::numeric_limits<T>::infinity();  // rank key of the k-th best once full

  void push(T score, int64_t j) {
    if constexpr (kSorted) {
      int64_t pos = size < k ? size++ : k - 1;  // when full, the last one drops out
      const T key = rank_key(score);
      while (pos > 0 && key < rank_key(r[pos - 1])) {
        r[pos] = r[pos - 1];
        idx[pos] = idx[pos - 1];
        --pos;
      }
      r[pos] = score;
      idx[pos] = j;
      if (size == k) {
        full = true;
        thr = rank_key(r[k - 1]);
      }
    } else {
      r[size] = score;
      idx[size] = j;
      if (++size == cap) compact();
    }
  }

  // Keeps the k best of the buffer in [0, k) and sets thr to the k-th best's key.
  void compact() {
    select_k();
    size = k;
    full = true;
    thr = rank_key(r[k - 1]);
  }

  // Moves the k best to [0, k), the k-th best to k - 1 (buffer variant only).
  void select_k() {
    std::vector<int64_t>& order = scratch();
    order.resize(static_cast<size_t>(size));
    for (int64_t t = 0; t < size; ++t) order[t] = t;
    auto less = [&](int64_t a, int64_t b) {
      const T ka = rank_key(r[a]), kb = rank_key(r[b]);
      return ka < kb || (ka == kb && idx[a] < idx[b]);
    };
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), less);
    permute(order, k);
  }

  // Writes the k best, sorted by (rank_key(r), j), to out_r / out_idx.
  void finish(T* out_r, int64_t* out_idx) {
    if constexpr (!kSorted) {
      std::vector<int64_t>& order = scratch();
      order.resize(static_cast<size_t>(size));
      for (int64_t t = 0; t < size; ++t) order[t] = t;
      auto less = [&](int64_t a, int64_t b) {
        const T ka = rank_key(r[a]), kb = rank_key(r[b]);
        return ka < kb || (ka == kb && idx[a] < idx[b]);
      };
      if (size > k) std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), less);
      std::sort(order.begin(), order.begin() + k, less);
      for (int64_t t = 0; t < k; ++t) {
        out_r[t] = r[order[t]];
        out_idx[t] = idx[order[t]];
      }
      return;
    }
    std::copy(r, r + k, out_r);
    std::copy(idx, idx + k, out_idx);
  }

 private:
  // Gathers entries order[0, count) to the front of the buffer.
  void permute(const std::vector<int64_t>& order, int64_t count) {
    std::vector<T>& tr = scratch_r();
    std::vector<int64_t>& ti = scratch_i();
    tr.resize(static_cast<size_t>(count));
    ti.resize(static_cast<size_t>(count));
    for (int64_t t = 0; t < count; ++t) {
      tr[t] = r[order[t]];
      ti[t] = idx[order[t]];
    }
    std::copy(tr.begin(), tr.end(), r);
    std::copy(ti.begin(), ti.end(), idx);
  }
  static std::vector<int64_t>& scratch() {
    thread_local std::vector<int64_t> v;
    return v;
  }
  static std::vector<T>& scratch_r() {
    thread_local std::vector<T> v;
    return v;
  }
  static std::vector<int64_t>& scratch_i() {
    thread_local std::vector<int64_t> v;
    return v;
  }
};

// Scores of one query against a tile of database rows [j0, j0 + W) into its running top-k:
// r_j = (qn + yn[j]) - 2 * p[j], the product p from BLAS. Until the top-k is full every score
// enters; afterwards a tile of kScanTile scores is tested against thr at once and only a
// tile with a winner is walked score by score. This is the portable version: GCC does not
// vectorise the tile test well (the whole n=4000, m=50000, d=64, k=10 search, 2 threads,
// idle machine: 0.27 s with it, 0.20 s with the AVX2 version below).
template <typename T, bool kSorted>
void _knn_scan_row_portable(const T* p,   // [W] products <q_i, y_j> of the tile
                            const T* yn,  // [W] database squared norms of the tile
                            T qn,         // the query's squared norm
                            int64_t j0, int64_t W, TopK<T, kSorted>& top) {
  int64_t j = 0;
  for (; j < W && !top.full; ++j) top.push((qn + yn[j]) - T(2) * p[j], j0 + j);
  for (; j + kScanTile <= W; j += kScanTile) {
    T sc[kScanTile];
    const T thr = top.thr;
    int hit = 0;
    for (int64_t t = 0; t < kScanTile; ++t) {
      sc[t] = (qn + yn[j + t]) - T(2) * p[j + t];
      hit |= sc[t] < thr;
    }
    if (!hit) continue;
    for (int64_t t = 0; t < kScanTile; ++t) {
      if (sc[t] < top.thr) top.push(sc[t], j0 + j + t);
    }
  }
  for (; j < W; ++j) {
    const T sc = (qn + yn[j]) - T(2) * p[j];
    if (sc < top.thr) top.push(sc, j0 + j);
  }
}

#if defined(__x86_64__)
// AVX2 lanes of the scan: scores of kScanTile database rows and the bit mask of those below
// thr (ordered compare: NaN never passes). Same arithmetic as the portable scan, bit for bit:
// p + p is 2 * p exactly, and nothing is fused.
__attribute__((target("avx2"))) inline uint32_t _scan_tile_avx2(const float* p,
                                                                 const float* yn, float qn,
                                                                 float thr, float* sc) {
  const __m256 vq = _mm256_set1_ps(qn), vt = _mm256_set1_ps(thr);
  uint32_t mask = 0;
  for (int h = 0; h < kScanTile / 8; ++h) {
    const __m256 pv = _mm256_loadu_ps(p + 8 * h);
    const __m256 s =
        _mm256_sub_ps(_mm256_add_ps(vq, _mm256_loadu_ps(yn + 8 * h)), _mm256_add_ps(pv, pv));
    _mm256_storeu_ps(sc + 8 * h, s);
    mask |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(s, vt, _CMP_LT_OQ))) << (8 * h);
  }
  return mask;
}

__attribute__((target("avx2"))) inline uint32_t _scan_tile_avx2(const double* p,
                                                                 const double* yn, double qn,
                                                                 double thr, double* sc) {
  const __m256d vq = _mm256_set1_pd(qn), vt = _mm256_set1_pd(thr);
  uint32_t mask = 0;
  for (int h = 0; h < kScanTile / 4; ++h) {
    const __m256d pv = _mm256_loadu_pd(p + 4 * h);
    const __m256d s =
        _mm256_sub_pd(_mm256_add_pd(vq, _mm256_loadu_pd(yn + 4 * h)), _mm256_add_pd(pv, pv));
    _mm256_storeu_pd(sc + 4 * h, s);
    mask |= static_cast<uint32_t>(_mm256_movemask_pd(_mm256_cmp_pd(s, vt, _CMP_LT_OQ))) << (4 * h);
  }
  return mask;
}

// The row scan with AVX2 tiles: a tile with no winner costs a few vector instructions.
template <typename T, bool kSorted>
__attribute__((target("avx2"))) void _knn_scan_row_avx2(const T* p, const T* yn, T qn,
                                                        int64_t j0, int64_t W,
                                                        TopK<T, kSorted>& top) {
  int64_t j = 0;
  for (; j < W && !top.full; ++j) top.push((qn + yn[j]) - T(2) * p[j], j0 + j);
  alignas(32) T sc[kScanTile];
  for (; j + kScanTile <= W; j += kScanTile) {
    uint32_t mask = _scan_tile_avx2(p + j, yn + j, qn, top.thr, sc);
    while (mask != 0) {
      const int t = __builtin_ctz(mask);
      mask &= mask - 1;
      if (sc[t] < top.thr) top.push(sc[t], j0 + j + t);  // thr may have dropped meanwhile
    }
  }
  for (; j < W; ++j) {
    const T s = (qn + yn[j]) - T(2) * p[j];
    if (s < top.thr) top.push(s, j0 + j);
  }
}
#endif

template <typename T, bool kSorted>
void _knn_scan_row(const T* p, const T* yn, T qn, int64_t j0, int64_t W, TopK<T, kSorted>& top) {
#if defined(__x86_64__)
  if (cpu_has_avx2()) {
    _knn_scan_row_avx2<T, kSorted>(p, yn, qn, j0, W, top);
    return;
  }
#endif
  _knn_scan_row_portable<T, kSorted>(p, yn, qn, j0, W, top);
}

// MKL's own per-thread thread count, when torch's BLAS is MKL (a weak reference: null with any
// other BLAS). Products of one tile must run single-threaded for the result not to depend on
// the thread count: measured with torch 2.13's MKL on this 2-core AVX2 machine, sgemm of a
// [7, 3072] x [3072, 1024] product differs between torch.set_num_threads(1) and (2) (by 1e-4;
// the dgemm and the larger shapes tried were bit-equal). Inside a parallel region of two or
// more threads MKL already runs sequentially; a team of one (a single query chunk) is not such
// a region, so the kernel sets it explicitly.
// (mkl_service.h maps mkl_set_num_threads_local to this C entry; the lower-case symbol that
// libtorch_cpu exports is the Fortran one, which takes a pointer.)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

struct SequentialBlas {
  int prev = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(prev);
  }
};

// Per-thread product tile, in bytes: measured on the 2-core machine (table at the launcher),
// tiles of 1 to 4 MiB per thread ran within noise of each other; 2 MiB is an L2 and a half.
constexpr int64_t kTileBytes = int64_t(2) << 20;

// Tile shape: a chunk of kq queries (a thread's unit of work) against kd database rows, the
// product tile about `bytes`. Both depend on (n, m, elem) alone, never on the thread count, so
// every product has the same shape, and the same bits, however many threads run.
struct Tiles {
  int64_t kq, kd;
};

Tiles pick_tiles(int64_t n, int64_t m, int64_t elem, int64_t bytes = kTileBytes) {
  // About four chunks per search: two threads stay busy, and a chunk is tall enough (64 to
  // 512 rows) for sgemm to run near its peak.
  const int64_t kq = std::min(n, std::clamp<int64_t>((n + 3) / 4, 64, 512));
  const int64_t kd = std::min(m, std::max<int64_t>(256, bytes / (kq * elem) / 64 * 64));
  return {kq, kd};
}

// The whole search for one dtype and one top-k variant. Threads take whole query chunks; a
// chunk runs over the database tiles in order: product into the thread's tile (BLAS, one
// thread), then the scan of each row into that query's top-k, then the sorted k best out.
// Measured (2 threads, float32, medians of 3 while the machine was shared) against the other
// split, query chunks in order with MKL threading each product and the scan parallel over rows:
//   n=1000  m=20000 d=3072 k=2:   this 0.79-0.81 s, MKL-threaded 0.79 s  (mm alone 0.88 s)
//   n=4000  m=50000 d=64   k=10:  this 0.19-0.20 s, MKL-threaded 0.19-0.20 s  (mm alone 0.46 s)
// Equal speed; this split needs no synchronisation and keeps each product single-threaded.
// Later, idle machine, medians of 5: 0.837 s (mm alone 0.858 s, cdist + topk 1.069 s) and
// 0.201 s (mm alone 0.445 s, cdist + topk 0.723 s). The first shape is the sgemm: 147 GFLOP/s
// of the 2 cores' ~190 peak, so 2x cdist + topk (0.53 s) is out of reach in float32.
template <typename T, bool kSorted>
void _knn_candidates_kernel(const at::Tensor& queries,  // [n, d]
                            const at::Tensor& database, // [m, d]
                            const T* qn,                // [n]
                            const T* yn,                // [m]
                            int64_t k,
                            T* out_r,                   // [n, k] output
                            int64_t* out_idx) {         // [n, k] output
  const int64_t n = queries.size(0), m = database.size(0);
  const Tiles tiles = pick_tiles(n, m, sizeof(T));
  // The buffer variant compacts when k + slack entries are held: slack >= 256 amortises an
  // nth_element over many entries, <= 8192 bounds the memory when k is large.
  const int64_t cap = kSorted ? k : k + std::min<int64_t>(std::max<int64_t>(k, 256), 8192);
  const int64_t nqb = (n + tiles.kq - 1) / tiles.kq;
  at::parallel_for(0, nqb, 1, [&](int64_t b0, int64_t b1) {
    SequentialBlas sequential;
    at::Tensor tile = at::empty({tiles.kq * tiles.kd}, queries.options());
    std::vector<T> buf_r(static_cast<size_t>(tiles.kq * cap));
    std::vector<int64_t> buf_i(static_cast<size_t>(tiles.kq * cap));
    std::vector<TopK<T, kSorted>> tops;
    for (int64_t qb = b0; qb < b1; ++qb) {
      const int64_t i0 = qb * tiles.kq, rows = std::min(tiles.kq, n - i0);
      tops.clear();
      for (int64_t i = 0; i < rows; ++i) {
        tops.push_back(TopK<T, kSorted>{buf_r.data() + i * cap, buf_i.data() + i * cap, k, cap});
      }
      const at::Tensor qblk = queries.narrow(0, i0, rows);
      for (int64_t j0 = 0; j0 < m; j0 += tiles.kd) {
        const int64_t cols = std::min(tiles.kd, m - j0);
        at::Tensor prod = tile.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(prod, qblk, database.narrow(0, j0, cols).t());
        const T* pp = prod.data_ptr<T>();
        for (int64_t i = 0; i < rows; ++i) {
          _knn_scan_row<T, kSorted>(pp + i * cols, yn + j0, qn[i0 + i], j0, cols, tops[i]);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        tops[i].finish(out_r + (i0 + i) * k, out_idx + (i0 + i) * k);
      }
    }
  });
}

// Schema: DEBIAS_KNN_CANDIDATES_SCHEMA (knn_args.h, with the arguments). Returns (r [n, k] in
// the input dtype, idx [n, k] int64), each row sorted by (r, j) with NaN ranked as +inf.
std::tuple<at::Tensor, at::Tensor> knn_candidates_cpu(const at::Tensor& queries,
                                                      const at::Tensor& database,
                                                      const at::Tensor& query_sqnorms,
                                                      const at::Tensor& database_sqnorms,
                                                      int64_t k) {
  const knn::CandidatesArgs args =
      knn::candidates_args(kCPU, queries, database, query_sqnorms, database_sqnorms, k);
  const at::ScalarType dtype = args.dtype;
  const int64_t n = args.n;
  at::Tensor r = at::empty({n, k}, queries.options());
  at::Tensor idx = at::empty({n, k}, queries.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(dtype, "knn_candidates", [&] {
    const scalar_t* qn = query_sqnorms.data_ptr<scalar_t>();
    const scalar_t* yn = database_sqnorms.data_ptr<scalar_t>();
    if (k <= kSortedMaxK) {
      _knn_candidates_kernel<scalar_t, true>(queries, database, qn, yn, k,
                                             r.data_ptr<scalar_t>(), idx.data_ptr<int64_t>());
    } else {
      _knn_candidates_kernel<scalar_t, false>(queries, database, qn, yn, k,
                                              r.data_ptr<scalar_t>(), idx.data_ptr<int64_t>());
    }
  });
  return {r, idx};
}

// ---- the int8 pass ----------------------------------------------------------------------------
//
// knn_quantize turns float rows into two int8 levels, and knn_candidates_int8 runs the same
// tiled search on them with exact int32 products (at::_int_mm: oneDNN, AMX or VNNI where the
// CPU has them). The error bound that makes the result usable lives with its caller
// (debias/ops/knn.py, _Search._bounds_int8); this code only has to compute exactly what it
// states.
//
// One row, with a_k = fl32(x_k - c_k) (float64 rows: the float64 difference, then rounded):
//   t = max_k |a_k|;  s = 2^e, the least power of two with 127 s >= t (s = 0 for a zero row)
//   X_k = round_half_even(a_k * 256 / s)        in [-32512, 32512]: |a_k - s X_k / 256| <= s / 512
//   h_k = floor((X_k + 128) / 256)              in [-127, 127]
//   l_k = X_k - 256 h_k                         in [-128, 127]
// so s X / 256 = s (h + l / 256) and, for two rows, (s_a X_a / 256) . (s_b X_b / 256) =
// s_a s_b (G1 + G2 / 256 + l_a . l_b / 65536) with G1 = h_a . h_b, G2 = h_a . l_b + l_a . h_b.
// The scale is kept within [2^-kScaleExp, 2^kScaleExp], where a * 256 / s is exact in
// float32 (or underflows below 2^-126, far under the rounding's 1/2); a row that needs a scale
// outside it is marked (scale NaN) and its caller uses the float32 pass instead.
constexpr int kScaleExp = 40;

template <typename T>
inline float _centred(T x, float c);
template <>
inline float _centred<float>(float x, float c) {
  return x - c;
}
template <>
inline float _centred<double>(double x, float c) {
  return static_cast<float>(x - static_cast<double>(c));
}

// Row statistics of pass 1: sq = ||a||^2 summed in float64 in 8 interleaved partial sums (lane t
// takes the columns k = t mod 8, in order; the lanes are then added in order; each square is exact
// in float64), amax = max |a_k|. The AVX2 version below computes the same bits.
// The lanes' columns from k on, then the lanes added in order: all of the portable version, the
// tail of the AVX2 one.
template <typename T>
inline void _row_stats_finish(const T* row, const float* c, int64_t k, int64_t d, double* acc,
                              float* lane_max, double* sq, float* amax) {
  for (; k < d; ++k) {
    const float a = _centred<T>(row[k], c[k]);
    acc[k % 8] += static_cast<double>(a) * static_cast<double>(a);
    const float m = std::fabs(a);
    lane_max[k % 8] = m > lane_max[k % 8] ? m : lane_max[k % 8];
  }
  *sq = 0.0;
  *amax = 0.0f;
  for (int t = 0; t < 8; ++t) {
    *sq += acc[t];
    *amax = lane_max[t] > *amax ? lane_max[t] : *amax;
  }
}

template <typename T>
inline void _row_stats_portable(const T* row, const float* c, int64_t d, double* sq, float* amax) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  float lane_max[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  _row_stats_finish<T>(row, c, 0, d, acc, lane_max, sq, amax);
}

// Pass 2: the codes of one row with scale 2^e, and ||l||^2. Plain arithmetic that GCC
// vectorises as it is (the rounding is (y + 1.5 * 2^23) - 1.5 * 2^23, half to even for
// |y| < 2^22; |y| <= 32512 here).
template <typename T>
inline __attribute__((always_inline)) int32_t _quantize_row(const T* row, const float* c,
                                                            int64_t d, int e, int8_t* hi,
                                                            int8_t* lo) {
  const float f = std::ldexp(1.0f, 8 - e);  // exact: 8 - e in [-32, 48]
  constexpr float kRound = 12582912.0f;
  int32_t lsq = 0;
  for (int64_t k = 0; k < d; ++k) {
    const float y = _centred<T>(row[k], c[k]) * f;
    const int32_t X = static_cast<int32_t>((y + kRound) - kRound);
    const int32_t h = (X + 128) >> 8;  // floor division (arithmetic shift)
    const int32_t l = X - h * 256;
    hi[k] = static_cast<int8_t>(h);
    lo[k] = static_cast<int8_t>(l);
    lsq += l * l;  // <= d * 128^2 <= 2^30 for d <= 2^16
  }
  return lsq;
}

// The scale exponent: the least e with 127 * 2^e >= amax > 0 (exact compares in float64).
inline int _scale_exponent(float amax) {
  int ex = 0;
  std::frexp(static_cast<double>(amax) / 127.0, &ex);
  int e = ex - 1;
  while (std::ldexp(127.0, e) < static_cast<double>(amax)) ++e;
  while (std::ldexp(127.0, e - 1) >= static_cast<double>(amax)) --e;
  return e;
}

// Quantises rows [r0, r1). stats per row: ||a||^2, the scale s (0 for a zero row; NaN when
// a value is not finite or the scale is out of range: the row's codes are then zero) and
// ||l||^2 (exact). codes: [h | l] per row, or [l | h] when lo_first.
template <typename T, typename Stats>
inline __attribute__((always_inline)) void _quantize_rows(const T* x, const float* c, int64_t d,
                                                          int64_t r0, int64_t r1, bool lo_first,
                                                          int8_t* codes, double* stats,
                                                          Stats row_stats) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = x + r * d;
    double sq = 0.0;
    float amax = 0.0f;
    row_stats(row, c, d, &sq, &amax);
    int8_t* hi = codes + r * 2 * d + (lo_first ? d : 0);
    int8_t* lo = codes + r * 2 * d + (lo_first ? 0 : d);
    double* st = stats + r * 3;
    st[0] = sq;
    // A NaN or an infinity (or a float64 difference beyond float32) shows in sq.
    const int e = std::isfinite(sq) && amax > 0.0f ? _scale_exponent(amax) : 0;
    if (!std::isfinite(sq) || amax == 0.0f || e < -kScaleExp || e > kScaleExp) {
      std::fill(codes + r * 2 * d, codes + (r + 1) * 2 * d, int8_t(0));
      st[1] = std::isfinite(sq) && amax == 0.0f ? 0.0 : std::numeric_limits<double>::quiet_NaN();
      st[2] = 0.0;
      continue;
    }
    st[1] = std::ldexp(1.0, e);
    st[2] = static_cast<double>(_quantize_row<T>(row, c, d, e, hi, lo));
  }
}

template <typename T>
void _quantize_rows_portable(const T* x, const float* c, int64_t d, int64_t r0, int64_t r1,
                             bool lo_first, int8_t* codes, double* stats) {
  _quantize_rows<T>(x, c, d, r0, r1, lo_first, codes, stats, _row_stats_portable<T>);
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) inline __m256 _centred8(const float* x, const float* c) {
  return _mm256_sub_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(c));
}
__attribute__((target("avx2"))) inline __m256 _centred8(const double* x, const float* c) {
  const __m256d lo = _mm256_sub_pd(_mm256_loadu_pd(x), _mm256_cvtps_pd(_mm_loadu_ps(c)));
  const __m256d hi = _mm256_sub_pd(_mm256_loadu_pd(x + 4), _mm256_cvtps_pd(_mm_loadu_ps(c + 4)));
  return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
}

// _row_stats_portable with the 8 lanes in two AVX2 registers of doubles: the same bits.
template <typename T>
__attribute__((target("avx2"))) void _row_stats_avx2(const T* row, const float* c, int64_t d,
                                                     double* sq, float* amax) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= d; k += 8) {
    const __m256 a = _centred8(row + k, c + k);
    vmax = _mm256_max_ps(_mm256_andnot_ps(sign, a), vmax);  // m > max ? m : max
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(a));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1));
    s0 = _mm256_add_pd(s0, _mm256_mul_pd(lo, lo));
    s1 = _mm256_add_pd(s1, _mm256_mul_pd(hi, hi));
  }
  alignas(32) double acc[8];
  alignas(32) float lane_max[8];
  _mm256_store_pd(acc, s0);
  _mm256_store_pd(acc + 4, s1);
  _mm256_store_ps(lane_max, vmax);
  _row_stats_finish<T>(row, c, k, d, acc, lane_max, sq, amax);
}

template <typename T>
__attribute__((target("avx2"))) void _quantize_rows_avx2(const T* x, const float* c, int64_t d,
                                                         int64_t r0, int64_t r1, bool lo_first,
                                                         int8_t* codes, double* stats) {
  _quantize_rows<T>(x, c, d, r0, r1, lo_first, codes, stats, _row_stats_avx2<T>);
}
#endif

// Schema: DEBIAS_KNN_QUANTIZE_SCHEMA (knn_args.h, with the arguments). codes is an output
// argument: the caller reuses one buffer for every chunk of a search, which spares the page
// faults of a fresh allocation, a third of the time at d = 3072. Returns stats [r, 3] float64:
// ||a||^2, the scale s (0: zero row; NaN: not usable), ||l||^2.
at::Tensor knn_quantize_cpu(const at::Tensor& rows, const at::Tensor& center, bool lo_first,
                            at::Tensor& codes) {
  knn::check_quantize(rows, center, codes);
  const int64_t r = rows.size(0), d = rows.size(1);
  at::Tensor stats = at::empty({r, 3}, rows.options().dtype(at::kDouble));
  if (r == 0) return stats;
  const float* c = center.data_ptr<float>();
  int8_t* cd = codes.data_ptr<int8_t>();
  double* st = stats.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(1, 16384 / d);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "knn_quantize", [&] {
    const scalar_t* x = rows.data_ptr<scalar_t>();
    at::parallel_for(0, r, grain, [&](int64_t r0, int64_t r1) {
#if defined(__x86_64__)
      if (cpu_has_avx2()) {
        _quantize_rows_avx2<scalar_t>(x, c, d, r0, r1, lo_first, cd, st);
        return;
      }
#endif
      _quantize_rows_portable<scalar_t>(x, c, d, r0, r1, lo_first, cd, st);
    });
  });
  return stats;
}

// The int8 score, left to right in float32 (nothing fused):
//   r_ij = (qn_i + yn_j) - qs_i * (ys_j * (float(G1_ij) + float(G2_ij) * 2^-8))
// With qs = 2 s_a and ys = s_b (powers of two) the two products by scales are exact.
inline float _int8_score(int32_t g1, int32_t g2, float qn, float yn, float qs, float ys) {
  const float v = static_cast<float>(g1) + static_cast<float>(g2) * 0.00390625f;
  return (qn + yn) - qs * (ys * v);
}

template <bool kSorted>
void _knn_scan_row_int8_portable(const int32_t* g1, const int32_t* g2, const float* yn,
                                 const float* ys, float qn, float qs, int64_t j0, int64_t W,
                                 TopK<float, kSorted>& top) {
  int64_t j = 0;
  for (; j < W && !top.full; ++j) {
    top.push(_int8_score(g1[j], g2[j], qn, yn[j], qs, ys[j]), j0 + j);
  }
  for (; j < W; ++j) {
    const float sc = _int8_score(g1[j], g2[j], qn, yn[j], qs, ys[j]);
    if (sc < top.thr) top.push(sc, j0 + j);
  }
}

#if defined(__x86_64__)
// AVX2 lanes of the int8 scan, the same arithmetic as _int8_score bit for bit.
__attribute__((target("avx2"))) inline uint32_t _scan_tile_int8_avx2(
    const int32_t* g1, const int32_t* g2, const float* yn, const float* ys, float qn, float qs,
    float thr, float* sc) {
  const __m256 vq = _mm256_set1_ps(qn), vs = _mm256_set1_ps(qs), vt = _mm256_set1_ps(thr);
  const __m256 inv = _mm256_set1_ps(0.00390625f);
  uint32_t mask = 0;
  for (int h = 0; h < kScanTile / 8; ++h) {
    const __m256i* p1 = reinterpret_cast<const __m256i*>(g1 + 8 * h);
    const __m256i* p2 = reinterpret_cast<const __m256i*>(g2 + 8 * h);
    const __m256 a = _mm256_cvtepi32_ps(_mm256_loadu_si256(p1));
    const __m256 b = _mm256_cvtepi32_ps(_mm256_loadu_si256(p2));
    const __m256 v = _mm256_add_ps(a, _mm256_mul_ps(b, inv));
    const __m256 p = _mm256_mul_ps(vs, _mm256_mul_ps(_mm256_loadu_ps(ys + 8 * h), v));
    const __m256 s = _mm256_sub_ps(_mm256_add_ps(vq, _mm256_loadu_ps(yn + 8 * h)), p);
    _mm256_storeu_ps(sc + 8 * h, s);
    mask |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(s, vt, _CMP_LT_OQ))) << (8 * h);
  }
  return mask;
}

template <bool kSorted>
__attribute__((target("avx2"))) void _knn_scan_row_int8_avx2(const int32_t* g1, const int32_t* g2,
                                                             const float* yn, const float* ys,
                                                             float qn, float qs, int64_t j0,
                                                             int64_t W, TopK<float, kSorted>& top) {
  int64_t j = 0;
  for (; j < W && !top.full; ++j) {
    top.push(_int8_score(g1[j], g2[j], qn, yn[j], qs, ys[j]), j0 + j);
  }
  alignas(32) float sc[kScanTile];
  for (; j + kScanTile <= W; j += kScanTile) {
    uint32_t mask = _scan_tile_int8_avx2(g1 + j, g2 + j, yn + j, ys + j, qn, qs, top.thr, sc);
    while (mask != 0) {
      const int t = __builtin_ctz(mask);
      mask &= mask - 1;
      if (sc[t] < top.thr) top.push(sc[t], j0 + j + t);
    }
  }
  for (; j < W; ++j) {
    const float s = _int8_score(g1[j], g2[j], qn, yn[j], qs, ys[j]);
    if (s < top.thr) top.push(s, j0 + j);
  }
}
#endif

// Per-thread int32 tiles (G1 and G2 together), in bytes. Measured, one thread, 1000 queries x
// 2730 database rows, d = 3072: 36-39 ms for tiles of 250-1000 queries x 512-2048 rows, 52-54 ms
// for 500 or more queries x 2730 rows (the products are bound by oneDNN, ~820 G multiply-adds
// per second here); 4 MiB gives 250 x 2048 for 1000 queries, and keeps the two int32 tiles of
// d = 64 (512 x 1024) within L2 and a half. Results do not depend on the tiles: the sums are
// exact.
constexpr int64_t kInt8TileBytes = int64_t(4) << 20;

template <bool kSorted>
void _knn_candidates_int8_kernel(const at::Tensor& codes_q,   // [n, 2d]: [h | l]
                                 const at::Tensor& codes_db,  // [m, 2d]: [l | h]
                                 const float* qn, const float* yn, const float* qs,
                                 const float* ys, int64_t k, float* out_r, int64_t* out_idx) {
  const int64_t n = codes_q.size(0), m = codes_db.size(0), d = codes_q.size(1) / 2;
  const Tiles tiles = pick_tiles(n, m, sizeof(int32_t) * 2, kInt8TileBytes);
  const int64_t cap = kSorted ? k : k + std::min<int64_t>(std::max<int64_t>(k, 256), 8192);
  const int64_t nqb = (n + tiles.kq - 1) / tiles.kq;
  at::parallel_for(0, nqb, 1, [&](int64_t b0, int64_t b1) {
    const auto opts = codes_q.options().dtype(at::kInt);
    at::Tensor tile1 = at::empty({tiles.kq * tiles.kd}, opts);
    at::Tensor tile2 = at::empty({tiles.kq * tiles.kd}, opts);
    std::vector<float> buf_r(static_cast<size_t>(tiles.kq * cap));
    std::vector<int64_t> buf_i(static_cast<size_t>(tiles.kq * cap));
    std::vector<TopK<float, kSorted>> tops;
    for (int64_t qb = b0; qb < b1; ++qb) {
      const int64_t i0 = qb * tiles.kq, rows = std::min(tiles.kq, n - i0);
      tops.clear();
      for (int64_t i = 0; i < rows; ++i) {
        tops.push_back(
            TopK<float, kSorted>{buf_r.data() + i * cap, buf_i.data() + i * cap, k, cap});
      }
      const at::Tensor q_hl = codes_q.narrow(0, i0, rows);
      const at::Tensor q_h = q_hl.narrow(1, 0, d);
      for (int64_t j0 = 0; j0 < m; j0 += tiles.kd) {
        const int64_t cols = std::min(tiles.kd, m - j0);
        const at::Tensor db_lh = codes_db.narrow(0, j0, cols);
        at::Tensor p1 = tile1.narrow(0, 0, rows * cols).view({rows, cols});
        at::Tensor p2 = tile2.narrow(0, 0, rows * cols).view({rows, cols});
        at::_int_mm_out(p1, q_h, db_lh.narrow(1, d, d).t());  // h . h
        at::_int_mm_out(p2, q_hl, db_lh.t());                 // h . l + l . h
        const int32_t* g1 = p1.data_ptr<int32_t>();
        const int32_t* g2 = p2.data_ptr<int32_t>();
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = i0 + i;
#if defined(__x86_64__)
          if (cpu_has_avx2()) {
            _knn_scan_row_int8_avx2<kSorted>(g1 + i * cols, g2 + i * cols, yn + j0, ys + j0,
                                             qn[row], qs[row], j0, cols, tops[i]);
            continue;
          }
#endif
          _knn_scan_row_int8_portable<kSorted>(g1 + i * cols, g2 + i * cols, yn + j0, ys + j0,
                                               qn[row], qs[row], j0, cols, tops[i]);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        tops[i].finish(out_r + (i0 + i) * k, out_idx + (i0 + i) * k);
      }
    }
  });
}

// Schema: DEBIAS_KNN_CANDIDATES_INT8_SCHEMA (knn_args.h, with the arguments). Returns
// (r [n, k] float32, idx [n, k] int64): the k rows with the smallest int8 score
//   r_ij = (qn_i + yn_j) - qs_i * (ys_j * (G1_ij + G2_ij / 256)), sorted by (r, j).
std::tuple<at::Tensor, at::Tensor> knn_candidates_int8_cpu(
    const at::Tensor& codes_q, const at::Tensor& codes_db, const at::Tensor& query_sqnorms,
    const at::Tensor& database_sqnorms, const at::Tensor& query_scales,
    const at::Tensor& database_scales, int64_t k) {
  const knn::CandidatesInt8Args args = knn::candidates_int8_args(
      codes_q, codes_db, query_sqnorms, database_sqnorms, query_scales, database_scales, k);
  const int64_t n = args.n;
  at::Tensor r = at::empty({n, k}, query_sqnorms.options());
  at::Tensor idx = at::empty({n, k}, query_sqnorms.options().dtype(at::kLong));
  const float* qn = query_sqnorms.data_ptr<float>();
  const float* yn = database_sqnorms.data_ptr<float>();
  const float* qs = query_scales.data_ptr<float>();
  const float* ys = database_scales.data_ptr<float>();
  if (k <= kSortedMaxK) {
    _knn_candidates_int8_kernel<true>(codes_q, codes_db, qn, yn, qs, ys, k, r.data_ptr<float>(),
                                      idx.data_ptr<int64_t>());
  } else {
    _knn_candidates_int8_kernel<false>(codes_q, codes_db, qn, yn, qs, ys, k, r.data_ptr<float>(),
                                       idx.data_ptr<int64_t>());
  }
  return {r, idx};
}

}  // namespace
}  // namespace debias

TORCH_LIBRARY_FRAGMENT(debias_C, m) {
  m.def(DEBIAS_KNN_CANDIDATES_SCHEMA);
  m.def(DEBIAS_KNN_QUANTIZE_SCHEMA);
  m.def(DEBIAS_KNN_CANDIDATES_INT8_SCHEMA);
}

TORCH_LIBRARY_IMPL(debias_C, CPU, m) {
  m.impl("knn_candidates", &debias::knn_candidates_cpu);
  m.impl("knn_quantize", &debias::knn_quantize_cpu);
  m.impl("knn_candidates_int8", &debias::knn_candidates_int8_cpu);
}
