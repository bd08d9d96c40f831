// Declarations of the per-instruction-set compute cores (see dwconv_kernel.h).
#pragma once

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
  void weight_grad(const float* P, const float* G, int H, int W, int kh, int kw, int i0,        \
                   int i1, float* GW, bool input_finite, bool grad_finite);                     \
  void weight_grad(const double* P, const double* G, int H, int W, int kh, int kw, int i0,      \
                   int i1, double* GW, bool input_finite, bool grad_finite);                    \
  bool all_finite(const float* p, long n);                                                      \
  bool all_finite(const double* p, long n);                                                     \
  }                                                                                             \
  }                                                                                             \
  }

LKFAST_DECLARE_ISA(avx512)
LKFAST_DECLARE_ISA(avx2)
LKFAST_DECLARE_ISA(generic)
