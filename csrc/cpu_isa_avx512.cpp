// The CPU hot loops compiled for avx512 (cpu_isa.h); run only where the CPU reports the features
// below. Standard and project headers without kernels come first, so that their inline functions
// keep the default target.
#include <cmath>
#include <cstdint>

#include "cpu_isa.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)  // GCC: #pragma GCC target
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c,prefer-vector-width=512")
#define DYCON_ISA_NS isa_avx512
#define DYCON_ISA_ENUM kAvx512
#define DYCON_ISA_NAME "avx512"
#include "cpu_isa_impl.h"
#pragma GCC pop_options
#else
namespace dycon::isa_avx512 { const CpuKernels* const kTable = nullptr; }
#endif
