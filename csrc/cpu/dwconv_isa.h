// Declarations of the per-instruction-set compute cores (see dwconv_kernel.h).
#pragma once

#include <cstdint>

#define LKFAST_DECLARE_ISA(ns)                                                                  \
  namespace lkfast {                                                                            \
  namespace cpu {                                                                               \
  namespace ns {                                                                                \
  void forward_rows(const float* P, int prow0, int H, int W, int kh, int kw, const float* Wt,   \
                    const float* Bias, int h0, int h1, float* O, bool input_finite,             \
                    bool weights_finite);                                                       \
  void forward_rows(const double* P, int prow0, int H, int W, int kh, int kw, const double* Wt, \
                    const double* Bias, int h0, int h1, double* O, bool input_finite,           \
                    bool weights_finite);                                                       \
  bool forward_small_direct(const float* X, long xh, long xw, int H, int W, int kh, int kw,    \
                            const float* Wt, const float* Bias, float* Y, long yh, long yw);     \
  bool forward_small_direct(const double* X, long xh, long xw, int H, int W, int kh, int kw,   \
                            const double* Wt, const double* Bias, double* Y, long yh, long yw);  \
  void forward_direct(const float* X, long xh, long xw, int H, int W, int kh, int kw,          \
                      const float* Wt, long wt_block, const float* Bias, int ncb, int h0,       \
                      int h1, float* Y, long yh, long yw);                                      \
  void forward_direct(const double* X, long xh, long xw, int H, int W, int kh, int kw,         \
                      const double* Wt, long wt_block, const double* Bias, int ncb, int h0,     \
                      int h1, double* Y, long yh, long yw);                                     \
  void forward_direct_bf16(const uint16_t* X, long xh, long xw, int H, int W, int kh, int kw,  \
                           const float* Wt, long wt_block, const float* Bias, int ncb, int h0,  \
                           int h1, uint16_t* Y, long yh, long yw);                              \
  bool weight_grad_direct(const float* X, long xh, long xw, const float* G, long gh, long gw,  \
                          int H, int W, int kh, int kw, int i0, int i1, float* GW);             \
  bool weight_grad_direct(const double* X, long xh, long xw, const double* G, long gh,          \
                          long gw, int H, int W, int kh, int kw, int i0, int i1, double* GW);   \
  bool weight_grad_direct_bf16(const uint16_t* X, long xh, long xw, const uint16_t* G, long gh, \
                               long gw, int H, int W, int kh, int kw, int i0, int i1, float* GW);  \
  void weight_grad(const float* P, const float* G, int H, int W, int kh, int kw, int i0,        \
                   int i1, float* GW, bool input_finite, bool grad_finite);                     \
  void weight_grad(const double* P, const double* G, int H, int W, int kh, int kw, int i0,      \
                   int i1, double* GW, bool input_finite, bool grad_finite);                    \
  bool planes_direct_applies(int W, int kh, int kw);                                            \
  bool forward_planes(const float* X_next, float* Pd_next, const float* Pd, int H, int W, int kh, \
                      int kw, const float* wt, const float* bias, int Wp, float* Y);          \
  bool forward_planes(const double* X_next, double* Pd_next, const double* Pd, int H, int W,    \
                      int kh, int kw, const double* wt, const double* bias, int Wp, double* Y); \
  bool all_finite(const float* p, long n);                                                      \
  bool all_finite(const double* p, long n);                                                     \
  bool small_direct_applies(int W, int kw);                                                     \
  }                                                                                             \
  }                                                                                             \
  }

LKFAST_DECLARE_ISA(avx512)
LKFAST_DECLARE_ISA(avx2)
LKFAST_DECLARE_ISA(generic)

// The transposing copies (weights, the weight-gradient sum, NCHW planes), where the instruction set
// has two-vector shuffles (LKFAST_SHUFFLES): the generic path's 64-byte vectors are split into SSE2
// registers, where the same code ran about 5x slower than dwconv_cpu.cpp's scalar loop.
#define LKFAST_DECLARE_PACK(ns)                                                          \
  namespace lkfast {                                                                     \
  namespace cpu {                                                                        \
  namespace ns {                                                                         \
  bool pack_weight_block(const float* src, int kh, int kw, bool flip, float* block);     \
  bool pack_weight_block(const double* src, int kh, int kw, bool flip, double* block);   \
  bool sum_weight_grad_block(const float* partial, long group_stride, int ngroups,       \
                             int taps, float* dst);                                      \
  bool sum_weight_grad_block(const double* partial, long group_stride, int ngroups,      \
                             int taps, double* dst);                                     \
  bool pack_planes(const float* src, long cs, int r0, int r1, int W, int pad, float* dst); \
  bool pack_planes(const double* src, long cs, int r0, int r1, int W, int pad, double* dst); \
  bool unpack_planes(const float* src, int h0, int h1, int W, float* dst, long cs);      \
  bool unpack_planes(const double* src, int h0, int h1, int W, double* dst, long cs);    \
  }                                                                                      \
  }                                                                                      \
  }

LKFAST_DECLARE_PACK(avx512)
LKFAST_DECLARE_PACK(avx2)

// The bf16 forward in pairs of tap rows and weight gradient in pairs of image rows (vdpbf16ps), compiled with the AVX-512 core and run only
// where the CPU has AVX512-BF16 (see dwconv_kernel.h, forward_rows_bf16_pairs).
namespace lkfast {
namespace cpu {
namespace avx512 {
void forward_rows_bf16_pairs(const uint32_t* P2, int prow0, int H, int W, int kh, int kw,
                             const uint32_t* Wt2, const float* Bias, int h0, int h1, float* O);
void weight_grad_bf16_pairs(const uint32_t* X2, const uint32_t* G2, int H, int W, int kh, int kw, int i0,
                            int i1, float* GW);
void pair_rows(const float* lo, const float* hi, long n, uint32_t* dst);
}  // namespace avx512
}  // namespace cpu
}  // namespace lkfast
