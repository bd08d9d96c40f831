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
// The wasted work multiplies zeros by the other operand, which adds nothing while that operand
// is finite; where it holds an Inf or NaN (0 * Inf = 0 * NaN = NaN) the block takes the loop
// whose zeros meet only finite values instead (see Loop).
//
// Standard headers must be included before the `#pragma GCC target` of the including file.

#ifndef LKFAST_ISA
#error "define LKFAST_ISA before including dwconv_kernel.h"
#endif

#include "dwconv_layout.h"

namespace lkfast {
namespace cpu {
namespace LKFAST_ISA {

// LKFAST_VEC_BYTES: the instruction set's register width (64 for AVX-512, 32 for AVX2). A
// packed pixel is 64 bytes whatever the ISA (dwconv_cpu.cpp packs one layout), so it holds
// kParts = 64 / LKFAST_VEC_BYTES registers: pixel p, part v is vector p * kParts + v.
#ifndef LKFAST_VEC_BYTES
#define LKFAST_VEC_BYTES 64
#endif
constexpr int kParts = 64 / LKFAST_VEC_BYTES;

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(LKFAST_VEC_BYTES)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(LKFAST_VEC_BYTES)));
};
template <>
struct Vec<uint32_t> {  // bf16 pairs (see PairVec)
  typedef uint32_t type __attribute__((vector_size(LKFAST_VEC_BYTES)));
};
// What a kernel reading elements of type T sums into and writes (type), and how many tap rows one
// of its weight rows holds (rows): T and 1, or for bf16 pairs (uint32_t) fp32 and 2.
template <typename T>
struct Sum {
  typedef T type;
  static constexpr int rows = 1;
};
template <>
struct Sum<uint32_t> {
  typedef float type;
  static constexpr int rows = 2;
};

static inline int imax(int a, int b) { return a > b ? a : b; }
static inline int imin(int a, int b) { return a < b ? a : b; }

// acc += a * b, one rounding (an FMA where the instruction set has one). The loops below call it
// for every product, so that the same loops run on bf16 pairs (AVX-512, see PairVec).
template <typename A>
static inline __attribute__((always_inline)) void mac(A& acc, A a, A b) {
  acc += a * b;
}

#if defined(LKFAST_X86_AVX512)
// 16 lanes of two bf16 each (the low half first). mac of two PairVecs into an fp32 vector adds
// both lanes' products (vdpbf16ps: exact products, bf16 subnormals read as zero): one instruction
// for two multiply-adds. Written in assembly, so that this file compiles with the AVX-512 target
// of CPUs without AVX512-BF16; only callers that checked the CPU (dwconv_cpu.cpp) reach it.
// An assembler older than binutils 2.32 cannot encode the instruction: setup.py then defines
// LKFAST_NO_VDPBF16PS, this mac is the same two products in two FMAs (subnormals kept), the
// pairs are never chosen (dwconv_cpu.cpp, detect_isa) and the rest of the extension still builds.
typedef Vec<uint32_t>::type PairVec;
static inline __attribute__((always_inline)) void mac(Vec<float>::type& acc, PairVec a, PairVec b) {
#if !defined(LKFAST_NO_VDPBF16PS)
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
#else
  acc += (Vec<float>::type)(a & 0xffff0000u) * (Vec<float>::type)(b & 0xffff0000u);
  acc += (Vec<float>::type)(a << 16) * (Vec<float>::type)(b << 16);
#endif
}
#endif

// The two loops below keep a window of B vectors of the shifted operand in registers and slide
// it by one vector per step: step t loads the one vector that enters the window and one of the
// other operand for B FMAs. Unrolled by B, every window slot is a fixed register (slot s of the
// window holds the vector whose index is congruent to s mod B, counted from the first), so the
// window rotates without moves: B accumulators + B window vectors + 1 = 17 zmm at B = 8. The sums
// run over t in the same order as the plain loops, so the results are the same bit for bit.
// (Reloading the whole window every 2 steps, as before, cost B + 3 loads per 2B FMAs.)
// The window never reads past what the plain loops read: A[hi + B - 2] (dot_shift_a) and
// Bv[lo - B + 1 .. hi - 1] (dot_shift_b).

// The window over operands read through functions (packed tiles here, strided tensors in place):
// acc[b] += sum_{t in [lo, hi)} a_at(t + b) * b_at(t); reads a_at(lo .. hi + B - 2), b_at(lo .. hi - 1),
// in the same order as the plain loop.
template <typename V, int B, typename FA, typename FB, typename Acc>
static inline __attribute__((always_inline)) void window_dot_a(FA&& a_at, FB&& b_at, int lo, int hi,
                                                               Acc* __restrict acc) {
  if (hi <= lo) return;
  V win[B];
#pragma GCC unroll 16
  for (int s = 0; s < B; ++s) win[s] = a_at(lo + s);
  int t = lo;
  for (; t + B < hi; t += B) {
#pragma GCC unroll 16
    for (int u = 0; u < B; ++u) {
      const V bv = b_at(t + u);
#pragma GCC unroll 16
      for (int b = 0; b < B; ++b) mac(acc[b], win[(u + b) % B], bv);
      win[u] = a_at(t + u + B);
    }
  }
  const int r = hi - t;
#pragma GCC unroll 16
  for (int u = 0; u < B; ++u) {
    if (u >= r) break;
    const V bv = b_at(t + u);
#pragma GCC unroll 16
    for (int b = 0; b < B; ++b) mac(acc[b], win[(u + b) % B], bv);
    if (u + 1 < r) win[u] = a_at(t + u + B);
  }
}

// acc[b] += sum_{t in [lo, hi)} A[t + b] * Bv[t]
template <typename V, int B, typename Acc>
static inline __attribute__((always_inline)) void dot_shift_a(const V* __restrict A,
                                                              const V* __restrict Bv, int lo,
                                                              int hi, Acc* __restrict acc) {
  window_dot_a<V, B>([A](int i) { return A[i]; }, [Bv](int i) { return Bv[i]; }, lo, hi, acc);
}

// acc[b] += sum_{t in [lo, hi)} A[t] * Bv[t - b]
template <typename V, int B, typename Acc>
static inline __attribute__((always_inline)) void dot_shift_b(const V* __restrict A,
                                                              const V* __restrict Bv, int lo,
                                                              int hi, Acc* __restrict acc) {
  if (hi <= lo) return;
  V win[B];  // Bv[t - b] in slot (t - lo - b + B - 1) mod B
#pragma GCC unroll 16
  for (int s = 0; s < B; ++s) win[s] = Bv[lo - (B - 1) + s];
  int t = lo;
  for (; t + B < hi; t += B) {
#pragma GCC unroll 16
    for (int u = 0; u < B; ++u) {
      const V a = A[t + u];
#pragma GCC unroll 16
      for (int b = 0; b < B; ++b) mac(acc[b], a, win[(u - b + B - 1) % B]);
      win[u] = Bv[t + u + 1];
    }
  }
  const int r = hi - t;
#pragma GCC unroll 16
  for (int u = 0; u < B; ++u) {
    if (u >= r) break;
    const V a = A[t + u];
#pragma GCC unroll 16
    for (int b = 0; b < B; ++b) mac(acc[b], a, win[(u - b + B - 1) % B]);
    if (u + 1 < r) win[u] = Bv[t + u + 1];
  }
}

// With 16 registers (AVX2) the rotation above does not fit: B = 8 outputs of 2 ymm each are
// already 16 accumulators, and everything spills. The "parts" loops below keep B * NV
// accumulators (NV = kParts vectors per pixel) and the NV vectors of the operand that stays
// fixed for a step in registers, and take the other operand straight from memory as the FMA's
// memory operand: one load per FMA, which two load ports sustain at two FMAs a cycle.
// B = 7, NV = 2: 14 accumulators + 2 fixed vectors = 16 ymm, no spill.

// acc[b][v] += sum_{t in [lo, hi)} A[t + b][v] * Bv[t][v]
template <typename V, int B, int NV, typename Acc>
static inline __attribute__((always_inline)) void dot_parts_a(const V* __restrict A,
                                                              const V* __restrict Bv, int lo,
                                                              int hi, Acc* __restrict acc) {
  for (int t = lo; t < hi; ++t) {
    V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = Bv[t * NV + v];
#pragma GCC unroll 16
    for (int b = 0; b < B; ++b)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) mac(acc[b * NV + v], A[(t + b) * NV + v], bv[v]);
  }
}

// acc[b][v] += sum_{t in [lo, hi)} A[t][v] * Bv[t - b][v]
template <typename V, int B, int NV, typename Acc>
static inline __attribute__((always_inline)) void dot_parts_b(const V* __restrict A,
                                                              const V* __restrict Bv, int lo,
                                                              int hi, Acc* __restrict acc) {
  for (int t = lo; t < hi; ++t) {
    V a[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) a[v] = A[t * NV + v];
#pragma GCC unroll 16
    for (int b = 0; b < B; ++b)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) mac(acc[b * NV + v], a[v], Bv[(t - b) * NV + v]);
  }
}

// The two loops in the instruction set's form. Pointers and indices count pixels of NV vectors.
template <typename V, int B, typename Acc>
static inline __attribute__((always_inline)) void dot_a(const V* __restrict A,
                                                        const V* __restrict Bv, int lo, int hi,
                                                        Acc* __restrict acc) {
  if constexpr (kParts == 1)
    dot_shift_a<V, B>(A, Bv, lo, hi, acc);
  else
    dot_parts_a<V, B, kParts>(A, Bv, lo, hi, acc);
}
template <typename V, int B, typename Acc>
static inline __attribute__((always_inline)) void dot_b(const V* __restrict A,
                                                        const V* __restrict Bv, int lo, int hi,
                                                        Acc* __restrict acc) {
  if constexpr (kParts == 1)
    dot_shift_b<V, B>(A, Bv, lo, hi, acc);
  else
    dot_parts_b<V, B, kParts>(A, Bv, lo, hi, acc);
}

// Register blocks per ISA: outputs along W (forward) and taps along kw (weight gradient).
// AVX-512 runs kOutBlock / kTapBlock (8) and one block for the remainder (a 7-wide map is one
// 7-wide block, not 4 + 2 + 1); the parts loops split a row into near-equal blocks of at most
// kPartsBlock, so a 56-wide row is 8 x 7 and a 31-tap row 7 + 6 + 6 + 6 + 6, never a 1-wide
// block starved of independent FMAs.
constexpr int kPartsBlock = 7;
// The parts loops also go through the rows in groups: every register block of a row (forward:
// output blocks along W; weight gradient: tap blocks along kw) runs over kRowGroup tap rows
// (forward) or image rows (weight gradient) before the next group, accumulating into memory
// between groups. A group's input, weight and gradient rows then stay in L1 (4 rows of a
// 56-wide map with 31 taps are ~35 KB) instead of streaming from L2 once per block; measured
// ~10% faster at 28- and 56-wide maps. Maps up to kRowGroupMinWidth wide fit in L1 whole and
// take all rows at once (groups only add calls there).
constexpr int kRowGroup = 4;
constexpr int kRowGroupMinWidth = 16;
static inline int row_group(int W, int all) {
  return kParts > 1 && W > kRowGroupMinWidth ? kRowGroup : all;
}
constexpr int kMaxBlock = kParts == 1 ? 8 : kPartsBlock;  // no code for blocks never run
static_assert(kPartsBlock - 1 <= kWeightPad && kPartsBlock - 1 <= kGradPad,
              "the band loops index a whole register block past the packed rows' edge");

// Which of the two loops a register block runs. The tap loop (dot_a) multiplies A's zero
// padding (input columns outside the image) by Bv, the band loop (dot_b) Bv's zero padding
// (weight taps beyond the kernel, gradient pixels beyond the row) by A. Those products are zero
// while the other operand is finite but NaN where it holds an Inf or NaN, and F.conv2d's sum
// has no such terms. So with both operands finite a block takes the faster loop; with one of
// them not, the loop whose padding meets only the finite one; with neither, blocks of one
// output (or tap), whose loops touch no padding. Whether an operand is finite is known per
// packed tile (dwconv_cpu.cpp checks each tile once packed), so only tiles holding Inf or NaN
// pay.
enum class Loop { kFaster, kTap, kBand, kSingle };
static inline Loop exact_loop(bool a_finite, bool b_finite) {
  if (a_finite && b_finite) return Loop::kFaster;
  if (b_finite) return Loop::kTap;
  if (a_finite) return Loop::kBand;
  return Loop::kSingle;
}
static inline bool use_band(Loop loop, int band_work, int tap_work) {
  return loop == Loop::kBand || (loop != Loop::kTap && band_work < tap_work);
}

// Calls f(start, size) over [0, n) in register blocks of the ISA's sizes, 1 <= size <= 8, or
// of size 1 with Loop::kSingle.
template <typename F>
static inline __attribute__((always_inline)) void for_blocks(int n, int full, Loop loop, F&& f) {
  if (loop == Loop::kSingle) {
    for (int s = 0; s < n; ++s) f(s, 1);
    return;
  }
  if constexpr (kParts == 1) {
    int s = 0;
    for (; s + full <= n; s += full) f(s, full);
    if (s < n) f(s, n - s);
    return;
  }
  const int nb = (n + kPartsBlock - 1) / kPartsBlock;
  if (nb == 0) return;
  const int base = n / nb, extra = n % nb;  // the first `extra` blocks are one wider
  int s = 0;
  for (int b = 0; b < nb; ++b) {
    const int size = base + (b < extra);
    f(s, size);
    s += size;
  }
}

// Forward: outputs [w0, w0 + B) of output row h. Row strides and columns count pixels of
// kParts vectors. Weight row i meets input row h + S i - ph: S = 1, one tap row a weight row;
// S = 2, bf16 pairs (forward_rows_bf16_pairs): weight row i holds tap rows 2i and 2i + 1, input
// row r of P the image rows r and r + 1.
template <typename V, int B, typename Acc = V, int S = 1>
static inline __attribute__((always_inline)) void fwd_block(const V* __restrict P, int prow0,
                                                            int row_stride, int H, int W, int kh,
                                                            int kw, const V* __restrict Wt,
                                                            const Acc* __restrict bias, int h,
                                                            int w0, int i_begin, int i_end,
                                                            Loop loop, Acc* __restrict out) {
  constexpr int NV = kParts;
  const int ph = kh / 2, pw = kw / 2;
  const int wt_stride = kw + 2 * kWeightPad;
  Acc acc[B * NV];
  // weight rows with an image row among their S: h + S i - ph + S - 1 >= 0 and h + S i - ph < H
  // ((ph - h) >> 1: the ceiling of (ph - h - 1) / 2; H - 1 + ph - h >= 0, as h < H)
  static_assert(S == 1 || S == 2, "tap rows one or two at a time");
  const int i_lo = imax(i_begin, S == 1 ? ph - h : (ph - h) >> 1), i_hi = imin(i_end, (H - 1 + ph - h) / S + 1);
  if (bias) {
#pragma GCC unroll 16
    for (int b = 0; b < B; ++b)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[b * NV + v] = bias[v];
  } else {
#pragma GCC unroll 16
    for (int b = 0; b < B * NV; ++b) acc[b] = out[w0 * NV + b];
  }
  // Tap loop over j: input column (padded coordinates) w0 + b + j.
  const int j_lo = imax(0, pw - w0 - B + 1), j_hi = imin(kw, pw + W - w0);
  // Band loop over valid input columns u (padded coordinates), tap u - w0 - b.
  const int u_lo = imax(pw, w0), u_hi = imin(pw + W, w0 + B - 1 + kw);
  const bool band = use_band(loop, u_hi - u_lo, j_hi - j_lo);
  for (int i = i_lo; i < i_hi; ++i) {
    const V* prow = P + (long)(h + S * i - ph - prow0) * row_stride * NV;
    const V* wrow = Wt + ((long)i * wt_stride + kWeightPad) * NV;
    if (band)
      dot_b<V, B>(prow, wrow - (long)w0 * NV, u_lo, u_hi, acc);
    else
      dot_a<V, B>(prow + (long)w0 * NV, wrow, j_lo, j_hi, acc);
  }
#pragma GCC unroll 16
  for (int b = 0; b < B; ++b)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) out[(w0 + b) * NV + v] = acc[b * NV + v];
}

// Maps at most kSmallMaxW wide whose kernel reaches across the whole row (kw >= 2W - 1: RepLKNet's
// 7x7 maps with 13x13 kernels and 14x14 maps with 27x27 kernels): every output of a row meets
// every input of every tap row. A row's outputs go in one register block or two; per tap row a
// block of NB outputs loads the W + NB - 1 weights it needs once into registers and the W inputs
// once each (34 loads for 98 FMAs at W = 14, where the general band loop reloads its weights for
// every pair of inputs: ~70), and with W fixed at compile time no loop is left but the rows'.
// NB accumulators + W + NB - 1 weights + 1 input must fit the registers: 32 zmm hold it up to
// W = 14 (blocks of up to 7, 28 registers). With 16 ymm (AVX2, each pixel kParts = 2 vectors) a row
// runs fwd_small_row_parts instead, up to W = kSmallMaxWParts: its W outputs of both parts held
// (14 registers at W = 7), the weights taken from memory. Inputs and
// outputs are addressed by element strides, so the same code reads a packed tile or the tensors
// themselves (channels innermost: see forward_small_direct); only input pixels inside the image
// are read, so neither needs padding.
constexpr int kSmallMaxW = 14;
constexpr int kSmallMaxWParts = 7;

template <typename T>
struct VecU {  // a vector at any element-aligned address
  typedef T type __attribute__((vector_size(LKFAST_VEC_BYTES), aligned(sizeof(T))));
};

// A small map: at most kSmallMaxW columns, every tap column that meets the image inside the kernel.
// The weight gradient's small-map kernel takes any such map; the forward's, with 16 registers, only
// maps up to kSmallMaxWParts wide.
static inline bool small_map_shape(int W, int kw) { return W <= kSmallMaxW && kw / 2 >= W - 1; }
static inline bool small_map(int W, int kw) {
  return small_map_shape(W, kw) && (kParts == 1 || W <= kSmallMaxWParts);
}

// f(Width<W>{}) for W in 1..kSmallMaxW, nothing otherwise: the small-map kernels are compiled per
// width, so that no loop is left but the rows'. (No <type_traits>: see the note on headers above.)
template <int N>
struct Width {
  static constexpr int value = N;
};
template <typename F>
static inline void with_small_width(int W, F&& f) {
  switch (W) {
#define LKFAST_SMALL_WIDTH(n) \
  case n:                     \
    return f(Width<n>{});
    LKFAST_SMALL_WIDTH(1) LKFAST_SMALL_WIDTH(2) LKFAST_SMALL_WIDTH(3) LKFAST_SMALL_WIDTH(4)
    LKFAST_SMALL_WIDTH(5) LKFAST_SMALL_WIDTH(6) LKFAST_SMALL_WIDTH(7) LKFAST_SMALL_WIDTH(8)
    LKFAST_SMALL_WIDTH(9) LKFAST_SMALL_WIDTH(10) LKFAST_SMALL_WIDTH(11) LKFAST_SMALL_WIDTH(12)
    LKFAST_SMALL_WIDTH(13) LKFAST_SMALL_WIDTH(14)
#undef LKFAST_SMALL_WIDTH
    default:
      return;
  }
}
static_assert(kSmallMaxW == 14, "with_small_width lists the widths 1..kSmallMaxW");

// f(Width<n>{}) for a register block of n = size outputs or taps, 1 <= n <= kMaxBlock (see
// for_blocks): the block loops are compiled per size.
template <typename F>
static inline __attribute__((always_inline)) void with_block_size(int size, F&& f) {
  switch (size) {
#define LKFAST_BLOCK_SIZE(n)                     \
  case n:                                        \
    if constexpr (n <= kMaxBlock) f(Width<n>{}); \
    return;
    LKFAST_BLOCK_SIZE(1) LKFAST_BLOCK_SIZE(2) LKFAST_BLOCK_SIZE(3) LKFAST_BLOCK_SIZE(4)
    LKFAST_BLOCK_SIZE(5) LKFAST_BLOCK_SIZE(6) LKFAST_BLOCK_SIZE(7) LKFAST_BLOCK_SIZE(8)
#undef LKFAST_BLOCK_SIZE
    default:
      return;
  }
}
static_assert(kMaxBlock <= 8, "with_block_size lists the sizes 1..8");

// Outputs [B0, B0 + NB) of output row h of a W-wide map, one vector of each pixel: X points at that
// vector of input pixel (0, 0) (row stride xh, pixel stride xw, elements), Y at output pixel (0, 0)
// (yh, yw), Wt at tap (0, 0)'s and bias at the bias pixel's (taps kParts vectors apart). bf16 pairs
// (T = uint32_t, AVX-512): X's row r holds image rows r and r + 1 (row -1 is read too), weight row
// i tap rows 2i and 2i + 1 (see forward_rows_bf16_pairs); Y and bias fp32.
template <typename T, int W, int B0, int NB>
static inline __attribute__((always_inline)) void fwd_small_block(
    const T* __restrict X, long xh, long xw, int h, int H, int kh, int kw,
    const typename Vec<T>::type* __restrict Wt, const typename Vec<typename Sum<T>::type>::type* __restrict bias,
    typename Sum<T>::type* __restrict Y, long yh, long yw) {
  typedef typename Vec<T>::type V;
  typedef typename VecU<T>::type VU;
  typedef typename Sum<T>::type R;
  typedef typename Vec<R>::type A;
  constexpr int S = Sum<T>::rows;
  constexpr int DMIN = -(B0 + NB - 1), ND = W + NB - 1;  // taps pw + d, d in [DMIN, DMIN + ND)
  const int ph = kh / 2, pw = kw / 2;
  const int wt_stride = kw + 2 * kWeightPad;
  A acc[NB];
#pragma GCC unroll 8
  for (int b = 0; b < NB; ++b) acc[b] = bias ? bias[0] : A{};
  // weight rows with an image row among their S (as in fwd_block)
  const int i_lo = imax(0, S == 1 ? ph - h : (ph - h) >> 1), i_hi = imin((kh + S - 1) / S, (H - 1 + ph - h) / S + 1);
  for (int i = i_lo; i < i_hi; ++i) {
    const T* in = X + (long)(h + S * i - ph) * xh;                // input row, column 0
    const V* wc = Wt + ((long)i * wt_stride + kWeightPad + pw) * kParts;  // tap pw, the center
    V wv[ND];
#pragma GCC unroll 32
    for (int k = 0; k < ND; ++k) wv[k] = wc[(k + DMIN) * kParts];
#pragma GCC unroll 16
    for (int u = 0; u < W; ++u) {
      const V a = *reinterpret_cast<const VU*>(in + u * xw);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) mac(acc[b], a, wv[u - B0 - b - DMIN]);  // tap pw + u - (B0 + b)
    }
  }
  R* out = Y + (long)h * yh + (long)B0 * yw;
#pragma GCC unroll 8
  for (int b = 0; b < NB; ++b) *reinterpret_cast<typename VecU<R>::type*>(out + b * yw) = acc[b];
}

// Output row h of a W-wide map, all W outputs and all kParts parts of each in one register block
// (16 registers, kParts = 2: 2 W <= 14 accumulators + 1 input), the weights taken straight from
// memory as the FMAs' operands. Each tap row loads every input vector once and meets it with
// the W weights it pairs with: 2 W independent accumulator chains, where running fwd_small_block
// on each part in turn (blocks of at most 4 outputs, as AVX2 did until 1f03d61) gave 3-4, too few
// to cover the FMA latency (RepLKNet's stage 4, 7x7 maps with 13x13 kernels: 0.68 FMAs a cycle on
// a Zen 5 capped to AVX2, below oneDNN). Every accumulator sums the same products in the same
// order as fwd_small_block's, so the results are the same bit for bit.
template <typename T, int W>
static inline __attribute__((always_inline)) void fwd_small_row_parts(
    const T* __restrict X, long xh, long xw, int h, int H, int kh, int kw,
    const typename Vec<T>::type* __restrict Wt, const typename Vec<T>::type* __restrict bias,
    T* __restrict Y, long yh, long yw) {
  typedef typename Vec<T>::type V;
  typedef typename VecU<T>::type VU;
  constexpr long L = LKFAST_VEC_BYTES / sizeof(T);  // elements per vector
  static_assert(W * kParts <= 14, "accumulators + 1 input must fit 16 registers");
  const int ph = kh / 2, pw = kw / 2;
  const int wt_stride = kw + 2 * kWeightPad;
  V acc[W][kParts];
#pragma GCC unroll 16
  for (int b = 0; b < W; ++b)
#pragma GCC unroll 2
    for (int v = 0; v < kParts; ++v) acc[b][v] = bias ? bias[v] : V{};
  const int i_lo = imax(0, ph - h), i_hi = imin(kh, H + ph - h);
  for (int i = i_lo; i < i_hi; ++i) {
    const T* in = X + (long)(h + i - ph) * xh;                    // input row, column 0
    const V* wc = Wt + ((long)i * wt_stride + kWeightPad + pw) * kParts;  // tap pw, the center
#pragma GCC unroll 16
    for (int u = 0; u < W; ++u) {
#pragma GCC unroll 2
      for (int v = 0; v < kParts; ++v) {
        const V a = *reinterpret_cast<const VU*>(in + u * xw + v * L);
#pragma GCC unroll 16
        for (int b = 0; b < W; ++b) acc[b][v] += a * wc[(u - b) * kParts + v];  // tap pw + u - b
      }
    }
  }
  T* out = Y + (long)h * yh;
#pragma GCC unroll 16
  for (int b = 0; b < W; ++b)
#pragma GCC unroll 2
    for (int v = 0; v < kParts; ++v) *reinterpret_cast<VU*>(out + b * yw + v * L) = acc[b][v];
}

// Output rows [h0, h1) of a W-wide map: with 16 registers (kParts = 2) fwd_small_row_parts, with
// 32 (one vector a pixel) fwd_small_block, one block up to kOutBlock wide, two beyond.
template <typename T, int W>
static inline __attribute__((always_inline)) void fwd_small_rows(
    const T* __restrict X, long xh, long xw, int H, int kh, int kw,
    const typename Vec<T>::type* __restrict Wt, const typename Vec<typename Sum<T>::type>::type* __restrict bias,
    int h0, int h1, typename Sum<T>::type* __restrict Y, long yh, long yw) {
  if constexpr (kParts > 1) {  // W <= kSmallMaxWParts (see small_map)
    for (int h = h0; h < h1; ++h) fwd_small_row_parts<T, W>(X, xh, xw, h, H, kh, kw, Wt, bias, Y, yh, yw);
  } else {
    for (int h = h0; h < h1; ++h) {
      if constexpr (W <= kOutBlock) {
        fwd_small_block<T, W, 0, W>(X, xh, xw, h, H, kh, kw, Wt, bias, Y, yh, yw);
      } else {
        fwd_small_block<T, W, 0, (W + 1) / 2>(X, xh, xw, h, H, kh, kw, Wt, bias, Y, yh, yw);
        fwd_small_block<T, W, (W + 1) / 2, W / 2>(X, xh, xw, h, H, kh, kw, Wt, bias, Y, yh, yw);
      }
    }
  }
}

template <typename T>
static inline void fwd_small(const T* X, long xh, long xw, int H, int W, int kh, int kw,
                             const typename Vec<T>::type* Wt, const typename Vec<typename Sum<T>::type>::type* bias,
                             int h0, int h1, typename Sum<T>::type* Y, long yh, long yw) {
  with_small_width(W, [&](auto width) {
    if constexpr (kParts == 1 || decltype(width)::value <= kSmallMaxWParts)  // (see small_map)
      fwd_small_rows<T, decltype(width)::value>(X, xh, xw, H, kh, kw, Wt, bias, h0, h1, Y, yh, yw);
  });
}

// Output rows [h0, h1) of one (image, channel block).
//   P:    packed input rows [prow0, ...), each W + 2*pw pixels
//   Wt:   kh rows of kw + 2*kWeightPad weight pixels; Bias: one pixel
//   O:    (h1 - h0) * W output pixels
//   input_finite, weights_finite: whether P's and Wt's values are all finite (see Loop)
template <typename T>
void forward_rows_impl(const T* P_, int prow0, int H, int W, int kh, int kw, const T* Wt_,
                       const T* Bias_, int h0, int h1, T* O_, bool input_finite,
                       bool weights_finite) {
  typedef typename Vec<T>::type V;
  const V* P = reinterpret_cast<const V*>(P_);
  const V* Wt = reinterpret_cast<const V*>(Wt_);
  const V* bias = reinterpret_cast<const V*>(Bias_);
  V* O = reinterpret_cast<V*>(O_);
  const int rs = W + 2 * (kw / 2);
  // (the small-map kernel multiplies no padding: exact whatever the values)
  if (small_map(W, kw)) {  // the packed tile: rows of rs pixels from row prow0, column 0 at pw
    constexpr long L = 64 / sizeof(T);  // elements per pixel
    return fwd_small<T>(P_ + ((long)(kw / 2) - (long)prow0 * rs) * L, (long)rs * L, L, H, W, kh, kw, Wt, bias,
                        h0, h1, O_ - (long)h0 * W * L, (long)W * L, L);
  }
  const Loop loop = exact_loop(input_finite, weights_finite);
  const int group = row_group(W, kh);
  for (int h = h0; h < h1; ++h) {
    V* out = O + (long)(h - h0) * W * kParts;
    const int i_lo = imax(0, kh / 2 - h), i_hi = imin(kh, H + kh / 2 - h);
    for (int ig = i_lo; ig < i_hi; ig += group) {
      const int ie = imin(i_hi, ig + group);
      const V* init = ig == i_lo ? bias : nullptr;
      for_blocks(W, kOutBlock, loop, [&](int w0, int size) {
        with_block_size(size, [&](auto n) {
          fwd_block<V, decltype(n)::value>(P, prow0, rs, H, W, kh, kw, Wt, init, h, w0, ig, ie, loop, out);
        });
      });
    }
  }
}

// Weight gradient: GW[i][j0 + b] += sum_{h, w} G[h][w] * P[h + i - ph][w + j0 + b], b < B.
// S = 2, bf16 pairs (weight_grad_bf16_pairs): gradient row h holds image rows 2h and 2h + 1, and
// meets P's row 2h + i - ph + 1, which holds image rows 2h + i - ph and 2h + i - ph + 1.
template <typename V, int B, typename Acc = V, int S = 1>
static inline __attribute__((always_inline)) void wgrad_block(const V* __restrict P,
                                                              const V* __restrict G, int H, int W,
                                                              int kh, int kw, int i, int j0,
                                                              int h_begin, int h_end,
                                                              Loop loop, Acc* __restrict GW) {
  constexpr int NV = kParts;
  const int ph = kh / 2, pw = kw / 2;
  const int prs = W + 2 * pw, grs = W + 2 * kGradPad;
  // gradient rows with an input row in the image among their S: S h + i - ph + S - 1 >= 0 and
  // S h + i - ph < H. (ph - i) >> 1 is the ceiling of (ph - i - 1) / 2 and (H - 1 + ph - i) >> 1 the
  // floor of (H - 1 + ph - i) / 2, negative values included (maps less than half the kernel tall).
  static_assert(S == 1 || S == 2, "tap rows one or two at a time");
  const int h_lo = imax(h_begin, S == 1 ? ph - i : (ph - i) >> 1);
  const int h_hi = imin(h_end, S == 1 ? H + ph - i : ((H - 1 + ph - i) >> 1) + 1);
  // Tap form: pixels w whose input column w + j0 + b is valid for some b.
  const int w_lo = imax(0, pw - j0 - B + 1), w_hi = imin(W, pw + W - j0);
  // Band form: valid input columns u (padded), pixel u - j0 - b.
  const int u_lo = imax(pw, j0), u_hi = imin(pw + W, j0 + B - 1 + W);
  const bool band = use_band(loop, u_hi - u_lo, w_hi - w_lo);
  Acc acc[B * NV];
#pragma GCC unroll 16
  for (int b = 0; b < B * NV; ++b) acc[b] = Acc{};
  for (int h = h_lo; h < h_hi; ++h) {
    const V* prow = P + (long)(S * h + i - ph + S - 1) * prs * NV;
    const V* grow = G + ((long)h * grs + kGradPad) * NV;
    if (band)
      dot_b<V, B>(prow, grow - (long)j0 * NV, u_lo, u_hi, acc);
    else
      dot_a<V, B>(prow + (long)j0 * NV, grow, w_lo, w_hi, acc);
  }
  Acc* dst = GW + ((long)i * kw + j0) * NV;
#pragma GCC unroll 16
  for (int b = 0; b < B * NV; ++b) dst[b] += acc[b];
}

// The weight gradient on a small map (small_map_shape: W <= kSmallMaxW, every tap column that meets
// the image inside the kernel): GW[i][pw + d] += sum_{h, w} G[h][w] * X[h + i - ph][w + d] for the
// taps d in [D0, D0 + ND) of tap row i, held in registers. Per output row each gradient pixel is
// loaded once, and with 32 registers (kParts == 1) the W input pixels too (2 W loads for up to
// W * W FMAs, W input vectors + ND accumulators + 1 <= 31 zmm), where the general loop reloads for
// every block of taps; with 16 (AVX2) the input is the FMA's memory operand (one load per FMA,
// which two load ports sustain; ND accumulators + 1 <= 15 ymm). X points at part v of input pixel
// (0, 0) (row stride xh vectors, pixel stride kParts), G likewise (gh), GW at part v of tap (0, 0).
// Only products of in-image values are formed, in the general loop's order: exact whatever the
// values, like fwd_small, so no Inf/NaN loop choice is needed.
// bf16 pairs (S = 2, Acc fp32): X's row r holds image rows r and r + 1 (row -1 is read too), G's
// row h gradient rows 2h and 2h + 1 (see weight_grad_bf16_pairs).
template <typename V, int W, int D0, int ND, typename Acc = V, int S = 1>
static inline __attribute__((always_inline)) void wgrad_small_taps(
    const V* __restrict X, long xh, const V* __restrict G, long gh, int H, int kh, int kw, int i,
    Acc* __restrict GW) {
  constexpr int PS = kParts;
  const int ph = kh / 2;
  // gradient rows with an input row in the image among their S (as in wgrad_block)
  const int h_lo = imax(0, S == 1 ? ph - i : (ph - i) >> 1);
  const int h_hi = S == 1 ? imin(H, H + ph - i) : imin((H + 1) / 2, ((H - 1 + ph - i) >> 1) + 1);
  Acc acc[ND];
#pragma GCC unroll 32
  for (int d = 0; d < ND; ++d) acc[d] = Acc{};
  for (int h = h_lo; h < h_hi; ++h) {
    const V* in = X + (long)(S * h + i - ph) * xh;
    const V* g = G + (long)h * gh;
    V xv[kParts == 1 ? W : 1];
    if constexpr (kParts == 1) {
#pragma GCC unroll 16
      for (int c = 0; c < W; ++c) xv[c] = in[c];
    }
#pragma GCC unroll 16
    for (int w = 0; w < W; ++w) {
      const V gv = g[w * PS];
#pragma GCC unroll 32
      for (int dd = 0; dd < ND; ++dd) {
        const int c = w + D0 + dd;  // a compile-time constant once unrolled
        if (c >= 0 && c < W) mac(acc[dd], kParts == 1 ? xv[c] : in[c * PS], gv);
      }
    }
  }
  Acc* dst = GW + ((long)i * kw + kw / 2 + D0) * PS;
#pragma GCC unroll 32
  for (int dd = 0; dd < ND; ++dd) dst[dd * PS] += acc[dd];
}

// Tap rows [i0, i1) of the small-map weight gradient: the 2 W - 1 taps of a row in one pass where
// they fit in registers beside what stays there (see wgrad_small_taps), else in two (d < 1, d >= 1),
// for each part of the pixel in turn.
template <typename V, int W, typename Acc = V, int S = 1>
static inline void wgrad_small_rows(const V* X, long xh, const V* G, long gh, int H, int kh, int kw, int i0,
                                    int i1, Acc* GW) {
  constexpr int room = kParts == 1 ? 30 - W : 14;  // accumulators that fit
  for (int v = 0; v < kParts; ++v) {
    for (int i = i0; i < i1; ++i) {
      if constexpr (2 * W - 1 <= room) {
        wgrad_small_taps<V, W, -(W - 1), 2 * W - 1, Acc, S>(X + v, xh, G + v, gh, H, kh, kw, i, GW + v);
      } else {
        wgrad_small_taps<V, W, -(W - 1), W, Acc, S>(X + v, xh, G + v, gh, H, kh, kw, i, GW + v);
        wgrad_small_taps<V, W, 1, W - 1, Acc, S>(X + v, xh, G + v, gh, H, kh, kw, i, GW + v);
      }
    }
  }
}

template <typename V, typename Acc = V, int S = 1>
static void wgrad_small(const V* X, long xh, const V* G, long gh, int H, int W, int kh, int kw, int i0,
                        int i1, Acc* GW) {
  with_small_width(W, [&](auto width) {
    wgrad_small_rows<V, decltype(width)::value, Acc, S>(X, xh, G, gh, H, kh, kw, i0, i1, GW);
  });
}

// Accumulates one (image, channel block) into the weight gradient, tap rows [i0, i1).
//   P:  all H input rows, W + 2*pw pixels each; G: H rows of W + 2*kGradPad pixels;
//   GW: kh*kw pixels, accumulated into.
//   input_finite, grad_finite: whether P's and G's values are all finite (see Loop)
template <typename T>
void weight_grad_impl(const T* P_, const T* G_, int H, int W, int kh, int kw, int i0, int i1,
                      T* GW_, bool input_finite, bool grad_finite) {
  typedef typename Vec<T>::type V;
  const V* P = reinterpret_cast<const V*>(P_);
  const V* G = reinterpret_cast<const V*>(G_);
  V* GW = reinterpret_cast<V*>(GW_);
  if (small_map_shape(W, kw)) {  // rows of W + 2 pw input pixels and W + 2 kGradPad gradient pixels
    constexpr int NV = kParts;
    return wgrad_small<V>(P + kw / 2 * NV, (W + 2 * (kw / 2)) * NV, G + kGradPad * NV, (W + 2 * kGradPad) * NV, H,
                          W, kh, kw, i0, i1, GW);
  }
  const Loop loop = exact_loop(input_finite, grad_finite);
  const int group = row_group(W, H);
  for (int i = i0; i < i1; ++i) {
    const int h_lo = imax(0, kh / 2 - i), h_hi = imin(H, H + kh / 2 - i);
    for (int hg = h_lo; hg < h_hi; hg += group) {
      const int he = imin(h_hi, hg + group);
      for_blocks(kw, kTapBlock, loop, [&](int j0, int size) {
        with_block_size(size, [&](auto n) {
          wgrad_block<V, decltype(n)::value>(P, G, H, W, kh, kw, i, j0, hg, he, loop, GW);
        });
      });
    }
  }
}

#if defined(LKFAST_X86_AVX512)
// The bf16 forward on AVX512-BF16 (the caller checks the CPU): output rows [h0, h1) of one (image,
// channel block) from pair tiles (see pair_rows), two tap rows a multiply-add instruction.
//   P2:   pair rows from prow0 - 1: row r holds image rows r and r + 1 (W + 2*pw pixels each)
//   Wt2:  (kh + 1) / 2 pair rows of kw + 2*kWeightPad pixels: tap rows 2i and 2i + 1 (the last
//         one's second half zero for odd kh); Bias: one fp32 pixel; O: fp32 output pixels
// The zeros of the padding are multiplied like any value, so P2's and Wt2's values must be finite.
void forward_rows_bf16_pairs(const uint32_t* P2_, int prow0, int H, int W, int kh, int kw,
                             const uint32_t* Wt2_, const float* Bias_, int h0, int h1, float* O_) {
  typedef Vec<float>::type V;
  const PairVec* P2 = reinterpret_cast<const PairVec*>(P2_);
  const PairVec* Wt2 = reinterpret_cast<const PairVec*>(Wt2_);
  const V* bias = reinterpret_cast<const V*>(Bias_);
  V* O = reinterpret_cast<V*>(O_);
  const int rs = W + 2 * (kw / 2), pairs = (kh + 1) / 2;
  if (small_map(W, kw)) {  // the small-map kernel, pair row 0 (image rows 0 and 1) its row 0
    constexpr long L = 16;
    return fwd_small<uint32_t>(P2_ + ((long)(kw / 2) - (long)(prow0 - 1) * rs) * L, (long)rs * L, L, H, W, kh, kw, Wt2,
                               bias, h0, h1, O_ - (long)h0 * W * L, (long)W * L, L);
  }
  for (int h = h0; h < h1; ++h) {
    V* out = O + (long)(h - h0) * W;
    for_blocks(W, kOutBlock, Loop::kFaster, [&](int w0, int size) {
      with_block_size(size, [&](auto n) {
        fwd_block<PairVec, decltype(n)::value, V, 2>(P2, prow0 - 1, rs, H, W, kh, kw, Wt2, bias, h, w0, 0, pairs,
                                                     Loop::kFaster, out);
      });
    });
  }
}

// The bf16 weight gradient on AVX512-BF16 (the caller checks the CPU), tap rows [i0, i1) of one
// (image, channel block) added to GW (fp32), two image rows a multiply-add instruction.
//   X2: H + 1 pair rows from -1 (row q: image rows q - 1 and q), W + 2*pw pixels each
//   G2: (H + 1) / 2 pair rows (row m: gradient rows 2m and 2m + 1, zero past H), W + 2*kGradPad
// As in the forward, the zeros of the padding are multiplied: X2's and G2's values must be finite.
void weight_grad_bf16_pairs(const uint32_t* X2_, const uint32_t* G2_, int H, int W, int kh, int kw, int i0,
                            int i1, float* GW_) {
  typedef Vec<float>::type V;
  const PairVec* X2 = reinterpret_cast<const PairVec*>(X2_);
  const PairVec* G2 = reinterpret_cast<const PairVec*>(G2_);
  V* GW = reinterpret_cast<V*>(GW_);
  const int prs = W + 2 * (kw / 2), grs = W + 2 * kGradPad;
  if (small_map_shape(W, kw))  // the small-map kernel, pair row 0 (image rows 0 and 1) its row 0
    return wgrad_small<PairVec, V, 2>(X2 + prs + kw / 2, prs, G2 + kGradPad, grs, H, W, kh, kw, i0, i1, GW);
  for (int i = i0; i < i1; ++i) {
    for_blocks(kw, kTapBlock, Loop::kFaster, [&](int j0, int size) {
      with_block_size(size, [&](auto n) {
        wgrad_block<PairVec, decltype(n)::value, V, 2>(X2, G2, H, W, kh, kw, i, j0, 0, (H + 1) / 2, Loop::kFaster,
                                                       GW);
      });
    });
  }
}

// Pair rows for forward_rows_bf16_pairs and weight_grad_bf16_pairs: n fp32 values of two rows (bf16 values widened, so
// exact) as n lanes of (bf16 of lo, bf16 of hi); a null row reads as zeros.
void pair_rows(const float* lo, const float* hi, long n, uint32_t* dst) {
  typedef uint32_t U __attribute__((vector_size(64)));
  constexpr long L = 16;
  const uint32_t* a = reinterpret_cast<const uint32_t*>(lo);
  const uint32_t* b = reinterpret_cast<const uint32_t*>(hi);
  long i = 0;
  for (; i + L <= n; i += L) {
    U x = a ? *reinterpret_cast<const U*>(a + i) : U{};
    U y = b ? *reinterpret_cast<const U*>(b + i) : U{};
    *reinterpret_cast<U*>(dst + i) = (x >> 16) | (y & 0xFFFF0000u);
  }
  for (; i < n; ++i) dst[i] = (a ? a[i] >> 16 : 0u) | (b ? b[i] & 0xFFFF0000u : 0u);
}
#endif

void forward_rows(const float* P, int prow0, int H, int W, int kh, int kw, const float* Wt,
                  const float* Bias, int h0, int h1, float* O, bool input_finite,
                  bool weights_finite) {
  forward_rows_impl<float>(P, prow0, H, W, kh, kw, Wt, Bias, h0, h1, O, input_finite,
                           weights_finite);
}
void forward_rows(const double* P, int prow0, int H, int W, int kh, int kw, const double* Wt,
                  const double* Bias, int h0, int h1, double* O, bool input_finite,
                  bool weights_finite) {
  forward_rows_impl<double>(P, prow0, H, W, kh, kw, Wt, Bias, h0, h1, O, input_finite,
                            weights_finite);
}
// Whether forward_small_direct has a kernel for this map width and kernel width.
bool small_direct_applies(int W, int kw) { return small_map(W, kw); }
template <typename T>
static bool forward_small_direct_impl(const T* X, long xh, long xw, int H, int W, int kh, int kw,
                                      const T* Wt, const T* Bias, T* Y, long yh, long yw) {
  typedef typename Vec<T>::type V;
  if (!small_map(W, kw)) return false;
  fwd_small<T>(X, xh, xw, H, W, kh, kw, reinterpret_cast<const V*>(Wt), reinterpret_cast<const V*>(Bias), 0, H,
               Y, yh, yw);
  return true;
}
bool forward_small_direct(const float* X, long xh, long xw, int H, int W, int kh, int kw,
                          const float* Wt, const float* Bias, float* Y, long yh, long yw) {
  return forward_small_direct_impl<float>(X, xh, xw, H, W, kh, kw, Wt, Bias, Y, yh, yw);
}
bool forward_small_direct(const double* X, long xh, long xw, int H, int W, int kh, int kw,
                          const double* Wt, const double* Bias, double* Y, long yh, long yw) {
  return forward_small_direct_impl<double>(X, xh, xw, H, W, kh, kw, Wt, Bias, Y, yh, yw);
}
// The forward on channels-innermost tensors read and written in place, any map size, for kernels
// up to kDirectMaxKw wide: on ConvNeXt's 7x7 kernels the packed path spent more time in its copies
// than in its multiply-adds (each pixel vector loaded and stored on the way into the tile and
// again on the way out, for 49 FMAs, with the tensors' cache misses inside the copy loops where
// nothing hides them). Pixels are addressed by element strides. A register block of B outputs
// runs each tap row in one of two forms: for the widths compiled in (KW = 3, 5, 7) the row's KW
// weights are held in registers and each of its B + KW - 1 inputs is loaded once and meets every
// weight it pairs with; other widths slide a window over the taps that meet the image
// (window_dot_a, 32 registers; a plain rotation with 16). Blocks whose taps reach past the image (the first and last of a row) read a zero vector
// there instead of padding; its products with the weights are zero while the weights are finite,
// which the caller checks (it packs otherwise, see Loop). Input values are only ever multiplied
// by weights of taps of their own outputs, so Inf and NaN in x land where F.conv2d puts them.
alignas(64) static const double kZeroPixel[64 / sizeof(double)] = {};

// The in-place loops (the forward, the weight gradient) read, and the forward writes, the tensors in
// their storage type S and compute in T: S = T (fp32, fp64), or S = Bf16 with T = float, widened on load
// (a bf16 is the top half of an fp32) and rounded to nearest even on store, NaN to 0x7FC0
// (c10::BFloat16's conversion, so the result is the one the packed path's unpacking gives the same
// fp32 sums). The rounding is written once in GCC's vector extensions; only the widening load and the
// narrowing store take each instruction set's intrinsics (vpmovzxwd, vpmovdw: the extensions' own
// conversions split them into halves and word shuffles). AVX512-BF16 is not required.
struct Bf16 {
  uint16_t bits;
};
template <typename S, typename T>
struct Storage {  // S = T: the vector as it is in memory
  typedef typename Vec<T>::type V;
  static inline __attribute__((always_inline)) V load(const S* p) {
    return *reinterpret_cast<const typename VecU<T>::type*>(p);
  }
  static inline __attribute__((always_inline)) void store(S* p, V v) {
    *reinterpret_cast<typename VecU<T>::type*>(p) = v;
  }
};
template <>
struct Storage<Bf16, float> {
  typedef typename Vec<float>::type V;
  typedef uint32_t U __attribute__((vector_size(LKFAST_VEC_BYTES)));
  typedef uint16_t H __attribute__((vector_size(LKFAST_VEC_BYTES / 2), aligned(2)));
  static inline __attribute__((always_inline)) V load(const Bf16* p) {
#if defined(LKFAST_X86_AVX512)
    return reinterpret_cast<V>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
#elif defined(LKFAST_X86_AVX2)
    return reinterpret_cast<V>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
#else
    return reinterpret_cast<V>(__builtin_convertvector(*reinterpret_cast<const H*>(p), U) << 16);
#endif
  }
  static inline __attribute__((always_inline)) void store(Bf16* p, V v) {
    const U u = reinterpret_cast<U>(v);
    const U rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    const U nan = reinterpret_cast<U>(v != v);  // all ones in a NaN's lane
    const U bits = (rounded & ~nan) | (nan & 0x7FC0u);  // each lane <= 0xFFFF
#if defined(LKFAST_X86_AVX512)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(reinterpret_cast<__m512i>(bits)));
#elif defined(LKFAST_X86_AVX2)  // a pack within lanes, then the two halves' low quadwords together
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(reinterpret_cast<__m256i>(bits),
                                                                        reinterpret_cast<__m256i>(bits)), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
#else
    *reinterpret_cast<H*>(p) = __builtin_convertvector(bits, H);
#endif
  }
};

template <typename S, typename T, int B, int KW, bool kEdge>
static inline __attribute__((always_inline)) void fwd_direct_block(
    const S* __restrict row, long xw, int W, int c0, int j_lo, int j_hi,
    const typename Vec<T>::type* __restrict wrow, typename Vec<T>::type* __restrict acc) {
  typedef typename Vec<T>::type V;
  constexpr int U = 1;  // (16 ymm, AVX2) B accumulators, one weight, one input
  const S* zero = reinterpret_cast<const S*>(kZeroPixel);
  // input column c0 + s (c0: the block's first output column minus pw); zero outside the image
  auto load = [&](int s) -> V {
    const int c = c0 + s;
    const S* p = row + (long)c * xw;
    if constexpr (kEdge) p = (unsigned)c < (unsigned)W ? p : zero;
    return Storage<S, T>::load(p);
  };
  if constexpr (KW > 0) {  // the whole tap row at once: KW weights held, B + KW - 1 inputs loaded once each
    V wv[KW];
#pragma GCC unroll 16
    for (int t = 0; t < KW; ++t) wv[t] = wrow[t * kParts];
    const S* q = row + (long)c0 * xw;
#pragma GCC unroll 64
    for (int s = 0; s < B + KW - 1; ++s, q += xw) {
      const S* p = q;
      if constexpr (kEdge) p = (unsigned)(c0 + s) < (unsigned)W ? q : zero;
      const V a = Storage<S, T>::load(p);
#pragma GCC unroll 16
      for (int b = 0; b < B; ++b)
        if (s - b >= 0 && s - b < KW) acc[b] += a * wv[s - b];
    }
    return;
  }
  int t = j_lo;
  if constexpr (kParts == 1) {  // 32 zmm: the sliding window (B acc + B inputs + 1 weight)
    window_dot_a<V, B>(load, [&](int j) -> V { return wrow[j * kParts]; }, j_lo, j_hi, acc);
    return;
  }
  for (; t + U <= j_hi; t += U) {
    V a[B + U - 1];
#pragma GCC unroll 32
    for (int s = 0; s < B + U - 1; ++s) a[s] = load(t + s);
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const V wv = wrow[(t + u) * kParts];
#pragma GCC unroll 16
      for (int b = 0; b < B; ++b) acc[b] += a[u + b] * wv;
    }
  }
  for (; t < j_hi; ++t) {
    const V wv = wrow[t * kParts];
#pragma GCC unroll 16
    for (int b = 0; b < B; ++b) acc[b] += load(t + b) * wv;
  }
}

// Outputs [w0, w0 + B) of output row h, one vector of each pixel (X, Y: that vector of pixel
// (0, 0); Wt, bias: of tap (0, 0) and the bias, kParts vectors per packed pixel).
template <typename S, typename T, int B, int KW>
static inline __attribute__((always_inline)) void fwd_direct_outputs(
    const S* __restrict X, long xh, long xw, int h, int H, int W, int kh, int kw,
    const typename Vec<T>::type* __restrict Wt, const typename Vec<T>::type* __restrict bias, int w0,
    S* __restrict Y, long yh, long yw) {
  typedef typename Vec<T>::type V;
  const int ph = kh / 2, pw = kw / 2;
  const int wt_stride = kw + 2 * kWeightPad;
  V acc[B];
#pragma GCC unroll 16
  for (int b = 0; b < B; ++b) acc[b] = bias ? bias[0] : V{};
  const int i_lo = imax(0, ph - h), i_hi = imin(kh, H + ph - h);
  const int c0 = w0 - pw;                                            // input column of tap 0, output w0
  const int j_lo = imax(0, -c0 - B + 1), j_hi = imin(kw, W - c0);  // taps meeting the image
  const bool edge = c0 < 0 || c0 + B - 1 + kw - 1 >= W;
  for (int i = i_lo; i < i_hi; ++i) {
    const S* row = X + (long)(h + i - ph) * xh;
    const V* wrow = Wt + (long)(i * wt_stride + kWeightPad) * kParts;
    if (edge)
      fwd_direct_block<S, T, B, KW, true>(row, xw, W, c0, j_lo, j_hi, wrow, acc);
    else
      fwd_direct_block<S, T, B, KW, false>(row, xw, W, c0, j_lo, j_hi, wrow, acc);
  }
  S* out = Y + (long)h * yh + (long)w0 * yw;
#pragma GCC unroll 16
  for (int b = 0; b < B; ++b) Storage<S, T>::store(out + b * yw, acc[b]);
}

// Output rows [h0, h1) of ncb channel blocks (lanes elements apart from X, Y, Bias; Wt's packed
// blocks wt_block elements apart), a row of every block before the next row: consecutive items walk
// the tensors in address order, and the input row that the next output row adds to the window is
// asked for ahead (the hardware prefetchers lose a channel block's 64 bytes of every pixel's C * 4).
// Against items of one channel block over a whole image, batch 32, 96 channels, 56x56: 23 -> 15 ms.
template <typename S, typename T, int KW>
static void forward_direct_rows(const S* X, long xh, long xw, int H, int W, int kh, int kw, const T* Wt_,
                                long wt_block, const T* Bias_, int ncb, int h0, int h1, S* Y, long yh,
                                long yw) {
  typedef typename Vec<T>::type V;
  constexpr long L = LKFAST_VEC_BYTES / sizeof(T);  // elements per vector
  constexpr long lanes = 64 / sizeof(T);            // elements per channel block
  const int ph = kh / 2;
  for (int h = h0; h < h1; ++h)
    for (int cb = 0; cb < ncb; ++cb) {
      // the input row that output row h + 1 adds to the window, this channel block's lines
      if (h + ph + 1 < H) {
        const S* next = X + cb * lanes + (long)(h + ph + 1) * xh;
        for (int w = 0; w < W; ++w) __builtin_prefetch(next + w * xw, 0, 3);
      }
      const V* Wt = reinterpret_cast<const V*>(Wt_ + cb * wt_block);
      const V* bias = reinterpret_cast<const V*>(Bias_ + cb * lanes);
#pragma GCC unroll 1
      for (int v = 0; v < kParts; ++v) {
        const S* Xv = X + cb * lanes + v * L;  // (lanes and L count channels: elements of S too)
        S* Yv = Y + cb * lanes + v * L;
        const V* Wv = Wt + v;
        const V* bv = bias + v;
        int w0 = 0;
        for (; w0 + kOutBlock <= W; w0 += kOutBlock)
          fwd_direct_outputs<S, T, kOutBlock, KW>(Xv, xh, xw, h, H, W, kh, kw, Wv, bv, w0, Yv, yh, yw);
        switch (W - w0) {
#define LKFAST_DIRECT_REST(n)                                                          \
  case n:                                                                              \
    fwd_direct_outputs<S, T, n, KW>(Xv, xh, xw, h, H, W, kh, kw, Wv, bv, w0, Yv, yh, yw); \
    break;
          LKFAST_DIRECT_REST(1) LKFAST_DIRECT_REST(2) LKFAST_DIRECT_REST(3) LKFAST_DIRECT_REST(4)
          LKFAST_DIRECT_REST(5) LKFAST_DIRECT_REST(6) LKFAST_DIRECT_REST(7)
#undef LKFAST_DIRECT_REST
          default:
            break;
        }
      }
    }
}
template <typename S, typename T>
static void forward_direct_impl(const S* X, long xh, long xw, int H, int W, int kh, int kw, const T* Wt,
                                long wt_block, const T* Bias, int ncb, int h0, int h1, S* Y, long yh, long yw) {
  switch (kw) {  // ConvNeXt's and MobileNet's widths, and RepLKNet's and SLaK's parallel small kernels
    case 3:
      return forward_direct_rows<S, T, 3>(X, xh, xw, H, W, kh, kw, Wt, wt_block, Bias, ncb, h0, h1, Y, yh, yw);
    case 5:
      return forward_direct_rows<S, T, 5>(X, xh, xw, H, W, kh, kw, Wt, wt_block, Bias, ncb, h0, h1, Y, yh, yw);
    case 7:
      return forward_direct_rows<S, T, 7>(X, xh, xw, H, W, kh, kw, Wt, wt_block, Bias, ncb, h0, h1, Y, yh, yw);
    default:
      return forward_direct_rows<S, T, 0>(X, xh, xw, H, W, kh, kw, Wt, wt_block, Bias, ncb, h0, h1, Y, yh, yw);
  }
}
void forward_direct(const float* X, long xh, long xw, int H, int W, int kh, int kw, const float* Wt,
                    long wt_block, const float* Bias, int ncb, int h0, int h1, float* Y, long yh, long yw) {
  forward_direct_impl<float, float>(X, xh, xw, H, W, kh, kw, Wt, wt_block, Bias, ncb, h0, h1, Y, yh, yw);
}
// bf16 tensors (raw bits) with fp32 weights, bias and sums
void forward_direct_bf16(const uint16_t* X, long xh, long xw, int H, int W, int kh, int kw, const float* Wt,
                         long wt_block, const float* Bias, int ncb, int h0, int h1, uint16_t* Y, long yh, long yw) {
  forward_direct_impl<Bf16, float>(reinterpret_cast<const Bf16*>(X), xh, xw, H, W, kh, kw, Wt, wt_block, Bias, ncb,
                                   h0, h1, reinterpret_cast<Bf16*>(Y), yh, yw);
}
void forward_direct(const double* X, long xh, long xw, int H, int W, int kh, int kw, const double* Wt,
                    long wt_block, const double* Bias, int ncb, int h0, int h1, double* Y, long yh, long yw) {
  forward_direct_impl<double, double>(X, xh, xw, H, W, kh, kw, Wt, wt_block, Bias, ncb, h0, h1, Y, yh, yw);
}
// The forward of contiguous NCHW planes (rows contiguous, a channel's plane whole), vectorized along
// the rows: no transposing copies into and out of channels-innermost tiles, which on an NCHW input
// cost lkfast's kernel more than its multiply-adds at ConvNeXt-T's 7x7 shapes (batch 8, fp32, the
// AVX2 Zen 3: 2.37 against 1.81 ms through channels_last tiles at 192 channels, 28x28, where
// PyTorch's own NCHW path took 1.84). Square kernels K = 3, 5, 7 wide, maps at least a vector (L
// lanes) wide. One plane at a time: its rows are copied into the columns [pw, pw + W) of Pd's rows
// ph .. ph + H - 1, rows Wp >= W + K - 1 values apart, H + K - 1 rows in all, whose other rows and
// columns the caller zeroed (every plane of a call has the same layout, so they stay zero): every
// input vector an output vector needs lies in Pd. The zeros multiply weights that the caller
// checked are finite (0 * Inf is NaN), so Inf and NaN in x land where F.conv2d puts them. Output
// vectors start at multiples of L, a row's last one ending at its end.
//
// A block is R output rows of one vector (R accumulators). Tap column by tap column, the column's
// K weights are held in registers (broadcast) and each input row of the block's reach is loaded
// once, shifted by the column, for the K (fewer at the block's ends) outputs it meets: R + K - 1
// loads for R * K multiply-adds. Loading the input once per multiply-add instead (a tap's weight
// broadcast, R rows by NV vectors of sums) ran at about half the FMA rate on the Zen 3: every load
// is unaligned, and about half of them span two cache lines. Input rows outside the image (Pd's
// zero rows) are skipped.
static inline __attribute__((always_inline)) Vec<float>::type broadcast(const float* p) {
#if defined(LKFAST_X86_AVX2)
  return reinterpret_cast<Vec<float>::type>(_mm256_broadcast_ss(p));  // (GCC's own: 8 inserts)
#else
  return Vec<float>::type{} + *p;
#endif
}
static inline __attribute__((always_inline)) Vec<double>::type broadcast(const double* p) {
#if defined(LKFAST_X86_AVX2)
  return reinterpret_cast<Vec<double>::type>(_mm256_broadcast_sd(p));
#else
  return Vec<double>::type{} + *p;
#endif
}

// R output rows from h0, the vector of columns [w0, w0 + L), K x K taps.
template <typename T, int K, int R>
static inline __attribute__((always_inline)) void plane_column_block(const T* __restrict Pd, long Wp, int H,
                                                                     const T* __restrict wt, const T* bias, int h0,
                                                                     int w0, int W, T* __restrict Y) {
  typedef typename Vec<T>::type V;
  typedef typename VecU<T>::type VU;
  constexpr int P = K / 2;
  V acc[R];
  const V b = broadcast(bias);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = b;
  const T* base = Pd + h0 * Wp + w0;  // Pd's row h0 + q: image row h0 + q - P
#pragma GCC unroll 8
  for (int j = 0; j < K; ++j) {
    V wcol[K];
#pragma GCC unroll 8
    for (int i = 0; i < K; ++i) wcol[i] = broadcast(wt + i * K + j);
#pragma GCC unroll 32
    for (int q = 0; q < R + K - 1; ++q) {
      if ((unsigned)(h0 + q - P) >= (unsigned)H) continue;  // a zero row
      const V x = *reinterpret_cast<const VU*>(base + q * Wp + j);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        if (q - r >= 0 && q - r < K) mac(acc[r], x, wcol[q - r]);  // tap row q - r of output row h0 + r
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) *reinterpret_cast<VU*>(Y + (long)(h0 + r) * W + w0) = acc[r];
}

// The last R rows of a column (R < the block's rows) in one block of as many.
template <typename T, int K, int R>
static inline void plane_column_tail(const T* Pd, long Wp, int H, const T* wt, const T* bias, int h0, int w0, int W,
                                     T* Y) {
  if constexpr (R > 0) {
    if (H - h0 == R) return plane_column_block<T, K, R>(Pd, Wp, H, wt, bias, h0, w0, W, Y);
    plane_column_tail<T, K, R - 1>(Pd, Wp, H, wt, bias, h0, w0, W, Y);
  }
}

// The plane X (H x W, W >= L) into Pd's rows in whole vectors, a row's last one ending at its end
// (overlapping the one before: no masked load). The caller copies the next plane while computing
// this one: loads that span a store still in flight (each shifted input vector over the vectors
// just stored) wait for it to reach the cache.
template <typename T, int K>
static void copy_plane_k(const T* __restrict X, int H, int W, T* __restrict Pd, int Wp) {
  typedef typename VecU<T>::type VU;
  constexpr int L = LKFAST_VEC_BYTES / sizeof(T);
  constexpr int P = K / 2;
  for (int r = 0; r < H; ++r) {
    const T* src = X + (long)r * W;
    T* dst = Pd + (long)(r + P) * Wp + P;
    for (int w = 0; w + L <= W; w += L) *reinterpret_cast<VU*>(dst + w) = *reinterpret_cast<const VU*>(src + w);
    *reinterpret_cast<VU*>(dst + W - L) = *reinterpret_cast<const VU*>(src + W - L);
  }
}

template <typename T, int K>
static void forward_plane_k(const T* __restrict Pd, int H, int W, const T* __restrict wt, const T* bias, int Wp,
                            T* __restrict Y) {
  constexpr int L = LKFAST_VEC_BYTES / sizeof(T);
  constexpr int R = 16 - K - 1;  // sums: 16 ymm less the K weights and the input (8, 10, 12 rows)
  // Columns of one vector, the last one ending at the row's end (recomputing a few outputs of the
  // one before, bit for bit the same: whole vectors stored, no masked store, which AMD's Zen cores
  // run as microcode).
  for (int c = 0; c < W; c += L) {
    const int w0 = imin(c, W - L);
    int h0 = 0;
    for (; h0 + R <= H; h0 += R) plane_column_block<T, K, R>(Pd, Wp, H, wt, bias, h0, w0, W, Y);
    if (h0 < H) plane_column_tail<T, K, R - 1>(Pd, Wp, H, wt, bias, h0, w0, W, Y);
  }
}

// Whether forward_planes takes this map and kernel: on AVX2 (the instruction set it was measured
// on), square kernels 3, 5 or 7 wide, maps at least 8 wide (an fp32 vector; at 7 wide, a vector a
// row with a lane idle, the packed tiles were level at batch 8 and faster at batch 1: 0.08 against
// 0.12 ms, 768 channels); elsewhere never (not measured: the packed tiles run).
bool planes_direct_applies(int W, int kh, int kw) {
#if LKFAST_VEC_BYTES == 32
  return kh == kw && (kw == 3 || kw == 5 || kw == 7) && W >= 8;
#else
  (void)W, (void)kh, (void)kw;
  return false;
#endif
}
// Plane X_next (if any) copied into Pd_next, then the plane already in Pd computed into Y.
template <typename T>
static bool forward_planes_impl(const T* X_next, T* Pd_next, const T* Pd, int H, int W, int kh, int kw,
                                const T* wt, const T* bias, int Wp, T* Y) {
  if (!planes_direct_applies(W, kh, kw)) return false;
#if LKFAST_VEC_BYTES == 32
  switch (kw) {
#define LKFAST_PLANE_K(k)                                                 \
  case k:                                                                 \
    if (X_next) copy_plane_k<T, k>(X_next, H, W, Pd_next, Wp);            \
    if (Pd) forward_plane_k<T, k>(Pd, H, W, wt, bias, Wp, Y);             \
    return true;
    LKFAST_PLANE_K(3) LKFAST_PLANE_K(5) LKFAST_PLANE_K(7)
#undef LKFAST_PLANE_K
    default:
      return false;
  }
#else  // (not instantiated where they never run)
  (void)X_next, (void)Pd_next, (void)Pd, (void)H, (void)wt, (void)bias, (void)Wp, (void)Y;
  return false;
#endif
}
bool forward_planes(const float* X_next, float* Pd_next, const float* Pd, int H, int W, int kh, int kw,
                    const float* wt, const float* bias, int Wp, float* Y) {
  return forward_planes_impl<float>(X_next, Pd_next, Pd, H, W, kh, kw, wt, bias, Wp, Y);
}
bool forward_planes(const double* X_next, double* Pd_next, const double* Pd, int H, int W, int kh, int kw,
                    const double* wt, const double* bias, int Wp, double* Y) {
  return forward_planes_impl<double>(X_next, Pd_next, Pd, H, W, kh, kw, wt, bias, Wp, Y);
}

// Whether n values (whole 64-byte pixels, 64-byte aligned) are all finite. v - v is zero for a
// finite v and NaN otherwise; its bits ORed together stay zero only if every v is finite (an OR
// has a one-cycle dependency chain, so two accumulators keep up with two loads a cycle).
template <typename T>
static bool all_finite_impl(const T* p_, long n) {
  typedef typename Vec<T>::type V;
  typedef long long I __attribute__((vector_size(LKFAST_VEC_BYTES)));
  const V* p = reinterpret_cast<const V*>(p_);
  const long nv = n / (LKFAST_VEC_BYTES / (long)sizeof(T));
  I bad0 = {}, bad1 = {};
  long i = 0;
  for (; i + 2 <= nv; i += 2) {
    bad0 |= reinterpret_cast<I>(p[i] - p[i]);
    bad1 |= reinterpret_cast<I>(p[i + 1] - p[i + 1]);
  }
  if (i < nv) bad0 |= reinterpret_cast<I>(p[i] - p[i]);
  bad0 |= bad1;
  long long any = 0;
  for (int l = 0; l < (int)(LKFAST_VEC_BYTES / sizeof(long long)); ++l) any |= bad0[l];
  return any == 0;
}
bool all_finite(const float* p, long n) { return all_finite_impl<float>(p, n); }
bool all_finite(const double* p, long n) { return all_finite_impl<double>(p, n); }

#ifdef LKFAST_SHUFFLES
// Transposing copies between channels stored apart (weights, NCHW planes) and packed pixels (one
// pixel holds the same position of 64 bytes of channels). A tile of L channels by L positions is
// loaded as L vectors (one per channel), transposed in registers (log2 L rounds of two-vector
// shuffles) and stored as L vectors (one per position): whole vectors in and out, where a scalar
// loop moves one value at a time with stores 64 bytes apart (on RepLKNet's 7x7 maps at batch 1 the
// scalar weight packing took twice as long as the convolution).
template <typename T>
struct MaskOf;
template <>
struct MaskOf<float> {
  typedef int type __attribute__((vector_size(LKFAST_VEC_BYTES)));
};
template <>
struct MaskOf<double> {
  typedef long long type __attribute__((vector_size(LKFAST_VEC_BYTES)));
};

// The shuffles that transpose L x L (L = 4, 8 or 16): round k (s = L >> (k + 1)) swaps, in every
// 2s x 2s block, the top-right s x s block with the bottom-left one. Built once per call (built
// inside the tile loop, GCC rebuilt them for every tile).
template <typename M, int L>
struct TransposeMasks {
  static constexpr int kRounds = L == 16 ? 4 : L == 8 ? 3 : 2;
  M lo[kRounds], hi[kRounds];
  TransposeMasks() {
    for (int k = 0; k < kRounds; ++k) {
      const int s = L >> (k + 1);
      for (int c = 0; c < L; ++c) {
        lo[k][c] = (c & s) ? L + c - s : c;
        hi[k][c] = (c & s) ? L + c : c + s;
      }
    }
  }
};

// r[0..L) as the rows of an L x L matrix, transposed.
template <typename V, typename M, int L>
static inline __attribute__((always_inline)) void transpose_square(V* r, const TransposeMasks<M, L>& m) {
  static_assert((1 << TransposeMasks<M, L>::kRounds) == L, "L is 4, 8 or 16");
#pragma GCC unroll 4
  for (int k = 0; k < TransposeMasks<M, L>::kRounds; ++k) {
    const int s = L >> (k + 1);
#pragma GCC unroll 16
    for (int a = 0; a < L; ++a) {
      if (a & s) continue;
      const V top = r[a], bottom = r[a | s];
      r[a] = __builtin_shuffle(top, bottom, m.lo[k]);
      r[a | s] = __builtin_shuffle(top, bottom, m.hi[k]);
    }
  }
}

// The two directions of the transposing copies. A block of lanes channels stored as planes (plane l
// at base + l * cs, position p at base[l * cs + p]) is a lanes x n matrix whose transpose is a run of
// packed pixels (kParts vectors each). Tiles of L channels by L consecutive positions go through
// transpose_square; the last tile ends at position n - 1, overlapping the one before (n >= L; fewer
// positions are left to the callers).
//
// Planes to pixels: pixel pixel(p) of out gets position p; seen(vector) for each vector stored.
template <typename T, typename Pixel, typename Seen>
static inline __attribute__((always_inline)) void planes_to_pixels(const T* __restrict base, long cs, int n,
                                                                   Pixel pixel, T* __restrict dst, Seen seen) {
  typedef typename Vec<T>::type V;
  typedef typename VecU<T>::type VU;
  typedef typename MaskOf<T>::type M;
  constexpr int L = LKFAST_VEC_BYTES / sizeof(T);
  V* out = reinterpret_cast<V*>(dst);
  const TransposeMasks<M, L> masks;
  for (int p0 = 0; p0 < n; p0 += L) {
    const int p = p0 + L <= n ? p0 : n - L, q0 = p0 - p;  // (the overlap is not stored again)
#pragma GCC unroll 2
    for (int v = 0; v < kParts; ++v) {
      V t[L];
#pragma GCC unroll 16
      for (int l = 0; l < L; ++l) t[l] = *reinterpret_cast<const VU*>(base + (long)(v * L + l) * cs + p);
      transpose_square<V, M, L>(t, masks);
#pragma GCC unroll 16
      for (int q = 0; q < L; ++q) {
        if (q < q0) continue;
        out[pixel(p + q) * kParts + v] = t[q];
        seen(t[q]);
      }
    }
  }
}

// Pixels to planes: vector v of the pixel at position p is get(p, v); position p of plane l gets it.
template <typename T, typename Get>
static inline __attribute__((always_inline)) void pixels_to_planes(int n, Get get, T* __restrict base, long cs) {
  typedef typename Vec<T>::type V;
  typedef typename VecU<T>::type VU;
  typedef typename MaskOf<T>::type M;
  constexpr int L = LKFAST_VEC_BYTES / sizeof(T);
  const TransposeMasks<M, L> masks;
  for (int p0 = 0; p0 < n; p0 += L) {
    const int p = p0 + L <= n ? p0 : n - L;  // (the overlap stores the same values again)
#pragma GCC unroll 2
    for (int v = 0; v < kParts; ++v) {
      V t[L];
#pragma GCC unroll 16
      for (int q = 0; q < L; ++q) t[q] = get(p + q, v);
      transpose_square<V, M, L>(t, masks);
#pragma GCC unroll 16
      for (int l = 0; l < L; ++l) *reinterpret_cast<VU*>(base + (long)(v * L + l) * cs + p) = t[l];
    }
  }
}

// Zeroes pad pixels on both sides of each of `rows` rows of W + 2 pad pixels.
template <typename T>
static inline void zero_pad_pixels(T* dst, int rows, int W, int pad) {
  typedef typename Vec<T>::type V;
  V* out = reinterpret_cast<V*>(dst);
  const long rs = W + 2 * pad;
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < pad * kParts; ++j) {
      out[r * rs * kParts + j] = V{};
      out[(r * rs + pad + W) * kParts + j] = V{};
    }
}

// One channel block of forward weights (lanes = 64 / sizeof(T) channels, each a row of kh * kw taps,
// starting at src) packed as dwconv_cpu.cpp lays them out: tap row i of kw + 2 * kWeightPad pixels,
// tap (i, j) at pixel kWeightPad + j (flip: the kernel turned half way round), zeros around;
// returns whether every weight is finite.
template <typename T>
static bool pack_weight_block_impl(const T* __restrict src, int kh, int kw, bool flip, T* __restrict block) {
  typedef typename Vec<T>::type V;
  typedef long long I __attribute__((vector_size(LKFAST_VEC_BYTES)));
  constexpr int L = LKFAST_VEC_BYTES / sizeof(T);  // elements per vector; kParts vectors a pixel
  const int taps = kh * kw, kwp = kw + 2 * kWeightPad;
  zero_pad_pixels<T>(block, kh, kw, kWeightPad);
  auto pixel = [&](int t) {  // where tap t of the kernel goes
    const int i = t / kw, j = t % kw;
    return flip ? (long)(kh - 1 - i) * kwp + kWeightPad + (kw - 1 - j) : (long)i * kwp + kWeightPad + j;
  };
  I bad = {};
  if (taps >= L) planes_to_pixels<T>(src, taps, taps, pixel, block, [&](V x) { bad |= reinterpret_cast<I>(x - x); });
  bool finite = true;
  for (int t0 = 0; t0 < taps && taps < L; ++t0) {  // a kernel of fewer than L taps, one value at a time
    T* dst = block + pixel(t0) * kParts * L;
    for (int l = 0; l < kParts * L; ++l) {
      const T x = src[(long)l * taps + t0];
      dst[l] = x;
      finite &= x - x == 0;
    }
  }
  long long any = 0;
  for (int l = 0; l < (int)(LKFAST_VEC_BYTES / sizeof(long long)); ++l) any |= bad[l];
  return finite && any == 0;
}
bool pack_weight_block(const float* src, int kh, int kw, bool flip, float* block) {
  return pack_weight_block_impl<float>(src, kh, kw, flip, block);
}
bool pack_weight_block(const double* src, int kh, int kw, bool flip, double* block) {
  return pack_weight_block_impl<double>(src, kh, kw, flip, block);
}

// The other way round, for the weight gradient: dst row l (channel l of a block of lanes channels,
// taps values, rows taps apart) = the sum over the image groups g < ngroups, in order from zero,
// of partial[g * group_stride + tap * lanes + l]. Kernels of fewer than L taps are left to the
// caller (false).
template <typename T>
static bool sum_weight_grad_block_impl(const T* __restrict partial, long group_stride, int ngroups, int taps,
                                       T* __restrict dst) {
  typedef typename Vec<T>::type V;
  if (taps < (int)(LKFAST_VEC_BYTES / sizeof(T))) return false;
  const V* in = reinterpret_cast<const V*>(partial);
  const long gs = group_stride / (LKFAST_VEC_BYTES / sizeof(T));  // in vectors
  pixels_to_planes<T>(taps, [&](int t, int v) {
    V sum = V{};
    for (int g = 0; g < ngroups; ++g) sum += in[g * gs + (long)t * kParts + v];
    return sum;
  }, dst, taps);
  return true;
}
bool sum_weight_grad_block(const float* partial, long group_stride, int ngroups, int taps, float* dst) {
  return sum_weight_grad_block_impl<float>(partial, group_stride, ngroups, taps, dst);
}
bool sum_weight_grad_block(const double* partial, long group_stride, int ngroups, int taps, double* dst) {
  return sum_weight_grad_block_impl<double>(partial, group_stride, ngroups, taps, dst);
}

// NCHW tensors to and from the packed tiles: channel planes stored whole (row stride W, pixel stride
// 1: contiguous NCHW), positions running across rows, where a scalar loop moves one value at a time
// with stores 64 bytes apart. Fewer than L positions in all are left to the caller (false).
//
// Pack: rows [r0, r1) into dst as rows of W + 2 pad pixels, the pad pixels zero.
template <typename T>
static bool pack_planes_impl(const T* __restrict src, long cs, int r0, int r1, int W, int pad, T* __restrict dst) {
  typedef typename Vec<T>::type V;
  const int n = (r1 - r0) * W;
  if (n < (int)(LKFAST_VEC_BYTES / sizeof(T))) return false;
  zero_pad_pixels<T>(dst, r1 - r0, W, pad);
  planes_to_pixels<T>(src + (long)r0 * W, cs, n, [&](int p) { return (long)(p / W) * (W + 2 * pad) + pad + p % W; },
                      dst, [](V) {});
  return true;
}

// Unpack: (h1 - h0) * W packed pixels (no padding) into rows [h0, h1) of the planes at dst.
template <typename T>
static bool unpack_planes_impl(const T* __restrict src, int h0, int h1, int W, T* __restrict dst, long cs) {
  typedef typename Vec<T>::type V;
  const int n = (h1 - h0) * W;
  if (n < (int)(LKFAST_VEC_BYTES / sizeof(T))) return false;
  const V* in = reinterpret_cast<const V*>(src);
  pixels_to_planes<T>(n, [&](int p, int v) { return in[(long)p * kParts + v]; }, dst + (long)h0 * W, cs);
  return true;
}
bool pack_planes(const float* src, long cs, int r0, int r1, int W, int pad, float* dst) {
  return pack_planes_impl<float>(src, cs, r0, r1, W, pad, dst);
}
bool pack_planes(const double* src, long cs, int r0, int r1, int W, int pad, double* dst) {
  return pack_planes_impl<double>(src, cs, r0, r1, W, pad, dst);
}
bool unpack_planes(const float* src, int h0, int h1, int W, float* dst, long cs) {
  return unpack_planes_impl<float>(src, h0, h1, W, dst, cs);
}
bool unpack_planes(const double* src, int h0, int h1, int W, double* dst, long cs) {
  return unpack_planes_impl<double>(src, h0, h1, W, dst, cs);
}
#endif  // LKFAST_SHUFFLES

// The weight gradient on channels-innermost tensors read in place (fp32, fp64, or bf16 widened on load:
// Storage), for the kernel widths compiled in (KW = 3, 5, 7; others pack): as with the forward (forward_direct), packing cost more than the
// multiply-adds at these widths. Gradient row by gradient row: each tap row i meeting the image
// takes its KW sums from GW into registers, adds the row's products and puts them back, so a row's
// kh input rows and its gradient row are read while in L1 (tap row by tap row over the whole image,
// the first version, reread the image kh times from L2 and ran slower than packing at 128 channels,
// 56x56, 5x5). Along a row, gradient pixels whose KW input columns all lie inside the image take
// the sliding window of window_dot_a with 32 registers (one input and one gradient pixel a step),
// with 16 the plain rotation (U pixels a step, KW + U - 1 inputs loaded once); the pw pixels at each end
// form only the products of in-image inputs (a test per tap), so the result is exact whatever the
// values, with no finiteness check. X, G: part 0 of pixel (0, 0) of one channel block (row strides
// xh, gh, pixel strides xw, gw, elements); GW: the block's (kh, KW, kParts vectors) sums, added to.
template <typename S, typename T, int KW>
static void wgrad_direct_rows(const S* X, long xh, long xw, const S* G, long gh, long gw, int H, int W, int kh,
                              int i0, int i1, T* GW_) {
  typedef typename Vec<T>::type V;
  typedef Storage<S, T> St;
  constexpr long L = LKFAST_VEC_BYTES / sizeof(T);  // elements per vector
  constexpr int pw = KW / 2;
  constexpr int U = 1;  // (16 ymm, AVX2) KW accumulators and the gradient pixel
  const int ph = kh / 2;
  V* GW = reinterpret_cast<V*>(GW_);
  // gradient pixels [pw, W - pw) meet only in-image inputs; the others, the ends, are tested per tap
  const int mid_lo = imin(pw, W), mid_hi = imax(mid_lo, W - pw);
#pragma GCC unroll 1
  for (int v = 0; v < kParts; ++v)
    for (int h = 0; h < H; ++h) {
      const S* gr = G + v * L + (long)h * gh;
      const int ia = imax(i0, ph - h), ib = imin(i1, H + ph - h);  // tap rows whose input row is in the image
      for (int i = ia; i < ib; ++i) {
        const S* xr = X + v * L + (long)(h + i - ph) * xh;  // input row h + i - ph, column 0
        V* dst = GW + (long)i * KW * kParts + v;
        V acc[KW];
#pragma GCC unroll 8
        for (int j = 0; j < KW; ++j) acc[j] = dst[j * kParts];
        auto x_at = [&](int c) -> V { return St::load(xr + (long)c * xw); };
        auto end_pixel = [&](int w) {
          const V g = St::load(gr + (long)w * gw);
#pragma GCC unroll 8
          for (int j = 0; j < KW; ++j) {
            const int c = w + j - pw;
            if ((unsigned)c < (unsigned)W) acc[j] += x_at(c) * g;
          }
        };
        for (int w = 0; w < mid_lo; ++w) end_pixel(w);
        int w = mid_lo;
        if constexpr (kParts == 1) {  // 32 zmm: window_dot_a's sliding window (KW acc + KW inputs + 1)
          window_dot_a<V, KW>([&](int s) { return x_at(s - pw); },
                              [&](int s) -> V { return St::load(gr + (long)s * gw); },
                              mid_lo, mid_hi, acc);
          w = mid_hi;
        }
        for (; w + U <= mid_hi; w += U) {
          V a[KW + U - 1];
#pragma GCC unroll 16
          for (int s = 0; s < KW + U - 1; ++s) a[s] = x_at(w - pw + s);
#pragma GCC unroll 4
          for (int u = 0; u < U; ++u) {
            const V g = St::load(gr + (long)(w + u) * gw);
#pragma GCC unroll 8
            for (int j = 0; j < KW; ++j) acc[j] += a[u + j] * g;
          }
        }
        for (; w < mid_hi; ++w) {
          const V g = St::load(gr + (long)w * gw);
#pragma GCC unroll 8
          for (int j = 0; j < KW; ++j) acc[j] += x_at(w - pw + j) * g;
        }
        for (w = mid_hi; w < W; ++w) end_pixel(w);
#pragma GCC unroll 8
        for (int j = 0; j < KW; ++j) dst[j * kParts] = acc[j];
      }
    }
}
template <typename S, typename T>
static bool weight_grad_direct_impl(const S* X, long xh, long xw, const S* G, long gh, long gw, int H, int W,
                                    int kh, int kw, int i0, int i1, T* GW) {
  switch (kw) {
    case 3:
      return wgrad_direct_rows<S, T, 3>(X, xh, xw, G, gh, gw, H, W, kh, i0, i1, GW), true;
    case 5:
      return wgrad_direct_rows<S, T, 5>(X, xh, xw, G, gh, gw, H, W, kh, i0, i1, GW), true;
    case 7:
      return wgrad_direct_rows<S, T, 7>(X, xh, xw, G, gh, gw, H, W, kh, i0, i1, GW), true;
    default:
      return false;
  }
}
bool weight_grad_direct(const float* X, long xh, long xw, const float* G, long gh, long gw, int H, int W, int kh,
                        int kw, int i0, int i1, float* GW) {
  return weight_grad_direct_impl<float, float>(X, xh, xw, G, gh, gw, H, W, kh, kw, i0, i1, GW);
}
// bf16 tensors (raw bits), fp32 sums
bool weight_grad_direct_bf16(const uint16_t* X, long xh, long xw, const uint16_t* G, long gh, long gw, int H, int W,
                             int kh, int kw, int i0, int i1, float* GW) {
  return weight_grad_direct_impl<Bf16, float>(reinterpret_cast<const Bf16*>(X), xh, xw, reinterpret_cast<const Bf16*>(G),
                                              gh, gw, H, W, kh, kw, i0, i1, GW);
}
bool weight_grad_direct(const double* X, long xh, long xw, const double* G, long gh, long gw, int H, int W, int kh,
                        int kw, int i0, int i1, double* GW) {
  return weight_grad_direct_impl<double, double>(X, xh, xw, G, gh, gw, H, W, kh, kw, i0, i1, GW);
}

void weight_grad(const float* P, const float* G, int H, int W, int kh, int kw, int i0, int i1,
                 float* GW, bool input_finite, bool grad_finite) {
  weight_grad_impl<float>(P, G, H, W, kh, kw, i0, i1, GW, input_finite, grad_finite);
}
void weight_grad(const double* P, const double* G, int H, int W, int kh, int kw, int i0, int i1,
                 double* GW, bool input_finite, bool grad_finite) {
  weight_grad_impl<double>(P, G, H, W, kh, kw, i0, i1, GW, input_finite, grad_finite);
}

}  // namespace LKFAST_ISA
}  // namespace cpu
}  // namespace lkfast
