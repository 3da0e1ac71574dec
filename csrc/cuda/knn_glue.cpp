// The torch side of the CUDA kernels of the knn_candidates op (csrc/cuda/knn.cu): checks the
// tensors, allocates the outputs and the split workspace, launches on the current stream of
// the data's device, and registers the kernels under the CUDA key of the op that csrc/knn.cpp
// defines. (Not named knn.cpp: setuptools names objects by stem, and that one would collide
// with knn.cu's in the same folder.) Nothing here reads device memory.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "knn.cuh"

namespace debias {
namespace {

constexpr const char* kOp = "debias_C::knn_candidates";

// A contiguous CUDA tensor of `ndim` dims on `device` with the queries' dtype.
void check_tensor(const at::Tensor& x, const char* name, int64_t ndim, const at::Device& device,
                  at::ScalarType dtype) {
  TORCH_CHECK(x.is_cuda(), kOp, ": ", name, " must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.device() == device, kOp, ": ", name, " must be on the queries' device ", device,
              ", got ", x.device());
  TORCH_CHECK(x.dim() == ndim, kOp, ": ", name, " must be ", ndim, "-D, got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), kOp, ": ", name, " must be contiguous");
  TORCH_CHECK(x.scalar_type() == dtype, kOp, ": ", name, " must have the dtype of queries (",
              dtype, "), got ", x.scalar_type());
}

// knn_candidates(Tensor queries, Tensor database, Tensor query_sqnorms,
//                Tensor database_sqnorms, int k) -> (Tensor, Tensor)
// As on the CPU (csrc/knn.cpp): (scores [n, k] in the input dtype, indices [n, k] int64), each
// row sorted by (score, index), NaN ranked as +inf. k above cuda::kKnnMaxK raises
// NotImplementedError (the caller's torch path takes it); m is at most 2^31 - 1 per call.
std::tuple<at::Tensor, at::Tensor> knn_candidates_cuda(const at::Tensor& queries,
                                                       const at::Tensor& database,
                                                       const at::Tensor& query_sqnorms,
                                                       const at::Tensor& database_sqnorms,
                                                       int64_t k) {
  TORCH_CHECK(queries.is_cuda(), kOp, ": queries must be a CUDA tensor, got one on ",
              queries.device());
  const at::Device device = queries.device();
  const at::ScalarType dtype = queries.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, kOp,
              ": queries must be float32 or float64, got ", dtype);
  check_tensor(queries, "queries", 2, device, dtype);
  check_tensor(database, "database", 2, device, dtype);
  check_tensor(query_sqnorms, "query_sqnorms", 1, device, dtype);
  check_tensor(database_sqnorms, "database_sqnorms", 1, device, dtype);
  const int64_t n = queries.size(0), d = queries.size(1), m = database.size(0);
  TORCH_CHECK(n >= 1, kOp, ": queries must have at least one row, got shape ", queries.sizes());
  TORCH_CHECK(m >= 1, kOp, ": database must have at least one row, got shape ",
              database.sizes());
  TORCH_CHECK(d >= 1, kOp, ": queries must have at least one column, got shape ",
              queries.sizes());
  TORCH_CHECK(database.size(1) == d, kOp, ": database must have d = ", d,
              " columns like queries, got shape ", database.sizes());
  TORCH_CHECK(query_sqnorms.size(0) == n, kOp, ": query_sqnorms must have shape [", n,
              "], got ", query_sqnorms.sizes());
  TORCH_CHECK(database_sqnorms.size(0) == m, kOp, ": database_sqnorms must have shape [", m,
              "], got ", database_sqnorms.sizes());
  TORCH_CHECK(m <= std::numeric_limits<int32_t>::max(), kOp,
              ": database must have at most 2^31 - 1 rows per call, got ", m);
  TORCH_CHECK(k >= 1 && k <= m, kOp, ": k must be in [1, m = ", m, "], got ", k);
  TORCH_CHECK_NOT_IMPLEMENTED(k <= cuda::kKnnMaxK, kOp, ": the CUDA kernel takes k up to ",
                              cuda::kKnnMaxK, ", got ", k);

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor scores = at::empty({n, k}, queries.options());
  at::Tensor index = at::empty({n, k}, queries.options().dtype(at::kLong));
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  cuda::KnnArgs args{};
  args.dtype = dtype == at::kDouble ? cuda::DType::kFloat64 : cuda::DType::kFloat32;
  args.queries = queries.const_data_ptr();
  args.database = database.const_data_ptr();
  args.query_sqnorms = query_sqnorms.const_data_ptr();
  args.database_sqnorms = database_sqnorms.const_data_ptr();
  args.n = n;
  args.m = m;
  args.d = d;
  args.k = k;
  args.splits = cuda::knn_splits(n, m, k, sms);
  at::Tensor part_scores, part_index;  // the splits' lists, merged by the second kernel
  if (args.splits > 1) {
    part_scores = at::empty({n, args.splits, k}, queries.options());
    part_index = at::empty({n, args.splits, k}, queries.options().dtype(at::kLong));
    args.partial_scores = part_scores.mutable_data_ptr();
    args.partial_index = part_index.mutable_data_ptr<int64_t>();
  }
  args.scores = scores.mutable_data_ptr();
  args.index = index.mutable_data_ptr<int64_t>();
  C10_CUDA_CHECK(
      cuda::knn_candidates(args, c10::cuda::getCurrentCUDAStream(device.index()).stream()));
  return {scores, index};
}

}  // namespace
}  // namespace debias

TORCH_LIBRARY_IMPL(debias_C, CUDA, m) {
  m.impl("knn_candidates", &debias::knn_candidates_cuda);
}
