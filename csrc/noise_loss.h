// The contract of the noise_loss op, written once for every C++ and CUDA file that
// implements it (csrc/noise_loss.cpp, csrc/cuda/noise_loss.cu and its glue). No torch
// headers: plain nvcc includes it. Its torch side, the arguments' checks that the CPU
// launchers and the CUDA glue share, is csrc/noise_loss_args.h. debias/ops/noise_loss.py holds the Python side (the
// argument record and the same constants; tests/test_noise_loss.py checks the two agree),
// and triton_kernels/noise_loss.py follows the same arithmetic.
//
// Every diffusion family is one affine op. For sample b of D elements, eps its noise:
//
//   add_noise   x_t_i  = rnd_T(rnd_T(a_b x0_i) + rnd_T(s_b eps_i))      coef [2, B]: a, s
//   noise_loss  y_i    = p_b eps_i + q_b x0_i      (only the terms named by `terms`)
//               loss_b = (sum_i (pred_i - y_i)^2 in double) / D * w_b   coef [3, B]: w, p, q
//               grad_i = rnd_P(g_b * (pred_i - y_i)),
//               g_b    = (2 * w_b / D / grad_div) * go_b       (in C, left to right)
//               total  = (sum_b loss_b in double) / loss_div
//
// rnd_X rounds to storage type X (to nearest even); C, the compute type, is double for
// float64 data and float otherwise. In x_t, y and g_b every product and sum rounds on its
// own (no fused multiply-add), so x_t and the gradient have the same bits on every backend;
// the loss sums are deterministic, each backend adding in its own fixed order. The
// coefficient rows hold [B] values in C, computed per sample in Python (float64, rounded as
// the trainer being replaced rounds them). grad_div and loss_div are B for a batch mean, 1
// otherwise (integers, so every backend divides by the same exact number); go_b is the
// upstream gradient of the recomputing backward (one value, or one per sample), 1 forward.
// With the stream (noise is None) eps_i is rnd_E(normal_i) of philox.h, E = eps_dtype.

#pragma once

#include <stdint.h>

namespace debias {
namespace noise_loss {

// Bits of `terms`: which parts of y = p eps + q x0 the kernel reads. A term that is absent
// is not read at all (no noise for an x0 target, no x0 for an epsilon target).
enum Terms : int64_t { kEpsTerm = 1, kX0Term = 2 };

// Rows of the coefficient tensors.
enum NoiseRow : int64_t { kRowA = 0, kRowS = 1, kNoiseRows = 2 };
enum LossRow : int64_t { kRowW = 0, kRowP = 1, kRowQ = 2, kLossRows = 3 };

// The op schemas (torch.library); the Python record in debias/ops/noise_loss.py lists the
// same arguments in the same order.
#define DEBIAS_ADD_NOISE_SCHEMA                                                         \
  "add_noise(Tensor x0, Tensor coef, Tensor? noise, int seed, int offset, bool keep_noise)" \
  " -> (Tensor, Tensor)"
#define DEBIAS_NOISE_LOSS_ARGS                                                          \
  "Tensor pred, Tensor coef, Tensor? noise, Tensor? x0, int terms, ScalarType eps_dtype, " \
  "int seed, int offset, int grad_div"
#define DEBIAS_NOISE_LOSS_FWD_SCHEMA                                                    \
  "noise_loss_fwd(" DEBIAS_NOISE_LOSS_ARGS ", int loss_div, bool need_grad)"         \
  " -> (Tensor, Tensor, Tensor)"
#define DEBIAS_NOISE_LOSS_BWD_SCHEMA \
  "noise_loss_bwd(" DEBIAS_NOISE_LOSS_ARGS ", Tensor grad_output) -> Tensor"
#define DEBIAS_PHILOX_NORMAL_SCHEMA "philox_normal_(Tensor(a!) out, int seed, int offset) -> ()"

}  // namespace noise_loss
}  // namespace debias
