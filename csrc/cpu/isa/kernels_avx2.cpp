// The CPU inner loops built for avx2 (see kernels.h, kernels_impl.inc). Standard headers come before the
// target pragma so that only this file's own functions carry the target. kernels_avx2() may only be called
// once the CPU is known to support avx2 (cpu/sparse_delta.cpp checks).
#include <cstdint>
#include <type_traits>
#include <utility>

#include "kernels.h"

#if FTCORE_CPU_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace ftcore::cpu {
namespace avx2 {
#define FTCORE_ISA_NAME "avx2"
#include "kernels_impl.inc"
#undef FTCORE_ISA_NAME
}  // namespace avx2

const Kernels& kernels_avx2() { return avx2::table(); }
}  // namespace ftcore::cpu

#pragma GCC pop_options
#endif
