// Launcher of the CUDA kernels of the knn_candidates op (csrc/cuda/knn.cu). No torch headers:
// the .cu compiles with plain nvcc and the torch-facing glue (csrc/cuda/knn_glue.cpp) includes
// this with any C++17 compiler.
//
// knn_candidates: for each query i the k database rows j with the smallest
//   r_ij = (qn_i + yn_j) - 2 <q_i, y_j>,
// sorted by (r, j), a NaN score ranked as +inf (still ordered by j); the semantics of the CPU
// kernel (csrc/knn.cpp). Every pointer is a device pointer to contiguous data.
//
// Tile, chunk, worker and block mean what csrc/README.md says, in every kernel file.

#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "noise_loss.cuh"  // DType, the storage-type enum every launcher takes

namespace debias {
namespace cuda {

// The largest k the kernels take; a larger k returns cudaErrorNotSupported (the caller uses
// its torch path). Each block keeps 64 sorted lists of k entries in shared memory: at k = 128
// that is 64 KiB (float32) or 96 KiB (float64) next to the score tile.
constexpr int64_t kKnnMaxK = 128;

// Relative error of one product term of <q_i, y_j> beyond IEEE rounding of the data type: the
// kernels multiply with plain fp32 / fp64 FMA (no TF32, no flush of subnormals), so the dot
// product is within gamma_d |q| |y| of the exact one for any summation order, nothing more.
constexpr double kKnnDotUnit = 0.0;

// Queries per block, and database rows per tile.
constexpr int64_t kKnnTileRows = 64;

// Database splits: with few query tiles, the database is cut into `splits` ranges searched by
// separate blocks, whose lists a second kernel merges. Enough blocks for two per SM, each
// range at least 4 tiles and 2k rows (the merge reads splits * k entries per query).
inline int64_t knn_splits(int64_t n, int64_t m, int64_t k, int64_t num_sms) {
  const int64_t q_tiles = (n + kKnnTileRows - 1) / kKnnTileRows;
  const int64_t db_tiles = (m + kKnnTileRows - 1) / kKnnTileRows;
  const int64_t target = 2 * (num_sms > 0 ? num_sms : 1);
  if (q_tiles >= target) return 1;
  const int64_t want = (target + q_tiles - 1) / q_tiles;
  int64_t min_tiles = (2 * k + kKnnTileRows - 1) / kKnnTileRows;
  if (min_tiles < 4) min_tiles = 4;
  int64_t splits = db_tiles / min_tiles;
  if (splits > want) splits = want;
  if (splits > 65535) splits = 65535;  // gridDim.y
  if (splits <= 1) return 1;
  // Equal ranges of whole tiles, none empty.
  const int64_t per = (db_tiles + splits - 1) / splits;
  return (db_tiles + per - 1) / per;
}

// Database rows of each split (the last one may be shorter): whole tiles.
inline int64_t knn_rows_per_split(int64_t m, int64_t splits) {
  const int64_t db_tiles = (m + kKnnTileRows - 1) / kKnnTileRows;
  return (db_tiles + splits - 1) / splits * kKnnTileRows;
}

struct KnnArgs {
  DType dtype;                   // T: kFloat32 or kFloat64, of every float array here
  const void* queries;           // [n, d] T
  const void* database;          // [m, d] T
  const void* query_sqnorms;     // [n] T
  const void* database_sqnorms;  // [m] T
  int64_t n, m, d;               // n, m, d >= 1, m <= 2^31 - 1
  int64_t k;                     // 1 <= k <= min(m, kKnnMaxK)
  int64_t splits;                // knn_splits(n, m, k, SMs of the device)
  void* partial_scores;          // splits > 1: [n, splits, k] T workspace, else unused
  int64_t* partial_index;        // splits > 1: [n, splits, k] workspace, else unused
  void* scores;                  // [n, k] T, output
  int64_t* index;                // [n, k], output
};

// Enqueues the search on `stream`; returns the launches' cudaError_t, cudaErrorNotSupported
// for k > kKnnMaxK or another dtype, cudaErrorInvalidValue for sizes out of range.
cudaError_t knn_candidates(const KnnArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace debias
