// The arguments of the knn ops and their checks, written once for the CPU kernels
// (csrc/knn.cpp) and the CUDA glue (csrc/cuda/knn_glue.cpp): the schemas, and one function per
// op that checks its tensors (messages name the argument) and returns the sizes the kernels
// need. debias/ops/knn.py validates the user's inputs first: these checks guard the op
// boundary, and the kernels trust what passes them. Limits of one backend's kernels (the CUDA
// kernels' largest k, say) stay with that backend.
//
//   knn_candidates       the fast pass of debias.knn: the k smallest
//                        r_ij = (qn_i + yn_j) - 2 <q_i, y_j> per query, sorted by (r, j)
//   knn_quantize         two levels of int8 codes of centred rows, and their statistics (CPU)
//   knn_candidates_int8  knn_candidates from those codes (CPU)

#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <utility>

#include "checks.h"

namespace debias {
namespace knn {

#define DEBIAS_KNN_CANDIDATES_SCHEMA                                     \
  "knn_candidates(Tensor queries, Tensor database, Tensor query_sqnorms, " \
  "Tensor database_sqnorms, int k) -> (Tensor, Tensor)"
#define DEBIAS_KNN_QUANTIZE_SCHEMA \
  "knn_quantize(Tensor rows, Tensor center, bool lo_first, Tensor(a!) codes) -> Tensor"
#define DEBIAS_KNN_CANDIDATES_INT8_SCHEMA                                          \
  "knn_candidates_int8(Tensor codes_q, Tensor codes_db, Tensor query_sqnorms, "     \
  "Tensor database_sqnorms, Tensor query_scales, Tensor database_scales, int k) " \
  "-> (Tensor, Tensor)"

constexpr const char* kCandidatesOp = "debias_C::knn_candidates";
constexpr const char* kQuantizeOp = "debias_C::knn_quantize";
constexpr const char* kCandidatesInt8Op = "debias_C::knn_candidates_int8";

// A tensor of the op: on the backend's device and on first's, `ndim` dims, contiguous.
inline void check_tensor(const char* op, const char* name, const at::Tensor& x, int64_t ndim,
                         Backend backend, const at::Tensor& first, const char* first_name) {
  check_device(op, name, x, backend, first, first_name);
  TORCH_CHECK(x.dim() == ndim, op, ": ", name, " must be ", ndim, "-D, got shape ", x.sizes());
  check_contiguous(op, name, x);
}

// knn_candidates (DEBIAS_KNN_CANDIDATES_SCHEMA):
//   queries           [n, d] float32 or float64, contiguous
//   database          [m, d] the same dtype
//   query_sqnorms     [n] the same dtype: ||q_i||^2 as the caller computed it
//   database_sqnorms  [m] the same dtype: ||y_j||^2
//   k                 1 <= k <= m
// all on one device of the backend. n, m, d >= 1.
struct CandidatesArgs {
  at::ScalarType dtype;  // T
  int64_t n, m, d, k;
};

inline CandidatesArgs candidates_args(Backend backend, const at::Tensor& queries,
                                      const at::Tensor& database,
                                      const at::Tensor& query_sqnorms,
                                      const at::Tensor& database_sqnorms, int64_t k) {
  constexpr const char* op = kCandidatesOp;
  check_tensor(op, "queries", queries, 2, backend, queries, "queries");
  check_tensor(op, "database", database, 2, backend, queries, "queries");
  check_tensor(op, "query_sqnorms", query_sqnorms, 1, backend, queries, "queries");
  check_tensor(op, "database_sqnorms", database_sqnorms, 1, backend, queries, "queries");
  const at::ScalarType dtype = queries.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              ": queries must be float32 or float64, got ", dtype);
  for (const auto& [name, x] : {std::pair<const char*, const at::Tensor*>{"database", &database},
                                {"query_sqnorms", &query_sqnorms},
                                {"database_sqnorms", &database_sqnorms}}) {
    TORCH_CHECK(x->scalar_type() == dtype, op, ": ", name, " must have the dtype of queries (",
                dtype, "), got ", x->scalar_type());
  }
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
  return {dtype, n, m, d, k};
}

// knn_quantize (DEBIAS_KNN_QUANTIZE_SCHEMA), CPU only:
//   rows    [r, d] float32 or float64, contiguous, 1 <= d <= 2^16
//   center  [d] float32, contiguous
//   codes   [r, 2d] int8, contiguous: the output, [h | l] per row ([l | h] when lo_first)
inline void check_quantize(const at::Tensor& rows, const at::Tensor& center,
                           const at::Tensor& codes) {
  constexpr const char* op = kQuantizeOp;
  TORCH_CHECK(rows.device().is_cpu() && center.device().is_cpu() && codes.device().is_cpu(), op,
              ": CPU tensors only");
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous(), op,
              ": rows must be a contiguous [r, d] tensor, got shape ", rows.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kDouble, op,
              ": rows must be float32 or float64, got ", rows.scalar_type());
  const int64_t r = rows.size(0), d = rows.size(1);
  TORCH_CHECK(d >= 1 && d <= (int64_t(1) << 16), op, ": rows must have 1 to 2^16 columns, got ",
              d);
  TORCH_CHECK(center.dim() == 1 && center.size(0) == d && center.is_contiguous() &&
                  center.scalar_type() == at::kFloat,
              op, ": center must be a contiguous float32 [", d, "] tensor, got ",
              center.scalar_type(), " ", center.sizes());
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) == r && codes.size(1) == 2 * d &&
                  codes.is_contiguous() && codes.scalar_type() == at::kChar,
              op, ": codes must be a contiguous int8 [", r, ", ", 2 * d, "] tensor, got ",
              codes.scalar_type(), " ", codes.sizes());
}

// knn_candidates_int8 (DEBIAS_KNN_CANDIDATES_INT8_SCHEMA), CPU only:
//   codes_q           [n, 2d] int8, [h | l] per query (knn_quantize, lo_first false)
//   codes_db          [m, 2d] int8, [l | h] per database row (lo_first true)
//   query_sqnorms     [n] float32 qn;  database_sqnorms [m] float32 yn
//   query_scales      [n] float32 qs;  database_scales  [m] float32 ys
//   k                 1 <= k <= m;  2 <= d <= 2^16 (G2 = h . l + l . h stays exact in int32)
struct CandidatesInt8Args {
  int64_t n, m, d, k;
};

inline CandidatesInt8Args candidates_int8_args(const at::Tensor& codes_q,
                                               const at::Tensor& codes_db,
                                               const at::Tensor& query_sqnorms,
                                               const at::Tensor& database_sqnorms,
                                               const at::Tensor& query_scales,
                                               const at::Tensor& database_scales, int64_t k) {
  constexpr const char* op = kCandidatesInt8Op;
  check_tensor(op, "codes_q", codes_q, 2, kCPU, codes_q, "codes_q");
  check_tensor(op, "codes_db", codes_db, 2, kCPU, codes_q, "codes_q");
  check_tensor(op, "query_sqnorms", query_sqnorms, 1, kCPU, codes_q, "codes_q");
  check_tensor(op, "database_sqnorms", database_sqnorms, 1, kCPU, codes_q, "codes_q");
  check_tensor(op, "query_scales", query_scales, 1, kCPU, codes_q, "codes_q");
  check_tensor(op, "database_scales", database_scales, 1, kCPU, codes_q, "codes_q");
  TORCH_CHECK(codes_q.scalar_type() == at::kChar && codes_db.scalar_type() == at::kChar, op,
              ": codes must be int8, got ", codes_q.scalar_type(), " and ",
              codes_db.scalar_type());
  for (const at::Tensor* t : {&query_sqnorms, &database_sqnorms, &query_scales, &database_scales}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": norms and scales must be float32, got ",
                t->scalar_type());
  }
  const int64_t n = codes_q.size(0), m = codes_db.size(0), d2 = codes_q.size(1);
  TORCH_CHECK(n >= 1 && m >= 1, op, ": codes must have rows, got ", codes_q.sizes(), " and ",
              codes_db.sizes());
  TORCH_CHECK(d2 >= 4 && d2 % 2 == 0 && d2 <= (int64_t(2) << 16), op,
              ": codes must have 2d columns, 2 <= d <= 2^16, got ", d2);
  TORCH_CHECK(codes_db.size(1) == d2, op, ": codes_db must have ", d2, " columns, got ",
              codes_db.size(1));
  TORCH_CHECK(query_sqnorms.size(0) == n && query_scales.size(0) == n, op,
              ": query norms and scales must have shape [", n, "]");
  TORCH_CHECK(database_sqnorms.size(0) == m && database_scales.size(0) == m, op,
              ": database norms and scales must have shape [", m, "]");
  TORCH_CHECK(k >= 1 && k <= m, op, ": k must be in [1, m = ", m, "], got ", k);
  return {n, m, d2 / 2, k};
}

}  // namespace knn
}  // namespace debias
