// The CPU kernels' choice of instruction set, made once per process (csrc/README.md): their
// hot loops are compiled for the baseline ISA and again for AVX2, and the AVX2 ones run where
// the processor has it. DEBIAS_NO_AVX2=1 forces the baseline code (to test it).

#pragma once

#include <cstdlib>

namespace debias {

// The processor runs AVX2 code (and FMA code, with fma) and DEBIAS_NO_AVX2 does not forbid
// it. Read once; later calls return the same answer.
inline bool cpu_has_avx2(bool fma = false) {
#if defined(__x86_64__)
  static const bool avx2 = [] {
    const char* env = std::getenv("DEBIAS_NO_AVX2");
    const bool forced_off = env != nullptr && env[0] != '\0' && env[0] != '0';
    __builtin_cpu_init();
    return !forced_off && __builtin_cpu_supports("avx2");
  }();
  static const bool with_fma = avx2 && __builtin_cpu_supports("fma");
  return fma ? with_fma : avx2;
#else
  (void)fma;
  return false;
#endif
}

}  // namespace debias
