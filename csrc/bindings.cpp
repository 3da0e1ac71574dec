// The Python module debias._C. Importing it loads this library, which runs the static
// TORCH_LIBRARY registrations of csrc/*.cpp: the ops themselves are reached through
// torch.ops.debias_C, not through attributes of this module.

#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "Compiled kernels of debias. Importing this module registers the ops in "
      "torch.ops.debias_C (add_noise, noise_loss_fwd, philox_normal); call them through "
      "debias.ops, which validates inputs and picks a backend.";
}
