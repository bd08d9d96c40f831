// CPU depthwise convolution (stride 1, zero "same" padding, odd kernels): the ATen side.
//
// Work is split into (image, channel block of 16 fp32 / 8 fp64 lanes, row chunk) items run by
// OpenMP. Each item packs the rows it needs into a channels-innermost tile, converting to the
// accumulation type on the way (fp16/bf16 accumulate in fp32), so NCHW, channels_last and any
// other strides are read in place with no full-tensor copy. Small kernels on channels-innermost
// fp32/fp64 (and bf16) tensors with whole channel blocks pack nothing: the forward's items are row chunks of one
// image over all channel blocks, computed on the tensors themselves (forward_direct), and the weight
// gradient reads each image's block in place (weight_grad_direct). On AVX2 the forward of contiguous
// NCHW fp32/fp64 with square 3x3-7x7 kernels on maps 8 or more wide packs nothing either: each plane
// is computed along its rows (forward_nchw_planes, the kernel's forward_planes). The arithmetic lives in
// dwconv_kernel.h, compiled for AVX-512, AVX2 and a baseline, chosen once at run time. On CPUs with
// AVX512-BF16 the bf16 forward and weight gradient of packed tiles pair up rows, two multiply-adds
// an instruction (vdpbf16ps: see bf16_pairs_apply).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "dwconv_cpu.h"
#include "dwconv_isa.h"
#include "dwconv_layout.h"

namespace lkfast {
namespace cpu {
namespace {

// kAvx512Bf16: the AVX-512 core, and bf16 in pairs of rows (AVX512-BF16's vdpbf16ps).
enum class Isa { kGeneric, kAvx2, kAvx512, kAvx512Bf16 };

bool cpu_has_avx512bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// False where setup.py found an assembler that cannot encode vdpbf16ps (binutils < 2.32).
constexpr bool bf16_pairs_built() {
#if defined(LKFAST_NO_VDPBF16PS)
  return false;
#else
  return true;
#endif
}

Isa detect_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return cpu_has_avx512bf16() && bf16_pairs_built() ? Isa::kAvx512Bf16 : Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

Isa active_isa() {
  static const Isa isa = [] {
    // LKFAST_CPU_ISA=generic|avx2|avx512|avx512bf16 caps the choice (for testing every path).
    Isa best = detect_isa();
    if (const char* env = std::getenv("LKFAST_CPU_ISA")) {
      std::string s(env);
      Isa want = s == "generic" ? Isa::kGeneric : s == "avx2" ? Isa::kAvx2 : s == "avx512" ? Isa::kAvx512
                                                                                        : Isa::kAvx512Bf16;
      if (static_cast<int>(want) < static_cast<int>(best)) best = want;
    }
    return best;
  }();
  return isa;
}

// Calls fn of the active instruction set's compute core (avx512::fn, avx2::fn or generic::fn) with
// the arguments and returns what it returns. LKFAST_ON_SHUFFLE_ISA: for the transposing copies,
// which only the instruction sets with two-vector shuffles have (dwconv_isa.h): false on generic.
#define LKFAST_ON_ISA_OR(fallback, fn, ...) \
  switch (active_isa()) {                   \
    case Isa::kAvx512Bf16:                  \
    case Isa::kAvx512:                      \
      return avx512::fn(__VA_ARGS__);       \
    case Isa::kAvx2:                        \
      return avx2::fn(__VA_ARGS__);         \
    default:                                \
      return fallback;                      \
  }
#define LKFAST_ON_ISA(fn, ...) LKFAST_ON_ISA_OR(generic::fn(__VA_ARGS__), fn, __VA_ARGS__)
#define LKFAST_ON_SHUFFLE_ISA(fn, ...) LKFAST_ON_ISA_OR(false, fn, __VA_ARGS__)

// input_finite, weights_finite / grad_finite: whether the packed operands hold only finite
// values; where one does not, the kernels keep its Inf and NaN off the zero padding (see
// dwconv_kernel.h, Loop).
template <typename T>
void forward_rows(const T* P, int prow0, int H, int W, int kh, int kw, const T* Wt, const T* Bias,
                  int h0, int h1, T* O, bool input_finite, bool weights_finite) {
  LKFAST_ON_ISA(forward_rows, P, prow0, H, W, kh, kw, Wt, Bias, h0, h1, O, input_finite, weights_finite);
}

template <typename T>
void weight_grad(const T* P, const T* G, int H, int W, int kh, int kw, int i0, int i1, T* GW,
                 bool input_finite, bool grad_finite) {
  LKFAST_ON_ISA(weight_grad, P, G, H, W, kh, kw, i0, i1, GW, input_finite, grad_finite);
}

// The small-map kernel straight on channels-innermost tensors (no packing), where the ISA has it.
template <typename T>
bool forward_small_direct(const T* X, long xh, long xw, int H, int W, int kh, int kw, const T* Wt,
                          const T* Bias, T* Y, long yh, long yw) {
  LKFAST_ON_ISA(forward_small_direct, X, xh, xw, H, W, kh, kw, Wt, Bias, Y, yh, yw);
}

bool small_direct_applies(int W, int kw) {
  LKFAST_ON_ISA(small_direct_applies, W, kw);
}

// The forward of one contiguous NCHW plane vectorized along its rows (see the kernel's
// forward_planes); false where the instruction set or the shape has none.
bool planes_direct_applies(int W, int kh, int kw) {
  LKFAST_ON_ISA(planes_direct_applies, W, kh, kw);
}
// Plane X_next (if not null) copied into Pd_next, then the plane in Pd (if not null) computed into Y.
template <typename T>
bool forward_planes(const T* X_next, T* Pd_next, const T* Pd, int H, int W, int kh, int kw, const T* wt,
                    const T* bias, int Wp, T* Y) {
  LKFAST_ON_ISA(forward_planes, X_next, Pd_next, Pd, H, W, kh, kw, wt, bias, Wp, Y);
}

// The forward straight on channels-innermost tensors (no packing): ncb whole channel blocks from
// X's, Y's and Bias's first element (Wt: packed blocks wt_block elements apart), output rows [h0, h1).
template <typename T>
void forward_direct(const T* X, long xh, long xw, int H, int W, int kh, int kw, const T* Wt, long wt_block,
                    const T* Bias, int ncb, int h0, int h1, T* Y, long yh, long yw) {
  LKFAST_ON_ISA(forward_direct, X, xh, xw, H, W, kh, kw, Wt, wt_block, Bias, ncb, h0, h1, Y, yh, yw);
}

// bf16 tensors, fp32 sums (the kernel widens each vector as it loads it)
bool weight_grad_direct(const at::BFloat16* X, long xh, long xw, const at::BFloat16* G, long gh, long gw, int H,
                        int W, int kh, int kw, int i0, int i1, float* GW) {
  const uint16_t* x = reinterpret_cast<const uint16_t*>(X);
  const uint16_t* g = reinterpret_cast<const uint16_t*>(G);
  LKFAST_ON_ISA(weight_grad_direct_bf16, x, xh, xw, g, gh, gw, H, W, kh, kw, i0, i1, GW);
}

// bf16 tensors with fp32 weights, bias and sums: the kernel widens each input vector on load and
// rounds each output vector on store (as c10::BFloat16 does), so no tile is packed or unpacked.
void forward_direct(const at::BFloat16* X, long xh, long xw, int H, int W, int kh, int kw, const float* Wt,
                    long wt_block, const float* Bias, int ncb, int h0, int h1, at::BFloat16* Y, long yh, long yw) {
  const uint16_t* x = reinterpret_cast<const uint16_t*>(X);
  uint16_t* y = reinterpret_cast<uint16_t*>(Y);
  LKFAST_ON_ISA(forward_direct_bf16, x, xh, xw, H, W, kh, kw, Wt, wt_block, Bias, ncb, h0, h1, y, yh, yw);
}

// The storage types the in-place loops (forward, weight gradient) read: the accumulation type itself, and bf16.
template <typename S, typename T>
constexpr bool kDirectStorage = std::is_same<S, T>::value || std::is_same<S, at::BFloat16>::value;

// The weight gradient of one channel block straight on channels-innermost tensors (no packing), tap
// rows [i0, i1), added to GW; false where the kernel width is not one the ISA code has.
template <typename T>
bool weight_grad_direct(const T* X, long xh, long xw, const T* G, long gh, long gw, int H, int W, int kh, int kw,
                        int i0, int i1, T* GW) {
  LKFAST_ON_ISA(weight_grad_direct, X, xh, xw, G, gh, gw, H, W, kh, kw, i0, i1, GW);
}

// One full channel block of weights packed by the instruction set's transposing copy (see the
// kernel's pack_weight_block), *finite set to whether all are finite; false where there is none.
template <typename T>
bool pack_weight_block(const T* src, int kh, int kw, bool flip, T* block, bool* finite) {
  if (active_isa() == Isa::kGeneric) return false;
  *finite = [&]() -> bool { LKFAST_ON_SHUFFLE_ISA(pack_weight_block, src, kh, kw, flip, block); }();
  return true;
}

// One full channel block of the weight gradient summed over the image groups by the instruction
// set's transposing sum (see the kernel's sum_weight_grad_block); false where there is none.
template <typename T>
bool sum_weight_grad_block(const T* partial, long group_stride, int ngroups, int taps, T* dst) {
  LKFAST_ON_SHUFFLE_ISA(sum_weight_grad_block, partial, group_stride, ngroups, taps, dst);
}

// Rows [r0, r1) of one full channel block of contiguous NCHW planes (channel stride cs) packed, and
// packed rows [h0, h1) written back, by the instruction set's transposing copies (see the kernel's
// pack_planes); false where there is none or the rows hold fewer pixels than one tile.
template <typename T>
bool pack_planes(const T* src, long cs, int r0, int r1, int W, int pad, T* dst) {
  LKFAST_ON_SHUFFLE_ISA(pack_planes, src, cs, r0, r1, W, pad, dst);
}
template <typename T>
bool unpack_planes(const T* src, int h0, int h1, int W, T* dst, long cs) {
  LKFAST_ON_SHUFFLE_ISA(unpack_planes, src, h0, h1, W, dst, cs);
}

// Whether the n values of a packed tile (64-byte aligned, whole pixels) are all finite: one
// vector pass over a tile just packed (in cache), cheaper than checking while packing.
template <typename T>
bool all_finite(const T* p, long n) {
  LKFAST_ON_ISA(all_finite, p, n);
}

// Whether the bf16 forward and weight gradient of packed tiles run in pairs of rows
// (avx512::forward_rows_bf16_pairs, weight_grad_bf16_pairs): on AVX512-BF16, but for small maps no
// wider than 7 (RepLKNet's stage 4), where pairing the tiles costs what the pairs save. Batch 8, 2
// threads, the Zen 5, medians of 25 calls against the fp32 FMAs: 1.3-1.5x at 56x56 with 31x31 and
// 28x28 with 29x29 (both passes), 1.1-1.2x at 14x14 with 27x27; at 7x7 with 13x13 the forward level
// and the weight gradient 0.87-0.92x.
bool bf16_pairs_apply(int W, int kw) {
  return active_isa() == Isa::kAvx512Bf16 && !(small_direct_applies(W, kw) && W <= 7);
}

// A packed fp32 tile of n rows of len values (bf16 values widened) as the pair kernels read it, rows
// outside the tile as zeros (avx512::pair_rows). Overlapping: pair row q holds rows q - 1 and q (n + 1
// pair rows: the input, whose pairs start at every row). In twos: pair row m holds rows 2m and 2m + 1
// ((n + 1) / 2 pair rows: the weights' tap rows, the output gradient's rows).
void pair_overlapping(const float* P, int n, long len, uint32_t* dst) {
  for (int q = 0; q <= n; ++q)
    avx512::pair_rows(q > 0 ? P + (q - 1) * len : nullptr, q < n ? P + q * len : nullptr, len, dst + q * len);
}
void pair_in_twos(const float* P, int n, long len, uint32_t* dst) {
  for (int m = 0; 2 * m < n; ++m)
    avx512::pair_rows(P + 2 * m * len, 2 * m + 1 < n ? P + (2 * m + 1) * len : nullptr, len, dst + m * len);
}

// 64-byte aligned scratch, one per thread, grown on demand.
template <typename T>
struct Scratch {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr;
  size_t size = 0;
  T* get(size_t n) {
    if (n > size) {
      size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
      ptr.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
      TORCH_CHECK(ptr, "lkfast: out of memory allocating ", bytes, " bytes of scratch");
      size = n;
    }
    return ptr.get();
  }
};

struct Strides {
  int64_t n, c, h, w;
};

Strides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Packs rows [r0, r1) of channels [c0, c0 + nc) of one image into `dst`:
// row-major (row, column + pad, lane), `pad` zero columns on both sides, lanes >= nc zero.
template <typename S, typename T>
void pack_rows(const S* src, Strides s, int c0, int nc, int r0, int r1, int W, int pad, T* dst) {
  constexpr int lanes = 64 / sizeof(T);
  const int row_len = (W + 2 * pad) * lanes;
  if constexpr (std::is_same<S, T>::value) {  // contiguous NCHW planes, a whole block: transposed
    if (s.w == 1 && s.h == W && nc == lanes && pack_planes<T>(src + c0 * s.c, s.c, r0, r1, W, pad, dst)) return;
  }
  for (int r = r0; r < r1; ++r) {
    T* row = dst + (size_t)(r - r0) * row_len;
    // Zero only what the copy below does not write: the pad columns and, in the last channel
    // block, the lanes past the last channel.
    std::memset(row, 0, sizeof(T) * (size_t)pad * lanes);
    std::memset(row + (size_t)(pad + W) * lanes, 0, sizeof(T) * (size_t)pad * lanes);
    if (nc < lanes) std::memset(row + (size_t)pad * lanes, 0, sizeof(T) * (size_t)W * lanes);
    T* drow = row + (size_t)pad * lanes;
    const S* srow = src + r * s.h + c0 * s.c;
    if (s.c == 1 && nc == lanes) {  // channels innermost, a whole block: fixed-width copies
      for (int w = 0; w < W; ++w) {
        const S* sp = srow + w * s.w;
        T* dp = drow + w * lanes;
#pragma GCC unroll 16
        for (int l = 0; l < lanes; ++l) dp[l] = static_cast<T>(sp[l]);
      }
    } else if (s.c == 1) {
      for (int w = 0; w < W; ++w) {
        const S* sp = srow + w * s.w;
        T* dp = drow + w * lanes;
        for (int l = 0; l < nc; ++l) dp[l] = static_cast<T>(sp[l]);
      }
    } else {
      for (int l = 0; l < nc; ++l) {
        const S* sp = srow + l * s.c;
        T* dp = drow + l;
        for (int w = 0; w < W; ++w) dp[w * lanes] = static_cast<T>(sp[w * s.w]);
      }
    }
  }
}

// Writes rows [h0, h1) of packed output (row, column, lane) back to channels [c0, c0 + nc).
template <typename S, typename T>
void unpack_rows(const T* src, int c0, int nc, int h0, int h1, int W, S* dst, Strides s) {
  constexpr int lanes = 64 / sizeof(T);
  if constexpr (std::is_same<S, T>::value) {  // contiguous NCHW planes, a whole block: transposed
    if (s.w == 1 && s.h == W && nc == lanes && unpack_planes<T>(src, h0, h1, W, dst + c0 * s.c, s.c)) return;
  }
  for (int h = h0; h < h1; ++h) {
    const T* srow = src + (size_t)(h - h0) * W * lanes;
    S* drow = dst + h * s.h + c0 * s.c;
    if (s.c == 1 && nc == lanes) {
      for (int w = 0; w < W; ++w) {
        S* dp = drow + w * s.w;
        const T* sp = srow + w * lanes;
#pragma GCC unroll 16
        for (int l = 0; l < lanes; ++l) dp[l] = static_cast<S>(sp[l]);
      }
    } else if (s.c == 1) {
      for (int w = 0; w < W; ++w) {
        S* dp = drow + w * s.w;
        const T* sp = srow + w * lanes;
        for (int l = 0; l < nc; ++l) dp[l] = static_cast<S>(sp[l]);
      }
    } else {
      for (int l = 0; l < nc; ++l) {
        S* dp = drow + l * s.c;
        const T* sp = srow + l;
        for (int w = 0; w < W; ++w) dp[w * s.w] = static_cast<S>(sp[w * lanes]);
      }
    }
  }
}

// Asks for the cache lines of one (image, channel block) tile ahead of use, when channels are
// innermost: each pixel's block is then one line, 4 KB from the next at 1024 channels, a stride
// the hardware prefetchers do not follow (a new page per line), so a tile that is not in cache
// (after other work has evicted it) would otherwise arrive one line per DRAM round trip.
template <typename S>
void prefetch_tile(const S* base, Strides s, int c0, int nc, int H, int W) {
  if (s.c != 1) return;  // NCHW-like strides: rows are contiguous, the hardware prefetches them
  const int64_t last = (int64_t)(nc - 1) * (int64_t)sizeof(S);
  for (int h = 0; h < H; ++h)
    for (int w = 0; w < W; ++w) {
      const char* p = reinterpret_cast<const char*>(base + h * s.h + w * s.w + c0);
      __builtin_prefetch(p, 0, 3);
      __builtin_prefetch(p + last, 0, 3);
    }
}

int num_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

// Faults in the pages of the n elements at p (an output about to be overwritten) that are not
// mapped yet, nt threads each taking a contiguous part, by writing one byte into each: 0xFF at the
// page's end (the buffer's, for the last page), the sign and exponent byte of an element
// (little-endian), which it turns into a NaN or a huge negative number, so an element the kernel
// then failed to write would show. Nothing below 1 MB (few faults; the parallel region would cost
// more than it saves), where mincore cannot say which pages are mapped (not Linux, an error), or
// where nearly all are: an output on pages the allocator reused (at batch 8, 1.6 MB, touching
// them all anyway cost ~8% of RepLKNet's stage-4 forward).
template <typename S>
void prefault_output(S* p, int64_t n, int nt) {
#if defined(__linux__)
  const int64_t bytes = n * (int64_t)sizeof(S);
  if (bytes < (1 << 20)) return;
  const int64_t page = sysconf(_SC_PAGESIZE);
  if (page <= 0) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p), first = begin / page * page;
  const int64_t pages = (int64_t)((begin + bytes - first + page - 1) / page);
  std::unique_ptr<unsigned char[]> resident(new unsigned char[pages]);
  if (mincore(reinterpret_cast<void*>(first), begin + bytes - first, resident.get()) != 0) return;
  int64_t missing = 0;
  for (int64_t i = 0; i < pages; ++i) missing += !(resident[i] & 1);
  if (missing * 8 < pages) return;
  volatile unsigned char* base = reinterpret_cast<volatile unsigned char*>(p);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < pages; ++i) {
    if (resident[i] & 1) continue;
    // the last byte of page i that belongs to the buffer
    const int64_t end = std::min<int64_t>((int64_t)(first - begin) + (i + 1) * page, bytes);
    base[end - 1] = 0xFF;
  }
#else
  (void)p, (void)n, (void)nt;
#endif
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The forward of contiguous NCHW x and y plane by plane (forward_planes), where the instruction set
// and shape have that kernel and every weight is finite (its pad columns' zeros multiply them); false
// otherwise, nothing written. Items are planes, in address order, split evenly between the threads.
template <typename T>
bool forward_nchw_planes(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias, bool flip,
                         at::Tensor& y) {
  const int N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int kh = weight.size(2), kw = weight.size(3);
  if (!x.is_contiguous() || !y.is_contiguous() || !planes_direct_applies(W, kh, kw)) return false;
  const size_t taps = (size_t)kh * kw;
  const at::Tensor w_src = weight.contiguous();
  const T* w_p = w_src.data_ptr<T>();
  Scratch<T> wbuf;
  T* wt = wbuf.get((size_t)C * taps);
  bool finite = true;
  for (int c = 0; c < C; ++c)
    for (size_t t = 0; t < taps; ++t) {  // flipped: tap t takes tap taps - 1 - t (rows and columns reversed)
      const T v = w_p[(size_t)c * taps + (flip ? taps - 1 - t : t)];
      wt[(size_t)c * taps + t] = v;
      finite &= std::isfinite(v);
    }
  if (!finite) return false;
  at::Tensor b_src;
  const T* b_p = nullptr;
  if (bias) {
    b_src = bias->reshape({C}).to(x.scalar_type()).contiguous();
    b_p = b_src.data_ptr<T>();
  }
  const int Wp = (int)(ceil_div(W, 16) * 16) + kw - 1;  // whole vectors of up to 16 lanes, the taps' reach
  const T* x_p = x.data_ptr<T>();
  T* y_p = y.data_ptr<T>();
  const int64_t planes = (int64_t)N * C, plane = (int64_t)H * W;
  const T zero = 0;
  const int nt = num_threads();
#pragma omp parallel num_threads(nt)
  {
    // Two buffers: the next plane is copied into one while the other's is computed (see the
    // kernel's copy_plane_k). Each thread takes a contiguous range of planes, in address order.
    const size_t pd_len = (size_t)(H + kh - 1) * Wp;  // (kh / 2 zero rows above and below the image)
    Scratch<T> pbuf;
    T* buf = pbuf.get(2 * pd_len);
    std::memset(buf, 0, sizeof(T) * 2 * pd_len);  // the pad rows and columns; the planes fill the rest
#ifdef _OPENMP
    const int t = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int t = 0, team = 1;
#endif
    const int64_t p0 = planes * t / team, p1 = planes * (t + 1) / team;
    if (p0 < p1) forward_planes<T>(x_p + p0 * plane, buf, nullptr, H, W, kh, kw, nullptr, nullptr, Wp, nullptr);
    for (int64_t p = p0; p < p1; ++p) {
      const int c = (int)(p % C);
      T* cur = buf + (p - p0) % 2 * pd_len;
      T* next = buf + (p - p0 + 1) % 2 * pd_len;
      forward_planes<T>(p + 1 < p1 ? x_p + (p + 1) * plane : nullptr, next, cur, H, W, kh, kw,
                        wt + (size_t)c * taps, b_p ? b_p + c : &zero, Wp, y_p + p * plane);
    }
  }
  return true;
}

template <typename S>
void forward_typed(const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias,
                   bool flip, at::Tensor& y) {
  using T = at::opmath_type<S>;
  constexpr int lanes = 64 / sizeof(T);
  const int N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int kh = weight.size(2), kw = weight.size(3), ph = kh / 2, pw = kw / 2;
  const int ncb = ceil_div(C, lanes);
  if constexpr (std::is_same<S, T>::value) {
    if (forward_nchw_planes<T>(x, weight, bias, flip, y)) return;
  }

  // Weights and bias repacked as (channel block, tap row, tap column, lane) in T, each tap row
  // with kWeightPad zero columns on both sides, channels padded to whole blocks with zeros.
  const int kwp = kw + 2 * kWeightPad;
  const at::Tensor w_src = weight.contiguous();
  const S* w_p = w_src.data_ptr<S>();
  Scratch<T> wbuf, bbuf;
  const size_t wt_block = (size_t)kh * kwp * lanes;
  T* bt_p = bbuf.get(lanes * (size_t)ncb);
  std::memset(bt_p, 0, sizeof(T) * (size_t)ncb * lanes);
  // One channel block's weights into `block`; returns whether they are all finite. On RepLKNet's
  // small maps this is a sizeable part of the call (7x7 maps, 1024 channels: 1.4 MB packed): a
  // whole block of fp32/fp64 weights goes through the instruction set's transposing copy, the
  // rest (a last block short of lanes, half precision, the generic path) one value at a time.
  const size_t taps = (size_t)kh * kw;
  auto pack_weights = [&](int cb, T* block) {
    const int c0 = cb * lanes, nc = std::min(lanes, C - c0);
    const S* src = w_p + (size_t)c0 * taps;
    bool finite = true;
    if constexpr (std::is_same<S, T>::value) {
      if (nc == lanes && pack_weight_block<T>(src, kh, kw, flip, block, &finite)) return finite;
    }
    std::memset(block, 0, sizeof(T) * wt_block);
    for (int i = 0; i < kh; ++i)  // a pixel at a time (the lanes of one tap), not a channel at a time
      for (int j = 0; j < kw; ++j) {  // (stores 64 bytes apart): 49 against 77 us a call, 1024 x 13 x 13
        const S* tap = src + (flip ? (size_t)(kh - 1 - i) * kw + (kw - 1 - j) : (size_t)i * kw + j);
        T* dst = block + ((size_t)i * kwp + kWeightPad + j) * lanes;
        for (int l = 0; l < nc; ++l) {
          dst[l] = static_cast<T>(tap[l * taps]);
          finite &= std::isfinite(dst[l]);
        }
      }
    return finite;
  };
  if (bias) {
    const at::Tensor b_src = bias->reshape({C}).to(x.scalar_type()).contiguous();
    const S* b_p = b_src.data_ptr<S>();
    for (int c = 0; c < C; ++c) bt_p[c] = static_cast<T>(b_p[c]);
  }

  const int nt = num_threads();
  const S* x_p = x.data_ptr<S>();
  S* y_p = y.data_ptr<S>();
  const Strides xs = strides_of(x), ys = strides_of(y);
  const int row_len = (W + 2 * pw) * lanes;

  // bf16 where bf16_pairs_apply: the packed tiles (fp32, bf16 values widened) are paired up as two
  // bf16 in each fp32 lane, weight row i holding tap rows 2i and 2i + 1, tile row r image rows r and
  // r + 1, and the forward multiplies a pair in one instruction (vdpbf16ps).
  constexpr bool kBf16 = std::is_same<S, at::BFloat16>::value;
  const bool pairs = kBf16 && bf16_pairs_apply(W, kw);
  const int npairs = (kh + 1) / 2;
  const size_t wt2_block = (size_t)npairs * kwp * lanes;
  auto pair_weights = [&](const T* block, uint32_t* dst) {  // one channel block's packed weights
    if constexpr (kBf16) pair_in_twos(block, kh, (long)kwp * lanes, dst);
  };
  // Output rows [h0, h1) from a packed tile P of input rows [r0, r1): in pairs where they apply and
  // every value is finite (the pairs multiply the padding's zeros like any value, and 0 * Inf is
  // NaN: see Loop in dwconv_kernel.h), else forward_rows.
  auto forward_tile = [&](const T* P, int r0, int r1, const T* Wt, const uint32_t* Wt2, const T* Bt, int h0,
                          int h1, T* O, bool input_finite, bool weights_finite, Scratch<uint32_t>& p2buf) {
    if constexpr (kBf16) {
      if (pairs && input_finite && weights_finite) {
        // pair row q: image rows r0 - 1 + q and r0 + q, rows outside the tile zero (the first pair
        // row reaches above the image or the tile's first row, the last one below the last row)
        uint32_t* P2 = p2buf.get((size_t)(r1 - r0 + 1) * row_len);
        pair_overlapping(P, r1 - r0, row_len, P2);
        avx512::forward_rows_bf16_pairs(P2, r0, H, W, kh, kw, Wt2, Bt, h0, h1, O);
        return;
      }
    }
    forward_rows<T>(P, r0, H, W, kh, kw, Wt, Bt, h0, h1, O, input_finite, weights_finite);
  };
  // (see forward_direct; x and y of the accumulation type or bf16, whole channel blocks). bf16 only
  // where no small-map kernel would take the shape in fp32: there (7x7 maps, 13x13 kernels) the packed
  // tiles' band loop measured faster than the in-place window (0.24 against 0.31-0.34 ms, batch 8,
  // 1024 channels, Zen 5).
  const bool direct_layout = kDirectStorage<S, T> && xs.c == 1 && ys.c == 1 && C % lanes == 0 &&
                             kw <= kDirectMaxKw && (std::is_same<S, T>::value || !small_direct_applies(W, kw));

  // Small maps (a packed block of weights larger than a packed image tile: RepLKNet's 7x7 maps
  // with 13x13 kernels, 14x14 with 27x27): the weights are the bigger operand, so each item is
  // one channel block over a group of images, its weights packed once into the item's own
  // buffer and kept in L1 across the images, instead of all blocks packed up front and every
  // (image, block) item fetching its block's weights from L2 again.
  // Except where the tensors are read in place by forward_direct, with no small-map kernel for the
  // shape, and there are images enough for every thread to take whole ones (4 each, no row chunks
  // re-reading halos): there an item of all the channel blocks of one image (below) walks memory
  // in address order, where a block's item reads one 64-byte line per pixel of every image. On
  // ConvNeXt-T's stage 4 (768 channels, 7x7 maps and kernels, channels_last fp32) that took the
  // forward from 24 to 14-18 us an image at batch 8-64 (AVX-512; AVX2 23 against 33 at batch 64,
  // level at 8); at batch 1-2 the blocks' items stay faster (31 against 54 us at batch 1).
  const bool address_order = direct_layout && N >= 4 * nt && !small_direct_applies(W, kw);
  if (wt_block > (size_t)H * row_len && ncb >= 2 * nt && !address_order) {
    // Every item writes a line of every output pixel, so the first item would take the page
    // faults of a freshly mapped y one after another while the second waits on the same pages:
    // fault those not mapped yet in first, each thread its own contiguous part. 314 against 391
    // us an image at 512 channels, 14x14 maps, 27x27 kernels, batch 64, y on new pages each call.
    prefault_output(y_p, y.numel(), nt);
    const int ngroups = (int)std::min<int64_t>(N, std::max<int64_t>(1, ceil_div(4 * nt, ncb)));
    const int imgs_per_group = ceil_div(N, ngroups);
#pragma omp parallel num_threads(nt)
    {
      Scratch<T> wbuf_item, pbuf, obuf;
      Scratch<uint32_t> w2buf_item, p2buf;
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < (int64_t)ncb * ngroups; ++it) {
        const int cb = it / ngroups, g = it % ngroups;
        const int n0 = g * imgs_per_group, n1 = std::min(N, n0 + imgs_per_group);
        if (n0 >= n1) continue;
        const int c0 = cb * lanes, nc = std::min(lanes, C - c0);
        T* Wt = wbuf_item.get(wt_block);
        const bool weights_finite = pack_weights(cb, Wt);
        uint32_t* Wt2 = pairs ? w2buf_item.get(wt2_block) : nullptr;
        if (pairs) pair_weights(Wt, Wt2);
        T* P = pbuf.get((size_t)H * row_len);
        T* O = obuf.get((size_t)H * W * lanes);
        for (int n = n0; n < n1; ++n) {
          // The next image's input tile while this one computes (see prefetch_tile). Not its
          // output tile: asking for those lines ahead measured 10-30% slower when the data was
          // not in cache (it competes with the input's fills), and no faster when it was.
          if (n + 1 < n1) prefetch_tile(x_p + (n + 1) * xs.n, xs, c0, nc, H, W);
          // Channels innermost, a whole block, no conversion: the small-map kernel (if the ISA and
          // shape have one) reads x and writes y in place, with no tile packed or unpacked.
          if constexpr (std::is_same<S, T>::value) {
            if (xs.c == 1 && ys.c == 1 && nc == lanes &&
                forward_small_direct<T>(x_p + n * xs.n + c0, xs.h, xs.w, H, W, kh, kw, Wt,
                                        bt_p + (size_t)cb * lanes, y_p + n * ys.n + c0, ys.h, ys.w))
              continue;
          }
          if constexpr (kDirectStorage<S, T>) {
            if (direct_layout && weights_finite) {
              forward_direct(x_p + n * xs.n + c0, xs.h, xs.w, H, W, kh, kw, Wt, 0, bt_p + (size_t)cb * lanes,
                             1, 0, H, y_p + n * ys.n + c0, ys.h, ys.w);
              continue;
            }
          }
          pack_rows<S, T>(x_p + n * xs.n, xs, c0, nc, 0, H, W, pw, P);
          const bool input_finite = all_finite<T>(P, (long)H * row_len);
          forward_tile(P, 0, H, Wt, Wt2, bt_p + (size_t)cb * lanes, 0, H, O, input_finite, weights_finite, p2buf);
          unpack_rows<S, T>(O, c0, nc, 0, H, W, y_p + n * ys.n, ys);
        }
      }
    }
    return;
  }

  T* wt_p = wbuf.get((size_t)ncb * wt_block);
  Scratch<uint32_t> w2buf;
  uint32_t* wt2_p = pairs ? w2buf.get((size_t)ncb * wt2_block) : nullptr;
  std::unique_ptr<bool[]> weights_finite(new bool[ncb]);
  // Split rows only as much as needed to keep every thread busy: each chunk re-reads a halo.
  const int64_t base_items = (int64_t)N * ncb;
  const int nhc = (int)std::min<int64_t>(H, std::max<int64_t>(1, ceil_div(4 * nt, base_items)));
  const int rows_per_chunk = ceil_div(H, nhc);
  const int64_t items = base_items * nhc;

#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (int cb = 0; cb < ncb; ++cb) {
      weights_finite[cb] = pack_weights(cb, wt_p + (size_t)cb * wt_block);
      if (pairs) pair_weights(wt_p + (size_t)cb * wt_block, wt2_p + (size_t)cb * wt2_block);
    }
    // (the loop's implicit barrier: every block's weights are packed before any is used)
    // Channels innermost in x and y, whole channel blocks, no conversion, finite weights and a
    // small kernel: read and written in place (see the kernel's forward_direct), an item being
    // a chunk of one image's rows over all channel blocks, so that it walks the tensors in
    // address order. Every thread reaches the same decision (weights_finite is complete here).
    bool direct = false;
    if constexpr (kDirectStorage<S, T>) {
      direct = direct_layout;
      for (int cb = 0; direct && cb < ncb; ++cb) direct = weights_finite[cb];
    }
    if (direct) {
      const int nhd = (int)std::min<int64_t>(H, std::max<int64_t>(1, ceil_div(4 * nt, N)));
      const int rows_d = ceil_div(H, nhd);
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < (int64_t)N * nhd; ++it) {
        const int n = it / nhd, h0 = (it % nhd) * rows_d, h1 = std::min(H, h0 + rows_d);
        if constexpr (kDirectStorage<S, T>)
          if (h0 < h1)
            forward_direct(x_p + n * xs.n, xs.h, xs.w, H, W, kh, kw, wt_p, wt_block, bt_p, ncb, h0, h1,
                           y_p + n * ys.n, ys.h, ys.w);
      }
    } else {
      Scratch<T> pbuf, obuf;
      Scratch<uint32_t> p2buf;
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < items; ++it) {
        const int hc = it % nhc;
        const int cb = (it / nhc) % ncb;
        const int n = it / ((int64_t)nhc * ncb);
        const int h0 = hc * rows_per_chunk, h1 = std::min(H, h0 + rows_per_chunk);
        if (h0 >= h1) continue;
        const int r0 = std::max(0, h0 - ph), r1 = std::min(H, h1 + ph);
        const int c0 = cb * lanes, nc = std::min(lanes, C - c0);
        T* P = pbuf.get((size_t)(r1 - r0) * row_len);
        T* O = obuf.get((size_t)(h1 - h0) * W * lanes);
        pack_rows<S, T>(x_p + n * xs.n, xs, c0, nc, r0, r1, W, pw, P);
        const bool input_finite = all_finite<T>(P, (long)(r1 - r0) * row_len);
        forward_tile(P, r0, r1, wt_p + (size_t)cb * wt_block, pairs ? wt2_p + (size_t)cb * wt2_block : nullptr,
                     bt_p + (size_t)cb * lanes, h0, h1, O, input_finite, weights_finite[cb], p2buf);
        unpack_rows<S, T>(O, c0, nc, h0, h1, W, y_p + n * ys.n, ys);
      }
    }
  }
}

template <typename S>
at::Tensor weight_grad_typed(const at::Tensor& grad_out, const at::Tensor& x, int kh, int kw) {
  using T = at::opmath_type<S>;
  constexpr int lanes = 64 / sizeof(T);
  const int N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int pw = kw / 2;
  const int ncb = ceil_div(C, lanes);
  const int nt = num_threads();

  // Items are (channel block, group of images, group of tap rows); partial sums per image
  // group are reduced afterwards in a fixed order, so results do not depend on scheduling.
  int ngroups = (int)std::min<int64_t>(N, std::max<int64_t>(1, ceil_div(2 * nt, ncb)));
  int nisplit = (int)std::min<int64_t>(kh, std::max<int64_t>(1, ceil_div(2 * nt, (int64_t)ncb * ngroups)));
  const int imgs_per_group = ceil_div(N, ngroups);
  const int rows_per_split = ceil_div(kh, nisplit);
  const int64_t items = (int64_t)ncb * ngroups * nisplit;
  const size_t gw_block = (size_t)kh * kw * lanes;

  // The partial sums, in a buffer the calling thread keeps from call to call (allocated per call,
  // its page faults cost 0.7 ms at 512 channels x 27x27 taps; ngroups x ncb <= 2 threads + ncb blocks
  // of kh x kw pixels: 1.5 MB there), zeroed by the items, each its own tap rows.
  static thread_local Scratch<T> partial_buf;
  T* partial_p = partial_buf.get((size_t)ngroups * ncb * gw_block);
  const S* x_p = x.data_ptr<S>();
  const S* g_p = grad_out.data_ptr<S>();
  const Strides xs = strides_of(x), gs = strides_of(grad_out);
  const int prow_len = (W + 2 * pw) * lanes;
  const int grow_len = (W + 2 * kGradPad) * lanes;
  // bf16 where bf16_pairs_apply: the packed tiles paired up as in the forward, the gradient's rows
  // 2m and 2m + 1 in pair row m, two image rows a multiply-add (weight_grad_bf16_pairs)
  constexpr bool kBf16 = std::is_same<S, at::BFloat16>::value;
  const bool pairs = kBf16 && bf16_pairs_apply(W, kw);

#pragma omp parallel num_threads(nt)
  {
    Scratch<T> pbuf, gbuf;
    Scratch<uint32_t> x2buf, g2buf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int is = it % nisplit;
      const int g = (it / nisplit) % ngroups;
      const int cb = it / ((int64_t)nisplit * ngroups);
      const int i0 = is * rows_per_split, i1 = std::min(kh, i0 + rows_per_split);
      const int n0 = g * imgs_per_group, n1 = std::min(N, n0 + imgs_per_group);
      if (i0 >= i1) continue;
      T* GW = partial_p + ((size_t)g * ncb + cb) * gw_block;
      std::memset(GW + (size_t)i0 * kw * lanes, 0, sizeof(T) * (size_t)(i1 - i0) * kw * lanes);
      if (n0 >= n1) continue;  // (an empty group: its zeros still go into the sum)
      const int c0 = cb * lanes, nc = std::min(lanes, C - c0);
      for (int n = n0; n < n1; ++n) {
        if (n + 1 < n1) {  // the next image's tiles while this one computes
          prefetch_tile(x_p + (n + 1) * xs.n, xs, c0, nc, H, W);
          prefetch_tile(g_p + (n + 1) * gs.n, gs, c0, nc, H, W);
        }
        if constexpr (kDirectStorage<S, T>) {  // channels innermost, a whole block: in place
          if (xs.c == 1 && gs.c == 1 && nc == lanes &&
              weight_grad_direct(x_p + n * xs.n + c0, xs.h, xs.w, g_p + n * gs.n + c0, gs.h, gs.w, H, W, kh, kw,
                                 i0, i1, GW))
            continue;
        }
        T* P = pbuf.get((size_t)H * prow_len);
        T* G = gbuf.get((size_t)H * grow_len);
        pack_rows<S, T>(x_p + n * xs.n, xs, c0, nc, 0, H, W, pw, P);
        pack_rows<S, T>(g_p + n * gs.n, gs, c0, nc, 0, H, W, kGradPad, G);
        const bool input_finite = all_finite<T>(P, (long)H * prow_len);
        const bool grad_finite = all_finite<T>(G, (long)H * grow_len);
        if constexpr (kBf16) {
          if (pairs && input_finite && grad_finite) {  // (finite: see forward_tile)
            uint32_t* X2 = x2buf.get((size_t)(H + 1) * prow_len);
            pair_overlapping(P, H, prow_len, X2);  // image rows q - 1 and q
            uint32_t* G2 = g2buf.get((size_t)((H + 1) / 2) * grow_len);
            pair_in_twos(G, H, grow_len, G2);  // gradient rows 2m and 2m + 1
            avx512::weight_grad_bf16_pairs(X2, G2, H, W, kh, kw, i0, i1, GW);
            continue;
          }
        }
        weight_grad<T>(P, G, H, W, kh, kw, i0, i1, GW, input_finite, grad_finite);
      }
    }
  }
  // (ngroups, ncb, kh, kw, lanes) summed over groups in order -> (C, 1, kh, kw), a channel block
  // per thread at a time: whole blocks of fp32/fp64 through the instruction set's transposing sum,
  // the rest one value at a time (done serially, this took longer than the convolution on
  // RepLKNet's small maps at batch 1: 1 ms of 1.04 with 512 channels and 27x27 taps on a 1x1 map).
  at::Tensor gw = at::empty({C, 1, kh, kw}, x.options());
  S* gw_p = gw.data_ptr<S>();
  const int taps = kh * kw;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int cb = 0; cb < ncb; ++cb) {
    const int c0 = cb * lanes, nc = std::min(lanes, C - c0);
    const T* block = partial_p + (size_t)cb * gw_block;
    if constexpr (std::is_same<S, T>::value) {
      const long group_stride = (long)ncb * gw_block;
      if (nc == lanes && sum_weight_grad_block<T>(block, group_stride, ngroups, taps, gw_p + (size_t)c0 * taps))
        continue;
    }
    for (int l = 0; l < nc; ++l)
      for (int t = 0; t < taps; ++t) {
        T sum = 0;
        for (int g = 0; g < ngroups; ++g) sum += block[(size_t)g * ncb * gw_block + (size_t)t * lanes + l];
        gw_p[(size_t)(c0 + l) * taps + t] = static_cast<S>(sum);
      }
  }
  return gw;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "lkfast cpu: expected 4-D x and weight");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "lkfast cpu: tensors must be on CPU");
  TORCH_CHECK(weight.size(0) == x.size(1) && weight.size(1) == 1,
              "lkfast cpu: weight must be (C, 1, kh, kw) with C = x.size(1)");
  TORCH_CHECK(weight.size(2) % 2 == 1 && weight.size(3) % 2 == 1, "lkfast cpu: odd kernel sizes only");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "lkfast cpu: x and weight dtypes differ");
}

}  // namespace

at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   bool flip) {
  check_inputs(x, weight);
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const bool has_bias = bias && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->numel() == x.size(1), "lkfast cpu: bias must have C = ", x.size(1), " elements");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lkfast_dwconv_forward", [&] {
    forward_typed<scalar_t>(x, weight, has_bias ? &*bias : nullptr, flip, y);
  });
  return y;
}

at::Tensor weight_grad(const at::Tensor& grad_out, const at::Tensor& x, int64_t kh, int64_t kw) {
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "lkfast cpu: grad_out and x shapes differ");
  TORCH_CHECK(kh % 2 == 1 && kw % 2 == 1, "lkfast cpu: odd kernel sizes only");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "lkfast cpu: grad_out and x dtypes differ");
  if (x.numel() == 0) return at::zeros({x.size(1), 1, kh, kw}, x.options());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lkfast_dwconv_weight_grad", [&] {
    out = weight_grad_typed<scalar_t>(grad_out, x, (int)kh, (int)kw);
  });
  return out;
}

std::string isa_note() {
  if (cpu_has_avx512bf16() && !bf16_pairs_built() && active_isa() == Isa::kAvx512)
    return "this CPU has AVX512-BF16, but lkfast was built with an assembler that cannot encode "
           "vdpbf16ps (binutils older than 2.32), so bf16 runs on the AVX-512 FMA path; reinstall "
           "with binutils >= 2.32 for the faster bf16 kernels";
  return "";
}

std::string isa_name() {
  switch (active_isa()) {
    case Isa::kAvx512Bf16:
      return "avx512bf16";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

}  // namespace cpu
}  // namespace lkfast
