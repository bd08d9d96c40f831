// CUDA kernels of lkfast's depthwise convolution: stride 1, zero "same" padding, odd kernels of any
// size (designed for 7..63), any input strides (NCHW, channels_last, or views).
//
// Forward (also the input gradient: the same convolution with the kernel rotated by 180 degrees).
//   One block computes a TH x TW output tile of one (image, channel). It stages the kernel
//   (kh x kwp, the width padded with zero taps to a multiple of 4) and the input tile with its halo
//   ((TH + kh - 1) x pitch) in shared memory, converted to the accumulation type. Each thread owns
//   RB rows x RW consecutive columns of outputs (rows strided by TYN so that the lanes of a quarter
//   warp hit different banks) and walks every kernel row 4 taps at a time: one 16-byte load of 4
//   new inputs and one broadcast load of 4 weights feed 4 x RW FMAs, with a sliding register window
//   carrying the overlap. Kernel rows and 4-tap column groups whose inputs are all padding for the
//   tile are skipped, so maps smaller than the kernel cost what they touch.
// Weight gradient (split-K, no atomics).
//   dW[c, i, j] = sum over (n, h, w) of dY[n, c, h, w] * X[n, c, h + i - ph, w + j - pw]. Block
//   (c, s) reduces the s-th slice of the (image, 16 x 16 tile) items into registers: each thread
//   owns up to MAXG groups of 4 adjacent taps of one kernel row, and per tile row slides a window
//   of inputs against 4 broadcast dY values. Small kernels (<= 64 groups) give each group 2..8
//   threads that take alternate tile rows, summed in shared memory at the end. Each block writes its partial sums once into an
//   (S, C, kh, kw) workspace in the accumulation type; one sum over S finishes (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

namespace lkfast {
namespace cuda {
namespace {

// fp16 / bf16 / fp32 accumulate in fp32; fp64 in fp64.
template <typename T>
struct Acc { using type = float; };
template <>
struct Acc<double> { using type = double; };

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

inline int round_up(int a, int b) { return (a + b - 1) / b * b; }

// Row pitch (elements) of a shared-memory tile TW wide read by windows of a kernel kwp wide: every
// window stays inside the row, rows stay 16-byte aligned, and the two rows a quarter warp reads
// (4 lanes each, RW columns apart) start on bank groups that do not collide.
inline int smem_pitch(int tile_w, int kwp, int rw) {
  int pitch = round_up(tile_w + kwp, 4);
  if (rw == 8) {
    if ((pitch / 4) % 2 == 0) pitch += 4;  // 4 lanes cover even groups; the next row the odd ones
  } else {
    while ((pitch / 4) % 8 != 4) pitch += 4;  // 4 lanes cover groups 0..3; the next row 4..7
  }
  return pitch;
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

  // Skip padding: only kernel rows / 4-tap groups that reach the image from this tile.
  const int oy_last = min(h0 + TH, g.H) - 1, ox_last = min(w0 + TW, g.W) - 1;
  const int r_lo = max(0, g.ph - oy_last), r_hi = min(g.kh, g.H + g.ph - h0);
  const int j_lo = max(0, g.pw - ox_last) & ~3, j_hi = min(g.kwp, (g.W + g.pw - w0 + 3) & ~3);

  const int tx = tid % TXN, ty = tid / TXN;
  A acc[RB][RW];
#pragma unroll
  for (int q = 0; q < RB; ++q)
#pragma unroll
    for (int t = 0; t < RW; ++t) acc[q][t] = A(0);

  for (int r = r_lo; r < r_hi; ++r) {
    const A* wrow = s_w + r * g.kwp;
#pragma unroll
    for (int q = 0; q < RB; ++q) {
      const A* irow = s_in + (ty + q * TYN + r) * g.pitch + tx * RW;
      A win[RW + 4];
#pragma unroll
      for (int t = 0; t < RW; t += 4) load4(irow + j_lo + t, win + t);
      for (int jb = j_lo; jb < j_hi; jb += 4) {
        A wv[4];
        load4(irow + jb + RW, win + RW);
        load4(wrow + jb, wv);
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
#pragma unroll
          for (int t = 0; t < RW; ++t) acc[q][t] += win[t + jj] * wv[jj];
#pragma unroll
        for (int t = 0; t < RW; ++t) win[t] = win[t + 4];
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

template <typename T, int RB, int RW, int TXN, int TYN>
void launch_forward(const at::Tensor& x, const at::Tensor& w, const T* bias, at::Tensor& y, Geometry g,
                    bool flip) {
  using A = typename Acc<T>::type;
  constexpr int TW = TXN * RW, TH = TYN * RB;
  g.pitch = smem_pitch(TW, g.kwp, RW);
  const size_t smem = (static_cast<size_t>(g.kh) * g.kwp + static_cast<size_t>(TH + g.kh - 1) * g.pitch) * sizeof(A);
  auto kernel = forward_kernel<T, RB, RW, TXN, TYN>;
  const int smem_limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  TORCH_CHECK(smem <= static_cast<size_t>(smem_limit), "lkfast cuda: a ", g.kh, "x", g.kw,
              " kernel needs ", smem, " bytes of shared memory per block; this GPU allows ",
              smem_limit, " (use backend='torch' or 'triton')");
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const int tiles = ((g.H + TH - 1) / TH) * ((g.W + TW - 1) / TW);
  TORCH_CHECK(tiles <= 65535, "lkfast cuda: feature map ", g.H, "x", g.W, " is too large (", tiles, " tiles)");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  for (int n0 = 0; n0 < g.N; n0 += 65535) {  // gridDim.z limit
    const int nb = std::min(g.N - n0, 65535);
    dim3 grid(g.C, tiles, nb);
    kernel<<<grid, TXN * TYN, smem, stream>>>(xp + n0 * g.xs[0], w.data_ptr<T>(), bias, yp + n0 * g.ys[0], g, flip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// -------------------------------------------------------------------------------------------------
// Weight gradient

constexpr int kGradTile = 16;     // 16 x 16 output positions per item
constexpr int kGradThreads = 128;
constexpr int kGradMaxGroups = 4;  // 4-tap groups per thread per launch: 512 groups = 63 x 63 taps

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

    const int h_valid = min(TH, g.H - h0), w_valid4 = (min(TW, g.W - w0) + 3) & ~3;
#pragma unroll
    for (int k = 0; k < MAXG; ++k) {
      const int unit = tid + k * kGradThreads;
      const int group = group_offset + unit / phases, phase = unit % phases;
      if (group >= groups) continue;
      const int i = group / ngw, j0 = (group % ngw) * 4;
      // Skip padding: kernel row i sees only zero rows of the halo for this tile.
      if (h0 + i - g.ph >= g.H || h0 + h_valid - 1 + i - g.ph < 0) continue;
      for (int h = phase; h < h_valid; h += phases) {
        const A* xrow = s_x + (h + i) * g.pitch + j0;
        const A* grow = s_go + h * TW;
        A win[8];
        load4(xrow, win);
        for (int w = 0; w < w_valid4; w += 4) {
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
    if (g.H <= 32 && g.W <= 32) {
      launch_forward<scalar_t, 1, 4, 4, 16>(x, w, bp, y, g, flip);  // 16 x 16 tiles, 64 threads
    } else {
      launch_forward<scalar_t, 2, 8, 4, 32>(x, w, bp, y, g, flip);  // 64 x 32 tiles, 128 threads
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
  g.pitch = smem_pitch(kGradTile, g.kwp, 4);
  const int tiles = ((g.H + kGradTile - 1) / kGradTile) * ((g.W + kGradTile - 1) / kGradTile);
  const int64_t items64 = static_cast<int64_t>(g.N) * tiles;
  TORCH_CHECK(items64 < (int64_t(1) << 31), "lkfast cuda: input too large for the weight gradient");
  const int items = static_cast<int>(items64);
  // Split K over (image, tile) items: about 8 blocks per SM in all, no atomics.
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  int splits = std::max(1, std::min(items, (8 * sms + g.C - 1) / g.C));
  splits = std::min(splits, 65535);
  const int per_split = (items + splits - 1) / splits;
  splits = (items + per_split - 1) / per_split;
  at::Tensor ws = at::empty({splits, g.C, kh, kw}, x.options().dtype(acc_dtype));

  const int groups = g.kh * (g.kwp / 4);
  // Small kernels have few 4-tap groups: give each group `phases` threads that take every
  // phases-th tile row, so that most of the block works (k = 7: 14 groups x 8 phases).
  int phases = 1;
  while (phases < 8 && groups * phases * 2 <= kGradThreads) phases *= 2;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lkfast_cuda_weight_grad", [&] {
    using A = typename Acc<scalar_t>::type;
    auto kernel = weight_grad_kernel<scalar_t, kGradTile, kGradTile, kGradMaxGroups>;
    const size_t smem = (static_cast<size_t>(kGradTile) * kGradTile +
                         static_cast<size_t>(kGradTile + g.kh - 1) * g.pitch) * sizeof(A);
    const int smem_limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    TORCH_CHECK(smem <= static_cast<size_t>(smem_limit), "lkfast cuda: a ", kh, "x", kw, " kernel needs ", smem,
                " bytes of shared memory per block; this GPU allows ", smem_limit);
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    dim3 grid(g.C, splits);
    for (int offset = 0; offset < groups; offset += kGradThreads * kGradMaxGroups) {
      kernel<<<grid, kGradThreads, smem, stream>>>(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                   ws.data_ptr<A>(), g, per_split, offset, phases);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return ws.sum(0).to(x.scalar_type()).view({g.C, 1, kh, kw});
}

}  // namespace cuda
}  // namespace lkfast
