// Which build of the CPU inner loops runs (generic / avx2 / avx512). Chosen once at load: the best the CPU
// supports, or FTCORE_CPU_ISA from the environment. Tests switch it to run every build against the reference.
#pragma once

#include <string>
#include <vector>

namespace ftcore {

std::string cpu_isa();
// Every build this CPU can run, best last.
std::vector<std::string> available_cpu_isas();
// Returns false (and changes nothing) when `name` is unknown or this CPU cannot run it.
bool set_cpu_isa(const std::string& name);

}  // namespace ftcore
