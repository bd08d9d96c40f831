// The compute core compiled for one instruction set; dwconv_cpu.cpp picks one at run time.
#include <cstdint>  // (standard headers before the target pragma: see dwconv_kernel.h)
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LKFAST_X86_AVX512  // the bf16 widening loads and narrowing stores in intrinsics (dwconv_kernel.h, Storage)
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#endif
#define LKFAST_ISA avx512
#define LKFAST_SHUFFLES  // two-vector shuffles in one or a few instructions: the transposing copies
#include "dwconv_kernel.h"
