// The compute core compiled for one instruction set; dwconv_cpu.cpp picks one at run time.
#include <cstdint>  // (standard headers before the target pragma: see dwconv_kernel.h)
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LKFAST_X86_AVX2  // the bf16 widening loads and narrowing stores in intrinsics (dwconv_kernel.h, Storage)
#pragma GCC target("avx2,fma")
#endif
#define LKFAST_ISA avx2
#define LKFAST_VEC_BYTES 32  // ymm: 16 registers of 8 fp32
// GCC would otherwise carry the input vectors of one tap step to the next in registers, which
// the 16 ymm registers cannot hold next to the 14 accumulators (it spills inside the loop).
#pragma GCC optimize("no-predictive-commoning")
#define LKFAST_SHUFFLES  // two-vector shuffles in one or a few instructions: the transposing copies
#include "dwconv_kernel.h"
