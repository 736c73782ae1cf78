// The CPU inner loops built for avx512 (see kernels.h, kernels_impl.inc). Standard headers come before the
// target pragma so that only this file's own functions carry the target. kernels_avx512() may only be called
// once the CPU is known to support avx512 (cpu/sparse_delta.cpp checks).
#include <cstdint>
#include <type_traits>
#include <utility>

#include "kernels.h"

#if FTCORE_CPU_MULTI_ISA
#include <immintrin.h>  // before the pragma, like the standard headers; used by the AVX-512-only paths
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")

namespace ftcore::cpu {
namespace avx512 {
#define FTCORE_ISA_NAME "avx512"
#define FTCORE_ISA_AVX512 1  // the target pragma does not define __AVX512F__
#include "kernels_impl.inc"
#undef FTCORE_ISA_AVX512
#undef FTCORE_ISA_NAME
}  // namespace avx512

const Kernels& kernels_avx512() { return avx512::table(); }
}  // namespace ftcore::cpu

#pragma GCC pop_options
#endif
