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
// The n x m score matrix is never built. A block of queries times a tile of database rows goes
// through BLAS (at::mm_out: MKL sgemm / dgemm) into a tile buffer of a few MiB, and a fused
// scan turns each product row into scores and keeps a running top-k per query. Most scores
// lose to the current k-th best with one compare; the scan tests a chunk of them at once and
// looks at single scores only when one of the chunk wins.
//
// Layout of this file: the per-query top-k (sorted insertion for small k, a buffer compacted
// by nth_element for large k), the row scan, the tiled driver, the launcher, the registration.

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

namespace debias {
namespace {

// Up to this k the running top-k is a sorted array with insertion; above it, a buffer that is
// compacted to its k best by nth_element whenever it fills up.
constexpr int64_t kSortedMaxK = 32;
// Scores tested together by the scan's threshold compare (two AVX2 vectors of float).
constexpr int64_t kScanChunk = 16;

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
// enters; afterwards a chunk of kScanChunk scores is tested against thr at once and only a
// chunk with a winner is walked score by score. This is the portable version: GCC does not
// vectorise the chunk test well (the whole n=4000, m=50000, d=64, k=10 search, 2 threads,
// idle machine: 0.27 s with it, 0.20 s with the AVX2 version below).
template <typename T, bool kSorted>
void _knn_scan_row_portable(const T* p,   // [W] products <q_i, y_j> of the tile
                            const T* yn,  // [W] database squared norms of the tile
                            T qn,         // the query's squared norm
                            int64_t j0, int64_t W, TopK<T, kSorted>& top) {
  int64_t j = 0;
  for (; j < W && !top.full; ++j) top.push((qn + yn[j]) - T(2) * p[j], j0 + j);
  for (; j + kScanChunk <= W; j += kScanChunk) {
    T sc[kScanChunk];
    const T thr = top.thr;
    int hit = 0;
    for (int64_t t = 0; t < kScanChunk; ++t) {
      sc[t] = (qn + yn[j + t]) - T(2) * p[j + t];
      hit |= sc[t] < thr;
    }
    if (!hit) continue;
    for (int64_t t = 0; t < kScanChunk; ++t) {
      if (sc[t] < top.thr) top.push(sc[t], j0 + j + t);
    }
  }
  for (; j < W; ++j) {
    const T sc = (qn + yn[j]) - T(2) * p[j];
    if (sc < top.thr) top.push(sc, j0 + j);
  }
}

#if defined(__x86_64__)
// AVX2 lanes of the scan: scores of kScanChunk database rows and the bit mask of those below
// thr (ordered compare: NaN never passes). Same arithmetic as the portable scan, bit for bit:
// p + p is 2 * p exactly, and nothing is fused.
__attribute__((target("avx2"))) inline uint32_t _scan_chunk_avx2(const float* p,
                                                                 const float* yn, float qn,
                                                                 float thr, float* sc) {
  const __m256 vq = _mm256_set1_ps(qn), vt = _mm256_set1_ps(thr);
  uint32_t mask = 0;
  for (int h = 0; h < kScanChunk / 8; ++h) {
    const __m256 pv = _mm256_loadu_ps(p + 8 * h);
    const __m256 s =
        _mm256_sub_ps(_mm256_add_ps(vq, _mm256_loadu_ps(yn + 8 * h)), _mm256_add_ps(pv, pv));
    _mm256_storeu_ps(sc + 8 * h, s);
    mask |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(s, vt, _CMP_LT_OQ))) << (8 * h);
  }
  return mask;
}

__attribute__((target("avx2"))) inline uint32_t _scan_chunk_avx2(const double* p,
                                                                 const double* yn, double qn,
                                                                 double thr, double* sc) {
  const __m256d vq = _mm256_set1_pd(qn), vt = _mm256_set1_pd(thr);
  uint32_t mask = 0;
  for (int h = 0; h < kScanChunk / 4; ++h) {
    const __m256d pv = _mm256_loadu_pd(p + 4 * h);
    const __m256d s =
        _mm256_sub_pd(_mm256_add_pd(vq, _mm256_loadu_pd(yn + 4 * h)), _mm256_add_pd(pv, pv));
    _mm256_storeu_pd(sc + 4 * h, s);
    mask |= static_cast<uint32_t>(_mm256_movemask_pd(_mm256_cmp_pd(s, vt, _CMP_LT_OQ))) << (4 * h);
  }
  return mask;
}

// The row scan with AVX2 chunks: a chunk with no winner costs a few vector instructions.
template <typename T, bool kSorted>
__attribute__((target("avx2"))) void _knn_scan_row_avx2(const T* p, const T* yn, T qn,
                                                        int64_t j0, int64_t W,
                                                        TopK<T, kSorted>& top) {
  int64_t j = 0;
  for (; j < W && !top.full; ++j) top.push((qn + yn[j]) - T(2) * p[j], j0 + j);
  alignas(32) T sc[kScanChunk];
  for (; j + kScanChunk <= W; j += kScanChunk) {
    uint32_t mask = _scan_chunk_avx2(p + j, yn + j, qn, top.thr, sc);
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

// Chosen once per process. DEBIAS_NO_AVX2=1 forces the portable path (to test it), as in
// noise_loss.cpp.
bool use_avx2() {
#if defined(__x86_64__)
  static const bool ok = [] {
    const char* env = std::getenv("DEBIAS_NO_AVX2");
    const bool forced_off = env != nullptr && env[0] != '\0' && env[0] != '0';
    __builtin_cpu_init();
    return !forced_off && __builtin_cpu_supports("avx2");
  }();
  return ok;
#else
  return false;
#endif
}

template <typename T, bool kSorted>
void _knn_scan_row(const T* p, const T* yn, T qn, int64_t j0, int64_t W, TopK<T, kSorted>& top) {
#if defined(__x86_64__)
  if (use_avx2()) {
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
// more threads MKL already runs sequentially; a team of one (a single query block) is not such
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

// Tile shape: a block of kq queries (a thread's unit of work) against kd database rows. Both
// depend on (n, m, elem) alone, never on the thread count, so every product has the same
// shape, and the same bits, however many threads run.
struct Tiles {
  int64_t kq, kd;
};

Tiles pick_tiles(int64_t n, int64_t m, int64_t elem) {
  // About four blocks per search: two threads stay busy, and a block is tall enough (64 to
  // 512 rows) for sgemm to run near its peak.
  const int64_t kq = std::min(n, std::clamp<int64_t>((n + 3) / 4, 64, 512));
  const int64_t kd = std::min(m, std::max<int64_t>(256, kTileBytes / (kq * elem) / 64 * 64));
  return {kq, kd};
}

// The whole search for one dtype and one top-k variant. Threads take whole query blocks; a
// block runs over the database tiles in order: product into the thread's tile (BLAS, one
// thread), then the scan of each row into that query's top-k, then the sorted k best out.
// Measured (2 threads, float32, medians of 3 while the machine was shared) against the other
// split, query blocks in order with MKL threading each product and the scan parallel over rows:
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

#define DEBIAS_KNN_CHECK_TENSOR(x, name, ndim)                                                \
  TORCH_CHECK((x).device().is_cpu(), "debias_C::knn_candidates: ", name,                    \
              " must be a CPU tensor, got ", (x).device());                                  \
  TORCH_CHECK((x).dim() == (ndim), "debias_C::knn_candidates: ", name, " must be ", ndim,    \
              "-D, got shape ", (x).sizes());                                                \
  TORCH_CHECK((x).is_contiguous(), "debias_C::knn_candidates: ", name, " must be contiguous")

// knn_candidates(Tensor queries, Tensor database, Tensor query_sqnorms,
//                Tensor database_sqnorms, int k) -> (Tensor, Tensor)
//   queries           [n, d] float32 or float64, contiguous CPU
//   database          [m, d] same dtype
//   query_sqnorms     [n] same dtype: ||q_i||^2 as the caller computed it
//   database_sqnorms  [m] same dtype: ||y_j||^2
//   k                 1 <= k <= m
// Returns (r [n, k] in the input dtype, idx [n, k] int64), each row sorted by (r, j) with NaN
// ranked as +inf.
std::tuple<at::Tensor, at::Tensor> knn_candidates_cpu(const at::Tensor& queries,
                                                      const at::Tensor& database,
                                                      const at::Tensor& query_sqnorms,
                                                      const at::Tensor& database_sqnorms,
                                                      int64_t k) {
  constexpr const char* op = "debias_C::knn_candidates";
  DEBIAS_KNN_CHECK_TENSOR(queries, "queries", 2);
  DEBIAS_KNN_CHECK_TENSOR(database, "database", 2);
  DEBIAS_KNN_CHECK_TENSOR(query_sqnorms, "query_sqnorms", 1);
  DEBIAS_KNN_CHECK_TENSOR(database_sqnorms, "database_sqnorms", 1);
  const at::ScalarType dtype = queries.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              ": queries must be float32 or float64, got ", dtype);
  TORCH_CHECK(database.scalar_type() == dtype, op, ": database must have the dtype of queries (",
              dtype, "), got ", database.scalar_type());
  TORCH_CHECK(query_sqnorms.scalar_type() == dtype, op,
              ": query_sqnorms must have the dtype of queries (", dtype, "), got ",
              query_sqnorms.scalar_type());
  TORCH_CHECK(database_sqnorms.scalar_type() == dtype, op,
              ": database_sqnorms must have the dtype of queries (", dtype, "), got ",
              database_sqnorms.scalar_type());
  const int64_t n = queries.size(0), d = queries.size(1), m = database.size(0);
  TORCH_CHECK(n >= 1, op, ": queries must have at least one row, got shape ", queries.sizes());
  TORCH_CHECK(m >= 1, op, ": database must have at least one row, got shape ", database.sizes());
  TORCH_CHECK(d >= 1, op, ": queries must have at least one column, got shape ",
              queries.sizes());
  TORCH_CHECK(database.size(1) == d, op, ": database must have d = ", d,
              " columns like queries, got shape ", database.sizes());
  TORCH_CHECK(query_sqnorms.size(0) == n, op, ": query_sqnorms must have shape [", n,
              "], got ", query_sqnorms.sizes());
  TORCH_CHECK(database_sqnorms.size(0) == m, op, ": database_sqnorms must have shape [", m,
              "], got ", database_sqnorms.sizes());
  TORCH_CHECK(k >= 1 && k <= m, op, ": k must be in [1, m = ", m, "], got ", k);

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

}  // namespace
}  // namespace debias

TORCH_LIBRARY_FRAGMENT(debias_C, m) {
  m.def(
      "knn_candidates(Tensor queries, Tensor database, Tensor query_sqnorms, "
      "Tensor database_sqnorms, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(debias_C, CPU, m) {
  m.impl("knn_candidates", &debias::knn_candidates_cpu);
}
