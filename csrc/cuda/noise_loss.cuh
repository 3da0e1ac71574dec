// Launchers of the CUDA kernels of the noise_loss op (csrc/cuda/noise_loss.cu). No torch
// headers: the .cu compiles with plain nvcc and the torch-facing glue
// (csrc/cuda/noise_loss_glue.cpp) includes this with any C++17 compiler.
//
// The contract (formulas, coefficient rows, `terms`, grad_div / loss_div) is csrc/noise_loss.h.
// Every pointer is a device pointer to contiguous data; coefficients and outputs are in the
// compute type C (double for float64 data, float otherwise). Flat indices and sizes are int64.
// Each launcher enqueues its work on `stream` and returns the launch's cudaError_t.
//
// Tile, chunk, worker and block mean what csrc/README.md says, in every kernel file.

#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace debias {
namespace cuda {

// The storage types the kernels take.
enum class DType : int32_t { kFloat32, kFloat64, kBFloat16, kFloat16 };

// Elements of one sample that one CUDA block covers (the last chunk of a sample is shorter).
// The loss is summed per chunk, so the cut, and with it the bits of the loss, depend on B, D
// and the dtypes only.
constexpr int64_t kChunk = 8192;

inline int64_t chunks_per_sample(int64_t D) {
  return D <= kChunk ? 1 : (D + kChunk - 1) / kChunk;
}

// Workspace of noise_loss_fwd: doubles for the per-chunk partial sums (none when a sample fits
// one chunk) and int32 counters, zeroed before the launch.
inline int64_t noise_loss_partials(int64_t B, int64_t D) {
  return chunks_per_sample(D) > 1 ? B * chunks_per_sample(D) : 0;
}
inline int64_t noise_loss_counters(int64_t B) { return B + 1; }

// x_t[i] = rnd_T(rnd_T(a_b * x0[i]) + rnd_T(s_b * e_i)), a_b and s_b rows kRowA and kRowS
// of coef (csrc/noise_loss.h); eps_i = noise[i], or rnd_T(normal_i) of the stream
// (seed, offset) when noise is nullptr; e_i = eps_i, or when perturbed
// rnd_T(eps_i + rnd_T(g_b * xi_i)), g_b row kRowG and xi_i = xi[i], or rnd_T(normal_i) of the
// stream (xi_seed, xi_offset) when xi is nullptr.
cudaError_t add_noise(DType dtype,            // T of x0, noise, xi and x_t
                      const void* x0,         // [B * D] T
                      const void* coef,       // [kNoiseRows or kPerturbedRows, B] C: a, s (, g)
                      const void* noise,      // [B * D] T, or nullptr: the stream
                      uint64_t seed, uint64_t offset,
                      bool perturbed,         // coef has the row g: e = eps + g xi
                      const void* xi,         // [B * D] T, or nullptr: the stream; unread
                                              // unless perturbed
                      uint64_t xi_seed, uint64_t xi_offset,
                      void* x_t,              // [B * D] T, output
                      int64_t B, int64_t D, cudaStream_t stream);

// The loss side of a training step: loss_b, total and grad of csrc/noise_loss.h.
struct NoiseLossArgs {
  DType pred_dtype;           // P
  DType eps_dtype;            // E: of noise and x0, and the rounding of the stream
  const void* pred;           // [B * D] P
  const void* coef;           // [kLossRows, B] C: rows w, p, q; [kHuberRows, B] (row c too)
                              // for kPseudoHuber
  const void* noise;          // [B * D] E, or nullptr: the stream (seed, offset); unread
                              // without kEpsTerm
  const void* x0;             // [B * D] E; unread (may be nullptr) without kX0Term
  int64_t terms;              // kEpsTerm, kX0Term or both: the terms of y = p eps + q x0
  uint64_t seed, offset;
  int64_t kind;               // kL2, kL1 or kPseudoHuber: the loss l, its factor h and k
  const void* mask;           // [Mb * mask_size] C, or nullptr: no mask (m_i = 1)
  int64_t mask_inner;         // element j of a sample reads its mask row at
  int64_t mask_size;          //   (j / mask_inner) % mask_size, all >= 1
  int64_t mask_batch_stride;  // mask_size (a row per sample) or 0 (one row for all)
  int64_t grad_div;           // g_b = k w_b / D / grad_div (times go_b in backward)
  int64_t loss_div;           // forward: total = sum_b loss_b / loss_div
  const void* grad_output;    // backward: C, 1 or B values
  int64_t grad_output_numel;  // 1 (one value for every sample) or B
  void* loss;                 // forward: [B] C, output
  void* total;                // forward: [] C, output
  void* grad;                 // [B * D] P, output; nullptr: forward without gradient
  double* partial;            // forward: noise_loss_partials(B, D) doubles of workspace
  int32_t* counter;           // forward: noise_loss_counters(B) int32, zeroed
  int64_t B, D;
};

// loss, total and (when grad is not nullptr) grad.
cudaError_t noise_loss_fwd(const NoiseLossArgs& args, cudaStream_t stream);
// grad only, each sample's factor times grad_output.
cudaError_t noise_loss_bwd(const NoiseLossArgs& args, cudaStream_t stream);

// out[i] = rnd_T(normal_i) of the stream (seed, offset), i in [0, n).
cudaError_t philox_normal(DType dtype, void* out, int64_t n, uint64_t seed, uint64_t offset,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace debias
