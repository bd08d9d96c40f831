// CUDA kernels of lkfast's depthwise convolution: stride 1, zero "same" padding, odd kernels of any
// size (designed for 7..63), any input strides (NCHW, channels_last, or views).
//
// Every pass does only the multiply-adds that meet the image (none on padding, as the CPU kernels):
// a thread clips its kernel rows to its output row, and each column of its register block to the
// taps (or, in the weight gradient, each tap to the pixels) that land inside the image. What all
// columns of the block share runs blocked; the ragged rest at the image edges runs one by one.
// RepLKNet-31B's 27x27 kernels on 14x14 maps do 1x the in-image work, not the ~5x of whole tiles.
//
// NCHW (any strides that are not channels_last):
// Forward (also the input gradient: the same convolution with the kernel rotated by 180 degrees).
//   One block computes a TH x TW output tile of one (image, channel). It stages the kernel
//   (kh x kwp, the width padded with zero taps to a multiple of 4) and the input tile with its halo
//   ((TH + kh - 1) x pitch) in shared memory, converted to the accumulation type. Each thread owns
//   RB rows x RW consecutive columns of outputs (rows strided by TYN so that the lanes of a quarter
//   warp hit different banks); for the 4-tap groups every column of its block takes it walks the
//   kernel row 4 taps at a time: one 16-byte load of 4 new inputs and one broadcast load of 4
//   weights feed 4 x RW FMAs, with a sliding register window carrying the overlap.
// Weight gradient (split-K, no atomics).
//   dW[c, i, j] = sum over (n, h, w) of dY[n, c, h, w] * X[n, c, h + i - ph, w + j - pw]. Block
//   (c, s) reduces the s-th slice of the (image, 16 x 16 tile) items into registers: each thread
//   owns up to MAXG groups of 4 adjacent taps of one kernel row, and per tile row slides a window
//   of inputs against 4 broadcast dY values. Small kernels (<= 64 groups) give each group 2..8
//   threads that take alternate tile rows, summed in shared memory at the end. Each block writes its partial sums once into an
//   (S, C, kh, kw) workspace in the accumulation type; one sum over S finishes (deterministic).
// channels_last: see forward_nhwc_kernel and weight_grad_nhwc_kernel (threads along channels,
//   16-byte loads and stores; a scalar variant where the tensors do not allow them).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "cuda/dwconv_cuda_limits.h"

namespace lkfast {
namespace cuda {
namespace {

// fp16 / bf16 / fp32 accumulate in fp32; fp64 in fp64.
template <typename T>
struct Acc { using type = float; };
template <>
struct Acc<double> { using type = double; };
// The host-side sizing (dwconv_cuda_limits.h) counts shared memory in accumulator_bytes.
static_assert(sizeof(Acc<double>::type) == accumulator_bytes(sizeof(double)) &&
              sizeof(Acc<float>::type) == accumulator_bytes(sizeof(float)) &&
              sizeof(Acc<at::Half>::type) == accumulator_bytes(sizeof(at::Half)) &&
              sizeof(Acc<at::BFloat16>::type) == accumulator_bytes(sizeof(at::BFloat16)),
              "accumulator sizes differ from dwconv_cuda_limits.h");

// The dtype as Python names it (torch.float64 -> "float64"), for the refusals' messages.
const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return c10::toString(t);
  }
}

__device__ __forceinline__ void load4(const float* p, float* v) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}
__device__ __forceinline__ void load4(const double* p, double* v) {
  const double2 a = *reinterpret_cast<const double2*>(p);
  const double2 b = *reinterpret_cast<const double2*>(p + 2);
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}

// Not ATen/cuda/CUDAContext.h: it pulls in cuSPARSE/cuBLAS headers, which a bare CUDA toolkit
// (nvcc + runtime, as on the CI machine) lacks.
int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

struct Geometry {
  int N, C, H, W;
  int kh, kw, kwp, ph, pw;
  int pitch;             // shared-memory row pitch of the input tile, elements
  int64_t xs[4], ys[4];  // element strides of the input and of the output (or dY)
};

// Stages the input tile whose top-left output is (h0, w0) with its halo: s[sr * pitch + sc] =
// x[h0 + sr - ph, w0 + sc - pw] for sc < cols inside the image, zero elsewhere (padding, and the
// columns past the kernel's real width that only zero taps read). A warp per row, lanes along the
// row: coalesced for NCHW, and no division per element (it cost as much as the FMAs at k = 7).
template <int THREADS, typename T, typename A>
__device__ __forceinline__ void load_halo(A* s, const T* xc, Geometry g, int h0, int w0, int rows, int cols) {
  static_assert(THREADS % 32 == 0, "whole warps");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int sr = warp; sr < rows; sr += THREADS / 32) {
    const int ih = h0 + sr - g.ph;
    const bool row_in = ih >= 0 && ih < g.H;
    const T* xrow = xc + static_cast<int64_t>(ih) * g.xs[2];
    A* srow = s + sr * g.pitch;
    for (int sc = lane; sc < g.pitch; sc += 32) {
      const int iw = w0 + sc - g.pw;
      srow[sc] = (row_in && sc < cols && iw >= 0 && iw < g.W) ? static_cast<A>(xrow[iw * g.xs[3]]) : A(0);
    }
  }
}

// -------------------------------------------------------------------------------------------------
// Forward

template <typename T, int RB, int RW, int TXN, int TYN>
__global__ void __launch_bounds__(TXN * TYN)
forward_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
               T* __restrict__ y, Geometry g, bool flip) {
  using A = typename Acc<T>::type;
  constexpr int TW = TXN * RW, TH = TYN * RB, THREADS = TXN * TYN;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* s_w = reinterpret_cast<A*>(smem_raw);  // kh x kwp taps; kwp % 4 == 0 keeps s_in aligned
  A* s_in = s_w + g.kh * g.kwp;             // (TH + kh - 1) x pitch

  const int c = blockIdx.x;  // channel fastest: neighbouring blocks share channels_last sectors
  const int tiles_w = (g.W + TW - 1) / TW;
  const int h0 = (blockIdx.y / tiles_w) * TH, w0 = (blockIdx.y % tiles_w) * TW;
  const int n = blockIdx.z;
  const int tid = threadIdx.x;

  const T* wc = weight + static_cast<int64_t>(c) * g.kh * g.kw;
  for (int i = tid; i < g.kh * g.kwp; i += THREADS) {
    const int r = i / g.kwp, j = i % g.kwp;
    A v = A(0);
    if (j < g.kw) v = static_cast<A>(flip ? wc[(g.kh - 1 - r) * g.kw + (g.kw - 1 - j)] : wc[r * g.kw + j]);
    s_w[i] = v;
  }
  const T* xc = x + n * g.xs[0] + c * g.xs[1];
  load_halo<THREADS>(s_in, xc, g, h0, w0, TH + g.kh - 1, TW + g.kw - 1);
  __syncthreads();

  // Only taps that meet the image, per thread: output row oy takes kernel rows [r_lo, r_hi); output
  // column ox = ox0 + t takes taps [jl_t, jh_t) (empty past the map). The 4-tap groups [ja, jb) that
  // every column of the register block takes run blocked (16-byte loads, sliding window); the rest
  // of each column's taps run one by one (at most 3 + RW - 1 a side).
  const int tx = tid % TXN, ty = tid / TXN;
  const int ox0 = w0 + tx * RW;
  // Column t of the register block takes taps [jl(t), jh(t)); columns past the map take none.
  const int left = g.pw - ox0, right = g.W + g.pw - ox0, cols_in = g.W - ox0;
  auto jl = [&](int t) { return max(0, left - t); };
  auto jh = [&](int t) { return t < cols_in ? min(g.kw, right - t) : jl(t); };
  int ja = (jl(0) + 3) & ~3, jb = jh(RW - 1) & ~3;  // jl(0) = max over t, jh(RW - 1) = min over t
  if (jb <= ja) ja = jb = g.kw;                      // no blocked part: every tap one by one
  // Row q of the register block takes kernel rows [ph - oy, H + ph - oy) (empty past the map).
  const int oy0 = h0 + ty;
  const int r_first = max(0, g.ph - oy0 - (RB - 1) * TYN), r_end = min(g.kh, g.H + g.ph - oy0);
  A acc[RB][RW];
#pragma unroll
  for (int q = 0; q < RB; ++q)
#pragma unroll
    for (int t = 0; t < RW; ++t) acc[q][t] = A(0);

  for (int r = r_first; r < r_end; ++r) {
    const A* wrow = s_w + r * g.kwp;
#pragma unroll
    for (int q = 0; q < RB; ++q) {
      const int iy = oy0 + q * TYN + r - g.ph;  // input row
      if (oy0 + q * TYN >= g.H || iy < 0 || iy >= g.H) continue;
      const A* irow = s_in + (ty + q * TYN + r) * g.pitch + tx * RW;
      if (ja < jb) {
        A win[RW + 4];
#pragma unroll
        for (int t = 0; t < RW; t += 4) load4(irow + ja + t, win + t);
        for (int j4 = ja; j4 < jb; j4 += 4) {
          A wv[4];
          load4(irow + j4 + RW, win + RW);
          load4(wrow + j4, wv);
#pragma unroll
          for (int jj = 0; jj < 4; ++jj)
#pragma unroll
            for (int t = 0; t < RW; ++t) acc[q][t] += win[t + jj] * wv[jj];
#pragma unroll
          for (int t = 0; t < RW; ++t) win[t] = win[t + 4];
        }
      }
#pragma unroll
      for (int t = 0; t < RW; ++t) {
        for (int j = jl(t), end = jh(t); j < end; ++j) {
          if (j == ja && (j = jb) >= end) break;  // (jl(t) <= ja and jb <= jh(t)) skip the blocked taps
          acc[q][t] += irow[t + j] * wrow[j];
        }
      }
    }
  }

  const A b = bias != nullptr ? static_cast<A>(bias[c]) : A(0);
  T* yc = y + n * g.ys[0] + c * g.ys[1];
#pragma unroll
  for (int q = 0; q < RB; ++q) {
    const int oy = h0 + ty + q * TYN;
    if (oy >= g.H) continue;
#pragma unroll
    for (int t = 0; t < RW; ++t) {
      const int ox = w0 + tx * RW + t;
      if (ox < g.W) yc[oy * g.ys[2] + ox * g.ys[3]] = static_cast<T>(acc[q][t] + b);
    }
  }
}

// Launches the forward kernel of tiling TILING (kSmallTiles or kWideTiles: dwconv_cuda_limits.h
// sizes its shared memory and grid, and says when it cannot launch).
template <typename T, const ForwardTiling& TILING>
void launch_forward(const at::Tensor& x, const at::Tensor& w, const T* bias, at::Tensor& y, Geometry g,
                    bool flip) {
  constexpr ForwardTiling t = TILING;
  g.pitch = smem_pitch(t.tile_w(), g.kwp, t.rw);
  const int64_t smem = forward_smem_bytes(t, g.kh, g.kw, accumulator_bytes(sizeof(T)));
  auto kernel = forward_kernel<T, t.rb, t.rw, t.txn, t.tyn>;
  const std::string too_much = smem_refusal("NCHW forward", smem, g.kh, g.kw, dtype_name(x.scalar_type()),
                                            device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  TORCH_CHECK(too_much.empty(), "lkfast cuda: ", too_much, " (use backend='torch' or 'triton')");
  if (smem > kDefaultSmemPerBlock) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const int64_t tiles = ceil_div(g.H, t.tile_h()) * ceil_div(g.W, t.tile_w());
  const std::string too_many = tiles_refusal("NCHW forward", tiles, g.H, g.W);
  TORCH_CHECK(too_many.empty(), "lkfast cuda: ", too_many);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  for (int n0 = 0; n0 < g.N; n0 += kMaxGridYZ) {  // gridDim.z limit
    const int nb = std::min<int64_t>(g.N - n0, kMaxGridYZ);
    dim3 grid(g.C, static_cast<unsigned>(tiles), nb);
    kernel<<<grid, t.threads(), smem, stream>>>(xp + n0 * g.xs[0], w.data_ptr<T>(), bias, yp + n0 * g.ys[0], g, flip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// -------------------------------------------------------------------------------------------------
// Weight gradient

// (kGradTile, kGradThreads, kGradMaxGroups: dwconv_cuda_limits.h)
// ptxas (CUDA 13.0, sm_90) keeps this kernel at 56-64 registers and spills 12 bytes: three per-group
// values hoisted out of the item loop (SASS: three STL before it, one LDL per group per item, next
// to the group's 16 x 16 x 4 FMAs). Removing them would take registers that cost occupancy; left
// as is until a GPU measures otherwise. (tests/test_cuda.py reads every kernel's stack off the build
// with cuobjdump and fails on any spill beyond the ones it lists.)

template <typename T, int TH, int TW, int MAXG>
__global__ void __launch_bounds__(kGradThreads)
weight_grad_kernel(const T* __restrict__ go, const T* __restrict__ x, typename Acc<T>::type* __restrict__ ws,
                   Geometry g, int items_per_split, int group_offset, int phases) {
  using A = typename Acc<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* s_go = reinterpret_cast<A*>(smem_raw);  // TH x TW
  A* s_x = s_go + TH * TW;                   // (TH + kh - 1) x pitch

  const int c = blockIdx.x, split = blockIdx.y, tid = threadIdx.x;
  const int tiles_w = (g.W + TW - 1) / TW, tiles = ((g.H + TH - 1) / TH) * tiles_w;
  const int items = g.N * tiles;
  const int first = split * items_per_split, last = min(items, first + items_per_split);
  const int ngw = g.kwp / 4, groups = g.kh * ngw;
  const int rows = TH + g.kh - 1, cols = TW + g.kw - 1;

  A acc[MAXG][4];
#pragma unroll
  for (int k = 0; k < MAXG; ++k)
#pragma unroll
    for (int t = 0; t < 4; ++t) acc[k][t] = A(0);

  for (int item = first; item < last; ++item) {
    const int n = item / tiles, tile = item % tiles;
    const int h0 = (tile / tiles_w) * TH, w0 = (tile % tiles_w) * TW;
    const T* goc = go + n * g.ys[0] + c * g.ys[1];
    const T* xc = x + n * g.xs[0] + c * g.xs[1];
    __syncthreads();  // the previous item's tiles are no longer read
    for (int i = tid; i < TH * TW; i += kGradThreads) {
      const int oh = h0 + i / TW, ow = w0 + i % TW;
      s_go[i] = (oh < g.H && ow < g.W) ? static_cast<A>(goc[oh * g.ys[2] + ow * g.ys[3]]) : A(0);
    }
    load_halo<kGradThreads>(s_x, xc, g, h0, w0, rows, cols);
    __syncthreads();

    const int h_valid = min(TH, g.H - h0), w_valid = min(TW, g.W - w0);
#pragma unroll
    for (int k = 0; k < MAXG; ++k) {
      const int unit = tid + k * kGradThreads;
      const int group = group_offset + unit / phases, phase = unit % phases;
      if (group >= groups) continue;
      const int i = group / ngw, j0 = (group % ngw) * 4;
      // Only products that meet the image: tile rows [h_lo, h_hi) for kernel row i; for tap
      // j0 + t, tile columns [wl_t, wh_t) (empty for the zero taps past kw). The 4-column groups
      // [wa, wb) that all 4 taps take run blocked; the rest one by one.
      const int h_lo = max(0, g.ph - i - h0), h_hi = min(h_valid, g.H + g.ph - i - h0);
      const int left = g.pw - j0 - w0, right = g.W + g.pw - j0 - w0, taps_in = g.kw - j0;
      auto wl = [&](int t) { return max(0, left - t); };
      auto wh = [&](int t) { return t < taps_in ? min(w_valid, right - t) : wl(t); };
      int wa = (wl(0) + 3) & ~3, wb = wh(3) & ~3;
      if (wb <= wa) wa = wb = TW;
      for (int h = h_lo + ((phase - h_lo) & (phases - 1)); h < h_hi; h += phases) {  // h % phases == phase
        const A* xrow = s_x + (h + i) * g.pitch + j0;
        const A* grow = s_go + h * TW;
        if (wa < wb) {
          A win[8];
          load4(xrow + wa, win);
          for (int w = wa; w < wb; w += 4) {
            A gv[4];
            load4(xrow + w + 4, win + 4);
            load4(grow + w, gv);
#pragma unroll
            for (int ww = 0; ww < 4; ++ww)
#pragma unroll
              for (int t = 0; t < 4; ++t) acc[k][t] += gv[ww] * win[ww + t];
#pragma unroll
            for (int t = 0; t < 4; ++t) win[t] = win[t + 4];
          }
        }
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          for (int w = wl(t), end = wh(t); w < end; ++w) {
            if (w == wa && (w = wb) >= end) break;  // (wl(t) <= wa and wb <= wh(t)) skip the blocked pixels
            acc[k][t] += grow[w] * xrow[w + t];
          }
        }
      }
    }
  }

  A* out = ws + (static_cast<int64_t>(split) * g.C + c) * g.kh * g.kw;
  if (phases > 1) {  // few groups (small kernels): sum the phases' partial sums in shared memory
    __syncthreads();
    A* partial = s_go;  // kGradThreads x 4 fits: TH * TW + rows * pitch >= 256 + 16 * 20
#pragma unroll
    for (int t = 0; t < 4; ++t) partial[tid * 4 + t] = acc[0][t];
    __syncthreads();
    const int group = tid / phases;
    if (tid % phases != 0 || group >= groups) return;
    const int i = group / ngw, j0 = (group % ngw) * 4;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      A sum = A(0);
      for (int p = 0; p < phases; ++p) sum += partial[(tid + p) * 4 + t];
      if (j0 + t < g.kw) out[i * g.kw + j0 + t] = sum;
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < MAXG; ++k) {
    const int group = group_offset + tid + k * kGradThreads;
    if (group >= groups) continue;
    const int i = group / ngw, j0 = (group % ngw) * 4;
#pragma unroll
    for (int t = 0; t < 4; ++t)
      if (j0 + t < g.kw) out[i * g.kw + j0 + t] = acc[k][t];
  }
}

// -------------------------------------------------------------------------------------------------
// channels_last (NHWC): channels are the contiguous axis, so a thread owns V consecutive channels
// (V = 16 bytes / element size: one 16-byte load or store each, or V = 1 where the tensors are not
// 16-byte aligned, C % V != 0 or the strides are not channels_last) and 8 channel lanes side by
// side cover 8 * V consecutive channels (32 fp32, 64 fp16/bf16, 16 fp64, 8 on the scalar path): the
// 8 lanes of a warp read 128 contiguous bytes per pixel. No shared memory; neighbouring threads'
// reuse of inputs goes through L1. The kernel taps are read as (kh, kw, C) (transposed, and rotated
// for the input gradient, on the host) so that weights load 16 bytes at a time too.

// (kNhwcLanes channel lanes per block, kNhwcThreads: dwconv_cuda_limits.h)

// 16 bytes as V = 16 / sizeof(T) values of the accumulation type and back, in registers (no local
// array to reinterpret: that would go through the stack).
__device__ __forceinline__ void unpack16(uint4 u, float* v) {
  v[0] = __uint_as_float(u.x); v[1] = __uint_as_float(u.y); v[2] = __uint_as_float(u.z); v[3] = __uint_as_float(u.w);
}
__device__ __forceinline__ uint4 pack16(const float* v, float) {
  return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
}
__device__ __forceinline__ void unpack16(uint4 u, double* v) {
  v[0] = __hiloint2double(static_cast<int>(u.y), static_cast<int>(u.x));
  v[1] = __hiloint2double(static_cast<int>(u.w), static_cast<int>(u.z));
}
__device__ __forceinline__ uint4 pack16(const double* v, double) {
  return make_uint4(static_cast<unsigned>(__double2loint(v[0])), static_cast<unsigned>(__double2hiint(v[0])),
                    static_cast<unsigned>(__double2loint(v[1])), static_cast<unsigned>(__double2hiint(v[1])));
}
// fp16 / bf16: 8 values, two per 32-bit word (low half first), through c10's conversions.
template <typename H>
__device__ __forceinline__ void unpack16_half(uint4 u, float* v) {
  const unsigned words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[2 * k] = static_cast<float>(H(static_cast<uint16_t>(words[k] & 0xffffu), H::from_bits()));
    v[2 * k + 1] = static_cast<float>(H(static_cast<uint16_t>(words[k] >> 16), H::from_bits()));
  }
}
template <typename H>
__device__ __forceinline__ uint4 pack16_half(const float* v) {
  unsigned words[4];
#pragma unroll
  for (int k = 0; k < 4; ++k)
    words[k] = static_cast<unsigned>(H(v[2 * k]).x) | (static_cast<unsigned>(H(v[2 * k + 1]).x) << 16);
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// V consecutive elements as the accumulation type: one 16-byte load when V * sizeof(T) == 16.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, typename Acc<T>::type* v) {
  if constexpr (V * sizeof(T) == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    if constexpr (sizeof(T) == 2) {
      unpack16_half<T>(u, v);
    } else {
      unpack16(u, v);
    }
  } else {
    static_assert(V == 1, "V is 1 or 16 bytes' worth");
    v[0] = static_cast<typename Acc<T>::type>(*p);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const typename Acc<T>::type* v) {
  if constexpr (V * sizeof(T) == 16) {
    if constexpr (sizeof(T) == 2) {
      *reinterpret_cast<uint4*>(p) = pack16_half<T>(v);
    } else {
      *reinterpret_cast<uint4*>(p) = pack16(v, T());
    }
  } else {
    *p = static_cast<T>(v[0]);
  }
}

// acc[v] += a[v] * b[v] for V consecutive elements at a and b.
template <typename T, int V>
__device__ __forceinline__ void nhwc_fma(typename Acc<T>::type* acc, const T* a, const T* b) {
  typename Acc<T>::type av[V], bv[V];
  load_vec<T, V>(a, av);
  load_vec<T, V>(b, bv);
#pragma unroll
  for (int v = 0; v < V; ++v) acc[v] += av[v] * bv[v];
}

// Forward on channels_last: a block is 8 channel lanes x (4 x 4) pixel lanes; a pixel lane owns
// RW = 4 consecutive outputs of one row, so a block covers 8 * V channels of a 4 x 16 output tile.
// Taps: the rows and, per output column, the columns that meet the image; the taps every column of
// the register block takes slide a window of RW input vectors (one new input and one weight vector
// per tap for RW x V FMAs), the rest go one by one.
template <typename T, int V>
__global__ void __launch_bounds__(kNhwcThreads)
forward_nhwc_kernel(const T* __restrict__ x, const T* __restrict__ wt, const T* __restrict__ bias,
                    T* __restrict__ y, Geometry g) {
  using A = typename Acc<T>::type;
  constexpr int RW = 4, TPX = 4, TW = TPX * RW, TH = kNhwcThreads / kNhwcLanes / TPX;
  static_assert(TW == kNhwcTileW && TH == kNhwcTileH, "the tile dwconv_cuda_limits.h counts");
  const int lane = threadIdx.x % kNhwcLanes, pixel = threadIdx.x / kNhwcLanes;
  const int c0 = (blockIdx.x * kNhwcLanes + lane) * V;
  const int tiles_w = (g.W + TW - 1) / TW;
  const int oy = (blockIdx.y / tiles_w) * TH + pixel / TPX;
  const int ox0 = (blockIdx.y % tiles_w) * TW + (pixel % TPX) * RW;
  const int n = blockIdx.z;
  if (c0 >= g.C || oy >= g.H) return;  // (no block-wide synchronisation in this kernel)

  const int left = g.pw - ox0, right = g.W + g.pw - ox0, cols_in = g.W - ox0;
  auto jl = [&](int t) { return max(0, left - t); };
  auto jh = [&](int t) { return t < cols_in ? min(g.kw, right - t) : jl(t); };
  int ja = jl(0), jb = jh(RW - 1);  // taps all RW columns take
  if (jb <= ja) ja = jb = g.kw;
  const int r_lo = max(0, g.ph - oy), r_hi = min(g.kh, g.H + g.ph - oy);

  A acc[RW][V];
#pragma unroll
  for (int t = 0; t < RW; ++t)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[t][v] = A(0);
  const T* xn = x + n * g.xs[0] + static_cast<int64_t>(c0) * g.xs[1];
  for (int r = r_lo; r < r_hi; ++r) {
    const T* xrow = xn + static_cast<int64_t>(oy + r - g.ph) * g.xs[2];
    const T* wrow = wt + static_cast<int64_t>(r) * g.kw * g.C + c0;
    const T* xcol = xrow + static_cast<int64_t>(ox0 - g.pw) * g.xs[3];  // input column of (t = 0, j = 0)
    if (ja < jb) {
      A win[RW][V];
#pragma unroll
      for (int t = 0; t < RW - 1; ++t) load_vec<T, V>(xcol + (t + ja) * g.xs[3], win[t]);
      for (int j = ja; j < jb; ++j) {
        A wv[V];
        load_vec<T, V>(xcol + (RW - 1 + j) * g.xs[3], win[RW - 1]);
        load_vec<T, V>(wrow + static_cast<int64_t>(j) * g.C, wv);
#pragma unroll
        for (int t = 0; t < RW; ++t)
#pragma unroll
          for (int v = 0; v < V; ++v) acc[t][v] += win[t][v] * wv[v];
#pragma unroll
        for (int t = 0; t < RW - 1; ++t)
#pragma unroll
          for (int v = 0; v < V; ++v) win[t][v] = win[t + 1][v];
      }
    }
#pragma unroll
    for (int t = 0; t < RW; ++t) {  // the rest of each column's taps, one by one
      for (int j = jl(t), end = jh(t); j < end; ++j) {
        if (j == ja && (j = jb) >= end) break;  // (jl(t) <= ja and jb <= jh(t)) skip the blocked taps
        nhwc_fma<T, V>(acc[t], xcol + (t + j) * g.xs[3], wrow + static_cast<int64_t>(j) * g.C);
      }
    }
  }

  A b[V];
#pragma unroll
  for (int v = 0; v < V; ++v) b[v] = bias != nullptr ? static_cast<A>(bias[c0 + v]) : A(0);
  T* yrow = y + n * g.ys[0] + static_cast<int64_t>(oy) * g.ys[2] + static_cast<int64_t>(c0) * g.ys[1];
#pragma unroll
  for (int t = 0; t < RW; ++t) {
    if (ox0 + t >= g.W) break;
#pragma unroll
    for (int v = 0; v < V; ++v) acc[t][v] += b[v];
    store_vec<T, V>(yrow + static_cast<int64_t>(ox0 + t) * g.ys[3], acc[t]);
  }
}

// Weight gradient on channels_last: a block is 8 channel lanes x 16 tap lanes; a tap lane owns 4
// adjacent taps of one kernel row (a tap group) and walks its split of the (n, h) rows, sliding a
// window of 4 input vectors along the row against one dY vector per pixel. Only products that meet
// the image: rows whose kernel row falls in padding are skipped, and per tap the pixel columns are
// clipped (blocked where all 4 taps take the pixel, one by one elsewhere). Partial sums go to an
// (S, C, kh, kw) workspace, one slot per split (deterministic, no atomics).
constexpr int kNhwcTapLanes = kNhwcThreads / kNhwcLanes;

template <typename T, int V>
__global__ void __launch_bounds__(kNhwcThreads)
weight_grad_nhwc_kernel(const T* __restrict__ go, const T* __restrict__ x, typename Acc<T>::type* __restrict__ ws,
                        Geometry g, int rows_per_split) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x % kNhwcLanes, tap_lane = threadIdx.x / kNhwcLanes;
  const int c0 = (blockIdx.x * kNhwcLanes + lane) * V;
  const int ngw = (g.kw + 3) / 4, group = blockIdx.y * kNhwcTapLanes + tap_lane;
  if (c0 >= g.C || group >= g.kh * ngw) return;
  const int i = group / ngw, j0 = (group % ngw) * 4, split = blockIdx.z;
  const int first = split * rows_per_split, last = min(g.N * g.H, first + rows_per_split);

  // Tap j0 + t takes pixel columns [wl(t), wh(t)) (none for the zero taps past kw).
  const int left = g.pw - j0, right = g.W + g.pw - j0, taps_in = g.kw - j0;
  auto wl = [&](int t) { return max(0, left - t); };
  auto wh = [&](int t) { return t < taps_in ? min(g.W, right - t) : wl(t); };
  int wa = wl(0), wb = wh(3);
  if (wb <= wa) wa = wb = g.W;

  A acc[4][V];
#pragma unroll
  for (int t = 0; t < 4; ++t)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[t][v] = A(0);
  for (int row = first; row < last; ++row) {
    const int n = row / g.H, h = row % g.H, ih = h + i - g.ph;
    if (ih < 0 || ih >= g.H) continue;
    const T* grow = go + n * g.ys[0] + static_cast<int64_t>(h) * g.ys[2] + static_cast<int64_t>(c0) * g.ys[1];
    const T* xcol = x + n * g.xs[0] + static_cast<int64_t>(ih) * g.xs[2] + static_cast<int64_t>(c0) * g.xs[1] +
                    static_cast<int64_t>(j0 - g.pw) * g.xs[3];  // input column of (w = 0, t = 0)
    if (wa < wb) {
      A win[4][V];
#pragma unroll
      for (int t = 0; t < 3; ++t) load_vec<T, V>(xcol + (wa + t) * g.xs[3], win[t]);
      for (int w = wa; w < wb; ++w) {
        A gv[V];
        load_vec<T, V>(xcol + (w + 3) * g.xs[3], win[3]);
        load_vec<T, V>(grow + static_cast<int64_t>(w) * g.ys[3], gv);
#pragma unroll
        for (int t = 0; t < 4; ++t)
#pragma unroll
          for (int v = 0; v < V; ++v) acc[t][v] += gv[v] * win[t][v];
#pragma unroll
        for (int t = 0; t < 3; ++t)
#pragma unroll
          for (int v = 0; v < V; ++v) win[t][v] = win[t + 1][v];
      }
    }
#pragma unroll
    for (int t = 0; t < 4; ++t) {  // the rest of each tap's pixels, one by one
      for (int w = wl(t), end = wh(t); w < end; ++w) {
        if (w == wa && (w = wb) >= end) break;  // (wl(t) <= wa and wb <= wh(t)) skip the blocked pixels
        nhwc_fma<T, V>(acc[t], xcol + (w + t) * g.xs[3], grow + static_cast<int64_t>(w) * g.ys[3]);
      }
    }
  }
#pragma unroll
  for (int v = 0; v < V; ++v) {
    A* out = ws + (static_cast<int64_t>(split) * g.C + c0 + v) * g.kh * g.kw + i * g.kw + j0;
#pragma unroll
    for (int t = 0; t < 4; ++t)
      if (j0 + t < g.kw) out[t] = acc[t][v];
  }
}

Geometry make_geometry(const at::Tensor& x, int64_t kh, int64_t kw) {
  Geometry g;
  g.N = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.kh = kh; g.kw = kw; g.kwp = round_up(kw, 4); g.ph = kh / 2; g.pw = kw / 2;
  g.pitch = 0;
  for (int d = 0; d < 4; ++d) g.xs[d] = x.stride(d);
  return g;
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "lkfast cuda: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, "lkfast cuda: ", name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  TORCH_CHECK(t.numel() < (int64_t(1) << 31) || t.size(2) * t.size(3) < (int64_t(1) << 31),
              "lkfast cuda: ", name, " is too large");
}

// Whether the channels_last kernels can move 16 bytes (V elements) at a time: every (N, C, H, W)
// tensor 16-byte aligned with unit channel stride and the other strides multiples of V, and C a
// multiple of V.
// Otherwise they run with V = 1 (scalar loads, any strides).
bool nhwc_vector_ok(std::initializer_list<const at::Tensor*> tensors, int64_t C, int64_t V) {
  if (C % V != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0 || t->stride(1) != 1) return false;
    for (int d : {0, 2, 3})
      if (t->stride(d) % V != 0) return false;
  }
  return true;
}

bool is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

template <typename T>
void launch_forward_nhwc(const at::Tensor& x, const at::Tensor& weight, const T* bias, at::Tensor& y, Geometry g,
                         bool flip) {
  // Taps as (kh, kw, C), rotated by 180 degrees for the input gradient.
  const at::Tensor w = flip ? weight.flip({2, 3}) : weight;
  const at::Tensor wt = w.reshape({g.C, g.kh * g.kw}).t().contiguous();
  constexpr int V = 16 / sizeof(T);
  // wt is (kh * kw, C), contiguous: rows stay 16-byte aligned when C % V == 0 (checked with x and y)
  const bool vec = nhwc_vector_ok({&x, &y}, g.C, V) && reinterpret_cast<uintptr_t>(wt.data_ptr()) % 16 == 0;
  const int per_block = kNhwcLanes * (vec ? V : 1);
  const int64_t tiles = ceil_div(g.H, kNhwcTileH) * ceil_div(g.W, kNhwcTileW);
  const std::string too_many = tiles_refusal("channels_last forward", tiles, g.H, g.W);
  TORCH_CHECK(too_many.empty(), "lkfast cuda: ", too_many);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int n0 = 0; n0 < g.N; n0 += kMaxGridYZ) {  // gridDim.z limit
    const int nb = std::min<int64_t>(g.N - n0, kMaxGridYZ);
    dim3 grid((g.C + per_block - 1) / per_block, static_cast<unsigned>(tiles), nb);
    const T* xp = x.data_ptr<T>() + n0 * g.xs[0];
    T* yp = y.data_ptr<T>() + n0 * g.ys[0];
    if (vec) {
      forward_nhwc_kernel<T, V><<<grid, kNhwcThreads, 0, stream>>>(xp, wt.data_ptr<T>(), bias, yp, g);
    } else {
      forward_nhwc_kernel<T, 1><<<grid, kNhwcThreads, 0, stream>>>(xp, wt.data_ptr<T>(), bias, yp, g);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
at::Tensor weight_grad_nhwc(const at::Tensor& grad_out, const at::Tensor& x, Geometry g) {
  using A = typename Acc<T>::type;
  constexpr int V = 16 / sizeof(T);
  const bool vec = nhwc_vector_ok({&grad_out, &x}, g.C, V);
  const int per_block = kNhwcLanes * (vec ? V : 1);
  const int groups = g.kh * ((g.kw + 3) / 4);
  const int64_t rows64 = static_cast<int64_t>(g.N) * g.H;
  const std::string too_many = nhwc_weight_grad_rows_refusal(rows64, g.N, g.H, g.W);
  TORCH_CHECK(too_many.empty(), "lkfast cuda: ", too_many);
  const int rows = static_cast<int>(rows64);
  dim3 grid((g.C + per_block - 1) / per_block, (groups + kNhwcTapLanes - 1) / kNhwcTapLanes, 1);
  // Split the (n, h) rows for about 8 blocks per SM in all.
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y;
  int splits = static_cast<int>(std::min<int64_t>(rows, std::max<int64_t>(1, (8 * sms + blocks - 1) / blocks)));
  splits = std::min<int64_t>(splits, kMaxGridYZ);
  const int per_split = (rows + splits - 1) / splits;
  splits = (rows + per_split - 1) / per_split;
  grid.z = splits;
  at::Tensor ws = at::empty({splits, g.C, g.kh, g.kw}, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (vec) {
    weight_grad_nhwc_kernel<T, V><<<grid, kNhwcThreads, 0, stream>>>(grad_out.data_ptr<T>(), x.data_ptr<T>(),
                                                                    ws.data_ptr<A>(), g, per_split);
  } else {
    weight_grad_nhwc_kernel<T, 1><<<grid, kNhwcThreads, 0, stream>>>(grad_out.data_ptr<T>(), x.data_ptr<T>(),
                                                                    ws.data_ptr<A>(), g, per_split);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ws.sum(0).to(x.scalar_type()).view({g.C, 1, g.kh, g.kw});
}

}  // namespace

at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   bool flip) {
  check_input(x, "x");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1,
              "lkfast cuda: weight must be (C, 1, kh, kw) with C = ", x.size(1), ", got ", weight.sizes());
  TORCH_CHECK(weight.size(2) % 2 == 1 && weight.size(3) % 2 == 1, "lkfast cuda: odd kernel sizes only, got ",
              weight.size(2), "x", weight.size(3));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              "lkfast cuda: x and weight must share dtype and device");
  c10::cuda::CUDAGuard guard(x.device());
  const auto format = (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
                          ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(format));
  if (y.numel() == 0) return y;
  const at::Tensor w = weight.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == x.size(1) && bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "lkfast cuda: bias must be (C,) with x's dtype and device");
    b = bias->contiguous();
  }
  Geometry g = make_geometry(x, weight.size(2), weight.size(3));
  for (int d = 0; d < 4; ++d) g.ys[d] = y.stride(d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lkfast_cuda_forward", [&] {
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    if (format == at::MemoryFormat::ChannelsLast) {
      launch_forward_nhwc<scalar_t>(x, w, bp, y, g, flip);  // channels: 16-byte vectors
    } else if (takes_small_tiles(g.H, g.W)) {
      launch_forward<scalar_t, kSmallTiles>(x, w, bp, y, g, flip);  // 16 x 16 tiles, 64 threads
    } else {
      launch_forward<scalar_t, kWideTiles>(x, w, bp, y, g, flip);  // 64 x 32 tiles, 128 threads
    }
  });
  return y;
}

at::Tensor weight_grad(const at::Tensor& grad_out, const at::Tensor& x, int64_t kh, int64_t kw) {
  check_input(x, "x");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "lkfast cuda: grad_out and x shapes differ: ", grad_out.sizes(),
              " vs ", x.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(),
              "lkfast cuda: grad_out and x must share dtype and device");
  TORCH_CHECK(kh % 2 == 1 && kw % 2 == 1 && kh > 0 && kw > 0, "lkfast cuda: odd kernel sizes only, got ", kh, "x", kw);
  c10::cuda::CUDAGuard guard(x.device());
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (x.numel() == 0) return at::zeros({x.size(1), 1, kh, kw}, x.options());

  Geometry g = make_geometry(x, kh, kw);
  for (int d = 0; d < 4; ++d) g.ys[d] = grad_out.stride(d);
  if (is_channels_last(x)) {
    at::Tensor gw;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lkfast_cuda_weight_grad_nhwc", [&] {
      gw = weight_grad_nhwc<scalar_t>(grad_out, x, g);
    });
    return gw;
  }
  const LaunchSizes sizes = launch_sizes(g.N, g.H, g.W, g.kh, g.kw, x.element_size());
  g.pitch = sizes.weight_grad_pitch;
  const int64_t items64 = sizes.weight_grad_items;
  const std::string too_many = weight_grad_items_refusal(items64, g.N, g.H, g.W);
  TORCH_CHECK(too_many.empty(), "lkfast cuda: ", too_many);
  const int items = static_cast<int>(items64);
  // Split K over (image, tile) items: about 8 blocks per SM in all, no atomics.
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  int splits = std::max(1, std::min(items, (8 * sms + g.C - 1) / g.C));
  splits = std::min<int64_t>(splits, kMaxGridYZ);
  const int per_split = (items + splits - 1) / splits;
  splits = (items + per_split - 1) / per_split;
  at::Tensor ws = at::empty({splits, g.C, kh, kw}, x.options().dtype(acc_dtype));

  const int phases = sizes.weight_grad_phases;  // threads per 4-tap group (small kernels: several)
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lkfast_cuda_weight_grad", [&] {
    using A = typename Acc<scalar_t>::type;
    auto kernel = weight_grad_kernel<scalar_t, kGradTile, kGradTile, kGradMaxGroups>;
    static_assert(sizeof(A) == accumulator_bytes(sizeof(scalar_t)), "the accumulator dwconv_cuda_limits.h counts");
    const int64_t smem = sizes.weight_grad_smem;
    const std::string too_much = smem_refusal("NCHW weight gradient", smem, g.kh, g.kw, dtype_name(x.scalar_type()),
                                              device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
    TORCH_CHECK(too_much.empty(), "lkfast cuda: ", too_much, " (use backend='torch' or 'triton')");
    if (smem > kDefaultSmemPerBlock) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    dim3 grid(g.C, splits);
    for (int launch = 0; launch < sizes.weight_grad_launches; ++launch) {  // kGradThreads * kGradMaxGroups groups each
      const int offset = launch * kGradThreads * kGradMaxGroups;
      kernel<<<grid, kGradThreads, smem, stream>>>(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                   ws.data_ptr<A>(), g, per_split, offset, phases);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return ws.sum(0).to(x.scalar_type()).view({g.C, 1, kh, kw});
}

}  // namespace cuda
}  // namespace lkfast
