// Compute core of the CPU depthwise convolution, written once and compiled once per
// instruction set (see dwconv_avx512.cpp, dwconv_avx2.cpp, dwconv_generic.cpp).
//
// Everything here works on *packed* tiles prepared by dwconv_cpu.cpp:
//   - a channel block of LANES channels is the innermost dimension (one 64-byte vector),
//   - input rows are stored with `pw` zero columns on each side, so horizontal taps never
//     need a bounds check, while vertical taps that fall into the padding are skipped exactly,
//   - horizontal taps that fall into the padding for *every* output of a register block are
//     skipped too; only the ragged edge of a block multiplies a few zeros.
// The translation unit that includes this file defines LKFAST_ISA (the namespace) and, via
// `#pragma GCC target`, the instruction set the GCC vector extensions below compile to.
// Standard headers must be included before that pragma: this file includes none.

#ifndef LKFAST_ISA
#error "define LKFAST_ISA before including dwconv_kernel.h"
#endif

namespace lkfast {
namespace cpu {
namespace LKFAST_ISA {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  static constexpr int lanes = 16;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int lanes = 8;
};

static inline int imax(int a, int b) { return a > b ? a : b; }
static inline int imin(int a, int b) { return a < b ? a : b; }

// Output register block along W. 8 accumulators keep 1 weight load per 8 FMAs and leave
// registers for the input loads; measured against 4/12/14 in benchmarks/.
constexpr int kOutBlock = 8;
// Tap register block along the kernel width for the weight gradient.
constexpr int kTapBlock = 8;

// acc[b] += sum_j prow[w0 + b + j] * wrow[j] for j in [j_lo, j_hi)
template <typename V, int B>
static inline __attribute__((always_inline)) void fwd_block(const V* __restrict prow,
                                                             const V* __restrict wrow,
                                                             int j_lo, int j_hi, int w0,
                                                             V* __restrict acc) {
  V a[B];
#pragma GCC unroll 16
  for (int b = 0; b < B; ++b) a[b] = acc[b];
  for (int j = j_lo; j < j_hi; ++j) {
    const V wv = wrow[j];
    const V* p = prow + w0 + j;
#pragma GCC unroll 16
    for (int b = 0; b < B; ++b) a[b] += p[b] * wv;
  }
#pragma GCC unroll 16
  for (int b = 0; b < B; ++b) acc[b] = a[b];
}

template <typename V, int B>
static inline __attribute__((always_inline)) void fwd_row_block(
    const V* __restrict P, int prow0, int row_stride, int H, int W, int kh, int kw,
    const V* __restrict Wt, const V& bias, int h, int w0, V* __restrict out) {
  const int ph = kh / 2, pw = kw / 2;
  V acc[B];
#pragma GCC unroll 16
  for (int b = 0; b < B; ++b) acc[b] = bias;
  const int i_lo = imax(0, ph - h), i_hi = imin(kh, H + ph - h);
  const int j_lo = imax(0, pw - w0 - B + 1), j_hi = imin(kw, pw + W - w0);
  for (int i = i_lo; i < i_hi; ++i) {
    const V* prow = P + (long)(h + i - ph - prow0) * row_stride;
    fwd_block<V, B>(prow, Wt + (long)i * kw, j_lo, j_hi, w0, acc);
  }
#pragma GCC unroll 16
  for (int b = 0; b < B; ++b) out[w0 + b] = acc[b];
}

// Output rows [h0, h1) of one (image, channel block).
//   P:   packed input rows [prow0, prow0 + nrows), each (W + 2*pw) vectors
//   Wt:  kh*kw weight vectors, Bias: one vector
//   O:   (h1 - h0) * W output vectors
template <typename T>
void forward_rows_impl(const T* P_, int prow0, int H, int W, int kh, int kw, const T* Wt_,
                       const T* Bias_, int h0, int h1, T* O_) {
  typedef typename Vec<T>::type V;
  const V* P = reinterpret_cast<const V*>(P_);
  const V* Wt = reinterpret_cast<const V*>(Wt_);
  const V bias = *reinterpret_cast<const V*>(Bias_);
  V* O = reinterpret_cast<V*>(O_);
  const int row_stride = W + 2 * (kw / 2);
  for (int h = h0; h < h1; ++h) {
    V* out = O + (long)(h - h0) * W;
    int w0 = 0;
    for (; w0 + kOutBlock <= W; w0 += kOutBlock)
      fwd_row_block<V, kOutBlock>(P, prow0, row_stride, H, W, kh, kw, Wt, bias, h, w0, out);
    for (; w0 + 4 <= W; w0 += 4)
      fwd_row_block<V, 4>(P, prow0, row_stride, H, W, kh, kw, Wt, bias, h, w0, out);
    for (; w0 + 2 <= W; w0 += 2)
      fwd_row_block<V, 2>(P, prow0, row_stride, H, W, kh, kw, Wt, bias, h, w0, out);
    for (; w0 < W; ++w0)
      fwd_row_block<V, 1>(P, prow0, row_stride, H, W, kh, kw, Wt, bias, h, w0, out);
  }
}

// GW[i][j0 + b] += sum_{h, w} G[h][w] * P[h + i - ph][w + j0 + b], b < B
template <typename V, int B>
static inline __attribute__((always_inline)) void wgrad_tap_block(
    const V* __restrict P, const V* __restrict G, int H, int W, int kh, int kw, int i, int j0,
    V* __restrict GW) {
  const int ph = kh / 2, pw = kw / 2;
  const int row_stride = W + 2 * pw;
  const int h_lo = imax(0, ph - i), h_hi = imin(H, H + ph - i);
  const int w_lo = imax(0, pw - j0 - B + 1), w_hi = imin(W, pw + W - j0);
  V acc[B];
#pragma GCC unroll 16
  for (int b = 0; b < B; ++b) acc[b] = V{} ;
  for (int h = h_lo; h < h_hi; ++h) {
    const V* prow = P + (long)(h + i - ph) * row_stride + j0;
    const V* grow = G + (long)h * W;
    for (int w = w_lo; w < w_hi; ++w) {
      const V g = grow[w];
#pragma GCC unroll 16
      for (int b = 0; b < B; ++b) acc[b] += g * prow[w + b];
    }
  }
  V* dst = GW + (long)i * kw + j0;
#pragma GCC unroll 16
  for (int b = 0; b < B; ++b) dst[b] += acc[b];
}

// Accumulates one (image, channel block) into the weight gradient.
//   P: all H input rows, packed with pw zero columns; G: H*W output-gradient vectors;
//   GW: kh*kw vectors, accumulated into. Tap rows [i0, i1) only.
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
      wgrad_tap_block<V, kTapBlock>(P, G, H, W, kh, kw, i, j0, GW);
    for (; j0 + 4 <= kw; j0 += 4) wgrad_tap_block<V, 4>(P, G, H, W, kh, kw, i, j0, GW);
    for (; j0 + 2 <= kw; j0 += 2) wgrad_tap_block<V, 2>(P, G, H, W, kh, kw, i, j0, GW);
    for (; j0 < kw; ++j0) wgrad_tap_block<V, 1>(P, G, H, W, kh, kw, i, j0, GW);
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
