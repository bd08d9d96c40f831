// Compute core of the CPU depthwise convolution, written once and compiled once per
// instruction set (dwconv_avx512.cpp, dwconv_avx2.cpp, dwconv_generic.cpp).
//
// It works on tiles packed by dwconv_cpu.cpp, channels innermost: one 64-byte vector holds the
// same pixel of LANES channels, so every multiply-add is a full-width vector FMA whatever the
// image size. Input rows carry pw zero columns on each side; weight rows (forward) and
// output-gradient rows (weight gradient) carry kWeightPad / kGradPad zero columns.
//
// Padding is skipped, not multiplied: tap rows that fall outside the image are never visited,
// and along W every register block runs whichever of two equivalent loops touches fewer zeros:
//   "tap" loop:   acc[b] += sum_t A[t + b] * Bv[t]   over the taps (or pixels) of the block,
//   "band" loop:  acc[b] += sum_t A[t] * Bv[t - b]   over the valid input columns only.
// The tap loop wastes work where the kernel hangs over the image edge; the band loop wastes
// work where the image is wider than the kernel. Maps smaller than the kernel (RepLKNet's
// 14x14 maps with 27x27 kernels) take the band loop and do no wasted work at all.
//
// Standard headers must be included before the `#pragma GCC target` of the including file.

#ifndef LKFAST_ISA
#error "define LKFAST_ISA before including dwconv_kernel.h"
#endif

#include "dwconv_layout.h"

namespace lkfast {
namespace cpu {
namespace LKFAST_ISA {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
};

static inline int imax(int a, int b) { return a > b ? a : b; }
static inline int imin(int a, int b) { return a < b ? a : b; }

// Unroll of the t loops. U consecutive t share B + U - 1 vectors of the shifted operand, held
// in registers, so one step issues B*U FMAs for B + 2U - 1 loads. U = 2 measured best here
// (U = 4 and 8 spill with B = 8).
constexpr int kUnroll = 2;

// acc[b] += sum_{t in [lo, hi)} A[t + b] * Bv[t]
template <typename V, int B>
static inline __attribute__((always_inline)) void dot_shift_a(const V* __restrict A,
                                                              const V* __restrict Bv, int lo,
                                                              int hi, V* __restrict acc) {
  constexpr int U = kUnroll;
  int t = lo;
  for (; t + U <= hi; t += U) {
    V a[B + U - 1];
#pragma GCC unroll 32
    for (int s = 0; s < B + U - 1; ++s) a[s] = A[t + s];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const V bv = Bv[t + u];
#pragma GCC unroll 16
      for (int b = 0; b < B; ++b) acc[b] += a[u + b] * bv;
    }
  }
  for (; t < hi; ++t) {
    const V bv = Bv[t];
#pragma GCC unroll 16
    for (int b = 0; b < B; ++b) acc[b] += A[t + b] * bv;
  }
}

// acc[b] += sum_{t in [lo, hi)} A[t] * Bv[t - b]
template <typename V, int B>
static inline __attribute__((always_inline)) void dot_shift_b(const V* __restrict A,
                                                              const V* __restrict Bv, int lo,
                                                              int hi, V* __restrict acc) {
  constexpr int U = kUnroll;
  int t = lo;
  for (; t + U <= hi; t += U) {
    V bv[B + U - 1];  // bv[s] = Bv[t - (B - 1) + s]
#pragma GCC unroll 32
    for (int s = 0; s < B + U - 1; ++s) bv[s] = Bv[t - (B - 1) + s];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const V a = A[t + u];
#pragma GCC unroll 16
      for (int b = 0; b < B; ++b) acc[b] += a * bv[u - b + B - 1];
    }
  }
  for (; t < hi; ++t) {
    const V a = A[t];
#pragma GCC unroll 16
    for (int b = 0; b < B; ++b) acc[b] += a * Bv[t - b];
  }
}

// Forward: outputs [w0, w0 + B) of output row h.
template <typename V, int B>
static inline __attribute__((always_inline)) void fwd_block(const V* __restrict P, int prow0,
                                                            int row_stride, int H, int W, int kh,
                                                            int kw, const V* __restrict Wt,
                                                            const V& bias, int h, int w0,
                                                            V* __restrict out) {
  const int ph = kh / 2, pw = kw / 2;
  const int wt_stride = kw + 2 * kWeightPad;
  V acc[B];
#pragma GCC unroll 16
  for (int b = 0; b < B; ++b) acc[b] = bias;
  const int i_lo = imax(0, ph - h), i_hi = imin(kh, H + ph - h);
  // Tap loop over j: input column (padded coordinates) w0 + b + j.
  const int j_lo = imax(0, pw - w0 - B + 1), j_hi = imin(kw, pw + W - w0);
  // Band loop over valid input columns u (padded coordinates), tap u - w0 - b.
  const int u_lo = imax(pw, w0), u_hi = imin(pw + W, w0 + B - 1 + kw);
  const bool band = (u_hi - u_lo) < (j_hi - j_lo);
  for (int i = i_lo; i < i_hi; ++i) {
    const V* prow = P + (long)(h + i - ph - prow0) * row_stride;
    const V* wrow = Wt + (long)i * wt_stride + kWeightPad;
    if (band)
      dot_shift_b<V, B>(prow, wrow - w0, u_lo, u_hi, acc);
    else
      dot_shift_a<V, B>(prow + w0, wrow, j_lo, j_hi, acc);
  }
#pragma GCC unroll 16
  for (int b = 0; b < B; ++b) out[w0 + b] = acc[b];
}

// Output rows [h0, h1) of one (image, channel block).
//   P:    packed input rows [prow0, ...), each W + 2*pw vectors
//   Wt:   kh rows of kw + 2*kWeightPad weight vectors; Bias: one vector
//   O:    (h1 - h0) * W output vectors
template <typename T>
void forward_rows_impl(const T* P_, int prow0, int H, int W, int kh, int kw, const T* Wt_,
                       const T* Bias_, int h0, int h1, T* O_) {
  typedef typename Vec<T>::type V;
  const V* P = reinterpret_cast<const V*>(P_);
  const V* Wt = reinterpret_cast<const V*>(Wt_);
  const V bias = *reinterpret_cast<const V*>(Bias_);
  V* O = reinterpret_cast<V*>(O_);
  const int rs = W + 2 * (kw / 2);
  for (int h = h0; h < h1; ++h) {
    V* out = O + (long)(h - h0) * W;
    int w0 = 0;
    for (; w0 + kOutBlock <= W; w0 += kOutBlock)
      fwd_block<V, kOutBlock>(P, prow0, rs, H, W, kh, kw, Wt, bias, h, w0, out);
    // One block for the remainder, so a 7-wide map is one 7-wide block, not 4 + 2 + 1.
    switch (W - w0) {
#define LKFAST_FWD_TAIL(n) \
  case n:                  \
    fwd_block<V, n>(P, prow0, rs, H, W, kh, kw, Wt, bias, h, w0, out); \
    break;
      LKFAST_FWD_TAIL(1) LKFAST_FWD_TAIL(2) LKFAST_FWD_TAIL(3) LKFAST_FWD_TAIL(4)
      LKFAST_FWD_TAIL(5) LKFAST_FWD_TAIL(6) LKFAST_FWD_TAIL(7)
#undef LKFAST_FWD_TAIL
      default:
        break;
    }
  }
}

// Weight gradient: GW[i][j0 + b] += sum_{h, w} G[h][w] * P[h + i - ph][w + j0 + b], b < B.
template <typename V, int B>
static inline __attribute__((always_inline)) void wgrad_block(const V* __restrict P,
                                                              const V* __restrict G, int H, int W,
                                                              int kh, int kw, int i, int j0,
                                                              V* __restrict GW) {
  const int ph = kh / 2, pw = kw / 2;
  const int prs = W + 2 * pw, grs = W + 2 * kGradPad;
  const int h_lo = imax(0, ph - i), h_hi = imin(H, H + ph - i);
  // Tap form: pixels w whose input column w + j0 + b is valid for some b.
  const int w_lo = imax(0, pw - j0 - B + 1), w_hi = imin(W, pw + W - j0);
  // Band form: valid input columns u (padded), pixel u - j0 - b.
  const int u_lo = imax(pw, j0), u_hi = imin(pw + W, j0 + B - 1 + W);
  const bool band = (u_hi - u_lo) < (w_hi - w_lo);
  V acc[B];
#pragma GCC unroll 16
  for (int b = 0; b < B; ++b) acc[b] = V{};
  for (int h = h_lo; h < h_hi; ++h) {
    const V* prow = P + (long)(h + i - ph) * prs;
    const V* grow = G + (long)h * grs + kGradPad;
    if (band)
      dot_shift_b<V, B>(prow, grow - j0, u_lo, u_hi, acc);
    else
      dot_shift_a<V, B>(prow + j0, grow, w_lo, w_hi, acc);
  }
  V* dst = GW + (long)i * kw + j0;
#pragma GCC unroll 16
  for (int b = 0; b < B; ++b) dst[b] += acc[b];
}

// Accumulates one (image, channel block) into the weight gradient, tap rows [i0, i1).
//   P:  all H input rows, W + 2*pw vectors each; G: H rows of W + 2*kGradPad vectors;
//   GW: kh*kw vectors, accumulated into.
template <typename T>
void weight_grad_impl(const T* P_, const T* G_, int H, int W, int kh, int kw, int i0, int i1,
                      T* GW_) {
  typedef typename Vec<T>::type V;
  const V* P = reinterpret_cast<const V*>(P_);
  const V* G = reinterpret_cast<const V*>(G_);
  V* GW = reinterpret_cast<V*>(GW_);
  for (int i = i0; i < i1; ++i) {
    int j0 = 0;
    for (; j0 + kTapBlock <= kw; j0 += kTapBlock)
      wgrad_block<V, kTapBlock>(P, G, H, W, kh, kw, i, j0, GW);
    switch (kw - j0) {
#define LKFAST_WGRAD_TAIL(n) \
  case n:                    \
    wgrad_block<V, n>(P, G, H, W, kh, kw, i, j0, GW); \
    break;
      LKFAST_WGRAD_TAIL(1) LKFAST_WGRAD_TAIL(2) LKFAST_WGRAD_TAIL(3) LKFAST_WGRAD_TAIL(4)
      LKFAST_WGRAD_TAIL(5) LKFAST_WGRAD_TAIL(6) LKFAST_WGRAD_TAIL(7)
#undef LKFAST_WGRAD_TAIL
      default:
        break;
    }
  }
}

void forward_rows(const float* P, int prow0, int H, int W, int kh, int kw, const float* Wt,
                  const float* Bias, int h0, int h1, float* O) {
  forward_rows_impl<float>(P, prow0, H, W, kh, kw, Wt, Bias, h0, h1, O);
}
void forward_rows(const double* P, int prow0, int H, int W, int kh, int kw, const double* Wt,
                  const double* Bias, int h0, int h1, double* O) {
  forward_rows_impl<double>(P, prow0, H, W, kh, kw, Wt, Bias, h0, h1, O);
}
void weight_grad(const float* P, const float* G, int H, int W, int kh, int kw, int i0, int i1,
                 float* GW) {
  weight_grad_impl<float>(P, G, H, W, kh, kw, i0, i1, GW);
}
void weight_grad(const double* P, const double* G, int H, int W, int kh, int kw, int i0, int i1,
                 double* GW) {
  weight_grad_impl<double>(P, G, H, W, kh, kw, i0, i1, GW);
}

}  // namespace LKFAST_ISA
}  // namespace cpu
}  // namespace lkfast
