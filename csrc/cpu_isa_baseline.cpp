// The CPU hot loops for every x86-64 (or other) CPU: the compiler's default target (SSE2 on
// x86-64). See cpu_isa.h.
#include <cmath>
#include <cstdint>

#include "cpu_isa.h"

#define DYCON_ISA_NS isa_baseline
#define DYCON_ISA_ENUM kBaseline
#define DYCON_ISA_NAME "baseline"
#include "cpu_isa_impl.h"
