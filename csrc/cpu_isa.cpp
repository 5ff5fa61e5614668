// Which ISA level's CPU kernels run (cpu_isa.h): the CPU's features, read once, and the
// DYCON_CPU_ISA override, read at every call. Also the ops that report it to Python.
#include <torch/library.h>

#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu_isa.h"

namespace dycon {
namespace {

const CpuKernels* table(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return isa_avx512::kTable;
    case CpuIsa::kAvx2: return isa_avx2::kTable;
    default: return isa_baseline::kTable;
  }
}

// Whether this CPU (and its OS: __builtin_cpu_supports checks the saved register state) runs `isa`.
bool cpu_runs(CpuIsa isa) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  switch (isa) {
    case CpuIsa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && cpu_runs(CpuIsa::kAvx2);
    case CpuIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    default: return true;
  }
#else
  return isa == CpuIsa::kBaseline;
#endif
}

// The levels that are compiled in and that this CPU runs, lowest first.
const std::vector<CpuIsa>& runnable() {
  static const std::vector<CpuIsa> levels = [] {
    std::vector<CpuIsa> out;
    for (int i = 0; i < kNumCpuIsa; ++i)
      if (table(CpuIsa(i)) != nullptr && cpu_runs(CpuIsa(i))) out.push_back(CpuIsa(i));
    return out;
  }();
  return levels;
}

std::string runnable_names() {
  std::string s;
  for (CpuIsa isa : runnable()) s += (s.empty() ? "" : ", ") + std::string(table(isa)->name);
  return s;
}

std::string lower(const char* s) {
  std::string out(s);
  for (char& ch : out) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return out;
}

std::string used_name() { return cpu_kernels().name; }

std::vector<std::string> runnable_list() {
  std::vector<std::string> out;
  for (CpuIsa isa : runnable()) out.emplace_back(table(isa)->name);
  return out;
}

}  // namespace

const CpuKernels& cpu_kernels() {
  const char* env = std::getenv("DYCON_CPU_ISA");
  if (env == nullptr || *env == '\0' || lower(env) == "auto") return *table(runnable().back());
  const std::string want = lower(env);
  for (CpuIsa isa : runnable())
    if (want == table(isa)->name) return *table(isa);
  TORCH_CHECK(false, "DYCON_CPU_ISA=", env, " is not a kernel variant this CPU runs; choose one of: auto, ",
              runnable_names());
}

}  // namespace dycon

// cpu_isa_used: the variant the CPU kernels run now; cpu_isa_runnable: every variant this CPU
// runs (what DYCON_CPU_ISA accepts besides "auto"), lowest first.
TORCH_LIBRARY_FRAGMENT(dycon_C, m) {
  m.def("cpu_isa_used() -> str", &dycon::used_name);
  m.def("cpu_isa_runnable() -> str[]", &dycon::runnable_list);
}
