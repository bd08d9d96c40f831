// Layout of the packed tiles shared by the ATen side (dwconv_cpu.cpp) and the compute core
// (dwconv_kernel.h). Only constants: safe to include under `#pragma GCC target`.
#pragma once

namespace lkfast {
namespace cpu {
// Outputs per register block along W in the forward pass.
constexpr int kOutBlock = 8;
// Taps per register block along the kernel width in the weight gradient.
constexpr int kTapBlock = 8;
// Zero columns on each side of every packed weight row (forward) and output-gradient row
// (weight gradient), so that the "band" loops may index a whole register block past the edge.
constexpr int kWeightPad = kOutBlock - 1;
constexpr int kGradPad = kTapBlock - 1;
// Kernels at most this wide run the forward on channels-innermost tensors in place (no packed
// tiles, see dwconv_kernel.h, forward_direct); wider ones pack. Measured on an AVX-512 Xeon and
// capped to AVX2, batch 8, maps 14-56: in place 1.2-2.7x faster at 7 and 13 on both; at 27-31 on
// par with packing on AVX-512 and 0.72-0.85x of it on AVX2, where packing's copies are a few
// percent of the work and its band loop wastes no multiply-adds on maps narrower than the kernel.
constexpr int kDirectMaxKw = 13;
}  // namespace cpu
}  // namespace lkfast
