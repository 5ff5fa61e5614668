// The CPU hot loops compiled for avx2 (cpu_isa.h); run only where the CPU reports the features
// below. Standard and project headers without kernels come first, so that their inline functions
// keep the default target.
#include <cmath>
#include <cstdint>

#include "cpu_isa.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)  // GCC: #pragma GCC target
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define DYCON_ISA_NS isa_avx2
#define DYCON_ISA_ENUM kAvx2
#define DYCON_ISA_NAME "avx2"
#include "cpu_isa_impl.h"
#pragma GCC pop_options
#else
namespace dycon::isa_avx2 { const CpuKernels* const kTable = nullptr; }
#endif
