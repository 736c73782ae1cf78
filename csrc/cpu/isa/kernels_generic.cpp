// The CPU inner loops built for the baseline instruction set of the target (see kernels.h, kernels_impl.inc).
#include <cstdint>
#include <type_traits>
#include <utility>

#include "kernels.h"

namespace ftcore::cpu {
namespace generic {
#define FTCORE_ISA_NAME "generic"
#include "kernels_impl.inc"
#undef FTCORE_ISA_NAME
}  // namespace generic

const Kernels& kernels_generic() { return generic::table(); }
}  // namespace ftcore::cpu
