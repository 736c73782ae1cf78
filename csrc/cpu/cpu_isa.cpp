// Which build of the CPU inner loops runs (include/ftcore/cpu_isa.h): every op family's CPU kernels call
// cpu::active_kernels(). Chosen once at load: the best this CPU supports, or FTCORE_CPU_ISA.
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/isa/kernels.h"
#include "ftcore/cpu_isa.h"

namespace ftcore {

namespace {

using cpu::Kernels;

bool cpu_runs(const std::string& name) {
  if (name == "generic") return true;
#if FTCORE_CPU_MULTI_ISA
  __builtin_cpu_init();
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
#endif
  return false;
}

const Kernels* kernels_named(const std::string& name) {
  if (!cpu_runs(name)) return nullptr;
  if (name == "generic") return &cpu::kernels_generic();
#if FTCORE_CPU_MULTI_ISA
  if (name == "avx2") return &cpu::kernels_avx2();
  if (name == "avx512") return &cpu::kernels_avx512();
#endif
  return nullptr;
}

const Kernels* initial_kernels() {
  if (const char* forced = std::getenv("FTCORE_CPU_ISA")) {
    if (const Kernels* k = kernels_named(forced)) return k;
    TORCH_WARN("FTCORE_CPU_ISA=", forced, " is unknown or not supported by this CPU; picking the best supported");
  }
  const auto all = available_cpu_isas();
  return kernels_named(all.back());
}

std::atomic<const Kernels*>& active() {
  static std::atomic<const Kernels*> k{initial_kernels()};
  return k;
}

const Kernels& kernels() { return *active().load(std::memory_order_relaxed); }

}  // namespace

const Kernels& cpu::active_kernels() { return kernels(); }

std::string cpu_isa() { return kernels().name; }

std::vector<std::string> available_cpu_isas() {
  std::vector<std::string> out;
  for (const char* name : {"generic", "avx2", "avx512"})
    if (kernels_named(name)) out.emplace_back(name);
  return out;
}

bool set_cpu_isa(const std::string& name) {
  const Kernels* k = kernels_named(name);
  if (k) active().store(k);
  return k != nullptr;
}

}  // namespace ftcore
