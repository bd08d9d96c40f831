// Host-side sizing of the CUDA kernels' launches (dwconv_cuda.cu): which tiling a shape takes, the
// shared memory each kernel needs, its tile and item counts, and why a launch would be refused.
// Plain host C++ (no CUDA, no torch), the one source of these rules: dwconv_cuda.cu takes its launch
// decisions and refusal messages from here, and bindings.cpp compiles it into every build of
// lkfast._C (CPU-only ones too) as cuda_launch_sizes / cuda_launch_refusal, which the dispatcher
// (lkfast/ops/backends.py, CudaBackend.not_supported_reasons) asks before choosing the backend.
#pragma once
#include <cstdint>
#include <string>

namespace lkfast {
namespace cuda {

constexpr int64_t kMaxGridYZ = 65535;                 // gridDim.y and gridDim.z
constexpr int64_t kMaxInt32 = 2147483647;             // the kernels count items and rows in int
constexpr int64_t kDefaultSmemPerBlock = 48 * 1024;   // dynamic shared memory without opting in

// NCHW forward: a block of txn x tyn threads, each owning rb rows x rw consecutive columns of
// outputs (rows strided by tyn); the block's output tile is tile_h() x tile_w().
struct ForwardTiling {
  int rb, rw, txn, tyn;
  constexpr int tile_h() const { return tyn * rb; }
  constexpr int tile_w() const { return txn * rw; }
  constexpr int threads() const { return txn * tyn; }
};
constexpr ForwardTiling kSmallTiles{1, 4, 4, 16};  // 16 x 16 tiles, 64 threads
constexpr ForwardTiling kWideTiles{2, 8, 4, 32};   // 64 x 32 tiles, 128 threads
// Maps up to 32 x 32 take the small tiles (a wide tile would be mostly past the map).
constexpr bool takes_small_tiles(int64_t H, int64_t W) { return H <= 32 && W <= 32; }
constexpr ForwardTiling forward_tiling(int64_t H, int64_t W) {
  return takes_small_tiles(H, W) ? kSmallTiles : kWideTiles;
}

// NCHW weight gradient: items of kGradTile x kGradTile output positions, kGradThreads threads
// owning up to kGradMaxGroups 4-tap groups each per launch (512 groups = 63 x 63 taps).
constexpr int kGradTile = 16;
constexpr int kGradThreads = 128;
constexpr int kGradMaxGroups = 4;

// channels_last: kNhwcLanes channel lanes x (kNhwcThreads / kNhwcLanes) pixel or tap lanes per
// block; the forward's pixel lanes are 4 x 4, each 4 consecutive outputs of a row, so a block
// covers a kNhwcTileH x kNhwcTileW output tile.
constexpr int kNhwcLanes = 8;
constexpr int kNhwcThreads = 128;
constexpr int kNhwcTileW = 16;
constexpr int kNhwcTileH = kNhwcThreads / kNhwcLanes / 4;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int round_up(int a, int b) { return (a + b - 1) / b * b; }

// Bytes of one shared-memory (and register) accumulator: fp64 accumulates in fp64; fp32, fp16
// and bf16 in fp32. dwconv_cuda.cu checks its Acc<T> against this.
constexpr int accumulator_bytes(int element_size) { return element_size == 8 ? 8 : 4; }

// Row pitch (elements) of a shared-memory tile tile_w wide read by windows of a kernel kwp wide
// (kw padded with zero taps to a multiple of 4): every window stays inside the row, rows stay
// 16-byte aligned, and the two rows a quarter warp reads (4 lanes each, rw columns apart) start on
// bank groups that do not collide.
inline int smem_pitch(int tile_w, int kwp, int rw) {
  int pitch = round_up(tile_w + kwp, 4);
  if (rw == 8) {
    if ((pitch / 4) % 2 == 0) pitch += 4;  // 4 lanes cover even groups; the next row the odd ones
  } else {
    while ((pitch / 4) % 8 != 4) pitch += 4;  // 4 lanes cover groups 0..3; the next row 4..7
  }
  return pitch;
}

// Shared memory (bytes) of one NCHW forward block: the kh x kwp taps, then the input tile with its
// halo, (tile_h + kh - 1) x pitch, in the accumulation type.
inline int64_t forward_smem_bytes(ForwardTiling t, int kh, int kw, int acc_bytes) {
  const int kwp = round_up(kw, 4);
  return (static_cast<int64_t>(kh) * kwp +
          static_cast<int64_t>(t.tile_h() + kh - 1) * smem_pitch(t.tile_w(), kwp, t.rw)) * acc_bytes;
}

// Shared memory (bytes) of one NCHW weight-gradient block: the dY tile, then the input tile with
// its halo, (kGradTile + kh - 1) x pitch, in the accumulation type.
inline int64_t weight_grad_smem_bytes(int kh, int kw, int acc_bytes) {
  return (static_cast<int64_t>(kGradTile) * kGradTile +
          static_cast<int64_t>(kGradTile + kh - 1) * smem_pitch(kGradTile, round_up(kw, 4), 4)) * acc_bytes;
}

// Threads per 4-tap group of the NCHW weight gradient: small kernels have few groups, so each
// takes `phases` threads that take every phases-th tile row, and most of the block works
// (k = 7: 14 groups x 8 phases).
inline int weight_grad_phases(int kh, int kw) {
  const int groups = kh * (round_up(kw, 4) / 4);
  int phases = 1;
  while (phases < 8 && groups * phases * 2 <= kGradThreads) phases *= 2;
  return phases;
}

// Launches of the NCHW weight gradient: one per kGradThreads * kGradMaxGroups 4-tap groups.
inline int weight_grad_launches(int kh, int kw) {
  return static_cast<int>(ceil_div(static_cast<int64_t>(kh) * (round_up(kw, 4) / 4),
                                   static_cast<int64_t>(kGradThreads) * kGradMaxGroups));
}

// What the kernels would launch for x of shape (N, C, H, W), a kh x kw kernel and elements of
// element_size bytes; every kernel of both layouts (the input gradient takes grad_out's layout,
// which need not be x's).
struct LaunchSizes {
  ForwardTiling forward_tiling;  // NCHW forward and input gradient
  int forward_pitch;             // elements
  int64_t forward_smem;          // bytes per block
  int64_t forward_tiles;         // gridDim.y
  int weight_grad_pitch;         // NCHW weight gradient
  int64_t weight_grad_smem;
  int64_t weight_grad_items;     // (image, tile) items, counted in int
  int weight_grad_phases;
  int weight_grad_launches;
  int64_t nhwc_forward_tiles;    // channels_last forward: gridDim.y
  int64_t nhwc_weight_grad_rows; // channels_last weight gradient: (image, row) items, counted in int
};

inline LaunchSizes launch_sizes(int64_t N, int64_t H, int64_t W, int kh, int kw, int element_size) {
  const int acc = accumulator_bytes(element_size), kwp = round_up(kw, 4);
  LaunchSizes s;
  s.forward_tiling = forward_tiling(H, W);
  s.forward_pitch = smem_pitch(s.forward_tiling.tile_w(), kwp, s.forward_tiling.rw);
  s.forward_smem = forward_smem_bytes(s.forward_tiling, kh, kw, acc);
  s.forward_tiles = ceil_div(H, s.forward_tiling.tile_h()) * ceil_div(W, s.forward_tiling.tile_w());
  s.weight_grad_pitch = smem_pitch(kGradTile, kwp, 4);
  s.weight_grad_smem = weight_grad_smem_bytes(kh, kw, acc);
  s.weight_grad_items = N * ceil_div(H, kGradTile) * ceil_div(W, kGradTile);
  s.weight_grad_phases = weight_grad_phases(kh, kw);
  s.weight_grad_launches = weight_grad_launches(kh, kw);
  s.nhwc_forward_tiles = ceil_div(H, kNhwcTileH) * ceil_div(W, kNhwcTileW);
  s.nhwc_weight_grad_rows = N * H;
  return s;
}

// Each refusal: why the kernel cannot launch, empty when it can. Worded to follow "cuda: " (the
// dispatcher's reason) or "lkfast cuda: " (dwconv_cuda.cu's TORCH_CHECK).

// smem_optin: the GPU's opt-in shared memory per block (bytes); 0 or less: not known, not checked.
inline std::string smem_refusal(const char* kernel, int64_t smem, int kh, int kw, const std::string& dtype,
                                int64_t smem_optin) {
  if (smem_optin <= 0 || smem <= smem_optin) return "";
  return std::string("its ") + kernel + " kernel needs " + std::to_string(smem) +
         " bytes of shared memory per block for a " + std::to_string(kh) + "x" + std::to_string(kw) +
         " kernel in " + dtype + "; this GPU allows " + std::to_string(smem_optin);
}

inline std::string tiles_refusal(const char* kernel, int64_t tiles, int64_t H, int64_t W) {
  if (tiles <= kMaxGridYZ) return "";
  return "a " + std::to_string(H) + "x" + std::to_string(W) + " map is " + std::to_string(tiles) +
         " tiles for its " + kernel + " kernel, over the grid's " + std::to_string(kMaxGridYZ);
}

inline std::string items_refusal(const char* kernel, const std::string& what, int64_t items, int64_t N, int64_t H,
                                 int64_t W) {
  if (items <= kMaxInt32) return "";
  return "N=" + std::to_string(N) + " x a " + std::to_string(H) + "x" + std::to_string(W) + " map is " +
         std::to_string(items) + " " + what + " for its " + kernel + ", over its int32 counters' " +
         std::to_string(kMaxInt32);
}

inline std::string weight_grad_items_refusal(int64_t items, int64_t N, int64_t H, int64_t W) {
  return items_refusal("NCHW weight gradient", std::to_string(kGradTile) + "x" + std::to_string(kGradTile) + " tiles",
                       items, N, H, W);
}
inline std::string nhwc_weight_grad_rows_refusal(int64_t rows, int64_t N, int64_t H, int64_t W) {
  return items_refusal("channels_last weight gradient", "rows", rows, N, H, W);
}

// The first refusal among every kernel a call on x of shape (N, C, H, W) may launch, empty when
// all of them can: the dispatcher's rule, so that `auto` passes the backend over instead of
// meeting the RuntimeError from inside the op.
inline std::string launch_refusal(int64_t N, int64_t H, int64_t W, int kh, int kw, int element_size,
                                  const std::string& dtype, int64_t smem_optin) {
  const LaunchSizes s = launch_sizes(N, H, W, kh, kw, element_size);
  for (const std::string& why :
       {smem_refusal("NCHW forward", s.forward_smem, kh, kw, dtype, smem_optin),
        smem_refusal("NCHW weight gradient", s.weight_grad_smem, kh, kw, dtype, smem_optin),
        tiles_refusal("NCHW forward", s.forward_tiles, H, W),
        tiles_refusal("channels_last forward", s.nhwc_forward_tiles, H, W),
        weight_grad_items_refusal(s.weight_grad_items, N, H, W),
        nhwc_weight_grad_rows_refusal(s.nhwc_weight_grad_rows, N, H, W)}) {
    if (!why.empty()) return why;
  }
  return "";
}

}  // namespace cuda
}  // namespace lkfast
