// The torch side of the CUDA kernels of the knn_candidates op (csrc/cuda/knn.cu): allocates the
// outputs and the split workspace, launches on the current stream of the data's device, and
// registers the kernels under the CUDA key of the op that csrc/knn.cpp defines. The arguments
// are checked by csrc/knn_args.h, as on the CPU. (Not named knn.cpp: setuptools names objects
// by stem, and that one would collide with knn.cu's in the same folder.) Nothing here reads
// device memory.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "knn.cuh"
#include "knn_args.h"

namespace debias {
namespace {

// Schema: DEBIAS_KNN_CANDIDATES_SCHEMA (knn_args.h, with the arguments). As on the CPU
// (csrc/knn.cpp): (scores [n, k] in the input dtype, indices [n, k] int64), each row sorted by
// (score, index), NaN ranked as +inf. k above cuda::kKnnMaxK raises NotImplementedError (the
// caller's torch path takes it); m is at most 2^31 - 1 per call.
std::tuple<at::Tensor, at::Tensor> knn_candidates_cuda(const at::Tensor& queries,
                                                       const at::Tensor& database,
                                                       const at::Tensor& query_sqnorms,
                                                       const at::Tensor& database_sqnorms,
                                                       int64_t k) {
  constexpr const char* op = knn::kCandidatesOp;
  const knn::CandidatesArgs a =
      knn::candidates_args(kCUDA, queries, database, query_sqnorms, database_sqnorms, k);
  const int64_t n = a.n, m = a.m, d = a.d;
  TORCH_CHECK(m <= std::numeric_limits<int32_t>::max(), op,
              ": database must have at most 2^31 - 1 rows per call, got ", m);
  TORCH_CHECK_NOT_IMPLEMENTED(k <= cuda::kKnnMaxK, op, ": the CUDA kernel takes k up to ",
                              cuda::kKnnMaxK, ", got ", k);

  const at::Device device = queries.device();
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor scores = at::empty({n, k}, queries.options());
  at::Tensor index = at::empty({n, k}, queries.options().dtype(at::kLong));
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  cuda::KnnArgs args{};
  args.dtype = a.dtype == at::kDouble ? cuda::DType::kFloat64 : cuda::DType::kFloat32;
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
