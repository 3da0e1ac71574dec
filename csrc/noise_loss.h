// The contract of the noise_loss op, written once for every C++ and CUDA file that
// implements it (csrc/noise_loss.cpp, csrc/cuda/noise_loss.cu and its glue). No torch
// headers: plain nvcc includes it. Its torch side, the arguments' checks that the CPU
// launchers and the CUDA glue share, is csrc/noise_loss_args.h. debias/ops/noise_loss.py holds the Python side (the
// argument record and the same constants; tests/test_noise_loss.py checks the two agree),
// and triton_kernels/noise_loss.py follows the same arithmetic.
//
// Every diffusion family is one affine op. For sample b of D elements, eps its noise:
//
//   add_noise   e_i    = eps_i, or rnd_T(eps_i + rnd_T(g_b xi_i)) with 3 rows    coef [2|3, B]:
//               x_t_i  = rnd_T(rnd_T(a_b x0_i) + rnd_T(s_b e_i))                  a, s (, g)
//   noise_loss  y_i    = p_b eps_i + q_b x0_i      (only the terms named by `terms`)
//               d_i    = pred_i - y_i,  m_i = the mask's value at i (1 without a mask)
//               loss_b = (sum_i m_i l(d_i) in double) / D * w_b      coef [3|4, B]: w, p, q (, c)
//               grad_i = rnd_P(g_b * (m_i * h(d_i))),
//               g_b    = (k * w_b / D / grad_div) * go_b       (in C, left to right)
//               total  = (sum_b loss_b in double) / loss_div
//
// The loss kind (`kind`) gives l, its derivative factor h and the constant k:
//   kL2           l = d d                       h = d                         k = 2
//   kL1           l = |d|                       h = sign(d) (0 at 0)          k = 1
//   kPseudoHuber  l = d d / (r + c_b)           h = d / r,  r = sqrt(d d + c_b c_b)   k = 1
// (kPseudoHuber is sqrt(d^2 + c^2) - c without its cancellation; sd-scripts' "huber" is it
// with w_b times 2 c_b, "smooth_l1" with w_b times 2: the callers fold those factors into w.)
// Without a mask, m_i * h(d_i) is h(d_i) (no multiplication); with one, `m_i * h` rounds
// once. In r every product and sum rounds on its own, sqrt and the division round to
// nearest (IEEE), so the gradient has the same bits on every backend.
//
// The mask is never expanded: it is Mb x M values in C (Mb = B, or 1 for one mask shared by
// the batch: mask_batch_stride M or 0), and element j of sample b (0 <= j < D) reads
//   m = mask[b * mask_batch_stride + (j / mask_inner) % mask_size]
// which covers [B, 1, H, W] alpha masks of [B, C, H, W] (inner 1, size H W), [B, 1, F, 1, 1]
// frame masks of [B, C, F, H, W] (inner H W, size F) and [B, N, 1] token masks of [B, N, C]
// (inner C, size N). The caller reduces any broadcastable mask to this form.
//
// With xi, add_noise perturbs the input only (diffusers' --input_perturbation, sd-scripts'
// --ip_noise_gamma): the target keeps eps. xi is a given tensor like x0, or the stream of
// (xi_seed, xi_offset), drawn as eps is.
//
// rnd_X rounds to storage type X (to nearest even); C, the compute type, is double for
// float64 data and float otherwise. In x_t, y, h and g_b every product and sum rounds on its
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
// kRowG (the perturbation's strength) is present only when xi is read; kRowC (the
// pseudo-Huber c) only for kPseudoHuber.
enum NoiseRow : int64_t { kRowA = 0, kRowS = 1, kNoiseRows = 2, kRowG = 2, kPerturbedRows = 3 };
enum LossRow : int64_t { kRowW = 0, kRowP = 1, kRowQ = 2, kLossRows = 3, kRowC = 3, kHuberRows = 4 };

// `kind`: the elementwise loss l.
enum Kind : int64_t { kL2 = 0, kL1 = 1, kPseudoHuber = 2 };

// The op schemas (torch.library); the Python record in debias/ops/noise_loss.py lists the
// same arguments in the same order.
#define DEBIAS_ADD_NOISE_SCHEMA                                                         \
  "add_noise(Tensor x0, Tensor coef, Tensor? noise, int seed, int offset, bool keep_noise, "  \
  "Tensor? xi, int xi_seed, int xi_offset) -> (Tensor, Tensor)"
#define DEBIAS_NOISE_LOSS_ARGS                                                          \
  "Tensor pred, Tensor coef, Tensor? noise, Tensor? x0, int terms, ScalarType eps_dtype, " \
  "int seed, int offset, int kind, Tensor? mask, int mask_inner, int mask_size, "          \
  "int mask_batch_stride, int grad_div"
#define DEBIAS_NOISE_LOSS_FWD_SCHEMA                                                    \
  "noise_loss_fwd(" DEBIAS_NOISE_LOSS_ARGS ", int loss_div, bool need_grad)"         \
  " -> (Tensor, Tensor, Tensor)"
#define DEBIAS_NOISE_LOSS_BWD_SCHEMA \
  "noise_loss_bwd(" DEBIAS_NOISE_LOSS_ARGS ", Tensor grad_output) -> Tensor"
#define DEBIAS_PHILOX_NORMAL_SCHEMA "philox_normal_(Tensor(a!) out, int seed, int offset) -> ()"

}  // namespace noise_loss
}  // namespace debias
