// The compute core compiled for one instruction set; dwconv_cpu.cpp picks one at run time.
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#endif
#define LKFAST_ISA avx512
#define LKFAST_SHUFFLES  // two-vector shuffles in one or a few instructions: the transposing copies
#include "dwconv_kernel.h"
