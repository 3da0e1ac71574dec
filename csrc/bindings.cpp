// The Python module debias._C. Importing it loads this library, which runs the static
// TORCH_LIBRARY registrations of csrc/*.cpp: the ops themselves are reached through
// torch.ops.debias_C, not through attributes of this module.
//
// The seven ops (kernels in the files named, schemas and argument checks in csrc/<op>_args.h
// and csrc/noise_loss.h; debias/ops validates their inputs):
//   add_noise            x_t = a_b x0 + s_b eps, eps given or the Philox stream
//                        (csrc/noise_loss.cpp; contract and schemas in csrc/noise_loss.h)
//   noise_loss_fwd       per-sample weighted loss w_b / D sum (pred - y)^2 and its gradient
//   noise_loss_bwd       the gradient again, times the upstream gradient (recompute design)
//   philox_normal_       the Philox stream's normals written into a tensor (csrc/philox.h)
//   knn_candidates       the fast pass of debias.knn: the k smallest scores
//                        ||q||^2 + ||y||^2 - 2 q.y per query, sorted by (score, row) (csrc/knn.cpp)
//   knn_quantize         two levels of int8 codes of centred rows, and their statistics
//   knn_candidates_int8  knn_candidates from those codes, with exact int32 products
// CUDA kernels register under the same names (csrc/cuda/*_glue.cpp); knn_quantize and
// knn_candidates_int8 are CPU only.

#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "Compiled kernels of debias. Importing this module registers the ops in "
      "torch.ops.debias_C (add_noise, noise_loss_fwd, noise_loss_bwd, philox_normal_, "
      "knn_candidates, knn_quantize, knn_candidates_int8); call them through debias.ops, "
      "which validates inputs and picks a backend.";
}
