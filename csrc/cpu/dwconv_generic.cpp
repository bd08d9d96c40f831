// The compute core compiled for one instruction set; dwconv_cpu.cpp picks one at run time.
#include <cstdint>  // (standard headers before the target pragma: see dwconv_kernel.h)
// baseline x86-64 (SSE2) or whatever the compiler targets by default
#define LKFAST_ISA generic
#include "dwconv_kernel.h"
