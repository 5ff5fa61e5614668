// The body of every cpu_isa_*.cpp: the hot loops of all CPU kernels compiled for one ISA level
// (cpu_isa.h) and that level's table. The including file defines DYCON_ISA_NS, DYCON_ISA_ENUM and
// DYCON_ISA_NAME and has set the target options; the headers before them (std, cpu_isa.h) were
// included first, so their inline functions keep the baseline instructions.
#include "fecl_math.h"
#include "uncl_math.h"

#include "fecl_cpu_kernels.h"
#include "uncl_cpu_kernels.h"

namespace dycon {
namespace DYCON_ISA_NS {

namespace {
const CpuKernels kKernels{CpuIsa::DYCON_ISA_ENUM, DYCON_ISA_NAME, uncl_cpu_kernels<float>(),
                          uncl_cpu_kernels<double>(), fecl_cpu_kernels<float>(),
                          fecl_cpu_kernels<double>()};
}  // namespace
const CpuKernels* const kTable = &kKernels;

}  // namespace DYCON_ISA_NS
}  // namespace dycon
