// CUDA kernels of the knn_candidates op: the fast pass of debias.knn, with the semantics of the
// CPU kernel (csrc/knn.cpp). T is float or double, and all arithmetic is in T.
//
//   r_ij = (qn_i + yn_j) - 2 <q_i, y_j>       for each query i, the k rows j with the smallest
//                                              r_ij, sorted by (r, j), NaN ranked as +inf
//
// The n x m score matrix is never stored. _knn_candidates_kernel: a block owns 64 queries and
// walks its range of the database in tiles of 64 rows. Per tile it
//   1. computes the 64 x 64 products from shared-memory stages of both operands (kBK columns
//      of d per stage: 16 floats / 8 doubles), each thread a 4 x 4 register tile, summing over
//      d in order with IEEE FMA (the next stage is prefetched into registers meanwhile);
//   2. writes the scores to a shared 64 x 64 tile (it reuses the stages' memory);
//   3. selects: warp w holds the running top-k lists of queries 8w .. 8w + 7 (sorted arrays in
//      shared memory). A row of the tile is read 32 scores at a time; a score is a candidate
//      iff the list is not yet full or score < the k-th best's rank key: one compare, and a
//      NaN never passes. Rows reach a list in increasing j, so a newcomer equal to the k-th
//      best never displaces it, as on the CPU. The ballot of candidates is walked in lane
//      (= j) order; each is inserted by the warp: its position is the count of entries before
//      it (a ballot per 32 entries), the tail moves up by one, the k-th best drops out.
// Keys are compared as floats (rank key, then index), not as packed bits: -0.0 and +0.0 tie
// and are ordered by j, exactly like the CPU's compares.
//
// With few queries (fewer 64-query tiles than two per SM) the database is also split across
// blocks (grid.y, knn_splits in knn.cuh): each split writes its k best, padded with index -1
// when its range holds fewer than k rows, to a workspace, and _knn_merge_kernel merges them
// per query (a warp per query, the same insertion with full (rank, index) compares).
//
// Cost: 2 n m d FLOPs (FMA) plus 3 n m for the scores. Shared-memory / L2 traffic per tile is
// (64 + 64) d sizeof(T) bytes for 64 * 64 * d FMAs: 16 FLOP/byte (float), so the product runs
// at the FMA rate when the database tile stays in L2 for the query blocks that read it
// together; DRAM reads the database about ceil(n / 64) / (concurrent query blocks) times and
// writes n k (sizeof(T) + 8) bytes. Selection costs about 2 ballots per query per tile plus one
// insertion (O(k / 32) warp steps) per list change, about k (1 + ln(m / k)) per query for data
// in random order: small next to 64 d FMAs per score once d >= 32 or so.
//
// Launch configuration: 256 threads (8 warps), grid (ceil(n / 64), splits); dynamic shared
// memory = max(stages, score tile) + 64 k (sizeof(T) + 4) + 256 bytes: 34 KiB for float at
// k = 32, 81 KiB at k = 128 (float64: 57 / 129 KiB), so large k lowers occupancy (opted in
// above 48 KiB). At most 128 registers per thread (2 blocks per SM). The merge: 128 threads,
// a warp per query, 4 k (sizeof(T) + 4) bytes of shared memory.
//
// Arithmetic is IEEE, round to nearest (ieee.cuh), and nothing flushes subnormals (no fast
// math, no -ftz: debias/_build.py): the dot product error stays within the gamma_d bound the
// caller uses (kKnnDotUnit = 0) and subnormal scores compare, and order, as on the CPU.
//
// Tile, chunk, worker and block mean what csrc/README.md says, in every kernel file.

#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "ieee.cuh"
#include "knn.cuh"

namespace debias {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = static_cast<int>(kKnnTileRows);  // queries per block, rows per tile
constexpr int kRowsPerWarp = kTile / kWarps;            // lists each warp owns
constexpr int kMinBlocks = 2;
constexpr int kMergeThreads = 128;
constexpr int kMergeWarps = kMergeThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kTile == 64 && kThreads == 256, "the 4 x 4 thread tiles cover 64 x 64");

// Shapes of the staged operands and of the score tile, per type.
template <typename T>
struct Shape {
  static constexpr int kBK = 64 / sizeof(T);           // columns of d per stage: 64 bytes a row
  static constexpr int kPad = 16 / sizeof(T);          // rows stay 16-byte aligned
  static constexpr int kLd = kTile + kPad;             // stage row: one column of d, 64 rows
  static constexpr int kLdS = kTile + kPad;            // score tile row: one query
  static constexpr int kLoads = kTile * kBK / kThreads;  // elements a thread stages per operand
  static constexpr int kStageBytes = 2 * kBK * kLd * sizeof(T);
  static constexpr int kScoreBytes = kTile * kLdS * sizeof(T);
  static constexpr int kUnionBytes = kStageBytes > kScoreBytes ? kStageBytes : kScoreBytes;
};

template <typename T>
constexpr size_t select_smem_bytes(int k) {
  return Shape<T>::kUnionBytes + static_cast<size_t>(kTile) * k * (sizeof(T) + sizeof(uint32_t)) +
         kTile * sizeof(int);
}

template <typename T>
constexpr size_t merge_smem_bytes(int k) {
  return static_cast<size_t>(kMergeWarps) * k * (sizeof(T) + sizeof(uint32_t));
}

// ---- the order of scores (arithmetic: ieee.cuh) ----------------------------------------------

// NaN ranks as +inf.
__device__ __forceinline__ float rank_key(float r) {
  return r != r ? __int_as_float(0x7f800000) : r;
}
__device__ __forceinline__ double rank_key(double r) {
  return r != r ? __longlong_as_double(0x7ff0000000000000LL) : r;
}

template <typename T>
__device__ __forceinline__ T infinity() {
  if constexpr (std::is_same_v<T, double>) {
    return __longlong_as_double(0x7ff0000000000000LL);
  } else {
    return __int_as_float(0x7f800000);
  }
}

// ---- end of the order ----------------------------------------------------------------------

// Four consecutive elements from 16-byte aligned shared memory.
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x;
  v[1] = t.y;
  v[2] = t.z;
  v[3] = t.w;
}
__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
  const double2 a = *reinterpret_cast<const double2*>(p);
  const double2 b = *reinterpret_cast<const double2*>(p + 2);
  v[0] = a.x;
  v[1] = a.y;
  v[2] = b.x;
  v[3] = b.y;
}

// (key_a, j_a) before (key_b, j_b) in the order of the lists; keys are rank keys.
template <typename T>
__device__ __forceinline__ bool key_before(T key_a, uint32_t j_a, T key_b, uint32_t j_b) {
  return key_a < key_b || (key_a == key_b && j_a < j_b);
}

// Inserts (s, j) into one sorted list of `size` <= k entries, by the whole warp (every lane
// calls it with the same arguments). When the list is full its last entry drops out; an entry
// that would land at k is not inserted. Returns the new size.
template <typename T>
__device__ __forceinline__ int warp_insert(T* ls,         // [k] scores, sorted by rank key, j
                                           uint32_t* li,  // [k] database rows
                                           int size, int k, T s, uint32_t j, int lane) {
  const T key = rank_key(s);
  int pos = 0;
  for (int base = 0; base < size; base += 32) {
    const int e = base + lane;
    const bool before = e < size && key_before(rank_key(ls[e]), li[e], key, j);
    pos += __popc(__ballot_sync(kFullMask, before));
  }
  if (pos >= k) return size;
  const int new_size = size < k ? size + 1 : k;
  // Entries [pos, new_size - 1) move up by one, 32 at a time from the top, so a group of 32
  // never reads what the group above it wrote.
  for (int top = new_size - 2; top >= pos; top -= 32) {
    const int e = top - lane;
    const bool move = e >= pos;
    T vs = T(0);
    uint32_t vi = 0;
    if (move) {
      vs = ls[e];
      vi = li[e];
    }
    __syncwarp();
    if (move) {
      ls[e + 1] = vs;
      li[e + 1] = vi;
    }
    __syncwarp();
  }
  if (lane == 0) {
    ls[pos] = s;
    li[pos] = j;
  }
  __syncwarp();
  return new_size;
}

// Stages kBK columns [c0, c0 + kBK) of 64 rows [r0, r0 + 64) of a [rows, d] matrix into
// registers: element e = tid + 256 t of the stage is (row e / kBK, column e % kBK), so 64
// consecutive bytes of a row go to consecutive threads. Outside the matrix: 0.
template <typename T>
__device__ __forceinline__ void stage_load(const T* __restrict__ x, int64_t rows, int64_t d,
                                           int64_t r0, int64_t c0, int tid,
                                           T (&v)[Shape<T>::kLoads]) {
  using S = Shape<T>;
#pragma unroll
  for (int t = 0; t < S::kLoads; ++t) {
    const int e = tid + kThreads * t;
    const int64_t r = r0 + e / S::kBK, c = c0 + e % S::kBK;
    v[t] = (r < rows && c < d) ? x[r * d + c] : T(0);
  }
}

// Writes a staged operand transposed: stage[c][r], one row of the stage per column of d.
template <typename T>
__device__ __forceinline__ void stage_store(T* stage, int tid, const T (&v)[Shape<T>::kLoads]) {
  using S = Shape<T>;
#pragma unroll
  for (int t = 0; t < S::kLoads; ++t) {
    const int e = tid + kThreads * t;
    stage[(e % S::kBK) * S::kLd + e / S::kBK] = v[t];
  }
}

// One block: queries [i0, i0 + 64) against database rows [j_begin, j_end) of split
// blockIdx.y. Writes each query's k best (sorted; index -1 and +inf past the rows the range
// holds) to out_scores / out_index at (i * splits + split) * k.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    _knn_candidates_kernel(const T* __restrict__ queries,   // [n, d]
                           const T* __restrict__ database,  // [m, d]
                           const T* __restrict__ qn,        // [n] squared norms of queries
                           const T* __restrict__ yn,        // [m] squared norms of the database
                           int64_t n, int64_t m, int64_t d, int k,
                           int64_t rows_per_split,  // database rows per split, whole tiles
                           T* __restrict__ out_scores,       // [n, splits, k]
                           int64_t* __restrict__ out_index)  // [n, splits, k]
{
  using S = Shape<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* stage_q = reinterpret_cast<T*>(smem);  // [kBK][kLd] queries, transposed
  T* stage_y = stage_q + S::kBK * S::kLd;   // [kBK][kLd] database rows, transposed
  T* tile = reinterpret_cast<T*>(smem);     // [64][kLdS] scores; reuses the stages
  T* list_s = reinterpret_cast<T*>(smem + S::kUnionBytes);  // [64][k] scores
  uint32_t* list_i = reinterpret_cast<uint32_t*>(list_s + kTile * k);  // [64][k] rows
  int* list_size = reinterpret_cast<int*>(list_i + kTile * k);        // [64]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int tx = tid % 16, ty = tid / 16;  // this thread's products: rows 4 ty.., columns 4 tx..
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t split = blockIdx.y, splits = gridDim.y;
  const int64_t j_begin = split * rows_per_split;
  const int64_t j_end = j_begin + rows_per_split < m ? j_begin + rows_per_split : m;

  if (tid < kTile) list_size[tid] = 0;
  T q_norm[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t i = i0 + 4 * ty + a;
    q_norm[a] = i < n ? qn[i] : T(0);
  }

  for (int64_t j0 = j_begin; j0 < j_end; j0 += kTile) {
    // 1. Products of the 64 x 64 tile, d in stages of kBK columns.
    T acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] = T(0);
    }
    T vq[S::kLoads], vy[S::kLoads];
    stage_load(queries, n, d, i0, 0, tid, vq);
    stage_load(database, m, d, j0, 0, tid, vy);
    for (int64_t c0 = 0; c0 < d; c0 += S::kBK) {
      stage_store(stage_q, tid, vq);
      stage_store(stage_y, tid, vy);
      __syncthreads();
      if (c0 + S::kBK < d) {  // the next stage's loads overlap this stage's FMAs
        stage_load(queries, n, d, i0, c0 + S::kBK, tid, vq);
        stage_load(database, m, d, j0, c0 + S::kBK, tid, vy);
      }
#pragma unroll
      for (int c = 0; c < S::kBK; ++c) {
        T a_reg[4], b_reg[4];
        load4(stage_q + c * S::kLd + 4 * ty, a_reg);
        load4(stage_y + c * S::kLd + 4 * tx, b_reg);
#pragma unroll
        for (int a = 0; a < 4; ++a) {
#pragma unroll
          for (int b = 0; b < 4; ++b) acc[a][b] = fma_rn(a_reg[a], b_reg[b], acc[a][b]);
        }
      }
      __syncthreads();
    }

    // 2. Scores into the tile (the stages are free after the last barrier).
    T y_norm[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t j = j0 + 4 * tx + b;
      y_norm[b] = j < j_end ? yn[j] : T(0);
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        // (qn + yn) - 2 p, as the CPU evaluates it; p + p is 2 p exactly.
        tile[(4 * ty + a) * S::kLdS + 4 * tx + b] =
            sub_rn(add_rn(q_norm[a], y_norm[b]), add_rn(acc[a][b], acc[a][b]));
      }
    }
    __syncthreads();

    // 3. Selection: warp w updates the lists of queries 8w .. 8w + 7.
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int row = warp * kRowsPerWarp + rr;
      if (i0 + row >= n) break;  // warp-uniform
      T* ls = list_s + row * k;
      uint32_t* li = list_i + row * k;
      int size = list_size[row];
      T thr = size == k ? rank_key(ls[k - 1]) : infinity<T>();
      for (int c = 0; c < kTile; c += 32) {
        const int64_t j = j0 + c + lane;
        const T s = tile[row * S::kLdS + c + lane];
        const bool hit = j < j_end && (size < k || s < thr);
        unsigned mask = __ballot_sync(kFullMask, hit);
        while (mask != 0) {  // warp-uniform: lanes in j order
          const int src = __ffs(mask) - 1;
          mask &= mask - 1;
          const T sc = __shfl_sync(kFullMask, s, src);
          if (size == k && !(sc < thr)) continue;  // thr dropped since the ballot
          size = warp_insert(ls, li, size, k, sc, static_cast<uint32_t>(j0 + c + src), lane);
          if (size == k) thr = rank_key(ls[k - 1]);
        }
      }
      if (lane == 0) list_size[row] = size;
    }
    __syncthreads();  // the next tile's stages overwrite the score tile
  }

  // The lists out, each warp its own queries.
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int row = warp * kRowsPerWarp + rr;
    const int64_t i = i0 + row;
    if (i >= n) break;
    const int size = list_size[row];
    const int64_t base = (i * splits + split) * k;
    for (int t = lane; t < k; t += 32) {
      out_scores[base + t] = t < size ? list_s[row * k + t] : infinity<T>();
      out_index[base + t] = t < size ? static_cast<int64_t>(list_i[row * k + t]) : -1;
    }
  }
}

// The k best of each query's `splits` partial lists (each sorted, padded with index -1): a warp
// per query, candidates read 32 at a time and inserted with full (rank key, index) compares.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads)
    _knn_merge_kernel(const T* __restrict__ part_scores,        // [n, splits, k]
                      const int64_t* __restrict__ part_index,   // [n, splits, k]
                      int64_t n, int64_t splits, int k,
                      T* __restrict__ out_scores,               // [n, k]
                      int64_t* __restrict__ out_index)          // [n, k]
{
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kMergeWarps + warp;
  if (i >= n) return;  // warp-uniform; no block barrier follows
  T* ls = reinterpret_cast<T*>(smem) + warp * k;
  uint32_t* li = reinterpret_cast<uint32_t*>(reinterpret_cast<T*>(smem) + kMergeWarps * k) +
                 warp * k;
  const T* cs = part_scores + i * splits * k;
  const int64_t* ci = part_index + i * splits * k;
  const int64_t total = splits * k;
  int size = 0;
  T thr = infinity<T>();
  uint32_t thr_j = 0;
  for (int64_t b = 0; b < total; b += 32) {
    const int64_t e = b + lane;
    T s = T(0);
    int64_t jj = -1;
    if (e < total) {
      s = cs[e];
      jj = ci[e];
    }
    const uint32_t j = static_cast<uint32_t>(jj);
    const bool hit = jj >= 0 && (size < k || key_before(rank_key(s), j, thr, thr_j));
    unsigned mask = __ballot_sync(kFullMask, hit);
    while (mask != 0) {
      const int src = __ffs(mask) - 1;
      mask &= mask - 1;
      const T sc = __shfl_sync(kFullMask, s, src);
      const uint32_t jc = __shfl_sync(kFullMask, j, src);
      if (size == k && !key_before(rank_key(sc), jc, thr, thr_j)) continue;
      size = warp_insert(ls, li, size, k, sc, jc, lane);
      if (size == k) {
        thr = rank_key(ls[k - 1]);
        thr_j = li[k - 1];
      }
    }
  }
  for (int t = lane; t < k; t += 32) {
    out_scores[i * k + t] = t < size ? ls[t] : infinity<T>();
    out_index[i * k + t] = t < size ? static_cast<int64_t>(li[t]) : -1;
  }
}

template <typename T>
cudaError_t launch(const KnnArgs& a, cudaStream_t stream) {
  const int k = static_cast<int>(a.k);
  const int64_t q_tiles = (a.n + kTile - 1) / kTile;
  const size_t smem = select_smem_bytes<T>(k);
  cudaError_t err = cudaFuncSetAttribute(_knn_candidates_kernel<T>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const bool merge = a.splits > 1;
  T* scores = static_cast<T*>(merge ? a.partial_scores : a.scores);
  int64_t* index = merge ? a.partial_index : a.index;
  const dim3 grid(static_cast<unsigned>(q_tiles), static_cast<unsigned>(a.splits));
  _knn_candidates_kernel<T><<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(a.queries), static_cast<const T*>(a.database),
      static_cast<const T*>(a.query_sqnorms), static_cast<const T*>(a.database_sqnorms), a.n,
      a.m, a.d, k, knn_rows_per_split(a.m, a.splits), scores, index);
  err = cudaGetLastError();
  if (err != cudaSuccess || !merge) return err;
  const int64_t blocks = (a.n + kMergeWarps - 1) / kMergeWarps;
  _knn_merge_kernel<T><<<static_cast<unsigned>(blocks), kMergeThreads, merge_smem_bytes<T>(k),
                         stream>>>(static_cast<const T*>(a.partial_scores), a.partial_index,
                                   a.n, a.splits, k, static_cast<T*>(a.scores), a.index);
  return cudaGetLastError();
}

}  // namespace

cudaError_t knn_candidates(const KnnArgs& args, cudaStream_t stream) {
  if (args.dtype != DType::kFloat32 && args.dtype != DType::kFloat64) {
    return cudaErrorNotSupported;
  }
  if (args.k > kKnnMaxK) return cudaErrorNotSupported;
  constexpr int64_t kMaxGridX = 2147483647;
  if (args.n < 1 || args.m < 1 || args.d < 1 || args.k < 1 || args.k > args.m ||
      args.m > 2147483647 || args.splits < 1 || args.splits > 65535 ||
      (args.n + kTile - 1) / kTile > kMaxGridX) {
    return cudaErrorInvalidValue;
  }
  if (args.splits > 1 && (args.partial_scores == nullptr || args.partial_index == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return args.dtype == DType::kFloat64 ? launch<double>(args, stream)
                                       : launch<float>(args, stream);
}

}  // namespace cuda
}  // namespace debias
